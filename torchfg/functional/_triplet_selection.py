"""Exact selection of triplets by their distance margin, streamed over anchors (no N x M x M tensor).

Mining every triplet of a batch and keeping those whose margin ``t = d(a, n) - d(a, p)`` lies in an
interval (the violating triplets of the ``"all"`` loss, PML's TripletMarginMiner types) needs the
distances of every (anchor, candidate) pair. The GEMM (``|a|^2 + |b|^2 - 2 a.b``) is the fast way to
get them, but it is inexact: in fp32 a distance of 1e-3 between unit vectors comes out with an error
of the same size, and an integer triplet whose violation is exactly 0 comes out as +-1e-15 and is
counted. So the selection runs in three steps:

1. per chunk of anchors, the fast path gives every pair distance with a rigorous error bound
   (from the dot-product rounding bound ``|fl(a.b) - a.b| <= gamma_D |a| |b|``), and every triplet
   whose margin *might* lie in the interval is kept (a superset);
2. the distances of the kept triplets' pairs are recomputed exactly from ``a - b``
   (:func:`torchfg.ops.pair_distances.pair_distances`, differentiable with an O(K D) backward);
3. the interval test is re-applied to the exact margins.

Memory is O(chunk x M) per chunk plus O(S) for the S kept triplets, never N x M x M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torchfg._validation import accumulation_dtype
from torchfg.ops.metric import unit_rows
from torchfg.ops.pair_distances import pair_distances
from torchfg.ops.precision import fp32_matmul_precision
from torchfg.ops.triplet.reference import ChunkOutput, DivergedRows, _exclude_self

__all__ = ["MarginInterval", "SelectedTriplets", "select_triplets", "sample_triplets", "count_triplets", "exact_triplet_distances"]

# Elements of one (rows x M) fast-path block or (pairs x M) triplet block: 2**22 fp32 = 16 MiB.
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class MarginInterval:
    """The triplets kept: ``low < t`` (``<=`` when ``low_closed``) and ``t < high`` (``<=`` when ``high_closed``).

    ``t = d(a, n) - d(a, p)`` (with ``swap``: ``min(d(a, n), d(p, n)) - d(a, p)``).
    """

    low: float = -math.inf
    low_closed: bool = False
    high: float = math.inf
    high_closed: bool = False
    # Keep triplets whose t is NaN (every comparison with NaN is False, so they would drop out).
    keep_nan: bool = False

    @property
    def everything(self) -> bool:
        return self.low == -math.inf and self.high == math.inf

    @property
    def empty(self) -> bool:
        return self.low > self.high or (self.low == self.high and not (self.low_closed and self.high_closed))

    def contains(self, t: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(t, dtype=torch.bool)
        if self.low != -math.inf:
            keep &= (t >= self.low) if self.low_closed else (t > self.low)
        if self.high != math.inf:
            keep &= (t <= self.high) if self.high_closed else (t < self.high)
        if self.keep_nan and not self.everything:
            keep |= t.isnan()
        return keep

    def may_contain(self, t_low: torch.Tensor, t_high: torch.Tensor) -> torch.Tensor:
        """Whether [t_low, t_high] meets the interval (closed on both sides: a superset)."""
        keep = torch.ones_like(t_low, dtype=torch.bool)
        if self.low != -math.inf:
            keep &= t_high >= self.low
        if self.high != math.inf:
            keep &= t_low <= self.high
        if self.keep_nan and not self.everything:
            keep |= t_low.isnan() | t_high.isnan()
        return keep


def violating(margin: float) -> MarginInterval:
    """Triplets with a positive hinge ``d(a, p) - d(a, n) + margin > 0``, i.e. ``t < margin``, and
    those whose t is NaN: the loss must be NaN for a NaN embedding (as batch-hard's is, and PML's
    all-triplets loss with ``MeanReducer`` or ``SumReducer``), not silently leave its triplets out.
    (PML's default ``AvgNonZeroReducer`` drops NaN losses: a finite loss with a NaN gradient.)"""
    return MarginInterval(high=margin, keep_nan=True)


def pml_triplet_type(kind: str, margin: float) -> MarginInterval:
    """PML TripletMarginMiner's ``type_of_triplets`` as an interval of t."""
    if kind == "easy":
        return MarginInterval(low=margin)
    if kind == "hard":
        return MarginInterval(high=min(margin, 0.0), high_closed=True)
    if kind == "semihard":
        return MarginInterval(low=0.0, high=margin, high_closed=True)
    return MarginInterval(high=margin, high_closed=True)  # "all": every triplet within the margin


@dataclass
class SelectedTriplets:
    """Kept triplets with their exact distances (differentiable when the inputs are).

    ``position``: index of each triplet in the lexicographic list of all valid triplets (for
    ``reduction="none"``); ``total``: the number of valid triplets (selected or not).
    """

    anchors: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor
    d_ap: torch.Tensor
    d_an: torch.Tensor
    position: torch.Tensor
    total: int
    fast_stats: dict[str, float] | None = None

    @property
    def margins(self) -> torch.Tensor:
        return self.d_an - self.d_ap


class _FastBounds:
    """Fast-path distances with rigorous per-pair error bounds, in the accumulation dtype."""

    def __init__(self, anchors: torch.Tensor, candidates: torch.Tensor, metric: str) -> None:
        self.metric = metric
        self.acc = accumulation_dtype(anchors.dtype)
        self.cosine = metric == "cosine"
        self.anchors = unit_rows(anchors.detach(), self.acc) if self.cosine else anchors.detach().to(self.acc)
        self.candidates = unit_rows(candidates.detach(), self.acc) if self.cosine else candidates.detach().to(self.acc)
        self.anchor_sq = self.anchors.square().sum(1)
        self.candidate_sq = self.candidates.square().sum(1)
        u = torch.finfo(self.acc).eps / 2
        d = anchors.shape[1]
        # gamma_D bounds the rounding of a D-term dot product (and of the squared norms); 4x covers
        # the additions of the expanded form and the cosine normalisation. TF32 rounds each operand
        # to 10 bits first, an extra relative 2**-10 per product.
        tf32 = self.acc == torch.float32 and anchors.is_cuda and fp32_matmul_precision() == "tf32"
        self.relative = 4.0 * ((d + 4) * u + (2.0**-10 if tf32 else 0.0))

    def block(self, rows: torch.Tensor, rows_sq: torch.Tensor, cols: torch.Tensor | None = None,
              cols_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) bounds (R x C) of the true distances between ``rows`` and ``cols`` (default: candidates)."""
        if cols is None:
            cols, cols_sq = self.candidates, self.candidate_sq
        gram = rows @ cols.T
        if self.metric in ("euclidean", "sqeuclidean"):
            scale = rows_sq[:, None] + cols_sq[None, :]
            sq = scale - 2.0 * gram
            err = self.relative * scale
            low, high = sq - err, sq + err
            if self.metric == "euclidean":
                low, high = low.clamp_min_(0.0).sqrt_(), high.clamp_min_(0.0).sqrt_()
            return low, high
        if self.cosine:
            value, err = 1.0 - gram, self.relative
        else:  # dot
            value = -gram
            err = self.relative * (rows_sq.sqrt()[:, None] * cols_sq.sqrt()[None, :])
        return value - err, value + err


def _chunks(total: int, per_item: int):
    step = max(1, BLOCK_ELEMENTS // max(per_item, 1))
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _label_masks(
    labels_chunk: torch.Tensor,
    candidate_labels: torch.Tensor,
    start: int,
    anchor_offset: int | None,
    diverged: DivergedRows | None = None,
):
    same = labels_chunk[:, None] == candidate_labels[None, :]
    negative = ~same
    if anchor_offset is not None:
        # Anchor i is candidate (anchor_offset + i) % M: a batch across the end of a ring memory wraps.
        _exclude_self(same, start, anchor_offset, False)
    if diverged is not None:
        absent = diverged.absent(start, start + labels_chunk.shape[0])
        same &= ~absent
        negative &= ~absent
    return same, negative


def count_triplets(
    labels: torch.Tensor, candidate_labels: torch.Tensor, anchor_offset: int | None, diverged: DivergedRows | None = None
) -> int:
    """Number of valid triplets, sum over anchors of (#positives x #negatives)."""
    total = 0
    m = candidate_labels.shape[0]
    for start, stop in _chunks(labels.shape[0], m):
        same, negative = _label_masks(labels[start:stop], candidate_labels, start, anchor_offset, diverged)
        total += int((same.sum(1) * negative.sum(1)).sum())
    return total


def connected_zero(embeddings: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """A scalar 0 in the accumulation dtype whose graph reaches both inputs: a loss with no term
    must still backward() to zero gradients, also when only ``candidates`` requires grad (frozen
    anchors against a trainable reference set)."""
    acc = accumulation_dtype(embeddings.dtype)
    zero = embeddings.to(acc).sum() * 0.0
    if candidates is not embeddings:
        zero = zero + candidates.to(acc).sum() * 0.0
    return zero


def exact_triplet_distances(embeddings, candidates, a, p, n, metric, swap):
    """Exact d(a, p), d(a, n) (min with d(p, n) under ``swap``) from ``a - b``, differentiable."""
    k = a.shape[0]
    other = None if candidates is embeddings else candidates
    d = pair_distances(embeddings, a.repeat(2), torch.cat([p, n]), other, metric=metric)
    d_ap, d_an = d[:k], d[k:]
    if swap:
        d_pn = pair_distances(candidates, p, n, metric=metric)
        d_an = torch.minimum(d_an, d_pn)
    return d_ap, d_an


def select_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    metric: str,
    interval: MarginInterval,
    swap: bool = False,
    fast_stats: bool = False,
    with_position: bool = False,
) -> SelectedTriplets:
    """Every valid triplet whose exact margin t lies in ``interval``, lexicographic (anchor, positive, negative).

    Anchors index ``embeddings``, positives and negatives ``candidates`` (anchor i is candidate
    ``(anchor_offset + i) % M``; None: not a candidate). ``fast_stats``: also the means over *all* valid
    triplets of d(a, p), d(a, n) and t from the fast path (PML's miner statistics), one extra pass
    of additions, no exactness claim. ``with_position``: fill ``position`` (else it is empty), an
    int64 per selected triplet that only ``reduction="none"`` needs.

    Memory is per selected triplet (there can be millions: a 128-row batch against a memory of
    4,096 rows of 4 per class has 2 million): they are copied into outputs grown geometrically
    (:class:`~torchfg.ops.triplet.reference.ChunkOutput`), not kept as lists of per-chunk
    tensors, which fragment the CPU heap.
    """
    device = embeddings.device
    m = candidates.shape[0]
    empty = torch.empty(0, dtype=torch.int64, device=device)
    kept_a, kept_p, kept_n, kept_pos, kept_ap, kept_an, pair_x, pair_y = (ChunkOutput(0, device) for _ in range(8))
    chunk_a, chunk_p, chunk_n = (ChunkOutput(0, device) for _ in range(3))  # one chunk's, reused
    pairs_so_far = 0
    total = 0
    sums = torch.zeros(3, dtype=torch.float64, device=device) if fast_stats else None
    diverged = DivergedRows.of(embeddings, candidates)
    if interval.empty and not fast_stats:
        total = count_triplets(labels, candidate_labels, anchor_offset, diverged)
    else:
        bounds = _FastBounds(embeddings, candidates, metric)
        for start, stop in _chunks(embeddings.shape[0], m):
            same, negative = _label_masks(labels[start:stop], candidate_labels, start, anchor_offset, diverged)
            n_pos, n_neg = same.sum(1), negative.sum(1)
            per_anchor = n_pos * n_neg
            base = total + torch.cumsum(per_anchor, 0) - per_anchor
            total += int(per_anchor.sum())
            pos_rank = torch.cumsum(same, 1) - 1
            neg_rank = torch.cumsum(negative, 1) - 1
            low, high = bounds.block(bounds.anchors[start:stop], bounds.anchor_sq[start:stop])
            if fast_stats:
                mid = (low + high) * 0.5
                sums[0] += (mid * same * n_neg[:, None]).sum().double()
                sums[1] += (mid * negative * n_pos[:, None]).sum().double()
            if interval.empty:
                continue
            pair_row, pair_col = (same & (n_neg > 0)[:, None]).nonzero(as_tuple=True)
            for p_start, p_stop in _chunks(pair_row.shape[0], m):
                rows, cols = pair_row[p_start:p_stop], pair_col[p_start:p_stop]
                an_low, an_high = low.index_select(0, rows), high.index_select(0, rows)
                if swap:
                    pn_low, pn_high = bounds.block(bounds.candidates.index_select(0, cols), bounds.candidate_sq.index_select(0, cols))
                    an_low, an_high = torch.minimum(an_low, pn_low), torch.minimum(an_high, pn_high)
                keep = negative.index_select(0, rows)
                if not interval.everything:
                    t_low = an_low - high[rows, cols][:, None]
                    t_high = an_high - low[rows, cols][:, None]
                    keep &= interval.may_contain(t_low, t_high)
                which, neg = keep.nonzero(as_tuple=True)
                del keep
                r, p = rows.index_select(0, which), cols.index_select(0, which)
                del which
                chunk_a.append(r)
                chunk_p.append(p)
                chunk_n.append(neg)
                if with_position:
                    kept_pos.append(base[r] + pos_rank[r, p] * n_neg[r] + neg_rank[r, neg])
            if not pair_row.shape[0]:
                continue
            r, p, neg = chunk_a.take(), chunk_p.take(), chunk_n.take()
            # Each (anchor, candidate) pair once: its distance is computed once and the gradients of
            # its triplets meet on it before reaching the rows (PML's matrix does the same), which
            # keeps the fp32 sums short.
            used = torch.zeros_like(same)
            used[r, p] = True
            used[r, neg] = True
            pair_r, pair_c = used.nonzero(as_tuple=True)
            pair_id = torch.full(used.shape, -1, dtype=torch.int64, device=device)
            pair_id[pair_r, pair_c] = torch.arange(pair_r.shape[0], device=device) + pairs_so_far
            pairs_so_far += pair_r.shape[0]
            pair_x.append(pair_r + start)
            pair_y.append(pair_c)
            kept_a.append(r + start if start else r)
            kept_p.append(p)
            kept_n.append(neg)
            kept_ap.append(pair_id[r, p])
            kept_an.append(pair_id[r, neg])
            del used, pair_id
    stats = None
    if fast_stats:
        # PML's statistics: means over all valid triplets (0 when there is none).
        denom = max(total, 1)
        ap, an = (sums[:2] / denom).tolist()
        stats = {"pos_pair_dist": ap, "neg_pair_dist": an, "avg_triplet_margin": an - ap}
    if not kept_a.size:
        d0 = connected_zero(embeddings, candidates).expand(0)
        return SelectedTriplets(empty, empty.clone(), empty.clone(), d0, d0, empty.clone(), total, stats)
    a, p, n = kept_a.result(), kept_p.result(), kept_n.result()
    position = kept_pos.result() if with_position else empty.clone()
    other = None if candidates is embeddings else candidates
    d_pairs = pair_distances(embeddings, pair_x.result(), pair_y.result(), other, metric=metric)
    d_ap, d_an = d_pairs[kept_ap.result()], d_pairs[kept_an.result()]
    if swap:
        unique_pn, which_pn = torch.unique(p * m + n, return_inverse=True)
        d_pn = pair_distances(candidates, unique_pn // m, unique_pn % m, metric=metric)
        d_an = torch.minimum(d_an, d_pn[which_pn])
    if not interval.everything:
        exact_keep = interval.contains(d_an.detach() - d_ap.detach())
        if not bool(exact_keep.all()):
            idx = exact_keep.nonzero().squeeze(1)
            a, p, n = a[idx], p[idx], n[idx]
            position = position[idx] if with_position else position
            d_ap, d_an = d_ap.index_select(0, idx), d_an.index_select(0, idx)
    return SelectedTriplets(a, p, n, d_ap, d_an, position, total, stats)


def sample_triplets(
    labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    per_anchor: int,
    generator: torch.Generator | None = None,
    diverged: DivergedRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``per_anchor`` random (positive, negative) pairs, with replacement, for every anchor that has both
    (``diverged``: non-finite candidates are absent for finite anchors, see :class:`DivergedRows`).

    PML's ``triplets_per_anchor=k`` sampling (``get_random_triplet_indices``): positives and negatives
    drawn uniformly and independently. Returns (anchors, positives, negatives) sorted by anchor.
    """
    device = labels.device
    m = candidate_labels.shape[0]
    # At most per_anchor triplets per anchor: outputs sized once (see ChunkOutput).
    out_a, out_p, out_n = (ChunkOutput(labels.shape[0] * per_anchor, device) for _ in range(3))
    for start, stop in _chunks(labels.shape[0], m):
        same, negative = _label_masks(labels[start:stop], candidate_labels, start, anchor_offset, diverged)
        n_pos, n_neg = same.sum(1), negative.sum(1)
        rows = ((n_pos > 0) & (n_neg > 0)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        draws = torch.rand(rows.shape[0], per_anchor, 2, generator=generator, device=device, dtype=torch.float64)
        picks = []
        for mask, count, u in ((same, n_pos, draws[..., 0]), (negative, n_neg, draws[..., 1])):
            rank = (u * count[rows, None]).long().clamp_max_(count[rows, None] - 1)
            cumulative = torch.cumsum(mask.index_select(0, rows), 1)
            # The (rank + 1)-th True of each row: the first column whose running count reaches it.
            picks.append(torch.searchsorted(cumulative, rank + 1).reshape(-1))
        out_a.append((rows + start).repeat_interleave(per_anchor))
        out_p.append(picks[0])
        out_n.append(picks[1])
    return out_a.result(), out_p.result(), out_n.result()
