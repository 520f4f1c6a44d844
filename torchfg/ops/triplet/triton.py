"""Fused Triton kernel for hardest-pair triplet mining (batch-hard and adaptive-margin ATL).

The kernel never writes an anchors x candidates matrix. Each program owns ``BLOCK_M`` anchors
and one contiguous range of candidates (a "split"); it streams ``BLOCK_N``-wide candidate tiles
through on-chip memory:

* distance tile: ``tl.dot`` over ``BLOCK_D`` chunks of the embeddings (fp32 accumulation, fp64 for
  fp64 inputs; fp16/bf16 operands go to the tensor cores as they are), finished with the metric's
  epilogue from row statistics precomputed in an O((N + M) D) pre-pass (squared norms for the
  Euclidean metrics, inverse norms for cosine);
* for ATL, a text-similarity tile in the same pass (a second ``tl.dot`` over ``BLOCK_T`` chunks of
  the text embeddings, scaled by inverse text norms) that gives the margin of every pair and the
  near-duplicate exclusion (the text is not read when ``margin_scale == 0`` and there is no
  ``text_positive_threshold``);
* the running hardest positive and hardest (margin-aware) negative of each anchor, value and
  index, kept in registers; ties go to the lowest candidate index.

When there are few anchor blocks, the candidates are split over a second grid axis so that the GPU
is filled; each split writes its (value, index) per anchor to a small (splits, N) workspace and a
merge kernel reduces the splits in candidate order. Extra memory is O((N + M) + splits x N).

Register budget (issue 14): the configs of ``GPU_CONFIGS`` with tensor-core dots (fp16/bf16, TF32)
compile for sm_90 without spills (triton 3.6 and 3.9) over the layouts they are allowed on, and
the FMA-dot ones (IEEE fp32) keep at most a few dozen bytes; the autotuner prunes the others per
call (column-major operands, row-major operands that are not 16-byte aligned, or a D that is not a
multiple of BLOCK_D). Most fit two programs per
SM, so that one program's epilogue (metric, masks, two arg-maxima) overlaps another's MMA loop.
What keeps the epilogue small: labels are compared as int32 words (int64 labels are read as word
pairs, and the rare programs whose labels differ in their high words go to a second, separate
pass); only the last tile of a split masks its columns; the row statistics of all inputs come
from one pre-pass launch. Label and statistic loads stay after the MMA loop: issued before it,
the software pipeliner keeps one copy per stage in registers (measured: hundreds of bytes of
spills at 128 registers), while a second resident program hides their latency anyway.

A batch mined against itself can take the symmetric kernel instead (``_mine_symmetric_kernel``;
opt-in, ``TORCHFG_SYMMETRIC_MINING=1`` or ``TileConfig(symmetric=True)``): it computes only the
tiles on and above the diagonal, half the MMA work, and each off-diagonal tile updates the anchors
of its rows and of its columns, the latter through atomics on packed (key, index) words.

Selection rules (see ``torchfg/ops/triplet/__init__.py`` for the public op): the hardest positive
maximises d over same-label candidates other than the anchor itself; the hardest negative maximises
m - d over other-label candidates, with m = base_margin + margin_scale * (1 - cos_text) / 2 when
text is given (else base_margin). With constant margins (no text, or ``margin_scale == 0``) that
is the closest negative, selected on d directly like the reference does; Euclidean selection is
then done on squared distances (same order, no sqrt per pair).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import cast

import torch
import triton
import triton.language as tl

from torchfg._validation import accumulation_dtype, is_row_slice, parse_env_flag
from torchfg.backends import EnvironReading, triton_interpreter_enabled
from torchfg.ops.pair_distances.triton import ieee_div, ieee_sqrt
from torchfg.ops._triton_utils import (
    LAUNCH_OPTIONS, MAX_GRID_YZ, AutotunedLaunch, cdiv, check_precondition, dot_dtypes, next_power_of_2, sm_count, split_scalar,
)
from torchfg.ops.metric import metric_code as metric_code_of

__all__ = ["TileConfig", "SplitBests", "mine_hardest_triton", "mine_hardest_triton_tiled", "mine_hardest_splits_triton"]


# Every tile width used by the GPU configs divides this, so a split is a whole number of tiles.
_SPLIT_GRANULE = 128
# A split should cover at least this many candidates, so the per-program set-up is amortised.
_MIN_CANDIDATES_PER_SPLIT = 512


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of the mining kernel.

    Attributes:
        block_m: anchors per program.
        block_n: candidates per tile.
        block_d: embedding columns per ``tl.dot`` step.
        block_t: text columns per ``tl.dot`` step (ATL only).
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
        candidates_per_split: candidates handled by one program; None picks a split that fills
            the device. A value >= M gives a single split (no merge pass).
        flatten: ask Triton to flatten the candidate-tile and D loops into one pipelined loop
            (``tl.range(flatten=True)``), which avoids refilling the load pipeline at every tile.
            Ignored by the interpreter.
        maxnreg: register cap per thread (``None``: the compiler's choice). 128 with 8 warps (or
            up to 255 with 4) lets two programs share an SM, so that one's epilogue overlaps the
            other's MMA loop.
        symmetric: mine a batch against itself (anchors are the candidates, self_offset 0, the
            same labels and text; fp16/bf16/fp32) with the symmetric kernel, which computes each
            pair's tile once for both of its anchors (square ``block_m`` tiles; ``block_n`` must
            equal it, and ``candidates_per_split`` counts candidates of a row block's tile list).
            None: the ``TORCHFG_SYMMETRIC_MINING`` environment variable (off when unset; read
            as every on/off variable, see docs/concepts/backends.md: any other value is an error).
            Calls that are not symmetric ignore it.

    On a GPU every block size must be a power of two >= 16 (``tl.dot``'s minimum); the
    interpreter accepts any power of two. The defaults (for an explicit config; the launcher
    picks from ``GPU_CONFIGS`` otherwise) are a 64 x 64 tile on 8 warps: with text the former
    128 x 128 default spilled 0.4-2.4 KB on sm_90 (ptxas -v, triton 3.6 and 3.9), this one 0-16
    bytes on 16-bit row-major inputs, but up to ~1 KB with fp32 text or column-major operands
    (quick-level CSVs in benchmarks/results). An explicit config bypasses the autotuner's
    per-layout pruning; ``tiles=None`` is the spill-free choice.
    """

    block_m: int = 64
    block_n: int = 64
    block_d: int = 64
    block_t: int = 32
    num_warps: int = 8
    num_stages: int = 3
    candidates_per_split: int | None = None
    flatten: bool = False
    maxnreg: int | None = None
    symmetric: bool | None = None


# fp64 is a correctness path (an FMA dot, operands in registers): 32 x 32 x 16 tiles spill at most
# 16 bytes on sm_90 (column-major with text; 12 at D = 100 with cosine and text on triton 3.6),
# where 64 x 64 x 32 spilled up to 1.2 KB.
_FP64_CONFIG = TileConfig(block_m=32, block_n=32, block_d=16, block_t=16, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)  # a few values; a frozen TileConfig costs ~3 us to build per launch
def _wide_pass_config(block_m: int, fma_dot: bool, layout: int) -> TileConfig:
    """Tiles of the second pass for 64-bit labels that differ in their high words, a cold path.

    BLOCK_M is the main pass's (same row blocks). 128 rows take 8 warps, and an FMA dot (IEEE fp32
    embeddings or text) narrow chunks: on 4 warps, or with 32-wide chunks, this pass spilled
    100-1200 bytes. Operands that are not ALIGNED (see ``GPU_CONFIGS``) take the narrow chunks too:
    there the 16-bit ATL chunks spilled 8-80 bytes (triton 3.9: column-major operands, and rows that
    are not 16-byte aligned). Narrow chunks run on 8 warps: on 4, fp64 text (an fp64 FMA dot) next
    to 16-bit or fp32 embeddings spilled 8-84 bytes at 32 and 64 rows. (fp64 passes its fixed tiles
    instead.)
    """
    narrow = fma_dot or layout != ALIGNED
    return TileConfig(block_m=block_m, block_n=32 if narrow else 64, block_d=16 if narrow else 32,
                      block_t=16 if narrow else 32, num_warps=8 if narrow or block_m >= 128 else 4, num_stages=2)

# Small fixed tiles for Triton's CPU interpreter: cheap to run and they exercise multiple tiles,
# D chunks and splits at test sizes.
_INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, block_d=16, block_t=16, num_warps=1, num_stages=1,
                                 candidates_per_split=32)


@triton.jit
def _row_stat_block(
    x_ptr, out_ptr, R, C, stride_r, stride_c, block,
    INVERSE_NORM: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per row: squared norm, or inverse norm (0 for a zero row, whose cosine is defined as 0)."""
    # int64 indices: a column-major operand has stride_c up to 2**20 rows.
    rows = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    row_base = x_ptr + rows[:, None] * stride_r
    sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for c0 in tl.range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(row_base + cols.to(tl.int64)[None, :] * stride_c, mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
        x = x.to(ACC_DTYPE)
        sq += x * x
    total = tl.sum(sq, axis=1)
    if INVERSE_NORM:
        safe = tl.where(total > 0, total, 1.0)
        # Correctly rounded sqrt and division (fp32's `/` compiled to div.full.f32, 2 ulp): these
        # O(N) statistics scale every cosine of the row.
        total = tl.where(total > 0, ieee_div(1.0, ieee_sqrt(safe)), 0.0)
    tl.store(out_ptr + rows, total, mask=row_ok)


@triton.jit
def _row_stat_kernel(
    x_ptr, out_ptr, R, C, stride_r, stride_c,
    y_ptr, out_y_ptr, R_Y, C_Y, stride_yr, stride_yc,
    x_blocks, fill_ptr, fill_len, fill_value, fill2_ptr, fill2_len, fill2_value,
    INVERSE_NORM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INVERSE_NORM_Y: tl.constexpr, ACC_DTYPE_Y: tl.constexpr,
    FILL: tl.constexpr, FILL2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row statistics of up to two matrices in one launch: programs [0, x_blocks) take x, the rest y.

    FILL: the programs also set ``fill_ptr[0:fill_len]`` to ``fill_value`` (grid-stride), the
    scratch of the fused triplet loss that runs after the mining: one launch fewer per step. FILL2:
    the same for a second buffer (the symmetric mining's packed bests).
    """
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_R
    if FILL:
        for f0 in tl.range(pid * BLOCK_R, fill_len, step):
            spots = tl.arange(0, BLOCK_R).to(tl.int64) + f0
            tl.store(fill_ptr + spots, tl.full((BLOCK_R,), fill_value, tl.int32), mask=spots < fill_len)
    if FILL2:
        for f0 in tl.range(pid * BLOCK_R, fill2_len, step):
            spots = tl.arange(0, BLOCK_R).to(tl.int64) + f0
            tl.store(fill2_ptr + spots, tl.full((BLOCK_R,), fill2_value, tl.int32), mask=spots < fill2_len)
    if pid < x_blocks:
        _row_stat_block(x_ptr, out_ptr, R, C, stride_r, stride_c, pid, INVERSE_NORM, ACC_DTYPE, BLOCK_R, BLOCK_C)
    else:
        _row_stat_block(y_ptr, out_y_ptr, R_Y, C_Y, stride_yr, stride_yc, pid - x_blocks, INVERSE_NORM_Y, ACC_DTYPE_Y,
                        BLOCK_R, BLOCK_C)


@triton.jit
def _take_first_max(best, best_idx, key, n0):
    """Running (value, index) maximum per row over a (BLOCK_M, BLOCK_N) key tile starting at column n0.

    Strictly greater: an equal value in a later tile has a higher index and loses the tie; within
    the tile the lowest column wins.
    """
    tile_best, tile_at = tl.max(key, axis=1, return_indices=True, return_indices_tie_break_left=True)
    take = tile_best > best
    return tl.where(take, tile_best, best), tl.where(take, n0 + tile_at.to(tl.int32), best_idx)


@triton.jit
def _text_scalars(
    base_margin_hi, base_margin_lo, margin_scale_hi, margin_scale_lo, text_threshold_hi, text_threshold_lo,
    TEXT_ACC_DTYPE: tl.constexpr,
):
    """The margin terms and text threshold in the text's accumulation dtype, from the (hi, lo)
    fp32 pairs of ``split_scalar``: a compiled kernel gets a Python float as fp32, so fp64 text
    would otherwise compare against margins 6e-9 off (0.4 -> 0.4000000059604645); in fp32 the
    sum rounds back to hi, the value a plain float argument had."""
    base_margin = tl.cast(base_margin_hi, TEXT_ACC_DTYPE) + tl.cast(base_margin_lo, TEXT_ACC_DTYPE)
    margin_scale = tl.cast(margin_scale_hi, TEXT_ACC_DTYPE) + tl.cast(margin_scale_lo, TEXT_ACC_DTYPE)
    text_threshold = tl.cast(text_threshold_hi, TEXT_ACC_DTYPE) + tl.cast(text_threshold_lo, TEXT_ACC_DTYPE)
    return base_margin, margin_scale, text_threshold


@triton.jit
def _tile_keys(
    n0, rows,
    anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
    cand_ptr, cand_stat_ptr, cand_label_ptr, cand_text_ptr, cand_text_inv_ptr,
    M, D, T, tile_end,
    stride_ad, stride_cm, stride_cd, stride_atd, stride_ctm, stride_ctd,
    self_offset, base_margin, margin_scale, text_threshold,
    METRIC: tl.constexpr, HAS_SELF: tl.constexpr, NEED_TEXT: tl.constexpr, MARGIN_AWARE: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, LABEL_STRIDE: tl.constexpr, WIDE_LABELS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TEXT_DOT_DTYPE: tl.constexpr, TEXT_ACC_DTYPE: tl.constexpr, TEXT_INPUT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_T: tl.constexpr, MASK_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Selection keys of one candidate tile [n0, n0 + BLOCK_N): (positive key, negative key), each (BLOCK_M, BLOCK_N).

    Distances (and text similarities) of the tile, then the keys: d (squared for the Euclidean
    metrics) for positives and m - d (or -d) for negatives, -inf where a candidate is not a valid
    positive / negative. Only the last tile of a split masks its columns (``MASK_COLS``); interior
    tiles are mask-free.
    """
    cols = n0 + tl.arange(0, BLOCK_N)
    if MASK_COLS:
        col_ok = cols < tile_end
        # Columns past the end re-read the last candidate: loads need no mask, the keys do.
        cols = tl.minimum(cols, M - 1)
    cand_base = cand_ptr + cols.to(tl.int64)[:, None] * stride_cm

    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for d0 in tl.range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            a = tl.load(anchor_base + ds.to(tl.int64)[None, :] * stride_ad)
            b = tl.load(cand_base + ds.to(tl.int64)[None, :] * stride_cd)
        else:
            d_ok = ds[None, :] < D
            a = tl.load(anchor_base + ds.to(tl.int64)[None, :] * stride_ad, mask=d_ok, other=0.0)
            b = tl.load(cand_base + ds.to(tl.int64)[None, :] * stride_cd, mask=d_ok, other=0.0)
        # out_dtype names the accumulator's dtype: triton < 3.9 asserts on an fp64 accumulator without it.
        dot = tl.dot(a.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)), dot, input_precision=INPUT_PRECISION,
                     out_dtype=ACC_DTYPE)

    if METRIC == 3:  # dot: negative inner product
        dist = -dot
    else:
        # Per-column loads after the MMA loop (see the module docstring).
        cand_stat = tl.load(cand_stat_ptr + cols).to(ACC_DTYPE)
        if METRIC == 2:  # cosine: stats hold inverse norms
            dist = 1.0 - dot * anchor_stat[:, None] * cand_stat[None, :]
        else:  # (sq)euclidean: squared distance, the selection key of positives (same order)
            # propagate_nan: the default maximum (maxnum) turns a NaN key into 0, the nearest
            # negative, where the strict comparisons must see NaN and never pick it.
            dist = tl.maximum(anchor_stat[:, None] + cand_stat[None, :] - 2.0 * dot, 0.0,
                              propagate_nan=tl.PropagateNan.ALL)

    cand_label = tl.load(cand_label_ptr + cols * LABEL_STRIDE)
    if WIDE_LABELS:
        cand_label_hi = tl.load(cand_label_ptr + cols * LABEL_STRIDE + 1)
    same_label = anchor_label[:, None] == cand_label[None, :]
    if WIDE_LABELS:
        same_label = same_label & (anchor_label_hi[:, None] == cand_label_hi[None, :])
    pos_ok = same_label
    neg_ok = ~same_label
    if MASK_COLS:
        pos_ok = pos_ok & col_ok[None, :]
        neg_ok = neg_ok & col_ok[None, :]
    if HAS_SELF:
        # Anchor i is candidate (self_offset + i) % M: a batch may wrap around the end of a ring
        # memory. One compare per row, not per element.
        self_col = rows + self_offset
        self_col = tl.where(self_col >= M, self_col - M, self_col)
        pos_ok = pos_ok & (cols[None, :] != self_col[:, None])

    if NEED_TEXT:
        sim = tl.zeros((BLOCK_M, BLOCK_N), dtype=TEXT_ACC_DTYPE)
        cand_text_base = cand_text_ptr + cols.to(tl.int64)[:, None] * stride_ctm
        for t0 in tl.range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            if EVEN_T:
                ta = tl.load(anchor_text_base + ts.to(tl.int64)[None, :] * stride_atd)
                tb = tl.load(cand_text_base + ts.to(tl.int64)[None, :] * stride_ctd)
            else:
                t_ok = ts[None, :] < T
                ta = tl.load(anchor_text_base + ts.to(tl.int64)[None, :] * stride_atd, mask=t_ok, other=0.0)
                tb = tl.load(cand_text_base + ts.to(tl.int64)[None, :] * stride_ctd, mask=t_ok, other=0.0)
            sim = tl.dot(ta.to(TEXT_DOT_DTYPE), tl.trans(tb.to(TEXT_DOT_DTYPE)), sim,
                         input_precision=TEXT_INPUT_PRECISION, out_dtype=TEXT_ACC_DTYPE)
        cand_text_inv = tl.load(cand_text_inv_ptr + cols).to(TEXT_ACC_DTYPE)
        sim = sim * anchor_text_inv[:, None] * cand_text_inv[None, :]
        if HAS_THRESHOLD:
            neg_ok = neg_ok & (sim < text_threshold)
    if MARGIN_AWARE:
        margin = (base_margin + margin_scale * 0.5 * (1.0 - sim)).to(ACC_DTYPE)
        # m - d is not monotone in d^2, so the margin-aware key needs the true distance.
        if METRIC == 1:
            neg_key = margin - tl.sqrt(dist)
        else:
            neg_key = margin - dist
    else:
        # A constant margin: the hardest negative is simply the closest one.
        neg_key = -dist

    # NaN keys become -inf here, not in the argmax: the interpreter's argmax skips NaN
    # (np.nanargmax), a GPU's folds with `a > b or tie`, under which a NaN on the right wins. A
    # NaN in a tile's last column then took the tile, and its other candidates were dropped.
    # maximum(key, -inf) is maxnum, NaN-dropping (PTX max.f32: NaN -> -inf): one instruction per
    # key, where `key == key` masks cost registers (a 16-byte spill of 128 x 64 fp16 on triton 3.6).
    return (tl.maximum(tl.where(pos_ok, dist, float("-inf")), float("-inf")),
            tl.maximum(tl.where(neg_ok, neg_key, float("-inf")), float("-inf")))


@triton.jit
def _mine_hardest_kernel(
    anchor_ptr, cand_ptr, anchor_stat_ptr, cand_stat_ptr,
    anchor_label_ptr, cand_label_ptr,
    anchor_text_ptr, cand_text_ptr, anchor_text_inv_ptr, cand_text_inv_ptr,
    pos_val_ptr, pos_idx_ptr, neg_val_ptr, neg_idx_ptr,
    N, M, D, T,
    stride_am, stride_ad, stride_cm, stride_cd,
    stride_atm, stride_atd, stride_ctm, stride_ctd,
    self_offset, candidates_per_split,
    base_margin_hi, base_margin_lo, margin_scale_hi, margin_scale_lo, text_threshold_hi, text_threshold_lo,
    # Autotuning keys only: the tiles that fill the GPU depend on the problem size, and the tiles
    # that compile without spills on the operands' layout (layout_class: STRIDED, ALIGNED, UNALIGNED
    # or MIXED; see GPU_CONFIGS).
    n_bucket, m_bucket, layout_class,
    METRIC: tl.constexpr, HAS_SELF: tl.constexpr, NEED_TEXT: tl.constexpr, MARGIN_AWARE: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    STORE_VALUES: tl.constexpr, LABEL_WORDS: tl.constexpr, WIDE_PASS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TEXT_DOT_DTYPE: tl.constexpr, TEXT_ACC_DTYPE: tl.constexpr, TEXT_INPUT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_T: tl.constexpr, EVEN_N: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (row blocks, splits). Labels are int32 words: LABEL_WORDS = 1 for int32 labels, 2 for
    int64 labels read as (low, high) little-endian word pairs; with 2, a program runs in exactly one
    of the two passes (WIDE_PASS False / True). EVEN_N: every split is a whole number of BLOCK_N
    tiles (no tile masks its columns)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    base_margin, margin_scale, text_threshold = _text_scalars(
        base_margin_hi, base_margin_lo, margin_scale_hi, margin_scale_lo, text_threshold_hi, text_threshold_lo,
        TEXT_ACC_DTYPE)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    # Out-of-range rows re-read the last anchor so that the hot loop needs no row mask; their
    # results are never stored.
    rows_safe = tl.minimum(rows, N - 1)
    anchor_base = anchor_ptr + rows_safe.to(tl.int64)[:, None] * stride_am
    anchor_label = tl.load(anchor_label_ptr + rows_safe * LABEL_WORDS)
    anchor_label_hi = anchor_label  # placeholder unless labels are int64
    anchor_stat = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    if METRIC != 3:
        anchor_stat = tl.load(anchor_stat_ptr + rows_safe).to(ACC_DTYPE)
    anchor_text_base = anchor_base  # placeholders unless the text is read
    anchor_text_inv = anchor_stat.to(TEXT_ACC_DTYPE)
    if NEED_TEXT:
        anchor_text_base = anchor_text_ptr + rows_safe.to(tl.int64)[:, None] * stride_atm
        anchor_text_inv = tl.load(anchor_text_inv_ptr + rows_safe).to(TEXT_ACC_DTYPE)

    best_pos = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    best_pos_idx = tl.full((BLOCK_M,), -1, tl.int32)
    best_neg = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    best_neg_idx = tl.full((BLOCK_M,), -1, tl.int32)

    split_start = split * candidates_per_split
    split_end = tl.minimum(split_start + candidates_per_split, M)
    if EVEN_N:
        full_end = split_end
    else:
        full_end = split_start + (split_end - split_start) // BLOCK_N * BLOCK_N

    # 64-bit labels: when every label this program sees has the same high word (any label set
    # within 31 bits), comparing low words is exact and costs half the registers. The main pass
    # (WIDE_PASS = False) mines those programs; the others are left to a second launch of the
    # kernel (WIDE_PASS = True) that compares both words, so that the hot loop never carries the
    # register cost of the rare case.
    run = True
    if LABEL_WORDS == 2:
        anchor_label_hi = tl.load(anchor_label_ptr + rows_safe * 2 + 1)
        hi_min = tl.min(anchor_label_hi, axis=0)
        hi_max = tl.max(anchor_label_hi, axis=0)
        for c0 in tl.range(split_start, split_end, BLOCK_N):
            cs = c0 + tl.arange(0, BLOCK_N)
            cand_hi = tl.load(cand_label_ptr + cs * 2 + 1, mask=cs < split_end, other=hi_min)
            hi_min = tl.minimum(hi_min, tl.min(cand_hi, axis=0))
            hi_max = tl.maximum(hi_max, tl.max(cand_hi, axis=0))
        if WIDE_PASS:
            run = hi_min != hi_max
        else:
            run = hi_min == hi_max

    if run:
        if WIDE_PASS:
            for n0 in tl.range(split_start, split_end, BLOCK_N):
                pos_key, neg_key = _tile_keys(
                    n0, rows,
                    anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
                    cand_ptr, cand_stat_ptr, cand_label_ptr, cand_text_ptr, cand_text_inv_ptr,
                    M, D, T, split_end,
                    stride_ad, stride_cm, stride_cd, stride_atd, stride_ctm, stride_ctd,
                    self_offset, base_margin, margin_scale, text_threshold,
                    METRIC, HAS_SELF, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, True,
                    DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
                    EVEN_D, EVEN_T, True,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_T,
                )
                best_pos, best_pos_idx = _take_first_max(best_pos, best_pos_idx, pos_key, n0)
                best_neg, best_neg_idx = _take_first_max(best_neg, best_neg_idx, neg_key, n0)
        else:
            for n0 in tl.range(split_start, full_end, BLOCK_N, flatten=FLATTEN):
                pos_key, neg_key = _tile_keys(
                    n0, rows,
                    anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
                    cand_ptr, cand_stat_ptr, cand_label_ptr, cand_text_ptr, cand_text_inv_ptr,
                    M, D, T, split_end,
                    stride_ad, stride_cm, stride_cd, stride_atd, stride_ctm, stride_ctd,
                    self_offset, base_margin, margin_scale, text_threshold,
                    METRIC, HAS_SELF, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, False,
                    DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
                    EVEN_D, EVEN_T, False,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_T,
                )
                best_pos, best_pos_idx = _take_first_max(best_pos, best_pos_idx, pos_key, n0)
                best_neg, best_neg_idx = _take_first_max(best_neg, best_neg_idx, neg_key, n0)
            if not EVEN_N:
                if full_end < split_end:
                    pos_key, neg_key = _tile_keys(
                        full_end, rows,
                        anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
                        cand_ptr, cand_stat_ptr, cand_label_ptr, cand_text_ptr, cand_text_inv_ptr,
                        M, D, T, split_end,
                        stride_ad, stride_cm, stride_cd, stride_atd, stride_ctm, stride_ctd,
                        self_offset, base_margin, margin_scale, text_threshold,
                        METRIC, HAS_SELF, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, False,
                        DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
                        EVEN_D, EVEN_T, True,
                        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_T,
                    )
                    best_pos, best_pos_idx = _take_first_max(best_pos, best_pos_idx, pos_key, full_end)
                    best_neg, best_neg_idx = _take_first_max(best_neg, best_neg_idx, neg_key, full_end)

        out_offsets = split.to(tl.int64) * N + rows
        tl.store(pos_idx_ptr + out_offsets, best_pos_idx.to(pos_idx_ptr.dtype.element_ty), mask=row_ok)
        tl.store(neg_idx_ptr + out_offsets, best_neg_idx.to(neg_idx_ptr.dtype.element_ty), mask=row_ok)
        if STORE_VALUES:
            tl.store(pos_val_ptr + out_offsets, best_pos, mask=row_ok)
            tl.store(neg_val_ptr + out_offsets, best_neg, mask=row_ok)


# ----------------------------------------------------------------------------- symmetric mining
#
# When the anchors are the candidates (a training batch mined against itself) the distance and
# text-similarity matrices are symmetric: tile (I, J) holds tile (J, I) transposed. The symmetric
# kernel computes only the tiles with J >= I, half the MMA work, and each off-diagonal tile serves
# both sides: its row maxima update the anchors of block I, its column maxima the anchors of block
# J. Results meet in global memory as packed (key, index) words under an unsigned atomic minimum,
# which keeps the reference's rule (largest key, lowest index on ties) whatever order the programs
# run in, and is idempotent (autotuning reruns leave the same answer).

# All ones: the packed word of "no candidate"; every real candidate packs below it.
_NO_BEST = -1


@triton.jit
def _pack_best(value, index):
    """(key, candidate index) as an int64 whose unsigned order puts larger keys first, then lower indices.

    The high word is the fp32 key's bits mapped to an unsigned order that decreases with the key;
    the low word is the index (< 2**31). ``value`` must be fp32.
    """
    value = tl.where(value == 0.0, 0.0, value)  # -0.0 and +0.0 must pack alike: ties go by index
    bits = value.to(tl.int32, bitcast=True)
    inverted = tl.where(bits >= 0, 0x7FFFFFFF - bits, bits)
    # The shift drops the sign extension of the high word.
    return (inverted.to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def unpack_best_index(packed):
    """Candidate index of a packed best (int64), -1 for ``_NO_BEST``."""
    return tl.where(packed == -1, -1, packed & 0x7FFFFFFF)


@triton.jit
def _mine_symmetric_segment(
    row_block, j_lo, j_hi,
    x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr, pos_ptr, neg_ptr,
    N, D, T,
    stride_m, stride_d, stride_tm, stride_td,
    base_margin, margin_scale, text_threshold,
    METRIC: tl.constexpr, NEED_TEXT: tl.constexpr, MARGIN_AWARE: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    LABEL_WORDS: tl.constexpr, WIDE_PASS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TEXT_DOT_DTYPE: tl.constexpr, TEXT_ACC_DTYPE: tl.constexpr, TEXT_INPUT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_T: tl.constexpr, EVEN_N: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Tiles (row_block, J) for J in [j_lo, j_hi), with j_lo >= row_block: row maxima for the
    anchors of row_block (published once, at the end), column maxima for those of block J."""
    # Block indices come through branches and loop-carried values: clamping them to [0, blocks)
    # (a no-op) states the bound that keeps every 32-bit offset below 2**31 where the offset
    # analysis of tests/ops/test_sm90_compile.py can see it.
    last_block = tl.cdiv(N, BLOCK) - 1
    row_block = tl.minimum(tl.maximum(row_block, 0), last_block)
    j_lo = tl.minimum(tl.maximum(j_lo, 0), last_block + 1)
    j_hi = tl.minimum(tl.maximum(j_hi, 0), last_block + 1)
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    rows_safe = tl.minimum(rows, N - 1)
    anchor_base = x_ptr + rows_safe.to(tl.int64)[:, None] * stride_m
    anchor_label = tl.load(label_ptr + rows_safe * LABEL_WORDS)
    anchor_label_hi = anchor_label
    anchor_stat = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    if METRIC != 3:
        anchor_stat = tl.load(stat_ptr + rows_safe).to(ACC_DTYPE)
    anchor_text_base = anchor_base
    anchor_text_inv = anchor_stat.to(TEXT_ACC_DTYPE)
    if NEED_TEXT:
        anchor_text_base = text_ptr + rows_safe.to(tl.int64)[:, None] * stride_tm
        anchor_text_inv = tl.load(text_inv_ptr + rows_safe).to(TEXT_ACC_DTYPE)

    # 64-bit labels: as in _mine_hardest_kernel, a segment whose labels share one high word is
    # mined by the main pass on low words alone, any other by the wide pass. Both passes scan the
    # same rows and columns, so each segment runs in exactly one of them.
    run = True
    if LABEL_WORDS == 2:
        anchor_label_hi = tl.load(label_ptr + rows_safe * 2 + 1)
        hi_min = tl.min(anchor_label_hi, axis=0)
        hi_max = tl.max(anchor_label_hi, axis=0)
        col_end = tl.minimum(j_hi * BLOCK, N)
        for c0 in tl.range(j_lo * BLOCK, col_end, BLOCK):
            cs = c0 + tl.arange(0, BLOCK)
            cand_hi = tl.load(label_ptr + cs * 2 + 1, mask=cs < col_end, other=hi_min)
            hi_min = tl.minimum(hi_min, tl.min(cand_hi, axis=0))
            hi_max = tl.maximum(hi_max, tl.max(cand_hi, axis=0))
        if WIDE_PASS:
            run = hi_min != hi_max
        else:
            run = hi_min == hi_max

    if run:
        best_pos = tl.full((BLOCK,), float("-inf"), ACC_DTYPE)
        best_pos_idx = tl.full((BLOCK,), -1, tl.int32)
        best_neg = tl.full((BLOCK,), float("-inf"), ACC_DTYPE)
        best_neg_idx = tl.full((BLOCK,), -1, tl.int32)
        j = j_lo
        if j == row_block:
            # The diagonal tile holds both orders of every pair in the block: rows only. It also
            # excludes each anchor from its own positives, and masks columns (it may be the last,
            # partial block).
            pos_key, neg_key = _tile_keys(
                row_block * BLOCK, rows,
                anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
                x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr,
                N, D, T, N,
                stride_d, stride_m, stride_d, stride_td, stride_tm, stride_td,
                0, base_margin, margin_scale, text_threshold,
                METRIC, True, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, WIDE_PASS,
                DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
                EVEN_D, EVEN_T, True,
                BLOCK, BLOCK, BLOCK_D, BLOCK_T,
            )
            best_pos, best_pos_idx = _take_first_max(best_pos, best_pos_idx, pos_key, row_block * BLOCK)
            best_neg, best_neg_idx = _take_first_max(best_neg, best_neg_idx, neg_key, row_block * BLOCK)
            j += 1
        # Off-diagonal tiles have row_block < J, so their rows are a whole block: only a partial
        # last block of columns needs masks.
        if EVEN_N:
            interior_end = j_hi
        else:
            interior_end = tl.minimum(j_hi, N // BLOCK)
        for jj in tl.range(j, interior_end, flatten=FLATTEN):
            best_pos, best_pos_idx, best_neg, best_neg_idx = _mine_symmetric_tile(
                jj, row_block, rows, best_pos, best_pos_idx, best_neg, best_neg_idx,
                anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
                x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr, pos_ptr, neg_ptr,
                N, D, T, stride_m, stride_d, stride_tm, stride_td,
                base_margin, margin_scale, text_threshold,
                METRIC, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, WIDE_PASS,
                DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
                EVEN_D, EVEN_T, False,
                BLOCK, BLOCK_D, BLOCK_T,
            )
        if not EVEN_N:
            last = tl.maximum(j, interior_end)
            if last < j_hi:
                best_pos, best_pos_idx, best_neg, best_neg_idx = _mine_symmetric_tile(
                    last, row_block, rows, best_pos, best_pos_idx, best_neg, best_neg_idx,
                    anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
                    x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr, pos_ptr, neg_ptr,
                    N, D, T, stride_m, stride_d, stride_tm, stride_td,
                    base_margin, margin_scale, text_threshold,
                    METRIC, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, WIDE_PASS,
                    DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
                    EVEN_D, EVEN_T, True,
                    BLOCK, BLOCK_D, BLOCK_T,
                )
        found = row_ok & (best_pos_idx >= 0)
        tl.atomic_min(pos_ptr + rows, _pack_best(best_pos, best_pos_idx).to(tl.uint64, bitcast=True), mask=found,
                      sem="relaxed")
        found = row_ok & (best_neg_idx >= 0)
        tl.atomic_min(neg_ptr + rows, _pack_best(best_neg, best_neg_idx).to(tl.uint64, bitcast=True), mask=found,
                      sem="relaxed")


@triton.jit
def _mine_symmetric_tile(
    col_block, row_block, rows, best_pos, best_pos_idx, best_neg, best_neg_idx,
    anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
    x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr, pos_ptr, neg_ptr,
    N, D, T, stride_m, stride_d, stride_tm, stride_td,
    base_margin, margin_scale, text_threshold,
    METRIC: tl.constexpr, NEED_TEXT: tl.constexpr, MARGIN_AWARE: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    LABEL_WORDS: tl.constexpr, WIDE_PASS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TEXT_DOT_DTYPE: tl.constexpr, TEXT_ACC_DTYPE: tl.constexpr, TEXT_INPUT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_T: tl.constexpr, MASK_COLS: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """An off-diagonal tile (row_block < col_block): the row maxima in registers, the column maxima
    to memory (the candidates of this tile are anchors too, and the tile's rows their candidates)."""
    col_block = tl.minimum(tl.maximum(col_block, 0), tl.cdiv(N, BLOCK) - 1)  # see _mine_symmetric_segment
    n0 = col_block * BLOCK
    pos_key, neg_key = _tile_keys(
        n0, rows,
        anchor_base, anchor_label, anchor_label_hi, anchor_stat, anchor_text_base, anchor_text_inv,
        x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr,
        N, D, T, N,
        stride_d, stride_m, stride_d, stride_td, stride_tm, stride_td,
        0, base_margin, margin_scale, text_threshold,
        METRIC, False, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, WIDE_PASS,
        DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
        EVEN_D, EVEN_T, MASK_COLS,
        BLOCK, BLOCK, BLOCK_D, BLOCK_T,
    )
    best_pos, best_pos_idx = _take_first_max(best_pos, best_pos_idx, pos_key, n0)
    best_neg, best_neg_idx = _take_first_max(best_neg, best_neg_idx, neg_key, n0)
    cols = n0 + tl.arange(0, BLOCK)
    row0 = row_block * BLOCK
    col_best, col_at = tl.max(pos_key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    found = col_best > float("-inf")
    if MASK_COLS:
        found = found & (cols < N)
    tl.atomic_min(pos_ptr + cols, _pack_best(col_best, row0 + col_at.to(tl.int32)).to(tl.uint64, bitcast=True),
                  mask=found, sem="relaxed")
    col_best, col_at = tl.max(neg_key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    found = col_best > float("-inf")
    if MASK_COLS:
        found = found & (cols < N)
    tl.atomic_min(neg_ptr + cols, _pack_best(col_best, row0 + col_at.to(tl.int32)).to(tl.uint64, bitcast=True),
                  mask=found, sem="relaxed")
    return best_pos, best_pos_idx, best_neg, best_neg_idx


@triton.jit
def _mine_symmetric_kernel(
    x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr, pos_ptr, neg_ptr,
    N, D, T,
    stride_m, stride_d, stride_tm, stride_td,
    base_margin_hi, base_margin_lo, margin_scale_hi, margin_scale_lo, text_threshold_hi, text_threshold_lo,
    n_bucket, layout_class,  # autotuning keys only, as in _mine_hardest_kernel
    METRIC: tl.constexpr, NEED_TEXT: tl.constexpr, MARGIN_AWARE: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    LABEL_WORDS: tl.constexpr, WIDE_PASS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TEXT_DOT_DTYPE: tl.constexpr, TEXT_ACC_DTYPE: tl.constexpr, TEXT_INPUT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_T: tl.constexpr, EVEN_N: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (pairs of row blocks, splits). Pair q joins row block q (tiles J = q .. B - 1) with row
    block B - 1 - q (tiles J = B - 1 - q .. B - 1), B = cdiv(N, BLOCK) blocks: B + 1 tiles for
    every pair (the middle block of an odd B stands alone), so equal splits of a pair's tile list
    balance the grid. A program's share is at most one segment of each of the two rows.
    ``pos_ptr`` / ``neg_ptr``: (N,) uint64 packed bests, all ones on entry."""
    pair = tl.program_id(0)
    split = tl.program_id(1)
    base_margin, margin_scale, text_threshold = _text_scalars(
        base_margin_hi, base_margin_lo, margin_scale_hi, margin_scale_lo, text_threshold_hi, text_threshold_lo,
        TEXT_ACC_DTYPE)
    blocks = tl.cdiv(N, BLOCK)
    first_count = blocks - pair
    second_row = blocks - 1 - pair
    second_count = tl.where(second_row > pair, pair + 1, 0)
    per_split = tl.cdiv(first_count + second_count, tl.num_programs(1))
    lo = split * per_split
    hi = tl.minimum(lo + per_split, first_count + second_count)
    for segment in tl.range(0, 2):
        if segment == 0:
            row_block = pair
            start = lo
            end = tl.minimum(hi, first_count)
        else:
            row_block = second_row
            start = tl.maximum(lo, first_count) - first_count
            end = hi - first_count
        if start < end:
            _mine_symmetric_segment(
                row_block, row_block + start, row_block + end,
                x_ptr, stat_ptr, label_ptr, text_ptr, text_inv_ptr, pos_ptr, neg_ptr,
                N, D, T, stride_m, stride_d, stride_tm, stride_td,
                base_margin, margin_scale, text_threshold,
                METRIC, NEED_TEXT, MARGIN_AWARE, HAS_THRESHOLD, LABEL_WORDS, WIDE_PASS,
                DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TEXT_DOT_DTYPE, TEXT_ACC_DTYPE, TEXT_INPUT_PRECISION,
                EVEN_D, EVEN_T, EVEN_N, FLATTEN,
                BLOCK, BLOCK_D, BLOCK_T,
            )


@triton.jit
def _unpack_bests_kernel(pos_ptr, neg_ptr, pos_out_ptr, neg_out_ptr, N, BLOCK: tl.constexpr):
    """Packed bests (int64) to candidate indices, -1 for none."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    tl.store(pos_out_ptr + rows, unpack_best_index(tl.load(pos_ptr + rows, mask=row_ok)), mask=row_ok)
    tl.store(neg_out_ptr + rows, unpack_best_index(tl.load(neg_ptr + rows, mask=row_ok)), mask=row_ok)


@triton.jit
def merge_split_bests(
    pos_val_ptr, pos_idx_ptr, neg_val_ptr, neg_idx_ptr, rows, row_ok, N, SPLITS,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """(positive, negative) int64 candidate index per row of ``rows`` from the (SPLITS, N) per-split
    bests; -1 where no split found one. Shared by the merge kernel and the fused triplet loss."""
    best_pos = tl.full((BLOCK,), float("-inf"), ACC_DTYPE)
    best_pos_idx = tl.full((BLOCK,), -1, tl.int64)
    best_neg = tl.full((BLOCK,), float("-inf"), ACC_DTYPE)
    best_neg_idx = tl.full((BLOCK,), -1, tl.int64)
    # Splits hold increasing candidate ranges: visiting them in order with a strict comparison
    # keeps the lowest index among equal values.
    rows64 = rows.to(tl.int64)
    # 64-bit: SPLITS * N can pass 2**31 (N up to 2**20 anchors, thousands of splits). A cast,
    # not .to: one anchor (N == 1) compiles as the constant 1, which has no methods.
    n64 = tl.cast(N, tl.int64)
    for s in tl.range(0, SPLITS):
        offsets = rows64 + s * n64
        value = tl.load(pos_val_ptr + offsets, mask=row_ok, other=float("-inf"))
        index = tl.load(pos_idx_ptr + offsets, mask=row_ok, other=-1).to(tl.int64)
        take = value > best_pos
        best_pos = tl.where(take, value, best_pos)
        best_pos_idx = tl.where(take, index, best_pos_idx)
        value = tl.load(neg_val_ptr + offsets, mask=row_ok, other=float("-inf"))
        index = tl.load(neg_idx_ptr + offsets, mask=row_ok, other=-1).to(tl.int64)
        take = value > best_neg
        best_neg = tl.where(take, value, best_neg)
        best_neg_idx = tl.where(take, index, best_neg_idx)
    return best_pos_idx, best_neg_idx


@triton.jit
def _merge_splits_kernel(
    pos_val_ptr, pos_idx_ptr, neg_val_ptr, neg_idx_ptr, pos_out_ptr, neg_out_ptr,
    N, SPLITS, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    best_pos_idx, best_neg_idx = merge_split_bests(
        pos_val_ptr, pos_idx_ptr, neg_val_ptr, neg_idx_ptr, rows, row_ok, N, SPLITS, ACC_DTYPE, BLOCK
    )
    tl.store(pos_out_ptr + rows, best_pos_idx, mask=row_ok)
    tl.store(neg_out_ptr + rows, best_neg_idx, mask=row_ok)


def _sm90(block_m: int, block_n: int, block_d: int, num_warps: int, num_stages: int, maxnreg: int | None) -> TileConfig:
    return TileConfig(block_m=block_m, block_n=block_n, block_d=block_d, block_t=block_d, num_warps=num_warps,
                      num_stages=num_stages, flatten=True, maxnreg=maxnreg)


# Layout classes of a call (the ``layout_class`` autotuning key), over every operand the kernel
# reads (embeddings, and text when read). STRIDED: some operand has a feature stride other than 1
# (e.g. column-major). ALIGNED: unit feature strides, and every base pointer and row stride is
# divisible by 16 (bytes for the pointer, elements for the stride: what Triton specialises on), so
# rows load in 16-byte vectors. UNALIGNED: unit feature strides, but some base pointer or row stride
# is not (a column slice ``big[:, 1:D + 1]``, a row pitch such as D + 8, or a D such as 100): Triton
# cannot prove 16-byte rows and loads element by element. MIXED: some operands STRIDED, others
# UNALIGNED. True / False read as ALIGNED / STRIDED.
STRIDED, ALIGNED, UNALIGNED, MIXED = 0, 1, 2, 3

# Where an autotuned config may run: over its whole scope (int32 and int64 labels, every metric)
# each compiles for sm_90a without register spills (ptxas -v, triton 3.6 and 3.9), except that the
# IEEE fp32 lists keep up to 28 bytes (an FMA dot's operands live in registers).
# ANY_LAYOUT: any layout class and any D. ROW_MAJOR: ALIGNED or UNALIGNED; strided operands spill
# there (the loads are transposed through registers). DENSE: ALIGNED and D a multiple of BLOCK_D;
# the masked D loop keeps its masks live across the pipeline stages and spills there, and on
# UNALIGNED rows these tiles spilled 20-680 bytes. ALIGNED_OR_STRIDED: ALIGNED or STRIDED, any D
# (16-bit batch-hard 64 x 64 x 64 spilled 8 bytes on UNALIGNED rows; compile_sm90's "slice"
# layout). MIXED takes ANY_LAYOUT only.
ANY_LAYOUT = "any"
ROW_MAJOR = "row_major"
DENSE = "dense"
ALIGNED_OR_STRIDED = "aligned_or_strided"


# The autotuned GPU configs, per kind ("batch_hard": no text read; "atl": the text GEMM too) and
# operand width ("16bit": fp16/bf16; "tf32": fp32 operands on the tensor cores, twice the shared
# memory per tile; "fp32": IEEE fp32, an FMA dot whose operands live in registers, hence the
# narrow BLOCK_D; fp64 text next to 16-bit or fp32 embeddings, an FMA text dot, takes it too).
# Every list has ANY_LAYOUT entries, so pruning never empties it. Programs per SM
# (registers and shared memory, H100) are at least 2 except where marked 1: two resident programs
# let one's epilogue overlap the other's MMA loop. The 8-warp maxnreg=128 tiles that issue 14
# suggested spill 4-880 bytes (12 B on the headline bf16 batch-hard case with int64 labels under
# triton 3.9; 100-600 B with text), so the 2-program 128-row tiles run on 4 warps instead.
GPU_CONFIGS: dict[tuple[str, str], tuple[tuple[str, TileConfig], ...]] = {
    ("batch_hard", "16bit"): (
        (DENSE, _sm90(128, 64, 64, 4, 3, None)),       # 2 programs per SM
        (DENSE, _sm90(64, 128, 32, 4, 4, None)),       # 2
        (ALIGNED_OR_STRIDED, _sm90(64, 64, 64, 4, 4, None)),  # 2-3
        (ANY_LAYOUT, _sm90(128, 64, 64, 8, 3, None)),  # 1
        (ANY_LAYOUT, _sm90(64, 128, 64, 8, 3, None)),  # 1
    ),
    ("batch_hard", "tf32"): (
        (DENSE, _sm90(128, 64, 32, 4, 3, None)),       # 2
        (DENSE, _sm90(64, 128, 32, 4, 4, None)),       # 2
        (ANY_LAYOUT, _sm90(64, 64, 16, 4, 3, None)),   # 2-3
        (ANY_LAYOUT, _sm90(128, 64, 32, 8, 3, None)),  # 1
        (ANY_LAYOUT, _sm90(64, 64, 32, 8, 3, None)),   # 1-2
    ),
    ("batch_hard", "fp32"): (
        (ANY_LAYOUT, _sm90(32, 64, 16, 4, 3, None)),   # 3-4
        (ANY_LAYOUT, _sm90(64, 32, 16, 4, 3, None)),   # 3-4
        (ROW_MAJOR, _sm90(64, 64, 16, 8, 3, None)),    # 1-2
    ),
    # Column-major embeddings and text (both) spilled 36-940 bytes with the first three (20-48 with
    # 64 x 64 x 32), unaligned rows 52-1000 bytes: they are for aligned rows only.
    ("atl", "16bit"): (
        (DENSE, _sm90(64, 64, 64, 4, 4, None)),        # 2
        (DENSE, _sm90(64, 64, 32, 4, 3, None)),        # 2
        (DENSE, _sm90(128, 64, 64, 8, 3, None)),       # 1
        (ANY_LAYOUT, _sm90(64, 64, 32, 8, 3, None)),   # 1
        # 64 x 128 x 64 on 8 warps spilled 8-20 bytes with fp32 text under IEEE precision.
    ),
    # With column-major embeddings and/or text, 64 x 64 x 32 on 8 warps spilled 12-132 bytes and
    # 128 x 64 x 32 48-800 (40 with unaligned rows); 64 x 64 x 16 on 8 warps, or on 4 with 2
    # stages, none.
    ("atl", "tf32"): (
        (ROW_MAJOR, _sm90(64, 64, 16, 4, 3, None)),    # 2
        (ANY_LAYOUT, _sm90(64, 64, 16, 4, 2, None)),   # 2
        (ANY_LAYOUT, _sm90(64, 64, 16, 8, 3, None)),   # 1
        (ROW_MAJOR, _sm90(64, 64, 32, 8, 3, None)),    # 1
        (DENSE, _sm90(128, 64, 32, 8, 3, None)),       # 1
    ),
    ("atl", "fp32"): (
        (ANY_LAYOUT, _sm90(64, 64, 16, 8, 3, None)),   # 1
        # 12 bytes at D = 100 (unaligned rows) with fp16 embeddings and IEEE fp32 text (triton 3.9).
        (DENSE, _sm90(32, 64, 16, 4, 3, None)),        # 2
        (ROW_MAJOR, _sm90(64, 32, 16, 4, 3, None)),    # 2
    ),
}


def config_fits(scope: str, block_d: int, d: int, layout: int) -> bool:
    """Whether a config of this scope compiles without spills for operands of this layout class
    (STRIDED, ALIGNED, UNALIGNED or MIXED; a bool reads as ALIGNED / STRIDED) and D (see ``GPU_CONFIGS``)."""
    layout = int(layout)
    if scope == ANY_LAYOUT:
        return True
    if scope == ALIGNED_OR_STRIDED:
        return layout in (ALIGNED, STRIDED)
    if scope == ROW_MAJOR:
        return layout in (ALIGNED, UNALIGNED)
    return layout == ALIGNED and d % block_d == 0  # DENSE


def rows_aligned(*operands: torch.Tensor) -> bool:
    """Whether every operand's rows are 16-byte aligned as Triton specialises on it: the base pointer
    divisible by 16 bytes, the row stride by 16 elements."""
    for x in operands:  # a loop, not all(<generator>): called on every launch of a host-bound step
        if x.data_ptr() % 16 or x.stride(0) % 16:
            return False
    return True


def _layout_class(*operands: torch.Tensor) -> int:
    """STRIDED, ALIGNED, UNALIGNED or MIXED (see ``GPU_CONFIGS``) for the (2-D) operands the kernel reads."""
    strided = unaligned = False
    for x in operands:
        row_stride, column_stride = x.stride()
        if column_stride != 1:
            strided = True
        elif x.data_ptr() % 16 or row_stride % 16:  # not rows_aligned(x)
            unaligned = True
    if strided:
        return MIXED if unaligned else STRIDED
    return UNALIGNED if unaligned else ALIGNED


def fit_block(block: int, size: int) -> int:
    """``block`` columns, cut down to the power of two that covers ``size`` (16 at least: the
    smallest ``tl.dot``), so that a narrow D or T is not padded to a wide chunk."""
    return min(block, max(16, next_power_of_2(size)))


def _text_block(args: dict) -> int:
    return fit_block(args["BLOCK_T"], args["T"])


def _scoped_configs(entries: tuple[tuple[str, TileConfig], ...], tile_kwargs):
    """(triton configs, early prune) for a (scope, TileConfig) table: ``tile_kwargs(c)`` names a
    config's block constexprs; the prune keeps the configs whose scope covers the call
    (:func:`config_fits`)."""
    configs, scopes = [], {}
    for scope, c in entries:
        config = triton.Config({**tile_kwargs(c), "BLOCK_D": c.block_d, "BLOCK_T": c.block_t, "FLATTEN": c.flatten},
                               num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg)
        configs.append(config)
        scopes[id(config)] = scope

    def prune(candidates: list, named_args: dict, **kwargs) -> list:
        layout = int(named_args["layout_class"])
        return [c for c in candidates
                if config_fits(scopes[id(c)], c.kwargs["BLOCK_D"], named_args["D"], layout)]

    return configs, prune


def _autotuned(entries: tuple[tuple[str, TileConfig], ...]):
    """The mining kernel autotuned over ``entries`` per size bucket (anchors, candidates), D, T,
    metric and layout; configs are pruned to those whose scope covers the call (:func:`config_fits`)."""
    configs, prune = _scoped_configs(entries, lambda c: {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n})
    return triton.autotune(
        configs=configs,
        key=["n_bucket", "m_bucket", "layout_class", "D", "T", "METRIC", "NEED_TEXT", "LABEL_WORDS",
             "INPUT_PRECISION", "TEXT_INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": prune},
    )(triton.heuristics({
        "BLOCK_T": _text_block,
        "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
        "EVEN_T": lambda args: args["T"] % _text_block(args) == 0,
        # Splits are whole multiples of 128 candidates on a GPU: only M's tail can be partial.
        "EVEN_N": lambda args: args["M"] % args["BLOCK_N"] == 0 and args["candidates_per_split"] % args["BLOCK_N"] == 0,
        # Flattening an empty inner loop has been miscompiled (triton-lang/triton#11656).
        "FLATTEN": lambda args: args["FLATTEN"] and args["D"] > 0 and (args["T"] > 0 or not args["NEED_TEXT"]),
    })(_mine_hardest_kernel))


_TUNED_KERNELS: dict[tuple[str, str], AutotunedLaunch] = {}


def _tuned_kernel(kind: str, width: str) -> AutotunedLaunch:
    if (kind, width) not in _TUNED_KERNELS:
        _TUNED_KERNELS[kind, width] = AutotunedLaunch(_autotuned(GPU_CONFIGS[kind, width]))
    return _TUNED_KERNELS[kind, width]


def _size_bucket(count: int) -> int:
    """Autotuning bucket of a size: the next power of two."""
    return next_power_of_2(max(count, 1))


def _label_words(anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Labels as the kernel reads them: int32 words, 1 per label (int32 and narrower types), or 2
    (64-bit labels, read as little-endian (low, high) word pairs without a copy)."""
    # One labels tensor for both (a batch mined against itself) is converted once: the same view.
    same = candidate_labels is anchor_labels
    if anchor_labels.element_size() == 8 or candidate_labels.element_size() == 8:
        check_precondition(sys.byteorder == "little", lambda: "64-bit labels are read as little-endian word pairs")
        anchor_words = (anchor_labels if anchor_labels.element_size() == 8 else anchor_labels.to(torch.int64)
                        ).contiguous().view(torch.int32)
        candidate_words = anchor_words if same else (
            candidate_labels if candidate_labels.element_size() == 8 else candidate_labels.to(torch.int64)
        ).contiguous().view(torch.int32)
        return anchor_words, candidate_words, 2
    # Exact: every integer type of 4 bytes or less maps one-to-one onto int32.
    anchor_words = anchor_labels.contiguous().to(torch.int32)
    return anchor_words, anchor_words if same else candidate_labels.contiguous().to(torch.int32), 1


def _row_stats(*jobs: tuple[torch.Tensor, bool], fills: tuple[tuple[torch.Tensor, int], ...] = ()) -> list[torch.Tensor]:
    """Per (x (R, C), inverse_norm) job, (R,) squared norms (or inverse norms) in x's accumulation
    dtype, without an upcast copy. Two jobs share a launch. ``fills``: up to two (int32 buffer,
    value) that the first launch also sets (fill launches of their own when there is no job)."""
    outs = [torch.empty(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
            for x, _ in jobs]
    block_r, block_c = (16, 16) if triton_interpreter_enabled() else (32, 128)
    pending = [(x, inverse, out) for (x, inverse), out in zip(jobs, outs) if x.shape[0] > 0]
    fills = tuple(fills)
    check_precondition(len(fills) <= 2)
    if fills and not pending:
        for buffer, value in fills:
            buffer.fill_(value)
        fills = ()
    for first in range(0, len(pending), 2):
        pair = pending[first:first + 2]
        (x, inverse, out), (y, inverse_y, out_y) = pair[0], pair[-1]
        x_blocks = cdiv(x.shape[0], block_r)
        y_blocks = cdiv(y.shape[0], block_r) if len(pair) == 2 else 0
        (fill_buffer, fill_value), (fill2_buffer, fill2_value) = (tuple(fills) + ((out, 0),) * 2)[:2]
        _row_stat_kernel[(x_blocks + y_blocks,)](
            x, out, x.shape[0], x.shape[1], x.stride(0), x.stride(1),
            y, out_y, y.shape[0], y.shape[1], y.stride(0), y.stride(1),
            x_blocks, fill_buffer, fill_buffer.numel(), fill_value, fill2_buffer, fill2_buffer.numel(), fill2_value,
            INVERSE_NORM=inverse, ACC_DTYPE=tl.float64 if out.dtype == torch.float64 else tl.float32,
            INVERSE_NORM_Y=inverse_y, ACC_DTYPE_Y=tl.float64 if out_y.dtype == torch.float64 else tl.float32,
            FILL=len(fills) >= 1, FILL2=len(fills) == 2, BLOCK_R=block_r, BLOCK_C=block_c, **LAUNCH_OPTIONS,
        )
        fills = ()
    return outs


def _is_row_slice(anchors: torch.Tensor, candidates: torch.Tensor, self_offset: int) -> bool:
    """Whether anchors is exactly candidates[self_offset : self_offset + N] (shared row stats)."""
    if anchors is candidates:  # what the check below concludes for one tensor (N == M)
        return self_offset == 0 and anchors.shape[0] > 0
    return is_row_slice(anchors, candidates, self_offset)  # (a wrapped batch is not a slice)


def _new_workspace(splits: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(splits, N) per-split best values and indices of positives and negatives."""
    return (
        torch.empty(splits, n, dtype=dtype, device=device),
        torch.empty(splits, n, dtype=torch.int32, device=device),
        torch.empty(splits, n, dtype=dtype, device=device),
        torch.empty(splits, n, dtype=torch.int32, device=device),
    )


def _default_candidates_per_split(n: int, m: int, device: torch.device) -> int:
    """Candidates per program so that the grid has a few waves of programs on the device."""
    if device.type != "cuda":  # the interpreter runs programs one after another: no need to split
        return max(m, 1)
    row_blocks = cdiv(n, 128)
    splits = max(1, cdiv(4 * sm_count(device), row_blocks))
    per_split = max(_MIN_CANDIDATES_PER_SPLIT, cdiv(m, splits))
    return cdiv(per_split, _SPLIT_GRANULE) * _SPLIT_GRANULE


# Square tiles of the symmetric kernel per kind and operand width (see GPU_CONFIGS; fp64 never
# takes this path). Its epilogue keeps both key tiles live for the row and the column arg-maxima:
# 128 x 128 tiles spill 470-900 bytes on sm_90 (8 warps, triton 3.9; 340-460 on 3.6). Of the
# 64 x 64 tiles, 4 warps fit two programs per SM without spills for 16-bit batch-hard only; with
# text (16-bit ATL) or TF32 operands they spilled 8-36 bytes on some layouts (triton 3.6 and
# 3.9), 8 warps none. IEEE fp32 (FMA) dots never take this kernel (see _uses_fma_dot).
SYMMETRIC_GPU_CONFIGS: dict[tuple[str, str], tuple[tuple[str, TileConfig], ...]] = {
    ("batch_hard", "16bit"): (
        (DENSE, _sm90(64, 64, 64, 4, 3, None)),        # 2 programs per SM
        (DENSE, _sm90(64, 64, 64, 8, 3, None)),        # 2 (128 registers)
        (ANY_LAYOUT, _sm90(64, 64, 32, 4, 3, None)),   # 2
    ),
    ("batch_hard", "tf32"): ((ANY_LAYOUT, _sm90(64, 64, 16, 8, 3, None)),),
    ("atl", "16bit"): (
        (DENSE, _sm90(64, 64, 64, 8, 3, None)),
        (ANY_LAYOUT, _sm90(64, 64, 32, 8, 3, None)),
    ),
    ("atl", "tf32"): ((ANY_LAYOUT, _sm90(64, 64, 16, 8, 3, None)),),
}


def _symmetric_wide_config(block: int) -> TileConfig:
    """Tiles of the symmetric kernel's second pass (64-bit labels whose high words differ), a cold
    path: the narrowest chunks on 8 warps, which compiled without spills for every operand class
    at 64 rows (4 warps with 32-wide chunks spilled 28-36 bytes with text on triton 3.6)."""
    return TileConfig(block_m=block, block_n=block, block_d=16, block_t=16, num_warps=8, num_stages=2)


def _wants_symmetric(tiles: TileConfig | None) -> bool:
    """An explicit ``tiles.symmetric``, else the environment's choice for square (or autotuned) tiles."""
    if tiles is not None and tiles.symmetric is not None:
        return tiles.symmetric
    if tiles is not None and tiles.block_m != tiles.block_n:
        return False
    return _symmetric_mining_reading()


# Read on every mining call: memoised per value of the variable (an invalid value still raises).
_symmetric_mining_reading = EnvironReading(
    "TORCHFG_SYMMETRIC_MINING", lambda value: parse_env_flag("TORCHFG_SYMMETRIC_MINING", value, False))


def _takes_symmetric_kernel(
    tiles: TileConfig | None, anchors: torch.Tensor, candidates: torch.Tensor, anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor, anchor_text: torch.Tensor | None, candidate_text: torch.Tensor | None,
    self_offset: int,
) -> bool:
    """Whether a call runs the symmetric kernel: asked for (:func:`_wants_symmetric`), a batch
    against itself, and, when it would be autotuned on a GPU, no FMA dot. ``anchor_text``: the
    text the call reads (None when it reads none)."""
    if not _wants_symmetric(tiles):
        return False
    if tiles is None and not triton_interpreter_enabled() and _uses_fma_dot(anchors, anchor_text):
        # IEEE fp32 (FMA) dots keep their operands in registers: next to the symmetric kernel's
        # two live key tiles they spilled 20-120 bytes on sm_90, so it has no autotuned tiles
        # for them and they keep the default kernel (explicit tiles may still ask for it).
        return False
    return _is_symmetric_call(anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text,
                              self_offset)


def _uses_fma_dot(embeddings: torch.Tensor, text: torch.Tensor | None) -> bool:
    """Whether the mining's embedding or (read) text dot is an IEEE fp32 / fp64 FMA dot."""
    precision = dot_dtypes(embeddings.dtype)[2]
    if precision == "ieee" and embeddings.element_size() >= 4:
        return True
    return text is not None and dot_dtypes(text.dtype)[2] == "ieee" and text.element_size() >= 4


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr() and a.device == b.device)


def _is_symmetric_call(
    anchors: torch.Tensor, candidates: torch.Tensor, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None, candidate_text: torch.Tensor | None, self_offset: int,
) -> bool:
    """Whether the call mines one batch against itself: the same rows, labels and (read) text."""
    if self_offset != 0 or anchors.dtype == torch.float64 or anchors.shape[0] != candidates.shape[0]:
        return False
    if not (_is_row_slice(anchors, candidates, 0) and _same_tensor(anchor_labels, candidate_labels)):
        return False
    # candidate_text is given with anchor_text (the op checks them as a pair).
    return anchor_text is None or _is_row_slice(anchor_text, cast(torch.Tensor, candidate_text), 0)


def _symmetric_splits(n: int, block: int, device: torch.device, tiles_per_split: int | None) -> tuple[int, int]:
    """(pairs of row blocks, splits of each pair's tile list) of the symmetric kernel's grid."""
    blocks = cdiv(n, block)
    pairs = cdiv(blocks, 2)
    if tiles_per_split is not None:
        # The kernel divides a pair's tiles by the grid's y extent: any count up to the cap works.
        return pairs, min(MAX_GRID_YZ, cdiv(blocks + 1, max(1, tiles_per_split)))
    if device.type != "cuda":
        return pairs, 1
    target = 4 * sm_count(device)
    # At least 4 tiles per program, or the per-segment set-up and the row atomics dominate.
    return pairs, max(1, min(cdiv(target, pairs), (blocks + 1) // 4))


_SYMMETRIC_TUNED: dict[tuple[str, str], AutotunedLaunch] = {}


def _symmetric_tuned_kernel(kind: str, width: str) -> AutotunedLaunch:
    if (kind, width) in _SYMMETRIC_TUNED:
        return _SYMMETRIC_TUNED[kind, width]
    configs, prune = _scoped_configs(SYMMETRIC_GPU_CONFIGS[kind, width], lambda c: {"BLOCK": c.block_m})
    tuned = triton.autotune(
        configs=configs,
        key=["n_bucket", "layout_class", "D", "T", "METRIC", "NEED_TEXT", "LABEL_WORDS",
             "INPUT_PRECISION", "TEXT_INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": prune},
        # Every config writes the same minima: restoring the all-ones start keeps each trial's
        # answer from mixing into the next (their fp32 sums may round differently).
        restore_value=["pos_ptr", "neg_ptr"],
    )(triton.heuristics({
        "BLOCK_T": _text_block,
        "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
        "EVEN_T": lambda args: args["T"] % _text_block(args) == 0,
        "EVEN_N": lambda args: args["N"] % args["BLOCK"] == 0,
        "FLATTEN": lambda args: args["FLATTEN"] and args["D"] > 0 and (args["T"] > 0 or not args["NEED_TEXT"]),
    })(_mine_symmetric_kernel))
    _SYMMETRIC_TUNED[kind, width] = AutotunedLaunch(tuned)
    return _SYMMETRIC_TUNED[kind, width]


def _launch_symmetric(
    x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None, stat: torch.Tensor,
    text_inv: torch.Tensor | None, packed: torch.Tensor, label_words: int, tiles: TileConfig | None,
    layout: int, *, base_margin: float, margin_scale: float, text_threshold: float, **flags,
) -> None:
    """The symmetric kernel (and its wide pass for 64-bit labels) into ``packed`` (2, N), all ones on entry."""
    n, d = x.shape
    t = text.shape[1] if text is not None else 0
    pos, neg = packed[0].view(torch.uint64), packed[1].view(torch.uint64)
    args = (
        x, stat, labels, text if text is not None else x, text_inv if text_inv is not None else stat, pos, neg,
        n, d, t, x.stride(0), x.stride(1),
        text.stride(0) if text is not None else 0, text.stride(1) if text is not None else 0,
        *split_scalar(base_margin), *split_scalar(margin_scale), *split_scalar(text_threshold),
        _size_bucket(n) if tiles is None else 0, layout if tiles is None else 0,
    )
    flags["LABEL_WORDS"] = label_words
    if tiles is None:
        kind = "atl" if flags["NEED_TEXT"] else "batch_hard"
        tuned = _symmetric_tuned_kernel(kind, "16bit" if x.element_size() == 2 else "tf32")
        grid = lambda meta: _symmetric_splits(n, meta["BLOCK"], x.device, None)  # noqa: E731
        block = tuned(grid, *args, **flags, WIDE_PASS=False).kwargs["BLOCK"]
        tiles_per_split = None
    else:
        if tiles.block_m != tiles.block_n:
            raise ValueError(f"symmetric mining takes square tiles, got block_m={tiles.block_m}, block_n={tiles.block_n}")
        block = tiles.block_m
        tiles_per_split = None if tiles.candidates_per_split is None else max(1, tiles.candidates_per_split // block)
        extra = {} if tiles.maxnreg is None else {"maxnreg": tiles.maxnreg}
        _mine_symmetric_kernel[_symmetric_splits(n, block, x.device, tiles_per_split)](
            *args, **flags, WIDE_PASS=False,
            EVEN_D=d % tiles.block_d == 0, EVEN_T=t % tiles.block_t == 0, EVEN_N=n % block == 0,
            FLATTEN=tiles.flatten and d > 0 and (t > 0 or not flags["NEED_TEXT"]),
            BLOCK=block, BLOCK_D=tiles.block_d, BLOCK_T=tiles.block_t,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **extra, **LAUNCH_OPTIONS,
        )
    if label_words == 2:
        # Segments whose labels differ in their high words: same blocks and splits, narrow tiles.
        wide = _symmetric_wide_config(block) if tiles is None else tiles
        block_d, block_t = fit_block(wide.block_d, d), fit_block(wide.block_t, t)
        _mine_symmetric_kernel[_symmetric_splits(n, block, x.device, tiles_per_split)](
            *args, **flags, WIDE_PASS=True,
            EVEN_D=d % block_d == 0, EVEN_T=t % block_t == 0, EVEN_N=False, FLATTEN=False,
            BLOCK=block, BLOCK_D=block_d, BLOCK_T=block_t,
            num_warps=wide.num_warps, num_stages=wide.num_stages, **LAUNCH_OPTIONS,
        )


@dataclasses.dataclass(frozen=True)
class SplitBests:
    """The mining kernel's output before its splits are merged (:func:`mine_hardest_splits_triton`).

    Attributes:
        pos_val, neg_val: (splits, N) best selection key per split (fp32, fp64 for fp64 inputs);
            unused (1 element) when ``splits == 1``.
        pos_idx, neg_idx: (splits, N) int32 candidate index of each split's best, -1 for none;
            with ``splits == 1`` the final (N,) int64 indices instead.
        splits: number of candidate splits.
        candidate_stat, anchor_stat: (M,) and (N,) row statistics of the metric (squared norms,
            inverse norms for cosine; None for dot), for the fused loss's backward.
        packed: the symmetric kernel ran: ``splits == 1`` and pos_idx / neg_idx are (N,) int64
            packed bests (:func:`unpack_best_index` reads their candidate index).
    """

    pos_val: torch.Tensor
    pos_idx: torch.Tensor
    neg_val: torch.Tensor
    neg_idx: torch.Tensor
    splits: int
    candidate_stat: torch.Tensor | None
    anchor_stat: torch.Tensor | None
    packed: bool = False


def mine_hardest_triton_tiled(
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
    tiles: TileConfig | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mine_hardest_triton` with explicit tiles (``tiles=None``: autotuned on a GPU, small
    fixed tiles under the interpreter) and optional preallocated ``out`` = (positive_idx,
    negative_idx), each (N,) int64, which the kernels overwrite entirely. For tests and
    benchmarks; the other arguments as there."""
    n = anchors.shape[0]
    if out is not None:
        for buf, name in zip(out, ("out[0]", "out[1]")):
            if buf.shape != (n,) or buf.dtype != torch.int64 or buf.device != anchors.device or not buf.is_contiguous():
                raise ValueError(f"{name} must be a contiguous ({n},) int64 tensor on {anchors.device}")
    bests = mine_hardest_splits_triton(
        anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, metric=metric,
        base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
        self_offset=self_offset, tiles=tiles, out=out,
    )
    if bests.splits == 1 and not bests.packed:
        return bests.pos_idx, bests.neg_idx
    positive_idx, negative_idx = out if out is not None else (torch.empty(n, dtype=torch.int64, device=anchors.device)
                                                               for _ in range(2))
    block = 128
    if bests.packed:
        _unpack_bests_kernel[(cdiv(n, block),)](
            bests.pos_idx, bests.neg_idx, positive_idx, negative_idx, n, BLOCK=block, **LAUNCH_OPTIONS)
        return positive_idx, negative_idx
    _merge_splits_kernel[(cdiv(n, block),)](
        bests.pos_val, bests.pos_idx, bests.neg_val, bests.neg_idx, positive_idx, negative_idx, n, bests.splits,
        ACC_DTYPE=tl.float64 if bests.pos_val.dtype == torch.float64 else tl.float32, BLOCK=block, **LAUNCH_OPTIONS,
    )
    return positive_idx, negative_idx


def mine_hardest_splits_triton(
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
    tiles: TileConfig | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    fill: tuple[torch.Tensor, int] | None = None,
) -> SplitBests:
    """The mining launches without the merge: the fused triplet loss merges the splits itself.

    ``out``: (N,) int64 buffers for the indices when there is a single split. ``fill`` = (int32
    buffer, value): set by the row-statistics pre-pass, in the same launch (the fused loss's
    scratch). Other arguments as :func:`mine_hardest_triton`.
    """
    # Inputs are validated by the public op (torchfg.ops.triplet.mine_hardest); these are the
    # kernel's own preconditions.
    # (One check: each costs host time in a host-bound step.)
    check_precondition(
        anchors.dim() == 2 and candidates.dim() == 2 and anchors.shape[1] == candidates.shape[1]
        and anchors.dtype == candidates.dtype and anchors.device == candidates.device
        and anchor_labels.shape == (anchors.shape[0],) and candidate_labels.shape == (candidates.shape[0],)
        and (self_offset == -1 or (0 <= self_offset < max(candidates.shape[0], 1) and anchors.shape[0] <= candidates.shape[0]))
        and (anchor_text is None) == (candidate_text is None),
        lambda: "mine_hardest_splits_triton: inconsistent shapes, dtypes, devices, self_offset or text",
    )
    n, m = anchors.shape[0], candidates.shape[0]
    device = anchors.device

    def final_indices() -> tuple[torch.Tensor, torch.Tensor]:
        # Written by the kernel only with a single split; with several the splits are the output.
        if out is not None:
            return out
        return torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, dtype=torch.int64, device=device)

    if n == 0 or m == 0:
        positive_idx, negative_idx = final_indices()
        positive_idx.fill_(-1)
        negative_idx.fill_(-1)
        if fill is not None:
            fill[0].fill_(fill[1])
        unused = torch.empty(1, dtype=accumulation_dtype(anchors.dtype), device=device)
        return SplitBests(unused, positive_idx, unused, negative_idx, 1, None, None)
    requested_tiles = tiles
    if tiles is None and triton_interpreter_enabled():
        tiles = _INTERPRETER_CONFIG
    elif tiles is None and anchors.dtype == torch.float64:
        # fp64 is a correctness path: small fixed tiles fit fp64 operands in shared memory.
        tiles = _FP64_CONFIG

    d = anchors.shape[1]
    has_text = anchor_text is not None
    threshold = text_positive_threshold if has_text else None
    has_threshold = threshold is not None
    margin_aware = has_text and margin_scale != 0.0
    # Text that neither changes a margin nor excludes a negative is never read.
    need_text = margin_aware or has_threshold
    # Read only where need_text, so with text: both tensors then (checked above as a pair).
    anchor_text_rows, candidate_text_rows = cast(torch.Tensor, anchor_text), cast(torch.Tensor, candidate_text)
    symmetric = _takes_symmetric_kernel(
        requested_tiles, anchors, candidates, anchor_labels, candidate_labels, anchor_text if need_text else None,
        candidate_text if need_text else None, self_offset)
    anchor_labels, candidate_labels, label_words = _label_words(anchor_labels, candidate_labels)
    t = anchor_text_rows.shape[1] if need_text else 0
    metric_code = metric_code_of(metric)
    dot_dtype, acc_dtype, precision = dot_dtypes(anchors.dtype)
    acc_torch = torch.float64 if acc_dtype == tl.float64 else torch.float32

    # All row statistics (embeddings unless the metric is dot, text when it is read; the anchors'
    # own only when they are not a row slice of the candidates) in as few launches as possible.
    shared_rows = _is_row_slice(anchors, candidates, self_offset)
    shared_text = need_text and _is_row_slice(anchor_text_rows, candidate_text_rows, self_offset)
    jobs: list[tuple[torch.Tensor, bool]] = []
    if metric_code != 3:
        jobs.append((candidates, metric_code == 2))
        if not shared_rows:
            jobs.append((anchors, metric_code == 2))
    if need_text:
        jobs.append((candidate_text_rows, True))
        if not shared_text:
            jobs.append((anchor_text_rows, True))
    # The symmetric kernel's packed bests start as all ones (no candidate), set by the pre-pass.
    packed = torch.empty(2, n, dtype=torch.int64, device=device) if symmetric else None
    fills = ((fill,) if fill is not None else ()) + (
        ((packed.view(torch.int32), _NO_BEST),) if packed is not None else ())
    stats = iter(_row_stats(*jobs, fills=fills))
    if metric_code == 3:
        cand_stat = anchor_stat = torch.empty(1, dtype=acc_torch, device=device)  # unused by the kernel
    else:
        cand_stat = next(stats)
        if not shared_rows:
            anchor_stat = next(stats)
        elif self_offset == 0 and n == m:  # the whole of cand_stat: the slice would be a view of all of it
            anchor_stat = cand_stat
        else:
            anchor_stat = cand_stat[self_offset:self_offset + n]
    if need_text:
        text_dot_dtype, text_acc_dtype, text_precision = dot_dtypes(anchor_text_rows.dtype)
        cand_text_inv = next(stats)
        if not shared_text:
            anchor_text_inv = next(stats)
        elif self_offset == 0 and n == m:  # as anchor_stat above
            anchor_text_inv = cand_text_inv
        else:
            anchor_text_inv = cand_text_inv[self_offset:self_offset + n]
        text_args = (anchor_text_rows, candidate_text_rows, anchor_text_inv, cand_text_inv)
        text_strides = (anchor_text_rows.stride(0), anchor_text_rows.stride(1),
                        candidate_text_rows.stride(0), candidate_text_rows.stride(1))
    else:
        text_dot_dtype, text_acc_dtype, text_precision = tl.float32, tl.float32, "ieee"
        text_args = (anchors, candidates, anchor_stat, cand_stat)  # placeholders, never read
        text_strides = (0, 0, 0, 0)

    # Column-major (or otherwise strided) features, and row-major operands that are not 16-byte
    # aligned, limit the autotuned tiles (GPU_CONFIGS scopes).
    layout = _layout_class(anchors, candidates, *((anchor_text, candidate_text) if need_text else ()))
    # An FMA dot (IEEE fp32 or fp64 operands), on the embeddings or on the text, keeps its operands
    # in registers and needs narrow chunks: the "fp32" autotune list and the wide pass's narrow
    # tiles. With 16-bit tiles an IEEE fp32 text dot spilled 112-1700 bytes (column-major operands).
    fma_dot = _uses_fma_dot(anchors, anchor_text if need_text else None)

    if packed is not None:  # symmetric
        _launch_symmetric(
            anchors, anchor_labels, anchor_text if need_text else None, anchor_stat, anchor_text_inv if need_text else None,
            packed, label_words, tiles, layout,
            METRIC=metric_code, NEED_TEXT=need_text, MARGIN_AWARE=margin_aware, HAS_THRESHOLD=has_threshold,
            DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision, TEXT_DOT_DTYPE=text_dot_dtype,
            TEXT_ACC_DTYPE=text_acc_dtype, TEXT_INPUT_PRECISION=text_precision,
            base_margin=base_margin, margin_scale=margin_scale,
            text_threshold=0.0 if threshold is None else float(threshold),
        )
        stat = None if metric_code == 3 else anchor_stat
        return SplitBests(packed[0], packed[0], packed[1], packed[1], 1, stat, stat, packed=True)

    if tiles is not None and tiles.candidates_per_split is not None:
        per_split = min(max(1, tiles.candidates_per_split), m)
    else:
        per_split = _default_candidates_per_split(n, m, device)
    # The splits are the grid's y extent: an explicit small split of a large M (16 of 1M) is widened.
    per_split = max(per_split, cdiv(m, MAX_GRID_YZ))
    splits = cdiv(m, per_split)
    if splits == 1:
        pos_val = neg_val = torch.empty(1, dtype=acc_torch, device=device)  # not stored
        pos_part, neg_part = final_indices()
    else:
        pos_val, pos_part, neg_val, neg_part = _new_workspace(splits, n, acc_torch, device)

    args = (
        anchors, candidates, anchor_stat, cand_stat,
        anchor_labels, candidate_labels,
        *text_args,
        pos_val, pos_part, neg_val, neg_part,
        n, m, d, t,
        anchors.stride(0), anchors.stride(1), candidates.stride(0), candidates.stride(1),
        *text_strides,
        self_offset, per_split,
        *split_scalar(base_margin), *split_scalar(margin_scale),
        *split_scalar(0.0 if threshold is None else threshold),
        _size_bucket(n) if tiles is None else 0, _size_bucket(m) if tiles is None else 0,
        layout if tiles is None else 0,
    )
    flags = dict(
        METRIC=metric_code, HAS_SELF=self_offset >= 0, NEED_TEXT=need_text, MARGIN_AWARE=margin_aware,
        HAS_THRESHOLD=has_threshold,
        STORE_VALUES=splits > 1, LABEL_WORDS=label_words,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
        TEXT_DOT_DTYPE=text_dot_dtype, TEXT_ACC_DTYPE=text_acc_dtype, TEXT_INPUT_PRECISION=text_precision,
    )
    if tiles is None:
        grid = lambda meta: (cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
        kind = "atl" if need_text else "batch_hard"
        width = "fp32" if fma_dot else ("16bit" if anchors.element_size() == 2 else "tf32")
        block_m = _tuned_kernel(kind, width)(grid, *args, **flags, WIDE_PASS=False).kwargs["BLOCK_M"]
    else:
        block_t = tiles.block_t
        extra = {} if tiles.maxnreg is None else {"maxnreg": tiles.maxnreg}
        _mine_hardest_kernel[(cdiv(n, tiles.block_m), splits)](
            *args, **flags, WIDE_PASS=False,
            EVEN_D=d % tiles.block_d == 0, EVEN_T=t % block_t == 0,
            EVEN_N=m % tiles.block_n == 0 and per_split % tiles.block_n == 0,
            # Flattening an empty inner loop has been miscompiled (triton-lang/triton#11656).
            FLATTEN=tiles.flatten and d > 0 and (t > 0 or not need_text),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, BLOCK_T=block_t,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **extra, **LAUNCH_OPTIONS,
        )
        block_m = tiles.block_m
    if label_words == 2:
        # The programs whose labels differ in their high words (none for labels within 31 bits,
        # where every program of this launch exits after its label scan): same row blocks and
        # splits as the main pass, so each is mined by exactly one of the two launches.
        wide = _wide_pass_config(block_m, fma_dot, layout) if tiles is None else tiles
        block_d, block_t = fit_block(wide.block_d, d), fit_block(wide.block_t, t)
        _mine_hardest_kernel[(cdiv(n, block_m), splits)](
            *args, **flags, WIDE_PASS=True,
            EVEN_D=d % block_d == 0, EVEN_T=t % block_t == 0, EVEN_N=False, FLATTEN=False,
            BLOCK_M=block_m, BLOCK_N=wide.block_n, BLOCK_D=block_d, BLOCK_T=block_t,
            num_warps=wide.num_warps, num_stages=wide.num_stages, **LAUNCH_OPTIONS,
        )
    if metric_code == 3:
        return SplitBests(pos_val, pos_part, neg_val, neg_part, splits, None, None)
    return SplitBests(pos_val, pos_part, neg_val, neg_part, splits, cand_stat, anchor_stat)


def mine_hardest_triton(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest (margin-aware) negative per anchor, fused in one Triton pass.

    Args:
        anchors: (N, D) fp16/bf16/fp32/fp64 CUDA tensor (CPU under ``TRITON_INTERPRET=1``), any strides.
        candidates: (M, D), same dtype and device.
        anchor_labels: (N,) integer labels; candidate_labels: (M,).
        anchor_text: (N, T) float text embeddings of the anchors (ATL), or None.
        candidate_text: (M, T), same dtype as anchor_text, or None.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        base_margin: m0 of the margin m(i, j) = m0 + s * (1 - cos(t_i, t_j)) / 2.
        margin_scale: s (ignored without text).
        text_positive_threshold: candidates of another label with text cosine >= this are never
            negatives; None = off (ignored without text).
        self_offset: anchor i is candidate ``(self_offset + i) % M`` (excluded from its
            positives); -1 when the anchors are not among the candidates.

    Returns:
        (positive_idx, negative_idx), each (N,) int64 candidate indices, -1 where an anchor has
        no valid positive / negative. Ties go to the lowest index. Distances accumulate in fp32
        (fp64 for fp64 inputs); fp32 operands use TF32 only when PyTorch's fp32 matmul
        precision allows it.

    Example:
        On a CUDA device (not run by the doctests)::

            x = torch.randn(8192, 512, device="cuda", dtype=torch.bfloat16)
            y = torch.randint(0, 1000, (8192,), device="cuda")
            pos, neg = mine_hardest_triton(x, x, y, y, None, None, metric="euclidean",
                base_margin=0.2, margin_scale=0.0, text_positive_threshold=None, self_offset=0)
    """
    return mine_hardest_triton_tiled(
        anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text,
        metric=metric, base_margin=base_margin, margin_scale=margin_scale,
        text_positive_threshold=text_positive_threshold, self_offset=self_offset,
    )
