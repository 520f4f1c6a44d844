"""Streaming Triton kernel for exact k-nearest-neighbour search with small k.

Each program owns ``BLOCK_Q`` queries and one contiguous range of the gallery (a "split"). It
streams ``BLOCK_G``-wide gallery tiles through on-chip memory:

* distance tile: ``tl.dot`` over ``BLOCK_D`` chunks (fp32 accumulation; fp16/bf16 operands go to
  the tensor cores as they are), finished with the metric's epilogue from per-row statistics
  precomputed in an O((Q + G) D) pre-pass (squared norms, or inverse norms for cosine);
* a selection in the style of faiss's WarpSelect (see ``_knn_kernel``): a per-row sorted top-K
  in registers, an admission threshold (the K-th best so far) and a two-deep queue per
  (query, tile column) lane. A tile costs a few element-wise integer operations; the queues are
  merged into the top-K (a bitonic sort) only when a lane would overflow, which becomes rare as
  the threshold settles. There is no data-dependent loop over a tile.

Candidates are compared on (distance, gallery index), packed into one int64, so ties go to the
lower index exactly as in the reference. With more than one split, each split writes its k best
to a (splits, Q, k) workspace and the splits are merged on (distance, index) afterwards.
Extra memory: O(Q * k * splits).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from torchfg._validation import env_flag
from torchfg.backends import triton_interpreter_enabled
from torchfg.ops._triton_utils import LAUNCH_OPTIONS, MAX_GRID_YZ, cdiv, dot_dtypes, next_power_of_2
from torchfg.ops.metric import metric_code, row_statistics
from torchfg.ops.knn.reference import _float_of_ordered, _ordered_bits, select_candidates

__all__ = ["MAX_K", "FilterConfig", "TileConfig", "knn_filter_triton", "knn_triton", "pack_keys", "unpack_keys"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The running buffer lives in registers: past this width it spills and the CUDA kernel is the
# better choice.
MAX_K = 128
# Whether _knn_filter_kernel appends from a flattened tile: triton >= 3.7 cannot compile the
# append in the dot's layout. A global, not a parameter, so that the Triton that compiles the
# kernel decides (compile_sm90.py compiles the specs traced under one Triton with another).
# The leading digits of major and minor ("3.7rc1" is 3.7); triton and builtins only, as
# compile_sm90.py loads the kernels without the rest of torchfg.
_FLAT_APPEND = tl.constexpr(
    tuple(int(part[:len(part) - len(part.lstrip("0123456789"))] or 0) for part in triton.__version__.split(".")[:2])
    >= (3, 7)
)
# Bytes of one list slot at the peak of its selection (see _filter_chunk_rows).
_LIST_SLOT_BYTES = 32
# Largest int32 offset of a list slot in one filter launch.
_I32_LIMIT = 2**31 - 1
# Index sentinel of empty buffer slots and rejected candidates; gallery indices stay below it.
_NO_INDEX_VALUE = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of the k-NN kernel.

    Attributes:
        block_q: queries per program.
        block_g: gallery rows per tile.
        block_d: embedding columns per ``tl.dot`` step.
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
        splits: gallery splits (second grid axis); None picks enough to fill the device.

    On a GPU every block size must be a power of two >= 16 (``tl.dot``'s minimum).
    """

    block_q: int = 64
    block_g: int = 64
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 3
    splits: int | None = None


def default_config(k_pad: int, dtype: torch.dtype, precision: str, dim: int) -> TileConfig:
    """Tiles for a search at padded k ``k_pad`` over ``dim``-wide rows of ``dtype``, whose fp32
    operands multiply as ``precision`` ("tf32" or "ieee")."""
    if triton_interpreter_enabled():
        return TileConfig(block_q=16, block_g=16, block_d=16)
    # Registers per thread: the (block_q, k_pad) int64 top-K, the two (block_q, block_g) int64 lane
    # queues and the fp32 distance tile, plus the bitonic sort's temporaries. These compile without
    # spills on sm_90 (ptxas -v, triton 3.6 and 3.9; every dtype, k, metric and layout of
    # compile_sm90.py's full level). 16-bit: 64 x 64 x 64 at k <= 32 takes 217-230 registers and
    # wgmma; 32 x 64 x 64 at k <= 64 takes 170, 32 x 128 x 32 at k <= 128 takes 254 (16 columns
    # when D is not a multiple of 32: 56-112 bytes of spills otherwise). TF32 operands take twice the
    # registers per column: 32 columns (64 spilled 24-450 bytes). IEEE fp32 is an FMA dot whose
    # operands sit in registers: 16 columns and narrower query blocks (64 x 64 x 16 spilled 8-80).
    # The launcher raises block_g to k_pad.
    if dtype == torch.float32 and precision == "ieee":
        if k_pad <= 64:
            return TileConfig(block_q=32, block_g=64, block_d=16, num_warps=8)
        return TileConfig(block_q=16, block_g=128, block_d=16, num_warps=8)
    wide_d = 32 if dtype == torch.float32 else 64
    if k_pad <= 32:
        return TileConfig(block_q=64, block_g=64, block_d=wide_d, num_warps=8)
    if k_pad <= 64:
        return TileConfig(block_q=32, block_g=64, block_d=wide_d, num_warps=8)
    return TileConfig(block_q=32, block_g=64, block_d=32 if dim % 32 == 0 else 16, num_warps=8)


# A candidate is packed into one int64 whose signed order is the (distance, index) order: the
# fp32 distance's bits made order-preserving in the high word, the gallery index in the low word.
# Every selection step is then one integer min/max/sort, with ties going to the lower index.
_SENTINEL_VALUE = (0x7F800000 << 32) | _NO_INDEX_VALUE  # (+inf, no index): never a real candidate
_SENTINEL = tl.constexpr(_SENTINEL_VALUE)


@triton.jit
def _pack(dist, index):
    dist = tl.where(dist == 0.0, 0.0, dist)  # -0.0 and +0.0 must pack alike: ties are by index
    bits = dist.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def _unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (packed & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _merge_lanes(best, lanes, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, K_PAD: tl.constexpr):
    """The K_PAD smallest of ``best`` (BLOCK_Q, K_PAD), sorted, and ``lanes`` (BLOCK_Q, BLOCK_G).

    Sorting ``lanes`` descending puts its K_PAD smallest in the last K_PAD columns, and they are
    the column-wise minimum over the K_PAD-wide chunks. Against the ascending ``best`` the
    element-wise minimum is the K_PAD smallest of the union (bitonic merge), sorted once more.
    """
    lanes = tl.sort(lanes, dim=1, descending=True)
    smallest = tl.min(tl.reshape(lanes, (BLOCK_Q, BLOCK_G // K_PAD, K_PAD)), axis=1)
    return tl.sort(tl.minimum(best, smallest), dim=1)


@triton.jit
def _merge_queues(best, first, second, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, K_PAD: tl.constexpr):
    """``best`` with both lane queues merged in (see :func:`_merge_lanes`)."""
    best = _merge_lanes(best, first, BLOCK_Q, BLOCK_G, K_PAD)
    return _merge_lanes(best, second, BLOCK_Q, BLOCK_G, K_PAD)


@triton.jit
def _kth(best, slots, K: tl.constexpr):
    """Each row's K-th smallest packed candidate (``best`` is sorted): the admission threshold."""
    return tl.min(tl.where(slots[None, :] >= K - 1, best, _SENTINEL), axis=1)


@triton.jit
def _distance_tile(
    q_ptr, g_ptr, q_aux, g_aux_ptr, rows, row_ok, cols, col_ok, D, self_offset,
    stride_qn, stride_qd, stride_gn, stride_gd,
    METRIC: tl.constexpr, SYMMETRIC: tl.constexpr, EXCLUDE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The (BLOCK_Q, BLOCK_G) fp32 distances of query ``rows`` to gallery ``cols`` in the GEMM
    form, and which of them are candidates (in range, not the excluded own row). ``q_aux``: the
    rows' statistics (squared norms, or inverse norms for cosine; unused for dot)."""
    # 64-bit row offsets: G * D passes 2**31 at the documented sizes (2**20 rows x 4096).
    q_offsets = rows.to(tl.int64)[:, None] * stride_qn
    g_offsets = cols.to(tl.int64)[:, None] * stride_gn
    acc = tl.zeros((BLOCK_Q, BLOCK_G), dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        q_tile = tl.load(
            q_ptr + q_offsets + ds.to(tl.int64)[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)
        g_tile = tl.load(
            g_ptr + g_offsets + ds.to(tl.int64)[None, :] * stride_gd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)
        acc += tl.dot(q_tile, tl.trans(g_tile), out_dtype=tl.float32, input_precision=INPUT_PRECISION)
    if METRIC == 3:  # dot
        dist = -acc
    else:
        g_aux = tl.load(g_aux_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if METRIC == 2:  # cosine; aux holds inverse norms (0 for zero rows)
            # Clamped as the reference's finish: a duplicate must tie with the row's own 0.
            dist = tl.maximum(1.0 - acc * q_aux[:, None] * g_aux[None, :], 0.0)
        else:  # aux holds squared norms
            dist = tl.maximum(q_aux[:, None] + g_aux[None, :] - 2.0 * acc, 0.0)
            if METRIC == 1:
                dist = tl.sqrt(dist)
    if SYMMETRIC:
        on_diag = rows[:, None] == cols[None, :]
        if METRIC == 2:
            dist = tl.where(on_diag & (q_aux[:, None] > 0), 0.0, dist)
        elif METRIC != 3:
            dist = tl.where(on_diag, 0.0, dist)
    valid = col_ok[None, :] & row_ok[:, None]
    if EXCLUDE:
        valid = valid & (cols[None, :] != rows[:, None] + self_offset)
    return dist, valid


@triton.jit
def _knn_kernel(
    q_ptr, g_ptr, q_aux_ptr, g_aux_ptr, out_d_ptr, out_i_ptr, needed_ptr,
    Q, G, D, split_size, self_offset,
    stride_qn, stride_qd, stride_gn, stride_gd,
    stride_os, stride_oq,
    K: tl.constexpr, K_PAD: tl.constexpr,
    METRIC: tl.constexpr, SYMMETRIC: tl.constexpr, EXCLUDE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    ONLY_NEEDED: tl.constexpr,
):
    # Selection in the style of faiss's WarpSelect: every (query, tile column) lane keeps a
    # two-deep queue of candidates below the row's admission threshold (its K-th best so far).
    # A tile costs a few element-wise integer min/max and one block-wide test; only when some
    # lane would receive a third candidate are the queues merged into the sorted per-row top-K
    # (a bitonic sort of the lanes), which tightens the threshold. No candidate below the
    # threshold is ever dropped and none at or above it can be among the K best, so the result
    # is exact; merges become rare once the threshold has settled.
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < Q
    slots = tl.arange(0, K_PAD)
    no_candidates = tl.full((BLOCK_Q, BLOCK_G), _SENTINEL, tl.int64)
    best = tl.full((BLOCK_Q, K_PAD), _SENTINEL, tl.int64)
    threshold = tl.full((BLOCK_Q,), _SENTINEL, tl.int64)
    lane_first = no_candidates
    lane_second = no_candidates

    q_aux = tl.zeros((BLOCK_Q,), tl.float32)
    if METRIC != 3:
        q_aux = tl.load(q_aux_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    g_start = split.to(tl.int64) * split_size  # < G + split_size, but the product is formed first
    g_stop = tl.minimum(g_start + split_size, G)
    if ONLY_NEEDED:
        # The filter search's fallback: a block none of whose rows is flagged in ``needed``
        # scans nothing and writes placeholders that the caller discards.
        needed = tl.load(needed_ptr + rows, mask=row_ok, other=0)
        if tl.max(needed.to(tl.int32), axis=0) == 0:
            g_stop = g_start
    for g0 in tl.range(g_start, g_stop, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        col_ok = cols < g_stop
        dist, valid = _distance_tile(
            q_ptr, g_ptr, q_aux, g_aux_ptr, rows, row_ok, cols, col_ok, D, self_offset,
            stride_qn, stride_qd, stride_gn, stride_gd,
            METRIC, SYMMETRIC, EXCLUDE, DOT_DTYPE, INPUT_PRECISION, BLOCK_Q, BLOCK_G, BLOCK_D,
        )
        candidate = _pack(dist, cols[None, :] + tl.zeros((BLOCK_Q, BLOCK_G), tl.int32))
        candidate = tl.where(valid & (candidate < threshold[:, None]), candidate, _SENTINEL)
        overflow = (candidate != _SENTINEL) & (lane_second != _SENTINEL)
        if tl.max(tl.max(overflow.to(tl.int32), axis=1), axis=0) > 0:
            best = _merge_queues(best, lane_first, lane_second, BLOCK_Q, BLOCK_G, K_PAD)
            threshold = _kth(best, slots, K)
            lane_first = no_candidates
            lane_second = no_candidates
            candidate = tl.where(candidate < threshold[:, None], candidate, _SENTINEL)
        carried = tl.maximum(lane_first, candidate)
        lane_first = tl.minimum(lane_first, candidate)
        lane_second = tl.minimum(lane_second, carried)

    if ONLY_NEEDED:
        if g_stop > g_start:  # a skipped block's lanes are empty: nothing to merge
            best = _merge_queues(best, lane_first, lane_second, BLOCK_Q, BLOCK_G, K_PAD)
    else:
        best = _merge_queues(best, lane_first, lane_second, BLOCK_Q, BLOCK_G, K_PAD)
    best_d, best_i = _unpack(best)
    out_offsets = split.to(tl.int64) * stride_os + rows.to(tl.int64)[:, None] * stride_oq + slots[None, :]
    out_mask = row_ok[:, None] & (slots < K)[None, :]
    tl.store(out_d_ptr + out_offsets, best_d, mask=out_mask)
    tl.store(out_i_ptr + out_offsets, best_i, mask=out_mask)


def _num_splits(num_query_blocks: int, num_gallery: int, block_g: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # Each split should stream at least a few tiles, or its set-up dominates.
    max_splits = max(1, num_gallery // (8 * block_g))
    return max(1, min(max_splits, -(-target // max(num_query_blocks, 1))))


@triton.jit
def _append_candidates(
    keep, dist, row_base, col_base, count_ptr, dist_ptr, index_ptr,
    TRANSPOSED: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Appends the tile's kept candidates to their rows' lists: row ``row_base + i`` gets gallery
    row ``col_base + j`` (list rows relative to the launch's first row), or the other way round
    when TRANSPOSED (a self-search tile that also serves its columns)."""
    if _FLAT_APPEND:
        # triton >= 3.7 fails to compile an atomic whose result is used in the dot's layout
        # (TritonGPURemoveLayoutConversions): the tile goes flat, and so through a blocked
        # layout; only the mask and the distances change layout, the indices are recomputed.
        flat = tl.arange(0, BLOCK_Q * BLOCK_G)
        keep = tl.reshape(keep, (BLOCK_Q * BLOCK_G,))
        dist = tl.reshape(dist, (BLOCK_Q * BLOCK_G,))
        tile_row = flat // BLOCK_G
        tile_col = flat % BLOCK_G
    else:
        tile_row = tl.arange(0, BLOCK_Q)[:, None] + tl.zeros((BLOCK_Q, BLOCK_G), tl.int32)
        tile_col = tl.arange(0, BLOCK_G)[None, :] + tl.zeros((BLOCK_Q, BLOCK_G), tl.int32)
    if TRANSPOSED:
        owner = col_base + tile_col
        column = row_base + tile_row
    else:
        owner = row_base + tile_row
        column = col_base + tile_col
    # The counter keeps counting past CAPACITY, so an overflowing row is recognisable afterwards.
    slot = tl.atomic_add(count_ptr + owner, keep.to(tl.int32), mask=keep, sem="relaxed")
    stored = keep & (slot < CAPACITY)
    # int32: the launcher keeps (rows of a launch) x CAPACITY under 2**31, and lanes whose slot
    # is past CAPACITY store nothing (64-bit offsets spilled 120-150 bytes at 128 x 128).
    offsets = owner * CAPACITY + slot
    tl.store(dist_ptr + offsets, dist, mask=stored)
    tl.store(index_ptr + offsets, column, mask=stored)


@triton.jit
def _knn_filter_kernel(
    q_ptr, g_ptr, q_aux_ptr, g_aux_ptr, bound_ptr, count_ptr, dist_ptr, index_ptr,
    row_start, num_rows, G, D, self_offset,
    stride_qn, stride_qd, stride_gn, stride_gd,
    CAPACITY: tl.constexpr,
    METRIC: tl.constexpr, SYMMETRIC: tl.constexpr, EXCLUDE: tl.constexpr, PAIR_ONCE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_Q: tl.constexpr,
):
    # One (query block, gallery tile) per program, with no state carried between tiles: every
    # candidate at or below its row's bound is appended to the row's list (a slot from an atomic
    # counter), and the rest of the tile is discarded. The tile's epilogue is a compare and a
    # rarely taken append, so the tiles can be GEMM-sized. PAIR_ONCE (a self-search whose lists
    # are all in memory, square tiles): only the tiles on and above the diagonal run, and an
    # off-diagonal one appends each pair to both rows' lists.
    pid = tl.program_id(0)
    q_blocks = tl.cdiv(num_rows, BLOCK_Q)
    g_blocks = tl.cdiv(G, BLOCK_G)
    # GROUP_Q query blocks walk the gallery together, so each gallery tile is read from L2 by
    # all of them (the grouped order of Triton's matmul tutorial).
    per_group = GROUP_Q * g_blocks
    first_q = (pid // per_group) * GROUP_Q
    # (At least 1 for every program of the grid; the clamp tells the offset check so.)
    group_size = tl.maximum(tl.minimum(q_blocks - first_q, GROUP_Q), 1)
    pid_q = first_q + (pid % per_group) % group_size
    pid_g = (pid % per_group) // group_size
    if PAIR_ONCE:
        if pid_g < pid_q:
            return
    rows = row_start + pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < row_start + num_rows
    cols = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    col_ok = cols < G
    q_aux = tl.zeros((BLOCK_Q,), tl.float32)
    if METRIC != 3:
        q_aux = tl.load(q_aux_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    dist, valid = _distance_tile(
        q_ptr, g_ptr, q_aux, g_aux_ptr, rows, row_ok, cols, col_ok, D, self_offset,
        stride_qn, stride_qd, stride_gn, stride_gd,
        METRIC, SYMMETRIC, EXCLUDE, DOT_DTYPE, INPUT_PRECISION, BLOCK_Q, BLOCK_G, BLOCK_D,
    )
    local = rows - row_start
    bound = tl.load(bound_ptr + local, mask=row_ok, other=float("-inf"))
    keep = valid & (dist <= bound[:, None])
    _append_candidates(keep, dist, pid_q * BLOCK_Q, pid_g * BLOCK_G, count_ptr, dist_ptr, index_ptr,
                       False, CAPACITY, BLOCK_Q, BLOCK_G)
    if PAIR_ONCE:
        if pid_g > pid_q:
            # The same distances serve the columns' rows (row_start is 0 here, and the validity
            # mask is symmetric: in range, and not the own row).
            col_bound = tl.load(bound_ptr + cols, mask=col_ok, other=float("-inf"))
            keep = valid & (dist <= col_bound[None, :])
            _append_candidates(keep, dist, pid_q * BLOCK_Q, pid_g * BLOCK_G, count_ptr, dist_ptr, index_ptr,
                               True, CAPACITY, BLOCK_Q, BLOCK_G)


@triton.jit
def _knn_bound_kernel(
    q_ptr, g_ptr, q_aux_ptr, s_aux_ptr, minima_ptr,
    num_rows, S, D, groups, per_group, sample_stride, self_offset,
    stride_qn, stride_qd, stride_sn, stride_gd, stride_mq,
    METRIC: tl.constexpr, EXCLUDE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Group c of the sample holds its rows c, c + groups, c + 2 groups, ...: the groups
    # [c0, c0 + BLOCK_S) of a program meet the contiguous sample rows j groups + c0 ... at step j,
    # so a running element-wise minimum over the steps is each group's minimum, written once
    # (a GEMM whose reduction over the sample is a min, not a sum). Sample row s is gallery row
    # s x sample_stride, read in place (stride_sn = sample_stride x the gallery's row stride).
    # Rows of the query chunk (q_ptr, q_aux_ptr and minima_ptr start at it; self_offset counts
    # from the chunk's first row).
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < num_rows
    group = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    group_ok = group < groups
    q_aux = tl.zeros((BLOCK_Q,), tl.float32)
    if METRIC != 3:
        q_aux = tl.load(q_aux_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    minima = tl.full((BLOCK_Q, BLOCK_S), float("inf"), tl.float32)
    for step in tl.range(0, per_group):
        # int64: step x groups stays under S, a fact the 32-bit offset check cannot derive. (A cast,
        # not .to: the interpreter's step is a Python int, and groups == 1 compiles as a constant.)
        cols = tl.cast(step, tl.int64) * groups + group
        col_ok = group_ok & (cols < S)
        dist, valid = _distance_tile(
            q_ptr, g_ptr, q_aux, s_aux_ptr, rows, row_ok, cols, col_ok, D, 0,
            stride_qn, stride_qd, stride_sn, stride_gd,
            METRIC, False, False, DOT_DTYPE, INPUT_PRECISION, BLOCK_Q, BLOCK_S, BLOCK_D,
        )
        if EXCLUDE:  # the own row is no candidate, so it may not set the bound
            valid = valid & (cols[None, :] * sample_stride != rows[:, None] + self_offset)
        minima = tl.minimum(minima, tl.where(valid, dist, float("inf")))
    tl.store(minima_ptr + rows.to(tl.int64)[:, None] * stride_mq + group[None, :], minima,
             mask=row_ok[:, None] & group_ok[None, :])


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Tiles and sizes of the filter search (:func:`knn_filter_triton`).

    Attributes:
        block_q, block_g, block_d: query rows, gallery rows and embedding columns of a tile.
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
        group_q: query blocks that walk the gallery together (L2 reuse of its tiles).
        capacity: candidate slots per query (a power of two >= k); None: :func:`default_capacity`.
        sample_stride: the bound is estimated from every ``sample_stride``-th gallery row.
        groups_per_k: the sample is cut into ``groups_per_k * k`` strided groups (rounded up to
            whole blocks of the bound kernel, ``max(16, block_g // 2)`` groups), and a query's
            bound is the k-th smallest of its distances' group minima.
        block_bytes: size of the per-chunk working buffers (candidate keys and the group
            minima); queries are searched in chunks that fit it.
        pair_once: a self-search computes each pair once and keeps every row's list in memory
            (None: when square tiles and those lists, 8 bytes a slot, fit 4 x ``block_bytes``).
    """

    block_q: int = 128
    block_g: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_q: int = 8
    capacity: int | None = None
    sample_stride: int = 4
    groups_per_k: int = 4
    block_bytes: int = 128 << 20
    pair_once: bool | None = None

    def __post_init__(self) -> None:
        for name in ("block_q", "block_g", "block_d"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"FilterConfig.{name} must be a power of two, got {value}")
        for name in ("num_warps", "num_stages", "group_q", "sample_stride", "groups_per_k", "block_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"FilterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pair_once and self.block_q != self.block_g:
            raise ValueError(f"FilterConfig.pair_once needs square tiles, got block_q={self.block_q}, "
                             f"block_g={self.block_g}")


def default_filter_config(dtype: torch.dtype, precision: str, dim: int, pair_once: bool = False) -> FilterConfig:
    """Tiles of the filter search for ``dim``-wide rows of ``dtype`` whose fp32 dots run as
    ``precision``; ``pair_once``: for a self-search that computes each pair once."""
    if triton_interpreter_enabled():
        return FilterConfig(block_q=16, block_g=16, block_d=16, group_q=2)
    # The tile keeps only its fp32 accumulator live across the dot (no running top-k), so it can
    # be a GEMM tile. Sizes checked for spills with compile_sm90.py (ptxas -v, sm_90a, triton 3.6
    # and 3.9, every dtype, metric, layout and mode of its quick level).
    if dtype == torch.float32 and precision == "ieee":
        # An FMA dot keeps its operands in registers: on 4 warps triton 3.6 spilled 24 bytes.
        return FilterConfig(block_q=64, block_g=64, block_d=16, num_warps=8)
    block_d = 32 if dtype == torch.float32 or dim % 64 else 64  # D = 100 at 64 spilled 120 B (3.6)
    if pair_once:
        # Both appends keep the distance tile live: 128 x 128 spilled 70-250 bytes on 8 or 16
        # warps. Half the tiles at 64 x 64 read as much from L2 as all of them at 128 x 128.
        return FilterConfig(block_q=64, block_g=64, block_d=block_d)
    return FilterConfig(block_d=block_d)


def default_capacity(k: int) -> int:
    """Candidate slots per query: a power of two about 16 k.

    With the bound from a quarter of the gallery in 4 k strided groups, a query's list holds
    about 1.15 k x 4 = 4.6 k candidates when distances are in no particular gallery order (the
    count follows from ranks alone: a group's minimum is below the bound with probability 1/4).
    16 k leaves room for clustered galleries; a row that still overflows goes to the fallback.
    """
    return max(16, next_power_of_2(16 * k))


def knn_filter_triton(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool = False,
    self_offset: int = -1,
    config: FilterConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton k-NN by bound and filter: same contract and results as :func:`knn_triton`.

    1. Each query's bound: the k-th smallest of the group minima of its distances to a strided
       sample of the gallery (``_knn_bound_kernel``: a GEMM-shaped kernel whose reduction over
       the sample is a running minimum per group, so only Q x groups minima are written). k
       distinct rows lie at or below it, so the k nearest do too, up to the accumulation order
       of two kernels that compute each distance the same way (a small slack covers it).
    2. One kernel over all (query block, gallery tile) pairs appends each candidate at or
       below its row's bound to the row's list of ``capacity`` (distance, index) slots. A
       self-search (``symmetric``) may compute each pair once (``FilterConfig.pair_once``): the
       tiles on and above the diagonal, appending to their rows' and their columns' lists.
    3. ``torch.topk`` of each list's (distance, index) keys packed into int64 gives the k
       nearest, sorted, with ties to the lower index.
    4. A row whose list overflowed, or holds fewer than k candidates (the bound was too tight),
       is searched again by the streaming kernel (:func:`knn_triton`'s), in one launch whose
       other blocks return at once: no host synchronisation, and the result is exact for
       every row whatever the bound.

    Extra memory: the lists, Q_chunk x capacity x about 32 bytes at the peak of their selection,
    and the group minima, Q_chunk x groups x 8 bytes, with Q_chunk chosen so that each fits
    ``config.block_bytes``; computing each pair once keeps all Q lists (Q x capacity x 8 bytes,
    at most 4 x ``block_bytes`` unless asked for). The sample is read from the gallery in place.
    """
    _check_search(query, gallery, k)
    num_query, dim = query.shape
    num_gallery = gallery.shape[0]
    if num_query == 0:
        return query.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=query.device)
    dot_dtype, _acc, precision = dot_dtypes(query.dtype)
    capacity = (config.capacity if config is not None else None) or default_capacity(k)
    if capacity < k or capacity & (capacity - 1):
        raise ValueError(f"FilterConfig.capacity must be a power of two >= k={k}, got {capacity}")
    fma_dot = query.dtype == torch.float32 and precision == "ieee"
    pair_once = _pairs_once(config, num_query, capacity, symmetric, self_offset, fma_dot)
    cfg = config or default_filter_config(query.dtype, precision, dim, pair_once)
    q_aux, g_aux = _row_aux(query, gallery, metric, symmetric)
    # Every candidate fits the list when the gallery does: no bound needed. The bound kernel
    # takes the every-tile configuration's tiles by default: computing pairs once shrinks the
    # filter tiles for their two appends, which the bound kernel does not have.
    bound_cfg = config or default_filter_config(query.dtype, precision, dim)
    sample = _BoundSample(gallery, g_aux, metric, k, bound_cfg) if num_gallery > capacity else None
    bound_groups = 0 if sample is None else sample.groups

    def bounds(start: int, stop: int) -> torch.Tensor:
        if sample is None:
            return torch.full((stop - start,), float("inf"), device=query.device)
        return sample.bounds(query[start:stop], q_aux, start, self_offset)

    def launch(start: int, stop: int, bound: torch.Tensor, counts: torch.Tensor, list_dist: torch.Tensor,
               list_index: torch.Tensor, each_pair_once: bool) -> None:
        grid = (cdiv(stop - start, cfg.block_q) * cdiv(num_gallery, cfg.block_g),)
        _knn_filter_kernel[grid](
            query, gallery, q_aux, g_aux, bound, counts, list_dist, list_index,
            start, stop - start, num_gallery, dim, max(self_offset, 0),
            query.stride(0), query.stride(1), gallery.stride(0), gallery.stride(1),
            CAPACITY=capacity,
            METRIC=metric_code(metric), SYMMETRIC=symmetric, EXCLUDE=self_offset >= 0, PAIR_ONCE=each_pair_once,
            DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
            BLOCK_Q=cfg.block_q, BLOCK_G=cfg.block_g, BLOCK_D=cfg.block_d, GROUP_Q=cfg.group_q,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS,
        )

    distances = torch.empty(num_query, k, dtype=torch.float32, device=query.device)
    indices = torch.empty(num_query, k, dtype=torch.int64, device=query.device)
    counts = torch.zeros(num_query, dtype=torch.int32, device=query.device)
    if pair_once:
        # Every row's bound and list first; then the lists are read in chunks.
        bound_rows = _filter_chunk_rows(num_query, 0, bound_groups, cfg)
        bound = torch.cat([bounds(start, min(start + bound_rows, num_query))
                           for start in range(0, num_query, bound_rows)])
        list_dist = torch.empty(num_query, capacity, dtype=torch.float32, device=query.device)
        list_index = torch.empty(num_query, capacity, dtype=torch.int32, device=query.device)
        launch(0, num_query, bound, counts, list_dist, list_index, True)
        rows_per_chunk = _filter_chunk_rows(num_query, capacity, 0, cfg)
        for start in range(0, num_query, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_query)
            distances[start:stop], indices[start:stop] = _nearest_in_lists(
                list_dist[start:stop], list_index[start:stop], counts[start:stop], k)
    else:
        rows_per_chunk = _filter_chunk_rows(num_query, capacity, bound_groups, cfg)
        chunk_rows = min(rows_per_chunk, num_query)
        list_dist = torch.empty(chunk_rows, capacity, dtype=torch.float32, device=query.device)
        list_index = torch.empty(chunk_rows, capacity, dtype=torch.int32, device=query.device)
        for start in range(0, num_query, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_query)
            launch(start, stop, bounds(start, stop), counts[start:stop], list_dist, list_index, False)
            distances[start:stop], indices[start:stop] = _nearest_in_lists(
                list_dist[: stop - start], list_index[: stop - start], counts[start:stop], k)
    needed = (counts < k) | (counts > capacity)
    fallback_d, fallback_i = _knn_streaming(
        query, gallery, k, metric, symmetric, self_offset, None, q_aux, g_aux, needed=needed
    )
    distances = torch.where(needed[:, None], fallback_d, distances)
    indices = torch.where(needed[:, None], fallback_i, indices)
    return distances.to(query.dtype), indices


class _BoundSample:
    """A strided sample of the gallery, and per query the bound of its k nearest (see
    :func:`knn_filter_triton`)."""

    def __init__(self, gallery: torch.Tensor, g_aux: torch.Tensor, metric: str, k: int, cfg: FilterConfig):
        num_gallery = gallery.shape[0]
        self.stride = cfg.sample_stride if num_gallery >= cfg.sample_stride * cfg.groups_per_k * k else 1
        # The kernel reads every stride-th row where it lies (no copy), with fp32 accumulators:
        # fp16 rows need no wider copy for their dot products' range.
        self.gallery = gallery
        self.rows = cdiv(num_gallery, self.stride)
        self.metric, self.k, self.cfg = metric, k, cfg
        # Both kernels compute a pair's distance the same way (_distance_tile, fp32 accumulators,
        # the same operand rounding); only their accumulation order may differ, by about
        # D 2**-24 |q| |g|. A row whose bound still comes out too tight goes to the exact fallback.
        self.slack = 2.0**-10
        if metric == "dot":
            self.aux = g_aux  # unused placeholder
            self.largest = torch.linalg.vector_norm(gallery[:: self.stride], dim=1, dtype=torch.float32).square().max()
        else:
            self.aux = g_aux[:: self.stride].float().contiguous()
            # (Cosine's unit rows need no largest norm: their slack is 2 self.slack.)
            self.largest = None if metric == "cosine" else self.aux.max()
        # The bound kernel's tile is half the filter kernel's in the group direction: its running
        # minima are live next to the accumulator (at 128 x 128, fp16 column-major rows spilled
        # 48 bytes on triton 3.9; IEEE fp32 at 64 x 64, 20 bytes on 3.6).
        self.block_groups = max(16, cfg.block_g // 2)
        self.dot_dtype, _acc, self.precision = dot_dtypes(gallery.dtype)
        # An FMA dot (IEEE fp32) keeps its operands in registers: 3 stages spilled 8 bytes on
        # triton 3.6 (cosine, D = 100), 2 stages none.
        fma_dot = gallery.dtype == torch.float32 and self.precision == "ieee"
        self.num_stages = min(2, cfg.num_stages) if fma_dot else cfg.num_stages
        # Strided groups: rows next to each other (often one class) fall into different groups.
        # Rounded up to whole blocks of the kernel: more groups only tighten the bound.
        wanted = cdiv(cfg.groups_per_k * k, self.block_groups) * self.block_groups
        self.groups = min(self.rows, wanted)

    def bounds(self, rows: torch.Tensor, q_aux: torch.Tensor, start: int, self_offset: int) -> torch.Tensor:
        """(chunk,) fp32 bounds of the query rows ``rows`` (global rows start .. start + chunk)."""
        chunk = rows.shape[0]
        if self.groups < self.k:  # fewer groups than neighbours: the sample bounds nothing
            return torch.full((chunk,), float("inf"), device=rows.device)
        minima = torch.empty(chunk, self.groups, dtype=torch.float32, device=rows.device)
        cfg, gallery = self.cfg, self.gallery
        # Euclidean bounds are squared until the slack is added.
        metric = "sqeuclidean" if self.metric == "euclidean" else self.metric
        grid = (cdiv(chunk, cfg.block_q), cdiv(self.groups, self.block_groups))
        _knn_bound_kernel[grid](
            rows, gallery, q_aux if self.metric == "dot" else q_aux[start:], self.aux, minima,
            chunk, self.rows, gallery.shape[1], self.groups, cdiv(self.rows, self.groups), self.stride,
            max(self_offset, 0) + start,
            rows.stride(0), rows.stride(1), gallery.stride(0) * self.stride, gallery.stride(1), minima.stride(0),
            METRIC=metric_code(metric), EXCLUDE=self_offset >= 0,
            DOT_DTYPE=self.dot_dtype, INPUT_PRECISION=self.precision,
            BLOCK_Q=cfg.block_q, BLOCK_S=self.block_groups, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=self.num_stages, **LAUNCH_OPTIONS,
        )
        if self.metric == "dot":
            norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square()
            slack = self.slack * (norms + self.largest)
        elif self.metric == "cosine":
            slack = self.slack * 2.0
        else:
            slack = self.slack * (q_aux[start : start + chunk].float() + self.largest)
        bound = torch.kthvalue(minima, self.k, dim=1).values + slack
        return bound.sqrt_() if self.metric == "euclidean" else bound


def _filter_chunk_rows(num_query: int, capacity: int, bound_groups: int, cfg: FilterConfig) -> int:
    # Per query: its list (fp32 distances and int32 indices, then their int64 keys and the
    # packing's temporaries: about 32 bytes a slot at the peak), or its group minima (fp32, and
    # the k-th value's working copy: 8 bytes a group), whichever is larger.
    per_row = max(capacity * _LIST_SLOT_BYTES, bound_groups * 8, 1)
    rows = max(cfg.block_q, cfg.block_bytes // per_row // cfg.block_q * cfg.block_q)
    if capacity:  # the kernel's list offsets, row x capacity + slot, are int32
        rows = min(rows, max(cfg.block_q, _I32_LIMIT // capacity // cfg.block_q * cfg.block_q))
    return min(rows, cdiv(num_query, cfg.block_q) * cfg.block_q)


def _pairs_once(
    config: FilterConfig | None, num_query: int, capacity: int, symmetric: bool, self_offset: int,
    fma_dot: bool = False,
) -> bool:
    """Whether a filter search computes each pair once (see ``FilterConfig.pair_once``);
    ``config`` None: the default tiles, ``fma_dot``: IEEE fp32 inputs."""
    cfg = config or FilterConfig()
    if not symmetric or self_offset > 0 or cfg.block_q != cfg.block_g or num_query * capacity > _I32_LIMIT:
        return False  # (every row's list in one launch: its int32 offsets must reach them all)
    if cfg.pair_once is not None:
        return cfg.pair_once
    if config is None and fma_dot:
        # An FMA dot keeps its operands in registers: no default tiles take both appends
        # without spilling (64 x 64 spilled 8 bytes on triton 3.6).
        return False
    return num_query * capacity * 8 <= 4 * cfg.block_bytes


def _nearest_in_lists(
    list_dist: torch.Tensor, list_index: torch.Tensor, counts: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each row's list (rows, capacity): (fp32 distances, int64 indices), sorted
    by (distance, index). Slots past a row's count were never written: they get the sentinel key,
    larger than every candidate's."""
    slots = torch.arange(list_dist.shape[1], device=list_dist.device)
    filled = slots[None, :] < counts[:, None]
    keys = pack_keys(list_dist, list_index).masked_fill_(~filled, _SENTINEL_VALUE)
    return unpack_keys(torch.topk(keys, k, dim=1, largest=False, sorted=True).values)

def pack_keys(distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """fp32 distances and int32 indices -> int64 keys in (distance, index) order (the order of
    the kernels' ``_pack``): the distance's order-preserving integer (the reference's, -0.0 and
    +0.0 alike) over the index."""
    return _ordered_bits(distances).bitwise_left_shift_(32).bitwise_or_(indices)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_keys`: (fp32 distances, int64 indices); the sentinel unpacks
    to (+inf, 2**31 - 1)."""
    return _float_of_ordered(keys >> 32, torch.float32), keys & 0x7FFFFFFF


def knn_triton(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool = False,
    self_offset: int = -1,
    config: TileConfig | FilterConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton k-NN: query (Q, D), gallery (G, D) -> (distances (Q, k) in query's dtype, indices (Q, k) int64).

    Same contract as :func:`torchfg.ops.knn.reference.knn_reference` (sorted by distance, ties to
    the lower index); requires 1 <= k <= :data:`MAX_K`, fp16/bf16/fp32 inputs and G < 2**31 - 1.
    Runs the streaming kernel, or the filter search (:func:`knn_filter_triton`) for a
    :class:`FilterConfig` or, without a config, when ``TORCHFG_KNN_FILTER=1`` (opt-in until a GPU
    run has timed it against the streaming kernel).
    """
    if isinstance(config, FilterConfig) or (config is None and wants_filter()):
        return knn_filter_triton(query, gallery, k, metric, symmetric, self_offset, config)
    _check_search(query, gallery, k)
    if query.shape[0] == 0:
        return query.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=query.device)
    q_aux, g_aux = _row_aux(query, gallery, metric, symmetric)
    distances, indices = _knn_streaming(query, gallery, k, metric, symmetric, self_offset, config, q_aux, g_aux)
    return distances.to(query.dtype), indices


def wants_filter() -> bool:
    """Whether a call without a config runs the filter search (``TORCHFG_KNN_FILTER=1``)."""
    return env_flag("TORCHFG_KNN_FILTER", False)


def _check_search(query: torch.Tensor, gallery: torch.Tensor, k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"knn_triton supports 1 <= k <= {MAX_K}, got k={k}")
    if query.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"knn_triton supports float16, bfloat16 and float32 inputs, got {query.dtype}")
    if gallery.shape[0] >= _NO_INDEX_VALUE - MAX_K:
        raise ValueError(
            f"knn_triton supports galleries of fewer than {_NO_INDEX_VALUE - MAX_K} rows, got {gallery.shape[0]}"
        )


def _row_aux(
    query: torch.Tensor, gallery: torch.Tensor, metric: str, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' per-row statistics of query and gallery (a placeholder for ``dot``)."""
    if metric == "dot":
        placeholder = torch.empty(1, device=query.device)
        return placeholder, placeholder
    q_aux = row_statistics(query, metric)
    return q_aux, q_aux if symmetric else row_statistics(gallery, metric)


def _knn_streaming(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool,
    self_offset: int,
    config: TileConfig | None,
    q_aux: torch.Tensor,
    g_aux: torch.Tensor,
    needed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The streaming kernel's search: (fp32 distances (Q, k), int64 indices (Q, k)). With
    ``needed`` (Q,) bool, only the query blocks holding a flagged row search; the other rows'
    results are placeholders."""
    num_query, dim = query.shape
    num_gallery = gallery.shape[0]
    k_pad = max(16, next_power_of_2(k))
    dot_dtype, _acc, precision = dot_dtypes(query.dtype)
    cfg = config or default_config(k_pad, query.dtype, precision, dim)
    # The lanes' K_PAD smallest are read off K_PAD-wide chunks of a gallery tile.
    block_g = max(cfg.block_g, k_pad)
    q_blocks = cdiv(num_query, cfg.block_q)
    # (With ``needed``, sized as if every row were flagged: knowing how many are needs a host read.)
    # Splits are grid y, which CUDA caps at 65535 (a pinned ``splits`` may ask for more).
    splits = min(cfg.splits or _num_splits(q_blocks, num_gallery, block_g, query.device), MAX_GRID_YZ)
    split_size = cdiv(cdiv(num_gallery, splits), block_g) * block_g
    splits = cdiv(num_gallery, split_size)
    out_d = torch.empty(splits, num_query, k, dtype=torch.float32, device=query.device)
    out_i = torch.empty(splits, num_query, k, dtype=torch.int32, device=query.device)
    _knn_kernel[(q_blocks, splits)](
        query, gallery, q_aux, g_aux, out_d, out_i, q_aux if needed is None else needed,
        num_query, num_gallery, dim, split_size, max(self_offset, 0),
        query.stride(0), query.stride(1), gallery.stride(0), gallery.stride(1),
        out_d.stride(0), out_d.stride(1),
        K=k, K_PAD=k_pad,
        METRIC=metric_code(metric), SYMMETRIC=symmetric, EXCLUDE=self_offset >= 0,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        BLOCK_Q=cfg.block_q, BLOCK_G=block_g, BLOCK_D=cfg.block_d, ONLY_NEEDED=needed is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS,
    )
    indices = out_i.to(torch.int64)
    if splits == 1:  # the kernel's top-k is sorted by (distance, index) already
        return out_d[0], indices[0]
    # Candidates from different splits have disjoint indices: an exact (distance, index)
    # selection over their union is the global answer.
    return select_candidates(
        out_d.permute(1, 0, 2).reshape(num_query, splits * k),
        indices.permute(1, 0, 2).reshape(num_query, splits * k),
        k,
    )
