"""Cross-rank gathers on torch.distributed (NCCL on GPUs, gloo on CPUs).

Batches may differ in size across ranks. Every gather first exchanges the shapes in one small
collective and validates them on every rank, so that bad input raises the same ``ValueError`` on
all ranks instead of hanging in a mismatched collective.

Without an initialised process group, or with a world size of 1, everything here is the identity.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
from typing import Mapping, Sequence, cast

import torch
import torch.distributed as dist

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "gather_batch",
    "GatheredBatch",
    "raise_on_all_ranks",
    "all_reduce_sum",
]

_MAX_DIMS = 4  # shape slots per tensor in the metadata exchange
# Metadata columns per tensor: [ndim, dtype code, *shape (padded with 0)].
_NDIM, _DTYPE, _SHAPE = 0, 1, 2
_ABSENT = -2  # the ndim of a None entry (a rank that does not pass that tensor)
# Dtypes as small integers that every rank agrees on (any other dtype sends its item size + 100).
_DTYPE_CODES = {
    dtype: code for code, dtype in enumerate((
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
        torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
    ))
}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """The number of ranks of ``group`` (the default group), 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (the default group), 0 without an initialised process group."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _comm_device(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return x.device if x.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_shapes(
    tensors: Sequence[torch.Tensor | None],
    names: Sequence[str],
    group: dist.ProcessGroup | None,
    error: BaseException | None = None,
    call: Mapping[str, object] | None = None,
) -> torch.Tensor:
    """All ranks' shapes as (world, len(tensors), 2 + _MAX_DIMS) int64: [ndim, dtype code, *shape, 0-padding]
    (ndim ``_ABSENT`` for a None entry).

    Every rank's status (``error`` given, and ``call``'s fingerprint) travels in the same
    collective, as :func:`raise_on_all_ranks` exchanges it: one host synchronisation per gather
    instead of two. Then validates, identically on every rank, that each tensor is given on every
    rank or on none, that its dtype and trailing dims agree across ranks and that all tensors of a
    rank have the same number of rows; raises ValueError naming the argument. (A gather of buffers
    whose byte sizes differ would abort the process in the backend.)
    """
    # Row 0 is the status ([error given, call fingerprint]); rows 1.. the tensors.
    meta = torch.zeros(1 + len(tensors), _SHAPE + _MAX_DIMS, dtype=torch.int64)
    meta[0, :2] = torch.tensor([int(error is not None), _fingerprint(call or {})])
    for i, (t, name) in enumerate(zip(tensors, names), start=1):
        if t is None:
            # One row per name on every rank: a rank without it sent fewer rows (a gloo abort).
            meta[i, _NDIM] = _ABSENT
            continue
        meta[i, _DTYPE] = _DTYPE_CODES.get(t.dtype, 100 + t.element_size())
        if t.dim() == 0 or t.dim() > _MAX_DIMS:
            # Still take part in the collective so that the other ranks do not hang.
            meta[i, _NDIM] = -1
        else:
            meta[i, _NDIM] = t.dim()
            meta[i, _SHAPE : _SHAPE + t.dim()] = torch.tensor(t.shape)
    device = _comm_device(next((t for t in tensors if t is not None), torch.empty(0)), group)
    gathered = [torch.empty_like(meta, device=device) for _ in range(world_size(group))]
    dist.all_gather(gathered, meta.to(device), group=group)
    # One device-to-host copy of all ranks' rows (a copy per rank was a host sync each on NCCL).
    everything = torch.stack(gathered).cpu()
    _raise_reported(error, call, everything[:, 0, :2], group)
    shapes = everything[:, 1:]
    for i, name in enumerate(names):
        ndims = shapes[:, i, _NDIM]
        absent = ndims == _ABSENT
        if absent.all():
            continue
        if absent.any():
            raise ValueError(
                f"{name} is given on rank(s) {(~absent).nonzero().flatten().tolist()} but not on "
                f"{absent.nonzero().flatten().tolist()}: every rank must pass it, or none"
            )
        bad = (ndims < 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{name} must have 1 to {_MAX_DIMS} dims on every rank; rank(s) {bad} sent another shape")
        if (ndims != ndims[0]).any():
            raise ValueError(f"{name} has a different number of dims across ranks: {ndims.tolist()}")
        dtypes = shapes[:, i, _DTYPE]
        if (dtypes != dtypes[0]).any():
            per_rank = {r: _DTYPE_NAMES.get(int(c), f"a {int(c) - 100}-byte dtype") for r, c in enumerate(dtypes.tolist())}
            raise ValueError(f"{name} has different dtypes across ranks: {per_rank}")
        trailing = shapes[:, i, _SHAPE + 1 : _SHAPE + int(ndims[0])]
        if (trailing != trailing[0]).any():
            sizes_per_rank = {r: tuple(trailing[r].tolist()) for r in range(shapes.shape[0])}
            raise ValueError(f"{name} has different trailing (per-item) sizes across ranks: {sizes_per_rank}")
    given = shapes[0, :, _NDIM] != _ABSENT  # the same on every rank by now
    rows = shapes[:, given, _SHAPE]
    given_names = [n for n, g in zip(names, given.tolist()) if g]
    for r in range(rows.shape[0] if rows.shape[1] else 0):
        if (rows[r] != rows[r, 0]).any():
            sizes = ", ".join(f"{n}={int(s)}" for n, s in zip(given_names, rows[r].tolist()))
            raise ValueError(f"rank {r} has inconsistent batch sizes: {sizes} (each must have one row per item)")
    return shapes


def _fingerprint(call: Mapping[str, object]) -> int:
    """A hash of a call's settings that every process computes alike (``hash(str)`` is salted per
    process); numbers of any int/float type hash by value, so ``np.float64(0.2)`` matches ``0.2``."""

    def canonical(value: object) -> str:
        if value is None or isinstance(value, (bool, str)):
            return repr(value)
        if isinstance(value, numbers.Integral):
            # margin=1 on one rank and margin=1.0 on another are one call.
            exact = float(int(value))
            return repr(exact) if exact == int(value) else repr(int(value))
        if isinstance(value, numbers.Real):
            return repr(float(value))
        return f"<{type(value).__name__}>"  # anything else is refused by the checks themselves

    text = "\x00".join(f"{name}={canonical(value)}" for name, value in sorted(call.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def raise_on_all_ranks(
    error: BaseException | None,
    group: dist.ProcessGroup | None = None,
    *,
    call: Mapping[str, object] | None = None,
) -> None:
    """Collective: if any rank passes an error, every rank raises (its own error, or a ValueError).

    Validation that fails on one rank only would otherwise leave the other ranks waiting forever
    in the next collective. Call it on every rank, with None where the local checks passed.

    ``call`` (argument name -> value: strings, numbers, bools, None) is checked to be the same on
    every rank, in the same collective: ranks that disagree on, say, the reduction would run
    different collectives next (a hang, or a silently wrong result), so they all raise a
    ValueError naming the arguments and each rank's value. An input error takes precedence.

    Before a :func:`gather_batch`, pass ``error`` and ``call`` to it instead: it exchanges them
    in its shape collective, which saves a collective and a host synchronisation.
    """
    if not is_distributed(group):
        if error is not None:
            raise error
        return
    _exchange_shapes([], [], group, error, call)


def _raise_reported(
    error: BaseException | None,
    call: Mapping[str, object] | None,
    statuses: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> None:
    """Raise on every rank if any rank reported an error or a different call; statuses: (world, 2)
    int64 rows [error given, call fingerprint], the same on every rank."""
    failed = statuses[:, 0].nonzero().flatten().tolist()
    disagree = bool((statuses[:, 1] != statuses[0, 1]).any())
    if not failed and not disagree:
        return
    # Only then: a second, object collective so that every rank can say what went wrong. Every rank
    # takes this branch, since all of them decided from the same gathered statuses.
    own = (None if error is None else f"{type(error).__name__}: {error}", dict(call or {}))
    gathered: list[tuple[str | None, dict[str, object]] | None] = [None] * world_size(group)
    dist.all_gather_object(gathered, own, group=group)
    # all_gather_object has put every rank's report in its slot.
    reports = cast("list[tuple[str | None, dict[str, object]]]", gathered)
    if error is not None:
        raise error
    if failed:
        details = "; ".join(f"rank {r}: {reports[r][0]}" for r in failed)
        raise ValueError(f"invalid input on another rank ({details})")
    calls = [report[1] for report in reports]
    names = sorted({name for c in calls for name in c})
    differing = [
        name for name in names
        if len({_fingerprint({name: c.get(name, "<not given>")}) for c in calls}) > 1
    ]
    details = "; ".join(
        f"{name}: " + ", ".join(f"rank {r} {c.get(name, '<not given>')!r}" for r, c in enumerate(calls))
        for name in differing
    )
    raise ValueError(
        f"the ranks made different calls ({details or 'arguments differ'}): with cross-rank mining every rank "
        "must pass the same settings"
    )


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor, no gradient); ``x`` itself when not distributed."""
    if not is_distributed(group):
        return x
    device = _comm_device(x, group)
    total = x.detach().clone().to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(x.device)


# The dtypes gloo and NCCL gather as they are; others (int16, the unsigned 16-64-bit types, bool,
# float8, complex) travel as their bytes: gloo raised "Invalid scalar type" for int16 labels.
_COLLECTIVE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                                torch.int32, torch.int64})


def _gather_padded(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenation over ranks of tensors with different first dims (padded to the max to gather)."""
    if x.dtype not in _COLLECTIVE_DTYPES:
        rows = x.detach().contiguous().reshape(x.shape[0], math.prod(x.shape[1:]))
        gathered = _gather_padded(rows.view(torch.uint8), sizes, group)
        return gathered.view(x.dtype).reshape(sum(sizes), *x.shape[1:])
    device = _comm_device(x, group)
    biggest = max(sizes)
    padded = x.new_zeros((biggest, *x.shape[1:]), device=device)
    padded[: x.shape[0]] = x.detach().to(device)
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(buffers, sizes)]).to(x.device)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenation over ranks. Its backward is :class:`_SumScatter`, whose backward is this
    gather again: each is the other's adjoint, so second-order gradients are exact too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SumScatter.apply(grad, ctx.sizes, ctx.group), None, None


class _SumScatter(torch.autograd.Function):
    """This rank's rows of the sum over ranks of a gathered-shape tensor."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
        # Every rank's loss may depend on this rank's items: sum their gradients over ranks.
        ctx.sizes, ctx.group = sizes, group
        device = _comm_device(grad, group)
        # A private copy: the all-reduce writes in place, and autograd may hand this same gradient
        # to other functions too (x_gathered + y_gathered gives both gathers one tensor), or it is
        # the caller's own tensor (gathered.backward(G)).
        total = grad.to(device, copy=True).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        offset = sum(sizes[: rank(group)])
        return total[offset : offset + sizes[rank(group)]].to(grad.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The untracked in-place all-reduce above made a second-order gradient silently miss the
        # other ranks' terms; the adjoint of sum-and-slice is the gather.
        return _AllGatherWithGrad.apply(grad, ctx.sizes, ctx.group), None, None


# The parametrised base types each item for a type checker (``tensors, offset, sizes =
# gather_batch(...)``); at run time the base is plain tuple, as before.
class GatheredBatch(tuple[list[torch.Tensor | None], int, list[int]]):
    """``(tensors, offset, sizes)``: gathered tensors, this rank's first row in them, rows per rank."""

    def __new__(cls, tensors: list[torch.Tensor | None], offset: int, sizes: list[int]) -> Self:
        return super().__new__(cls, (tensors, offset, sizes))

    def __getnewargs__(self) -> tuple[list[torch.Tensor | None], int, list[int]]:
        # copy, deepcopy and pickle rebuild through __new__: tuple's own passes one tuple.
        return self[0], self[1], self[2]

    @property
    def tensors(self) -> list[torch.Tensor | None]:
        """The gathered tensors (sum of N_r rows, ...), in the order given (None where None was given)."""
        return self[0]

    @property
    def offset(self) -> int:
        """This rank's first row in the gathered tensors (the sum of the lower ranks' sizes)."""
        return self[1]

    @property
    def sizes(self) -> list[int]:
        """Rows per rank, N_r, in rank order."""
        return self[2]


def gather_batch(
    tensors: Sequence[torch.Tensor | None],
    names: Sequence[str],
    *,
    with_grad: Sequence[bool] | None = None,
    group: dist.ProcessGroup | None = None,
    error: BaseException | None = None,
    call: Mapping[str, object] | None = None,
) -> GatheredBatch:
    """Gather several per-item tensors of this rank's batch from all ranks, after one shape check.

    Args:
        tensors: per-item tensors with the same number of rows N_r on each rank (embeddings (N_r, D),
            labels (N_r,), text embeddings (N_r, T), ...); None entries are passed through as None.
        names: argument names used in error messages.
        with_grad: per tensor, whether gradients flow back through the gather (default: for
            floating-point tensors that require grad).
        group: process group (default: the world).
        error, call: as :func:`raise_on_all_ranks` takes them, exchanged in the shape check's
            collective: if any rank passes an error (a rank whose validation failed passes it,
            with None for each tensor it could not check) or a different ``call``, every rank
            raises before anything is gathered.

    Returns:
        GatheredBatch(tensors, offset, sizes): each gathered tensor has sum(N_r) rows, ranks in
        order; ``offset`` is this rank's first row. Identity (offset 0) when not distributed.
    """
    if len(names) != len(tensors):
        raise ValueError(f"names must name each of the {len(tensors)} tensors, got {len(names)} names")
    present = [(i, t) for i, t in enumerate(tensors) if t is not None]
    if not is_distributed(group):
        if error is not None:
            raise error
        rows = present[0][1].shape[0] if present else 0
        return GatheredBatch(list(tensors), 0, [rows])
    shapes = _exchange_shapes(list(tensors), list(names), group, error, call)
    sizes = shapes[:, present[0][0], _SHAPE].tolist() if present else [0] * world_size(group)
    offset = sum(sizes[: rank(group)])
    out: list[torch.Tensor | None] = list(tensors)
    for i, t in present:
        grad = with_grad[i] if with_grad is not None else (t.is_floating_point() and t.requires_grad)
        out[i] = _AllGatherWithGrad.apply(t, sizes, group) if grad else _gather_padded(t, sizes, group)
    return GatheredBatch(out, offset, sizes)


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` (N_r, ...) from all ranks into (sum N_r, ...), differentiably.

    Batch sizes may differ across ranks (an empty batch included). The gradient of the gathered
    tensor flows back to each rank's own slice, summed over ranks, so a loss computed on every rank
    from the gathered batch gives each rank the sum of all ranks' gradients for its items.
    Second-order gradients (``create_graph=True``) are exact as well; like the first-order ones,
    they are collectives that every rank must reach.

    Example:
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> all_gather_with_grad(x).shape  # no process group: the identity
        torch.Size([4, 8])
    """
    if not is_distributed(group):
        return x
    # x is a tensor, so its gathered entry is one (None entries alone stay None).
    return cast(torch.Tensor, gather_batch([x], ["x"], with_grad=[True], group=group).tensors[0])


def all_gather_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Like :func:`all_gather_with_grad` without autograd (labels, text embeddings, indices)."""
    if not is_distributed(group):
        return x
    # x is a tensor, so its gathered entry is one (None entries alone stay None).
    return cast(torch.Tensor, gather_batch([x], ["x"], with_grad=[False], group=group).tensors[0])
