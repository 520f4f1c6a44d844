"""Cross-batch memory (XBM) around a triplet loss: a thin module over :mod:`torchfg.functional.xbm`."""

from __future__ import annotations

import weakref
from typing import Any, cast

import torch
from torch import nn

from torchfg._validation import check_float_tensor, check_int, check_labels, in_backward
from torchfg.functional.triplet import _check_indices_tuple, _check_mining_backend, _validated_gather
from torchfg.functional.xbm import _memory_triplet_loss, _check_memory_loss_settings, enqueue
from torchfg.losses.triplet import AdaptiveTripletLoss, TripletMarginLoss

__all__ = ["CrossBatchMemory"]


def _rows_to_enqueue(
    checked: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(embeddings, labels, text embeddings or None) that a step writes into the memory, detached:
    the batch, or its ``enqueue_mask`` rows; ``checked``: the forward's validated arguments."""
    embeddings, labels, text, enqueue_mask, _ = checked
    if enqueue_mask is not None:
        embeddings, labels = embeddings[enqueue_mask], labels[enqueue_mask]
        text = None if text is None else text[enqueue_mask]
    return embeddings.detach(), labels, None if text is None else text.detach()


class _AwaitedBackward:
    """Lives as long as the autograd graph of one call's loss; ``ran`` once its backward reached it."""

    __slots__ = ("ran", "__weakref__")

    def __init__(self) -> None:
        self.ran = False


class CrossBatchMemory(nn.Module):
    """A FIFO memory of past embeddings that every batch's anchors are mined against (XBM).

    The API of pytorch-metric-learning's ``CrossBatchMemory``: each call enqueues the batch
    (detached) into a ring of the ``memory_size`` most recent embeddings, labels and (for
    :class:`AdaptiveTripletLoss`) text embeddings, then mines each anchor's hardest positive and
    (margin-aware) hardest negative among all memory rows with the fused kernel of
    :func:`torchfg.ops.triplet.mine_hardest` (no batch x memory matrix; an anchor's own copy is
    never its positive) and returns the loss of the selected pairs, computed exactly. A
    :class:`TripletMarginLoss` with ``mining="all"`` (PML's memory without a miner) or
    ``"semi_hard"`` mines that way against the memory instead (chunked reference). Gradients
    flow to the batch's embeddings as anchors only, as in pytorch-metric-learning. The memory is
    made of registered buffers, so ``.to(device)`` and ``state_dict()`` carry it (the write
    position and fill level travel as the module's extra state).

    Args:
        loss: a :class:`TripletMarginLoss` (``swap=False``) or an :class:`AdaptiveTripletLoss`;
            its margin, metric, mining, reduction, ``cross_rank`` and backend are used.
        embedding_size: D.
        memory_size: S, the number of memory slots.
        miner: must be None: the loss's own mining runs against the memory.
        text_size: T, the text embedding size (required with :class:`AdaptiveTripletLoss`).

    Shapes:
        forward(embeddings (N, D), labels (N,), indices_tuple = None, enqueue_mask (N,) bool = None,
        text_embeddings (N, T) = None) -> scalar. With ``enqueue_mask``, the masked rows are only
        enqueued and the other rows are the anchors (and are not stored). ``indices_tuple`` adds
        explicit (anchor, memory positive, memory negative) triplets to the mined ones (PML pairs
        ``(a1, p, a2, n)`` are converted to triplets, as the losses do).
        With ``cross_rank=True`` (from ``loss``) the rows to enqueue are gathered from every rank
        first, so all ranks keep the same memory; this rank's rows are the anchors. Ranks whose
        memories differ (fill level or write position: say a checkpoint restored on one rank
        only) are refused on every rank.

    Several calls may share one backward (two views per step: ``xbm(v1, y) + xbm(v2, y)``), as
    pytorch-metric-learning allows with its default distance: each loss's backward reads the
    memory as its call saw it. The memory is written in place while no earlier loss awaits its
    backward; a call made while one does writes into a copy of the buffers instead (one copy of
    the memory per such call; a loss that is dropped without a backward awaits nothing). A graph kept with
    ``retain_graph=True`` for a second backward after a later call is not covered: PyTorch then
    raises its "modified by an inplace operation" error.

    Example:
        >>> xbm = CrossBatchMemory(TripletMarginLoss(margin=0.2), embedding_size=16, memory_size=64)
        >>> emb = torch.randn(8, 16, requires_grad=True)
        >>> loss = xbm(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> loss.backward()
        >>> xbm.size
        8
    """

    # Registered buffers (rows [:size] are valid); text_memory only with an AdaptiveTripletLoss.
    embedding_memory: torch.Tensor
    label_memory: torch.Tensor
    text_memory: torch.Tensor | None

    def __init__(
        self,
        loss: nn.Module,
        embedding_size: int,
        memory_size: int = 1024,
        miner: Any = None,
        *,
        text_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, (TripletMarginLoss, AdaptiveTripletLoss)):
            # Qualified: pytorch-metric-learning's loss of the same name is the usual mistake.
            kind = f"{type(loss).__module__}.{type(loss).__qualname__}"
            raise TypeError(
                f"loss must be a torchfg.losses.TripletMarginLoss or torchfg.losses.AdaptiveTripletLoss, got {kind}"
            )
        if miner is not None:
            raise ValueError("miner must be None: the loss's own mining runs against the memory (set the loss's mining=)")
        if isinstance(loss, TripletMarginLoss) and loss.mining != "batch_hard":
            _check_mining_backend(loss.mining, loss.backend)  # semi-hard and all: the torch reference only
        if isinstance(loss, TripletMarginLoss) and loss.swap:
            # The swapped negative distance d(p, n) is between two memory rows: not implemented.
            raise ValueError("loss must have swap=False: CrossBatchMemory does not implement the swap")
        self.loss = loss
        self.embedding_size = check_int(embedding_size, "embedding_size", 1)
        self.memory_size = check_int(memory_size, "memory_size", 1)
        self.adaptive = isinstance(loss, AdaptiveTripletLoss)
        if self.adaptive and text_size is None:
            raise ValueError("text_size is required with an AdaptiveTripletLoss (the memory keeps text embeddings)")
        if not self.adaptive and text_size is not None:
            raise ValueError("text_size needs an AdaptiveTripletLoss (only its margins read text embeddings)")
        self.text_size = None if text_size is None else check_int(text_size, "text_size", 1)
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.int64))
        text = torch.zeros(self.memory_size, self.text_size) if self.text_size is not None else None
        self.register_buffer("text_memory", text)
        # The last call's loss graph, while it has not run its backward (see _awaits_backward).
        self._awaited: weakref.ref[_AwaitedBackward] | None = None
        self.reset_queue()

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference cannot be pickled (torch.save(model), spawned ranks), and a copy has
        # no graph of its own awaiting a backward.
        return {**super().__getstate__(), "_awaited": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({"_awaited": None, **state})

    def reset_queue(self) -> None:
        """Empty the memory (the buffers keep their device and dtype)."""
        self.queue_idx = 0  # slot of the next write
        self.size = 0  # valid slots: rows [:size]

    @property
    def has_been_filled(self) -> bool:
        """Whether every memory slot holds a row (``size == memory_size``)."""
        return self.size == self.memory_size

    def get_extra_state(self) -> dict[str, int]:
        """The ring's write position and fill level, saved in ``state_dict()`` with the buffers."""
        return {"queue_idx": self.queue_idx, "size": self.size}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # PyTorch copies every buffer whose shape matches and sets the extra state even where
        # another buffer's shape did not (it records the mismatch and raises after every module
        # has loaded): a caller that caught that error went on with the other memory's labels or
        # fill level over rows that were never written. A state of another shape loads nothing.
        mismatched = []
        for name in ("embedding_memory", "label_memory", "text_memory"):
            mine, theirs = getattr(self, name), state_dict.get(prefix + name)
            if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and theirs.shape != mine.shape:
                mismatched.append(
                    f"size mismatch for {prefix}{name}: copying a param with shape {theirs.shape} from checkpoint, "
                    f"the shape in current model is {mine.shape}."
                )
        if mismatched:
            error_msgs.extend(mismatched)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def set_extra_state(self, state: dict[str, int]) -> None:
        """Restore :meth:`get_extra_state`'s dict; refused if it does not fit ``memory_size``."""
        queue_idx, size = int(state["queue_idx"]), int(state["size"])
        # A state saved with another memory_size would fail later, inside a forward's slicing.
        if not 0 <= size <= self.memory_size or not 0 <= queue_idx < self.memory_size:
            raise ValueError(
                f"state_dict's memory state (queue_idx={queue_idx}, size={size}) does not fit memory_size="
                f"{self.memory_size}: it needs 0 <= size <= memory_size and 0 <= queue_idx < memory_size"
            )
        self.queue_idx, self.size = queue_idx, size

    def _match(self, embeddings: torch.Tensor, text: torch.Tensor | None) -> None:
        # Like pytorch-metric-learning, the memory follows the embeddings' device and dtype. Rebuilt
        # outside inference mode: a buffer made in it (a validation pass) is an inference tensor
        # that no later training step could write into.
        with torch.inference_mode(False):
            self._rebuild_for(embeddings, text)

    def _rebuild_for(self, embeddings: torch.Tensor, text: torch.Tensor | None) -> None:
        # New buffers, copied, while the last call's loss awaits a backward that reads these in
        # place (see _awaits_backward); a conversion makes new ones anyway, in the same copy.
        copy = self._awaits_backward()
        memory = self.embedding_memory
        if copy or memory.device != embeddings.device or memory.dtype != embeddings.dtype:
            self.embedding_memory = memory.to(embeddings.device, embeddings.dtype, copy=copy)
        if copy or self.label_memory.device != embeddings.device:
            self.label_memory = self.label_memory.to(embeddings.device, copy=copy)
        text_memory = self.text_memory  # None without text (not adaptive)
        if text is not None and text_memory is not None and (
            copy or text_memory.device != text.device or text_memory.dtype != text.dtype
        ):
            self.text_memory = text_memory.to(text.device, text.dtype, copy=copy)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        enqueue_mask: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # The ring's write position and fill level are Python ints that change every step,
            # and traced code is specialised on them: a new graph per step, then (past the
            # recompile limit) the whole compiled step eager. The memory step runs eagerly instead,
            # behind a graph break; the model around it stays compiled.
            # Disabled here, not once at class level: torch.compiler.disable imports torch._dynamo
            # (~1.2 s and 140 MiB once per process), which eager training never needs. The price:
            # fullgraph=True reports this call to a skipped function rather than the reason.
            return torch.compiler.disable(self._step, recursive=True)(
                embeddings, labels, indices_tuple, enqueue_mask, text_embeddings
            )
        return self._step(embeddings, labels, indices_tuple, enqueue_mask, text_embeddings)

    def _step(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        enqueue_mask: torch.Tensor | None,
        text_embeddings: torch.Tensor | None,
    ) -> torch.Tensor:
        if in_backward():
            # A recomputation by activation checkpointing would enqueue the batch a second time.
            raise RuntimeError(
                "CrossBatchMemory ran inside a backward pass (a torch.utils.checkpoint recomputation): it "
                "writes the batch into its memory, so a recomputation would store it twice; keep the memory "
                "outside the checkpointed function (checkpoint the model only)"
            )
        loss, adaptive, cross_rank = self.loss, self.adaptive, self.loss.cross_rank
        # The loss's settings, read at every call: they are attributes a training loop may change
        # (a margin schedule), so they are checked again below.
        settings = dict(
            margin=loss.base_margin if adaptive else loss.margin, margin_scale=loss.margin_scale if adaptive else 0.0,
            text_positive_threshold=loss.text_positive_threshold if adaptive else None, metric=loss.metric,
            reduction=loss.reduction, smooth=False if adaptive else loss.smooth,
            mining="batch_hard" if adaptive else loss.mining,
            triplets_per_anchor="all" if adaptive else loss.triplets_per_anchor,
        )

        def validate():
            nonlocal embeddings, labels, text_embeddings, enqueue_mask
            embeddings = check_float_tensor(embeddings, "embeddings", ndim=2)
            if embeddings.shape[1] != self.embedding_size:
                raise ValueError(f"embeddings must have {self.embedding_size} columns (embedding_size), got {embeddings.shape[1]}")
            labels = check_labels(labels, "labels", embeddings.shape[0], device=embeddings.device).long()
            if self.adaptive:
                if text_embeddings is None:
                    raise ValueError("text_embeddings are required with an AdaptiveTripletLoss")
                text_embeddings = check_float_tensor(text_embeddings, "text_embeddings", ndim=2)
                if text_embeddings.shape != (embeddings.shape[0], self.text_size):
                    raise ValueError(
                        f"text_embeddings must have shape ({embeddings.shape[0]}, {self.text_size}), got {tuple(text_embeddings.shape)}"
                    )
                text_embeddings = text_embeddings.to(embeddings.device).detach()
            elif text_embeddings is not None:
                raise ValueError("text_embeddings need an AdaptiveTripletLoss")
            if not adaptive and loss.swap:
                # Set after construction (which refuses it): it was ignored, silently.
                raise ValueError("loss.swap must be False: CrossBatchMemory does not implement the swap")
            if indices_tuple is not None and enqueue_mask is not None:
                raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
            if enqueue_mask is not None:
                enqueue_mask = torch.as_tensor(enqueue_mask, device=embeddings.device)
                if enqueue_mask.dtype != torch.bool or enqueue_mask.shape != labels.shape:
                    raise ValueError(f"enqueue_mask must be a ({labels.shape[0]},) bool tensor, got {enqueue_mask.dtype} {tuple(enqueue_mask.shape)}")
            checked = _check_memory_loss_settings(**settings, backend=loss.backend)
            return embeddings, labels, text_embeddings, enqueue_mask, checked

        # With cross_rank, an input error on one rank raises on every rank (the others would wait
        # in the gather below).
        # The ring's state too: a memory restored on one rank only (a resumed checkpoint) made the
        # ranks mine against different memories from then on, silently.
        call = dict(
            function="CrossBatchMemory", memory_size=self.memory_size, embedding_size=self.embedding_size,
            size=self.size, queue_idx=self.queue_idx,
            loss=type(loss).__name__, backend=loss.backend, **settings,
            indices_tuple=indices_tuple is not None, enqueue_mask=enqueue_mask is not None,
        )
        if cross_rank:
            # The exchange of every rank's outcome and the gather of the rows to enqueue are one
            # collective (one host synchronisation).
            with torch.no_grad():
                checked, batch = _validated_gather(validate, call, _rows_to_enqueue, with_grad=False)
            queued, offset = batch.tensors, batch.offset
        else:
            checked = validate()
            queued, offset = list(_rows_to_enqueue(checked)), 0
        embeddings, labels, text_embeddings, enqueue_mask, (margin, margin_scale, per_anchor) = checked
        self._match(embeddings, text_embeddings)

        text = text_embeddings
        if enqueue_mask is not None:
            keep = ~enqueue_mask
            embeddings, labels = embeddings[keep], labels[keep]
            text = None if text is None else text[keep]
        queued_rows = cast(torch.Tensor, queued[0]).shape[0]  # the embeddings: never None
        if queued_rows > self.memory_size:
            raise ValueError(f"a step enqueues {queued_rows} rows, more than memory_size={self.memory_size}")
        if indices_tuple is not None:
            # Checked (and PML pair tuples converted) before the memory changes: a bad call must
            # leave the memory as it was. Positives and negatives index the memory after the write.
            indices_tuple = _check_indices_tuple(
                indices_tuple, embeddings.shape[0], min(self.size + queued_rows, self.memory_size),
                embeddings.device, cross_rank=cross_rank,
            )
        start, self.queue_idx, self.size = enqueue(
            [self.embedding_memory, self.label_memory, self.text_memory if self.adaptive else None],
            queued, self.queue_idx, self.size,
        )
        # The anchors' own copies: at (start + offset + i) % S unless they were not enqueued. No
        # anchors (an empty batch on this rank): no copies, and start + offset may be the first
        # free slot, which is not a valid row yet.
        self_start = None if enqueue_mask is not None or embeddings.shape[0] == 0 else (start + offset) % self.memory_size
        # Settings and indices_tuple were checked above, inside the cross-rank exchange: no second one.
        result = _memory_triplet_loss(
            embeddings,
            labels,
            self.embedding_memory[: self.size],
            self.label_memory[: self.size],
            self_start,
            text_embeddings=text,
            memory_text=None if self.text_memory is None else self.text_memory[: self.size],
            **{**settings, "margin": margin, "margin_scale": margin_scale, "triplets_per_anchor": per_anchor},
            indices_tuple=indices_tuple,
            cross_rank=cross_rank,
            backend=loss.backend,
        )
        self._await_backward(result)
        return result

    def _await_backward(self, result: torch.Tensor) -> None:
        """Remember ``result``'s graph until its backward runs: it reads the memory rows in place."""
        node = result.grad_fn
        if node is None:
            self._awaited = None
            return
        awaited = _AwaitedBackward()

        def reached(grad_outputs):
            awaited.ran = True

        # The node owns the hook and the hook the marker: the marker dies with the graph (a loss
        # dropped without a backward), and says when the backward reached the loss.
        node.register_prehook(reached)
        self._awaited = weakref.ref(awaited)

    def _awaits_backward(self) -> bool:
        """Whether the last call's loss still awaits its backward, which reads the memory in place.

        pytorch-metric-learning's default distance normalises the memory into a new tensor at every
        call, so two calls before one backward work there; an in-place write made the first loss's
        backward raise PyTorch's "modified by an inplace operation" error. The buffers are copied
        only then (:meth:`_rebuild_for`): a million-row memory is gigabytes.
        """
        awaited = None if self._awaited is None else self._awaited()
        return awaited is not None and not awaited.ran

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, text_size={self.text_size}, "
            f"size={self.size}, queue_idx={self.queue_idx}"
        )
