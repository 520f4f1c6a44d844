"""Cross-batch memory (XBM): the stateless half of :class:`torchfg.losses.CrossBatchMemory`.

A cross-batch memory is a FIFO ring of the S most recent embeddings (with their labels and, for
the adaptive triplet loss, their text embeddings), stored detached. Each step first enqueues the
batch, then mines every anchor of the batch against the whole memory (which now holds the batch
too, so an anchor's own copy is excluded from its positives) and computes the loss of the
selected pairs exactly, with gradients to the anchors only. These are the semantics of
pytorch-metric-learning's ``CrossBatchMemory`` (``enqueue_mask`` included).

Mining goes through the fused kernel of :func:`torchfg.ops.triplet.mine_hardest` with the memory
as the candidate set: no batch x memory matrix is ever written. An anchor's copy sits at slot
``(start + i) % S``, which is the hardest miners' ``anchor_offset`` contract, so a batch that wraps
around the end of the ring is mined in the same single pass (the fused loss on the Triton backend).
"""

from __future__ import annotations

from typing import Sequence, cast

import torch

from torchfg._validation import check_bool, check_choice, check_int, check_number
from torchfg.ops.triplet import _self_offset
from torchfg.distributed import gather_batch
from torchfg.functional.triplet import (
    MINING_STRATEGIES,
    REDUCTIONS,
    _batch_hard_loss,
    _check_indices_tuple,
    _check_mining_backend,
    _check_triplets_per_anchor,
    _hardest_triplet_losses,
    _hinge,
    _reduce,
    _triplet_margin_loss_impl,
    _validated,
)
from torchfg.ops.hardest_triplet_loss.reference import text_cosine
from torchfg.ops.metric import DEFAULT_METRIC, METRICS
from torchfg.ops.pair_distances import pair_distances
from torchfg.ops.precision import autocast_off

__all__ = ["enqueue", "gather_for_memory", "memory_triplet_loss"]


def enqueue(
    memory: Sequence[torch.Tensor | None],
    items: Sequence[torch.Tensor | None],
    position: int,
    size: int,
) -> tuple[int, int, int]:
    """Write ``items`` into the ring ``memory`` at ``position`` (in place, detached, wrapping around).

    Args:
        memory: ring buffers, each (S, ...) (None entries are skipped, with their items).
        items: per buffer, B rows to write (B <= S), same trailing shape and device.
        position: slot of the next write, in [0, S).
        size: number of valid slots before the write (the valid rows are ``[:size]``).

    Returns:
        (start, new_position, new_size): the slot of the first written row, the next write slot
        and the number of valid slots after the write.
    """
    capacity = next(m for m in memory if m is not None).shape[0]
    rows = next(t for t in items if t is not None).shape[0]
    if rows > capacity:
        raise ValueError(f"cannot enqueue {rows} items into a memory of {capacity} slots")
    first = min(rows, capacity - position)
    for buffer, values in zip(memory, items):
        if buffer is None:
            continue
        # items has a tensor wherever memory has a buffer.
        values = cast(torch.Tensor, values).detach().to(buffer.dtype)
        # Two slice copies (no index tensor): the part up to the end of the ring, then the wrap.
        buffer[position : position + first].copy_(values[:first])
        if first < rows:
            buffer[: rows - first].copy_(values[first:])
    return position, (position + rows) % capacity, min(size + rows, capacity)


def _check_memory_loss_settings(
    *, margin: object, margin_scale: object, text_positive_threshold: object, metric: object, reduction: object,
    smooth: object, mining: object = "batch_hard", triplets_per_anchor: object = "all", adaptive: bool = False,
    backend: object = "auto",
) -> tuple[float, float, int | str]:
    """The scalar arguments of :func:`memory_triplet_loss`; returns (margin, margin_scale,
    triplets_per_anchor) checked.

    Checked here, not only by the kernels: the PyTorch path's reduction took any unknown name for
    ``"mean_nonzero"`` and any truthy ``smooth`` for True.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    check_choice(metric, "metric", METRICS)
    strategy = check_choice(mining, "mining", MINING_STRATEGIES)
    check_bool(smooth, "smooth")
    if text_positive_threshold is not None:
        check_number(text_positive_threshold, "text_positive_threshold", low=-1.0, high=1.0)
    if adaptive and strategy != "batch_hard":
        raise ValueError(f"mining must be 'batch_hard' with text embeddings (adaptive margins), got {strategy!r}")
    if strategy != "batch_hard":
        _check_mining_backend(strategy, backend)
    per_anchor = _check_triplets_per_anchor(triplets_per_anchor, strategy)
    return check_number(margin, "margin"), check_number(margin_scale, "margin_scale", low=0.0), per_anchor


@autocast_off
def memory_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    self_start: int | None,
    *,
    text_embeddings: torch.Tensor | None = None,
    memory_text: torch.Tensor | None = None,
    margin: float = 0.2,
    margin_scale: float = 0.0,
    text_positive_threshold: float | None = None,
    metric: str = DEFAULT_METRIC,
    reduction: str = "mean",
    smooth: bool = False,
    mining: str = "batch_hard",
    triplets_per_anchor: int | str = "all",
    indices_tuple: tuple[torch.Tensor, ...] | None = None,
    cross_rank: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Triplet loss of a batch's anchors against a memory: batch-hard (or adaptive, with text),
    semi-hard or all triplets.

    Args:
        embeddings: (N, D) anchors (the only rows that receive gradients).
        labels: (N,) integer labels.
        memory: (S, D) valid memory rows, same dtype and device (detached).
        memory_labels: (S,) labels of the memory rows.
        self_start: anchor i's own copy is memory row ``(self_start + i) % S`` and is never its
            positive; None when the anchors are not in the memory.
        text_embeddings: (N, T) text of the anchors (adaptive margins), or None.
        memory_text: (S, T) text of the memory rows (with ``text_embeddings``).
        margin: the base margin m0.
        margin_scale: s of the adaptive margin ``m0 + s (1 - cos(t_a, t_n)) / 2`` (with text).
        text_positive_threshold: see :func:`torchfg.functional.adaptive_triplet_loss`.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        reduction: ``"mean"`` (over valid triplets), ``"sum"``, ``"none"`` or ``"mean_nonzero"``.
        smooth: softplus instead of the hinge.
        mining: ``"batch_hard"`` (the fused kernel; the only choice with text), ``"semi_hard"``
            or ``"all"`` (every (anchor, memory positive, memory negative) triplet, PML's
            ``CrossBatchMemory`` without a miner), as in
            :func:`torchfg.functional.triplet_margin_loss`; the last two run the chunked
            reference on every device.
        triplets_per_anchor: ``"all"`` or k random triplets per anchor (``mining="all"`` only).
        indices_tuple: extra triplets (anchor into embeddings, positive and negative into
            memory; or PML pairs ``(a1, p, a2, n)``, converted to triplets as the losses do)
            whose losses are added to the mined ones, as pytorch-metric-learning concatenates a
            given ``indices_tuple`` with its miner's.
        cross_rank: the count of the mean is summed over ranks and the value scaled by the
            world size, as in :func:`torchfg.functional.triplet_margin_loss`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (mining and exact pair distances).

    Returns:
        Scalar loss in fp32 (fp64 for fp64 embeddings). For ``"none"``: batch-hard's per-anchor
        losses, then the given triplets'; semi-hard's and all's per-triplet losses, mined then
        given.
    """
    cross_rank = check_bool(cross_rank, "cross_rank")

    def validate():
        checked_margins = _check_memory_loss_settings(
            margin=margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold, metric=metric,
            reduction=reduction, smooth=smooth, mining=mining, triplets_per_anchor=triplets_per_anchor,
            adaptive=text_embeddings is not None, backend=backend,
        )
        checked_tuple = None if indices_tuple is None else _check_indices_tuple(
            indices_tuple, embeddings.shape[0], memory.shape[0], embeddings.device
        )
        return (*checked_margins, checked_tuple, _check_self_start(self_start, embeddings, memory))

    # With cross_rank the reduction is a collective: a check that fails on one rank raises on all
    # of them (the others would wait in its all_reduce), and so do calls whose settings differ.
    call = dict(function="memory_triplet_loss", margin=margin, margin_scale=margin_scale, metric=metric,
                reduction=reduction, smooth=smooth, text_positive_threshold=text_positive_threshold, mining=mining,
                triplets_per_anchor=triplets_per_anchor, indices_tuple=indices_tuple is not None, backend=backend)
    margin, margin_scale, per_anchor, checked_tuple, self_start = _validated(validate, cross_rank, call)
    return _memory_triplet_loss(
        embeddings, labels, memory, memory_labels, self_start, text_embeddings=text_embeddings,
        memory_text=memory_text, margin=margin, margin_scale=margin_scale,
        text_positive_threshold=text_positive_threshold, metric=metric, reduction=reduction, smooth=smooth,
        mining=mining, triplets_per_anchor=per_anchor, indices_tuple=checked_tuple, cross_rank=cross_rank,
        backend=backend,
    )


def _check_self_start(self_start: object, embeddings: object, memory: object) -> int | None:
    """``self_start`` as an int in [0, S) with N <= S (each anchor has its own memory row), or None.

    Checked here for every mining: the batch-hard and semi-hard ops refuse a bad offset under the
    name of their ``anchor_offset``, and the all-triplets selection took one as given (a mean
    over the wrong triplets).
    """
    if self_start is None:
        return None
    if isinstance(embeddings, torch.Tensor) and isinstance(memory, torch.Tensor) and embeddings.dim() and memory.dim():
        # The mining ops' own check (M: the memory's rows), under this argument's name.
        return _self_offset(True, self_start, embeddings.shape[0], memory.shape[0], "self_start")
    return check_int(self_start, "self_start", minimum=0)


def _memory_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    self_start: int | None,
    *,
    text_embeddings: torch.Tensor | None,
    memory_text: torch.Tensor | None,
    margin: float,
    margin_scale: float,
    text_positive_threshold: float | None,
    metric: str,
    reduction: str,
    smooth: bool,
    indices_tuple: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    cross_rank: bool,
    backend: str,
    mining: str = "batch_hard",
    triplets_per_anchor: int | str = "all",
) -> torch.Tensor:
    """:func:`memory_triplet_loss` after its checks (``indices_tuple`` already triplets in range)."""
    if mining != "batch_hard":
        # The loss's own semi-hard / all-triplets path with the memory as the reference set (the
        # given triplets added to the mined ones); the memory is detached, so only the anchors
        # get gradients.
        return _triplet_margin_loss_impl(
            embeddings, labels, memory, memory_labels, self_start, margin=margin, metric=metric, mining=mining,
            reduction=reduction, smooth=smooth, backend=backend, triplets_per_anchor=triplets_per_anchor,
            cross_rank=cross_rank, extra_triplets=indices_tuple,
        )
    if indices_tuple is None:
        # The shared batch-hard loss (the fused op on the Triton backend; the memory is detached,
        # so its backward writes the anchors' gradient only).
        return _batch_hard_loss(
            embeddings, labels, memory, memory_labels, self_start, metric=metric, base_margin=margin,
            margin_scale=margin_scale, text_embeddings=text_embeddings, candidate_text=memory_text,
            text_positive_threshold=text_positive_threshold, smooth=smooth, swap=False, reduction=reduction,
            cross_rank=cross_rank, backend=backend,
        )
    mined_losses, mined_valid = _hardest_triplet_losses(
        embeddings, labels, memory, memory_labels, self_start, metric=metric, base_margin=margin,
        margin_scale=margin_scale, text_embeddings=text_embeddings, candidate_text=memory_text,
        text_positive_threshold=text_positive_threshold, smooth=smooth, backend=backend,
    )
    anchor_idx, positive_idx, negative_idx = indices_tuple
    k = anchor_idx.shape[0]
    d = pair_distances(embeddings, anchor_idx.repeat(2), torch.cat([positive_idx, negative_idx]), memory, metric=metric)
    triplet_margin = torch.full((k,), margin, dtype=d.dtype, device=d.device)
    if text_embeddings is not None and margin_scale != 0.0:
        # The mining above refused text_embeddings without memory_text (its op checks them as a pair).
        memory_rows = cast(torch.Tensor, memory_text).index_select(0, negative_idx)
        cos = text_cosine(text_embeddings.index_select(0, anchor_idx), memory_rows)
        triplet_margin = triplet_margin + margin_scale * (1.0 - cos.to(d.dtype)) * 0.5
    all_losses = torch.cat([mined_losses, _hinge(d[:k] - d[k:] + triplet_margin, smooth)])
    all_valid = torch.cat([mined_valid, torch.ones(k, dtype=torch.bool, device=d.device)])
    return _reduce(all_losses, all_valid, reduction, cross_rank)


def gather_for_memory(
    items: list[torch.Tensor | None], names: list[str], cross_rank: bool
) -> tuple[list[torch.Tensor | None], int]:
    """(items of all ranks, this rank's first row in them), detached; the identity without ranks."""
    if not cross_rank:
        return items, 0
    with torch.no_grad():
        batch = gather_batch([None if t is None else t.detach() for t in items], names,
                             with_grad=[False] * len(items))
    return batch.tensors, batch.offset
