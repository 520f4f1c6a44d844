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

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops._triton_utils import cdiv, dot_dtypes, next_power_of_2
from torchfg.ops.metric import metric_code, row_statistics
from torchfg.ops.knn.reference import select_candidates

__all__ = ["MAX_K", "TileConfig", "knn_triton"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The running buffer lives in registers: past this width it spills and the CUDA kernel is the
# better choice.
MAX_K = 128
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
def _knn_kernel(
    q_ptr, g_ptr, q_aux_ptr, g_aux_ptr, out_d_ptr, out_i_ptr,
    Q, G, D, split_size, self_offset,
    stride_qn, stride_qd, stride_gn, stride_gd,
    stride_os, stride_oq,
    K: tl.constexpr, K_PAD: tl.constexpr,
    METRIC: tl.constexpr, SYMMETRIC: tl.constexpr, EXCLUDE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
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
    q_offsets = rows.to(tl.int64)[:, None] * stride_qn
    slots = tl.arange(0, K_PAD)
    no_candidates = tl.full((BLOCK_Q, BLOCK_G), _SENTINEL, tl.int64)
    best = tl.full((BLOCK_Q, K_PAD), _SENTINEL, tl.int64)
    threshold = tl.full((BLOCK_Q,), _SENTINEL, tl.int64)
    lane_first = no_candidates
    lane_second = no_candidates

    if METRIC != 3:
        q_aux = tl.load(q_aux_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    g_start = split.to(tl.int64) * split_size  # < G + split_size, but the product is formed first
    g_stop = tl.minimum(g_start + split_size, G)
    for g0 in tl.range(g_start, g_stop, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        col_ok = cols < g_stop
        # 64-bit row offsets: G * D passes 2**31 at the documented sizes (2**20 rows x 4096).
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
                dist = 1.0 - acc * q_aux[:, None] * g_aux[None, :]
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


def knn_triton(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool = False,
    self_offset: int = -1,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton k-NN: query (Q, D), gallery (G, D) -> (distances (Q, k) in query's dtype, indices (Q, k) int64).

    Same contract as :func:`torchfg.ops.knn.reference.knn_reference` (sorted by distance, ties to
    the lower index); requires 1 <= k <= :data:`MAX_K`, fp16/bf16/fp32 inputs and G < 2**31 - 1.
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"knn_triton supports 1 <= k <= {MAX_K}, got k={k}")
    if query.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"knn_triton supports float16, bfloat16 and float32 inputs, got {query.dtype}")
    num_query, dim = query.shape
    num_gallery = gallery.shape[0]
    if num_gallery >= _NO_INDEX_VALUE - MAX_K:
        raise ValueError(
            f"knn_triton supports galleries of fewer than {_NO_INDEX_VALUE - MAX_K} rows, got {num_gallery}"
        )
    if num_query == 0:
        return query.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=query.device)
    k_pad = max(16, next_power_of_2(k))
    dot_dtype, _acc, precision = dot_dtypes(query.dtype)
    cfg = config or default_config(k_pad, query.dtype, precision, dim)
    # The lanes' K_PAD smallest are read off K_PAD-wide chunks of a gallery tile.
    block_g = max(cfg.block_g, k_pad)
    if metric == "dot":
        q_aux = g_aux = torch.empty(1, device=query.device)
    else:
        q_aux = row_statistics(query, metric)
        g_aux = q_aux if symmetric else row_statistics(gallery, metric)
    q_blocks = cdiv(num_query, cfg.block_q)
    splits = cfg.splits or _num_splits(q_blocks, num_gallery, block_g, query.device)
    split_size = cdiv(cdiv(num_gallery, splits), block_g) * block_g
    splits = cdiv(num_gallery, split_size)
    out_d = torch.empty(splits, num_query, k, dtype=torch.float32, device=query.device)
    out_i = torch.empty(splits, num_query, k, dtype=torch.int32, device=query.device)
    _knn_kernel[(q_blocks, splits)](
        query, gallery, q_aux, g_aux, out_d, out_i,
        num_query, num_gallery, dim, split_size, max(self_offset, 0),
        query.stride(0), query.stride(1), gallery.stride(0), gallery.stride(1),
        out_d.stride(0), out_d.stride(1),
        K=k, K_PAD=k_pad,
        METRIC=metric_code(metric), SYMMETRIC=symmetric, EXCLUDE=self_offset >= 0,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        BLOCK_Q=cfg.block_q, BLOCK_G=block_g, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    indices = out_i.to(torch.int64)
    if splits == 1:  # the kernel's top-k is sorted by (distance, index) already
        distances, indices = out_d[0], indices[0]
    else:
        # Candidates from different splits have disjoint indices: an exact (distance, index)
        # selection over their union is the global answer.
        distances, indices = select_candidates(
            out_d.permute(1, 0, 2).reshape(num_query, splits * k),
            indices.permute(1, 0, 2).reshape(num_query, splits * k),
            k,
        )
    return distances.to(query.dtype), indices
