"""Triplet miners returning index tuples (usable as pytorch-metric-learning ``indices_tuple``).

Every miner records, after each call, ``num_triplets`` (the number returned, like PML's
``num_triplets``) and, with ``collect_stats=True``, distance statistics as Python floats.
"""

from __future__ import annotations

import torch
from torch import nn

from torchfg._validation import check_bool, check_choice, check_number
from torchfg.functional._triplet_selection import exact_triplet_distances, pml_triplet_type, select_triplets
from torchfg.functional.triplet import (
    _check_embeddings,
    _check_mining_backend,
    mine_triplets_and_candidates,
)
from torchfg.ops.metric import DEFAULT_METRIC, METRICS
from torchfg.ops.precision import autocast_off

__all__ = ["BatchHardMiner", "SemiHardMiner", "TripletMarginMiner", "TRIPLET_TYPES"]

# PML TripletMarginMiner's type_of_triplets, on t = d(a, n) - d(a, p).
TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


class _TripletMiner(nn.Module):
    strategy: str

    def __init__(
        self, *, metric: str = DEFAULT_METRIC, cross_rank: bool = False, backend: str = "auto", collect_stats: bool = False
    ) -> None:
        super().__init__()
        self.metric = check_choice(metric, "metric", METRICS)
        self.cross_rank = check_bool(cross_rank, "cross_rank")
        self.collect_stats = check_bool(collect_stats, "collect_stats")
        _check_mining_backend(self.strategy, backend)
        self.backend = backend
        self.num_triplets = 0
        self.pos_pair_dist: float | None = None
        self.neg_pair_dist: float | None = None
        self.avg_triplet_margin: float | None = None

    def _record(
        self,
        embeddings: torch.Tensor,
        candidates: torch.Tensor,
        triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """``candidates``: the rows positives and negatives index (under ``cross_rank``, the
        gathered batch: the statistics are of this rank's triplets, as ``num_triplets`` is)."""
        self.num_triplets = int(triplets[0].shape[0])
        if not self.collect_stats:
            return
        # Means over the returned triplets, from exact distances (0 when there is none).
        with torch.no_grad():
            if self.num_triplets == 0:
                self.pos_pair_dist = self.neg_pair_dist = self.avg_triplet_margin = 0.0
                return
            a, p, n = triplets
            d_ap, d_an = exact_triplet_distances(embeddings.detach(), candidates.detach(), a, p, n, self.metric, False)
            self.pos_pair_dist, self.neg_pair_dist = d_ap.mean().item(), d_an.mean().item()
            self.avg_triplet_margin = self.neg_pair_dist - self.pos_pair_dist

    @autocast_off
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        triplets, candidates = mine_triplets_and_candidates(
            embeddings,
            labels,
            strategy=self.strategy,
            metric=self.metric,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            cross_rank=self.cross_rank,
            backend=self.backend,
        )
        self._record(embeddings, candidates, triplets)
        return triplets

    def extra_repr(self) -> str:
        return (
            f"metric={self.metric!r}, cross_rank={self.cross_rank}, backend={self.backend!r}, "
            f"collect_stats={self.collect_stats}"
        )


class BatchHardMiner(_TripletMiner):
    """Per anchor, the farthest positive and the closest negative (one triplet per anchor).

    Anchors without a positive or a negative are left out. An anchor row holding NaN or inf is
    at distance NaN from every candidate; it keeps a triplet (its first positive and first
    negative by index) when its labels give it both, so that a loss over the triplets is NaN, as
    the loss's own batch-hard mining is, and divergence shows (an anchor alone in its class has
    no triplet, as in PML). Fused Triton kernel on CUDA, chunked reference elsewhere; never
    materialises an N x M matrix.

    Args:
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        cross_rank: under torch.distributed, mine among all ranks' items; positives and negatives
            then index the concatenation of all ranks' batches (see
            :func:`torchfg.functional.mine_triplets`).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        collect_stats: after each call, set ``pos_pair_dist`` / ``neg_pair_dist`` (means of the
            returned triplets' exact distances) and ``avg_triplet_margin`` (their difference),
            all 0 when no triplet is returned (PML: NaN); ``num_triplets`` is always set.

    Shapes:
        forward(embeddings (N, D), labels (N,), ref_embeddings (M, D) = None, ref_labels (M,) = None)
        -> (anchors (T,), positives (T,), negatives (T,)) int64; positives / negatives index
        ``ref_embeddings`` when given.

    Example:
        >>> miner = BatchHardMiner()
        >>> emb = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
        >>> miner(emb, torch.tensor([0, 0, 1, 1]))
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 2, 1, 1]))
        >>> miner.num_triplets
        4
    """

    strategy = "batch_hard"


class SemiHardMiner(_TripletMiner):
    """FaceNet semi-hard triplets: per anchor-positive pair, the closest negative strictly farther
    than the positive, else the farthest negative (chunked reference on every device).

    Not PML's ``TripletMarginMiner(type_of_triplets="semihard")``, which keeps *every* negative
    with ``d(a, p) < d(a, n) <= d(a, p) + margin``: that one is :class:`TripletMarginMiner`.

    Args:
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        cross_rank: mine among all ranks' items (see :class:`BatchHardMiner`).
        backend: ``"auto"`` or ``"torch"``: the chunked reference is the only implementation (an
            explicit ``"triton"`` / ``"cuda"`` raises :class:`torchfg.errors.BackendUnavailableError`).
        collect_stats: see :class:`BatchHardMiner`.

    Shapes:
        forward(embeddings (N, D), labels (N,), ref_embeddings (M, D) = None, ref_labels (M,) = None)
        -> (anchors (T,), positives (T,), negatives (T,)) int64, one triplet per valid pair.

    Example:
        >>> miner = SemiHardMiner()
        >>> emb = torch.tensor([[0.0], [1.0], [1.5], [4.0]])
        >>> miner(emb, torch.tensor([0, 0, 1, 1]))
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 3, 0, 1]))
    """

    strategy = "semi_hard"


class TripletMarginMiner(_TripletMiner):
    """PML's TripletMarginMiner: every valid triplet whose margin ``t = d(a, n) - d(a, p)`` qualifies.

    ``type_of_triplets``: ``"all"`` (``t <= margin``, the triplets that violate or touch the
    margin), ``"hard"`` (also ``t <= 0``: the negative is not farther than the positive),
    ``"semihard"`` (``0 < t <= margin``) or ``"easy"`` (``t > margin``). Unlike PML it never builds
    the N x M x M triplet tensor: triplets are selected on the fast GEMM path with a rigorous error
    band, their distances recomputed exactly from ``a - b`` and the test re-applied (see
    :mod:`torchfg.functional._triplet_selection`), so a triplet exactly on the boundary is
    classified by its exact margin.

    Args:
        margin: any finite number (negative margins allowed).
        type_of_triplets: ``"all"``, ``"hard"``, ``"semihard"`` or ``"easy"``.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        collect_stats: after each call, set PML's statistics ``pos_pair_dist``, ``neg_pair_dist``
            and ``avg_triplet_margin``: means over *all* valid triplets (before the type filter),
            from the fast-path distances, as PML computes them, but always as torchfg distances:
            for ``"cosine"`` 1 - cos (PML reports the similarity cos), for ``"dot"`` -<a, b>
            (PML: <a, b>); the euclidean metrics agree. All 0 without a valid triplet (PML: NaN).
            ``num_triplets`` is always set.

    Shapes:
        forward(embeddings (N, D), labels (N,), ref_embeddings (M, D) = None, ref_labels (M,) = None)
        -> (anchors (T,), positives (T,), negatives (T,)) int64 in lexicographic order.

    Example:
        >>> miner = TripletMarginMiner(margin=0.5, type_of_triplets="semihard")
        >>> emb = torch.tensor([[0.0], [1.0], [1.2], [3.0]])
        >>> miner(emb, torch.tensor([0, 0, 1, 1]))
        (tensor([0, 3]), tensor([1, 2]), tensor([2, 1]))
    """

    strategy = "all"

    def __init__(
        self,
        margin: float = 0.2,
        type_of_triplets: str = "all",
        *,
        metric: str = DEFAULT_METRIC,
        collect_stats: bool = False,
    ) -> None:
        super().__init__(metric=metric, collect_stats=collect_stats)
        self.margin = check_number(margin, "margin")
        self.type_of_triplets = check_choice(type_of_triplets, "type_of_triplets", TRIPLET_TYPES)

    @autocast_off
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeddings, labels, candidates, candidate_labels, anchor_offset = _check_embeddings(
            embeddings, labels, ref_embeddings, ref_labels
        )
        with torch.no_grad():
            selected = select_triplets(
                embeddings.detach(), labels, candidates.detach() if candidates is not embeddings else embeddings.detach(),
                candidate_labels, anchor_offset, metric=self.metric,
                interval=pml_triplet_type(self.type_of_triplets, self.margin), fast_stats=self.collect_stats,
            )
        self.num_triplets = int(selected.anchors.shape[0])
        if selected.fast_stats is not None:
            self.pos_pair_dist = selected.fast_stats["pos_pair_dist"]
            self.neg_pair_dist = selected.fast_stats["neg_pair_dist"]
            self.avg_triplet_margin = selected.fast_stats["avg_triplet_margin"]
        return selected.anchors, selected.positives, selected.negatives

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}, metric={self.metric!r}, "
            f"collect_stats={self.collect_stats}"
        )
