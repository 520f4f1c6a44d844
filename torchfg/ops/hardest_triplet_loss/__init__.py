"""Batch-hard / ATL triplet loss as one op: mining, exact pair distances, margin, hinge, reduction.

:func:`hardest_triplet_loss` is what ``triplet_margin_loss(mining="batch_hard")`` and
``adaptive_triplet_loss`` compute, fused for the GPU: the ``"triton"`` backend runs a training
step in four launches (row statistics, mining, the loss forward, its backward; five for 64-bit
labels whose high words differ inside a block of anchors), with no N x M matrix, no reduction or
fill kernels and no host sync (``triton.py``). The ``"torch"`` backend is the reference
(``reference.py``); :mod:`torchfg.functional.triplet` keeps its own composition of the public ops
on that backend.
"""

from __future__ import annotations

import torch

from torchfg._validation import accumulation_dtype, check_bool, check_choice, check_number, is_row_slice
from torchfg.backends import BackendSpec, register_op, resolve_backend
from torchfg.ops._library import custom_op
from torchfg.ops.hardest_triplet_loss.reference import (
    anchor_loss_scale,
    hardest_triplet_loss_backward_reference,
    hardest_triplet_loss_reference,
)
from torchfg.ops.metric import DEFAULT_METRIC
from torchfg.ops.triplet import HardestMiningSettings, _check_mining_inputs, _check_text_inputs

__all__ = ["hardest_triplet_loss", "hardest_triplet_loss_with_count", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none", "mean_nonzero")

# The Triton backend's partner lists (its forward builds them, its backward walks them; sized here
# for the fake kernel too). A pair joins stripe (anchor index % LINK_STRIPES) of its partner's
# lists. Random data has hubs, rows that hundreds of anchors pick as their hardest negative (158
# of 8,192 and 317 of 32,768 anchors for N(0, 1) rows, D = 512, 4 per class), and the backward's
# walk of a list is a chain of dependent loads, as long as the block's longest list: four stripes
# cut that chain to about a quarter for 12 more bytes per candidate.
LINK_STRIPES = 4


def links_size(n: int, m: int) -> int:
    """int32 entries of the partner lists of n anchors against m candidates: [ticket (1), heads
    (m * LINK_STRIPES), next (2n)]."""
    return 1 + m * LINK_STRIPES + 2 * n

register_op("hardest_triplet_loss", BackendSpec("triton"))


def _anchor_rows(
    first: torch.Tensor, candidates: torch.Tensor | None, n: int, anchor_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates, anchors) of the ops' first two inputs: ``candidates`` None means that ``first``
    holds the candidates and the anchors are its rows [anchor_start, anchor_start + n)."""
    if candidates is not None:
        return candidates, first
    # The whole tensor stays the same object: the mining tells a batch mined against itself by identity.
    return first, first if n == first.shape[0] else first.narrow(0, anchor_start, n)


class _LossSettings(HardestMiningSettings):
    smooth: bool
    reduction: str


@custom_op("torchfg::hardest_triplet_loss")
def _hardest_triplet_loss_op(
    anchors: torch.Tensor,
    candidates: torch.Tensor | None,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    metric: str,
    base_margin: float,
    margin_scale: float,
    text_positive_threshold: float | None,
    self_offset: int,
    anchor_start: int,
    smooth: bool,
    reduction: str,
    link: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, pairs (N, 2) int64, terms (N, 3), count (1,), links, candidate_inv, anchor_inv).

    ``terms`` = (d(a, p), d(a, n), slope of the hinge) per anchor, 0 where it has no triplet;
    ``count``: the divisor of the means. The last three are the Triton backward's scratch (the
    partner lists; the cosine inverse norms), empty for the reference. ``candidates`` None:
    ``anchors`` holds the candidates, and the anchors are its rows [anchor_start, anchor_start + N)
    (N: the labels' length; all of its rows for a batch mined against itself), one tensor with one
    gradient.
    """
    others, anchors = _anchor_rows(anchors, candidates, anchor_labels.shape[0], anchor_start)
    kwargs: _LossSettings = {"metric": metric, "base_margin": base_margin, "margin_scale": margin_scale,
                             "text_positive_threshold": text_positive_threshold, "self_offset": self_offset,
                             "smooth": smooth, "reduction": reduction}
    if backend == "triton":
        from torchfg.ops.hardest_triplet_loss.triton import hardest_triplet_loss_triton

        loss, pairs, terms, count, links, candidate_inv, anchor_inv = hardest_triplet_loss_triton(
            anchors, others, anchor_labels, candidate_labels, anchor_text, candidate_text, link=link, **kwargs
        )
        if candidates is None:
            # The anchors' statistics are rows of the candidates' (the backward slices them there).
            anchor_inv = anchor_inv.new_empty(0)
        elif anchor_inv.numel() and anchor_inv.untyped_storage().data_ptr() == candidate_inv.untyped_storage().data_ptr():
            anchor_inv = anchor_inv.clone()  # anchors that are rows of the candidates: outputs must not alias
        return loss, pairs, terms, count, links, candidate_inv, anchor_inv
    loss, pairs, terms, count = hardest_triplet_loss_reference(
        anchors, others, anchor_labels, candidate_labels, anchor_text, candidate_text, **kwargs
    )
    empty = anchors.new_empty(0, dtype=accumulation_dtype(anchors.dtype))
    return loss, pairs, terms, count, empty.to(torch.int32), empty, empty.clone()


@_hardest_triplet_loss_op.register_fake
def _(anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, metric, base_margin,
      margin_scale, text_positive_threshold, self_offset, anchor_start, smooth, reduction, link, backend):
    n = anchor_labels.shape[0]
    m = anchors.shape[0] if candidates is None else candidates.shape[0]
    acc = accumulation_dtype(anchors.dtype)
    triton = backend == "triton"
    cosine = triton and metric == "cosine"
    return (
        anchors.new_empty(n if reduction == "none" else (), dtype=acc),
        anchors.new_empty(n, 2, dtype=torch.int64),
        anchors.new_empty(n, 3, dtype=acc),
        anchors.new_empty(1, dtype=acc),
        anchors.new_empty(links_size(n, m) if triton and link else 0, dtype=torch.int32),
        # No anchors: the mining takes no statistics.
        anchors.new_empty(m if cosine and n else 0, dtype=acc),
        anchors.new_empty(n if cosine and candidates is not None else 0, dtype=acc),
    )


@custom_op("torchfg::hardest_triplet_loss_backward")
def _hardest_triplet_loss_backward_op(
    grad: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor | None,
    pairs: torch.Tensor,
    terms: torch.Tensor,
    count: torch.Tensor,
    links: torch.Tensor,
    candidate_inv: torch.Tensor,
    anchor_inv: torch.Tensor,
    anchor_start: int,
    metric: str,
    reduction: str,
    needs_candidate_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/d anchors, dL/d candidates or empty); ``candidates`` None as in the forward op: the
    first gradient is then that of the whole tensor, its anchor rows' terms and partner terms."""
    if backend == "triton" and (links.numel() or (candidates is not None and not needs_candidate_grad)):
        from torchfg.ops.hardest_triplet_loss.triton import hardest_triplet_loss_backward_triton

        if candidates is None and metric == "cosine" and pairs.shape[0]:  # (no anchors: no statistics)
            anchor_inv = candidate_inv.narrow(0, anchor_start, pairs.shape[0])
        return hardest_triplet_loss_backward_triton(
            grad, anchors, anchors if candidates is None else candidates, pairs, terms, count, links, candidate_inv,
            anchor_inv, metric=metric, reduction=reduction, candidates_are_anchors=candidates is None,
            needs_candidate_grad=needs_candidate_grad, anchor_start=anchor_start,
        )
    others, rows = _anchor_rows(anchors, candidates, pairs.shape[0], anchor_start)
    # A row slice of the candidates: its two gradients as for separate tensors, then summed.
    one_tensor = candidates is None and rows is anchors
    if backend == "triton":
        # No partner lists (deterministic mode): the pair-distance backward, whose partner rows
        # come from a stable sort of the pairs, in anchor order. The unpaired anchors' pairs (-1)
        # go in as they are: clamped to row 0, they would all be walked by row 0's program.
        from torchfg.ops.pair_distances.triton import anchor_pair_distances_backward_triton

        coef = terms[:, 2] * anchor_loss_scale(grad.to(terms.dtype), count, reduction)
        grad_x, grad_y = anchor_pair_distances_backward_triton(
            torch.stack([coef, -coef], 1), rows, others, pairs, terms[:, :2].contiguous(), metric,
            y_is_x=one_tensor, needs_grad_y=needs_candidate_grad or (candidates is None and not one_tensor),
        )
    else:
        grad_x, grad_y = hardest_triplet_loss_backward_reference(
            grad, rows, others, pairs, terms, count, metric=metric, reduction=reduction,
            candidates_are_anchors=one_tensor,
        )
    if candidates is None and not one_tensor:
        grad_y.narrow(0, anchor_start, rows.shape[0]).add_(grad_x)
        return grad_y, anchors.new_empty(0)
    return grad_x, (grad_y if needs_candidate_grad and candidates is not None else anchors.new_empty(0))


@_hardest_triplet_loss_backward_op.register_fake
def _(grad, anchors, candidates, pairs, terms, count, links, candidate_inv, anchor_inv, anchor_start, metric,
      reduction, needs_candidate_grad, backend):
    grad_y = torch.empty_like(candidates) if candidates is not None and needs_candidate_grad else anchors.new_empty(0)
    return torch.empty_like(anchors), grad_y


def _setup_context(ctx, inputs, output):
    anchors, candidates = inputs[0], inputs[1]
    _, pairs, terms, count, links, candidate_inv, anchor_inv = output
    ctx.save_for_backward(anchors, candidates, pairs, terms, count, links, candidate_inv, anchor_inv)
    ctx.metric, ctx.anchor_start, ctx.reduction, ctx.backend = inputs[6], inputs[11], inputs[13], inputs[15]
    ctx.mark_non_differentiable(*output[1:])
    # The other outputs get no gradient: no zero tensors (fill launches) for them in the backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *unused):
    if grad is None:  # the loss itself took no gradient (only the non-differentiable outputs did)
        return (None,) * 16
    anchors, candidates, pairs, terms, count, links, candidate_inv, anchor_inv = ctx.saved_tensors
    needs_candidate_grad = candidates is not None and ctx.needs_input_grad[1]
    grad_x, grad_y = _hardest_triplet_loss_backward_op(
        grad, anchors, candidates, pairs, terms, count, links, candidate_inv, anchor_inv, ctx.anchor_start,
        ctx.metric, ctx.reduction, needs_candidate_grad, ctx.backend,
    )
    return (grad_x, grad_y if needs_candidate_grad else None) + (None,) * 14


_hardest_triplet_loss_op.register_autograd(_backward, setup_context=_setup_context)
_hardest_triplet_loss_backward_op.register_first_order_only("torchfg's fused triplet loss (hardest_triplet_loss)")


def hardest_triplet_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None = None,
    candidate_text: torch.Tensor | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    base_margin: float = 0.2,
    margin_scale: float = 0.0,
    text_positive_threshold: float | None = None,
    exclude_self: bool = False,
    anchor_offset: int = 0,
    smooth: bool = False,
    reduction: str = "mean",
    anchors_in_candidates: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Batch-hard triplet loss (ATL with text) of every anchor against the candidates, one op.

    The triplets are those of :func:`torchfg.ops.triplet.mine_hardest` (same arguments); each
    anchor with a positive and a negative contributes ``h(d(a, p) - d(a, n) + m(a, n))`` with
    ``m = base_margin + margin_scale * (1 - cos(t_a, t_n)) / 2`` (``base_margin`` without text),
    h the hinge (softplus with ``smooth``), and d recomputed exactly from ``a - b``.

    Args:
        anchors: (N, D) float16/bfloat16/float32/float64; differentiable.
        candidates: (M, D), same dtype and device; pass ``anchors`` itself for a batch mined
            against itself (its gradient then goes to ``anchors``), or a separate tensor
            (differentiable or not, e.g. a cross-batch memory).
        anchor_labels, candidate_labels: (N,) and (M,) integer labels.
        anchor_text, candidate_text: (N, T) and (M, T) text embeddings (no gradient), or None.
        metric, base_margin, margin_scale, text_positive_threshold, exclude_self, anchor_offset:
            as :func:`torchfg.ops.triplet.mine_hardest` (``base_margin`` any finite number).
        smooth: softplus instead of the hinge.
        reduction: ``"mean"`` (over anchors with a triplet), ``"sum"``, ``"none"`` ((N,), 0 for
            anchors without one) or ``"mean_nonzero"`` (over anchors with a positive loss).
        anchors_in_candidates: the anchors are the rows ``candidates[anchor_offset:anchor_offset
            + N]`` (that slice of it, e.g. this process's rows of a gathered batch; needs
            ``exclude_self``; a ValueError otherwise), taken as one tensor with the candidates:
            the anchors' terms go into the candidates' gradient (not through the anchors' own
            autograd path, which a plain slice makes the same), and the Triton backward writes
            that one gradient in one launch instead of two that autograd then sums. Under
            torch.compile the two tensors are taken apart.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. Under
            ``torch.use_deterministic_algorithms(True)`` the Triton backward finds each candidate's
            pairs with a stable sort instead of lists built in the forward (deterministic; a
            few more launches).

    Returns:
        Scalar loss ((N,) for ``"none"``) in fp32 (fp64 for fp64 anchors).

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [5.0], [5.5]], requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> loss = hardest_triplet_loss(x, x, labels, labels, exclude_self=True, base_margin=5.0)
        >>> loss.backward()
        >>> round(loss.item(), 4), x.grad.squeeze(1).tolist()
        (1.375, [-0.25, 1.25, -1.25, 0.25])
    """
    return hardest_triplet_loss_with_count(
        anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, metric=metric,
        base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
        exclude_self=exclude_self, anchor_offset=anchor_offset, smooth=smooth, reduction=reduction,
        anchors_in_candidates=anchors_in_candidates, backend=backend,
    )[0]


def hardest_triplet_loss_with_count(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None = None,
    candidate_text: torch.Tensor | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    base_margin: float = 0.2,
    margin_scale: float = 0.0,
    text_positive_threshold: float | None = None,
    exclude_self: bool = False,
    anchor_offset: int = 0,
    smooth: bool = False,
    reduction: str = "mean",
    anchors_in_candidates: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hardest_triplet_loss` and the divisor of its means: (loss, count), count a (1,) tensor
    (no gradient) of the anchors with a triplet (for ``"mean_nonzero"``, those with a positive loss).

    What a mean over several processes needs: each takes its anchors' ``"sum"`` and that count (of
    the anchors with a triplet), and divides by the count summed over all of them. (For a mean over
    the positive losses, take ``"none"`` and count the positive entries.)
    """
    anchor_labels, candidate_labels, self_offset = _check_mining_inputs(
        anchors, candidates, anchor_labels, candidate_labels, metric, exclude_self, anchor_offset
    )
    anchor_text, candidate_text, text_positive_threshold = _check_text_inputs(
        anchor_text, candidate_text, text_positive_threshold, anchors, candidates
    )
    base_margin = check_number(base_margin, "base_margin")
    margin_scale = check_number(margin_scale, "margin_scale", low=0.0)
    smooth = check_bool(smooth, "smooth")
    check_choice(reduction, "reduction", REDUCTIONS)
    backend = resolve_backend("hardest_triplet_loss", anchors.device, anchors.dtype, backend)
    same = candidates is anchors
    anchor_start = 0
    if check_bool(anchors_in_candidates, "anchors_in_candidates") and not same:
        unlike = rows_of_candidates(anchors, candidates, self_offset)
        if unlike is not None:
            raise ValueError(f"anchors_in_candidates=True: anchors must be the slice candidates[anchor_offset:"
                             f"anchor_offset + N] with exclude_self=True, {unlike}")
        # Under dynamo the check is not made (view internals), and the two tensors, which give the
        # same gradient for a plain slice, stay apart. No anchors: nothing to share.
        if anchors.shape[0] and not torch.compiler.is_compiling():
            same, anchor_start = True, self_offset
    # Partner lists are built only for a partner gradient, and only when a nondeterministic
    # summation order is allowed.
    link = (torch.is_grad_enabled() and not torch.are_deterministic_algorithms_enabled()
            and (anchors.requires_grad if same else candidates.requires_grad))
    outputs = _hardest_triplet_loss_op(
        candidates if same else anchors, None if same else candidates, anchor_labels, candidate_labels, anchor_text,
        candidate_text, metric, base_margin, margin_scale, text_positive_threshold, self_offset, anchor_start, smooth,
        reduction, link, backend,
    )
    return outputs[0], outputs[3]


def rows_of_candidates(anchors: torch.Tensor, candidates: torch.Tensor, self_offset: int) -> str | None:
    """None if ``anchors`` is the plain slice ``candidates[self_offset:self_offset + N]``, else what
    differs: the same memory, and where a gradient flows, a slice taken directly from
    ``candidates`` in autograd, without a hook or ``retain_grad`` of its own (its gradient is then
    what ``anchors_in_candidates`` routes through the candidates). ``self_offset`` -1: no
    ``exclude_self``.
    """
    n = anchors.shape[0]
    if self_offset < 0:
        return "and exclude_self=True is not set"
    if n == 0 or torch.compiler.is_compiling():
        return None
    if not is_row_slice(anchors, candidates, self_offset):
        return f"and they are not candidates[{self_offset}:{self_offset + n}] in memory"
    if not (torch.is_grad_enabled() and (anchors.requires_grad or candidates.requires_grad)):
        return None  # no gradient to route
    node = anchors.grad_fn
    parent = None if node is None or node.name() != "SliceBackward0" else node.next_functions[0][0]
    sliced = parent is not None and (
        parent is candidates.grad_fn if candidates.grad_fn is not None else getattr(parent, "variable", None) is candidates
    )
    if not sliced or not candidates.requires_grad:
        return "and they are not a slice taken from candidates under autograd (a view made under no_grad, " \
               "through another view or a Function, or of a tensor that needs no gradient)"
    if anchors.retains_grad or anchors._backward_hooks:
        return "and they have a hook or retain_grad of their own, which the candidates' gradient would bypass"
    return None
