"""Training schedules: cosine decay with linear warm-up, and EMA of a teacher's weights."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn
from torchfg._validation import check_int as _check_int

__all__ = ["cosine_schedule", "ema_update_"]


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    *,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-step values: a linear warm-up, then a half cosine from ``base`` down (or up) to ``final``.

    As in DINO's ``cosine_scheduler``: the first ``warmup_epochs * steps_per_epoch`` values go
    linearly from ``start_warmup_value`` to ``base`` (both included); the remaining ``n`` values are
    ``final + (base - final) * (1 + cos(pi * j / n)) / 2`` for ``j = 0 .. n - 1``.

    Args:
        base: value at the end of the warm-up / start of the cosine.
        final: value the cosine tends to.
        epochs: total epochs (>= 1).
        steps_per_epoch: optimisation steps per epoch (>= 1).
        warmup_epochs: epochs of linear warm-up, in [0, epochs].
        start_warmup_value: first value of the warm-up.

    Returns:
        float64 array of shape (epochs * steps_per_epoch,); index it with the global step
        (its items are ``np.float64``, a subclass of ``float``). Convert an item with ``float()``
        before it goes into an optimizer's ``param_groups`` or other checkpointed state: a
        numpy scalar there makes ``torch.load`` (``weights_only=True``, the default since torch
        2.6) refuse the checkpoint, and ties it to the numpy version that saved it.

    Example:
        >>> lr = cosine_schedule(1e-3, 1e-6, epochs=10, steps_per_epoch=100, warmup_epochs=1)
        >>> lr.shape, float(lr[99]), float(lr[100])
        ((1000,), 0.001, 0.001)
    """
    base = _check_number(base, "base")
    final = _check_number(final, "final")
    start_warmup_value = _check_number(start_warmup_value, "start_warmup_value")
    epochs = _check_int(epochs, "epochs", 1)
    steps_per_epoch = _check_int(steps_per_epoch, "steps_per_epoch", 1)
    warmup_epochs = _check_int(warmup_epochs, "warmup_epochs", 0)
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs must be <= epochs, got {warmup_epochs} > {epochs}")
    warmup_steps = warmup_epochs * steps_per_epoch
    if math.isfinite(base - start_warmup_value):
        warmup = np.linspace(start_warmup_value, base, warmup_steps)
    else:  # linspace's step would overflow: blend the ends, as for the cosine below
        fraction = np.linspace(0.0, 1.0, warmup_steps)
        warmup = start_warmup_value * (1.0 - fraction) + base * fraction
    n_cosine = epochs * steps_per_epoch - warmup_steps
    steps = np.arange(n_cosine, dtype=np.float64)
    rise = 1.0 + np.cos(np.pi * steps / max(n_cosine, 1))
    if math.isfinite(base - final):
        cosine = final + 0.5 * (base - final) * rise
    else:
        # base - final overflows although every value lies between the two; this blend cannot
        # (its terms have opposite signs), but it rounds differently, so it is kept to this case.
        weight = 0.5 * rise
        cosine = final * (1.0 - weight) + base * weight
    return np.concatenate([warmup, cosine])


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, without autograd: ``teacher_param <- momentum * teacher_param + (1 - momentum) * student_param``.

    Parameters are matched in registration order (``parameters()``), so the two modules must
    have the same architecture; buffers (e.g. BatchNorm statistics) are left alone, as in DINO.
    Pass the unwrapped student (``ddp_model.module``) or any module with the same parameters.

    Args:
        teacher: module updated in place.
        student: module whose parameters are averaged in.
        momentum: in [0, 1]; 1 keeps the teacher, 0 copies the student.

    Example:
        >>> student, teacher = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> ema_update_(teacher, student, momentum=0.996)
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    momentum = _check_number(momentum, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    teacher_named = list(teacher.named_parameters())
    student_named = list(student.named_parameters())
    if len(teacher_named) != len(student_named):
        raise ValueError(
            f"teacher and student must have the same parameters, got {len(teacher_named)} and {len(student_named)}"
        )
    for (t_name, t_param), (s_name, s_param) in zip(teacher_named, student_named):
        if t_param.shape != s_param.shape:
            raise ValueError(
                f"parameter shapes differ: teacher {t_name} {tuple(t_param.shape)} vs "
                f"student {s_name} {tuple(s_param.shape)}"
            )
    if not teacher_named:
        return
    teacher_params: list[torch.Tensor] = [p for _, p in teacher_named]
    student_params = [p.detach().to(device=t.device, dtype=t.dtype) for (_, p), t in zip(student_named, teacher_params)]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
