"""Pure-PyTorch pairwise distances: the ground truth and the CPU path.

All functions take flattened batches, x: (B, N, D), y: (B, M, D), and compute in fp32
(fp64 for fp64 inputs) whatever the input dtype. Rows are processed in chunks so the
fp32 temporaries stay O(chunk x M) on top of the (B, N, M) output.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torchfg._validation import accumulation_dtype
from torchfg.ops.metric import safe_inverse


# Elements of one (B, rows, M) block of temporaries on the CPU, forward and backward (4 MiB in
# fp32): the reference needs one block beyond its inputs, output and gradients, whatever N is.
# The GEMM writes straight into the output where it can and the backward reuses one block, so
# forward + backward stay under torch.cdist's memory (N = 2048, D = 128, 1 thread: a tensor
# peak of 23 MiB against cdist's 38, and 50 with 16 MiB blocks and fresh temporaries; also
# faster, 128 against 170 ms in one process).
BLOCK_ELEMENTS = 1 << 20
# On a GPU each block costs a dozen launches: larger blocks (64 MiB), memory is less scarce.
BLOCK_ELEMENTS_GPU = 1 << 24


def _rows_per_block(b: int, n: int, m: int, device: torch.device) -> int:
    budget = BLOCK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS_GPU
    return max(1, min(n, budget // max(b * m, 1)))


def _batch_step(b: int, n: int, m: int, device: torch.device) -> int | None:
    """Batch elements per block when the (b, rows, m) block budget leaves fewer rows per block than
    one batch element alone would get; None when all b fit.

    With b * m at or above the budget, whole-batch blocks are one row each: N batched GEMVs that
    each re-read all of y (3-4x torch.cdist at b = 256, m = 4096). Blocks of a few batch elements
    keep the rows per GEMM.
    """
    budget = BLOCK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS_GPU
    rows_alone = max(1, min(n, budget // max(m, 1)))
    if b <= 1 or _rows_per_block(b, n, m, device) >= rows_alone:
        return None
    return max(1, budget // (rows_alone * max(m, 1)))


def backward_in_batch_slices(
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    step: int,
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    *args: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) of ``backward(grad, x, y, out, *args)`` run on slices of ``step`` batch
    elements, concatenated: the reference's block budget and the Triton kernels' grid-z cap."""
    parts = [
        backward(grad[b0 : b0 + step], x[b0 : b0 + step], y[b0 : b0 + step], out[b0 : b0 + step], *args)
        for b0 in range(0, x.shape[0], step)
    ]
    return torch.cat([gx for gx, _ in parts]), torch.cat([gy for _, gy in parts])


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N) Euclidean norms in the accumulation dtype."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=accumulation_dtype(x.dtype))


def pairwise_distance_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    metric: str,
    symmetric: bool = False,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Distances between the rows of x (B, N, D) and y (B, M, D) -> (B, N, M) in x's dtype.

    ``symmetric=True`` says y is x: the diagonal is then set to exactly 0 for the metrics
    where d(a, a) = 0 (the fast path leaves rounding noise there). ``chunk_rows`` rows of x per
    block (default: blocks of :data:`BLOCK_ELEMENTS`).
    """
    acc = accumulation_dtype(x.dtype)
    B, N, _ = x.shape
    M = y.shape[1]
    if chunk_rows is None and (batch_step := _batch_step(B, N, M, x.device)) is not None:
        return torch.cat([
            pairwise_distance_reference(x[b0 : b0 + batch_step], y[b0 : b0 + batch_step], metric, symmetric)
            for b0 in range(0, B, batch_step)
        ])
    out = torch.empty(B, N, M, dtype=x.dtype, device=x.device)
    if N == 0 or M == 0:
        return out
    y_acc = y.to(acc)
    if metric in ("sqeuclidean", "euclidean"):
        y_sq = y_acc.square().sum(-1)  # summed squares: a sqrt-then-square would add a rounding
    elif metric == "cosine":
        y_acc = y_acc * safe_inverse(row_norms(y)).unsqueeze(-1)
    y_t = y_acc.transpose(1, 2)
    chunk_rows = chunk_rows or _rows_per_block(B, N, M, x.device)
    # The GEMM writes into the output itself when it is a contiguous block of the accumulation
    # dtype (one batch); otherwise into one reused block, copied out. Called directly on tensors
    # that require grad (tests differentiate the reference), it takes fresh blocks: out= has no
    # autograd.
    differentiable = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    in_place = out.dtype == acc and B == 1 and not differentiable
    reuse = not (in_place or differentiable)
    buffer = torch.empty(B, min(chunk_rows, N), M, dtype=acc, device=x.device) if reuse else None
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        x_chunk = x[:, start:stop].to(acc)
        target = out[:, start:stop] if in_place else None if buffer is None else buffer[:, : stop - start]
        if metric == "cosine":
            x_chunk = x_chunk * safe_inverse(row_norms(x[:, start:stop])).unsqueeze(-1)
        block = torch.bmm(x_chunk, y_t, out=target)
        if metric == "dot":
            block.neg_()
        elif metric == "cosine":
            block.neg_().add_(1.0)
        else:
            x_sq = x_chunk.square().sum(-1)
            block.mul_(-2.0).add_(x_sq.unsqueeze(-1)).add_(y_sq.unsqueeze(1))
            block.clamp_min_(0.0)
            if metric == "euclidean":
                block.sqrt_()
        if symmetric and metric != "dot":
            diag = torch.arange(start, stop, device=x.device)
            local = diag - start
            if metric == "cosine":
                nonzero = row_norms(x[:, start:stop]) > 0
                block[:, local, diag] = torch.where(nonzero, torch.zeros_like(nonzero, dtype=acc), 1.0)
            else:
                block[:, local, diag] = 0.0
        if not in_place:
            out[:, start:stop] = block
    return out


def pairwise_distance_backward_reference(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic gradients (dL/dx (B, N, D), dL/dy (B, M, D)) from dL/dout (B, N, M).

    For ``euclidean`` the gradient of a zero distance is 0 (the subgradient of
    sqrt at 0 that keeps training finite) rather than NaN. Rows of x are processed in chunks,
    so the temporaries are O(chunk x M), not extra (B, N, M) tensors.
    """
    acc = accumulation_dtype(x.dtype)
    B, N, _ = x.shape
    M = y.shape[1]
    if (batch_step := _batch_step(B, N, M, x.device)) is not None:
        return backward_in_batch_slices(pairwise_distance_backward_reference, batch_step, grad, x, y, out, metric)
    xa, ya = x.to(acc), y.to(acc)
    if metric == "cosine":
        x_inv = safe_inverse(row_norms(x)).unsqueeze(-1)
        y_inv = safe_inverse(row_norms(y)).unsqueeze(-1)
        xa, ya = xa * x_inv, ya * y_inv  # the unit rows: the gradients below are dL/dx_hat, dL/dy_hat
    gx = torch.empty(xa.shape, dtype=acc, device=x.device)
    gy = torch.zeros(ya.shape, dtype=acc, device=y.device)
    col_sums = torch.zeros(B, M, 1, dtype=acc, device=y.device) if metric in ("euclidean", "sqeuclidean") else None
    step = _rows_per_block(B, N, M, x.device)
    # One reused block for the weights: the upstream gradient itself where it can be read as is.
    scaled = metric == "euclidean" or grad.dtype != acc
    buffer = torch.empty(B, min(step, N), M, dtype=acc, device=x.device) if scaled and N else None
    for start in range(0, N, step):
        stop = min(start + step, N)
        w = grad[:, start:stop]
        if buffer is not None:  # scaled (the loop runs only with N > 0)
            w = buffer[:, : stop - start].copy_(w)
        if metric == "euclidean":
            # d|x - y|/d|x - y|^2 = 1 / (2 d), and 0 (a subgradient) at d = 0.
            d = out[:, start:stop]
            w.div_(d).mul_(0.5).masked_fill_(d == 0, 0.0)
        x_rows = xa[:, start:stop]
        if col_sums is not None:  # the Euclidean metrics
            # d|x - y|^2/dx = 2 (x - y): summed over the pairs, 2 (rowsum(W) x - W y).
            torch.baddbmm(x_rows * w.sum(-1, keepdim=True), w, ya, alpha=-1.0, out=gx[:, start:stop])
            col_sums += w.sum(-2).unsqueeze(-1)
            gy.baddbmm_(w.transpose(1, 2), x_rows, alpha=-1.0)
        else:  # dot and cosine: d(-x.y)/dx = -y
            torch.bmm(w, ya, out=gx[:, start:stop]).neg_()
            gy.baddbmm_(w.transpose(1, 2), x_rows, alpha=-1.0)
    if col_sums is not None:
        gx.mul_(2.0)
        gy.add_(col_sums * ya).mul_(2.0)
    elif metric == "cosine":
        # Project out the radial part: d(x/|x|)/dx = (I - x_hat x_hat^T) / |x|.
        gx = (gx - (gx * xa).sum(-1, keepdim=True) * xa) * x_inv
        gy = (gy - (gy * ya).sum(-1, keepdim=True) * ya) * y_inv
    return gx.to(x.dtype), gy.to(y.dtype)
