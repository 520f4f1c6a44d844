"""Triplet margin loss, adaptive triplet loss (weak-label margins) and triplet mining.

Mining (:mod:`torchfg.ops.triplet`) only selects indices, on the fast GEMM path. The loss of the
selected pairs is then recomputed exactly from ``a - b`` on the gathered rows
(:func:`torchfg.ops.triplet.pair_distances`, whose analytic backward is chunked), so for
``batch_hard`` and the adaptive loss the backward touches 2N pairs: O(N D) time and memory, never
an N x N matrix. The euclidean gradient at zero distance (duplicate embeddings) is 0, never NaN.

Anchors always come from ``embeddings``; positives and negatives come from a candidate set, which
is ``embeddings`` itself (anchor i is then candidate i and never its own positive) or a separate
reference set (``ref_embeddings`` / ``ref_labels``, e.g. a cross-batch memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchfg._validation import accumulation_dtype, check_choice, check_float_tensor, check_labels
from torchfg.ops.pairwise import pairwise_distance
from torchfg.ops.triplet import METRICS, mine_all_triplets, mine_hardest, mine_semi_hard, pair_distances
from torchfg.ops.triplet import _check_number  # shared numeric argument check

__all__ = ["triplet_margin_loss", "adaptive_triplet_loss", "mine_triplets", "REDUCTIONS", "MINING_STRATEGIES"]

REDUCTIONS = ("mean", "sum", "none", "mean_nonzero")
MINING_STRATEGIES = ("batch_hard", "semi_hard", "all")

# Default margin scale of the adaptive loss, also used by mine_triplets when text is given.
DEFAULT_MARGIN_SCALE = 0.5


# ----------------------------------------------------------------------------- exact pair distances


def _anchor_pair_distances(
    embeddings: torch.Tensor,
    candidates: torch.Tensor,
    anchor_idx: torch.Tensor,
    *candidate_idx: torch.Tensor,
    metric: str,
) -> list[torch.Tensor]:
    """d(embeddings[anchor_idx], candidates[idx]) for each index tensor, in one exact pass.

    Goes through :func:`torchfg.ops.triplet.pair_distances`: exact from ``a - b``, backward
    O(K D) with a zero (not NaN) euclidean gradient at zero distance.
    """
    k = anchor_idx.shape[0]
    other = None if candidates is embeddings else candidates
    d = pair_distances(
        embeddings, anchor_idx.repeat(len(candidate_idx)), torch.cat(candidate_idx), other, metric=metric
    )
    return [d[i * k : (i + 1) * k] for i in range(len(candidate_idx))]


def _text_cosine(anchor_text: torch.Tensor, other_text: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two (K, T) text-embedding sets; 0 for a zero row. No gradient."""
    acc = accumulation_dtype(anchor_text.dtype)
    a, b = anchor_text.to(acc), other_text.to(acc)
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    dots = torch.linalg.vecdot(a, b)
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(dots))


# ----------------------------------------------------------------------------- validation


def _check_embeddings(
    embeddings: object,
    labels: object,
    ref_embeddings: object,
    ref_labels: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Returns (embeddings, labels, candidates, candidate_labels, self_offset)."""
    embeddings = check_float_tensor(embeddings, "embeddings", ndim=2)
    if embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must have a non-empty feature dim, got shape {tuple(embeddings.shape)}")
    labels = check_labels(labels, "labels", embeddings.shape[0], device=embeddings.device).long()
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together (or both None)")
    if ref_embeddings is None:
        return embeddings, labels, embeddings, labels, 0
    ref_embeddings = check_float_tensor(ref_embeddings, "ref_embeddings", ndim=2)
    if ref_embeddings.device != embeddings.device:
        raise ValueError(
            f"ref_embeddings must be on the device of embeddings ({embeddings.device}), got {ref_embeddings.device}"
        )
    if ref_embeddings.dtype != embeddings.dtype:
        raise TypeError(f"ref_embeddings must have the dtype of embeddings ({embeddings.dtype}), got {ref_embeddings.dtype}")
    if ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings must have the feature size of embeddings ({embeddings.shape[1]}), got {ref_embeddings.shape[1]}"
        )
    ref_labels = check_labels(ref_labels, "ref_labels", ref_embeddings.shape[0], device=embeddings.device).long()
    return embeddings, labels, ref_embeddings, ref_labels, -1


def _check_text(text_embeddings: object, n: int, device: torch.device) -> torch.Tensor:
    text_embeddings = check_float_tensor(text_embeddings, "text_embeddings", ndim=2)
    if text_embeddings.shape[0] != n:
        raise ValueError(f"text_embeddings must have {n} rows (one per embedding), got {text_embeddings.shape[0]}")
    if text_embeddings.device != device:
        raise ValueError(f"text_embeddings must be on the device of embeddings ({device}), got {text_embeddings.device}")
    # Weak labels are targets, not parameters: no gradient flows into the text encoder.
    return text_embeddings.detach()


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- losses


def _reduce(losses: torch.Tensor, counted: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """losses: (K,) with zeros where ``counted`` is False (None: all counted)."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = losses.new_tensor(losses.shape[0]) if counted is None else counted.sum()
    else:  # mean_nonzero
        nonzero = losses > 0
        count = (nonzero if counted is None else nonzero & counted).sum()
    # An empty selection gives 0 with a zero gradient (0 / 1), never 0 / 0.
    return total / count.clamp_min(1).to(total.dtype)


def _hinge(violation: torch.Tensor, smooth: bool) -> torch.Tensor:
    return F.softplus(violation) if smooth else F.relu(violation)


def _hardest_triplet_losses(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    self_offset: int,
    *,
    metric: str,
    base_margin: float,
    margin_scale: float,
    text_embeddings: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    text_positive_threshold: float | None,
    smooth: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor batch-hard / adaptive losses (N,) (0 where invalid) and the validity mask (N,).

    ``candidates`` (M, D) with ``candidate_labels`` (M,); anchor i is candidate ``self_offset + i``
    (``-1``: anchors are not among the candidates).
    """
    acc = accumulation_dtype(embeddings.dtype)
    n = embeddings.shape[0]
    if n == 0 or candidates.shape[0] == 0:
        # Keeps the graph connected so backward() gives zero gradients instead of failing.
        zeros = embeddings.to(acc).sum(1) * 0.0
        return zeros, torch.zeros(n, dtype=torch.bool, device=embeddings.device)
    positive_idx, negative_idx = mine_hardest(
        embeddings,
        candidates,
        labels,
        candidate_labels,
        text_embeddings,
        candidate_text,
        metric=metric,
        base_margin=base_margin,
        margin_scale=margin_scale,
        text_positive_threshold=text_positive_threshold,
        self_offset=self_offset,
        backend=backend,
    )
    valid = (positive_idx >= 0) & (negative_idx >= 0)
    # Invalid anchors gather row 0 and are masked out below: shapes stay static (compile-friendly).
    positive_idx, negative_idx = positive_idx.clamp_min(0), negative_idx.clamp_min(0)
    anchor_idx = torch.arange(n, device=embeddings.device)
    d_ap, d_an = _anchor_pair_distances(embeddings, candidates, anchor_idx, positive_idx, negative_idx, metric=metric)
    margin: torch.Tensor | float = base_margin
    if text_embeddings is not None and margin_scale != 0.0:
        text_cos = _text_cosine(text_embeddings, candidate_text.index_select(0, negative_idx))
        margin = base_margin + margin_scale * (1.0 - text_cos) * 0.5
    losses = _hinge(d_ap - d_an + margin, smooth)
    return torch.where(valid, losses, torch.zeros_like(losses)), valid


def _listed_triplet_losses(
    embeddings: torch.Tensor,
    candidates: torch.Tensor,
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    metric: str,
    margin: float,
    smooth: bool,
    exact: bool,
    backend: str,
) -> torch.Tensor:
    """Losses (T,) of explicit triplets (anchor into embeddings, positive/negative into candidates)."""
    anchor_idx, positive_idx, negative_idx = triplets
    if exact:
        d_ap, d_an = _anchor_pair_distances(embeddings, candidates, anchor_idx, positive_idx, negative_idx, metric=metric)
    else:
        # Every pair may carry gradient: the differentiable GEMM-path distance matrix is cheaper
        # than gathering one row copy per triplet.
        acc = accumulation_dtype(embeddings.dtype)
        symmetric = candidates is embeddings
        matrix = pairwise_distance(embeddings, None if symmetric else candidates, metric, backend=backend).to(acc)
        d_ap = matrix[anchor_idx, positive_idx]
        d_an = matrix[anchor_idx, negative_idx]
    return _hinge(d_ap - d_an + margin, smooth)


def _triplet_margin_loss_impl(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    self_offset: int,
    *,
    margin: float,
    metric: str,
    mining: str,
    reduction: str,
    smooth: bool,
    backend: str,
) -> torch.Tensor:
    """The loss once inputs are checked; ``self_offset`` as in :func:`torchfg.ops.triplet.mine_hardest`."""
    if mining == "batch_hard":
        losses, valid = _hardest_triplet_losses(
            embeddings,
            labels,
            candidates,
            candidate_labels,
            self_offset,
            metric=metric,
            base_margin=margin,
            margin_scale=0.0,
            text_embeddings=None,
            candidate_text=None,
            text_positive_threshold=None,
            smooth=smooth,
            backend=backend,
        )
        return _reduce(losses, valid, reduction)
    if mining == "semi_hard":
        triplets = mine_semi_hard(embeddings, candidates, labels, candidate_labels, metric=metric, self_offset=self_offset)
    else:
        triplets = mine_all_triplets(labels, candidate_labels, self_offset=self_offset)
    losses = _listed_triplet_losses(
        embeddings, candidates, triplets, metric=metric, margin=margin, smooth=smooth, exact=mining == "semi_hard",
        backend=backend,
    )
    return _reduce(losses, None, reduction)


def triplet_margin_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    mining: str = "batch_hard",
    reduction: str = "mean",
    smooth: bool = False,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Triplet margin loss ``max(0, d(a, p) - d(a, n) + margin)`` with online mining.

    Mining strategies:

    * ``"batch_hard"``: one triplet per anchor, its farthest positive and closest negative
      (fused Triton kernel on CUDA, chunked reference elsewhere; memory O(N D)).
    * ``"semi_hard"``: FaceNet; one triplet per anchor-positive pair with the closest negative
      strictly farther than the positive, else the farthest negative (chunked reference on every
      device; distances of the selected pairs exact).
    * ``"all"``: every valid triplet (chunked reference mining on every device). Since every pair
      carries gradient, the distances come from the differentiable GEMM-path matrix
      (:func:`torchfg.pairwise_distance`): O(N M) memory, plus O(T) for the T triplets.

    An anchor without a positive or without a negative contributes nothing. A batch without any
    valid triplet gives 0 with a zero gradient.

    Args:
        embeddings: (N, D) float anchors (and candidates unless ``ref_embeddings`` is given).
        labels: (N,) integer labels.
        margin: margin >= 0.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` (1 - cos) or ``"dot"`` (-a.b).
        mining: ``"batch_hard"``, ``"semi_hard"`` or ``"all"``.
        reduction: ``"mean"`` (over valid triplets), ``"sum"``, ``"none"`` ((N,) per anchor for
            batch_hard, 0 for anchors without a triplet; (T,) per triplet otherwise, in the order
            of :func:`mine_triplets`) or ``"mean_nonzero"`` (mean over triplets with positive loss,
            0 if none).
        smooth: use ``softplus`` instead of the hinge.
        ref_embeddings: (M, D) positives/negatives come from here instead (e.g. a cross-batch
            memory); the anchors are then not among the candidates.
        ref_labels: (M,) labels of ``ref_embeddings``.
        backend: mining backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Scalar loss (or per-anchor / per-triplet losses for ``reduction="none"``) in fp32 (fp64 for
        fp64 embeddings).

    Example:
        >>> emb = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.5, 0.0], [3.0, 0.0]], requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> loss = triplet_margin_loss(emb, labels, margin=0.2)
        >>> loss.backward()
        >>> round(loss.item(), 4)
        0.7455
    """
    embeddings, labels, candidates, candidate_labels, self_offset = _check_embeddings(
        embeddings, labels, ref_embeddings, ref_labels
    )
    margin = _check_number(margin, "margin", low=0.0)
    check_choice(metric, "metric", METRICS)
    check_choice(mining, "mining", MINING_STRATEGIES)
    check_choice(reduction, "reduction", REDUCTIONS)
    smooth = _check_flag(smooth, "smooth")
    return _triplet_margin_loss_impl(
        embeddings,
        labels,
        candidates,
        candidate_labels,
        self_offset,
        margin=margin,
        metric=metric,
        mining=mining,
        reduction=reduction,
        smooth=smooth,
        backend=backend,
    )


def _adaptive_triplet_loss_impl(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    candidate_text: torch.Tensor,
    self_offset: int,
    *,
    base_margin: float,
    margin_scale: float,
    metric: str,
    text_positive_threshold: float | None,
    reduction: str,
    backend: str,
) -> torch.Tensor:
    losses, valid = _hardest_triplet_losses(
        embeddings,
        labels,
        candidates,
        candidate_labels,
        self_offset,
        metric=metric,
        base_margin=base_margin,
        margin_scale=margin_scale,
        text_embeddings=text_embeddings,
        candidate_text=candidate_text,
        text_positive_threshold=text_positive_threshold,
        smooth=False,
        backend=backend,
    )
    return _reduce(losses, valid, reduction)


def adaptive_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    base_margin: float = 0.1,
    margin_scale: float = 0.5,
    metric: str = "euclidean",
    text_positive_threshold: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Adaptive triplet loss (ATL): batch-hard triplets whose margin grows with the text distance.

    With ``d_text(a, n) = (1 - cos(t_a, t_n)) / 2`` in [0, 1] and
    ``m(a, n) = base_margin + margin_scale * d_text(a, n)``, each anchor contributes
    ``max(0, d(a, p*) - d(a, n*) + m(a, n*))`` where p* is its farthest positive and n* the
    margin-aware hardest negative ``argmax_n m(a, n) - d(a, n)``. ``margin_scale=0`` is exactly
    batch-hard triplet loss with margin ``base_margin``. Mining is fused on CUDA (Triton) and
    chunked elsewhere; the backward is O(N D).

    Args:
        embeddings: (N, D) float embeddings.
        labels: (N,) integer labels (e.g. product ids).
        text_embeddings: (N, T) float text embeddings of the descriptions (the weak labels). They
            are treated as constants: no gradient flows into them.
        base_margin: m0 >= 0.
        margin_scale: s >= 0.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        text_positive_threshold: items with another label whose description cosine is at least
            this (in [-1, 1]) are near-duplicates and never negatives; None turns it off.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` ((N,) per anchor) or ``"mean_nonzero"``.
        backend: mining backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Scalar loss ((N,) for ``"none"``) in fp32 (fp64 for fp64 embeddings).

    Example:
        >>> emb = torch.randn(8, 16, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> text = torch.randn(8, 32)
        >>> loss = adaptive_triplet_loss(emb, labels, text, base_margin=0.1, margin_scale=0.5)
        >>> loss.backward()
        >>> bool(torch.isfinite(emb.grad).all())
        True
    """
    embeddings, labels, candidates, candidate_labels, self_offset = _check_embeddings(embeddings, labels, None, None)
    text_embeddings = _check_text(text_embeddings, embeddings.shape[0], embeddings.device)
    base_margin = _check_number(base_margin, "base_margin", low=0.0)
    margin_scale = _check_number(margin_scale, "margin_scale", low=0.0)
    if text_positive_threshold is not None:
        text_positive_threshold = _check_number(text_positive_threshold, "text_positive_threshold", low=-1.0, high=1.0)
    check_choice(metric, "metric", METRICS)
    check_choice(reduction, "reduction", REDUCTIONS)
    return _adaptive_triplet_loss_impl(
        embeddings,
        labels,
        text_embeddings,
        candidates,
        candidate_labels,
        text_embeddings,
        self_offset,
        base_margin=base_margin,
        margin_scale=margin_scale,
        metric=metric,
        text_positive_threshold=text_positive_threshold,
        reduction=reduction,
        backend=backend,
    )


def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: str = "batch_hard",
    metric: str = "euclidean",
    margin: float = 0.2,
    text_embeddings: torch.Tensor | None = None,
    base_margin: float | None = None,
    margin_scale: float | None = None,
    text_positive_threshold: float | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mine triplets and return them as index tensors (an ``indices_tuple`` for PML losses).

    Strategies are those of :func:`triplet_margin_loss`. With ``text_embeddings`` (batch_hard
    only) the negative is ATL's margin-aware hardest negative with margins
    ``base_margin + margin_scale * (1 - cos(t_a, t_n)) / 2``; ``base_margin`` defaults to
    ``margin`` and ``margin_scale`` to 0.5. Without text, ``margin`` does not change which
    triplets are selected (batch-hard picks the closest negative, semi-hard as in FaceNet).

    Args:
        embeddings: (N, D) float; labels: (N,) int.
        strategy: ``"batch_hard"``, ``"semi_hard"`` or ``"all"``.
        metric: distance used for mining.
        margin: base margin when ``text_embeddings`` is given and ``base_margin`` is not.
        text_embeddings: (N, T) float, or None.
        base_margin, margin_scale, text_positive_threshold: see :func:`adaptive_triplet_loss`.
        ref_embeddings, ref_labels: (M, D) and (M,) candidate set; positives and negatives then
            index it, anchors index ``embeddings``.
        backend: mining backend for batch_hard.

    Returns:
        (anchors, positives, negatives): int64 tensors of equal length T, only valid triplets,
        sorted by anchor. No gradient.

    Example:
        >>> emb = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
        >>> mine_triplets(emb, torch.tensor([0, 0, 1, 1]))
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 2, 1, 1]))
    """
    embeddings, labels, candidates, candidate_labels, self_offset = _check_embeddings(
        embeddings, labels, ref_embeddings, ref_labels
    )
    check_choice(strategy, "strategy", MINING_STRATEGIES)
    check_choice(metric, "metric", METRICS)
    margin = _check_number(margin, "margin", low=0.0)
    candidate_text = None
    if text_embeddings is not None:
        if strategy != "batch_hard":
            raise ValueError(f"text_embeddings (margin-aware mining) needs strategy='batch_hard', got {strategy!r}")
        if ref_embeddings is not None:
            raise ValueError("text_embeddings cannot be combined with ref_embeddings (the reference set has no text)")
        text_embeddings = candidate_text = _check_text(text_embeddings, embeddings.shape[0], embeddings.device)
        base_margin = margin if base_margin is None else _check_number(base_margin, "base_margin", low=0.0)
        margin_scale = DEFAULT_MARGIN_SCALE if margin_scale is None else _check_number(margin_scale, "margin_scale", low=0.0)
        if text_positive_threshold is not None:
            text_positive_threshold = _check_number(
                text_positive_threshold, "text_positive_threshold", low=-1.0, high=1.0
            )
    else:
        for value, name in ((base_margin, "base_margin"), (margin_scale, "margin_scale"), (text_positive_threshold, "text_positive_threshold")):
            if value is not None:
                raise ValueError(f"{name} needs text_embeddings")
        base_margin, margin_scale = margin, 0.0
    with torch.no_grad():
        if strategy == "semi_hard":
            return mine_semi_hard(embeddings, candidates, labels, candidate_labels, metric=metric, self_offset=self_offset)
        if strategy == "all":
            return mine_all_triplets(labels, candidate_labels, self_offset=self_offset)
        if embeddings.shape[0] == 0 or candidates.shape[0] == 0:
            return tuple(torch.empty(0, dtype=torch.int64, device=embeddings.device) for _ in range(3))
        positive_idx, negative_idx = mine_hardest(
            embeddings,
            candidates,
            labels,
            candidate_labels,
            text_embeddings,
            candidate_text,
            metric=metric,
            base_margin=base_margin,
            margin_scale=margin_scale,
            text_positive_threshold=text_positive_threshold,
            self_offset=self_offset,
            backend=backend,
        )
        anchors = ((positive_idx >= 0) & (negative_idx >= 0)).nonzero().squeeze(1)
        return anchors, positive_idx[anchors], negative_idx[anchors]
