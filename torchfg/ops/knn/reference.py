"""Exact k-nearest-neighbour search in pure PyTorch: the ground truth and the CPU path.

The gallery is searched in chunks of queries: each chunk's (chunk, G) fp32 block of raw keys
(the distance up to a per-row monotone map, so that the GEMM is the only full-width pass
besides the selection) is computed with one GEMM and reduced to its k smallest entries, so
memory is O((Q + G) * D + Q * k + chunk * G) and never O(Q * G).

Ordering contract shared by every backend: per query, increasing distance, ties broken by the
lower gallery index. ``torch.topk`` does not promise which of several equal values it keeps,
so the selection is made exact by asking for one extra neighbour: when the (k+1)-th distance
differs from the k-th, the k smallest form a unique set and only their order needs fixing
(a sort on (distance, index)); rows where they are equal take a slower exact path.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, cast

import torch

from torchfg._validation import accumulation_dtype
from torchfg.ops.metric import nonzero_rows, safe_inverse


# Bytes of fp32 distance block per query chunk when chunk_size is not given. CPU GEMMs keep
# their speed down to a few hundred rows, and a block that stays small is written and selected
# from cache: 16 MiB blocks (1024 queries against 4096 rows) ran 15% faster than 64 MiB ones on
# 2 cores. GPU GEMMs lose speed below a few thousand rows.
_CPU_BLOCK_BYTES = 16 * 2**20
_CPU_MIN_CHUNK = 256
_GPU_BLOCK_BYTES = 512 * 2**20


def default_chunk_size(num_gallery: int, device: torch.device) -> int:
    """Queries per chunk so that one (chunk, G) fp32 block stays within a fixed byte budget."""
    if device.type == "cuda":
        return max(1, _GPU_BLOCK_BYTES // (4 * max(num_gallery, 1)))
    return max(_CPU_MIN_CHUNK, _CPU_BLOCK_BYTES // (4 * max(num_gallery, 1)))


def default_gallery_tile(chunk: int, num_gallery: int, device: torch.device, compiled: bool = True) -> int:
    """Gallery columns per block of a ``chunk``-row query chunk when chunk_size is not given.

    The whole gallery on a GPU, and on a CPU while the (chunk, G) block stays within twice the
    byte budget (the fp32 budget: fp64 blocks take twice the bytes). Past that (more than 32768
    gallery rows at the 256-row floor of :func:`default_chunk_size` for the compiled selection,
    131072 for the PyTorch one) the gallery is cut into column tiles whose selections are
    merged: the block was 1 KiB per gallery row, 4.3 GB against 4M rows. Tiles of the budget for
    the compiled selection (``compiled``); four times wider for the PyTorch selection, which
    pays per tile (``torch.topk``, the merges). Measured at Q = 1024, G = 200,000, D = 128, one
    thread: compiled k = 10 / 100, 1.14 / 1.11 s against 1.18 / 1.21 s untiled, 120 MiB against
    300; PyTorch selection, 1.15 / 1.37 s against 1.19 / 1.30 s, 170 MiB against 315 (budget-wide
    tiles there: 1.24 / 1.51 s).
    """
    budget = _CPU_BLOCK_BYTES if compiled else 4 * _CPU_BLOCK_BYTES
    if device.type == "cuda" or 4 * chunk * num_gallery <= 2 * budget:
        return num_gallery
    return max(1, budget // (4 * chunk))


def default_tile_size(device: torch.device, num_rows: int) -> int:
    """Side of the square tiles of the symmetric self-search of ``num_rows`` rows.

    On a CPU the GEMM work is (b + 1) / (2 b) of the plain search with b tiles per side, and a
    4-16 MiB tile is written and selected from cache. Wider tiles cost more GEMM work but make the
    selections cheaper per element (``torch.topk`` and the grouped selection pay per row), so the
    tiles are as wide as keeps four of them per side, within 1024-2048. Measured at D = 512, k = 10
    on 2 cores: N = 4096 took 92 ms with 1024 tiles and 101 ms with 2048; N = 8192 345 ms with
    2048, 363 ms with 1024 and 403 ms with 4096 (one core, k = 100, N = 8192: 2048 1282 ms,
    1024 1571 ms). On a GPU the tiles are wide (two 256 MiB fp32 tiles), so that each launch has
    work enough.
    """
    if device.type == "cuda":
        return 8192
    return 2048 if num_rows >= 8192 else 1024


def order_by_distance_then_index(distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Positions (R, M) that sort each row of (R, M) candidates by (distance, index), ascending."""
    by_index = torch.argsort(indices, dim=1)
    # A stable sort on distance keeps the index order among equal distances.
    return by_index.gather(1, torch.sort(distances.gather(1, by_index), dim=1, stable=True).indices)


def sort_by_distance_then_index(distances: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of (R, k) candidates by (distance, index), ascending."""
    order = order_by_distance_then_index(distances, indices)
    return distances.gather(1, order), indices.gather(1, order)


def order_runs_by_index(distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Positions (R, M) that order each run of equal distances by index, for rows (R, M) already
    sorted by distance: one sort of an int64 key (run number, index), where a sort by distance
    then a stable sort by index would take two sorts and their gathers. Indices are below 2^32."""
    runs = torch.zeros_like(distances, dtype=torch.int64)
    torch.cumsum(distances[:, 1:] != distances[:, :-1], dim=1, out=runs[:, 1:])
    return torch.argsort(runs.bitwise_left_shift_(32).add_(indices.to(torch.int64)), dim=1)


def order_ties_by_index(distances: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows already sorted by distance get equal distances ordered by index; untied rows are untouched."""
    if distances.shape[1] < 2:
        return distances, indices
    tied = torch.nonzero((distances[:, 1:] == distances[:, :-1]).any(1)).flatten()
    if tied.numel():
        tied_d, tied_i = distances.index_select(0, tied), indices.index_select(0, tied)
        order = order_runs_by_index(tied_d, tied_i)
        distances = distances.index_copy(0, tied, tied_d.gather(1, order))
        indices = indices.index_copy(0, tied, tied_i.gather(1, order))
    return distances, indices


Finish = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RowPool(Protocol):
    """The k nearest of a block of R query rows, offered the columns block by block.

    :class:`_CandidatePool` and :class:`_BoundedPool` here, and the compiled pool of
    :mod:`torchfg.ops.knn.cpu`, which the searches below take through a :data:`PoolFactory`.
    """

    def offer(self, block: torch.Tensor, offset: int) -> None:
        """Offer ``block`` (R, W) of raw keys for columns ``offset .. offset + W - 1``, all above
        every column offered before; ``block`` may be a transposed view of a contiguous matrix."""

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances (R, k), columns (R, k) int64), sorted by (distance, column)."""


# A pool for ``num_rows`` query rows: ``factory(k, num_rows, metric, query_aux)``. Its finish is
# the metric's (see :func:`finisher`): ``query_aux`` (num_rows,) are the rows' squared norms,
# added to the raw keys of the chunked search's Euclidean metrics; None where the raw keys
# already hold them (the symmetric search) and for ``dot`` / ``cosine``.
PoolFactory = Callable[[int, int, str, Optional[torch.Tensor]], RowPool]

# Columns per group, largest first. torch.topk costs 2-6 ns per element on rows of a few
# thousand (and sorts pairs on rows under 64 k), against 0.1 ns for a min-reduction, so the
# selection discards whole groups once the row is 16x the number kept (G = 2).
_GROUP_SIZES = (16, 8, 4, 2)


def _group_size(width: int, count: int) -> int:
    """Columns per group for a grouped selection of ``count`` of ``width`` (1: plain topk).

    The work is the ``width / G`` group minima plus the ``count * G`` candidate columns; the
    largest G that keeps the candidates under an eighth of the row, as measured on 2 cores:
    (1024, 1024) k = 11 in 1.6 ms instead of 2.8 ms, its transpose 1.9 ms instead of 3.9 ms.
    """
    for size in _GROUP_SIZES:
        if count * size * 8 <= width:
            return size
    return 1


def smallest_raw(block: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` smallest entries of every row of ``block`` (R, W), sorted, and their columns.

    Equal to ``torch.topk(block, count, largest=False, sorted=True)`` in values (which of several
    equal entries is returned is unspecified, as for topk). ``block`` may be a transposed view
    of a contiguous matrix: it is then read in place (no transposed copy).

    Wide rows are split into G-column groups (columns ``j, j + W/G, ...``, so that the group
    minima are one vectorised reduction across contiguous strips); only the ``count`` groups with
    the smallest minima can hold the ``count`` smallest entries: an entry of any other group is
    at least its group's minimum, which is at least ``count`` chosen minima, each an entry of its
    own. Columns past the last whole group are always candidates.
    """
    num_rows, width = block.shape
    size = _group_size(width, count)
    if size == 1:
        return torch.topk(block, count, dim=1, largest=False, sorted=True)
    groups = width // size
    body = groups * size
    strips = block[:, :body].unflatten(1, (size, groups))  # (R, G, W / G): group j is [:, :, j]
    if block.stride(1) == 1:
        minima = strips.amin(1)
    else:
        # A transposed view: reduce over strips of the contiguous matrix underneath.
        minima = block.t()[:body].unflatten(0, (size, groups)).amin(0).t().contiguous()
    chosen = torch.topk(minima, count, dim=1, largest=False, sorted=False).indices  # (R, count)
    candidates = strips.gather(2, chosen.unsqueeze(1).expand(num_rows, size, count)).flatten(1)
    if body < width:
        candidates = torch.cat([candidates, block[:, body:]], 1)
    values, order = torch.topk(candidates, count, dim=1, largest=False, sorted=True)
    # Candidate s * count + c is column s * (W / G) + chosen[c]; past size * count, the tail.
    in_groups = order < size * count
    strip, slot = torch.div(order, count, rounding_mode="floor"), order.remainder(count)
    columns = torch.where(
        in_groups,
        strip * groups + chosen.gather(1, slot.clamp_max_(count - 1)),
        order - size * count + body,
    )
    return values, columns


def smallest_k(block: torch.Tensor, k: int, finish: Finish) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest distances per row, sorted by (distance, column), selected on a raw key.

    Args:
        block: (R, W) raw keys, free of NaN; the distance of an entry is
            ``finish(raw, rows)``, a non-decreasing function of the raw key per row (``rows``
            (R',) says which rows of ``block`` the (R', m) ``raw`` values come from). Selecting
            on raw keys spares the full-width passes that finishing the whole block would cost.
        k: 1 <= k <= W.

    Returns:
        (distances (R, k), columns (R, k) int64).
    """
    num_rows, width = block.shape
    all_rows = torch.arange(num_rows, device=block.device)
    if k == width:
        columns = torch.arange(width, device=block.device).expand(num_rows, width)
        return sort_by_distance_then_index(finish(block, all_rows), columns)
    raw, columns = smallest_raw(block, k + 1)
    distances = finish(raw, all_rows)
    # A monotone finish never reorders, but it may merge: if the k-th and (k+1)-th distances
    # are equal, entries outside the selection may tie with the cut and win on index.
    tied_cut = torch.nonzero(distances[:, k] == distances[:, k - 1]).flatten()
    distances, columns = order_ties_by_index(distances[:, :k], columns[:, :k])
    if tied_cut.numel():
        # Keep every entry below the cut value and the lowest-indexed entries equal to it. Only
        # the raw keys that can finish at or below the cut are finished: a monotone finish maps
        # exactly the prefix (-inf, bound] there, and finishing whole rows cost 12% of a search.
        sub = block.index_select(0, tied_cut)
        cut = distances.index_select(0, tied_cut)[:, k - 1]
        bound = _largest_raw_at_most(finish, tied_cut, raw.index_select(0, tied_cut)[:, k - 1], cut)
        sub_rows, sub_columns = (sub <= bound.unsqueeze(1)).nonzero().unbind(1)
        values = finish(sub[sub_rows, sub_columns].unsqueeze(1), tied_cut[sub_rows]).squeeze(1)
        # Order by (row, distance, column): nonzero lists columns in increasing order per row,
        # and the two stable sorts keep that order among equal keys.
        order = torch.sort(values, stable=True).indices
        order = order[torch.sort(sub_rows[order], stable=True).indices]
        sub_rows, values, sub_columns = sub_rows[order], values[order], sub_columns[order]
        # Every tied row has at least k entries inside the bound (its k selected ones).
        counts = torch.bincount(sub_rows, minlength=tied_cut.numel())
        first = torch.cumsum(counts, 0) - counts
        taken = (first.unsqueeze(1) + torch.arange(k, device=block.device)).flatten()
        fixed_d = values[taken].view(-1, k)
        fixed_c = sub_columns[taken].view(-1, k)
        distances = distances.index_copy(0, tied_cut, fixed_d)
        columns = columns.index_copy(0, tied_cut, fixed_c)
    return distances, columns


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Integers (int64) in the order of the floats ``x`` (fp32 or fp64), one apart for adjacent
    floats; -0.0 and +0.0 alike."""
    if x.dtype == torch.float32:
        # In int32, widened last: a negative float's magnitude bits and their negation fit, and
        # the k-NN filter search packs whole candidate lists with it (fewer 8-byte temporaries).
        bits = x.view(torch.int32)
        return torch.where(bits >= 0, bits, (bits & 0x7FFFFFFF).neg_()).to(torch.int64)
    bits = x.view(torch.int64)
    return torch.where(bits >= 0, bits, (bits & 0x7FFFFFFFFFFFFFFF).neg_())


def _float_of_ordered(ordered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_ordered_bits`."""
    # Negative floats: the sign bit plus the magnitude, as a (negative) two's-complement integer.
    if dtype == torch.float32:
        bits = torch.where(ordered >= 0, ordered, -ordered + torch.iinfo(torch.int32).min).to(torch.int32)
        return bits.view(torch.float32)
    return torch.where(ordered >= 0, ordered, -ordered + torch.iinfo(torch.int64).min).view(torch.float64)


def _largest_raw_at_most(finish: Finish, rows: torch.Tensor, start: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """Per row, the largest raw key whose finished distance is <= ``cut``, given that ``start``
    finishes to ``cut``: a galloping then bisecting search over adjacent floats (a few steps,
    since a finish merges only nearby keys)."""
    dtype = start.dtype
    limit = _ordered_bits(torch.tensor([float("inf")], dtype=dtype, device=start.device))

    def at_most_cut(ordered: torch.Tensor) -> torch.Tensor:
        return finish(_float_of_ordered(ordered, dtype).unsqueeze(1), rows).squeeze(1) <= cut

    low = _ordered_bits(start)
    step = torch.ones_like(low)
    high = torch.minimum(low + step, limit)
    while True:
        still = at_most_cut(high) & (high < limit)
        if not bool(still.any()):
            break
        low = torch.where(still, high, low)
        step = torch.where(still, step * 2, step)
        high = torch.where(still, torch.minimum(low + step, limit), high)
    while bool((high - low > 1).any()):
        middle = low + (high - low) // 2
        below = at_most_cut(middle)
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return _float_of_ordered(low, dtype)


def prepare_rows(x: torch.Tensor, metric: str, unit: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows in the accumulation dtype plus their per-row auxiliary values for ``metric``.

    Returns (rows (N, D), aux (N,) or None): unit rows and None for ``cosine``, squared norms
    for the Euclidean metrics, None for ``dot``. ``unit``: ``x`` already holds the unit rows
    (cosine), in the accumulation dtype, and is used as it is.
    """
    acc = accumulation_dtype(x.dtype)
    rows = x.to(acc)
    if metric == "cosine" and not unit:
        norms = torch.linalg.vector_norm(rows, dim=1)
        return rows * safe_inverse(norms).unsqueeze(1), None
    if metric in ("sqeuclidean", "euclidean"):
        return rows, rows.square().sum(1)
    return rows, None


def raw_block(
    query_chunk: torch.Tensor,
    gallery_t: torch.Tensor,
    metric: str,
    gallery_aux: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """(C, G) raw keys for a prepared query chunk (C, D) and transposed gallery (D, G), into ``out``.

    The raw key is the distance up to a per-row monotone finish (see :func:`finisher`):
    -x.y for ``dot`` and ``cosine`` (unit rows), |y|^2 - 2 x.y for the Euclidean metrics.
    """
    if metric in ("dot", "cosine"):
        # Negation commutes exactly with the product, so either side may carry the sign: the
        # smaller one. A (C, D) copy of a chunk of 1M queries against a 4-row gallery doubled the
        # search's memory and cost as much as its GEMM.
        if gallery_t.shape[1] < query_chunk.shape[1]:
            return torch.mm(query_chunk, gallery_t, out=out).neg_()
        return torch.mm(query_chunk.neg(), gallery_t, out=out)
    # The Euclidean metrics' squared norms (prepare_rows gives them for these metrics).
    return torch.addmm(cast(torch.Tensor, gallery_aux).unsqueeze(0), query_chunk, gallery_t, alpha=-2.0, out=out)


def finisher(metric: str, query_aux: torch.Tensor | None) -> Finish:
    """The per-row map from raw keys to distances (non-decreasing in the raw key)."""
    if metric == "dot":
        return lambda raw, rows: raw
    if metric == "cosine":
        # Clamped: the GEMM form puts a duplicate row a rounding below 0, where it would beat the
        # row's own exact 0 and break the lower-index tie rule.
        return lambda raw, rows: (raw + 1.0).clamp_min_(0.0)
    squared = metric == "sqeuclidean"
    # The Euclidean metrics' squared norms (prepare_rows gives them for these metrics).
    squared_norms = cast(torch.Tensor, query_aux)

    def finish(raw: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = (raw + squared_norms[rows].unsqueeze(1)).clamp_min_(0.0)
        return out if squared else out.sqrt_()

    return finish


def raw_self_key(metric: str, query_rows: torch.Tensor, query_aux: torch.Tensor | None) -> torch.Tensor | None:
    """Raw key whose finished distance is the exact d(x, x) (None for ``dot``, which has none)."""
    if metric == "dot":
        return None
    if metric == "cosine":
        # Unit rows are at distance 0 from themselves; zero rows are at distance 1 from everything.
        nonzero = nonzero_rows(query_rows)
        return torch.where(nonzero, -1.0, 0.0).to(query_rows.dtype)
    # The Euclidean metrics' squared norms (prepare_rows gives them for these metrics).
    return -cast(torch.Tensor, query_aux)


def select_candidates(distances: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of (R, M) candidates in any order, sorted by (distance, index); k <= M."""
    if distances.shape[1] == k:
        values, order = torch.sort(distances, dim=1)
        return order_ties_by_index(values, indices.gather(1, order))
    values, order = torch.topk(distances, k + 1, dim=1, largest=False, sorted=True)
    chosen = indices.gather(1, order)
    tied_cut = torch.nonzero(values[:, k] == values[:, k - 1]).flatten()
    values, chosen = order_ties_by_index(values[:, :k], chosen[:, :k])
    if tied_cut.numel():
        fixed_d, fixed_i = sort_by_distance_then_index(
            distances.index_select(0, tied_cut), indices.index_select(0, tied_cut)
        )
        values = values.index_copy(0, tied_cut, fixed_d[:, :k])
        chosen = chosen.index_copy(0, tied_cut, fixed_i[:, :k])
    return values, chosen


class _CandidatePool:
    """Per-query candidate lists gathered tile by tile, reduced to the best k when they grow.

    Each tile offered is reduced to its own k nearest by :func:`smallest_k` first.
    """

    def __init__(self, k: int, capacity: int, finish: Finish) -> None:
        self.k, self.capacity, self.finish = k, capacity, finish
        self.distances: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.size = 0

    def offer(self, block: torch.Tensor, offset: int) -> None:
        """Offer ``block`` (R, W) of raw keys for columns ``offset`` to ``offset + W``; ``block``
        may be a transposed view (the selection reads it in place: a transposed copy cost 10%
        of a search)."""
        distances, columns = smallest_k(block, min(self.k, block.shape[1]), self.finish)
        self.add(distances, columns + offset)

    def add(self, distances: torch.Tensor, indices: torch.Tensor) -> None:
        self.distances.append(distances)
        self.indices.append(indices)
        self.size += distances.shape[1]
        if self.size > self.capacity:
            self.reduce()

    def reduce(self) -> tuple[torch.Tensor, torch.Tensor]:
        d, i = torch.cat(self.distances, 1), torch.cat(self.indices, 1)
        d, i = select_candidates(d, i, min(self.k, d.shape[1]))
        self.distances, self.indices, self.size = [d], [i], d.shape[1]
        return d, i

    result = reduce


def _best_positions(distances: torch.Tensor, columns: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (R, k) of the k best of (R, M) candidates, sorted by (distance, column); k <= M."""
    if distances.shape[1] > k:
        values, order = torch.topk(distances, k + 1, dim=1, largest=False, sorted=True)
    else:
        values, order = torch.sort(distances, dim=1)
    # Distinct values up to the (k+1)-th make the set and its order unique; rows with any tie
    # among them are sorted whole by (distance, column).
    tied = torch.nonzero((values[:, 1:] == values[:, :-1]).any(1)).flatten()
    order = order[:, :k]
    if tied.numel():
        exact = order_by_distance_then_index(distances.index_select(0, tied), columns.index_select(0, tied))
        order = order.index_copy(0, tied, exact[:, :k])
    return order


def _bounded_group_size(width: int, k: int) -> int:
    """Columns per group for :class:`_BoundedPool` on rows of ``width`` (0: too narrow to group).

    4 where that leaves at least 2k groups (so that the k-th smallest group minimum of a first
    tile is a tight bound), else 2. Measured at N = 16384, D = 512 on 2 cores (k = 100 / 10):
    groups of 4 took 3.03 / 1.75 s, of 2 3.58 / 2.56 s, of 16 3.46 / 1.90 s (larger groups
    gather more candidates per entry within the bound, smaller ones cost more minima).
    """
    for size in (4, 2):
        if width // size >= 2 * k:
            return size
    return 0


# When the symmetric search keeps running bounds: from 8 tiles per side (with fewer, most of a
# row's tiles come before its bound is tight: at N = 4096, 4 tiles of 1024, k = 100 took 310
# against 305 ms) and from k = 32, where the per-tile selection is a topk over most of the tile
# (k = 10 is selected in groups of 16 at 1.6 ns per entry, and the bounds gain nothing there:
# 1.68 / 7.01 s against 1.87 / 6.60 s at N = 16384 / 32768). Medians on 2 cores, D = 512:
# k = 32, N = 16384: 1.83 against 2.16 s; k = 100: 2.13 against 2.93 s, N = 32768: 9.2 against 13.3 s.
_BOUNDED_MIN_TILES = 8
_BOUNDED_MIN_K = 32


def _use_running_bounds(num_tiles: int, tile: int, k: int) -> bool:
    return num_tiles >= _BOUNDED_MIN_TILES and k >= _BOUNDED_MIN_K and _bounded_group_size(tile, k) > 0


def _merging_pool(
    k: int, num_rows: int, finish: Finish, bounded: bool, dtype: torch.dtype, device: torch.device
) -> RowPool:
    """The PyTorch selection of rows offered several tiles: running bounds where ``bounded``
    (:func:`_use_running_bounds` of the search's tiles), else candidate lists reduced as they grow."""
    if bounded:
        return _BoundedPool(k, num_rows, finish, dtype, device)
    return _CandidatePool(k, 4 * k, finish)


def _keep_best_raw(
    raw: torch.Tensor, columns: torch.Tensor, k: int, finish: Finish, rows: torch.Tensor
) -> torch.Tensor:
    """Positions (R, k) of the k best of (R, M) raw-key candidates by (distance, column), unordered.

    An unsorted topk of k + 1 raw keys is a linear-time selection, and only those are
    finished: where the largest of their distances is unique, dropping it leaves the unique k
    best. Rows where it is repeated and finite (a tie at the cut) are settled by
    :func:`_best_positions` on the whole row. An infinite cut is padding or an excluded
    diagonal, neither of which can be among the k nearest of finite rows.
    """
    values, order = torch.topk(raw, k + 1, dim=1, largest=False, sorted=False)
    distances = finish(values, rows)
    top, at = distances.max(1, keepdim=True)
    order.scatter_(1, at, order[:, k:].clone())  # a source inside the destination: overlap (R = 1 raises)
    order = order[:, :k]
    tied = torch.nonzero(((distances == top).sum(1) > 1) & torch.isfinite(top.squeeze(1))).flatten()
    if tied.numel():
        sub_rows = rows.index_select(0, tied)
        exact = _best_positions(finish(raw.index_select(0, tied), sub_rows), columns.index_select(0, tied), k)
        order = order.index_copy(0, tied, exact)
    return order


def _owned_copy(block: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``block``, never a view: blocks are views of the GEMM buffer that the
    next tile overwrites, and ``.contiguous()`` returns a view whenever the slice is already laid out
    contiguously (one column of a transposed tile, one row of a plain one)."""
    return block.clone(memory_format=torch.contiguous_format)


class _BoundedPool:
    """The k nearest of a block of rows, offered the columns tile by tile in increasing order.

    Each row keeps an upper bound on the raw keys that can still be among its k nearest, and a
    tile is reduced to the groups of columns (strided, as in :func:`smallest_raw`) whose minimum
    is within it: one contiguous min-reduction, then a gather of a few candidates per row,
    where ``torch.topk`` on the whole tile cost 8 ns per entry at k = 100 on 2 cores.

    The bounds: once the pool holds k candidates, a later column whose raw key is at least the
    largest of theirs finishes at or above each of their distances (the finish is monotone) and
    loses the tie on index. Before that, the first tile bounds itself: its k smallest group
    minima are k of its entries, so an entry whose distance exceeds that of the k-th smallest
    minimum cannot be among the k nearest.
    """

    def __init__(self, k: int, num_rows: int, finish: Finish, dtype: torch.dtype, device: torch.device) -> None:
        self.k, self.finish = k, finish
        self.rows = torch.arange(num_rows, device=device)
        self.bound = torch.full((num_rows,), float("inf"), dtype=dtype, device=device)
        self.filled = False
        self.raw: list[torch.Tensor] = []
        self.columns: list[torch.Tensor] = []
        self.size = 0
        # Each reduction is a selection over the whole list (8 ns per entry at k = 100); reducing
        # more often tightens the bounds sooner.
        self.capacity = 4 * k

    def offer(self, block: torch.Tensor, offset: int) -> None:
        """Offer ``block`` (R, W) of raw keys, columns ``offset`` to ``offset + W``, all above
        every column offered before. ``block`` may be a transposed view of a contiguous matrix."""
        num_rows, width = block.shape
        size = _bounded_group_size(width, self.k)
        if size == 0:
            # Too narrow to group (a partial last tile): every entry is a candidate.
            columns = torch.arange(width, dtype=torch.int32, device=block.device) + offset
            self._append(_owned_copy(block), columns.expand(num_rows, width))
        else:
            self._add_groups(block, offset, size)
        if self.size >= self.k and (not self.filled or self.size > self.capacity):
            self._reduce()

    def _add_groups(self, block: torch.Tensor, offset: int, size: int) -> None:
        num_rows, width = block.shape
        device = block.device
        groups = width // size
        body = groups * size
        transposed = block.stride(1) != 1
        # Group j is columns j, j + groups, ...: halving the strip pairwise is one vectorised
        # elementwise minimum per level over contiguous memory.
        minima = block.t()[:body] if transposed else block[:, :body]
        dim = 0 if transposed else 1
        while minima.shape[dim] > groups:
            half = minima.shape[dim] // 2
            minima = torch.minimum(minima.narrow(dim, 0, half), minima.narrow(dim, half, half))
        if transposed:
            minima = minima.t()  # (R, groups) view of a contiguous (groups, R)
        if not self.filled:
            kth = torch.topk(minima, self.k, dim=1, largest=False, sorted=False).values.amax(1)
            cut = self.finish(kth.unsqueeze(1), self.rows).squeeze(1)
            self.bound = torch.minimum(self.bound, _largest_raw_at_most(self.finish, self.rows, kth, cut))
        within = minima <= self.bound.unsqueeze(1)
        counts = within.sum(1)
        widest = int(counts.max())
        if widest:
            if transposed:
                # Pairs in the order of memory (group-major) so that the gather below reads the
                # tile's rows in sequence; a row's slots count its earlier groups.
                pair_groups, pair_rows = torch.nonzero(within.t(), as_tuple=True)
                slots = (within.t().to(torch.int32).cumsum(0) - 1)[pair_groups, pair_rows]
            else:
                pair_rows, pair_groups = torch.nonzero(within, as_tuple=True)
                starts = counts.cumsum(0) - counts
                slots = torch.arange(pair_rows.numel(), device=device) - starts[pair_rows]
            # Candidates are laid out (R, size, widest), strip-major, so that every index
            # computation below broadcasts over a long contiguous inner dimension.
            strips = torch.arange(size, device=device).unsqueeze(1)
            row_stride, column_stride = block.stride()
            first = (pair_rows * row_stride + pair_groups * column_stride).add_(block.storage_offset())
            flat = (strips * (groups * column_stride) + first).view(-1)  # (size, P)
            storage = block.as_strided((block.untyped_storage().nbytes() // block.element_size(),), (1,), 0)
            slot_of_pair = pair_rows * (size * widest) + slots
            destination = (strips * widest + slot_of_pair).view(-1)
            raw = torch.full((num_rows * size * widest,), float("inf"), dtype=block.dtype, device=device)
            raw.index_copy_(0, destination, storage.index_select(0, flat))
            # The columns of a padding slot are never read: its raw key is infinite.
            table = torch.zeros(num_rows * widest, dtype=torch.int32, device=device)
            table.index_copy_(0, pair_rows * widest + slots, pair_groups.to(torch.int32))
            columns = table.view(num_rows, 1, widest) + (strips * groups + offset).to(torch.int32)
            self._append(raw.view(num_rows, -1), columns.view(num_rows, -1))
        if body < width:
            tail = torch.arange(body, width, dtype=torch.int32, device=device) + offset
            self._append(_owned_copy(block[:, body:]), tail.expand(num_rows, width - body))

    def _append(self, raw: torch.Tensor, columns: torch.Tensor) -> None:
        self.raw.append(raw)
        self.columns.append(columns)
        self.size += raw.shape[1]

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.cat(self.raw, 1) if len(self.raw) > 1 else self.raw[0]
        columns = torch.cat(self.columns, 1) if len(self.columns) > 1 else self.columns[0]
        return raw, columns

    def _reduce(self) -> None:
        raw, columns = self._gathered()
        best = _keep_best_raw(raw, columns, self.k, self.finish, self.rows)
        raw, columns = raw.gather(1, best), columns.gather(1, best)
        self.raw, self.columns, self.size = [raw], [columns], self.k
        # Raw keys below the largest kept: torch.nextafter keeps the comparison inclusive.
        self.bound = torch.minimum(self.bound, torch.nextafter(raw.amax(1), raw.new_tensor(float("-inf"))))
        self.filled = True

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances (R, k), columns (R, k) int64) of the k nearest, sorted by (distance, column)."""
        if self.size > self.k:
            self._reduce()
        raw, columns = self._gathered()
        distances = self.finish(raw, self.rows)
        best = _best_positions(distances, columns, self.k)
        return distances.gather(1, best), columns.gather(1, best).to(torch.int64)


def _symmetric_keys(x: torch.Tensor, metric: str, unit: bool = False) -> tuple[torch.Tensor, torch.Tensor, Finish]:
    """Left (N, D') and right (N, D') rows whose products are symmetric raw keys, and their finish.

    For the Euclidean metrics the squared norms ride along as extra columns,
    [x, 1, |x|^2] . [-2 y, |y|^2, 1] = |x|^2 + |y|^2 - 2 x.y, so one GEMM yields the whole
    distance before clamping and no full-width pass is spent adding norms.
    """
    if metric in ("dot", "cosine"):
        rows, _ = prepare_rows(x, metric, unit)
        return rows.neg(), rows, finisher(metric, None)
    # Written into two preallocated (N, D + 2) buffers: building them with cat and temporaries
    # cost 10% of a whole N = 4096 search on a CPU (fresh pages for every temporary).
    acc = accumulation_dtype(x.dtype)
    n, width = x.shape
    left = torch.empty(n, width + 2, dtype=acc, device=x.device)
    right = torch.empty(n, width + 2, dtype=acc, device=x.device)
    left[:, :width] = x
    rows = left[:, :width]
    # Squared norms as a batch of row dot products: one pass (a square-then-sum is two).
    squared_norms = torch.bmm(rows.unsqueeze(1), rows.unsqueeze(2)).view(n)
    left[:, width] = 1.0
    left[:, width + 1] = squared_norms
    torch.mul(rows, -2.0, out=right[:, :width])
    right[:, width] = squared_norms
    right[:, width + 1] = 1.0
    squared = metric == "sqeuclidean"

    def finish(raw: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        out = raw.clamp_min(0.0)
        return out if squared else out.sqrt_()

    return left, right, finish


def _knn_symmetric(
    x: torch.Tensor,
    k: int,
    metric: str,
    exclude_self: bool,
    tile: int,
    progress: Callable[[int], None] | None,
    pool_factory: PoolFactory | None = None,
    unit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-search that computes each pair once: tile (I, J) with J > I serves rows I, and its
    transpose (read in place) serves rows J. With b tiles per side the GEMM work is
    (b + 1) / (2 b) of the plain chunked search (the diagonal tiles are computed whole).

    Each row tile's selection is a :class:`_CandidatePool` or a :class:`_BoundedPool`, or the
    pool ``pool_factory`` makes (the compiled CPU selection)."""
    n = x.shape[0]
    left, right, finish = _symmetric_keys(x, metric, unit)
    if exclude_self:
        diagonal = torch.full((n,), float("inf"), dtype=left.dtype, device=x.device)
    elif metric == "cosine":
        # Raw key -1 finishes to distance 0; a zero row stays at 1 from itself.
        diagonal = torch.where(nonzero_rows(x), -1.0, 0.0).to(left.dtype)
    elif metric == "dot":
        diagonal = None
    else:
        diagonal = torch.zeros(n, dtype=left.dtype, device=x.device)
    starts = list(range(0, n, tile))
    pools: list[RowPool]
    if pool_factory is not None:
        pools = [pool_factory(k, min(tile, n - i0), metric, None) for i0 in starts]
    else:
        bounded = _use_running_bounds(len(starts), tile, k)
        pools = [_merging_pool(k, min(tile, n - i0), finish, bounded, left.dtype, x.device) for i0 in starts]
    buffer = torch.empty(tile, tile, dtype=left.dtype, device=x.device)
    distances = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    # Row tile J is offered the transposes of tiles (0, J) ... (J - 1, J), then tiles (J, J) ...:
    # its columns in increasing order, as the bounded pool requires.
    for bi, i0 in enumerate(starts):
        i1 = min(i0 + tile, n)
        for bj in range(bi, len(starts)):
            j0 = starts[bj]
            j1 = min(j0 + tile, n)
            block = torch.mm(left[i0:i1], right[j0:j1].t(), out=buffer[: i1 - i0, : j1 - j0])
            if bi == bj:
                if diagonal is not None:
                    local = torch.arange(i1 - i0, device=x.device)
                    block[local, local] = diagonal[i0:i1]
            else:
                # The tile's transpose holds rows J against columns I (the keys are symmetric).
                pools[bj].offer(block.t(), i0)
            pools[bi].offer(block, j0)
        d, c = pools[bi].result()
        distances[i0:i1] = d
        indices[i0:i1] = c
        pools[bi] = None  # type: ignore[call-overload]
        if progress is not None:
            progress(i1 - i0)
    return distances, indices


def _write_shifted_diagonal(
    block: torch.Tensor, rows: torch.Tensor, shift: int, value: torch.Tensor | float
) -> None:
    """``block[i, i + shift] = value[i]`` (or ``value``) for the rows i whose column is in the block."""
    width = block.shape[1]
    if shift >= 0 and shift + block.shape[0] <= width:
        block[rows, rows + shift] = value
        return
    columns = rows + shift
    inside = (columns >= 0) & (columns < width)
    block[rows[inside], columns[inside]] = value[inside] if isinstance(value, torch.Tensor) else value


def knn_reference(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool = False,
    self_offset: int = -1,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    pool_factory: PoolFactory | None = None,
    tile_size: int | None = None,
    unit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest gallery rows of every query row, streamed over query chunks.

    A self-search (``symmetric``) over at least two tiles computes each pair once instead: the
    (I, J) tile of the distance matrix serves the rows of I and, transposed, those of J. From 8
    tiles per side and k >= 32, each row tile also keeps a running bound on the keys that can
    still be among its k nearest and selects only among the columns within it.

    Args:
        query: (Q, D) floating tensor.
        gallery: (G, D), same dtype and device as ``query``.
        k: neighbours per query, 1 <= k <= number of eligible gallery rows.
        metric: one of :data:`METRICS`.
        symmetric: ``gallery`` is ``query``; d(i, i) is then set to its exact value (0 for the
            Euclidean metrics and for non-zero rows under ``cosine``).
        self_offset: when >= 0, query row i never returns gallery row ``self_offset + i``.
        chunk_size: queries per chunk (default: a (chunk, G) fp32 block of 16 MiB, at least
            256 rows, on CPU, with the gallery in column tiles past that, see
            :func:`default_gallery_tile`; 512 MiB on GPU); also the tile side of the symmetric
            self-search (default: :func:`default_tile_size`). Given, each chunk takes the whole
            gallery.
        progress: called with the number of query rows finished after each chunk.
        pool_factory: the selection of each chunk / row tile (see :data:`PoolFactory`); by
            default the pure PyTorch one. The distance blocks and their order are the same.
        tile_size: the symmetric self-search's tile side when it differs from ``chunk_size``
            (the compiled selection's narrower default); a search below two tiles keeps the
            query chunks of ``chunk_size``.
        unit: ``cosine`` only: ``query`` and ``gallery`` already hold the unit rows
            (:func:`torchfg.ops.metric.unit_rows` in the accumulation dtype), so that a caller
            that also needs them normalises once.

    Returns:
        (distances (Q, k) in query's dtype, indices (Q, k) int64), sorted by (distance, index).
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    distances = torch.empty(num_query, k, dtype=query.dtype, device=query.device)
    indices = torch.empty(num_query, k, dtype=torch.int64, device=query.device)
    if num_query == 0 or k == 0:
        return distances, indices
    tile = tile_size or chunk_size or default_tile_size(query.device, num_query)
    # Below two tiles per side the symmetric path saves no GEMM work (the diagonal tiles are
    # computed whole) and only adds the transposed selections.
    if symmetric and self_offset in (-1, 0) and num_query >= 2 * tile:
        return _knn_symmetric(query, k, metric, self_offset == 0, tile, progress, pool_factory, unit)
    chunk = min(chunk_size or default_chunk_size(num_gallery, query.device), num_query)
    width = num_gallery if chunk_size else default_gallery_tile(chunk, num_gallery, query.device, pool_factory is not None)
    query_rows, query_aux = prepare_rows(query, metric, unit)
    if symmetric:
        gallery_rows, gallery_aux = query_rows, query_aux
    else:
        gallery_rows, gallery_aux = prepare_rows(gallery, metric, unit)
    gallery_t = gallery_rows.t()
    self_key = raw_self_key(metric, query_rows, query_aux) if symmetric else None
    # One block buffer for all chunks: a fresh allocation per chunk costs page faults on CPU.
    buffer = torch.empty(chunk * width, dtype=query_rows.dtype, device=query.device)
    bounded = width < num_gallery and _use_running_bounds(-(-num_gallery // width), width, k)
    for start in range(0, num_query, chunk):
        stop = min(start + chunk, num_query)
        rows = torch.arange(stop - start, device=query.device)
        chunk_aux = None if query_aux is None else query_aux[start:stop]
        # A pool merges the gallery tiles' selections (the compiled one selects even one tile);
        # a single tile with the PyTorch selection takes its k smallest directly.
        pool: RowPool | None = None
        if pool_factory is not None:
            pool = pool_factory(k, stop - start, metric, chunk_aux)
        elif width < num_gallery:
            pool = _merging_pool(k, stop - start, finisher(metric, chunk_aux), bounded, query_rows.dtype, query.device)
        for first in range(0, num_gallery, width):
            last = min(first + width, num_gallery)
            # A contiguous prefix of the buffer: the GEMM writes its rows densely.
            out = buffer[: (stop - start) * (last - first)].view(stop - start, last - first)
            tile_aux = None if gallery_aux is None else gallery_aux[first:last]
            block = raw_block(query_rows[start:stop], gallery_t[:, first:last], metric, tile_aux, out)
            if self_key is not None:
                _write_shifted_diagonal(block, rows, start - first, self_key[start:stop])
            if self_offset >= 0:
                _write_shifted_diagonal(block, rows, start + self_offset - first, float("inf"))
            if pool is None:
                values, columns = smallest_k(block, k, finisher(metric, chunk_aux))
            else:
                pool.offer(block, first)
        if pool is not None:
            values, columns = pool.result()
        distances[start:stop] = values
        indices[start:stop] = columns
        if progress is not None:
            progress(stop - start)
    return distances, indices
