"""Batched pairwise distances with a chunked PyTorch reference and a tiled Triton kernel."""

from __future__ import annotations

import math

import torch

from torchfg._validation import check_choice, check_float_tensor
from torchfg.backends import BackendSpec, register_op, resolve_backend
from torchfg.ops._library import custom_op
from torchfg.ops.metric import METRICS
from torchfg.ops.pairwise.reference import pairwise_distance_backward_reference, pairwise_distance_reference
from torchfg.ops.precision import autocast_off

__all__ = ["pairwise_distance", "METRICS"]

register_op("pairwise_distance", BackendSpec("triton"))


@custom_op("torchfg::pairwise_distance")
def _pairwise_distance_op(x: torch.Tensor, y: torch.Tensor, metric: str, symmetric: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        from torchfg.ops.pairwise.triton import pairwise_distance_triton

        return pairwise_distance_triton(x, y, metric, symmetric)
    return pairwise_distance_reference(x, y, metric, symmetric)


@_pairwise_distance_op.register_fake
def _(x: torch.Tensor, y: torch.Tensor, metric: str, symmetric: bool, backend: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], y.shape[1])


@custom_op("torchfg::pairwise_distance_backward")
def _pairwise_distance_backward_op(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, metric: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from torchfg.ops.pairwise.triton import pairwise_distance_backward_triton

        return pairwise_distance_backward_triton(grad, x, y, out, metric)
    return pairwise_distance_backward_reference(grad, x, y, out, metric)


@_pairwise_distance_backward_op.register_fake
def _(grad, x, y, out, metric, backend):
    return torch.empty_like(x), torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, y, metric, _symmetric, backend = inputs
    ctx.save_for_backward(x, y, output)
    ctx.metric, ctx.backend = metric, backend


def _backward(ctx, grad):
    x, y, out = ctx.saved_tensors
    gx, gy = _pairwise_distance_backward_op(grad.contiguous(), x, y, out, ctx.metric, ctx.backend)
    return gx, gy, None, None, None


_pairwise_distance_op.register_autograd(_backward, setup_context=_setup_context)
_pairwise_distance_backward_op.register_first_order_only("torchfg.pairwise_distance")


@autocast_off
def pairwise_distance(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    metric: str = "euclidean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Distances between the rows of ``x`` and ``y``, batched like :func:`torch.cdist`.

    Args:
        x: (*B, N, D) floating-point tensor (fp16, bf16, fp32 or fp64).
        y: (*B', M, D) with leading dims broadcastable against x's, same dtype and device;
            None means ``y = x`` (then the diagonal is exactly 0 for euclidean, sqeuclidean and
            cosine of non-zero rows).
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` (1 - cosine similarity; a
            zero row has similarity 0 to everything) or ``"dot"`` (negative inner product,
            a dissimilarity).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`torchfg.backends`).

    Returns:
        (*broadcast(B, B'), N, M) distances in x's dtype, accumulated in fp32 (fp64 for fp64).
        Differentiable in x and y; the ``euclidean`` gradient at a zero distance is 0, not NaN.

    Example:
        >>> x = torch.randn(5, 8)
        >>> pairwise_distance(x, metric="cosine").shape
        torch.Size([5, 5])
        >>> torch.allclose(pairwise_distance(x, x + 1), torch.cdist(x, x + 1), atol=1e-5)
        True
    """
    check_float_tensor(x, "x", min_ndim=2)
    symmetric = y is None
    if y is None:
        y = x
    else:
        check_float_tensor(y, "y", min_ndim=2)
        if y.device != x.device:
            raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
        if y.dtype != x.dtype:
            raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
        if y.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"x and y must have the same feature size D (last dim), got {x.shape[-1]} and {y.shape[-1]}"
            )
    check_choice(metric, "metric", METRICS)
    backend = resolve_backend("pairwise_distance", x.device, x.dtype, backend)
    try:
        batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"leading (batch) dims of x {tuple(x.shape[:-2])} and y {tuple(y.shape[:-2])} do not broadcast"
        ) from exc
    n, m, d = x.shape[-2], y.shape[-2], x.shape[-1]
    flat = math.prod(batch)
    x3 = x.expand(*batch, n, d).reshape(flat, n, d)
    y3 = x3 if symmetric else y.expand(*batch, m, d).reshape(flat, m, d)
    out = _pairwise_distance_op(x3, y3, metric, symmetric, backend)
    return out.reshape(*batch, n, m)
