"""PyTorch reference of the fused batch-hard / ATL loss: the ground truth of ``triton.py``.

The same three steps as :mod:`torchfg.functional.triplet` takes on every device: the chunked
mining reference, the selected pairs' exact distances from ``a - b``
(:func:`torchfg.ops.pair_distances.reference.anchor_pair_distances_reference`), then the margin,
hinge and reduction, here with the op's explicit backward.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from torchfg._validation import accumulation_dtype
from torchfg.ops.metric import inverse_norms
from torchfg.ops.pair_distances.reference import (
    anchor_pair_distances_backward_reference,
    anchor_pair_distances_reference,
)
from torchfg.ops.triplet.reference import mine_hardest_reference

__all__ = [
    "text_cosine",
    "hinge_and_slope",
    "anchor_loss_scale",
    "hardest_triplet_loss_reference",
    "hardest_triplet_loss_backward_reference",
    "unpaired_anchor_losses",
]

# Above this, softplus(v) is v (torch.nn.functional.softplus's default threshold).
SOFTPLUS_THRESHOLD = 20.0


def text_cosine(anchor_text: torch.Tensor, other_text: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two (K, T) text-embedding sets; 0 for a zero row. No gradient."""
    acc = accumulation_dtype(anchor_text.dtype)
    a, b = anchor_text.to(acc), other_text.to(acc)
    return torch.linalg.vecdot(a, b) * inverse_norms(a, acc) * inverse_norms(b, acc)


def hinge_and_slope(violation: torch.Tensor, smooth: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d violation): relu and its 0/1 step (0 at 0, as autograd), or softplus and
    its logistic slope as torch computes them (the identity above the threshold)."""
    if not smooth:
        return F.relu(violation), (violation > 0).to(violation.dtype)
    z = torch.exp(violation.clamp_max(SOFTPLUS_THRESHOLD))
    slope = torch.where(violation > SOFTPLUS_THRESHOLD, torch.ones_like(z), z / (z + 1.0))
    return F.softplus(violation), slope


def anchor_loss_scale(grad: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """dL / d(loss of each anchor) from the upstream gradient: (N,) for ``"none"``, else a scalar."""
    if reduction in ("none", "sum"):
        return grad
    return grad / count.clamp_min(1).to(grad.dtype).reshape(())


def unpaired_anchor_losses(anchors: torch.Tensor, anchor_text: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(N,) loss of anchors without a pair: 0, or NaN where the anchor's row (or its text, which sets
    its margins; None when the margins do not use it) holds a NaN or inf, so that a diverged
    anchor shows in the loss even when it found no pair. The row sum is the test, as in the fused
    Triton kernel (a finite row whose sum overflows counts as diverged there too). No gradient."""
    with torch.no_grad():
        row_sum = anchors.sum(dim=1, dtype=dtype)
        if anchor_text is not None:
            row_sum = row_sum + anchor_text.sum(dim=1, dtype=dtype)
        return torch.where(row_sum.isfinite(), 0.0, float("nan")).to(dtype)


def hardest_triplet_loss_reference(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    *,
    metric: str,
    base_margin: float,
    margin_scale: float,
    text_positive_threshold: float | None,
    self_offset: int,
    smooth: bool,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, pairs (N, 2) int64, terms (N, 3), count (1,)) as the op defines them."""
    acc = accumulation_dtype(anchors.dtype)
    n = anchors.shape[0]
    positive_idx, negative_idx = mine_hardest_reference(
        anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, metric=metric,
        base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
        self_offset=self_offset,
    )
    pairs = torch.stack([positive_idx, negative_idx], 1)
    valid = (positive_idx >= 0) & (negative_idx >= 0)
    safe = pairs.clamp_min(0)
    # No candidates: no anchor has a pair (valid is all False), and there is no row to gather.
    gather = n and candidates.shape[0]
    distances = anchor_pair_distances_reference(anchors, candidates, safe, metric) if gather else anchors.new_zeros(n, 2, dtype=acc)
    distances = torch.where(valid[:, None], distances, torch.zeros_like(distances))
    margin: torch.Tensor | float = base_margin
    if anchor_text is not None and margin_scale != 0.0 and gather:
        # candidate_text is given with anchor_text (the op checks them as a pair).
        text_cos = text_cosine(anchor_text, cast(torch.Tensor, candidate_text).index_select(0, safe[:, 1]))
        margin = (base_margin + margin_scale * (1.0 - text_cos) * 0.5).to(acc)
    losses, slope = hinge_and_slope(distances[:, 0] - distances[:, 1] + margin, smooth)
    zero = torch.zeros_like(losses)
    unpaired = unpaired_anchor_losses(anchors, anchor_text if margin_scale != 0.0 else None, losses.dtype)
    losses, slope = torch.where(valid, losses, unpaired), torch.where(valid, slope, zero)
    terms = torch.cat([distances, slope[:, None]], 1)
    counted = valid & (losses > 0) if reduction == "mean_nonzero" else valid
    count = counted.sum().to(acc).reshape(1)
    if reduction == "none":
        loss = losses
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() / count.clamp_min(1).reshape(())
    return loss, pairs, terms, count


def hardest_triplet_loss_backward_reference(
    grad: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    pairs: torch.Tensor,
    terms: torch.Tensor,
    count: torch.Tensor,
    *,
    metric: str,
    reduction: str,
    candidates_are_anchors: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/d anchors (N, D), dL/d candidates (M, D), empty when they are the anchors) in the
    input dtype: each anchor's slope times its upstream scale on d(a, p), its negative on d(a, n)."""
    acc = accumulation_dtype(anchors.dtype)
    if candidates.shape[0] == 0:  # no pairs: nothing flows back (and there is no row to gather)
        return torch.zeros_like(anchors), anchors.new_empty(0) if candidates_are_anchors else torch.zeros_like(candidates)
    coef = terms[:, 2] * anchor_loss_scale(grad.to(acc), count, reduction)
    grad_x, grad_y = anchor_pair_distances_backward_reference(
        torch.stack([coef, -coef], 1), anchors, candidates, pairs.clamp_min(0), terms[:, :2], metric,
        y_is_x=candidates_are_anchors,
    )
    return grad_x, grad_y
