"""Pure-PyTorch triplet mining: the ground truth for every backend and the CPU path.

Anchors are processed in chunks of rows, so the fp32 temporaries are O(chunk x M) whatever N is;
no function here ever holds an N x M matrix. Distances are computed on the fast path
(``|a|^2 + |b|^2 - 2 a.b`` with fp32 accumulation, fp64 for fp64 inputs): they only *select*
indices. The loss of the selected pairs is recomputed exactly from ``a - b`` by the caller
(:mod:`torchfg.functional.triplet`) through :mod:`torchfg.ops.pair_distances`, whose analytic
backward is chunked too.

All functions take candidates ``(M, D)`` that may or may not contain the anchors: with
``self_offset >= 0`` anchor ``i`` is candidate ``(self_offset + i) % M`` and is never its own
positive (the modulo lets a batch that wraps around the end of a ring memory be mined in one
pass); with ``self_offset = -1`` the two sets are disjoint.
"""

from __future__ import annotations

import functools
from typing import NoReturn, cast

import torch

from torchfg._validation import accumulation_dtype
from torchfg.errors import TripletMemoryError, TripletOutOfMemoryError
from torchfg.ops.metric import METRICS, unit_rows  # noqa: F401  (METRICS: the metrics mining supports)

__all__ = [
    "METRICS",
    "DEFAULT_CHUNK_ROWS",
    "mine_hardest_reference",
    "mine_semi_hard_reference",
    "mine_all_triplets_reference",
    "text_similarity_operands",
]


# Anchor rows per chunk of mining: at most MAX_CHUNK_ROWS, and a (chunk x M) fp32 block of at
# most MAX_BLOCK_ELEMENTS (64 MiB). Few chunks matter on a shared CPU, where each parallel region
# may wait for a descheduled worker thread; memory stays O(chunk x M), never N x M.
MAX_CHUNK_ROWS = 1024
MAX_BLOCK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS = 16
# Rows per chunk for semi-hard / all mining, whose temporaries are larger per row.
DEFAULT_CHUNK_ROWS = 128
# Positives are listed as pairs (instead of masked in the block) when the same-label pairs are
# fewer than N * M / SPARSE_PAIR_FRACTION and than the larger of MAX_SPARSE_PAIRS and a quarter
# of the block buffer's elements (their index lists take 16 bytes per pair: at most the block's
# bytes). An absolute cap alone made a cliff: at N = 64k in classes of 64 (4M pairs) the masked
# path took 73 s against 26 s, one thread.
SPARSE_PAIR_FRACTION = 16
MAX_SPARSE_PAIRS = 1 << 21

_NEG_INF = float("-inf")
_POS_INF = float("inf")


def text_similarity_operands(
    anchor_text: torch.Tensor, candidate_text: torch.Tensor, self_offset: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm fp32 (fp64 for fp64) copies of the text rows: ``a @ c.T`` is the cosine matrix.

    When ``anchor_text`` is ``candidate_text[self_offset : self_offset + N]`` (the same memory, as in
    a batch mined against itself), the anchors' copy is a view of the candidates' one.
    """
    acc = accumulation_dtype(anchor_text.dtype)
    candidate_unit = unit_rows(candidate_text, acc)
    if _is_row_slice(anchor_text, candidate_text, self_offset):
        return candidate_unit[self_offset:self_offset + anchor_text.shape[0]], candidate_unit
    return unit_rows(anchor_text, acc), candidate_unit


def _is_row_slice(rows: torch.Tensor, of: torch.Tensor, offset: int) -> bool:
    """Whether ``rows`` is exactly ``of[offset : offset + len(rows)]`` (same memory and strides)."""
    if offset < 0 or rows.shape[0] == 0 or rows.shape[1:] != of.shape[1:] or rows.stride() != of.stride():
        return False
    if rows.dtype != of.dtype or rows.device != of.device or offset + rows.shape[0] > of.shape[0]:
        return False
    if rows.untyped_storage().data_ptr() != of.untyped_storage().data_ptr():
        return False
    return rows.data_ptr() == of.data_ptr() + offset * of.stride(0) * of.element_size()


class _DistanceBlocks:
    """Fast-path distance blocks (chunk x M) between anchor rows and all candidates.

    ``block(a, out)`` writes the metric distance. ``selection_block(a, out)`` writes cheaper
    values with the same order along each row, one GEMM and no extra pass: for (sq)euclidean
    ``|b|^2 - 2 a.b`` (the row's ``|a|^2`` is added back by :meth:`row_offset` where the clamp at
    0 matters), for cosine ``-cos`` and for dot ``-a.b``. ``out`` is a reused (chunk x M) buffer:
    one allocation for the whole pass instead of a fresh, page-faulting one per chunk.
    """

    def __init__(self, anchors: torch.Tensor, candidates: torch.Tensor, metric: str) -> None:
        self.metric = metric
        self.acc = accumulation_dtype(anchors.dtype)
        self.anchors = anchors
        self.euclidean = metric in ("euclidean", "sqeuclidean")
        self.candidates = unit_rows(candidates, self.acc) if metric == "cosine" else candidates.to(self.acc)
        self.candidates_t = self.candidates.T
        if self.euclidean:
            self.candidate_sq = torch.linalg.vecdot(self.candidates, self.candidates)
        self._zero = torch.zeros(1, dtype=self.acc, device=anchors.device)
        self._one = torch.ones(1, dtype=self.acc, device=anchors.device)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Anchor rows as GEMM operands (accumulation dtype, unit norm for cosine)."""
        if self.metric == "cosine":
            return unit_rows(self.anchors[start:stop], self.acc)
        return self.anchors[start:stop].to(self.acc)

    def row_offsets(self) -> torch.Tensor | None:
        """(N, 1) values that turn selection values into squared distances (euclidean only)."""
        if not self.euclidean:
            return None
        a = self.anchors.to(self.acc)
        return torch.linalg.vecdot(a, a).unsqueeze(1)

    def selection_block(self, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.euclidean:
            return torch.addmm(self.candidate_sq, a, self.candidates_t, alpha=-2.0, out=out)
        return torch.addmm(self._zero, a, self.candidates_t, beta=0.0, alpha=-1.0, out=out)

    def block(self, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            return torch.addmm(self._one, a, self.candidates_t, alpha=-1.0, out=out)
        if self.metric == "dot":
            return torch.addmm(self._zero, a, self.candidates_t, beta=0.0, alpha=-1.0, out=out)
        block = torch.addmm(self.candidate_sq, a, self.candidates_t, alpha=-2.0, out=out)
        block.add_(torch.linalg.vecdot(a, a).unsqueeze(1)).clamp_min_(0.0)
        if self.metric == "euclidean":
            block.sqrt_()
        return block


class DivergedRows:
    """Which rows hold a NaN or inf, by their sum (the rule of the fused loss's
    ``unpaired_anchor_losses``), for the mining that lists triplets (semi-hard and all).

    A non-finite candidate row is absent for the anchors whose own row is finite: never a
    positive or a negative, not counted among the valid triplets, as batch-hard mining never
    chooses it (numerics.md), so a diverged row in a reference set or memory leaves the other
    anchors' losses finite. A diverged anchor keeps every candidate, so that its loss is NaN.
    """

    def __init__(self, anchors: torch.Tensor, candidates: torch.Tensor) -> None:
        acc = accumulation_dtype(anchors.dtype)
        self.finite_anchor = anchors.sum(1, dtype=acc).isfinite()
        self.bad_candidate = ~self.finite_anchor if candidates is anchors else ~candidates.sum(1, dtype=acc).isfinite()

    @staticmethod
    def of(anchors: torch.Tensor, candidates: torch.Tensor) -> "DivergedRows | None":
        """None when no candidate row is non-finite (one host sync)."""
        diverged = DivergedRows(anchors, candidates)
        return diverged if bool(diverged.bad_candidate.any()) else None

    def absent(self, start: int, stop: int) -> torch.Tensor:
        """(rows, M) bool: the candidates absent for anchors start..stop."""
        return self.finite_anchor[start:stop, None] & self.bad_candidate[None, :]

    def keep(self, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """(T,) bool: the listed triplets that use no candidate absent for their anchor."""
        uses_bad = self.bad_candidate.index_select(0, positives) | self.bad_candidate.index_select(0, negatives)
        return ~(uses_bad & self.finite_anchor.index_select(0, anchors))


def _exclude_self(block: torch.Tensor, start: int, self_offset: int, fill: float) -> None:
    """Sets block[i, (self_offset + start + i) % M] = fill for the chunk's rows (in place)."""
    if self_offset < 0:
        return
    # The self entries lie on one diagonal of the (rows, M) block, and on a second one for the
    # rows whose column wraps past M - 1 (a batch across the end of a ring memory).
    rows, m = block.shape
    first = self_offset + start
    if first < m:
        block.diagonal(offset=first)[:rows].fill_(fill)
    if first + rows > m:
        block.diagonal(offset=first - m).fill_(fill)


def _chunk_rows_for(m: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(int(chunk_rows), 1)
    return min(MAX_CHUNK_ROWS, max(MAX_BLOCK_ELEMENTS // max(m, 1), MIN_CHUNK_ROWS))


def _first_index_where(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the lowest column where ``mask`` is True (rows must have one)."""
    return mask.to(torch.uint8).argmax(1)


class _SameLabelPairs:
    """All (anchor, candidate) pairs with equal labels, listed per anchor without an N x M mask.

    Candidates are sorted by label once; anchor i's positives are a contiguous run of that
    order, found by binary search. Used when labels form small classes (P x K batches), where the
    pairs are far fewer than N x M; its ``counts`` size the semi-hard and all-triplets outputs,
    and its ``pairs`` turn PML pair tuples into triplets (anchors: a1, candidates: a2).
    """

    def __init__(self, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> None:
        self.order = torch.argsort(candidate_labels, stable=True)
        sorted_labels = candidate_labels.index_select(0, self.order)
        # searchsorted warns about (and copies) a non-contiguous query: labels may be a column view.
        anchor_labels = anchor_labels.contiguous()
        self.first = torch.searchsorted(sorted_labels, anchor_labels, side="left")
        self.counts = torch.searchsorted(sorted_labels, anchor_labels, side="right") - self.first
        self.ends = torch.cumsum(self.counts, 0)

    @functools.cached_property
    def total(self) -> int:
        """The number of pairs (a host sync, on first use only)."""
        return int(self.ends[-1]) if self.counts.numel() else 0

    @functools.cached_property
    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor, candidate) of every pair, by anchor then candidate index (the stable sort keeps
        each run in index order): all at once, a few ops whatever the number of chunks."""
        device = self.counts.device
        rows = torch.repeat_interleave(torch.arange(self.counts.shape[0], device=device), self.counts)
        within = torch.arange(self.total, device=device) - (self.ends - self.counts).index_select(0, rows)
        return rows, self.order.index_select(0, self.first.index_select(0, rows) + within)

    @functools.cached_property
    def _chunk_bounds(self) -> list[int]:
        return [0] + self.ends.tolist()

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row within the chunk, candidate index) of the pairs of anchors[start:stop], by row."""
        rows, cols = self.pairs
        lo, hi = self._chunk_bounds[start], self._chunk_bounds[stop]
        return rows[lo:hi] - start, cols[lo:hi]


def _segment_argmax(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int):
    """Per row, the column of the largest value (lowest column on ties) and whether one exists.

    values, rows, cols: (P,) with -inf marking pairs to ignore.
    """
    best = torch.full((n_rows,), _NEG_INF, dtype=values.dtype, device=values.device)
    best.scatter_reduce_(0, rows, values, reduce="amax")
    at_best = (values == best.index_select(0, rows)) & (values != _NEG_INF)
    key = torch.where(at_best, cols, n_cols)
    best_col = torch.full((n_rows,), n_cols, dtype=torch.int64, device=values.device)
    best_col.scatter_reduce_(0, rows, key, reduce="amin")
    found = best_col < n_cols
    return torch.where(found, best_col, -1), found


def mine_hardest_reference(
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
    chunk_rows: int | None = None,
    sparse_positives: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and (margin-aware) hardest negative of every anchor, chunk by chunk.

    See ``torchfg.ops.triplet.mine_hardest`` for the full contract. Shapes: anchors (N, D),
    candidates (M, D), labels (N,) / (M,) int64, text (N, T) / (M, T) or None.

    Per chunk of anchors this does one (chunk x M) GEMM and, with constant margins, a single
    arg-reduction over the block: positives (same-label pairs) are read out of the block and
    then overwritten with +inf, which is cheaper than building label masks when classes are small
    (``sparse_positives``; None chooses by the number of same-label pairs). Margin-aware mining
    needs the true distance and a text-cosine GEMM per chunk.

    Returns:
        (positive_idx (N,), negative_idx (N,)) int64 indices into candidates; -1 where an anchor
        has no valid positive / negative. Ties go to the lowest index.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [5.0], [5.5], [9.0]])
        >>> labels = torch.tensor([0, 0, 1, 1, 2])
        >>> mine_hardest_reference(x, x, labels, labels, None, None, metric="euclidean", base_margin=0.2,
        ...                        margin_scale=0.0, text_positive_threshold=None, self_offset=0)
        (tensor([ 1,  0,  3,  2, -1]), tensor([2, 2, 1, 4, 3]))
    """
    device = anchors.device
    n, m = anchors.shape[0], candidates.shape[0]
    positive_idx = torch.full((n,), -1, dtype=torch.int64, device=device)
    negative_idx = torch.full((n,), -1, dtype=torch.int64, device=device)
    if n == 0 or m == 0:
        return positive_idx, negative_idx
    use_text = anchor_text is not None and candidate_text is not None
    margin_aware = use_text and margin_scale != 0.0
    threshold = text_positive_threshold if use_text else None
    chunk_rows = _chunk_rows_for(m, chunk_rows)
    if margin_aware or threshold is not None:
        # Both need use_text: the texts are tensors.
        anchor_text_rows, candidate_text_rows = cast(torch.Tensor, anchor_text), cast(torch.Tensor, candidate_text)
        anchor_unit_text, candidate_unit_text = text_similarity_operands(
            anchor_text_rows, candidate_text_rows, self_offset
        )
        candidate_unit_text_t = candidate_unit_text.T
    distances = _DistanceBlocks(anchors, candidates, metric)
    acc = distances.acc
    half_scale = 0.5 * margin_scale
    margin_at_zero_cos = torch.full((1,), base_margin + half_scale, dtype=acc, device=device)

    block_buffer = torch.empty(min(chunk_rows, n), m, dtype=acc, device=device)
    all_offsets = None if margin_aware else distances.row_offsets()
    score_buffer = torch.empty_like(block_buffer) if margin_aware else None

    # A NaN key is never chosen, as in the Triton kernel (whose strict comparisons never take one);
    # argmax / argmin would take it first. Keys can only be NaN where an input holds a NaN or inf
    # (finite rows with an overflowing norm are beyond the GEMM form's range: see the distances
    # docs), so the common case skips the masking passes over the blocks. A sum is the test: one
    # reduction, a fifth of isfinite().all()'s time on the CPU; should a finite input's sum
    # overflow, the masks only run for nothing.
    inputs = [anchors, candidates] + ([anchor_text_rows, candidate_text_rows] if margin_aware else [])
    sums = torch.stack([t.sum(dtype=accumulation_dtype(t.dtype)).double() for t in inputs])
    nan_keys_possible = not bool(sums.isfinite().all())  # one host sync for all of them

    pairs = None
    if sparse_positives is not False:
        pairs = _SameLabelPairs(anchor_labels, candidate_labels)
        cap = max(MAX_SPARSE_PAIRS, block_buffer.numel() // 4)
        if sparse_positives is None and (pairs.total * SPARSE_PAIR_FRACTION > n * m or pairs.total > cap):
            pairs = None

    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        rows = stop - start
        a = distances.rows(start, stop)
        if margin_aware:
            block = distances.block(a, block_buffer[:rows])  # m - d is not monotone in d^2: need d
            offset = None
        else:
            block = distances.selection_block(a, block_buffer[:rows])
            offset = None if all_offsets is None else all_offsets[start:stop]
        del a

        # ---- positives: the largest distance among same-label candidates, self excluded
        if pairs is not None:
            pair_rows, pair_cols = pairs.chunk(start, stop)
            # Flat offsets: 1-D take / index_fill are much cheaper than 2-D advanced indexing.
            flat_pairs = pair_rows * m + pair_cols
            values = block.view(-1).index_select(0, flat_pairs)
            if offset is not None:
                # Clamp as the true squared distance would be clamped, so ties at 0 match.
                values = values.add_(offset.squeeze(1).index_select(0, pair_rows)).clamp_min_(0.0)
            if self_offset >= 0:
                values.masked_fill_(pair_cols == (pair_rows + (self_offset + start)) % m, _NEG_INF)
            if nan_keys_possible:
                values.masked_fill_(values.isnan(), _NEG_INF)
            best, _ = _segment_argmax(values, pair_rows, pair_cols, rows, m)
            positive_idx[start:stop] = best
            other_label = None
        else:
            other_label = anchor_labels[start:stop, None] != candidate_labels[None, :]
            values = block.masked_fill(other_label, _NEG_INF)
            if offset is not None:
                values.add_(offset).clamp_min_(0.0).masked_fill_(other_label, _NEG_INF)
            _exclude_self(values, start, self_offset, _NEG_INF)
            if nan_keys_possible:
                values.masked_fill_(values.isnan(), _NEG_INF)
            best = values.argmax(1)
            found = values.gather(1, best[:, None]).squeeze(1) != _NEG_INF
            positive_idx[start:stop] = torch.where(found, best, -1)
            del values

        # ---- negatives: another label (and not a near-duplicate description)
        excluded = None
        if threshold is not None:
            excluded = torch.mm(anchor_unit_text[start:stop], candidate_unit_text_t) >= threshold
        if score_buffer is not None:  # margin_aware
            # score = m - d with m = base + s (1 - cos) / 2 straight out of the text GEMM.
            if anchor_unit_text.dtype == acc:
                score = torch.addmm(
                    margin_at_zero_cos, anchor_unit_text[start:stop], candidate_unit_text_t, alpha=-half_scale,
                    out=score_buffer[:rows],
                )
            else:  # text in another precision than the embeddings: margins in the text's precision
                margins = torch.addmm(
                    margin_at_zero_cos.to(anchor_unit_text.dtype), anchor_unit_text[start:stop],
                    candidate_unit_text_t, alpha=-half_scale,
                )
                score = score_buffer[:rows].copy_(margins)
                del margins
            score.sub_(block)
            fill = _NEG_INF
        else:
            score, fill = block, _POS_INF
        if other_label is None:  # the pair lists
            score.view(-1).index_fill_(0, flat_pairs, fill)
        else:
            score.masked_fill_(~other_label, fill)
        if excluded is not None:
            score.masked_fill_(excluded, fill)
        if nan_keys_possible:
            score.masked_fill_(score.isnan(), fill)
        best = score.argmax(1) if margin_aware else score.argmin(1)
        best_value = score.gather(1, best[:, None]).squeeze(1)
        found = best_value != fill
        if offset is not None:
            # Squared distances clamp at 0: every negative at or below 0 ties, the lowest wins.
            clamped = found & (best_value + offset.squeeze(1) <= 0)
            if bool(clamped.any()):
                tied_rows = clamped.nonzero().squeeze(1)
                tied = (score[tied_rows] + offset[tied_rows]) <= 0
                best[tied_rows] = _first_index_where(tied)
        negative_idx[start:stop] = torch.where(found, best, -1)
    return positive_idx, negative_idx


class ChunkOutput:
    """A 1-D output filled chunk by chunk: allocated once (``capacity``: the count when it is known
    or bounded beforehand), grown geometrically if a chunk overflows it, trimmed by
    :meth:`result`. :meth:`reserve` hands out the next slots for an op's ``out=``.

    Lists of per-chunk result tensors would outlive their chunk: on the CPU, glibc places such
    small blocks in the heap space the chunk's (chunk x M) temporaries have just freed, the next
    chunk's temporaries no longer fit there, and the heap grows by about one block per chunk
    (RSS ~ N x M while the live tensors stay flat). Sizes come from ``nonzero`` results already
    on the host: no device sync.
    """

    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype = torch.int64) -> None:
        self.buffer = torch.empty(capacity, dtype=dtype, device=device)
        self.size = 0

    @property
    def capacity(self) -> int:
        return self.buffer.shape[0]

    def ensure(self, capacity: int) -> None:
        """Room for ``capacity`` values in all (the values appended are kept)."""
        if capacity > self.buffer.shape[0]:
            grown = self.buffer.new_empty(capacity)
            grown[: self.size].copy_(self.buffer[: self.size])
            self.buffer = grown

    def reserve(self, count: int) -> torch.Tensor:
        """The next ``count`` slots, counted as appended: a view for an op to write with ``out=``,
        so that its result is not made elsewhere and copied in."""
        stop = self.size + count
        if stop > self.buffer.shape[0]:
            self.ensure(max(stop, 2 * self.buffer.shape[0]))
        slots = self.buffer[self.size : stop]
        self.size = stop
        return slots

    def append(self, values: torch.Tensor) -> None:
        self.reserve(values.shape[0]).copy_(values)

    def result(self, spare: float = 0.0) -> torch.Tensor:
        """The values appended, in a storage of their own size, or a view of the buffer when its
        unused part is at most ``spare`` times their number: trimming copies every value, which
        costs more than a little memory kept with a result that is soon indexed anew or freed."""
        if self.size == self.buffer.shape[0]:
            out = self.buffer
        elif self.buffer.shape[0] - self.size <= spare * self.size:
            out = self.buffer[: self.size]
        else:
            out = self.buffer[: self.size].clone()
        self.buffer = self.buffer[:0]
        return out


def allocate_triplet_outputs(count: int, device: torch.device, outputs: int, what: str) -> list[ChunkOutput]:
    """``outputs`` int64 :class:`ChunkOutput` with room for ``count`` triplets (known or bounded from
    the labels), or an error that says what they need (see :func:`raise_triplet_memory_error`)."""
    made: list[ChunkOutput] = []
    try:
        for _ in range(outputs):
            made.append(ChunkOutput(count, device))
    except RuntimeError as error:
        made.clear()  # free what was allocated before the error is raised
        raise_triplet_memory_error(count, outputs, what, error)
    return made


def raise_triplet_memory_error(count: int, outputs: int, what: str, error: RuntimeError) -> NoReturn:
    """Re-raises an allocator failure of ``outputs`` int64 arrays of ``count`` triplets (``what``
    they are) with their number and bytes and what to do instead, ``from`` the original.

    Not a guess made up front: only the allocator knows what fits. The error stays an
    out-of-memory error where the allocator raised one (CUDA), and keeps the allocator's message
    in its single argument, so handlers that catch the type or look for that text (the batch-size
    finders of Lightning and Accelerate) still recognise it.
    """
    needed = count * outputs * 8
    message = (
        f"{count:,} {what} need {needed:,} bytes ({needed / 2**30:,.1f} GiB) for their int64 indices "
        f"alone ({outputs} arrays), more than could be allocated. The valid triplets of a batch grow as "
        "the cube of its size: use a sparser mining strategy (batch_hard or semi_hard, or "
        "triplets_per_anchor=k random triplets per anchor where the loss takes it) or smaller batches. "
        f"The allocator's error: {error}"
    )
    kind = TripletOutOfMemoryError if isinstance(error, torch.OutOfMemoryError) else TripletMemoryError
    raise kind(message) from error


def valid_triplet_count(anchor_labels: torch.Tensor, candidate_labels: torch.Tensor, self_offset: int) -> int:
    """Sum over anchors of #positives x #negatives, from the labels alone (no N x M mask; one
    host sync)."""
    m = candidate_labels.shape[0]
    if not anchor_labels.shape[0] or not m:
        return 0
    same_count, self_same = _label_counts(anchor_labels, candidate_labels, self_offset)
    return int(((same_count - self_same) * (m - same_count)).sum())


def _label_counts(anchor_labels: torch.Tensor, candidate_labels: torch.Tensor, self_offset: int):
    """Per anchor: candidates with its label, and whether its own candidate (self_offset) is one
    of them (the runs of :class:`_SameLabelPairs`, no N x M mask)."""
    same = _SameLabelPairs(anchor_labels, candidate_labels).counts
    self_same = torch.zeros_like(same)
    if self_offset >= 0:
        own = (self_offset + torch.arange(anchor_labels.shape[0], device=anchor_labels.device)) % candidate_labels.shape[0]
        self_same = (candidate_labels.index_select(0, own) == anchor_labels).to(same.dtype)
    return same, self_same


def _empty_triplets(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Three distinct tensors: outputs of a custom op must not alias each other.
    anchors, positives, negatives = (torch.empty(0, dtype=torch.int64, device=device) for _ in range(3))
    return anchors, positives, negatives


def mine_semi_hard_reference(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    *,
    metric: str,
    self_offset: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FaceNet semi-hard triplets: one per anchor-positive pair, chunk by chunk.

    For every valid pair (a, p) (same label, p not a itself) whose anchor has at least one
    negative, the negative is the closest one strictly farther than p, ``argmin {d(a, n) : d(a, n) >
    d(a, p)}``; if there is none, the farthest negative. Ties go to the lowest index.

    Returns:
        (anchor_idx, positive_idx, negative_idx), int64 of equal length T, sorted by anchor then
        positive; anchors index ``anchors``, the others ``candidates``.
    """
    device = anchors.device
    n, m = anchors.shape[0], candidates.shape[0]
    if n == 0 or m == 0:
        return _empty_triplets(device)
    distances = _DistanceBlocks(anchors, candidates, metric)
    # For an anchor whose row is finite, a candidate row holding a NaN or inf is absent
    # (DivergedRows, as in the "all" selection) and so is any candidate at a NaN distance:
    # batch-hard mining never chooses a NaN key either. A diverged anchor keeps its pairs and
    # takes its first negative (argmax takes a NaN first), so that a loss over the triplets is
    # NaN. The masks are built only when an input holds a NaN or inf (one host sync for both sums).
    sums = torch.stack([t.sum(dtype=distances.acc).double() for t in (anchors, candidates)])
    diverged = None if bool(sums.isfinite().all()) else DivergedRows(anchors, candidates)
    # At most one triplet per same-label (anchor, positive) pair of an anchor with a negative
    # (exactly that many when no row diverged): the outputs are sized once (one host sync).
    same_count, self_same = _label_counts(anchor_labels, candidate_labels, self_offset)
    bound = int(((same_count - self_same) * (same_count < m)).sum())
    out_a, out_p, out_n = (ChunkOutput(bound, device) for _ in range(3))
    # One block buffer for all chunks (see ChunkOutput: nothing chunk-sized is allocated afresh).
    block_buffer = torch.empty(min(chunk_rows, n), m, dtype=distances.acc, device=device)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        block = distances.block(distances.rows(start, stop), block_buffer[: stop - start])
        same_label = anchor_labels[start:stop, None] == candidate_labels[None, :]
        other_label = ~same_label
        if diverged is not None:
            stray = diverged.absent(start, stop) | (block.isnan() & diverged.finite_anchor[start:stop, None])
            same_label &= ~stray
            other_label &= ~stray
        negatives = torch.where(other_label, block, torch.tensor(_NEG_INF, dtype=block.dtype, device=device))
        has_negative = other_label.any(1)
        block.masked_fill_(~same_label, _NEG_INF)
        _exclude_self(block, start, self_offset, _NEG_INF)
        valid_pair = block != _NEG_INF
        valid_pair &= has_negative[:, None]
        pair_row, pair_col = valid_pair.nonzero(as_tuple=True)
        if pair_row.shape[0] > _SEMI_HARD_SORT_PAIRS * (stop - start):
            # Many positives per anchor: one sort of each anchor's negatives and a binary search
            # per pair, O(R M log M), instead of a pass over M per pair (O(pairs M): cubic in
            # the class size; 27x slower at N = 1024 in 2 classes).
            negative_idx = _semi_hard_by_sort(block, negatives, pair_row, pair_col)
            out_a.append(pair_row + start)
            out_p.append(pair_col)
            out_n.append(negative_idx)
            continue
        # Bound the (pairs x M) temporaries by processing at most chunk_rows pairs at a time.
        for p_start in range(0, pair_row.shape[0], chunk_rows):
            rows = pair_row[p_start : p_start + chunk_rows]
            cols = pair_col[p_start : p_start + chunk_rows]
            neg_rows = negatives[rows]  # non-negatives hold -inf: never "farther", never the farthest
            positive_d = block[rows, cols]
            farther = neg_rows > positive_d[:, None]
            has_farther = farther.any(1)
            closest_farther = neg_rows.masked_fill(~farther, _POS_INF).argmin(1)
            # An infinite distance that is farther ties with the fill: then the first farther one.
            filled = ~farther.gather(1, closest_farther[:, None]).squeeze(1)
            closest_farther = torch.where(filled, farther.to(torch.uint8).argmax(1), closest_farther)
            farthest = neg_rows.argmax(1)
            out_a.append(rows + start)
            out_p.append(cols)
            out_n.append(torch.where(has_farther, closest_farther, farthest))
    return out_a.result(), out_p.result(), out_n.result()


# Pairs per anchor above which semi-hard mining sorts each anchor's negatives (measured on one
# CPU thread, D = 128: the per-pair pass costs as much as the sort at about 5 pairs per anchor at
# N = 512 and 7 at N = 2048; 3 pairs: 16 against 24 ms, 23 pairs: 1.18 s against 0.41 s).
_SEMI_HARD_SORT_PAIRS = 6


def _semi_hard_by_sort(
    block: torch.Tensor, negatives: torch.Tensor, pair_row: torch.Tensor, pair_col: torch.Tensor
) -> torch.Tensor:
    """Semi-hard negatives of the pairs (pair_row, pair_col) of a chunk, by sorting.

    ``block`` (R, M) holds the pairs' distances, ``negatives`` (R, M) the anchors' distances to
    their negatives (-inf elsewhere). The same choice as the per-pair pass, index for index: a
    stable sort keeps equal distances in column order, so the first sorted entry strictly above
    d(a, p) is the closest farther negative with the lowest index; a NaN is never farther, and
    the farthest negative is ``argmax`` as there (a NaN first).
    """
    m = negatives.shape[1]
    keys = negatives.masked_fill(negatives.isnan(), _NEG_INF)
    sorted_keys, sorted_cols = torch.sort(keys, dim=1, stable=True)
    positive_d = block[pair_row, pair_col]
    # One batched search per anchor row over all its columns: the rows' sorted keys are shared.
    position = torch.searchsorted(sorted_keys, block, right=True)[pair_row, pair_col]
    has_farther = (position < m) & ~positive_d.isnan()
    closest_farther = sorted_cols[pair_row, position.clamp_max(m - 1)]
    return torch.where(has_farther, closest_farther, negatives.argmax(1)[pair_row])


def mine_all_triplets_reference(
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    *,
    self_offset: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every valid triplet (a, p, n): same label for p (not a itself), another label for n.

    Memory is O(T) for the T triplets returned plus O(chunk x M); the (N x M x M) mask is never
    formed.

    Returns:
        (anchor_idx, positive_idx, negative_idx), int64 of length T, in lexicographic order.
    """
    device = anchor_labels.device
    n, m = anchor_labels.shape[0], candidate_labels.shape[0]
    # The outputs are sized once from the labels.
    count = valid_triplet_count(anchor_labels, candidate_labels, self_offset)
    out_a, out_p, out_n = allocate_triplet_outputs(count, device, 3, "valid triplets")
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        same_label = anchor_labels[start:stop, None] == candidate_labels[None, :]
        negative_mask = ~same_label
        _exclude_self(same_label, start, self_offset, False)
        pos_row, pos_col = same_label.nonzero(as_tuple=True)
        neg_row, neg_col = negative_mask.nonzero(as_tuple=True)
        neg_count = negative_mask.sum(1)
        neg_start = torch.cumsum(neg_count, 0) - neg_count
        per_pair = neg_count[pos_row]
        total = int(per_pair.sum())
        if total == 0:
            continue
        pair_of_triplet = torch.repeat_interleave(torch.arange(pos_row.shape[0], device=device), per_pair)
        first_of_pair = torch.cumsum(per_pair, 0) - per_pair
        offset_in_pair = torch.arange(total, device=device) - first_of_pair[pair_of_triplet]
        rows = pos_row[pair_of_triplet]
        out_a.append(rows + start)
        out_p.append(pos_col[pair_of_triplet])
        out_n.append(neg_col[neg_start[rows] + offset_in_pair])
    return out_a.result(), out_p.result(), out_n.result()
