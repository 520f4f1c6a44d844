"""Triplet mining ops: hardest (margin-aware) pairs, semi-hard and all triplets.

The ops return index tensors only (they are not differentiable); the losses in
:mod:`torchfg.functional.triplet` recompute the distances of the selected pairs exactly from
``a - b`` with ordinary autograd, so their backward is O(N D).

Backends of :func:`mine_hardest`: ``"torch"`` (the chunked reference in ``reference.py``, any
device) and ``"triton"`` (a fused kernel in ``triton.py`` that streams tiles of the distance and
text-similarity matrices and never writes an N x M matrix; CUDA devices). :func:`mine_semi_hard`
and :func:`mine_all_triplets` use the chunked reference on every device.
"""

from __future__ import annotations

from typing import TypedDict, cast

import torch

from torchfg._validation import (
    check_bool,
    check_choice,
    check_float_tensor,
    check_int,
    check_labels,
    check_number,
    check_row_sets,
    check_tensor,
    mining_labels,
)
from torchfg.backends import BackendSpec, register_op, resolve_backend
from torchfg.ops._library import custom_op
from torchfg.ops.metric import DEFAULT_METRIC, METRICS
from torchfg.ops.triplet.reference import (
    mine_all_triplets_reference,
    mine_hardest_reference,
    mine_semi_hard_reference,
)

__all__ = [
    "mine_hardest",
    "mine_semi_hard",
    "mine_all_triplets",
]


register_op("mine_hardest", BackendSpec("triton"))


class HardestMiningSettings(TypedDict):
    """The mining ops' keyword settings (the fused loss adds its own to them)."""

    metric: str
    base_margin: float
    margin_scale: float
    text_positive_threshold: float | None
    self_offset: int


# ----------------------------------------------------------------------------- registered ops


@custom_op("torchfg::mine_hardest")
def _mine_hardest_op(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    metric: str,
    base_margin: float,
    margin_scale: float,
    text_positive_threshold: float | None,
    self_offset: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs: HardestMiningSettings = {
        "metric": metric,
        "base_margin": base_margin,
        "margin_scale": margin_scale,
        "text_positive_threshold": text_positive_threshold,
        "self_offset": self_offset,
    }
    if backend == "triton":
        from torchfg.ops.triplet.triton import mine_hardest_triton

        return mine_hardest_triton(anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, **kwargs)
    return mine_hardest_reference(anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, **kwargs)


@_mine_hardest_op.register_fake
def _(anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, metric, base_margin,
      margin_scale, text_positive_threshold, self_offset, backend):
    n = anchors.shape[0]
    return anchors.new_empty(n, dtype=torch.int64), anchors.new_empty(n, dtype=torch.int64)


@custom_op("torchfg::mine_semi_hard")
def _mine_semi_hard_op(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    metric: str,
    self_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mine_semi_hard_reference(
        anchors, candidates, anchor_labels, candidate_labels, metric=metric, self_offset=self_offset
    )


@_mine_semi_hard_op.register_fake
def _(anchors, candidates, anchor_labels, candidate_labels, metric, self_offset):
    count = torch.library.get_ctx().new_dynamic_size()
    return tuple(anchors.new_empty(count, dtype=torch.int64) for _ in range(3))


@custom_op("torchfg::mine_all_triplets")
def _mine_all_triplets_op(
    anchor_labels: torch.Tensor, candidate_labels: torch.Tensor, self_offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mine_all_triplets_reference(anchor_labels, candidate_labels, self_offset=self_offset)


@_mine_all_triplets_op.register_fake
def _(anchor_labels, candidate_labels, self_offset):
    count = torch.library.get_ctx().new_dynamic_size()
    return tuple(anchor_labels.new_empty(count, dtype=torch.int64) for _ in range(3))


# ----------------------------------------------------------------------------- validation


def _check_mining_inputs(
    anchors: object,
    candidates: object,
    anchor_labels: object,
    candidate_labels: object,
    metric: object,
    exclude_self: object,
    anchor_offset: object,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    anchors = check_float_tensor(anchors, "anchors", ndim=2)
    if candidates is anchors:  # passed both checks already as the anchors
        candidates = anchors
    else:
        candidates = check_float_tensor(candidates, "candidates", ndim=2)
        check_row_sets(anchors, "anchors", candidates, "candidates")
    same_labels = candidate_labels is anchor_labels
    anchor_labels = mining_labels(check_labels(anchor_labels, "anchor_labels", anchors.shape[0], device=anchors.device))
    # One labels tensor stays one after conversion: the symmetric mining kernel recognises a batch
    # mined against itself by its rows, labels and text being the same tensors.
    candidate_labels = anchor_labels if same_labels and candidates.shape[0] == anchors.shape[0] else mining_labels(
        check_labels(candidate_labels, "candidate_labels", candidates.shape[0], device=anchors.device)
    )
    check_choice(metric, "metric", METRICS)
    self_offset = _self_offset(exclude_self, anchor_offset, anchors.shape[0], candidates.shape[0])
    if self_offset > 0 and candidates is anchors:
        # Any offset in [0, M) is a valid rotation of a full ring, but with the anchors passed as
        # their own candidates row i is candidate i: another offset would let it be its own positive.
        raise ValueError(f"anchor_offset must be 0 when candidates is anchors (anchor i is candidate i), got {self_offset}")
    return anchor_labels, candidate_labels, self_offset


def _check_text_inputs(
    anchor_text: object,
    candidate_text: object,
    text_positive_threshold: object,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
    """(anchor_text, candidate_text) checked against the rows they describe and detached (weak
    labels get no gradient), and the threshold checked; for every op that mines with text."""
    if (anchor_text is None) != (candidate_text is None):
        raise ValueError("anchor_text and candidate_text must be given together (or both None)")
    if anchor_text is not None:
        anchor_text = check_float_tensor(anchor_text, "anchor_text", ndim=2)
        candidate_text = check_float_tensor(candidate_text, "candidate_text", ndim=2)
        if anchor_text.shape[0] != anchors.shape[0]:
            raise ValueError(f"anchor_text must have {anchors.shape[0]} rows (one per anchor), got {anchor_text.shape[0]}")
        if candidate_text.shape[0] != candidates.shape[0]:
            raise ValueError(
                f"candidate_text must have {candidates.shape[0]} rows (one per candidate), got {candidate_text.shape[0]}"
            )
        check_row_sets(anchor_text, "anchor_text", candidate_text, "candidate_text", size_name="T")
        if anchor_text.device != anchors.device:
            raise ValueError("anchor_text and candidate_text must be on the device of anchors")
        anchor_text, candidate_text = anchor_text.detach(), candidate_text.detach()
    if text_positive_threshold is not None:
        text_positive_threshold = check_number(text_positive_threshold, "text_positive_threshold", low=-1.0, high=1.0)
    # candidate_text is None with anchor_text (checked first), else checked with it.
    return anchor_text, cast("torch.Tensor | None", candidate_text), text_positive_threshold


def _self_offset(exclude_self: object, anchor_offset: object, n: int, m: int, name: str = "anchor_offset") -> int:
    """The kernels' internal ``self_offset`` (candidate index of anchor 0, -1: none) from the public
    pair. Every op takes anchor i as candidate ``(anchor_offset + i) % M`` (a batch across the end
    of a ring memory), so any offset in [0, M) is valid; with N == M that is a rotation of a full
    ring, which labels cannot tell from a wrong offset (``candidates is anchors`` with an offset
    other than 0 is refused where the rows are given)."""
    exclude_self = check_bool(exclude_self, "exclude_self")
    anchor_offset = check_int(anchor_offset, name)
    if not exclude_self:
        return -1
    if n > m or not 0 <= anchor_offset < max(m, 1):
        raise ValueError(
            f"{name} must be in [0, M) = [0, {m}), and N <= M, for anchors among the M candidates (anchor i "
            f"is candidate ({name} + i) % M), got {name}={anchor_offset}, N={n}, M={m}"
        )
    return anchor_offset


# ----------------------------------------------------------------------------- public ops


def mine_hardest(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None = None,
    candidate_text: torch.Tensor | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    base_margin: float = 0.0,
    margin_scale: float = 0.0,
    text_positive_threshold: float | None = None,
    exclude_self: bool = False,
    anchor_offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor, the hardest positive and the hardest (margin-aware) negative candidate.

    With d the metric distance (computed on the fast path in fp32, fp64 for fp64), for anchor i:

    * positive j: same label and, with ``exclude_self``, ``j != (anchor_offset + i) % M``;
      ``positive_idx[i] = argmax_j d(i, j)``.
    * text similarity ``c(i, j) = cos(anchor_text[i], candidate_text[j])`` (0 for a zero row),
      margin ``m(i, j) = base_margin + margin_scale * (1 - c(i, j)) / 2`` (``base_margin``
      without text).
    * negative j: another label and, with text and ``text_positive_threshold`` given,
      ``c(i, j) < text_positive_threshold``; ``negative_idx[i] = argmax_j m(i, j) - d(i, j)``
      (the closest negative when margins are constant).

    Ties go to the lowest index among equal keys as computed; -1 marks an anchor without a valid
    positive / negative. The keys come from a GEMM, which may round two copies of one row
    differently (their columns sit at different positions), so an exact duplicate can be a 1-ulp
    near-tie that the backends break differently; each copy is a valid pick. The selection is not
    differentiable; recompute the distances of the selected pairs.

    Args:
        anchors: (N, D) float16/bfloat16/float32/float64.
        candidates: (M, D), same dtype and device (may be ``anchors`` itself).
        anchor_labels: (N,) integer labels.
        candidate_labels: (M,) integer labels.
        anchor_text: (N, T) float text embeddings of the anchors, or None.
        candidate_text: (M, T) text embeddings of the candidates (same dtype), or None.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"`` (negative inner product).
        base_margin: m0 (only matters for the negative choice together with text).
        margin_scale: s >= 0; ignored without text.
        text_positive_threshold: cosine in [-1, 1] at or above which an item with another label is
            a near-duplicate, never a negative; None turns it off. Ignored without text.
        exclude_self: the anchors are among the candidates (anchor i is candidate
            ``(anchor_offset + i) % M``) and are never their own positive. False when the two sets
            are disjoint (e.g. a separate reference set).
        anchor_offset: with ``exclude_self``, the candidate row of anchor 0, in [0, M) (0 when
            the candidates are the anchors; a rank's first row in a gathered batch; a ring
            memory's write position, where a batch past the last slot continues at slot 0).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`torchfg.backends`).

    Returns:
        (positive_idx (N,), negative_idx (N,)) int64 indices into ``candidates``.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> mine_hardest(x, x, labels, labels, exclude_self=True)
        (tensor([1, 0, 3, 2]), tensor([2, 2, 1, 1]))
    """
    anchor_labels, candidate_labels, self_offset = _check_mining_inputs(
        anchors, candidates, anchor_labels, candidate_labels, metric, exclude_self, anchor_offset
    )
    base_margin = check_number(base_margin, "base_margin")
    margin_scale = check_number(margin_scale, "margin_scale", low=0.0)
    anchor_text, candidate_text, text_positive_threshold = _check_text_inputs(
        anchor_text, candidate_text, text_positive_threshold, anchors, candidates
    )
    backend = resolve_backend("mine_hardest", anchors.device, anchors.dtype, backend)
    return _mine_hardest_op(
        anchors.detach(),
        candidates.detach(),
        anchor_labels,
        candidate_labels,
        anchor_text,
        candidate_text,
        metric,
        base_margin,
        margin_scale,
        text_positive_threshold,
        self_offset,
        backend,
    )


def mine_semi_hard(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    *,
    metric: str = DEFAULT_METRIC,
    exclude_self: bool = False,
    anchor_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FaceNet semi-hard triplets, one per anchor-positive pair (chunked reference, any device).

    For each pair (a, p) (same label, p not a itself) of an anchor that has a negative: the
    closest negative strictly farther than p, else the farthest negative. Ties -> lowest index.

    Args:
        anchors: (N, D) float; candidates: (M, D) same dtype/device.
        anchor_labels: (N,) int; candidate_labels: (M,) int.
        metric: see :func:`mine_hardest`.
        exclude_self, anchor_offset: see :func:`mine_hardest`.

    Returns:
        (anchor_idx, positive_idx, negative_idx) int64 of equal length, sorted by anchor then
        positive. The length depends on the labels (data-dependent under ``torch.compile``).

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [1.5], [4.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> mine_semi_hard(x, x, labels, labels, exclude_self=True)
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 3, 0, 1]))
    """
    anchor_labels, candidate_labels, self_offset = _check_mining_inputs(
        anchors, candidates, anchor_labels, candidate_labels, metric, exclude_self, anchor_offset
    )
    return _mine_semi_hard_op(anchors.detach(), candidates.detach(), anchor_labels, candidate_labels, metric, self_offset)


def mine_all_triplets(
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    *,
    exclude_self: bool = False,
    anchor_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every valid triplet (a, p, n) in lexicographic order (chunked reference, any device).

    Args:
        anchor_labels: (N,) int; candidate_labels: (M,) int (same device).
        exclude_self, anchor_offset: see :func:`mine_hardest`.

    Returns:
        (anchor_idx, positive_idx, negative_idx) int64 of length T = sum_a P_a * N_a.

    Example:
        >>> labels = torch.tensor([0, 0, 1])
        >>> mine_all_triplets(labels, labels, exclude_self=True)
        (tensor([0, 1]), tensor([1, 0]), tensor([2, 2]))
    """
    candidate_labels = check_tensor(candidate_labels, "candidate_labels")
    anchor_labels = check_tensor(anchor_labels, "anchor_labels")
    candidate_labels = check_labels(candidate_labels, "candidate_labels", candidate_labels.shape[0] if candidate_labels.dim() else -1).long()
    anchor_labels = check_labels(
        anchor_labels, "anchor_labels", anchor_labels.shape[0] if anchor_labels.dim() else -1, device=candidate_labels.device
    ).long()
    self_offset = _self_offset(exclude_self, anchor_offset, anchor_labels.shape[0], candidate_labels.shape[0])
    return _mine_all_triplets_op(anchor_labels, candidate_labels, self_offset)
