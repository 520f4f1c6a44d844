"""Pure-PyTorch pairwise distances: the ground truth and the CPU path.

All functions take flattened batches, x: (B, N, D), y: (B, M, D), and compute in fp32
(fp64 for fp64 inputs) whatever the input dtype. Rows are processed in chunks so the
fp32 temporaries stay O(chunk x M) on top of the (B, N, M) output.
"""

from __future__ import annotations

import torch

from torchfg._validation import accumulation_dtype
from torchfg.ops.metric import safe_inverse


# Rows of x per chunk; bounds the fp32 temporaries when the output is half precision.
DEFAULT_CHUNK_ROWS = 4096


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N) Euclidean norms in the accumulation dtype."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=accumulation_dtype(x.dtype))


def pairwise_distance_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    metric: str,
    symmetric: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Distances between the rows of x (B, N, D) and y (B, M, D) -> (B, N, M) in x's dtype.

    ``symmetric=True`` says y is x: the diagonal is then set to exactly 0 for the metrics
    where d(a, a) = 0 (the fast path leaves rounding noise there).
    """
    acc = accumulation_dtype(x.dtype)
    B, N, _ = x.shape
    M = y.shape[1]
    out = torch.empty(B, N, M, dtype=x.dtype, device=x.device)
    if N == 0 or M == 0:
        return out
    y_acc = y.to(acc)
    if metric in ("sqeuclidean", "euclidean"):
        y_sq = row_norms(y).square()
    elif metric == "cosine":
        y_acc = y_acc * safe_inverse(row_norms(y)).unsqueeze(-1)
    y_t = y_acc.transpose(1, 2)
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        x_chunk = x[:, start:stop].to(acc)
        if metric == "dot":
            block = torch.bmm(x_chunk, y_t).neg_()
        elif metric == "cosine":
            x_chunk = x_chunk * safe_inverse(row_norms(x[:, start:stop])).unsqueeze(-1)
            block = torch.bmm(x_chunk, y_t).neg_().add_(1.0)
        else:
            x_sq = x_chunk.square().sum(-1)
            block = torch.baddbmm(x_sq.unsqueeze(-1) + y_sq.unsqueeze(1), x_chunk, y_t, alpha=-2.0)
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
    sqrt at 0 that keeps training finite) rather than NaN.
    """
    acc = accumulation_dtype(x.dtype)
    g = grad.to(acc)
    xa, ya = x.to(acc), y.to(acc)
    if metric == "dot":
        gx = -torch.bmm(g, ya)
        gy = -torch.bmm(g.transpose(1, 2), xa)
    elif metric == "cosine":
        x_inv = safe_inverse(row_norms(x)).unsqueeze(-1)
        y_inv = safe_inverse(row_norms(y)).unsqueeze(-1)
        x_hat, y_hat = xa * x_inv, ya * y_inv
        gx_hat = -torch.bmm(g, y_hat)
        gy_hat = -torch.bmm(g.transpose(1, 2), x_hat)
        # Project out the radial part: d(x/|x|)/dx = (I - x_hat x_hat^T) / |x|.
        gx = (gx_hat - (gx_hat * x_hat).sum(-1, keepdim=True) * x_hat) * x_inv
        gy = (gy_hat - (gy_hat * y_hat).sum(-1, keepdim=True) * y_hat) * y_inv
    else:
        if metric == "euclidean":
            d = out.to(acc)
            g = torch.where(d > 0, g / (2.0 * d).clamp_min(torch.finfo(acc).tiny), torch.zeros_like(g))
        gx = 2.0 * (g.sum(-1, keepdim=True) * xa - torch.bmm(g, ya))
        gy = 2.0 * (g.sum(-2).unsqueeze(-1) * ya - torch.bmm(g.transpose(1, 2), xa))
    return gx.to(x.dtype), gy.to(y.dtype)
