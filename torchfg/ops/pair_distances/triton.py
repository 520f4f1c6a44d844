"""Fused Triton kernels for :func:`torchfg.ops.pair_distances.anchor_pair_distances`.

The batch-hard layout: anchor row ``i`` of x against its K partners ``y[y_idx[i, k]]``.

* forward: one launch. Each program owns ``BLOCK_R`` anchors and, partner by partner, streams
  ``BLOCK_D`` columns of the anchor rows and of the gathered partner rows, accumulating in fp32
  (fp64 for fp64) ``|a - b|^2`` (exactly from the difference, never ``|a|^2 + |b|^2 - 2 a.b``),
  or ``a.b`` and the two squared norms for cosine / dot. Nothing but the (N, K) result is written.
* backward: one launch (plus the zero fill of its accumulator, and a cast for fp16/bf16 inputs).
  Each program recomputes what the metric's gradient needs for its anchors and adds the anchor
  terms and the partner terms into an fp32 (fp64) gradient with atomics: a partner row may be
  chosen by many anchors (and, with y = x, also be an anchor itself). Summation order, and so
  the last bits of a gradient row that several anchors touch, is not deterministic.

The euclidean gradient of a zero distance is 0 (never NaN); a zero row has cosine 0 to
everything and gets no cosine gradient, as in ``reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops.metric import metric_code

__all__ = ["anchor_pair_distances_triton", "anchor_pair_distances_backward_triton"]

_SQEUCLIDEAN, _EUCLIDEAN, _COSINE, _DOT = 0, 1, 2, 3


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_R anchors, BLOCK_D columns, num_warps) per program."""
    if triton_interpreter_enabled():
        # Small tiles so that test sizes still cover several anchor blocks and D chunks.
        return 8, 16, 1
    block_d = min(256, max(32, triton.next_power_of_2(d)))
    return 16, block_d, 4


@triton.jit
def _anchor_pair_fwd_kernel(
    x_ptr, y_ptr, idx_ptr, out_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    METRIC: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    a_base = x_ptr + rows64[:, None] * stride_xn
    for k in tl.range(0, K):
        partner = tl.load(idx_ptr + rows64 * K + k, mask=row_ok, other=0).to(tl.int64)
        b_base = y_ptr + partner[:, None] * stride_yn
        first = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)  # |a-b|^2 or a.b
        a_sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
        b_sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
        for d0 in tl.range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols[None, :] < D)
            # Upcast right after the load: the interpreter mishandles bf16 arithmetic.
            a = tl.load(a_base + cols[None, :] * stride_xd, mask=mask, other=0.0).to(ACC_DTYPE)
            b = tl.load(b_base + cols[None, :] * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
            if METRIC <= 1:
                diff = a - b
                first += diff * diff
            else:
                first += a * b
                if METRIC == 2:
                    a_sq += a * a
                    b_sq += b * b
        value = tl.sum(first, axis=1)
        if METRIC == 1:
            value = tl.sqrt(value)
        elif METRIC == 2:
            norms = tl.sqrt(tl.sum(a_sq, axis=1)) * tl.sqrt(tl.sum(b_sq, axis=1))
            cos = tl.where(norms > 0, value / tl.where(norms > 0, norms, 1.0), 0.0)
            value = 1.0 - cos
        elif METRIC == 3:
            value = -value
        tl.store(out_ptr + rows64 * K + k, value, mask=row_ok)


@triton.jit
def _anchor_pair_bwd_kernel(
    grad_ptr, out_ptr, x_ptr, y_ptr, idx_ptr, gx_ptr, gy_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    METRIC: tl.constexpr, ACC_DTYPE: tl.constexpr, GRAD_Y: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gx (N, D) and gy (M, D) are contiguous accumulators in ACC_DTYPE (gx may be gy)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    a_base = x_ptr + rows64[:, None] * stride_xn
    ga_base = gx_ptr + rows64[:, None] * D
    a_inv = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    if METRIC == 2:
        a_sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
        for d0 in tl.range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(a_base + cols[None, :] * stride_xd, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
            a = a.to(ACC_DTYPE)
            a_sq += a * a
        a_norm = tl.sqrt(tl.sum(a_sq, axis=1))
        a_inv = tl.where(a_norm > 0, 1.0 / tl.where(a_norm > 0, a_norm, 1.0), 0.0)
    for k in tl.range(0, K):
        partner = tl.load(idx_ptr + rows64 * K + k, mask=row_ok, other=0).to(tl.int64)
        b_base = y_ptr + partner[:, None] * stride_yn
        gb_base = gy_ptr + partner[:, None] * D
        g = tl.load(grad_ptr + rows64 * K + k, mask=row_ok, other=0.0).to(ACC_DTYPE)
        dist = tl.load(out_ptr + rows64 * K + k, mask=row_ok, other=0.0).to(ACC_DTYPE)
        if METRIC == 1:
            # d|a-b|/da = (a - b) / |a - b|, and 0 (a subgradient) at a zero distance.
            coef = tl.where(dist > 0, g / tl.where(dist > 0, dist, 1.0), 0.0)
        elif METRIC == 0:
            coef = 2.0 * g
        else:
            coef = g
        b_inv = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        cos = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        if METRIC == 2:
            b_sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
            for d0 in tl.range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                b = tl.load(b_base + cols[None, :] * stride_yd, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
                b = b.to(ACC_DTYPE)
                b_sq += b * b
            b_norm = tl.sqrt(tl.sum(b_sq, axis=1))
            b_inv = tl.where(b_norm > 0, 1.0 / tl.where(b_norm > 0, b_norm, 1.0), 0.0)
            cos = 1.0 - dist
        for d0 in tl.range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols[None, :] < D
            mask = row_ok[:, None] & col_ok
            a = tl.load(a_base + cols[None, :] * stride_xd, mask=mask, other=0.0).to(ACC_DTYPE)
            b = tl.load(b_base + cols[None, :] * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
            if METRIC <= 1:
                ga = coef[:, None] * (a - b)
                gb = -ga
            elif METRIC == 2:
                # d(1 - a^.b^)/da = -(b^ - cos a^) / |a|, and symmetrically for b.
                a_hat = a * a_inv[:, None]
                b_hat = b * b_inv[:, None]
                ga = -coef[:, None] * (b_hat - cos[:, None] * a_hat) * a_inv[:, None]
                gb = -coef[:, None] * (a_hat - cos[:, None] * b_hat) * b_inv[:, None]
            else:
                ga = -coef[:, None] * b
                gb = -coef[:, None] * a
            tl.atomic_add(ga_base + cols[None, :], ga, mask=mask)
            if GRAD_Y:
                tl.atomic_add(gb_base + cols[None, :], gb, mask=mask)


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def anchor_pair_distances_triton(
    x: torch.Tensor, y: torch.Tensor, y_idx: torch.Tensor, metric: str, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """d(x[i], y[y_idx[i, k]]) in one launch.

    Args:
        x: (N, D) fp16/bf16/fp32/fp64 CUDA tensor (CPU under ``TRITON_INTERPRET=1``), any strides.
        y: (M, D), same dtype and device (may be x).
        y_idx: (N, K) int64, contiguous, entries in [0, M) (checked by the public op).
        metric: one of :data:`torchfg.ops.metric.METRICS`.
        out: optional (N, K) contiguous buffer of the accumulation dtype, overwritten entirely.

    Returns:
        (N, K) in fp32 (fp64 for fp64 inputs).
    """
    acc, acc_tl = _acc_dtype(x.dtype)
    n, k = y_idx.shape
    if out is None:
        out = torch.empty(n, k, dtype=acc, device=x.device)
    if n == 0 or k == 0:
        return out
    block_r, block_d, warps = _blocks(x.shape[1])
    _anchor_pair_fwd_kernel[(triton.cdiv(n, block_r),)](
        x, y, y_idx, out, n, k, x.shape[1],
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        METRIC=metric_code(metric), ACC_DTYPE=acc_tl, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def anchor_pair_distances_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    y_idx: torch.Tensor,
    out: torch.Tensor,
    metric: str,
    y_is_x: bool,
    needs_grad_y: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx (N, D), dL/dy (M, D)) in the input dtype from ``grad`` = dL/d(out) (N, K).

    With ``y_is_x`` the partner terms go into dL/dx and the second tensor is empty; without
    ``needs_grad_y`` (e.g. a detached cross-batch memory) the partner terms are skipped and the
    second tensor is empty too.
    """
    acc, acc_tl = _acc_dtype(x.dtype)
    n, k = y_idx.shape
    d = x.shape[1]
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    grad_y = grad_x if y_is_x else (torch.zeros(y.shape, dtype=acc, device=y.device) if needs_grad_y else grad_x)
    if n and k and d:
        block_r, block_d, warps = _blocks(d)
        _anchor_pair_bwd_kernel[(triton.cdiv(n, block_r),)](
            grad.contiguous(), out.contiguous(), x, y, y_idx, grad_x, grad_y, n, k, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            METRIC=metric_code(metric), ACC_DTYPE=acc_tl, GRAD_Y=y_is_x or needs_grad_y,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    grad_x_out = grad_x.to(x.dtype)
    if y_is_x or not needs_grad_y:
        return grad_x_out, x.new_empty(0)
    return grad_x_out, grad_y.to(y.dtype)
