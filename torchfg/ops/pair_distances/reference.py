"""Pure-PyTorch distances of selected row pairs, exactly from ``a - b``: the ground truth.

The triplet losses select pairs with a fast-path (GEMM) miner and then compute the returned loss
of the selected pairs here, from the difference of the rows, so the value is exact and the
backward touches only the selected rows: O(K D), chunked so the temporaries are O(chunk x D).
"""

from __future__ import annotations

import torch

from torchfg._validation import accumulation_dtype
from torchfg.ops.metric import inverse_norms

__all__ = [
    "pair_distances_reference",
    "pair_distances_backward_reference",
    "anchor_pair_distances_reference",
    "anchor_pair_distances_backward_reference",
]


# ----------------------------------------------------------------------------- exact pair distances

# Pairs per chunk in pair_distances: bounds the (chunk x D) fp32 temporaries to ~4 MiB each.
PAIR_CHUNK_ELEMENTS = 1 << 20


def _pair_chunk(d: int) -> int:
    return max(PAIR_CHUNK_ELEMENTS // max(d, 1), 1)


class _RowBuffers:
    """Two reused (chunk x D) buffers that gathered rows are written into, in the accumulation dtype."""

    def __init__(self, rows: int, d: int, acc: torch.dtype, device: torch.device) -> None:
        self.a = torch.empty(rows, d, dtype=acc, device=device)
        self.b = torch.empty(rows, d, dtype=acc, device=device)

    @staticmethod
    def _gather(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if src.dtype == out.dtype:
            return torch.index_select(src, 0, idx, out=out)
        return out.copy_(src.index_select(0, idx))

    def gather(
        self, x: torch.Tensor, y: torch.Tensor, x_idx: torch.Tensor, y_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = x_idx.shape[0]
        return self._gather(x, x_idx, self.a[:k]), self._gather(y, y_idx, self.b[:k])


def pair_distances_reference(
    x: torch.Tensor, y: torch.Tensor, x_idx: torch.Tensor, y_idx: torch.Tensor, metric: str
) -> torch.Tensor:
    """d(x[x_idx[k]], y[y_idx[k]]) for each k, computed exactly from the difference of the rows.

    x (N, D), y (M, D), x_idx / y_idx (K,) int64 -> (K,) in fp32 (fp64 for fp64). Processed in
    chunks of pairs, so the temporaries are O(chunk x D) and nothing is kept for the backward.
    """
    acc = accumulation_dtype(x.dtype)
    k = x_idx.shape[0]
    out = torch.empty(k, dtype=acc, device=x.device)
    step = _pair_chunk(x.shape[1])
    buffers = _RowBuffers(min(step, k), x.shape[1], acc, x.device)
    for start in range(0, k, step):
        stop = min(start + step, k)
        a, b = buffers.gather(x, y, x_idx[start:stop], y_idx[start:stop])
        if metric in ("euclidean", "sqeuclidean"):
            diff = a.sub_(b)
            value = torch.linalg.vecdot(diff, diff)
            if metric == "euclidean":
                value.sqrt_()
        elif metric == "cosine":
            a_inv = inverse_norms(a, a.dtype)
            b_inv = inverse_norms(b, b.dtype)
            value = torch.linalg.vecdot(a, b).mul_(a_inv).mul_(b_inv).neg_().add_(1.0)
        else:
            value = torch.linalg.vecdot(a, b).neg_()
        out[start:stop] = value
    return out


def pair_distances_backward_reference(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    x_idx: torch.Tensor,
    y_idx: torch.Tensor,
    out: torch.Tensor,
    metric: str,
    y_is_x: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic (dL/dx (N, D), dL/dy (M, D)) of :func:`pair_distances_reference`, O(K D).

    The euclidean gradient of a zero distance is 0 (a finite subgradient), never NaN; a zero row
    has cosine 0 to everything and gets no cosine gradient. With ``y_is_x`` both gradients are
    accumulated into the first tensor and the second is empty.
    """
    acc = accumulation_dtype(x.dtype)
    grad = grad.to(acc)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    grad_y = grad_x if y_is_x else torch.zeros(y.shape, dtype=acc, device=y.device)
    if metric == "euclidean":
        coef = torch.where(out > 0, grad / out.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(grad))
    elif metric == "sqeuclidean":
        coef = 2.0 * grad
    else:
        coef = grad
    k = x_idx.shape[0]
    step = _pair_chunk(x.shape[1])
    buffers = _RowBuffers(min(step, k), x.shape[1], acc, x.device)
    for start in range(0, k, step):
        stop = min(start + step, k)
        xi, yi = x_idx[start:stop], y_idx[start:stop]
        a, b = buffers.gather(x, y, xi, yi)
        c = coef[start:stop, None]
        if metric in ("euclidean", "sqeuclidean"):
            contribution = a.sub_(b).mul_(c)  # d/da = coef (a - b), d/db = -coef (a - b)
            grad_x.index_add_(0, xi, contribution)
            # No alpha=-1: index_add_ with alpha falls back to a much slower scatter_add_ on CPU.
            grad_y.index_add_(0, yi, contribution.neg_())
        elif metric == "cosine":
            # d(1 - a^.b^)/da = -(b^ - cos a^) / |a|
            a_inv = inverse_norms(a, a.dtype, keepdim=True)
            b_inv = inverse_norms(b, b.dtype, keepdim=True)
            a_hat, b_hat = a.mul_(a_inv), b.mul_(b_inv)
            cos = torch.linalg.vecdot(a_hat, b_hat).unsqueeze(1)
            c = c.neg()
            grad_x.index_add_(0, xi, (b_hat - cos * a_hat).mul_(a_inv).mul_(c))
            grad_y.index_add_(0, yi, (a_hat - cos * b_hat).mul_(b_inv).mul_(c))
        else:
            c = c.neg()
            grad_x.index_add_(0, xi, b.mul_(c))
            grad_y.index_add_(0, yi, a.mul_(c))
    grad_x = grad_x.to(x.dtype)
    if y_is_x:
        return grad_x, x.new_empty(0)
    return grad_x, grad_y.to(y.dtype)


# ----------------------------------------------------------------------------- anchored pair distances

# Elements of the (rows x K x D) gather buffer of anchor_pair_distances (8 MiB in fp32; 2048
# anchors at K = 2, D = 512). Few chunks matter on a shared CPU, where every parallel region can
# wait for a descheduled worker thread; the buffer bounds the extra memory.
ANCHORED_CHUNK_ELEMENTS = 1 << 21


def _anchored_rows(k: int, d: int) -> int:
    return max(ANCHORED_CHUNK_ELEMENTS // max(k * d, 1), 1)


def _gather_into(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if src.dtype == out.dtype:
        return torch.index_select(src, 0, idx, out=out)
    return out.copy_(src.index_select(0, idx))


def anchor_pair_distances_reference(x: torch.Tensor, y: torch.Tensor, y_idx: torch.Tensor, metric: str) -> torch.Tensor:
    """d(x[i], y[y_idx[i, k]]) for every anchor row i of x and k, exactly from the differences.

    x (N, D), y (M, D), y_idx (N, K) int64 -> (N, K) in fp32 (fp64 for fp64). Anchor rows are
    read in place; only the K partner rows per anchor are gathered, in chunks of anchors.
    """
    acc = accumulation_dtype(x.dtype)
    n, k = y_idx.shape
    d = x.shape[1]
    out = torch.empty(n, k, dtype=acc, device=x.device)
    step = _anchored_rows(k, d)
    buffer = torch.empty(min(step, n) * k, d, dtype=acc, device=x.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = stop - start
        a = x[start:stop].to(acc)
        b = _gather_into(y, y_idx[start:stop].reshape(-1), buffer[: rows * k]).view(rows, k, d)
        if metric in ("euclidean", "sqeuclidean"):
            diff = b.sub_(a.unsqueeze(1))
            value = torch.linalg.vecdot(diff, diff)
            if metric == "euclidean":
                value.sqrt_()
        elif metric == "cosine":
            a_inv = inverse_norms(a, a.dtype)
            b_inv = inverse_norms(b, b.dtype)
            value = torch.linalg.vecdot(b, a.unsqueeze(1)).mul_(a_inv.unsqueeze(1)).mul_(b_inv).neg_().add_(1.0)
        else:
            value = torch.linalg.vecdot(b, a.unsqueeze(1)).neg_()
        out[start:stop] = value
    return out


def anchor_pair_distances_backward_reference(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    y_idx: torch.Tensor,
    out: torch.Tensor,
    metric: str,
    y_is_x: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic (dL/dx (N, D), dL/dy (M, D)) of :func:`anchor_pair_distances_reference`, O(N K D).

    Zero euclidean distances get a zero gradient (never NaN). With ``y_is_x`` both gradients are
    accumulated into the first tensor and the second is empty.
    """
    acc = accumulation_dtype(x.dtype)
    n, k = y_idx.shape
    d = x.shape[1]
    grad = grad.to(acc)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    grad_y = grad_x if y_is_x else torch.zeros(y.shape, dtype=acc, device=y.device)
    if metric == "euclidean":
        coef = torch.where(out > 0, grad / out.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(grad))
    elif metric == "sqeuclidean":
        coef = 2.0 * grad
    else:
        coef = grad
    step = _anchored_rows(k, d)
    buffer = torch.empty(min(step, n) * k, d, dtype=acc, device=x.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = stop - start
        flat_idx = y_idx[start:stop].reshape(-1)
        a = x[start:stop].to(acc)
        b = _gather_into(y, flat_idx, buffer[: rows * k]).view(rows, k, d)
        c = coef[start:stop].unsqueeze(2)
        anchor_grad = grad_x[start:stop]
        if metric in ("euclidean", "sqeuclidean"):
            # d/da = coef (a - b) summed over the K partners; d/db = -coef (a - b) = coef (b - a).
            contribution = b.sub_(a.unsqueeze(1)).mul_(c)
            for j in range(k):
                anchor_grad.sub_(contribution[:, j])
            grad_y.index_add_(0, flat_idx, contribution.view(rows * k, d))
        elif metric == "cosine":
            # d(1 - a^.b^)/da = -(b^ - cos a^) / |a|, and symmetrically for b.
            a_inv = inverse_norms(a, a.dtype, keepdim=True)
            b_inv = inverse_norms(b, b.dtype, keepdim=True)
            a_hat = (a * a_inv).unsqueeze(1)
            b_hat = b.mul_(b_inv)
            cos = torch.linalg.vecdot(b_hat, a_hat).unsqueeze(2)
            anchor_grad.sub_(((b_hat - cos * a_hat) * c).sum(1).mul_(a_inv))
            grad_y.index_add_(0, flat_idx, ((a_hat - cos * b_hat).mul_(b_inv).mul_(c).neg_()).view(rows * k, d))
        else:
            anchor_grad.sub_((b * c).sum(1))
            grad_y.index_add_(0, flat_idx, (c * a.unsqueeze(1)).neg_().reshape(rows * k, d))
    grad_x = grad_x.to(x.dtype)
    if y_is_x:
        return grad_x, x.new_empty(0)
    return grad_x, grad_y.to(y.dtype)
