"""Exact ROC AUC for multi-label scores, and the relative improvement between two sets of AUCs."""

from __future__ import annotations

import numbers
import warnings
from typing import Sequence

import numpy as np
import torch

from torchfg._validation import check_tensor

__all__ = ["multilabel_auc", "relative_improvement"]

_AVERAGES = ("macro", "micro", None)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 1 else x


def _check_binary_targets(targets: torch.Tensor) -> torch.Tensor:
    if targets.dtype == torch.bool:
        return targets.to(torch.float64)
    if targets.dtype.is_complex:
        raise TypeError(f"targets must be a real or bool tensor of 0/1 values, got {targets.dtype}")
    if targets.numel() and not bool(((targets == 0) | (targets == 1)).all()):
        bad = targets[(targets != 0) & (targets != 1)].flatten()[:5].tolist()
        raise ValueError(f"targets must be binary (0/1 or bool), found values such as {bad}")
    return targets.to(torch.float64)


def _auc_per_column(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AUC of each column of (N, L) float64 or int64 scores against (N, L) 0/1 float64 targets.

    Mann-Whitney form: AUC = (sum of positive ranks - P (P + 1) / 2) / (P * Nn), with tied scores
    given the average of the ranks they span (which counts a tied positive/negative pair as 1/2, as
    the trapezoidal ROC area does). NaN where a column has a single class.
    """
    num_rows, num_cols = scores.shape
    order = scores.argsort(dim=0)
    sorted_scores = scores.gather(0, order)
    sorted_targets = targets.gather(0, order)
    starts_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    starts_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
    # Tie groups numbered per column, offset so that every column has its own range of ids.
    group = starts_group.cumsum(dim=0) - 1 + torch.arange(num_cols, device=scores.device) * num_rows
    group = group.flatten()
    position = torch.arange(num_rows, device=scores.device, dtype=torch.float64)[:, None].expand(num_rows, num_cols)
    position = position.flatten()
    first = torch.full((num_rows * num_cols,), float("inf"), dtype=torch.float64, device=scores.device)
    first = first.scatter_reduce(0, group, position, reduce="amin")
    last = torch.full_like(first, -float("inf")).scatter_reduce(0, group, position, reduce="amax")
    rank = ((first[group] + last[group]) / 2 + 1).view(num_rows, num_cols)
    positives = sorted_targets.sum(dim=0)
    negatives = num_rows - positives
    positive_rank_sum = (rank * sorted_targets).sum(dim=0)
    auc = (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    single_class = (positives == 0) | (negatives == 0)
    return torch.where(single_class, torch.full_like(auc, float("nan")), auc)


def multilabel_auc(scores: torch.Tensor, targets: torch.Tensor, average: str | None = "macro") -> torch.Tensor:
    """Exact ROC AUC per label, equal to scikit-learn's ``roc_auc_score``.

    Computed from ranks (Mann-Whitney U) with tie correction in float64 on the scores' device:
    no thresholds, no binning. A label whose targets hold a single class has no ROC curve: its AUC
    is NaN, it is left out of the macro mean, and a ``UserWarning`` names it. (scikit-learn also
    gives such a label NaN, but its macro mean is then NaN; per label and micro the two agree.)

    Args:
        scores: (N, L) real scores (logits or probabilities; only their order matters), or (N,) for
            one label. NaN is rejected.
        targets: (N, L) (or (N,)) binary targets, bool or 0/1 integers/floats.
        average: ``"macro"`` (mean of the per-label AUCs, NaN ones skipped), ``"micro"`` (one AUC over
            all (sample, label) pairs, as scikit-learn's ``average="micro"``), or ``None`` (per label).

    Returns:
        float64 tensor: a scalar for ``"macro"``/``"micro"``, (L,) for ``None``.

    Example:
        >>> scores = torch.tensor([[0.1, 0.9], [0.4, 0.2], [0.35, 0.8], [0.8, 0.1]])
        >>> targets = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 0]])
        >>> multilabel_auc(scores, targets, average=None)
        tensor([0.7500, 1.0000], dtype=torch.float64)
    """
    scores = check_tensor(scores, "scores")
    targets = check_tensor(targets, "targets")
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
    if scores.dtype.is_complex:
        raise TypeError(f"scores must be a real tensor, got {scores.dtype}")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must have shape (N, L) or (N,), got {tuple(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"scores and targets must have the same shape, got scores {tuple(scores.shape)} and "
            f"targets {tuple(targets.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("scores must hold at least one sample, got N = 0")
    if scores.device != targets.device:
        raise ValueError(f"scores and targets must be on the same device, got {scores.device} and {targets.device}")
    # Only the order matters: integer scores stay integers (float64 would merge those beyond 2^53);
    # uint64 is mapped to int64 in order (its top half would wrap negative in a plain cast).
    if scores.dtype == torch.uint64:
        scores = scores.view(torch.int64) ^ torch.iinfo(torch.int64).min
    scores = scores.to(torch.float64 if scores.dtype.is_floating_point else torch.int64)
    if scores.dtype.is_floating_point and bool(torch.isnan(scores).any()):
        raise ValueError("scores contains NaN")
    targets = _check_binary_targets(targets)
    scores, targets = _as_2d(scores), _as_2d(targets)

    if average == "micro":
        auc = _auc_per_column(scores.reshape(-1, 1), targets.reshape(-1, 1))[0]
        if bool(torch.isnan(auc)):
            warnings.warn("multilabel_auc: targets hold a single class overall; micro AUC is NaN", stacklevel=2)
        return auc

    auc = _auc_per_column(scores, targets)
    undefined = torch.isnan(auc)
    if bool(undefined.any()):
        labels = undefined.nonzero().flatten().tolist()
        shown = ", ".join(map(str, labels[:10])) + (", ..." if len(labels) > 10 else "")
        warnings.warn(
            f"multilabel_auc: {len(labels)} label(s) have a single class in targets (label {shown}); "
            "their AUC is NaN and they are left out of the macro average",
            stacklevel=2,
        )
    if average is None:
        return auc
    if bool(undefined.all()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=auc.device)
    return auc[~undefined].mean()


def relative_improvement(
    new: torch.Tensor | np.ndarray | Sequence[float] | float, base: torch.Tensor | np.ndarray | Sequence[float] | float
) -> torch.Tensor:
    """Mean over labels of ``(new - base) / base``: 0.1527 means +15.27% on average.

    Labels where either value is NaN (e.g. an undefined AUC) are skipped.

    Args:
        new: (L,) per-label metric of the new method (tensor, NumPy array, sequence or scalar).
        base: (L,) per-label metric of the baseline, same shape, non-zero.

    Returns:
        0-d float64 tensor (NaN, with a warning, when no label has both values).

    Example:
        >>> relative_improvement(torch.tensor([0.66, 0.90]), torch.tensor([0.60, 0.90]))
        tensor(0.0500, dtype=torch.float64)
    """
    values = {}
    for name, value in (("new", new), ("base", base)):
        # NumPy arrays and scalars too: scikit-learn's roc_auc_score returns them.
        if not isinstance(value, (torch.Tensor, numbers.Real, list, tuple, np.ndarray)) or isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a tensor, a sequence of numbers or a number, got {type(value).__name__}")
        try:
            tensor = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must hold real numbers: {error}") from None
        if tensor.dim() > 1:
            raise ValueError(f"{name} must be a scalar or have shape (L,), got {tuple(tensor.shape)}")
        values[name] = tensor.reshape(-1)
    new_values = values["new"]
    base_values = values["base"].to(new_values.device)
    if new_values.shape != base_values.shape:
        raise ValueError(
            f"new and base must have the same shape, got {tuple(new_values.shape)} and {tuple(base_values.shape)}"
        )
    valid = ~(torch.isnan(new_values) | torch.isnan(base_values))
    if bool((base_values[valid] == 0).any()):
        raise ValueError("base must be non-zero where defined: the relative improvement divides by it")
    if not bool(valid.any()):
        warnings.warn("relative_improvement: no label has both values defined; result is NaN", stacklevel=2)
        return torch.tensor(float("nan"), dtype=torch.float64)
    return ((new_values[valid] - base_values[valid]) / base_values[valid]).mean()
