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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from torchfg._validation import accumulation_dtype
from torchfg.ops.metric import unit_rows
from torchfg.ops.pair_distances import pair_distances
from torchfg.ops.precision import fp32_matmul_precision
from torchfg.ops.triplet.reference import (
    ChunkOutput,
    DivergedRows,
    _exclude_self,
    allocate_triplet_outputs,
    raise_triplet_memory_error,
    valid_triplet_count,
)

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

    def block(self, rows: torch.Tensor, rows_sq: torch.Tensor, scratch: _Scratch,
              tag: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) bounds (R x M) of the true distances between ``rows`` and the candidates,
        written into ``scratch``'s buffers named after ``tag`` (views, valid until the next block
        of that tag). The operations of the plain expressions, in place, so the same values bit
        for bit (1 - gram as -gram + 1: a NaN's sign aside, which no test reads)."""
        cols, cols_sq = self.candidates, self.candidate_sq
        shape = (rows.shape[0], cols.shape[0])
        err: torch.Tensor | float  # the rounding bound: a constant for cosine
        gram = torch.mm(rows, cols.T, out=scratch.get(tag + "gram", shape, self.acc))
        if self.metric in ("euclidean", "sqeuclidean"):
            scale = torch.add(rows_sq[:, None], cols_sq[None, :], out=scratch.get(tag + "scale", shape, self.acc))
            sq = torch.sub(scale, gram.mul_(2.0), out=gram)  # scale - 2 gram
            err = scale.mul_(self.relative)
            low = torch.sub(sq, err, out=scratch.get(tag + "low", shape, self.acc))
            high = sq.add_(err)
            if self.metric == "euclidean":
                low, high = low.clamp_min_(0.0).sqrt_(), high.clamp_min_(0.0).sqrt_()
            return low, high
        if self.cosine:
            value, err = gram.neg_().add_(1.0), self.relative  # 1 - gram
        else:  # dot
            value = gram.neg_()
            err = torch.mul(rows_sq.sqrt()[:, None], cols_sq.sqrt()[None, :], out=scratch.get(tag + "scale", shape, self.acc))
            err = err.mul_(self.relative)
        low = torch.sub(value, err, out=scratch.get(tag + "low", shape, self.acc))
        return low, value.add_(err)


class _Scratch:
    """Chunk-sized buffers by name, allocated once and reused by every chunk of a call.

    Fresh (chunk x M) temporaries per chunk leave more in glibc's heap than the largest chunk
    needs: at N = 16000 (one thread) the all-triplets loss and TripletMarginMiner peaked at
    0.71 GB RSS, 0.46 GB with every block mmapped; with one place per block for the whole call,
    0.55 GB.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A (rows, cols) buffer of ``dtype``, contents undefined."""
        if torch.compiler.is_compiling():
            # Compiled code manages its own memory; reading ``name`` would guard this frame on
            # each buffer's name (a recompilation per name, then dynamo's recompile-limit warning).
            return torch.empty(shape, dtype=dtype, device=self.device)
        need = shape[0] * shape[1]
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[0] < need or buffer.dtype != dtype:
            self.buffers.pop(name, None)  # freed before its successor is allocated
            buffer = self.buffers[name] = torch.empty(need, dtype=dtype, device=self.device)
        return buffer[:need].view(shape)


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


class _KeptTriplets:
    """The kept triplets of :func:`select_triplets`, written in place into outputs sized once.

    Each sub-chunk's indices are written straight into the outputs (``out=``) by the ops that
    make them. Appending each sub-chunk into a chunk's outputs, then each chunk into the call's,
    both doubling from nothing, copied every index three to four times and made the selection
    1.09-1.17x slower than the lists of per-chunk tensors it replaced (N = 1024, 2048).

    The outputs (anchors, positives, negatives, the two pair ids and, when asked, positions) are
    sized from the share of the valid triplets kept so far, extrapolated to ``bound`` (all valid
    triplets, from the labels) with 1/8 to spare: one allocation while the share holds. ``exact``:
    every valid triplet is kept (no interval), so ``bound`` is their number (diverged rows aside)
    and is allocated at once, before any chunk.
    """

    def __init__(self, bound: int, exact: bool, with_position: bool, device: torch.device) -> None:
        self.bound = bound
        outputs = allocate_triplet_outputs(bound if exact else 0, device, 6 if with_position else 5, _KEPT)
        self.a, self.p, self.n, self.ap, self.an = outputs[:5]
        self.position = outputs[5] if with_position else None
        self.outputs = outputs
        self.pair_x, self.pair_y = ChunkOutput(0, device), ChunkOutput(0, device)

    @property
    def size(self) -> int:
        return self.a.size

    def make_room(self, count: int, seen: Callable[[], int]) -> None:
        """Room for ``count`` more triplets; ``seen()``: the valid triplets examined so far, these included."""
        stop = self.a.size + count
        if stop <= self.a.capacity:
            return
        _grow(self.outputs, _grown_capacity(stop, self.a.capacity, seen(), self.bound, self.bound), stop,
              _KEPT + " (those found so far)")

    def add_pairs(self, rows: torch.Tensor, cols: torch.Tensor, start: int, done: int, anchors: int, m: int) -> None:
        """The (anchor, candidate) pairs of anchors ``start`` to ``done - 1`` (``rows`` counted from
        ``start``) of ``anchors`` against ``m`` candidates."""
        stop = self.pair_x.size + rows.shape[0]
        if stop > self.pair_x.capacity:
            _grow((self.pair_x, self.pair_y), _grown_capacity(stop, self.pair_x.capacity, done, anchors, anchors * m),
                  stop, "(anchor, candidate) pairs of " + _KEPT + " (those found so far)")
        torch.add(rows, start, out=self.pair_x.reserve(rows.shape[0]))
        self.pair_y.append(cols)


_KEPT = "selected triplets"
# Unused room an output may keep instead of being copied to its size: trimming copies every
# index, and the selected ones are mostly indexed anew (the exact re-test) or freed with the loss.
_SPARE = 0.125
# The most a projection may allocate, in multiples of the values already there: a share kept by
# the first anchors that the others do not keep (one diverged row keeps all its triplets) must
# not size the outputs for every valid triplet.
_MAX_LEAP = 16


def _grow(outputs: Sequence[ChunkOutput], capacity: int, stop: int, what: str) -> None:
    """Grows ``outputs`` to ``capacity`` values, a projection, or to ``stop``, the values already
    found, where the projection cannot be allocated: only a failure for ``stop`` is an error
    (:func:`raise_triplet_memory_error`, ``what`` they are)."""
    try:
        for out in outputs:
            out.ensure(capacity)
    except RuntimeError:
        try:
            for out in outputs:
                out.ensure(stop)
        except RuntimeError as error:
            raise_triplet_memory_error(stop, len(outputs), what, error)


def _grown_capacity(stop: int, capacity: int, done: int, total: int, limit: int) -> int:
    """Capacity for ``stop`` values after ``done`` of ``total`` units of work: the rate so far
    extrapolated to ``total`` with 1/8 to spare, at least 1.5x ``capacity`` (geometric, for a rate
    that keeps rising), at most ``_MAX_LEAP`` x ``stop`` and ``limit`` (values the work can give)."""
    projected = -(-stop * total // max(done, 1))
    return max(stop, min(max(projected + projected // 8, capacity + capacity // 2), _MAX_LEAP * stop, limit))


def _fast_pass(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    diverged: DivergedRows | None,
    *,
    metric: str,
    interval: MarginInterval,
    swap: bool,
    fast_stats: bool,
    with_position: bool,
) -> tuple[_KeptTriplets | None, int, torch.Tensor | None]:
    """Step 1 of :func:`select_triplets`: the triplets that may lie in ``interval`` (None when it
    is empty), the number of valid triplets and the fast-path sums of ``fast_stats``. A function
    of its own so that the chunks' scratch is freed before the exact distances are computed."""
    device = embeddings.device
    m = candidates.shape[0]
    kept: _KeptTriplets | None = None
    pairs_so_far = 0
    total = 0
    sums = torch.zeros(3, dtype=torch.float64, device=device) if fast_stats else None
    bounds = _FastBounds(embeddings, candidates, metric)
    if not interval.empty:
        kept = _KeptTriplets(
            # Where rows diverged, a bound: their triplets are not valid.
            valid_triplet_count(labels, candidate_labels, -1 if anchor_offset is None else anchor_offset),
            interval.everything, with_position, device,
        )
    scratch = _Scratch(device)
    for start, stop in _chunks(embeddings.shape[0], m):
        same, negative = _label_masks(labels[start:stop], candidate_labels, start, anchor_offset, diverged)
        n_pos, n_neg = same.sum(1), negative.sum(1)
        per_anchor = n_pos * n_neg
        total_before = total
        total += int(per_anchor.sum())
        if with_position:
            base = total_before + torch.cumsum(per_anchor, 0) - per_anchor
            pos_rank = torch.cumsum(same, 1, out=scratch.get("pos_rank", same.shape, torch.int64)).sub_(1)
            neg_rank = torch.cumsum(negative, 1, out=scratch.get("neg_rank", same.shape, torch.int64)).sub_(1)
        low, high = bounds.block(bounds.anchors[start:stop], bounds.anchor_sq[start:stop], scratch=scratch)
        if sums is not None:  # fast_stats
            mid = (low + high) * 0.5
            sums[0] += (mid * same * n_neg[:, None]).sum().double()
            sums[1] += (mid * negative * n_pos[:, None]).sum().double()
        if kept is None:
            continue
        pair_row, pair_col = (same & (n_neg > 0)[:, None]).nonzero(as_tuple=True)
        if not pair_row.shape[0]:
            continue
        # Each (anchor, candidate) pair once: its distance is computed once and the gradients of
        # its triplets meet on it before reaching the rows (PML's matrix does the same), which
        # keeps the fp32 sums short. Marked per sub-chunk; the chunk-sized scratch is reused.
        used = scratch.get("used", same.shape, torch.bool).zero_()
        first = kept.size
        for p_start, p_stop in _chunks(pair_row.shape[0], m):
            rows, cols = pair_row[p_start:p_stop], pair_col[p_start:p_stop]
            shape = (rows.shape[0], m)
            an_low = torch.index_select(low, 0, rows, out=scratch.get("an_low", shape, low.dtype))
            an_high = torch.index_select(high, 0, rows, out=scratch.get("an_high", shape, high.dtype))
            if swap:
                pn_low, pn_high = bounds.block(
                    bounds.candidates.index_select(0, cols), bounds.candidate_sq.index_select(0, cols), scratch=scratch, tag="pn"
                )
                an_low, an_high = torch.minimum(an_low, pn_low, out=an_low), torch.minimum(an_high, pn_high, out=an_high)
            keep = torch.index_select(negative, 0, rows, out=scratch.get("keep", shape, torch.bool))
            if not interval.everything:
                t_low = an_low.sub_(high[rows, cols][:, None])
                t_high = an_high.sub_(low[rows, cols][:, None])
                keep &= interval.may_contain(t_low, t_high)
            which, neg = keep.nonzero(as_tuple=True)
            count = which.shape[0]
            if not count:
                continue
            # Marked from the mask, per pair and per anchor row, not per triplet: (anchor,
            # positive) pairs are distinct and each anchor's rows are OR-ed (bool accumulate).
            used.index_put_((rows, cols), keep.any(1))
            used.index_put_((rows,), keep, accumulate=True)
            del keep
            kept.make_room(count, lambda: total_before + int(n_neg.index_select(0, pair_row[:p_stop]).sum()))
            r = torch.index_select(rows, 0, which, out=kept.a.reserve(count))
            p = torch.index_select(cols, 0, which, out=kept.p.reserve(count))
            kept.n.reserve(count).copy_(neg)
            del which
            if kept.position is not None:  # with_position
                torch.add(base[r] + pos_rank[r, p] * n_neg[r], neg_rank[r, neg], out=kept.position.reserve(count))
        count = kept.size - first
        if not count:
            continue
        pair_r, pair_c = used.nonzero(as_tuple=True)
        # Only the pairs just marked are read back: the buffer needs no fill.
        pair_id = scratch.get("pair_id", same.shape, torch.int64)
        pair_id[pair_r, pair_c] = torch.arange(pair_r.shape[0], device=device) + pairs_so_far
        pairs_so_far += pair_r.shape[0]
        r, p, neg = (out.buffer[first : kept.size] for out in (kept.a, kept.p, kept.n))
        # Flat offsets: a 1-D gather written in place is cheaper than 2-D indexing and a copy.
        pair_id = pair_id.view(-1)
        torch.index_select(pair_id, 0, torch.mul(r, m).add_(p), out=kept.ap.reserve(count))
        torch.index_select(pair_id, 0, torch.mul(r, m).add_(neg), out=kept.an.reserve(count))
        if start:
            r.add_(start)
        kept.add_pairs(pair_r, pair_c, start, stop, embeddings.shape[0], m)
        del r, p, neg  # views of the outputs: a buffer grown later would stay alive through them
    return kept, total, sums


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
    4,096 rows of 4 per class has 2 million): they are written into outputs sized once
    (:class:`_KeptTriplets`), not kept as lists of per-chunk tensors, which fragment the CPU heap.
    Raises :class:`~torchfg.errors.TripletMemoryError` when they cannot be allocated.
    """
    device = embeddings.device
    m = candidates.shape[0]
    empty = torch.empty(0, dtype=torch.int64, device=device)
    kept: _KeptTriplets | None = None
    total = 0
    sums = None
    diverged = DivergedRows.of(embeddings, candidates)
    if interval.empty and not fast_stats:
        total = count_triplets(labels, candidate_labels, anchor_offset, diverged)
    else:
        kept, total, sums = _fast_pass(
            embeddings, labels, candidates, candidate_labels, anchor_offset, diverged, metric=metric, interval=interval,
            swap=swap, fast_stats=fast_stats, with_position=with_position,
        )
    stats = None
    if sums is not None:  # fast_stats
        # PML's statistics: means over all valid triplets (0 when there is none).
        denom = max(total, 1)
        ap, an = (sums[:2] / denom).tolist()
        stats = {"pos_pair_dist": ap, "neg_pair_dist": an, "avg_triplet_margin": an - ap}
    if kept is None or not kept.size:
        d0 = connected_zero(embeddings, candidates).expand(0)
        return SelectedTriplets(empty, empty.clone(), empty.clone(), d0, d0, empty.clone(), total, stats)
    a, p, n = kept.a.result(_SPARE), kept.p.result(_SPARE), kept.n.result(_SPARE)
    position = empty.clone() if kept.position is None else kept.position.result(_SPARE)
    other = None if candidates is embeddings else candidates
    d_pairs = pair_distances(embeddings, kept.pair_x.result(_SPARE), kept.pair_y.result(_SPARE), other, metric=metric)
    d_ap, d_an = d_pairs[kept.ap.result(_SPARE)], d_pairs[kept.an.result(_SPARE)]
    del kept
    if swap:
        unique_pn, which_pn = torch.unique(p * m + n, return_inverse=True)
        d_pn = pair_distances(candidates, unique_pn // m, unique_pn % m, metric=metric)
        d_an = torch.minimum(d_an, d_pn[which_pn])
    if not interval.everything:
        exact_keep = interval.contains(d_an.detach() - d_ap.detach())
        if not bool(exact_keep.all()):
            idx = exact_keep.nonzero().squeeze(1)
            a, p, n = a.index_select(0, idx), p.index_select(0, idx), n.index_select(0, idx)
            position = position.index_select(0, idx) if with_position else position
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
