"""Triplet margin loss and adaptive triplet loss as modules (thin wrappers over functional)."""

from __future__ import annotations

import torch
from torch import nn

from torchfg._validation import check_choice
from torchfg.functional.triplet import (
    MINING_STRATEGIES,
    REDUCTIONS,
    _check_flag,
    _check_mining_backend,
    _check_triplets_per_anchor,
    _check_number,
    adaptive_triplet_loss,
    triplet_margin_loss,
)
from torchfg.ops.metric import DEFAULT_METRIC, METRICS

__all__ = ["TripletMarginLoss", "AdaptiveTripletLoss"]


class TripletMarginLoss(nn.Module):
    """Triplet margin loss with online mining; see :func:`torchfg.functional.triplet_margin_loss`.

    Args:
        margin: any finite number (negative margins allowed, as in PML).
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        mining: the default miner, used when ``forward`` gets no ``indices_tuple``:
            ``"batch_hard"``, ``"semi_hard"`` or ``"all"``.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"mean_nonzero"``. The default ``"mean"``
            differs from PML's (``AvgNonZeroReducer``, i.e. ``"mean_nonzero"``): see
            docs/how-to/migrate-from-pml.md.
        smooth: softplus instead of the hinge.
        swap: ``min(d(a, n), d(p, n))`` as the negative distance (PML / torch ``swap``).
        triplets_per_anchor: ``"all"`` or k random triplets per anchor (``mining="all"``);
            like ``mining``, unused for a ``forward`` given an ``indices_tuple``.
        cross_rank: under torch.distributed, mine among the items of all ranks (local items are
            the anchors); scaled so that DDP's gradient averaging gives the single-process
            gradient over the concatenated batch. See :mod:`torchfg.functional.triplet`.
        backend: mining backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Shapes:
        forward(embeddings (N, D), labels (N,), indices_tuple = None, ref_embeddings (M, D) = None,
        ref_labels (M,) = None) -> scalar (or (N,) / (T,) with ``reduction="none"``), as
        pytorch-metric-learning's losses: ``indices_tuple`` is any miner's output, triplets
        ``(a, p, n)`` or pairs ``(a1, p, a2, n)``.

    Example:
        >>> from torchfg.miners import BatchHardMiner
        >>> loss_fn = TripletMarginLoss(margin=0.2)
        >>> emb = torch.randn(8, 16, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels, BatchHardMiner()(emb, labels))
        >>> torch.equal(loss, loss_fn(emb, labels))
        True
        >>> loss.backward()
    """

    def __init__(
        self,
        margin: float = 0.2,
        *,
        metric: str = DEFAULT_METRIC,
        mining: str = "batch_hard",
        reduction: str = "mean",
        smooth: bool = False,
        swap: bool = False,
        triplets_per_anchor: int | str = "all",
        cross_rank: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.margin = _check_number(margin, "margin")
        self.metric = check_choice(metric, "metric", METRICS)
        self.mining = check_choice(mining, "mining", MINING_STRATEGIES)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.smooth = _check_flag(smooth, "smooth")
        self.swap = _check_flag(swap, "swap")
        self.triplets_per_anchor = _check_triplets_per_anchor(triplets_per_anchor, mining)
        self.cross_rank = _check_flag(cross_rank, "cross_rank")
        _check_mining_backend(mining, backend)
        self.backend = backend

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return triplet_margin_loss(
            embeddings,
            labels,
            indices_tuple,
            margin=self.margin,
            metric=self.metric,
            mining=self.mining,
            reduction=self.reduction,
            smooth=self.smooth,
            swap=self.swap,
            triplets_per_anchor=self.triplets_per_anchor,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            cross_rank=self.cross_rank,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, metric={self.metric!r}, mining={self.mining!r}, "
            f"reduction={self.reduction!r}, smooth={self.smooth}, swap={self.swap}, "
            f"triplets_per_anchor={self.triplets_per_anchor!r}, cross_rank={self.cross_rank}, backend={self.backend!r}"
        )


class AdaptiveTripletLoss(nn.Module):
    """Adaptive triplet loss with weak-label (text) margins; see
    :func:`torchfg.functional.adaptive_triplet_loss`.

    Args:
        base_margin: m0 >= 0.
        margin_scale: s >= 0; the margin of (a, n) is ``m0 + s * (1 - cos(t_a, t_n)) / 2``.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        text_positive_threshold: description cosine at or above which another label is a
            near-duplicate (never a negative); None turns it off. The cosine rounds (identical
            descriptions can give a few 1e-7 below 1): use e.g. 0.9999, not 1.0, for exact copies.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"mean_nonzero"``.
        cross_rank: under torch.distributed, mine among the items of all ranks (local items are
            the anchors); scaled so that DDP's gradient averaging gives the single-process
            gradient over the concatenated batch. See :mod:`torchfg.functional.triplet`.
        backend: mining backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Shapes:
        forward(embeddings (N, D), labels (N,), text_embeddings (N, T), indices_tuple = None)
        -> scalar ((N,) for "none", (T,) per triplet of a tuple). ``indices_tuple`` (any miner's
        triplets or PML pairs) replaces the margin-aware batch-hard mining; each triplet's margin
        comes from its anchor's and negative's text.

    Example:
        >>> loss_fn = AdaptiveTripletLoss(base_margin=0.1, margin_scale=0.5)
        >>> emb = torch.randn(8, 16, requires_grad=True)
        >>> loss = loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.randn(8, 32))
        >>> loss.backward()
    """

    def __init__(
        self,
        base_margin: float = 0.1,
        margin_scale: float = 0.5,
        *,
        metric: str = DEFAULT_METRIC,
        text_positive_threshold: float | None = None,
        reduction: str = "mean",
        cross_rank: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.base_margin = _check_number(base_margin, "base_margin", low=0.0)
        self.margin_scale = _check_number(margin_scale, "margin_scale", low=0.0)
        self.metric = check_choice(metric, "metric", METRICS)
        if text_positive_threshold is not None:
            text_positive_threshold = _check_number(text_positive_threshold, "text_positive_threshold", low=-1.0, high=1.0)
        self.text_positive_threshold = text_positive_threshold
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.cross_rank = _check_flag(cross_rank, "cross_rank")
        _check_mining_backend("batch_hard", backend)
        self.backend = backend

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        text_embeddings: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        return adaptive_triplet_loss(
            embeddings,
            labels,
            text_embeddings,
            indices_tuple,
            base_margin=self.base_margin,
            margin_scale=self.margin_scale,
            metric=self.metric,
            text_positive_threshold=self.text_positive_threshold,
            reduction=self.reduction,
            cross_rank=self.cross_rank,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"base_margin={self.base_margin}, margin_scale={self.margin_scale}, metric={self.metric!r}, "
            f"text_positive_threshold={self.text_positive_threshold}, reduction={self.reduction!r}, "
            f"cross_rank={self.cross_rank}, backend={self.backend!r}"
        )
