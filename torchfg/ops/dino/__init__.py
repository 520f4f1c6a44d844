"""DINO cross-entropy between centred, sharpened teacher and student distributions over crop pairs.

The op behind :class:`torchfg.losses.DINOLoss`: a chunk-free pure-PyTorch reference (the ground
truth and the CPU path) and a fused Triton kernel pair that never materialises per-pair copies of
the (crops x B x out_dim) probabilities. Registered with ``torch.library`` so that it runs under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations


import torch

from torchfg._validation import check_float_tensor, check_positive
from torchfg.backends import BackendSpec, register_op, resolve_backend
from torchfg.ops._library import custom_op
from torchfg.ops.precision import autocast_off
from torchfg.ops.dino.reference import (
    dino_accumulation_dtype,
    dino_loss_backward_reference,
    dino_loss_reference,
    n_pairs,
)
from torchfg._validation import check_int as _check_count

__all__ = ["dino_loss"]

register_op("dino_loss", BackendSpec("triton"))


@custom_op("torchfg::dino_loss")
def _dino_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    n_global: int,
    student_temp: float,
    teacher_temp: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from torchfg.ops.dino.triton import dino_loss_triton

        return dino_loss_triton(student, teacher, center, n_crops, n_global, student_temp, teacher_temp)
    return dino_loss_reference(student, teacher, center, n_crops, n_global, student_temp, teacher_temp)


@_dino_loss_op.register_fake
def _(student, teacher, center, n_crops, n_global, student_temp, teacher_temp, backend):
    acc = dino_accumulation_dtype(student, teacher)
    return (
        student.new_empty((), dtype=acc),
        student.new_empty(student.shape[0], dtype=acc),
        student.new_empty(teacher.shape[0], dtype=acc),
    )


@custom_op("torchfg::dino_loss_backward")
def _dino_loss_backward_op(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    n_crops: int,
    n_global: int,
    student_temp: float,
    teacher_temp: float,
    backend: str,
) -> torch.Tensor:
    args = (
        grad_loss, student, teacher, center, student_lse, teacher_lse, n_crops, n_global, student_temp, teacher_temp
    )
    if backend == "triton":
        from torchfg.ops.dino.triton import dino_loss_backward_triton

        return dino_loss_backward_triton(*args)
    return dino_loss_backward_reference(*args)


@_dino_loss_backward_op.register_fake
def _(grad_loss, student, teacher, center, student_lse, teacher_lse, n_crops, n_global, student_temp, teacher_temp,
      backend):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, center, n_crops, n_global, student_temp, teacher_temp, backend = inputs
    _loss, student_lse, teacher_lse = output
    ctx.mark_non_differentiable(student_lse, teacher_lse)
    ctx.save_for_backward(student, teacher, center, student_lse, teacher_lse)
    ctx.config = (n_crops, n_global, student_temp, teacher_temp, backend)


def _backward(ctx, grad_loss, _grad_student_lse, _grad_teacher_lse):
    student, teacher, center, student_lse, teacher_lse = ctx.saved_tensors
    n_crops, n_global, student_temp, teacher_temp, backend = ctx.config
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = _dino_loss_backward_op(
            grad_loss, student, teacher, center, student_lse, teacher_lse,
            n_crops, n_global, student_temp, teacher_temp, backend,
        )
    # The teacher is a target: no gradient flows into it or into the centre.
    return grad_student, None, None, None, None, None, None, None


_dino_loss_op.register_autograd(_backward, setup_context=_setup_context)
_dino_loss_backward_op.register_first_order_only("torchfg's DINO loss (dino_loss)")


@autocast_off
def dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    *,
    n_crops: int,
    n_global_crops: int,
    student_temp: float,
    teacher_temp: float,
    backend: str = "auto",
) -> torch.Tensor:
    """DINO self-distillation cross-entropy, averaged over crop pairs and the batch.

    With ``p_i = softmax((teacher_i - center) / teacher_temp)`` and
    ``log q_v = log_softmax(student_v / student_temp)`` (row-wise over ``out_dim``), the loss is the
    mean over the ``n_global_crops * (n_crops - 1)`` ordered pairs (teacher global crop i,
    student crop v), v != i, of the batch mean of ``-sum p_i * log q_v``.

    Args:
        student_output: (n_crops * B, out_dim) student logits, crop-major (crop v of sample b is
            row ``v * B + b``); the first ``n_global_crops`` crops are the global views.
        teacher_output: (n_global_crops * B, out_dim) teacher logits of the global views, same
            layout. Treated as a constant target: no gradient flows into it.
        center: (out_dim,) centre subtracted from the teacher logits (no gradient).
        n_crops: number of student crops (>= 2).
        n_global_crops: number of teacher (global) crops, 1 <= n_global_crops <= n_crops.
        student_temp: student softmax temperature (> 0).
        teacher_temp: teacher softmax temperature (> 0).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`torchfg.backends`).

    Returns:
        0-dim loss in fp32 (fp64 if an input is fp64), the dtype it is computed in, as the
        triplet losses return theirs: an fp16 loss would turn ``GradScaler``'s first scaled
        gradient (65536) into inf and skip the step. Differentiable with respect to
        ``student_output`` only; the gradient is in the student's dtype.

    Example:
        >>> B, K = 4, 32
        >>> student = torch.randn(6 * B, K, requires_grad=True)
        >>> teacher = torch.randn(2 * B, K)
        >>> loss = dino_loss(student, teacher, torch.zeros(K), n_crops=6, n_global_crops=2,
        ...                  student_temp=0.1, teacher_temp=0.04)
        >>> loss.backward()
        >>> student.grad.shape
        torch.Size([24, 32])
    """
    check_float_tensor(student_output, "student_output", ndim=2)
    check_float_tensor(teacher_output, "teacher_output", ndim=2)
    check_float_tensor(center, "center")
    n_crops = _check_count(n_crops, "n_crops", 2)
    n_global_crops = _check_count(n_global_crops, "n_global_crops", 1)
    if n_global_crops > n_crops:
        raise ValueError(
            f"n_global_crops must be <= n_crops (the global crops are among the student crops), "
            f"got n_global_crops={n_global_crops} and n_crops={n_crops}"
        )
    student_temp = check_positive(student_temp, "student_temp", reciprocal=True)
    teacher_temp = check_positive(teacher_temp, "teacher_temp", reciprocal=True)
    rows, out_dim = student_output.shape
    if out_dim == 0:
        raise ValueError("student_output must have out_dim >= 1 columns (the prototypes), got 0")
    if rows == 0 or rows % n_crops:
        raise ValueError(
            f"student_output has {rows} rows, which is not a positive multiple of n_crops={n_crops} "
            "(expected n_crops * B rows, crop-major)"
        )
    batch = rows // n_crops
    if teacher_output.shape[0] % n_global_crops:
        raise ValueError(
            f"teacher_output has {teacher_output.shape[0]} rows, which is not a multiple of "
            f"n_global_crops={n_global_crops}"
        )
    if teacher_output.shape[0] != n_global_crops * batch:
        raise ValueError(
            f"teacher_output has {teacher_output.shape[0]} rows but the student's batch is B={batch} "
            f"({rows} rows / n_crops={n_crops}): expected n_global_crops * B = {n_global_crops * batch}"
        )
    if teacher_output.shape[1] != out_dim:
        raise ValueError(
            f"student_output and teacher_output must have the same out_dim, got {out_dim} and "
            f"{teacher_output.shape[1]}"
        )
    if center.shape != (out_dim,):
        raise ValueError(f"center must have shape (out_dim,) = ({out_dim},), got {tuple(center.shape)}")
    for name, tensor in (("teacher_output", teacher_output), ("center", center)):
        if tensor.device != student_output.device:
            raise ValueError(
                f"student_output and {name} must be on the same device, got {student_output.device} "
                f"and {tensor.device}"
            )
    backend = resolve_backend("dino_loss", student_output.device, student_output.dtype, backend)
    loss, _student_lse, _teacher_lse = _dino_loss_op(
        student_output, teacher_output.detach(), center.detach(),
        n_crops, n_global_crops, student_temp, teacher_temp, backend,
    )
    return loss
