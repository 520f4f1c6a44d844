"""Exact distances of selected row pairs: the differentiable O(K D) half of every triplet loss.

Two ops, one concept: :func:`pair_distances` for a flat list of pairs and
:func:`anchor_pair_distances` for the batch-hard layout (every anchor row against K partners).
Both compute ``d`` from ``a - b`` (never the expanded ``|a|^2 + |b|^2 - 2 a.b``), so a selected
pair's loss is exact, and their analytic backward touches only the selected rows.
"""

from __future__ import annotations

import torch

from torchfg._validation import accumulation_dtype, check_choice, check_float_tensor, check_tensor
from torchfg.backends import BackendSpec, register_op, resolve_backend
from torchfg.ops._library import custom_op
from torchfg.ops.metric import METRICS
from torchfg.ops.pair_distances.reference import (
    anchor_pair_distances_backward_reference,
    anchor_pair_distances_reference,
    pair_distances_backward_reference,
    pair_distances_reference,
)
from torchfg.ops.precision import autocast_off

__all__ = ["pair_distances", "anchor_pair_distances"]

# The flat pair_distances has the reference only; anchor_pair_distances has a fused Triton kernel.
register_op("anchor_pair_distances", BackendSpec("triton"))


@custom_op("torchfg::pair_distances")
def _pair_distances_op(
    x: torch.Tensor, y: torch.Tensor | None, x_idx: torch.Tensor, y_idx: torch.Tensor, metric: str
) -> torch.Tensor:
    return pair_distances_reference(x, x if y is None else y, x_idx, y_idx, metric)


@_pair_distances_op.register_fake
def _(x, y, x_idx, y_idx, metric):
    return x.new_empty(x_idx.shape[0], dtype=accumulation_dtype(x.dtype))


@custom_op("torchfg::pair_distances_backward")
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
_pair_distances_backward_op.register_first_order_only("torchfg.ops.pair_distances")


@custom_op("torchfg::anchor_pair_distances")
def _anchor_pair_distances_op(
    x: torch.Tensor, y: torch.Tensor | None, y_idx: torch.Tensor, metric: str, backend: str
) -> torch.Tensor:
    if backend == "triton":
        from torchfg.ops.pair_distances.triton import anchor_pair_distances_triton

        return anchor_pair_distances_triton(x, x if y is None else y, y_idx, metric)
    return anchor_pair_distances_reference(x, x if y is None else y, y_idx, metric)


@_anchor_pair_distances_op.register_fake
def _(x, y, y_idx, metric, backend):
    return x.new_empty(y_idx.shape, dtype=accumulation_dtype(x.dtype))


@custom_op("torchfg::anchor_pair_distances_backward")
def _anchor_pair_distances_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    y_idx: torch.Tensor,
    out: torch.Tensor,
    metric: str,
    backend: str,
    needs_grad_y: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from torchfg.ops.pair_distances.triton import anchor_pair_distances_backward_triton

        return anchor_pair_distances_backward_triton(
            grad, x, x if y is None else y, y_idx, out, metric, y_is_x=y is None, needs_grad_y=needs_grad_y
        )
    return anchor_pair_distances_backward_reference(grad, x, x if y is None else y, y_idx, out, metric, y_is_x=y is None)


@_anchor_pair_distances_backward_op.register_fake
def _(grad, x, y, y_idx, out, metric, backend, needs_grad_y):
    return torch.empty_like(x), (x.new_empty(0) if y is None else torch.empty_like(y))


def _anchor_pair_distances_setup_context(ctx, inputs, output):
    x, y, y_idx, metric, backend = inputs
    ctx.save_for_backward(x, y, y_idx, output)
    ctx.metric, ctx.backend = metric, backend
    ctx.y_is_x = y is None


def _anchor_pair_distances_backward(ctx, grad):
    x, y, y_idx, out = ctx.saved_tensors
    # A detached y (e.g. a cross-batch memory) needs no partner gradient: skip its O(N K D) writes.
    needs_grad_y = not ctx.y_is_x and ctx.needs_input_grad[1]
    grad_x, grad_y = _anchor_pair_distances_backward_op(
        grad.contiguous(), x, None if ctx.y_is_x else y, y_idx, out, ctx.metric, ctx.backend, needs_grad_y
    )
    if not needs_grad_y:
        grad_y = None
    return grad_x, grad_y, None, None, None


_anchor_pair_distances_op.register_autograd(
    _anchor_pair_distances_backward, setup_context=_anchor_pair_distances_setup_context
)
_anchor_pair_distances_backward_op.register_first_order_only("torchfg.ops.anchor_pair_distances")


@autocast_off
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
    for idx, name in ((x_idx, "x_idx"), (y_idx, "y_idx")):
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer index tensor, got {idx.dtype}")
    try:
        return _pair_distances_op(x, y, x_idx.to(x.device, torch.int64), y_idx.to(x.device, torch.int64), metric)
    except IndexError as exc:
        # Not checked up front: a range check costs a host sync, and the callers inside torchfg pass
        # mined indices. The gather itself refuses an index out of range (on a CPU, as IndexError).
        rows_y = x.shape[0] if y is None else y.shape[0]
        raise ValueError(
            f"x_idx entries must be in [0, {x.shape[0]}) and y_idx entries in [0, {rows_y}) ({exc})"
        ) from exc


def anchor_pair_distances(
    x: torch.Tensor,
    y_idx: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    metric: str = "euclidean",
    backend: str = "auto",
    check_indices: bool = True,
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
        backend: ``"auto"``, ``"torch"`` (chunked reference) or ``"triton"`` (one fused launch
            forward, one backward; see ``triton.py``), as in :mod:`torchfg.backends`.
        check_indices: check that every ``y_idx`` entry is in range (one reduction and a host
            sync); False for indices known valid, e.g. a miner's, keeps a training step free of
            both. The Triton kernel gathers the rows unchecked.

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
    y_idx = y_idx.to(x.device, torch.int64).contiguous()
    rows = x.shape[0] if y is None else y.shape[0]
    # The kernel gathers rows unchecked: an out-of-range partner must fail here, not read garbage.
    if check_indices and y_idx.numel():
        low, high = (int(v) for v in torch.aminmax(y_idx))
        if low < 0 or high >= rows:
            raise ValueError(f"y_idx entries must be in [0, {rows}), got values in [{low}, {high}]")
    backend = resolve_backend("anchor_pair_distances", x.device, x.dtype, backend)
    return _anchor_pair_distances_op(x, y, y_idx, metric, backend)
