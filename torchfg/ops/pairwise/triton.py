"""Tiled Triton kernels for pairwise distances: forward and backward.

Forward: each program owns a (BLOCK_M x BLOCK_N) tile of one batch's output and loops over D
with tl.dot (fp32 accumulation), then applies the metric's epilogue from precomputed row norms.

Backward: dL/dx = a * x + W @ (s * y), where the coefficient matrix W is derived from the
upstream gradient G (and the saved output for ``euclidean``). Two ways:

* bf16 (euclidean, sqeuclidean and dot) and fp16 (dot): W is computed once by the element-wise
  :func:`_pairwise_grad_weights_kernel`, in row chunks of at most
  :data:`WEIGHTS_BLOCK_ELEMENTS` (``sqeuclidean`` and ``dot`` use G itself), and the two
  products ``W @ y`` and ``W^T @ x`` are cuBLAS GEMMs, which also give W's row and column sums
  (a ones column appended to the shifted operands; see :func:`_backward_weights_gemm`).
  On the H200 the fused kernel below took 35 ms for both sides at N = M = 32768, D = 512
  (60 TFLOP/s): it derives each W element (a division for ``euclidean``) for only BLOCK_D
  multiply-adds, and again for every D slice and for each side, so its element-wise work
  outweighed the tensor cores about 4 to 1. This path (33335f0, before its operands were centred):
  10.6 ms forward + backward (cdist 15.5).
  fp16 keeps the fused kernel for euclidean and sqeuclidean: W = g / (2 d) and the sums of G
  that the ones column gives are not bounded by the gradient, and in fp16 (max 65504) they
  overflowed to inf, then NaN, under a loss scaler's upstream gradients (g ~ 4096 at unit-norm
  rows; a row sum of 700 columns at g = 100). bf16 has fp32's range; dot's GEMMs are the gradient.
* fp32/fp64, fp16 euclidean and sqeuclidean, cosine, deterministic mode and pinned configs: each
  program owns a (BLOCK_M x BLOCK_D) tile of dL/dx and loops over the M axis, deriving its W
  tiles on the fly; dL/dy is the same kernel with x and y swapped (G and the output read
  transposed through strides, no copy). No (B, N, M) temporary is written in either direction.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops._triton_utils import LAUNCH_OPTIONS, MAX_GRID_YZ, AutotunedLaunch, cdiv, dot_dtypes, next_power_of_2
from torchfg.ops.metric import metric_code, safe_inverse
from torchfg.ops.pairwise.reference import backward_in_batch_slices, row_norms



@triton.jit
def _pairwise_forward_kernel(
    x_ptr, y_ptr, out_ptr, x_norm_ptr, y_norm_ptr,
    N, M, D,
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_ym, stride_yd,
    stride_ob, stride_on, stride_om,
    stride_xnb, stride_ynb,
    N_BUCKET, M_BUCKET,
    METRIC: tl.constexpr, SYMMETRIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    # N_BUCKET / M_BUCKET only key the autotuner (sizes rounded to powers of two, so that a new
    # batch size does not re-tune). Programs are ordered in groups of GROUP_M row blocks per
    # column block so that consecutive programs share y tiles and x tiles in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(N, BLOCK_M)
    blocks_n = tl.cdiv(M, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    # 64-bit offsets: B * N * M passes 2**31 for outputs the docs allow (up to 2**34 elements).
    b = tl.program_id(2).to(tl.int64)
    # Row and column indices in int64: the grouped program order divides by a runtime group
    # size, so their i32 range cannot be bounded at compile time (the offset-width check).
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64, cols64 = rows, cols
    row_ok = rows < N
    col_ok = cols < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for d0 in tl.range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x_tile = tl.load(
            x_ptr + b * stride_xb + rows64[:, None] * stride_xn + ds.to(tl.int64)[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)
        y_tile = tl.load(
            y_ptr + b * stride_yb + cols64[:, None] * stride_ym + ds.to(tl.int64)[None, :] * stride_yd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)
        acc += tl.dot(x_tile, tl.trans(y_tile), out_dtype=ACC_DTYPE, input_precision=INPUT_PRECISION)
    x_norm = tl.load(x_norm_ptr + b * stride_xnb + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    y_norm = tl.load(y_norm_ptr + b * stride_ynb + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    if METRIC == 3:  # dot
        dist = -acc
    elif METRIC == 2:  # cosine; norms hold inverse norms (0 for zero rows)
        dist = 1.0 - acc * x_norm[:, None] * y_norm[None, :]
    else:  # norms hold squared norms
        dist = x_norm[:, None] + y_norm[None, :] - 2.0 * acc
        # NaN-propagating, as torch's clamp_min: a NaN/inf row must not read as a zero distance.
        dist = tl.maximum(dist, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if METRIC == 1:
            dist = tl.sqrt(dist)
    if SYMMETRIC:
        on_diag = rows[:, None] == cols[None, :]
        if METRIC == 2:
            dist = tl.where(on_diag & (x_norm[:, None] > 0), 0.0, dist)
        elif METRIC != 3:
            dist = tl.where(on_diag, 0.0, dist)
    tl.store(
        out_ptr + b * stride_ob + rows64[:, None] * stride_on + cols64[None, :] * stride_om,
        dist.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _pairwise_backward_kernel(
    g_ptr, out_ptr, x_ptr, y_ptr, y_scale_ptr, gx_ptr,
    N, M, D,
    stride_gb, stride_gn, stride_gm,
    stride_ob, stride_on, stride_om,
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_ym, stride_yd,
    stride_ysb,
    stride_gxb, stride_gxn, stride_gxd,
    N_BUCKET, M_BUCKET,
    METRIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Computes, for the rows of x owned by this program and one D slice:
    #   sq/euclid: 2 * (rowsum(W) * x - W @ y),  W = G (sq) or G / (2 out) masked (euclid)
    #   dot:       -G @ y
    #   cosine:    -(G * y_scale^T) @ y          (the radial projection is applied by the launcher)
    # The D slice varies fastest: the programs of one row block run together and read the same
    # (BLOCK_M, M) strip of G (and of the output), so it comes from HBM once and from L2 after.
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    # 64-bit offsets: B * N * M passes 2**31 for outputs the docs allow (up to 2**34 elements).
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    row_ok = rows < N
    d_ok = ds < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    w_rowsum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for n0 in tl.range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cols64 = cols.to(tl.int64)
        col_ok = cols < M
        tile_ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(
            g_ptr + b * stride_gb + rows64[:, None] * stride_gn + cols64[None, :] * stride_gm,
            mask=tile_ok, other=0.0,
        ).to(ACC_DTYPE)
        if METRIC == 1:
            dist = tl.load(
                out_ptr + b * stride_ob + rows64[:, None] * stride_on + cols64[None, :] * stride_om,
                mask=tile_ok, other=0.0,
            ).to(ACC_DTYPE)
            w = tl.where(dist > 0, w / (2.0 * tl.where(dist > 0, dist, 1.0)), 0.0)
        if METRIC == 2:
            # W @ (y * s) = (W * s^T) @ y: scaling W's columns leaves the y tile untouched, so it
            # goes from global to shared memory to the tensor cores without passing registers.
            y_scale = tl.load(y_scale_ptr + b * stride_ysb + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
            w = w * y_scale[None, :]
        y_tile = tl.load(
            y_ptr + b * stride_yb + cols64[:, None] * stride_ym + ds.to(tl.int64)[None, :] * stride_yd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)
        if METRIC <= 1:
            w_rowsum += tl.sum(w, axis=1)
        acc += tl.dot(w.to(DOT_DTYPE), y_tile, out_dtype=ACC_DTYPE, input_precision=INPUT_PRECISION)
    if METRIC <= 1:
        x_tile = tl.load(
            x_ptr + b * stride_xb + rows64[:, None] * stride_xn + ds.to(tl.int64)[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(ACC_DTYPE)
        grad = 2.0 * (w_rowsum[:, None] * x_tile - acc)
    else:
        grad = -acc
    tl.store(
        gx_ptr + b * stride_gxb + rows64[:, None] * stride_gxn + ds.to(tl.int64)[None, :] * stride_gxd,
        grad.to(gx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# Squared Euclidean distances below this fraction of |x|^2 + |y|^2 get the zero subgradient in the
# 16-bit W + GEMM backward (d below 0.4 % of the rows' norm; see _backward_weights_gemm).
_NOISE_FLOOR_SQ = tl.constexpr(2.0**-16)


@triton.jit
def _pairwise_grad_weights_kernel(
    g_ptr, out_ptr, x_sq_ptr, y_sq_ptr, w_ptr,
    M,
    stride_gb, stride_gn, stride_ob, stride_on, stride_xsb, stride_ysb, stride_wb, stride_wn,
    BLOCK: tl.constexpr,
):
    # Euclidean W = G / (2 out) for BLOCK columns of one row (unit column strides), from fp32;
    # 0 below the GEMM form's noise floor (see _backward_weights_gemm). A plain element-wise map:
    # W's row and column sums come out of the GEMMs.
    # Rows and column blocks share grid x (grid y is capped at 65535: 67M columns in 1024 blocks).
    col_blocks = tl.cdiv(M, BLOCK)
    row = (tl.program_id(0) // col_blocks).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    cols = (tl.program_id(0) % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < M
    # Upcast right after the load: the interpreter mishandles 16-bit arithmetic.
    w = tl.load(g_ptr + b * stride_gb + row * stride_gn + cols, mask=ok, other=0.0).to(tl.float32)
    dist = tl.load(out_ptr + b * stride_ob + row * stride_on + cols, mask=ok, other=0.0).to(tl.float32)
    x_sq = tl.load(x_sq_ptr + b * stride_xsb + row)
    y_sq = tl.load(y_sq_ptr + b * stride_ysb + cols, mask=ok, other=0.0)
    resolved = dist * dist > _NOISE_FLOOR_SQ * (x_sq + y_sq)
    w = tl.where(resolved, w / (2.0 * tl.where(resolved, dist, 1.0)), 0.0)
    tl.store(w_ptr + b * stride_wb + row * stride_wn + cols, w.to(w_ptr.dtype.element_ty), mask=ok)


@dataclasses.dataclass(frozen=True)
class PairwiseConfig:
    """Tile sizes and launch options of one pairwise kernel launch.

    Forward: ``block_m x block_n`` output tile, ``block_d`` columns per ``tl.dot`` step.
    Backward: ``block_m x block_d`` gradient tile, ``block_n`` rows of the other side per step.
    """

    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


# Candidates the autotuner times on a GPU, per operand class ("16bit": fp16/bf16, "fp32": tf32 or
# ieee, "fp64"). Shared memory per stage is (block_m + block_n) * block_d * itemsize: the largest
# 16-bit and fp32 tiles take 96 KiB at 3 stages, inside Hopper's 227 KiB with room for 2 CTAs.
FORWARD_CONFIGS: dict[str, tuple[PairwiseConfig, ...]] = {
    "16bit": (
        PairwiseConfig(128, 128, 64, num_warps=8, num_stages=3),
        PairwiseConfig(128, 64, 64, num_warps=4, num_stages=4),
        PairwiseConfig(64, 128, 64, num_warps=4, num_stages=4),
        PairwiseConfig(64, 64, 64, num_warps=4, num_stages=3),
    ),
    "fp32": (
        PairwiseConfig(128, 128, 32, num_warps=8, num_stages=3),
        PairwiseConfig(128, 64, 32, num_warps=4, num_stages=4),
        PairwiseConfig(64, 64, 32, num_warps=4, num_stages=3),
    ),
    "fp64": (
        PairwiseConfig(64, 32, 16, num_warps=4, num_stages=2),
        PairwiseConfig(32, 32, 16, num_warps=4, num_stages=2),
    ),
}
# The backward's accumulator is block_m x block_d: a wide block_d covers D = 128-512 in 1-4
# slices, so the G strip of a row block is read that many times (from L2 after the first).
BACKWARD_CONFIGS: dict[str, tuple[PairwiseConfig, ...]] = {
    # 8 warps where the tile is 64 x 128: at 4 the euclidean variant (which also reads the saved
    # distances) spills on sm_90 (255 registers + ~400 bytes, ptxas -v, triton 3.9).
    "16bit": (
        PairwiseConfig(64, 64, 128, num_warps=8, num_stages=3),
        PairwiseConfig(128, 32, 128, num_warps=8, num_stages=3),
        PairwiseConfig(128, 64, 64, num_warps=8, num_stages=3),
        PairwiseConfig(64, 64, 64, num_warps=4, num_stages=3),
    ),
    "fp32": (
        PairwiseConfig(64, 32, 128, num_warps=8, num_stages=3),
        PairwiseConfig(64, 32, 64, num_warps=4, num_stages=3),
        PairwiseConfig(64, 64, 64, num_warps=4, num_stages=3),
    ),
    "fp64": (
        PairwiseConfig(32, 16, 64, num_warps=4, num_stages=2),
        PairwiseConfig(32, 32, 32, num_warps=4, num_stages=2),
    ),
}
# Under the interpreter every tile element is numpy work: small tiles keep tests fast, and the
# autotuner (which needs a GPU timer) is not used.
INTERPRETER_CONFIG = PairwiseConfig(16, 16, 32)


def operand_class(dtype: torch.dtype) -> str:
    """The config table key of an input dtype."""
    if dtype == torch.float64:
        return "fp64"
    return "fp32" if dtype == torch.float32 else "16bit"


def _bucket(size: int) -> int:
    return next_power_of_2(max(size, 1))


_autotuned: dict[tuple[str, str], AutotunedLaunch] = {}


def _tile_meta(config: PairwiseConfig, direction: str) -> dict[str, int]:
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d)
    if direction == "forward":
        meta["GROUP_M"] = config.group_m
    return meta


# Accumulator elements per warp above which a config spills on sm_90 when D is not a multiple of
# BLOCK_D (the masked D loop keeps its masks live across the pipeline stages): at D = 100, bf16,
# the forward's 128 x 128 (8 warps), 128 x 64 and 64 x 128 (4 warps) tiles and the backward's
# 128 x 128 accumulator (8 warps) spilled 90-860 bytes (ptxas -v, triton 3.6 and 3.9); tiles at
# 1024 elements per warp or fewer did not spill beyond 8 bytes.
RAGGED_D_MAX_ACC_PER_WARP = 1024


def prune_for_ragged_d(direction: str):
    """The autotuner's early prune: for a D that is not a multiple of a config's BLOCK_D, only
    configs whose accumulator fits :data:`RAGGED_D_MAX_ACC_PER_WARP` per warp (at least one kept)."""

    def prune(configs: list, named_args: dict, **kwargs) -> list:
        d = named_args["D"]

        def acc_per_warp(config) -> int:
            other = config.kwargs["BLOCK_N"] if direction == "forward" else config.kwargs["BLOCK_D"]
            return config.kwargs["BLOCK_M"] * other // config.num_warps

        kept = [c for c in configs if d % c.kwargs["BLOCK_D"] == 0 or acc_per_warp(c) <= RAGGED_D_MAX_ACC_PER_WARP]
        return kept or [min(configs, key=acc_per_warp)]

    return prune


def _pinned_tiles(config: PairwiseConfig | None) -> PairwiseConfig | None:
    """The one tile configuration a launch runs with (explicit, or the interpreter's), or None
    where the autotuner chooses."""
    if config is not None:
        return config
    return INTERPRETER_CONFIG if triton_interpreter_enabled() else None


def _candidate_tiles(direction: str, dtype: torch.dtype, config: PairwiseConfig | None) -> list[PairwiseConfig]:
    """The tile configurations a launch may run with: the pinned one, or the autotuner's table
    for the dtype (whose early prune only removes some)."""
    pinned = _pinned_tiles(config)
    if pinned is not None:
        return [pinned]
    table = FORWARD_CONFIGS if direction == "forward" else BACKWARD_CONFIGS
    return list(table[operand_class(dtype)])


def _launcher(kernel, direction: str, dtype: torch.dtype, config: PairwiseConfig | None):
    """``launch(grid, *args, **kwargs)`` of ``kernel``: a pinned config (explicit or the
    interpreter's) passes tiles, warps and stages; otherwise the autotuner supplies them (and a
    call it has answered skips its per-call work, see :class:`AutotunedLaunch`)."""
    pinned = _pinned_tiles(config)
    if pinned is not None:
        meta = dict(_tile_meta(pinned, direction), num_warps=pinned.num_warps, num_stages=pinned.num_stages)
        return lambda grid, *args, **kwargs: kernel[grid](*args, **kwargs, **meta, **LAUNCH_OPTIONS)
    key = (direction, operand_class(dtype))
    if key not in _autotuned:  # the table is read once per (direction, dtype class), not per call
        configs = [
            triton.Config(_tile_meta(c, direction), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in _candidate_tiles(direction, dtype, None)
        ]
        _autotuned[key] = AutotunedLaunch(triton.autotune(
            configs=configs, key=["N_BUCKET", "M_BUCKET", "D"],
            prune_configs_by={"early_config_prune": prune_for_ragged_d(direction)},
        )(kernel))
    return _autotuned[key]


def _metric_norms(x: torch.Tensor, metric: str) -> torch.Tensor:
    norms = row_norms(x)
    if metric == "cosine":
        return safe_inverse(norms)
    return norms.square()


# The kernels put the batch on grid z, which CUDA caps at 65535: a larger batch (say 70,000
# sets of 4 rows) is launched in slices of at most this many batch elements.
MAX_GRID_BATCH = MAX_GRID_YZ


def pairwise_distance_triton(
    x: torch.Tensor, y: torch.Tensor, metric: str, symmetric: bool, config: PairwiseConfig | None = None
) -> torch.Tensor:
    """Triton forward: x (B, N, D), y (B, M, D) -> (B, N, M) in x's dtype.

    ``config`` pins one tile configuration (tests, benchmarks); by default the autotuner picks
    among :data:`FORWARD_CONFIGS` per dtype class and power-of-two size bucket.
    """
    B, N, D = x.shape
    M = y.shape[1]
    out = torch.empty(B, N, M, dtype=x.dtype, device=x.device)
    if B == 0 or N == 0 or M == 0:
        return out
    for b0 in range(0, B, MAX_GRID_BATCH):
        b1 = min(B, b0 + MAX_GRID_BATCH)
        _pairwise_forward(x[b0:b1], y[b0:b1], out[b0:b1], metric, symmetric, config)
    return out


def _pairwise_forward(
    x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, metric: str, symmetric: bool, config: PairwiseConfig | None
) -> None:
    """One launch of the forward kernel into ``out`` (B <= MAX_GRID_BATCH)."""
    B, N, D = x.shape
    M = y.shape[1]
    x_norm = _metric_norms(x, metric)
    y_norm = x_norm if symmetric else _metric_norms(y, metric)
    dot_dtype, acc_dtype, precision = dot_dtypes(x.dtype)
    launch = _launcher(_pairwise_forward_kernel, "forward", x.dtype, config)

    def grid(meta):
        return (cdiv(N, meta["BLOCK_M"]) * cdiv(M, meta["BLOCK_N"]), 1, B)

    launch(
        grid, x, y, out, x_norm, y_norm,
        N, M, D,
        *x.stride(), *y.stride(), *out.stride(),
        x_norm.stride(0), y_norm.stride(0),
        _bucket(N), _bucket(M),
        METRIC=metric_code(metric), SYMMETRIC=symmetric,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
    )


def _backward_one_side(
    grad: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    metric: str,
    transpose: bool,
    config: PairwiseConfig | None,
) -> torch.Tensor:
    """dL/dx when transpose=False; dL/dy (x and y swapped, G and out read transposed) otherwise."""
    if transpose:
        grad, out, x, y = grad.transpose(1, 2), out.transpose(1, 2), y, x
    B, N, D = x.shape
    M = y.shape[1]
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The kernel writes the final gradient in the input dtype from its fp32 registers; only cosine
    # keeps an fp32 buffer, for its O(N D) radial projection epilogue.
    gx = torch.empty(B, N, D, dtype=acc_torch if metric == "cosine" else x.dtype, device=x.device)
    if gx.numel() == 0:
        return gx.to(x.dtype)
    if M == 0:
        return gx.zero_().to(x.dtype)
    y_scale = safe_inverse(row_norms(y)) if metric == "cosine" else torch.empty(B, 1, device=x.device)
    dot_dtype, acc_dtype, precision = dot_dtypes(x.dtype)
    launch = _launcher(_pairwise_backward_kernel, "backward", x.dtype, config)
    # Row blocks are grid y, which CUDA caps at 65535 (fp64's 32-row tiles pass it at N > 2.1M):
    # larger N is launched in row slices that fit the smallest tile the launch may pick. (Folding
    # rows into grid x instead cost registers: 12-16 more bytes of spills on triton 3.6.)
    rows_per_launch = MAX_GRID_YZ * min(t.block_m for t in _candidate_tiles("backward", x.dtype, config))
    for r0 in range(0, N, rows_per_launch):
        r1 = min(N, r0 + rows_per_launch)
        g_r, out_r, x_r, gx_r = grad[:, r0:r1], out[:, r0:r1], x[:, r0:r1], gx[:, r0:r1]

        def grid(meta, rows=r1 - r0):
            return (cdiv(D, meta["BLOCK_D"]), cdiv(rows, meta["BLOCK_M"]), B)

        launch(
            grid, g_r, out_r, x_r, y, y_scale, gx_r,
            r1 - r0, M, D,
            *g_r.stride(), *out_r.stride(), *x_r.stride(), *y.stride(),
            y_scale.stride(0), *gx_r.stride(),
            _bucket(r1 - r0), _bucket(M),
            METRIC=metric_code(metric), DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
        )
    if metric == "cosine":
        # d(x/|x|)/dx = (I - x_hat x_hat^T) / |x|: an O(N D) epilogue over the kernel's dL/dx_hat.
        x_inv = safe_inverse(row_norms(x)).unsqueeze(-1)
        x_hat = x.to(acc_torch) * x_inv
        gx = (gx - (gx * x_hat).sum(-1, keepdim=True) * x_hat) * x_inv
    return gx.to(x.dtype)


# Elements of one row chunk of the W matrix of the 16-bit backward (256 MiB in bf16): the extra
# memory of a backward whose output is larger than this, whatever N x M is.
WEIGHTS_BLOCK_ELEMENTS = 1 << 27
# Columns per program of the W map (4 warps: 8 per thread, one 16-byte access); small under the
# interpreter so that tests cover several column blocks.
_WEIGHTS_BLOCK, _WEIGHTS_BLOCK_INTERPRETER = 1024, 16
# The GEMM operands gain a ones column (for the sums) and zeros up to a multiple of this many
# columns: cuBLAS takes the tensor-core path on 16-byte-aligned rows.
_SUM_COLUMN_ALIGN = 8
# The metrics whose 16-bit backward takes the W + GEMM path. Cosine keeps the fused kernel: its
# gradient is the difference of two nearly parallel vectors when rows point alike, and a GEMM
# output rounded to 16 bits before that difference lost up to 10x the fused kernel's accuracy.
WEIGHTS_GEMM_METRICS = ("euclidean", "sqeuclidean", "dot")


def uses_weights_gemm(dtype: torch.dtype, metric: str) -> bool:
    """Whether the backward of ``dtype`` inputs takes the W + GEMM path (see the module docstring)."""
    if dtype == torch.bfloat16:
        gemm = metric in WEIGHTS_GEMM_METRICS
    else:  # fp16's range: only dot, whose GEMM outputs are the gradient itself
        gemm = dtype == torch.float16 and metric == "dot"
    return gemm and not torch.are_deterministic_algorithms_enabled()


def _with_ones_column(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, D) -> (B, N, D') in ``dtype``: x, a column of ones (its GEMM output is a row sum),
    zeros up to D' = D + 1 rounded up to :data:`_SUM_COLUMN_ALIGN`."""
    B, N, D = x.shape
    width = -(-(D + 1) // _SUM_COLUMN_ALIGN) * _SUM_COLUMN_ALIGN
    out = torch.zeros(B, N, width, dtype=dtype, device=x.device)
    out[..., :D] = x
    out[..., D] = 1
    return out


def _bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of 16-bit operands with fp32 accumulation and an fp32 result: the row and column
    sums and the products meet in differences that cancel, which a 16-bit output would round first.
    cuBLAS writes fp32 directly (``out_dtype``, torch >= 2.8 on CUDA); elsewhere the operands are
    upcast (exact), which costs memory but computes the same."""
    if a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise  # the upcast fallback needs more memory still: fail here, with this error
        except (TypeError, RuntimeError, NotImplementedError):  # an older torch
            pass
    return torch.bmm(a.float(), b.float())


def _exact_centre(x32: torch.Tensor, y32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, D) shift c for the GEMM operands, chosen so that every ``x - c`` and ``y - c`` is exact in
    ``dtype``: the column mean rounded to ``dtype`` where all values lie within 1/2.1 of it (then
    ``c / 2 <= v <= 2 c`` and the difference is exact, by Sterbenz's lemma), else 0 (the values
    themselves, exact). A mean that is not a ``dtype`` value rounded every ``v - c`` by the same
    amount within a binade: errors that add up over M rows instead of averaging out."""
    n = x32.shape[1] + y32.shape[1]
    mean = (x32.sum(1, keepdim=True) + y32.sum(1, keepdim=True)) / n
    centre = mean.to(dtype).float()
    spread = torch.maximum((x32 - centre).abs().amax(1, keepdim=True), (y32 - centre).abs().amax(1, keepdim=True))
    return torch.where(centre.abs() >= 2.1 * spread, centre, torch.zeros_like(centre))


def _backward_weights_gemm(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) of 16-bit inputs: W once (in row chunks), then ``W @ y`` and ``W^T @ x``.

    dL/dx_i = 2 sum_j w_ij (x_i - y_j) = 2 (rowsum_i (x_i - c) - (W @ (y - c))_i) for any shift
    c. The two terms cancel when x_i is near the W-weighted mean of the y_j, so both come out of
    the GEMMs in fp32 (:func:`_bmm_fp32`), and the operands ``y - c`` are exact 16-bit values
    (:func:`_exact_centre`): data far from the origin is shifted by its mean, rounded to the
    operand dtype (at an offset of 32 the unshifted bf16 gradient was 5 % off), and data around it
    is not shifted. A mean shift that was not exact, with 16-bit GEMM outputs, gave 400 % error
    for a row at the centre of 700 symmetric rows. The row and column sums of W come out of the
    same GEMMs, as the product with a ones column appended to the operands.

    The Euclidean W = g / (2 d) meets two rounded products instead of the exact difference
    x_i - y_j the fused kernel multiplies, which costs about g |x - c| / d times the 16-bit
    epsilon. Identical rows (a P x K sampler's duplicates) have a GEMM-form distance of rounding
    noise, not 0 (1.4e-3 for bf16 rows of norm 3), so their W was huge: 376 % error in a bf16 test
    of repeated rows, whose reference subgradient is 0. Pairs closer than
    2**-8 sqrt(|x|^2 + |y|^2), the scale at which the forward's own distance is ~1 % off, therefore
    get the zero subgradient of identical rows; past it the error per pair stays under ~0.7 g
    (bf16, at the threshold) and ~0.01 g for typical distances, within the 16-bit rounding of a
    sum over many pairs.
    """
    B, N, D = x.shape
    M = y.shape[1]
    grad = grad.contiguous()
    if metric == "dot":  # W = G, no sums: two GEMMs, which are the gradient
        return torch.bmm(grad, y).neg_(), torch.bmm(grad.transpose(1, 2), x).neg_()
    if metric == "euclidean":  # the noise floor's scale: the forward's own squared norms
        x_sq = _metric_norms(x, metric)
        y_sq = x_sq if y is x else _metric_norms(y, metric)
    x32, y32 = x.float(), y.float()
    centre = _exact_centre(x32, y32, x.dtype)
    x32, y32 = x32 - centre, y32 - centre
    x_op, y_op = _with_ones_column(x32, x.dtype), _with_ones_column(y32, y.dtype)
    if metric == "sqeuclidean":  # W = G: no map, no chunks
        wy, wtx = _bmm_fp32(grad, y_op), _bmm_fp32(grad.transpose(1, 2), x_op)
    else:
        out = out.contiguous()
        block = _WEIGHTS_BLOCK_INTERPRETER if triton_interpreter_enabled() else _WEIGHTS_BLOCK
        rows_per_chunk = max(1, min(N, WEIGHTS_BLOCK_ELEMENTS // max(B * M, 1)))
        w_buffer = torch.empty(B, rows_per_chunk, M, dtype=x.dtype, device=x.device)
        wy_chunks = []
        wtx_sum = None  # sum over chunks of W_c^T @ x_c (fp32)
        for r0 in range(0, N, rows_per_chunk):
            r1 = min(N, r0 + rows_per_chunk)
            w_c = w_buffer[:, : r1 - r0]
            g_c, out_c = grad[:, r0:r1], out[:, r0:r1]
            x_sq_c = x_sq[:, r0:r1]
            _pairwise_grad_weights_kernel[((r1 - r0) * cdiv(M, block), 1, B)](
                g_c, out_c, x_sq_c, y_sq, w_c, M,
                g_c.stride(0), g_c.stride(1), out_c.stride(0), out_c.stride(1),
                x_sq_c.stride(0), y_sq.stride(0), w_c.stride(0), w_c.stride(1),
                BLOCK=block, num_warps=4, **LAUNCH_OPTIONS,
            )
            wy_chunks.append(_bmm_fp32(w_c, y_op))
            part = _bmm_fp32(w_c.transpose(1, 2), x_op[:, r0:r1])
            if wtx_sum is None:
                wtx_sum = part
            else:
                wtx_sum += part
        wy = wy_chunks[0] if len(wy_chunks) == 1 else torch.cat(wy_chunks, dim=1)
        wtx = cast(torch.Tensor, wtx_sum)  # the loop ran: this path is taken for non-empty inputs only
    gx = 2.0 * (wy[..., D:D + 1] * x32 - wy[..., :D])
    gy = 2.0 * (wtx[..., D:D + 1] * y32 - wtx[..., :D])
    return gx.to(x.dtype), gy.to(y.dtype)


def pairwise_distance_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    metric: str,
    config: PairwiseConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: (dL/dx (B, N, D), dL/dy (B, M, D)) from dL/dout (B, N, M).

    bf16 inputs (and fp16 with ``dot``) take the W + GEMM path (extra memory: one row chunk of W,
    at most :data:`WEIGHTS_BLOCK_ELEMENTS` elements) except for cosine; ``config`` pins the fused
    kernel's tiles (and with it the fused path, as do fp32/fp64, cosine and
    ``torch.use_deterministic_algorithms``).
    """
    if x.shape[0] > MAX_GRID_BATCH:
        return backward_in_batch_slices(pairwise_distance_backward_triton, MAX_GRID_BATCH, grad, x, y, out, metric,
                                        config)
    if config is None and uses_weights_gemm(x.dtype, metric) and x.numel() and y.numel() and grad.numel():
        return _backward_weights_gemm(grad, x, y, out, metric)
    return (
        _backward_one_side(grad, out, x, y, metric, transpose=False, config=config),
        _backward_one_side(grad, out, x, y, metric, transpose=True, config=config),
    )
