"""Tiled Triton kernels for pairwise distances: forward and backward.

Forward: each program owns a (BLOCK_M x BLOCK_N) tile of one batch's output and loops over D
with tl.dot (fp32 accumulation), then applies the metric's epilogue from precomputed row norms.

Backward: dL/dx = a * x + W @ (s * y), where the coefficient tile W is derived on the fly from the
upstream gradient G (and the saved output for ``euclidean``); each program owns a
(BLOCK_M x BLOCK_D) tile of dL/dx and loops over the M axis. dL/dy is the same kernel with the
roles of x and y swapped (G and the output read transposed through strides, no copy). No
(B, N, M) temporary is written in either direction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops._triton_utils import dot_dtypes
from torchfg.ops.metric import metric_code, safe_inverse
from torchfg.ops.pairwise.reference import row_norms



@triton.jit
def _pairwise_forward_kernel(
    x_ptr, y_ptr, out_ptr, x_norm_ptr, y_norm_ptr,
    N, M, D,
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_ym, stride_yd,
    stride_ob, stride_on, stride_om,
    stride_xnb, stride_ynb,
    METRIC: tl.constexpr, SYMMETRIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # 64-bit offsets: B * N * M passes 2**31 for outputs the docs allow (up to 2**34 elements).
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    row_ok = rows < N
    col_ok = cols < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for d0 in tl.range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x_tile = tl.load(
            x_ptr + b * stride_xb + rows64[:, None] * stride_xn + ds[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)
        y_tile = tl.load(
            y_ptr + b * stride_yb + cols64[:, None] * stride_ym + ds[None, :] * stride_yd,
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
        dist = tl.maximum(dist, 0.0)
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
    METRIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Computes, for the rows of x owned by this program and one D slice:
    #   sq/euclid: 2 * (rowsum(W) * x - W @ y),  W = G (sq) or G / (2 out) masked (euclid)
    #   dot:       -G @ y
    #   cosine:    -G @ (y * y_scale)            (the radial projection is applied by the launcher)
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
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
        y_tile = tl.load(
            y_ptr + b * stride_yb + cols64[:, None] * stride_ym + ds[None, :] * stride_yd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(ACC_DTYPE)
        if METRIC == 2:
            y_scale = tl.load(y_scale_ptr + b * stride_ysb + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
            y_tile = y_tile * y_scale[:, None]
        if METRIC <= 1:
            w_rowsum += tl.sum(w, axis=1)
        acc += tl.dot(w.to(DOT_DTYPE), y_tile.to(DOT_DTYPE), out_dtype=ACC_DTYPE, input_precision=INPUT_PRECISION)
    if METRIC <= 1:
        x_tile = tl.load(
            x_ptr + b * stride_xb + rows64[:, None] * stride_xn + ds[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(ACC_DTYPE)
        grad = 2.0 * (w_rowsum[:, None] * x_tile - acc)
    else:
        grad = -acc
    tl.store(
        gx_ptr + b * stride_gxb + rows64[:, None] * stride_gxn + ds[None, :] * stride_gxd,
        grad.to(gx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def _block_sizes(n: int, m: int, d: int) -> tuple[int, int, int]:
    if triton_interpreter_enabled():
        return 16, 16, 32
    return 64, 64, 32


def _metric_norms(x: torch.Tensor, metric: str) -> torch.Tensor:
    norms = row_norms(x)
    if metric == "cosine":
        return safe_inverse(norms)
    return norms.square()


def pairwise_distance_triton(x: torch.Tensor, y: torch.Tensor, metric: str, symmetric: bool) -> torch.Tensor:
    """Triton forward: x (B, N, D), y (B, M, D) -> (B, N, M) in x's dtype."""
    B, N, D = x.shape
    M = y.shape[1]
    out = torch.empty(B, N, M, dtype=x.dtype, device=x.device)
    if B == 0 or N == 0 or M == 0:
        return out
    x_norm = _metric_norms(x, metric)
    y_norm = x_norm if symmetric else _metric_norms(y, metric)
    dot_dtype, acc_dtype, precision = dot_dtypes(x.dtype)
    block_m, block_n, block_d = _block_sizes(N, M, D)
    grid = (triton.cdiv(N, block_m), triton.cdiv(M, block_n), B)
    _pairwise_forward_kernel[grid](
        x, y, out, x_norm, y_norm,
        N, M, D,
        *x.stride(), *y.stride(), *out.stride(),
        x_norm.stride(0), y_norm.stride(0),
        METRIC=metric_code(metric), SYMMETRIC=symmetric,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out


def _backward_one_side(
    grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, metric: str, transpose: bool
) -> torch.Tensor:
    """dL/dx when transpose=False; dL/dy (x and y swapped, G and out read transposed) otherwise."""
    if transpose:
        grad, out, x, y = grad.transpose(1, 2), out.transpose(1, 2), y, x
    B, N, D = x.shape
    M = y.shape[1]
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx = torch.empty(B, N, D, dtype=acc_torch, device=x.device)
    if gx.numel() == 0:
        return gx.to(x.dtype)
    if M == 0:
        return gx.zero_().to(x.dtype)
    y_scale = safe_inverse(row_norms(y)) if metric == "cosine" else torch.empty(B, 1, device=x.device)
    dot_dtype, acc_dtype, precision = dot_dtypes(x.dtype)
    block_m, block_n, block_d = _block_sizes(N, M, D)
    grid = (triton.cdiv(N, block_m), triton.cdiv(D, block_d), B)
    _pairwise_backward_kernel[grid](
        grad, out, x, y, y_scale, gx,
        N, M, D,
        *grad.stride(), *out.stride(), *x.stride(), *y.stride(),
        y_scale.stride(0), *gx.stride(),
        METRIC=metric_code(metric),
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    if metric == "cosine":
        # d(x/|x|)/dx = (I - x_hat x_hat^T) / |x|: an O(N D) epilogue over the kernel's dL/dx_hat.
        x_inv = safe_inverse(row_norms(x)).unsqueeze(-1)
        x_hat = x.to(acc_torch) * x_inv
        gx = (gx - (gx * x_hat).sum(-1, keepdim=True) * x_hat) * x_inv
    return gx.to(x.dtype)


def pairwise_distance_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: (dL/dx (B, N, D), dL/dy (B, M, D)) from dL/dout (B, N, M)."""
    return (
        _backward_one_side(grad, out, x, y, metric, transpose=False),
        _backward_one_side(grad, out, x, y, metric, transpose=True),
    )
