"""DINO self-distillation loss with a centred, temperature-scheduled teacher."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from torchfg._validation import check_choice, check_float_tensor, check_positive, in_backward
from torchfg.backends import check_backend
from torchfg.functional.dino import dino_loss
from torchfg._validation import check_int as _check_int
from torchfg.ops.dino.reference import dino_accumulation_dtype
from torchfg.ops.precision import autocast_off

__all__ = ["DINOLoss"]


def _accept_row_center(module: nn.Module, state_dict: dict, prefix: str, *_args: object) -> None:
    """load_state_dict pre-hook: the original code stores the centre as (1, out_dim)."""
    center = state_dict.get(prefix + "center")
    if isinstance(center, torch.Tensor) and center.dim() == 2 and center.shape[0] == 1:
        state_dict[prefix + "center"] = center[0]


def _exporting() -> bool:
    return torch.compiler.is_exporting()


# Run eagerly at trace time, the answer folded into the graph (what
# torch.compiler.assume_constant_result does, without importing torch._dynamo here): torch 2.11's
# dynamo folds a traced is_exporting() to True whatever the flag, so every torch.compile took the
# export branch below, and the compiled backward read the centre after its in-place update.
_exporting._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _compiling_for_inductor() -> bool:
    """Whether torch.compile is tracing (torch.export traces too, but functionalises the in-place
    centre update into a buffer mutation of the exported program, as for BatchNorm)."""
    return torch.compiler.is_compiling() and not _exporting()


class DINOLoss(nn.Module):
    """Cross-entropy between a centred, sharpened teacher and the student over crop pairs (DINO).

    ``forward(student_output, teacher_output, epoch)`` returns the mean over the ordered pairs
    (teacher global crop i, student crop v), v != i, of the batch mean of
    ``-sum softmax((t_i - center) / T_teacher(epoch)) * log_softmax(s_v / student_temp)``.
    In training mode each forward then updates the ``center`` buffer (saved in the state dict) as
    an EMA of the teacher's batch mean, ``center <- m * center + (1 - m) * mean(teacher_output)``;
    when ``torch.distributed`` is initialised the batch mean is taken over all ranks with one
    ``all_reduce`` (exact also for unequal per-rank batch sizes). The loss of a step uses the
    centre from before that step's update. No gradient flows into the teacher. A teacher batch
    with an inf or NaN (on any rank) leaves the centre as it was: that step's loss is not finite,
    but the next steps' are (the original code keeps the inf or NaN in the centre for good).

    The original code (facebookresearch/dino) updates the centre on every forward whatever the
    mode. A module starts in training mode, so a loop that never calls ``.eval()`` on the loss
    updates on every forward exactly as the original does. In eval mode the centre is frozen, like
    BatchNorm's running statistics, so that a validation loss (or a model-wide ``.eval()``) does not
    move the training state; call :meth:`update_center` to update it explicitly.

    ``load_state_dict`` also accepts the original code's centre of shape (1, out_dim);
    :func:`torchfg.heads.load_dino_checkpoint` loads it from a whole checkpoint.

    The teacher temperature ramps linearly from ``warmup_teacher_temp`` at epoch 0 to
    ``teacher_temp`` at epoch ``warmup_teacher_temp_epochs - 1`` (the original method's
    ``np.linspace``), then stays at ``teacher_temp``.

    Args:
        out_dim: K, the number of prototypes (width of the head's output).
        n_crops: student crops per sample (global + local), >= 2.
        n_global_crops: teacher crops per sample, the first ``n_global_crops`` student crops.
        student_temp: student softmax temperature.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp: teacher temperature at epoch 0.
        warmup_teacher_temp_epochs: length of the linear ramp (0: no warm-up).
        n_epochs: length of training; ``epoch`` must be in ``[0, n_epochs)``.
        center_momentum: EMA momentum ``m`` of the centre, in [0, 1].
        backend: loss backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Shapes:
        student_output (n_crops * B, out_dim), crop-major (crop v of sample b is row v * B + b);
        teacher_output (n_global_crops * B, out_dim), same layout -> 0-dim loss.

    Example:
        >>> criterion = DINOLoss(out_dim=64, n_crops=6, warmup_teacher_temp_epochs=5, n_epochs=30)
        >>> student = torch.randn(6 * 8, 64, requires_grad=True)
        >>> teacher = torch.randn(2 * 8, 64)
        >>> loss = criterion(student, teacher, epoch=0)
        >>> loss.backward()
        >>> criterion.center.shape
        torch.Size([64])
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        *,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        n_epochs: int = 100,
        center_momentum: float = 0.9,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.out_dim = _check_int(out_dim, "out_dim", 1)
        self.n_crops = _check_int(n_crops, "n_crops", 2)
        self.n_global_crops = _check_int(n_global_crops, "n_global_crops", 1)
        if self.n_global_crops > self.n_crops:
            raise ValueError(
                f"n_global_crops must be <= n_crops, got n_global_crops={n_global_crops} and n_crops={n_crops}"
            )
        self.student_temp = check_positive(student_temp, "student_temp", reciprocal=True)
        self.teacher_temp = check_positive(teacher_temp, "teacher_temp", reciprocal=True)
        self.warmup_teacher_temp = check_positive(warmup_teacher_temp, "warmup_teacher_temp", reciprocal=True)
        self.warmup_teacher_temp_epochs = _check_int(warmup_teacher_temp_epochs, "warmup_teacher_temp_epochs", 0)
        self.n_epochs = _check_int(n_epochs, "n_epochs", 1)
        if self.warmup_teacher_temp_epochs > self.n_epochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs must be <= n_epochs, got {warmup_teacher_temp_epochs} > {n_epochs}"
            )
        momentum = check_positive(center_momentum, "center_momentum", allow_zero=True)
        if momentum > 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        self.center_momentum = momentum
        self.backend = check_backend(backend, "dino_loss")
        self.register_buffer("center", torch.zeros(self.out_dim))
        self.register_load_state_dict_pre_hook(_accept_row_center)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero ``center``, the state a new loss starts from (e.g. after ``to_empty`` from the meta device)."""
        self.center.zero_()

    def teacher_temp_at(self, epoch: int) -> float:
        """Teacher temperature at ``epoch`` (an int in ``[0, n_epochs)``)."""
        epoch = self._check_epoch(epoch)
        warmup = self.warmup_teacher_temp_epochs
        if epoch >= warmup:
            return self.teacher_temp
        if warmup == 1:
            return self.warmup_teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / (warmup - 1)

    def _ramping(self, epoch: int) -> bool:
        """Whether the teacher temperature at ``epoch`` is on a warm-up ramp (varies with the epoch)."""
        return epoch < self.warmup_teacher_temp_epochs and self.warmup_teacher_temp_epochs > 1 and (
            self.warmup_teacher_temp != self.teacher_temp
        )

    def _scaled_teacher(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(t - center) * (1 / T) in the loss's accumulation dtype, T as a tensor (see _checked_loss)."""
        acc = torch.promote_types(dino_accumulation_dtype(student_output, teacher_output), self.center.dtype)
        inverse = 1.0 / torch.full((), teacher_temp, dtype=torch.float64, device=teacher_output.device)
        return (teacher_output.to(acc) - self.center.to(acc)) * inverse.to(acc)

    def _check_epoch(self, epoch: object) -> int:
        # check_int keeps a SymInt epoch (torch.compile) symbolic: one graph for every epoch.
        epoch = _check_int(epoch, "epoch")
        if not epoch < self.n_epochs:
            raise ValueError(f"epoch must be in [0, n_epochs) = [0, {self.n_epochs}), got {epoch}")
        return epoch

    @autocast_off
    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss of one step; updates ``center`` afterwards in training mode.

        Args:
            student_output: (n_crops * B, out_dim) student logits, crop-major.
            teacher_output: (n_global_crops * B, out_dim) teacher logits of the global crops.
            epoch: current epoch, in ``[0, n_epochs)``; selects the teacher temperature.

        Returns:
            0-dim loss in fp32 (fp64 if an input is fp64). Under torch.distributed in training mode a rank
            may have an empty batch (B = 0): it takes part in the centre update and gets 0.
        """
        if self.training and not torch.compiler.is_compiling() and in_backward():
            # A recomputation by activation checkpointing: the centre this step used has been
            # updated in place since, so the recomputed loss (and the gradient) would use another
            # one, and use_reentrant=True would update it a second time.
            raise RuntimeError(
                "DINOLoss ran inside a backward pass (a torch.utils.checkpoint recomputation): it updates "
                "its centre in training mode, so a recomputation would give a wrong gradient; keep the loss "
                "outside the checkpointed function (checkpoint the model only)"
            )
        distributed = self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
        grad_enabled = torch.is_grad_enabled()  # the caller's: the update itself runs under no_grad
        if not distributed:
            loss = self._checked_loss(student_output, teacher_output, epoch, distributed=False)
            if self.training:
                with torch.no_grad():
                    self._update_center(teacher_output, None, grad_enabled=grad_enabled)
            return loss
        # Under torch.distributed every rank must reach the centre's all_reduce: a rank whose input
        # fails its checks joins it with a flag that keeps every centre as it was, then raises (the
        # launcher then ends the job), instead of raising first and leaving the others waiting.
        try:
            checked, error = self._checked_loss(student_output, teacher_output, epoch, distributed=True), None
        except (ValueError, TypeError) as exc:
            checked, error = None, exc
        self._update_center(None if error is not None else teacher_output, error, grad_enabled=grad_enabled)
        # _update_center has raised the error, if any, after the collective: the loss was computed.
        return cast(torch.Tensor, checked)

    def _checked_loss(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int, *, distributed: bool
    ) -> torch.Tensor:
        check_float_tensor(student_output, "student_output", ndim=2)
        check_float_tensor(teacher_output, "teacher_output", ndim=2)
        for name, tensor in (("student_output", student_output), ("teacher_output", teacher_output)):
            if tensor.shape[1] != self.out_dim:
                raise ValueError(f"{name} must have out_dim={self.out_dim} columns, got shape {tuple(tensor.shape)}")
        teacher_temp = self.teacher_temp_at(epoch)
        center = self.center
        if self.training and not _compiling_for_inductor():
            # The update after this loss writes into the buffer (as BatchNorm's running stats are
            # updated, which torch.func.functional_call and torch.export both rely on), so the op
            # saves a copy for its backward: out_dim floats.
            center = center.clone()
        if torch.compiler.is_compiling() and self._ramping(epoch):
            # Under torch.compile the warm-up temperature is a symbolic float, and a float argument of
            # a custom op is guarded on its value: one graph per warm-up epoch until the recompile
            # limit (then eager, or an error with fullgraph), and with dynamic=True a guard that
            # fails on its own rounding. So the temperature goes in as a tensor instead: the op gets
            # the scaled logits (t - center) / T, a zero centre and T = 1, which it uses exactly.
            teacher_output = self._scaled_teacher(student_output, teacher_output, teacher_temp)
            center, teacher_temp = torch.zeros_like(self.center), 1.0
        if distributed and student_output.shape[0] == 0 and teacher_output.shape[0] == 0:
            # A rank with an empty batch (an uneven split) still joins the centre's all_reduce, in
            # forward. No pairs: loss 0, zero gradient. Elsewhere dino_loss refuses an empty batch.
            return student_output.sum(dtype=dino_accumulation_dtype(student_output, teacher_output)) * 0.0
        return dino_loss(
            student_output,
            teacher_output,
            center,
            n_crops=self.n_crops,
            n_global_crops=self.n_global_crops,
            student_temp=self.student_temp,
            teacher_temp=teacher_temp,
            backend=self.backend,
        )

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA update of ``center`` with the teacher's batch mean over all ranks.

        Args:
            teacher_output: (N, out_dim) teacher logits of this rank (N may differ between ranks).

        Raises:
            ValueError, TypeError: on the rank whose ``teacher_output`` is bad, after it joined the
                other ranks' all_reduce (they keep their centres and go on, as in ``forward``;
                before, they waited in it until the process group's timeout).
        """
        try:
            check_float_tensor(teacher_output, "teacher_output", ndim=2)
            if teacher_output.shape[1] != self.out_dim:
                raise ValueError(
                    f"teacher_output must have out_dim={self.out_dim} columns, got shape {tuple(teacher_output.shape)}"
                )
        except (ValueError, TypeError) as error:
            self._update_center(None, error)
        self._update_center(teacher_output, None)

    def _update_center(
        self, teacher_output: torch.Tensor | None, error: BaseException | None, *, grad_enabled: bool = True
    ) -> None:
        # Sum, row count and an error flag travel in one all_reduce, so unequal per-rank batches
        # average exactly. A rank whose input failed its checks still joins it (the others would
        # wait in it forever), then raises; its flag keeps every rank's centre as it was, with no
        # host sync on the healthy ranks. fp64 whatever the inputs' dtypes: ranks with fp32 and
        # fp64 teachers sent buffers of two sizes (a gloo abort).
        stats = torch.zeros(self.out_dim + 2, dtype=torch.float64, device=self.center.device)
        if teacher_output is not None:
            torch.sum(teacher_output.detach(), dim=0, dtype=stats.dtype, out=stats[:-2])
            stats[-2] = teacher_output.shape[0]
        if error is not None:
            stats[-1] = 1.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        if error is not None:
            raise error
        count = stats[-2]
        batch_center = stats[:-2] / count.clamp_min(1)
        updated = self.center * self.center_momentum + batch_center.to(self.center) * (1 - self.center_momentum)
        # No host sync on the count: an update with no rows on any rank, an input error on one,
        # or a non-finite teacher value on any (an fp16 overflow under AMP, whose step the
        # GradScaler skips; kept, it would make every later loss NaN) leaves the centre as is.
        keep = (count > 0) & (stats[-1] == 0) & torch.isfinite(stats[:-2]).all()
        updated = torch.where(keep, updated, self.center)
        if _compiling_for_inductor() and grad_enabled:
            # Rebound, not copied into: under torch.compile (inductor) a clone of the centre passed
            # to the loss was elided and the backward read the buffer after an in-place update.
            # With grad off (inference mode turns it off) nothing was saved, and rebinding there
            # would make the buffer an inference tensor that no later training step could save.
            self.center = updated
        else:
            self.center.copy_(updated)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, n_crops={self.n_crops}, n_global_crops={self.n_global_crops}, "
            f"student_temp={self.student_temp}, teacher_temp={self.teacher_temp}, "
            f"warmup_teacher_temp={self.warmup_teacher_temp}, "
            f"warmup_teacher_temp_epochs={self.warmup_teacher_temp_epochs}, n_epochs={self.n_epochs}, "
            f"center_momentum={self.center_momentum}, backend={self.backend!r}"
        )
