"""Exact distances of selected row pairs: the differentiable O(K D) half of every triplet loss.

Two ops, one concept: :func:`pair_distances` for a flat list of pairs and
:func:`anchor_pair_distances` for the batch-hard layout (every anchor row against K partners).
Both compute ``d`` from ``a - b`` (never the expanded ``|a|^2 + |b|^2 - 2 a.b``), so a selected
pair's loss is exact, and their analytic backward touches only the selected rows.
"""

from __future__ import annotations

import torch

from torchfg._validation import accumulation_dtype, check_choice, check_float_tensor, check_tensor
from torchfg.ops.metric import METRICS
from torchfg.ops.pair_distances.reference import (
    anchor_pair_distances_backward_reference,
    anchor_pair_distances_reference,
    pair_distances_backward_reference,
    pair_distances_reference,
)

__all__ = ["pair_distances", "anchor_pair_distances"]


@torch.library.custom_op("torchfg::pair_distances", mutates_args=())
def _pair_distances_op(
    x: torch.Tensor, y: torch.Tensor | None, x_idx: torch.Tensor, y_idx: torch.Tensor, metric: str
) -> torch.Tensor:
    return pair_distances_reference(x, x if y is None else y, x_idx, y_idx, metric)


@_pair_distances_op.register_fake
def _(x, y, x_idx, y_idx, metric):
    return x.new_empty(x_idx.shape[0], dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("torchfg::pair_distances_backward", mutates_args=())
def _pair_distances_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    x_idx: torch.Tensor,
    y_idx: torch.Tensor,
    out: torch.Tensor,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return pair_distances_backward_reference(
        grad, x, x if y is None else y, x_idx, y_idx, out, metric, y_is_x=y is None
    )


@_pair_distances_backward_op.register_fake
def _(grad, x, y, x_idx, y_idx, out, metric):
    return torch.empty_like(x), (x.new_empty(0) if y is None else torch.empty_like(y))


def _pair_distances_setup_context(ctx, inputs, output):
    x, y, x_idx, y_idx, metric = inputs
    ctx.save_for_backward(x, y, x_idx, y_idx, output)
    ctx.metric = metric
    ctx.y_is_x = y is None


def _pair_distances_backward(ctx, grad):
    x, y, x_idx, y_idx, out = ctx.saved_tensors
    grad_x, grad_y = _pair_distances_backward_op(grad.contiguous(), x, None if ctx.y_is_x else y, x_idx, y_idx, out, ctx.metric)
    return grad_x, (None if ctx.y_is_x else grad_y), None, None, None


_pair_distances_op.register_autograd(_pair_distances_backward, setup_context=_pair_distances_setup_context)


@torch.library.custom_op("torchfg::anchor_pair_distances", mutates_args=())
def _anchor_pair_distances_op(x: torch.Tensor, y: torch.Tensor | None, y_idx: torch.Tensor, metric: str) -> torch.Tensor:
    return anchor_pair_distances_reference(x, x if y is None else y, y_idx, metric)


@_anchor_pair_distances_op.register_fake
def _(x, y, y_idx, metric):
    return x.new_empty(y_idx.shape, dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("torchfg::anchor_pair_distances_backward", mutates_args=())
def _anchor_pair_distances_backward_op(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, y_idx: torch.Tensor, out: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return anchor_pair_distances_backward_reference(grad, x, x if y is None else y, y_idx, out, metric, y_is_x=y is None)


@_anchor_pair_distances_backward_op.register_fake
def _(grad, x, y, y_idx, out, metric):
    return torch.empty_like(x), (x.new_empty(0) if y is None else torch.empty_like(y))


def _anchor_pair_distances_setup_context(ctx, inputs, output):
    x, y, y_idx, metric = inputs
    ctx.save_for_backward(x, y, y_idx, output)
    ctx.metric = metric
    ctx.y_is_x = y is None


def _anchor_pair_distances_backward(ctx, grad):
    x, y, y_idx, out = ctx.saved_tensors
    grad_x, grad_y = _anchor_pair_distances_backward_op(
        grad.contiguous(), x, None if ctx.y_is_x else y, y_idx, out, ctx.metric
    )
    return grad_x, (None if ctx.y_is_x else grad_y), None, None


_anchor_pair_distances_op.register_autograd(
    _anchor_pair_distances_backward, setup_context=_anchor_pair_distances_setup_context
)


def pair_distances(
    x: torch.Tensor,
    x_idx: torch.Tensor,
    y_idx: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    metric: str = "euclidean",
) -> torch.Tensor:
    """Distances of selected row pairs, ``d(x[x_idx[k]], y[y_idx[k]])``, exactly from ``a - b``.

    Differentiable in x and y with an analytic, chunked backward: memory O(chunk x D) beyond the
    gradients, time O(K D), whatever N and M. The euclidean gradient at zero distance is 0.

    Args:
        x: (N, D) float.
        x_idx: (K,) integer indices into x.
        y_idx: (K,) integer indices into y.
        y: (M, D) same dtype/device, or None for y = x (gradients then go to x only).
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.

    Returns:
        (K,) distances in fp32 (fp64 for fp64 inputs).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> pair_distances(x, torch.tensor([0, 1]), torch.tensor([1, 1]))
        tensor([5., 0.])
    """
    check_float_tensor(x, "x", ndim=2)
    if y is not None:
        check_float_tensor(y, "y", ndim=2)
        if y.device != x.device or y.dtype != x.dtype or y.shape[1] != x.shape[1]:
            raise ValueError(
                f"y must have the device, dtype and feature size of x, got {y.device}/{y.dtype}/{y.shape[1]} "
                f"and {x.device}/{x.dtype}/{x.shape[1]}"
            )
    check_choice(metric, "metric", METRICS)
    x_idx = check_tensor(x_idx, "x_idx")
    y_idx = check_tensor(y_idx, "y_idx")
    if x_idx.dim() != 1 or y_idx.dim() != 1 or x_idx.shape != y_idx.shape:
        raise ValueError(f"x_idx and y_idx must be 1-D of equal length, got {tuple(x_idx.shape)} and {tuple(y_idx.shape)}")
    if x_idx.dtype.is_floating_point or y_idx.dtype.is_floating_point:
        raise TypeError("x_idx and y_idx must be integer tensors")
    return _pair_distances_op(x, y, x_idx.to(x.device, torch.int64), y_idx.to(x.device, torch.int64), metric)


def anchor_pair_distances(
    x: torch.Tensor,
    y_idx: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    metric: str = "euclidean",
) -> torch.Tensor:
    """Distances of every anchor row to K chosen partners, ``d(x[i], y[y_idx[i, k]])``, exactly.

    The batch-hard layout of :func:`pair_distances` (anchor i is row i): anchors are read in
    place and only partners are gathered, in large chunks, so forward and backward are a handful
    of O(N K D) passes. The euclidean gradient at zero distance is 0.

    Args:
        x: (N, D) float anchors.
        y_idx: (N, K) integer indices into y.
        y: (M, D) same dtype/device, or None for y = x (gradients then go to x only).
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.

    Returns:
        (N, K) distances in fp32 (fp64 for fp64 inputs).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
        >>> anchor_pair_distances(x, torch.tensor([[1, 2], [0, 2], [1, 1]]))
        tensor([[ 5., 10.],
                [ 5.,  5.],
                [ 5.,  5.]])
    """
    check_float_tensor(x, "x", ndim=2)
    if y is not None:
        check_float_tensor(y, "y", ndim=2)
        if y.device != x.device or y.dtype != x.dtype or y.shape[1] != x.shape[1]:
            raise ValueError(
                f"y must have the device, dtype and feature size of x, got {y.device}/{y.dtype}/{y.shape[1]} "
                f"and {x.device}/{x.dtype}/{x.shape[1]}"
            )
    check_choice(metric, "metric", METRICS)
    y_idx = check_tensor(y_idx, "y_idx")
    if y_idx.dim() != 2 or y_idx.shape[0] != x.shape[0]:
        raise ValueError(f"y_idx must have shape (N, K) with N = {x.shape[0]}, got {tuple(y_idx.shape)}")
    if y_idx.dtype.is_floating_point or y_idx.dtype == torch.bool:
        raise TypeError(f"y_idx must be an integer tensor, got {y_idx.dtype}")
    return _anchor_pair_distances_op(x, y, y_idx.to(x.device, torch.int64).contiguous(), metric)
