"""Fused Triton kernels for :func:`torchfg.ops.pair_distances.anchor_pair_distances`.

The batch-hard layout: anchor row ``i`` of x against its K partners ``y[y_idx[i, k]]``.

* forward: one launch. Each program owns ``BLOCK_R`` anchors and, partner by partner, streams
  ``BLOCK_D`` columns of the anchor rows and of the gathered partner rows, accumulating in fp32
  (fp64 for fp64) ``|a - b|^2`` (exactly from the difference, never ``|a|^2 + |b|^2 - 2 a.b``),
  or ``a.b`` and the two squared norms for cosine / dot. Nothing but the (N, K) result is written.
* backward: one launch per gradient (x's; y's when y is a separate tensor that needs one). Each
  program owns BLOCK_R gradient rows and writes each exactly once, in the input dtype, from an
  fp32 (fp64) sum in registers: the row's own anchor terms plus the terms of every pair that chose
  it as a partner, found through a CSR of ``y_idx`` by partner row (stable sort + searchsorted,
  O(N K) indices). No gradient-sized fp32 buffer, no atomics, deterministic; the extra memory of
  the backward is O(N K) (plus O(N) inverse norms for cosine).

The euclidean gradient of a zero distance is 0 (never NaN); a zero row has cosine 0 to
everything and gets no cosine gradient, as in ``reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops._triton_utils import LAUNCH_OPTIONS, cdiv, next_power_of_2
from torchfg.ops.metric import inverse_norms, metric_code

__all__ = [
    "anchor_pair_distances_triton",
    "anchor_pair_distances_backward_triton",
    "finish_pair_distance",
    "ieee_div",
    "ieee_sqrt",
    "pair_distance_gradient",
]

_SQEUCLIDEAN, _EUCLIDEAN, _COSINE, _DOT = 0, 1, 2, 3


def _blocks(d: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_R anchors, BLOCK_D columns, num_warps) per program of the forward or the backward."""
    if triton_interpreter_enabled():
        # Small tiles so that test sizes still cover several anchor blocks and D chunks.
        return 8, 16, 1
    # sm_90, ptxas -v (triton 3.6, every dtype, metric and pass at D = 64 / 100 / 512 / 4096):
    # the backward at 128 or 256 columns held 242-255 registers (two 4-warp programs per SM for
    # a memory-bound gather) and spilled 16 bytes in fp32, 188-728 in fp64; at 64 it needs 56-88
    # (182 in fp64), no spills. The forward fits 128 columns (127-128 registers) except in fp64
    # (255, 16 bytes spilled; 72 at 64); 256 needed up to 204.
    widest = 64 if backward or dtype == torch.float64 else 128
    return 16, min(widest, max(32, next_power_of_2(d))), 4


@triton.jit
def ieee_sqrt(x):
    """Correctly rounded square root. fp32 ``tl.sqrt`` compiles to ``sqrt.approx.ftz.f32`` on NVIDIA
    GPUs (about 1 ulp, subnormals flushed), where the reference and Triton's interpreter round
    correctly; fp64's ``sqrt`` is already ``sqrt.rn.f64``."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def ieee_div(x, y):
    """Correctly rounded division. fp32 ``/`` compiles to ``div.full.f32`` (up to 2 ulp); fp64's
    ``/`` is already ``div.rn.f64``. ``y`` is a tensor (it decides the dtype); ``x`` may be a constant."""
    if y.dtype == tl.float32:
        return tl.div_rn(x, y)
    return x / y


@triton.jit
def finish_pair_distance(first, a_sq, b_sq, METRIC: tl.constexpr):
    """Per row, the distance from the row sums of |a-b|^2 (Euclidean metrics) or a.b, |a|^2, |b|^2.

    Correctly rounded (:func:`ieee_sqrt`, :func:`ieee_div`): these are the exact distances that the
    k-NN recomputation and the fused loss return, O(N K) of them, not a GEMM tile's epilogue."""
    if METRIC == 1:
        return ieee_sqrt(first)
    elif METRIC == 2:
        norms = ieee_sqrt(a_sq) * ieee_sqrt(b_sq)
        cos = tl.where(norms > 0, ieee_div(first, tl.where(norms > 0, norms, 1.0)), 0.0)
        return 1.0 - cos
    elif METRIC == 3:
        return -first
    return first


@triton.jit
def pair_distance_gradient(g, dist, a, b, a_inv, b_inv, METRIC: tl.constexpr):
    """(R, BLOCK_D) columns of g * d(d(a, b))/da per row, from the forward's distance ``dist`` (R,)
    and, for cosine, the inverse norms (R,) of a and b. The gradient of b is this with a and b
    swapped (every metric is symmetric)."""
    if METRIC == 1:
        # d|a-b|/da = (a - b) / |a - b|, and 0 (a subgradient) at a zero distance.
        coef = tl.where(dist > 0, g / tl.where(dist > 0, dist, 1.0), 0.0)
        return coef[:, None] * (a - b)
    elif METRIC == 0:
        return (2.0 * g)[:, None] * (a - b)
    elif METRIC == 2:
        # d(1 - a^.b^)/da = -(b^ - cos a^) / |a|.
        cos = 1.0 - dist
        return -(g * a_inv)[:, None] * (b * b_inv[:, None] - cos[:, None] * a * a_inv[:, None])
    return -g[:, None] * b


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
            # 64-bit: a column-major operand steps columns by N (up to 2**20): col * stride passes 2**31.
            cols64 = cols.to(tl.int64)
            mask = row_ok[:, None] & (cols[None, :] < D)
            # Upcast right after the load: the interpreter mishandles bf16 arithmetic.
            a = tl.load(a_base + cols64[None, :] * stride_xd, mask=mask, other=0.0).to(ACC_DTYPE)
            b = tl.load(b_base + cols64[None, :] * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
            if METRIC <= 1:
                diff = a - b
                first += diff * diff
            else:
                first += a * b
                if METRIC == 2:
                    a_sq += a * a
                    b_sq += b * b
        value = finish_pair_distance(tl.sum(first, axis=1), tl.sum(a_sq, axis=1), tl.sum(b_sq, axis=1), METRIC)
        tl.store(out_ptr + rows64 * K + k, value, mask=row_ok)


@triton.jit
def _anchor_pair_bwd_kernel(
    grad_ptr, out_ptr, x_ptr, y_ptr, idx_ptr, x_inv_ptr, y_inv_ptr, order_ptr, ends_ptr, counts_ptr, g_ptr,
    R, K, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    METRIC: tl.constexpr, ACC_DTYPE: tl.constexpr, OWN: tl.constexpr, PARTNER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [0, R) of one gradient, each written once, in the gradient's dtype (no atomics).

    OWN: row j is anchor j of x; add the terms of its K pairs (x's gradient).
    PARTNER: row j is a partner row (of y, which may be x); add the terms of every pair that
    chose it, listed by ``order[ends[j] - counts[j] : ends[j]]`` (pair ids i * K + k, the CSR of
    y_idx by partner, in anchor order, so the sum is deterministic).
    Pairs whose index is negative have no partner and add nothing to either gradient.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    if PARTNER:
        count = tl.load(counts_ptr + rows64, mask=row_ok, other=0)
        first = tl.load(ends_ptr + rows64, mask=row_ok, other=0) - count
        longest = tl.max(count, axis=0)
    # Inverse norms are read for cosine only; the other metrics ignore these.
    own_inv = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    row_inv = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    if METRIC == 2:
        if OWN:
            own_inv = tl.load(x_inv_ptr + rows64, mask=row_ok, other=0.0)
        if PARTNER:
            row_inv = tl.load(y_inv_ptr + rows64, mask=row_ok, other=0.0)
    for d0 in tl.range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        # 64-bit: a column-major operand steps columns by N (up to 2**20): col * stride passes 2**31.
        cols64 = cols.to(tl.int64)
        mask = row_ok[:, None] & (cols[None, :] < D)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
        if OWN:
            # Upcast right after the load: the interpreter mishandles bf16 arithmetic.
            a = tl.load(x_ptr + rows64[:, None] * stride_xn + cols64[None, :] * stride_xd, mask=mask, other=0.0)
            a = a.to(ACC_DTYPE)
            for k in tl.range(0, K):
                pair = rows64 * K + k
                # A negative index is a pair without a partner (an unpaired anchor): it adds 0.
                partner = tl.load(idx_ptr + pair, mask=row_ok, other=-1).to(tl.int64)
                paired = partner >= 0
                g = tl.load(grad_ptr + pair, mask=paired, other=0.0).to(ACC_DTYPE)
                dist = tl.load(out_ptr + pair, mask=paired, other=0.0).to(ACC_DTYPE)
                b = tl.load(y_ptr + partner[:, None] * stride_yn + cols64[None, :] * stride_yd,
                            mask=mask & paired[:, None], other=0.0)
                b = b.to(ACC_DTYPE)
                b_inv = g
                if METRIC == 2:
                    b_inv = tl.load(y_inv_ptr + partner, mask=paired, other=0.0)
                acc += pair_distance_gradient(g, dist, a, b, own_inv, b_inv, METRIC)
        if PARTNER:
            b = tl.load(y_ptr + rows64[:, None] * stride_yn + cols64[None, :] * stride_yd, mask=mask, other=0.0)
            b = b.to(ACC_DTYPE)
            for t in tl.range(0, longest):
                listed = row_ok & (t < count)
                pair = tl.load(order_ptr + first + t, mask=listed, other=0).to(tl.int64)
                anchor = pair // K
                g = tl.load(grad_ptr + pair, mask=listed, other=0.0).to(ACC_DTYPE)
                dist = tl.load(out_ptr + pair, mask=listed, other=0.0).to(ACC_DTYPE)
                a_mask = listed[:, None] & (cols[None, :] < D)
                a = tl.load(x_ptr + anchor[:, None] * stride_xn + cols64[None, :] * stride_xd, mask=a_mask, other=0.0)
                a = a.to(ACC_DTYPE)
                a_inv = g
                if METRIC == 2:
                    a_inv = tl.load(x_inv_ptr + anchor, mask=listed, other=0.0)
                acc += pair_distance_gradient(g, dist, b, a, row_inv, a_inv, METRIC)
        tl.store(g_ptr + rows64[:, None] * D + cols[None, :], acc.to(g_ptr.dtype.element_ty), mask=mask)


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
    block_r, block_d, warps = _blocks(x.shape[1], x.dtype, backward=False)
    _anchor_pair_fwd_kernel[(cdiv(n, block_r),)](
        x, y, y_idx, out, n, k, x.shape[1],
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        METRIC=metric_code(metric), ACC_DTYPE=acc_tl, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        **LAUNCH_OPTIONS,
    )
    return out


def _csr_by_partner(y_idx: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, ends, counts): pair ids i * K + k grouped by partner row, stably (anchor order).

    The row boundaries come from one ``searchsorted`` of the sorted ids, not a ``bincount``: on
    CUDA bincount reads the ids' minimum and maximum back to the host, two synchronisations per
    backward.
    """
    flat = y_idx.reshape(-1)
    partners, order = torch.sort(flat, stable=True)
    # bounds[r] = the first sorted position whose partner is >= r; row r owns bounds[r]:bounds[r + 1].
    # Negative ids (pairs without a partner) sort before bounds[0] and belong to no row.
    bounds = torch.searchsorted(partners, torch.arange(rows + 1, device=flat.device, dtype=flat.dtype))
    ends = bounds[1:]
    return order, ends, ends - bounds[:-1]


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

    Every gradient row is written once, in the input dtype, from an fp32 (fp64) sum kept in
    registers: no gradient-sized accumulator, no atomics, deterministic. The partner terms are
    found through a CSR of ``y_idx`` by partner row (a stable sort and a searchsorted, O(N K log N K)).
    A negative entry of ``y_idx`` is a pair without a partner (the fused triplet loss's unpaired
    anchors; the public op, its reference and the forward take entries in [0, M) only): it adds
    nothing and stays out of the CSR, so no partner row walks it.
    With ``y_is_x`` the partner terms go into dL/dx and the second tensor is empty; without
    ``needs_grad_y`` (e.g. a detached cross-batch memory) they are skipped (no CSR) and the
    second tensor is empty too.
    """
    acc, acc_tl = _acc_dtype(x.dtype)
    n, k = y_idx.shape
    d = x.shape[1]
    partner_grad = y_is_x or needs_grad_y
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device) if needs_grad_y and not y_is_x else x.new_empty(0)
    if d == 0:
        return grad_x, grad_y
    grad, out, y_idx = grad.contiguous(), out.contiguous(), y_idx.contiguous()  # the kernel reads row * K + k
    dummy = out  # placeholder pointer for arguments a launch does not read
    if k and partner_grad:
        order, ends, counts = _csr_by_partner(y_idx, y.shape[0])
    else:
        order = ends = counts = dummy
    x_inv = inverse_norms(x, acc) if metric == "cosine" else dummy
    y_inv = (x_inv if y_is_x else inverse_norms(y, acc)) if metric == "cosine" else dummy
    block_r, block_d, warps = _blocks(d, x.dtype, backward=True)
    common = dict(METRIC=metric_code(metric), ACC_DTYPE=acc_tl, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1))

    def launch(target: torch.Tensor, rows: int, own: bool, partner: bool) -> None:
        if rows:
            _anchor_pair_bwd_kernel[(cdiv(rows, block_r),)](
                grad, out, x, y, y_idx, x_inv, y_inv, order, ends, counts, target, rows, k, d, *strides,
                OWN=own and k > 0, PARTNER=partner and k > 0, **common, **LAUNCH_OPTIONS,
            )

    if y_is_x:
        launch(grad_x, n, True, True)
        return grad_x, grad_y
    launch(grad_x, n, True, False)
    if needs_grad_y:
        launch(grad_y, y.shape[0], False, True)
    return grad_x, grad_y
