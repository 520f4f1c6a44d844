"""Triplet margin loss, adaptive triplet loss (weak-label margins) and triplet mining.

Mining (:mod:`torchfg.ops.triplet`) only selects indices, on the fast GEMM path. The loss of the
selected pairs is then recomputed exactly from ``a - b`` on the gathered rows
(:func:`torchfg.ops.pair_distances.anchor_pair_distances` / ``pair_distances``, whose analytic backward
is chunked), so for
``batch_hard`` and the adaptive loss the backward touches 2N pairs: O(N D) time and memory, never
an N x N matrix. The euclidean gradient at zero distance (duplicate embeddings) is 0, never NaN.
On the Triton backend (and without ``swap``) those two run as the single fused op
:func:`torchfg.ops.hardest_triplet_loss.hardest_triplet_loss`: the same loss and gradient in
five or six kernel launches per step, autograd's seed included. With ``cross_rank`` the same op
mines this rank's anchors, as their rows of the gathered batch (one tensor: the same launches as
in one process), against that batch, then the loss is reduced over ranks.

Anchors always come from ``embeddings``; positives and negatives come from a candidate set, which
is ``embeddings`` itself (anchor i is then candidate i and never its own positive) or a separate
reference set (``ref_embeddings`` / ``ref_labels``, e.g. a cross-batch memory).

With ``cross_rank=True`` (torch.distributed) the candidates are the embeddings of all ranks,
gathered with gradients (:func:`torchfg.distributed.gather_batch`); anchor i of this rank is
candidate ``offset + i``. Scaling: the returned value on each rank is ``world_size x`` this rank's
share of the loss over the concatenated batch, so the mean of the returned values over ranks equals
the single-process loss and, after DDP's gradient averaging (a division by world size), the
parameter gradient equals the single-process gradient exactly. The gradient with respect to this
rank's embeddings is ``world_size x`` the single-process gradient of those rows. With
``reduction="none"`` the value is this rank's per-anchor (or per-triplet) losses, unscaled, and so
is their gradient.
"""

from __future__ import annotations

from typing import Callable, Mapping, TypedDict, TypeVar, cast

import torch
import torch.nn.functional as F

from torchfg._validation import (
    accumulation_dtype,
    check_choice,
    check_float_tensor,
    check_int,
    check_labels,
    check_row_sets,
    check_tensor,
    mining_labels,
)
from torchfg.backends import BACKENDS, check_backend, resolve_backend
from torchfg.distributed import (
    GatheredBatch,
    all_reduce_sum,
    gather_batch,
    is_distributed,
    raise_on_all_ranks,
    rank,
    world_size,
)
from torchfg.errors import BackendUnavailableError
from torchfg.functional._triplet_selection import (
    MarginInterval,
    connected_zero,
    exact_triplet_distances,
    sample_triplets,
    select_triplets,
    violating,
)
from torchfg.ops.hardest_triplet_loss import hardest_triplet_loss_with_count, rows_of_candidates
from torchfg.ops.hardest_triplet_loss.reference import text_cosine, unpaired_anchor_losses
from torchfg.ops.pair_distances import anchor_pair_distances, pair_distances
from torchfg.ops.metric import DEFAULT_METRIC, METRICS
from torchfg.ops.triplet import mine_all_triplets, mine_hardest, mine_semi_hard
from torchfg.ops.triplet.reference import DivergedRows, _empty_triplets, _SameLabelPairs, text_similarity_operands
from torchfg._validation import check_number as _check_number  # shared numeric argument check
from torchfg._validation import check_bool as _check_flag
from torchfg.ops.precision import autocast_off

__all__ = [
    "triplet_margin_loss", "adaptive_triplet_loss", "mine_triplets", "mine_triplets_and_candidates", "REDUCTIONS",
    "MINING_STRATEGIES",
]

REDUCTIONS = ("mean", "sum", "none", "mean_nonzero")
MINING_STRATEGIES = ("batch_hard", "semi_hard", "all")

# Default margin scale of the adaptive loss, also used by mine_triplets when text is given.
DEFAULT_MARGIN_SCALE = 0.5


# ----------------------------------------------------------------------------- exact pair distances


# ----------------------------------------------------------------------------- validation


def _check_embeddings(
    embeddings: object,
    labels: object,
    ref_embeddings: object,
    ref_labels: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    """Returns (embeddings, labels, candidates, candidate_labels, anchor_offset).

    ``anchor_offset``: the candidate row of anchor 0 when the anchors are among the candidates
    (anchor i is candidate ``(anchor_offset + i) % M`` and never its own positive), None when they are not.
    """
    embeddings_arg, labels_arg = embeddings, labels
    embeddings = check_float_tensor(embeddings, "embeddings", ndim=2)
    if embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must have a non-empty feature dim, got shape {tuple(embeddings.shape)}")
    labels = mining_labels(check_labels(labels, "labels", embeddings.shape[0], device=embeddings.device))
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together (or both None)")
    if ref_embeddings is None:
        return embeddings, labels, embeddings, labels, 0
    # The batch passed again as its own reference set (the same objects): as pytorch-metric-learning
    # does (it tests ``ref_labels is labels``), the anchors are among the candidates, so a row is
    # never its own positive.
    same_objects = ref_embeddings is embeddings_arg and ref_labels is labels_arg
    ref_embeddings = check_float_tensor(ref_embeddings, "ref_embeddings", ndim=2)
    check_row_sets(embeddings, "embeddings", ref_embeddings, "ref_embeddings")
    ref_labels = mining_labels(check_labels(ref_labels, "ref_labels", ref_embeddings.shape[0], device=embeddings.device))
    if same_objects:
        return embeddings, labels, embeddings, labels, 0
    return embeddings, labels, ref_embeddings, ref_labels, None


def _check_text(text_embeddings: object, n: int, device: torch.device) -> torch.Tensor:
    text_embeddings = check_float_tensor(text_embeddings, "text_embeddings", ndim=2)
    if text_embeddings.shape[0] != n:
        raise ValueError(f"text_embeddings must have {n} rows (one per embedding), got {text_embeddings.shape[0]}")
    if text_embeddings.device != device:
        raise ValueError(f"text_embeddings must be on the device of embeddings ({device}), got {text_embeddings.device}")
    # Weak labels are targets, not parameters: no gradient flows into the text encoder.
    return text_embeddings.detach()


_Result = TypeVar("_Result")


def _attempt(validate: Callable[[], _Result]) -> tuple[_Result | None, Exception | None]:
    """(validate()'s result, None), or (None, the exception it raised): a rank whose checks failed
    must still join the exchange that tells the other ranks."""
    try:
        return validate(), None
    except Exception as exc:  # also BackendUnavailableError (a RuntimeError): any local refusal
        return None, exc


def _validated(validate, cross_rank: bool, call: Mapping[str, object] | None = None):
    """Run ``validate()``; with cross_rank, an error on any rank raises on every rank (no hang),
    and so do ranks whose ``call`` settings differ (they would run different collectives next)."""
    if not cross_rank:
        return validate()
    result, error = _attempt(validate)
    raise_on_all_ranks(error, call=call)
    return result


def _validated_gather(
    validate: Callable[[], _Result],
    call: Mapping[str, object],
    rows: Callable[[_Result], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    *,
    with_grad: bool,
) -> tuple[_Result, GatheredBatch]:
    """With cross_rank: ``validate()`` here, then all ranks' batches gathered, in one exchange.

    ``rows(validate())`` gives this rank's (embeddings, labels, text embeddings or None) to gather
    (the embeddings with gradients if ``with_grad``). Each rank's outcome and ``call`` travel in
    the gather's shape collective (what :func:`_validated` exchanges on its own), so an error or a
    different call on any rank raises on every rank, with one host synchronisation per step
    instead of two.
    """
    result, error = _attempt(validate)
    # A rank whose checks failed still takes part, with no tensors: every rank raises before the gather.
    tensors = (None, None, None) if error is not None else rows(cast(_Result, result))
    batch = gather_batch(
        list(tensors),
        ["embeddings", "labels", "text_embeddings"],
        with_grad=[with_grad, False, False],
        error=error,
        call=call,
    )
    # gather_batch raised on every rank if any rank's validate() did.
    return cast(_Result, result), batch


def _validated_candidates(
    validate: Callable[[], _Result],
    call: Mapping[str, object],
    rows: Callable[[_Result], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
) -> tuple[_Result, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int | None]]:
    """:func:`_validated_gather` of the mining candidates: (validate()'s result, (candidates,
    candidate_labels, candidate_text, anchor_offset)).

    ``anchor_offset`` is None for a rank without rows (no self rows to exclude: the last such
    rank's offset would be the gathered batch's end, which the mining ops refuse, and the other
    ranks would then wait in a collective).
    """
    result, batch = _validated_gather(validate, call, rows, with_grad=True)
    candidates, candidate_labels, candidate_text = batch.tensors
    offset = batch.offset if batch.sizes[rank()] else None
    # Only text_embeddings may be None: the embeddings and labels gather to tensors.
    return result, (cast(torch.Tensor, candidates), cast(torch.Tensor, candidate_labels), candidate_text, offset)


def _as_gathered_rows(local: torch.Tensor, gathered: torch.Tensor | None, anchor_offset: int | None) -> torch.Tensor:
    """This rank's (N, ...) rows as their rows of the gathered batch (the same values, a view of it),
    or ``local`` itself on a rank without rows (``anchor_offset`` None) or with nothing gathered.

    The fused loss op then takes one tensor: the row statistics once (the text's in the same
    launch), and one backward launch writing the gathered rows' gradient, anchor and partner terms
    together, which reaches the embeddings through the gather's backward (instead of an anchor
    gradient and a batch gradient that autograd sums). The mining shares the batch's statistics too.
    """
    if anchor_offset is None or gathered is None:
        return local
    return gathered.narrow(0, anchor_offset, local.shape[0])


def _keep_gather_in_graph(loss: torch.Tensor, candidates: torch.Tensor, cross_rank: bool) -> torch.Tensor:
    # The gather's backward is a collective: every rank must reach it, even one whose anchors
    # found no triplet (or that has no anchors), or the other ranks would wait forever.
    # The sum accumulates in fp32 at least: fp16 candidates summed to inf past 65504 (ReLU features,
    # 64 x 2048 per rank), and inf * 0 made every rank's loss NaN. A NaN or inf row still gives NaN,
    # as it does to the single-process loss.
    if cross_rank and is_distributed() and candidates.requires_grad:
        acc = torch.float64 if candidates.dtype == torch.float64 else torch.float32
        total = candidates.sum(dtype=acc)
        if loss.dim():
            # Per-anchor losses ("none"): a NaN or inf row on some rank must not turn every
            # anchor's loss NaN (only those it reaches, as in a single process).
            total = torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0)
        return loss + total.to(loss.dtype) * 0.0
    return loss


# ----------------------------------------------------------------------------- losses


def _reduce(
    losses: torch.Tensor,
    counted: torch.Tensor | None,
    reduction: str,
    cross_rank: bool = False,
    count: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """losses: (K,) with zeros where ``counted`` is False (None: all counted); ``count``: the
    divisor of ``"mean"`` when it is not K (``"all"`` mining lists only the violating triplets;
    a fused loss's sum, K = 1, comes with its count as a 0-d tensor).

    With ``cross_rank`` the count is summed over ranks and the result scaled by the world size
    (see the module docstring), so that DDP's averaging gives the single-process gradient.
    """
    if reduction == "none":
        return losses
    total = losses.sum() * (world_size() if cross_rank else 1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        if count is not None:
            divisor = torch.as_tensor(count, device=losses.device)
        else:
            divisor = losses.new_tensor(losses.shape[0]) if counted is None else counted.sum()
    else:  # mean_nonzero
        nonzero = losses > 0
        divisor = (nonzero if counted is None else nonzero & counted).sum()
    if cross_rank:
        divisor = all_reduce_sum(divisor)
    # An empty selection gives 0 with a zero gradient (0 / 1), never 0 / 0.
    return total / divisor.clamp_min(1).to(total.dtype)


def _hinge(violation: torch.Tensor, smooth: bool) -> torch.Tensor:
    return F.softplus(violation) if smooth else F.relu(violation)


class _SelfRows(TypedDict):
    exclude_self: bool
    anchor_offset: int


class _HardestSettings(TypedDict):
    metric: str
    base_margin: float
    margin_scale: float
    text_positive_threshold: float | None
    smooth: bool


def _self_rows(anchor_offset: int | None) -> _SelfRows:
    """The mining ops' ``exclude_self`` / ``anchor_offset`` for an offset (None: anchors not candidates)."""
    return {"exclude_self": anchor_offset is not None, "anchor_offset": anchor_offset or 0}


def _hardest_pairs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    metric: str,
    backend: str,
    text_embeddings: torch.Tensor | None = None,
    candidate_text: torch.Tensor | None = None,
    base_margin: float = 0.0,
    margin_scale: float = 0.0,
    text_positive_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard mining, the one call of :func:`torchfg.ops.triplet.mine_hardest`.

    Returns (positive_idx (N,), negative_idx (N,)) into candidates, -1 where an anchor has none.
    """
    return mine_hardest(
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
        **_self_rows(anchor_offset),
        backend=backend,
    )


def _listed_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    strategy: str,
    metric: str,
    backend: str,
    triplets_per_anchor: int | str = "all",
    **hardest,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one mining path: (anchors, positives, negatives) of ``strategy``, no gradient.

    batch_hard keeps the anchors that have a triplet; ``"all"`` lists every valid triplet by labels
    alone (or ``triplets_per_anchor`` random ones per anchor, as PML samples them).
    """
    with torch.no_grad():
        if strategy == "semi_hard":
            return mine_semi_hard(embeddings, candidates, labels, candidate_labels, metric=metric, **_self_rows(anchor_offset))
        if strategy == "all":
            # Listed by labels; a non-finite candidate row is absent for the finite anchors, as
            # in the loss's own selection.
            diverged = DivergedRows.of(embeddings, candidates)
            if triplets_per_anchor != "all":
                # Validated by _check_triplets_per_anchor: "all" or an int.
                per_anchor = cast(int, triplets_per_anchor)
                return sample_triplets(labels, candidate_labels, anchor_offset, per_anchor, diverged=diverged)
            triplets = mine_all_triplets(labels, candidate_labels, **_self_rows(anchor_offset))
            if diverged is None:
                return triplets
            keep = diverged.keep(*triplets).nonzero().squeeze(1)
            kept_anchors, kept_positives, kept_negatives = (t.index_select(0, keep) for t in triplets)
            return kept_anchors, kept_positives, kept_negatives
        if embeddings.shape[0] == 0 or candidates.shape[0] == 0:
            return _empty_triplets(embeddings.device)
        positive_idx, negative_idx = _hardest_pairs(
            embeddings, labels, candidates, candidate_labels, anchor_offset, metric=metric, backend=backend, **hardest
        )
        positive_idx, negative_idx = _keep_non_finite_anchors(
            embeddings, labels, candidate_labels, anchor_offset, positive_idx, negative_idx,
            hardest.get("text_embeddings"), hardest.get("candidate_text"),
            margin_scale=hardest.get("margin_scale", 0.0),
            text_positive_threshold=hardest.get("text_positive_threshold"),
        )
        anchors = ((positive_idx >= 0) & (negative_idx >= 0)).nonzero().squeeze(1)
        return anchors, positive_idx[anchors], negative_idx[anchors]


def _keep_non_finite_anchors(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    positive_idx: torch.Tensor,
    negative_idx: torch.Tensor,
    text_embeddings: torch.Tensor | None = None,
    candidate_text: torch.Tensor | None = None,
    *,
    margin_scale: float = 0.0,
    text_positive_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard pairs in which every anchor whose row (or text row) holds NaN or inf has a
    triplet when its labels allow one: its first positive and first negative by candidate index
    (its own row excluded).

    Its distances are NaN, so mining picked nothing for it, and a miner that left it out made a
    loss over the mined triplets finite where the loss's own mining is NaN: a diverged model (all
    rows NaN) then trained on a loss of 0. A row is non-finite by the fused loss's rule
    (:func:`unpaired_anchor_losses`; the text counts where it sets the margins). Where
    ``text_positive_threshold`` takes near-duplicate descriptions out of the negatives, the first
    negative is the first other-label candidate whose text cosine is below it, by mining's own
    rule (a NaN text cosine excludes nothing). When every row is finite (the usual case) this
    costs one O(N D) pass and one host sync, next to the caller's own ``nonzero``; the label (and
    text) search runs only for the non-finite rows. (positive_idx, negative_idx): (N,) into the
    candidates, -1 where none.
    """
    if embeddings.shape[0] == 0 or candidate_labels.shape[0] == 0:
        return positive_idx, negative_idx
    margin_text = text_embeddings if margin_scale else None
    diverged = unpaired_anchor_losses(embeddings, margin_text, accumulation_dtype(embeddings.dtype)).isnan()
    bad_rows = diverged.nonzero().squeeze(1)
    if bad_rows.numel() == 0:
        return positive_idx, negative_idx
    num_candidates = candidate_labels.shape[0]
    # Each label's candidates are a run of the stably sorted labels, in index order.
    sorted_labels, order = torch.sort(candidate_labels, stable=True)
    anchor_labels = labels[bad_rows]
    lo = torch.searchsorted(sorted_labels, anchor_labels)
    hi = torch.searchsorted(sorted_labels, anchor_labels, right=True)
    last = num_candidates - 1
    first, second = order[lo.clamp(max=last)], order[(lo + 1).clamp(max=last)]
    own = (bad_rows + anchor_offset) % num_candidates if anchor_offset is not None else torch.full_like(bad_rows, -1)
    positive = torch.where(first != own, first, second)
    has_positive = (hi - lo) > (own >= 0).long()
    if text_positive_threshold is not None and text_embeddings is not None and candidate_text is not None:
        negative, has_negative = _first_text_negatives(
            text_embeddings[bad_rows], candidate_text, anchor_labels, candidate_labels, text_positive_threshold
        )
    else:
        # The first negative: candidate 0, unless it shares the anchor's label; then the first
        # candidate whose label differs from candidate 0's.
        differs = candidate_labels != candidate_labels[0]
        zero_is_negative = anchor_labels != candidate_labels[0]
        negative = torch.where(zero_is_negative, 0, differs.int().argmax())
        has_negative = zero_is_negative | differs.any()
    keep = has_positive & has_negative
    positive_idx = positive_idx.index_put((bad_rows,), torch.where(keep, positive, positive_idx[bad_rows]))
    negative_idx = negative_idx.index_put((bad_rows,), torch.where(keep, negative, negative_idx[bad_rows]))
    return positive_idx, negative_idx


def _first_text_negatives(
    anchor_text: torch.Tensor,
    candidate_text: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor (B of them), the first candidate (M) that mining may take as a negative under a
    text threshold: another label and a text cosine below ``threshold`` (the reference's
    ``>= threshold`` exclusion). (first index (B,), whether there is one (B,)); blocks of rows
    hold 4M entries (the fp32 cosine block, its masks and argmax's int copy: about 40 MiB)."""
    anchor_unit, candidate_unit = text_similarity_operands(anchor_text, candidate_text)
    first = torch.zeros(anchor_text.shape[0], dtype=torch.int64, device=anchor_text.device)
    found = torch.zeros(anchor_text.shape[0], dtype=torch.bool, device=anchor_text.device)
    rows_per_block = max(1, (1 << 22) // max(1, candidate_text.shape[0]))
    for start in range(0, anchor_text.shape[0], rows_per_block):
        stop = start + rows_per_block
        allowed = anchor_labels[start:stop, None] != candidate_labels[None, :]
        allowed &= ~(anchor_unit[start:stop] @ candidate_unit.T >= threshold)
        first[start:stop] = allowed.int().argmax(1)
        found[start:stop] = allowed.any(1)
    return first, found


def _check_mining_backend(strategy: str, backend: object) -> None:
    """semi_hard and all mining run their chunked reference on every device: an explicit request
    for a kernel must fail, not be dropped (``auto`` and the TORCHFG_BACKEND switch fall back)."""
    backend = check_choice(backend, "backend", BACKENDS)
    if strategy in ("semi_hard", "all") and backend not in ("auto", "torch"):
        raise BackendUnavailableError(
            f"backend={backend!r} is not implemented for mining={strategy!r}: it runs the chunked torch "
            "reference on every device; pass backend='auto' or 'torch'"
        )
    check_backend(backend, "mine_hardest")


def _hardest_triplet_losses(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    metric: str,
    base_margin: float,
    margin_scale: float,
    text_embeddings: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    text_positive_threshold: float | None,
    smooth: bool,
    backend: str,
    swap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor batch-hard / adaptive losses (N,) (0 where invalid, NaN for an invalid anchor whose
    row diverged) and the validity mask (N,).

    ``candidates`` (M, D) with ``candidate_labels`` (M,); anchor i is candidate ``(anchor_offset + i) % M``
    (None: anchors are not among the candidates).
    """
    acc = accumulation_dtype(embeddings.dtype)
    n = embeddings.shape[0]
    if n == 0 or candidates.shape[0] == 0:
        # Keeps the graph connected so backward() gives zero gradients instead of failing.
        zeros = connected_zero(embeddings, candidates).expand(n).contiguous()
        return zeros, torch.zeros(n, dtype=torch.bool, device=embeddings.device)
    positive_idx, negative_idx = _hardest_pairs(
        embeddings, labels, candidates, candidate_labels, anchor_offset, metric=metric, backend=backend,
        text_embeddings=text_embeddings, candidate_text=candidate_text, base_margin=base_margin,
        margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
    )
    valid = (positive_idx >= 0) & (negative_idx >= 0)
    # Invalid anchors gather row 0 and are masked out below: shapes stay static (compile-friendly).
    positive_idx, negative_idx = positive_idx.clamp_min(0), negative_idx.clamp_min(0)
    other = None if candidates is embeddings else candidates
    # Same backend as the mining (the fused Triton kernels on CUDA); the miner's indices are in
    # range by construction, so the op's range check (a reduction and a host sync) is skipped.
    d = anchor_pair_distances(
        embeddings, torch.stack([positive_idx, negative_idx], 1), other, metric=metric, backend=backend,
        check_indices=False,
    )
    d_ap, d_an = d[:, 0], d[:, 1]
    if swap:
        d_an = torch.minimum(d_an, pair_distances(candidates, positive_idx, negative_idx, metric=metric))
    margin: torch.Tensor | float = base_margin
    if text_embeddings is not None and margin_scale != 0.0:
        # candidate_text comes with text_embeddings (the same rows, or their gather).
        text_cos = text_cosine(text_embeddings, cast(torch.Tensor, candidate_text).index_select(0, negative_idx))
        margin = (base_margin + margin_scale * (1.0 - text_cos) * 0.5).to(d_ap.dtype)
    losses = _hinge(d_ap - d_an + margin, smooth)
    # An anchor without a pair still shows its divergence (NaN or inf in its row), like the fused kernel.
    text = text_embeddings if margin_scale != 0.0 else None
    return torch.where(valid, losses, unpaired_anchor_losses(embeddings, text, losses.dtype)), valid


# The fused op's reduction for a reduction over ranks: the sum (with its count) or the per-anchor losses.
_CROSS_RANK_OP_REDUCTION = {"mean": "sum", "mean_nonzero": "none"}


def _batch_hard_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    metric: str,
    base_margin: float,
    margin_scale: float,
    text_embeddings: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    text_positive_threshold: float | None,
    smooth: bool,
    swap: bool,
    reduction: str,
    cross_rank: bool,
    backend: str,
) -> torch.Tensor:
    """The reduced batch-hard / ATL loss. On the Triton backend (without ``swap``) the one fused op
    :func:`torchfg.ops.hardest_triplet_loss.hardest_triplet_loss`; elsewhere the per-anchor losses
    of :func:`_hardest_triplet_losses`, reduced."""
    hardest: _HardestSettings = {"metric": metric, "base_margin": base_margin, "margin_scale": margin_scale,
                                 "text_positive_threshold": text_positive_threshold, "smooth": smooth}
    if not swap and resolve_backend("hardest_triplet_loss", embeddings.device, embeddings.dtype, backend) == "triton":
        # Across ranks the op reduces this rank's anchors, and the means divide by the count over
        # all ranks: the op's sum and count ("mean"), or its per-anchor losses ("mean_nonzero").
        # Embeddings that are the candidates' rows from anchor_offset (a cross_rank batch's own rows,
        # :func:`_as_gathered_rows`; never a memory's or a reference set's) go in as one tensor with
        # them. Asked of the op only where the check passes: after the gather, a refusal on one
        # rank would leave the others waiting in the reduction.
        anchors_in_candidates = (anchor_offset is not None and embeddings is not candidates
                                 and rows_of_candidates(embeddings, candidates, anchor_offset) is None)
        loss, count = hardest_triplet_loss_with_count(
            embeddings, candidates, labels, candidate_labels, text_embeddings, candidate_text,
            **_self_rows(anchor_offset), backend="triton", **hardest,
            reduction=_CROSS_RANK_OP_REDUCTION.get(reduction, reduction) if cross_rank else reduction,
            anchors_in_candidates=anchors_in_candidates,
        )
        if not cross_rank:
            return loss
        loss = _reduce(loss.reshape(-1), None, reduction, cross_rank, count=count.reshape(()) if reduction == "mean" else None)
        # The op's backward already reaches the gather's (the gathered rows are its input); this
        # keeps a NaN or inf row of any rank in every rank's reduced loss, as on the other paths.
        return _keep_gather_in_graph(loss, candidates, cross_rank)
    losses, valid = _hardest_triplet_losses(
        embeddings, labels, candidates, candidate_labels, anchor_offset, text_embeddings=text_embeddings,
        candidate_text=candidate_text, swap=swap, backend=backend, **hardest,
    )
    return _keep_gather_in_graph(_reduce(losses, valid, reduction, cross_rank), candidates, cross_rank)


def _listed_losses(
    embeddings: torch.Tensor,
    candidates: torch.Tensor,
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    metric: str,
    margin: float | torch.Tensor,
    smooth: bool,
    swap: bool,
) -> torch.Tensor:
    """Losses (T,) of explicit triplets (anchor into embeddings, positive/negative into candidates),
    from distances recomputed exactly from ``a - b``."""
    anchor_idx, positive_idx, negative_idx = triplets
    if anchor_idx.numel() == 0:
        return connected_zero(embeddings, candidates).expand(0)
    d_ap, d_an = exact_triplet_distances(embeddings, candidates, anchor_idx, positive_idx, negative_idx, metric, swap)
    return _hinge(d_ap - d_an + margin, smooth)


def _all_triplet_losses(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    metric: str,
    margin: float,
    smooth: bool,
    swap: bool,
    reduction: str,
    cross_rank: bool,
) -> torch.Tensor:
    """Every valid triplet, exactly: only the violating ones (all with ``smooth``) carry a loss.

    The violating triplets are selected on the fast path with an error band, recomputed exactly
    from ``a - b`` and re-tested (:mod:`torchfg.functional._triplet_selection`), so a triplet whose
    exact violation is 0 is neither counted nor given a gradient, and memory stays O(chunk x M + S).
    """
    interval = MarginInterval() if smooth else violating(margin)
    selected = select_triplets(
        embeddings, labels, candidates, candidate_labels, anchor_offset, metric=metric, interval=interval, swap=swap,
        with_position=reduction == "none",
    )
    losses = _hinge(selected.d_ap - selected.d_an + margin, smooth)
    if reduction == "none":
        out = losses.new_zeros(selected.total)
        return out.index_copy(0, selected.position, losses) if losses.numel() else out + losses.sum()
    if reduction == "mean":
        return _reduce(losses, None, reduction, cross_rank, count=selected.total)
    return _reduce(losses, None, reduction, cross_rank)


def _check_indices_tuple(
    indices_tuple: object, n_anchors: int, n_candidates: int, device: torch.device, *, cross_rank: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PML's ``indices_tuple`` as triplets: (a, p, n) as given, or pairs (a1, p, a2, n) converted as
    PML converts them (every positive pair with every negative pair of the same anchor).

    With ``cross_rank`` the outcome is exchanged (:func:`_validated`): the bound on positives and
    negatives is all ranks' candidates, known only after the gather, so this check runs after the
    other ones, and an error on one rank must still raise on every rank.
    """
    if cross_rank:
        return _validated(lambda: _check_indices_tuple(indices_tuple, n_anchors, n_candidates, device), True)
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        length = len(indices_tuple) if isinstance(indices_tuple, (tuple, list)) else type(indices_tuple).__name__
        raise ValueError(
            "indices_tuple must be a triplet tuple (anchors, positives, negatives) or a pair tuple "
            f"(anchors1, positives, anchors2, negatives) of index tensors, as pytorch-metric-learning's miners return, got {length}"
        )
    names = ("anchors", "positives", "negatives") if len(indices_tuple) == 3 else ("anchors1", "positives", "anchors2", "negatives")
    tensors = []
    for name, t in zip(names, indices_tuple):
        t = check_tensor(t, f"indices_tuple {name}")
        # An empty 1-D tensor of any dtype lists no triplet, as pytorch-metric-learning takes it
        # (``torch.tensor([])`` is float32: a custom miner's "none found").
        empty = t.dim() == 1 and t.numel() == 0
        if not empty and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 1):
            raise TypeError(f"indices_tuple {name} must be a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
        tensors.append(t.to(device, torch.int64))
    groups = [(0, 1, 2)] if len(tensors) == 3 else [(0, 1), (2, 3)]
    for group in groups:
        if len({tensors[i].shape[0] for i in group}) != 1:
            raise ValueError(f"indices_tuple {', '.join(names[i] for i in group)} must have equal lengths, "
                             f"got {[tensors[i].shape[0] for i in group]}")
    for name, t in zip(names, tensors):
        bound = n_anchors if name.startswith("anchors") else n_candidates
        if t.numel():
            low, high = (int(v) for v in torch.aminmax(t))
            if low < 0 or high >= bound:
                raise ValueError(f"indices_tuple {name} must be in [0, {bound}), got values in [{low}, {high}]")
    if len(tensors) == 3:
        return tensors[0], tensors[1], tensors[2]
    a1, p, a2, n = tensors
    # Every (i, j) with a1[i] == a2[j], by i then j, as PML's (|a1|, |a2|) mask lists them: the
    # same-label pairs with the anchors as labels, in memory linear in the inputs and the output
    # (with every pair of a P x K batch passed in, the mask grew as N**3: 3 GiB for 0.1 GiB of
    # triplets at N = 768).
    p_idx, n_idx = _SameLabelPairs(a1, a2).pairs
    return a1[p_idx], p[p_idx], n[n_idx]


def _check_triplets_per_anchor(value: object, strategy: str) -> int | str:
    # A part of the loss's own mining: an indices_tuple replaces both (PML ignores it then too).
    if isinstance(value, str) and value == "all":
        return value
    value = check_int(value, "triplets_per_anchor", minimum=1)
    if strategy != "all":
        raise ValueError("triplets_per_anchor (random triplets per anchor) needs mining='all'")
    return value


def _triplet_margin_loss_impl(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    margin: float,
    metric: str,
    mining: str,
    reduction: str,
    smooth: bool,
    backend: str,
    swap: bool = False,
    triplets_per_anchor: int | str = "all",
    indices_tuple: tuple[torch.Tensor, ...] | None = None,
    cross_rank: bool = False,
    extra_triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss once inputs are checked; ``anchor_offset`` as returned by :func:`_check_embeddings`.

    ``extra_triplets`` (checked triplets; semi-hard and all mining only): added to the mined ones,
    as PML concatenates a given ``indices_tuple`` with its miner's (the cross-batch memory).
    """
    if extra_triplets is not None and (indices_tuple is not None or mining == "batch_hard"):
        raise ValueError("extra_triplets go with semi_hard or all mining and no indices_tuple")
    if indices_tuple is not None:
        triplets = _check_indices_tuple(
            indices_tuple, embeddings.shape[0], candidates.shape[0], embeddings.device, cross_rank=cross_rank
        )
    elif mining == "batch_hard":
        return _batch_hard_loss(
            embeddings, labels, candidates, candidate_labels, anchor_offset, metric=metric, base_margin=margin,
            margin_scale=0.0, text_embeddings=None, candidate_text=None, text_positive_threshold=None,
            smooth=smooth, swap=swap, reduction=reduction, cross_rank=cross_rank, backend=backend,
        )
    elif mining == "all" and triplets_per_anchor == "all" and extra_triplets is None:
        loss = _all_triplet_losses(
            embeddings, labels, candidates, candidate_labels, anchor_offset, metric=metric, margin=margin,
            smooth=smooth, swap=swap, reduction=reduction, cross_rank=cross_rank,
        )
        return _keep_gather_in_graph(_show_diverged_anchors(loss, embeddings, reduction), candidates, cross_rank)
    else:
        triplets = _listed_triplets(
            embeddings, labels, candidates, candidate_labels, anchor_offset, strategy=mining, metric=metric,
            backend=backend, triplets_per_anchor=triplets_per_anchor,
        )
        if extra_triplets is not None:
            anchors, positives, negatives = (torch.cat([mined, given]) for mined, given in zip(triplets, extra_triplets))
            triplets = (anchors, positives, negatives)
    losses = _listed_losses(embeddings, candidates, triplets, metric=metric, margin=margin, smooth=smooth, swap=swap)
    loss = _reduce(losses, None, reduction, cross_rank)
    if indices_tuple is None:
        loss = _show_diverged_anchors(loss, embeddings, reduction)
    return _keep_gather_in_graph(loss, candidates, cross_rank)


def _show_diverged_anchors(loss: torch.Tensor, embeddings: torch.Tensor, reduction: str) -> torch.Tensor:
    # Semi-hard and "all" mining never select a triplet whose distance is NaN (no comparison holds)
    # or whose negative is at +inf (no violation), so a diverged anchor could vanish from the loss;
    # a reduced loss is NaN then, as batch-hard's is. (Per-triplet losses have no entry to mark.)
    if reduction == "none":
        return loss
    return loss + unpaired_anchor_losses(embeddings, None, loss.dtype).sum()


@autocast_off
def triplet_margin_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    indices_tuple: tuple[torch.Tensor, ...] | None = None,
    *,
    margin: float = 0.2,
    metric: str = DEFAULT_METRIC,
    mining: str = "batch_hard",
    reduction: str = "mean",
    smooth: bool = False,
    swap: bool = False,
    triplets_per_anchor: int | str = "all",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    cross_rank: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Triplet margin loss ``max(0, d(a, p) - d(a, n) + margin)`` with online mining.

    Mining strategies (used when ``indices_tuple`` is None):

    * ``"batch_hard"``: one triplet per anchor, its farthest positive and closest negative
      (fused Triton kernel on CUDA, chunked reference elsewhere; memory O(N D)).
    * ``"semi_hard"``: FaceNet; one triplet per anchor-positive pair with the closest negative
      strictly farther than the positive, else the farthest negative (chunked reference on every
      device).
    * ``"all"``: every valid triplet (PML's default). The violating ones are selected on the fast
      path with a rigorous error band, their distances recomputed exactly and the violation test
      re-applied (see :mod:`torchfg.functional._triplet_selection`): memory O(chunk x M) plus the
      selected triplets, never N x M x M. A triplet whose exact violation is 0 gets no loss, no
      gradient and is not counted by ``"mean_nonzero"``.

    The distances of every selected triplet are computed exactly from ``a - b``. An anchor without
    a positive or without a negative contributes nothing. A batch without any valid triplet gives
    0 with a zero gradient.

    Args:
        embeddings: (N, D) float anchors (and candidates unless ``ref_embeddings`` is given).
        labels: (N,) integer labels.
        indices_tuple: triplets from any miner instead of ``mining``, as in pytorch-metric-learning:
            ``(anchors, positives, negatives)`` or pairs ``(anchors1, positives, anchors2,
            negatives)`` (converted to every triplet sharing an anchor, as PML does). Anchors index
            ``embeddings``; positives and negatives index ``ref_embeddings`` when given.
        margin: any finite number (negative margins allowed, as in PML).
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` (1 - cos) or ``"dot"`` (-a.b).
        mining: ``"batch_hard"``, ``"semi_hard"`` or ``"all"``.
        reduction: ``"mean"`` (over valid triplets: anchors for batch_hard, every valid triplet for
            ``"all"``, the listed ones for a tuple), ``"sum"``, ``"none"`` ((N,) per anchor for
            batch_hard, 0 for anchors without a triplet; (T,) per triplet otherwise, in the order
            of :func:`mine_triplets` or of the tuple) or ``"mean_nonzero"`` (mean over triplets
            with positive loss, 0 if none: PML's default ``AvgNonZeroReducer``).
        smooth: use ``softplus`` instead of the hinge (PML's ``smooth_loss``).
        swap: use ``min(d(a, n), d(p, n))`` as the negative distance (PML / torch ``swap``).
        triplets_per_anchor: ``"all"`` or an int k: with ``mining="all"``, k random (positive,
            negative) pairs per anchor drawn with replacement from the global RNG, as PML's
            ``triplets_per_anchor``. Part of the loss's own mining: an ``indices_tuple``
            replaces it, as it replaces ``mining`` (PML does the same).
        ref_embeddings: (M, D) positives/negatives come from here instead (e.g. a cross-batch
            memory); the anchors are then not among the candidates, except when
            ``ref_embeddings is embeddings and ref_labels is labels`` (the same objects): then a
            row is never its own positive, as without a reference set. pytorch-metric-learning
            tests ``ref_labels is labels`` alone, so for a different ``ref_embeddings`` with
            ``ref_labels=labels`` (a MoCo-style query/key call) it drops the (i, i) positive
            pairs, and torchfg keeps them: pass ``ref_labels=labels.clone()`` to PML to compare.
        ref_labels: (M,) labels of ``ref_embeddings``.
        cross_rank: under torch.distributed, mine positives and negatives among the embeddings
            (and labels) of all ranks; this rank's items are the anchors. See the module docstring
            for the world-size scaling. Cannot be combined with ``ref_embeddings``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for batch_hard's mining and distances;
            semi_hard and all have the torch reference only (another explicit backend raises
            :class:`torchfg.errors.BackendUnavailableError`).

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
    cross_rank = _check_flag(cross_rank, "cross_rank")

    def validate():
        if cross_rank and ref_embeddings is not None:
            raise ValueError("ref_embeddings cannot be combined with cross_rank=True")
        checked = _check_embeddings(embeddings, labels, ref_embeddings, ref_labels)
        check_choice(metric, "metric", METRICS)
        check_choice(mining, "mining", MINING_STRATEGIES)
        check_choice(reduction, "reduction", REDUCTIONS)
        if indices_tuple is None:
            _check_mining_backend(mining, backend)
        else:
            check_backend(backend, "anchor_pair_distances")
        per_anchor = _check_triplets_per_anchor(triplets_per_anchor, mining)
        return (*checked, _check_number(margin, "margin"), _check_flag(smooth, "smooth"), _check_flag(swap, "swap"),
                per_anchor)

    call = dict(function="triplet_margin_loss", margin=margin, metric=metric, mining=mining, reduction=reduction,
                smooth=smooth, swap=swap, triplets_per_anchor=triplets_per_anchor,
                indices_tuple=indices_tuple is not None, backend=backend)
    if cross_rank:
        checked, (candidates, candidate_labels, _, anchor_offset) = _validated_candidates(
            validate, call, lambda checked: (checked[0], checked[1], None))
        (embeddings, labels, *_, margin, smooth, swap, per_anchor) = checked
        embeddings = _as_gathered_rows(embeddings, candidates, anchor_offset)
    else:
        (embeddings, labels, candidates, candidate_labels, anchor_offset, margin, smooth, swap,
         per_anchor) = validate()
    return _triplet_margin_loss_impl(
        embeddings,
        labels,
        candidates,
        candidate_labels,
        anchor_offset,
        margin=margin,
        metric=metric,
        mining=mining,
        reduction=reduction,
        smooth=smooth,
        backend=backend,
        swap=swap,
        triplets_per_anchor=per_anchor,
        indices_tuple=indices_tuple,
        cross_rank=cross_rank,
    )


def _adaptive_triplet_loss_impl(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    candidate_text: torch.Tensor,
    anchor_offset: int | None,
    *,
    base_margin: float,
    margin_scale: float,
    metric: str,
    text_positive_threshold: float | None,
    reduction: str,
    backend: str,
    indices_tuple: tuple[torch.Tensor, ...] | None = None,
    cross_rank: bool = False,
) -> torch.Tensor:
    if indices_tuple is not None:
        a, p, n = _check_indices_tuple(
            indices_tuple, embeddings.shape[0], candidates.shape[0], embeddings.device, cross_rank=cross_rank
        )
        margin: torch.Tensor | float = base_margin
        if margin_scale != 0.0 and a.numel():
            text_cos = text_cosine(text_embeddings.index_select(0, a), candidate_text.index_select(0, n))
            margin = (base_margin + margin_scale * (1.0 - text_cos) * 0.5).to(accumulation_dtype(embeddings.dtype))
        losses = _listed_losses(embeddings, candidates, (a, p, n), metric=metric, margin=margin, smooth=False, swap=False)
        return _keep_gather_in_graph(_reduce(losses, None, reduction, cross_rank), candidates, cross_rank)
    return _batch_hard_loss(
        embeddings, labels, candidates, candidate_labels, anchor_offset, metric=metric, base_margin=base_margin,
        margin_scale=margin_scale, text_embeddings=text_embeddings, candidate_text=candidate_text,
        text_positive_threshold=text_positive_threshold, smooth=False, swap=False, reduction=reduction,
        cross_rank=cross_rank, backend=backend,
    )


@autocast_off
def adaptive_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    indices_tuple: tuple[torch.Tensor, ...] | None = None,
    *,
    base_margin: float = 0.1,
    margin_scale: float = 0.5,
    metric: str = DEFAULT_METRIC,
    text_positive_threshold: float | None = None,
    reduction: str = "mean",
    cross_rank: bool = False,
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
        indices_tuple: triplets from any miner instead of the margin-aware batch-hard mining,
            ``(anchors, positives, negatives)`` or PML pairs ``(anchors1, positives, anchors2,
            negatives)``; each triplet's margin comes from the text of its anchor and negative.
        base_margin: m0 >= 0.
        margin_scale: s >= 0.
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        text_positive_threshold: items with another label whose description cosine is at least
            this (in [-1, 1]) are near-duplicates and never negatives; None turns it off. The
            cosine is computed in fp32 (fp64 for fp64 text) and rounds: two identical descriptions
            can come out a few 1e-7 below 1, so use e.g. 0.9999, not 1.0, to catch exact copies.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` ((N,) per anchor, (T,) per triplet of a tuple)
            or ``"mean_nonzero"``.
        cross_rank: under torch.distributed, mine among the embeddings, labels and text
            embeddings of all ranks (see :func:`triplet_margin_loss`).
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
    cross_rank = _check_flag(cross_rank, "cross_rank")

    def validate():
        checked = _check_embeddings(embeddings, labels, None, None)
        text = _check_text(text_embeddings, checked[0].shape[0], checked[0].device)
        threshold = text_positive_threshold
        if threshold is not None:
            threshold = _check_number(threshold, "text_positive_threshold", low=-1.0, high=1.0)
        check_choice(metric, "metric", METRICS)
        check_choice(reduction, "reduction", REDUCTIONS)
        check_backend(backend, "mine_hardest")
        margins = (_check_number(base_margin, "base_margin", low=0.0), _check_number(margin_scale, "margin_scale", low=0.0))
        return (*checked, text, *margins, threshold)

    call = dict(function="adaptive_triplet_loss", base_margin=base_margin, margin_scale=margin_scale, metric=metric,
                text_positive_threshold=text_positive_threshold, reduction=reduction,
                indices_tuple=indices_tuple is not None, backend=backend)
    if cross_rank:
        checked, (candidates, candidate_labels, gathered_text, anchor_offset) = _validated_candidates(
            validate, call, lambda checked: (checked[0], checked[1], checked[5]))
        (embeddings, labels, *_, text_embeddings, base_margin, margin_scale, text_positive_threshold) = checked
        candidate_text = cast(torch.Tensor, gathered_text)  # the gather of a tensor, never None
        embeddings = _as_gathered_rows(embeddings, candidates, anchor_offset)
        text_embeddings = _as_gathered_rows(text_embeddings, candidate_text, anchor_offset)
    else:
        (embeddings, labels, candidates, candidate_labels, anchor_offset, text_embeddings, base_margin, margin_scale,
         text_positive_threshold) = validate()
        candidate_text = text_embeddings
    return _adaptive_triplet_loss_impl(
        embeddings,
        labels,
        text_embeddings,
        candidates,
        candidate_labels,
        candidate_text,
        anchor_offset,
        base_margin=base_margin,
        margin_scale=margin_scale,
        metric=metric,
        text_positive_threshold=text_positive_threshold,
        reduction=reduction,
        backend=backend,
        indices_tuple=indices_tuple,
        cross_rank=cross_rank,
    )


@autocast_off
def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: str = "batch_hard",
    metric: str = DEFAULT_METRIC,
    margin: float = 0.2,
    text_embeddings: torch.Tensor | None = None,
    base_margin: float | None = None,
    margin_scale: float | None = None,
    text_positive_threshold: float | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    cross_rank: bool = False,
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
        cross_rank: under torch.distributed, mine among all ranks' items: anchors index this
            rank's ``embeddings``, positives and negatives index the concatenation of all ranks'
            batches (rank order; this rank's rows start at the sum of the lower ranks' sizes).
        backend: mining backend for batch_hard.

    Returns:
        (anchors, positives, negatives): int64 tensors of equal length T, only valid triplets,
        sorted by anchor. No gradient. ``"batch_hard"`` gives an anchor whose row (or, with
        adaptive margins, text row) holds NaN or inf its first positive and first negative by
        index, when its labels give it both (with ``text_positive_threshold``, the first
        negative whose text is not a near-duplicate of the anchor's): a loss over the triplets
        is then NaN, as the fused loss is (an anchor alone in its class still has none).

    Example:
        >>> emb = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
        >>> mine_triplets(emb, torch.tensor([0, 0, 1, 1]))
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 2, 1, 1]))
    """
    return mine_triplets_and_candidates(
        embeddings, labels, strategy=strategy, metric=metric, margin=margin, text_embeddings=text_embeddings,
        base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
        ref_embeddings=ref_embeddings, ref_labels=ref_labels, cross_rank=cross_rank, backend=backend,
    )[0]


def mine_triplets_and_candidates(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: str = "batch_hard",
    metric: str = DEFAULT_METRIC,
    margin: float = 0.2,
    text_embeddings: torch.Tensor | None = None,
    base_margin: float | None = None,
    margin_scale: float | None = None,
    text_positive_threshold: float | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    cross_rank: bool = False,
    backend: str = "auto",
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`mine_triplets`, and the (M, D) rows its positives and negatives index (the gathered
    batch under ``cross_rank``, else ``ref_embeddings`` or ``embeddings``), detached: what the
    miners' statistics need without a second gather."""
    cross_rank = _check_flag(cross_rank, "cross_rank")
    anchor_offset: int | None  # None: the anchors are not among the candidates
    if cross_rank:
        def validate():
            if ref_embeddings is not None:
                raise ValueError("ref_embeddings cannot be combined with cross_rank=True")
            checked = _check_embeddings(embeddings, labels, None, None)
            # The scalar arguments too: checked only after the gather, an error on one rank left
            # the others returning triplets into their next collective alone.
            _check_mining_arguments(
                checked[0], strategy=strategy, metric=metric, margin=margin, text_embeddings=text_embeddings,
                base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
                has_ref=False, backend=backend,
            )
            return checked

        call = dict(function="mine_triplets", strategy=strategy, metric=metric, margin=margin,
                    text_embeddings=text_embeddings is not None, base_margin=base_margin, margin_scale=margin_scale,
                    text_positive_threshold=text_positive_threshold, backend=backend)
        with torch.no_grad():
            checked, (candidates, candidate_labels, gathered_text, anchor_offset) = _validated_candidates(
                validate, call,
                lambda checked: (checked[0].detach(), checked[1],
                                 None if text_embeddings is None else text_embeddings.detach()),
            )
        embeddings, labels, *_ = checked
        anchors = _as_gathered_rows(embeddings.detach(), candidates, anchor_offset)
        if text_embeddings is not None:
            text_embeddings = _as_gathered_rows(text_embeddings, gathered_text, anchor_offset)
        return _mine_triplets_checked(
            anchors, labels, candidates, candidate_labels, anchor_offset, strategy=strategy, metric=metric,
            margin=margin, text_embeddings=text_embeddings, candidate_text=gathered_text, base_margin=base_margin,
            margin_scale=margin_scale, text_positive_threshold=text_positive_threshold, has_ref=False, backend=backend,
        ), candidates
    embeddings, labels, candidates, candidate_labels, anchor_offset = _check_embeddings(
        embeddings, labels, ref_embeddings, ref_labels
    )
    return _mine_triplets_checked(
        embeddings, labels, candidates, candidate_labels, anchor_offset, strategy=strategy, metric=metric, margin=margin,
        text_embeddings=text_embeddings, candidate_text=None, base_margin=base_margin, margin_scale=margin_scale,
        text_positive_threshold=text_positive_threshold, has_ref=ref_embeddings is not None, backend=backend,
    ), candidates.detach()


def _mine_triplets_checked(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_offset: int | None,
    *,
    strategy: str,
    metric: str,
    margin: float,
    text_embeddings: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    base_margin: float | None,
    margin_scale: float | None,
    text_positive_threshold: float | None,
    has_ref: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mine_triplets once embeddings/labels/candidates are checked (candidate_text: gathered text)."""
    text_embeddings, base_margin, margin_scale, text_positive_threshold = _check_mining_arguments(
        embeddings, strategy=strategy, metric=metric, margin=margin, text_embeddings=text_embeddings,
        base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
        has_ref=has_ref, backend=backend,
    )
    if text_embeddings is not None and candidate_text is None:
        candidate_text = text_embeddings
    return _listed_triplets(
        embeddings.detach(), labels, candidates.detach(), candidate_labels, anchor_offset, strategy=strategy,
        metric=metric, backend=backend, text_embeddings=text_embeddings, candidate_text=candidate_text,
        base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
    )


def _check_mining_arguments(
    embeddings: torch.Tensor,
    *,
    strategy: str,
    metric: str,
    margin: float,
    text_embeddings: torch.Tensor | None,
    base_margin: float | None,
    margin_scale: float | None,
    text_positive_threshold: float | None,
    has_ref: bool,
    backend: str,
) -> tuple[torch.Tensor | None, float, float, float | None]:
    """mine_triplets' checks of everything but the row sets: (text_embeddings, base_margin,
    margin_scale, text_positive_threshold) as the mining takes them."""
    check_choice(strategy, "strategy", MINING_STRATEGIES)
    check_choice(metric, "metric", METRICS)
    _check_mining_backend(strategy, backend)
    # Without text the margin selects nothing (any finite value, as the losses take); with text
    # it is the adaptive margins' base, which must not be negative.
    margin = _check_number(margin, "margin")
    if text_embeddings is not None:
        if strategy != "batch_hard":
            raise ValueError(f"text_embeddings (margin-aware mining) needs strategy='batch_hard', got {strategy!r}")
        if has_ref:
            raise ValueError("text_embeddings cannot be combined with ref_embeddings (the reference set has no text)")
        text_embeddings = _check_text(text_embeddings, embeddings.shape[0], embeddings.device)
        if base_margin is None:
            base_margin = _check_number(margin, "margin (the base margin with text_embeddings)", low=0.0)
        else:
            base_margin = _check_number(base_margin, "base_margin", low=0.0)
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
    return text_embeddings, base_margin, margin_scale, text_positive_threshold
