"""Prototypical-network logits: classify queries by their distance to per-class mean embeddings.

Snell et al., "Prototypical Networks for Few-shot Learning" (NeurIPS 2017): a class prototype is
the mean of that class's support embeddings and a query's logit for a class is the negative
distance to its prototype. With ``metric="sqeuclidean"`` this is a linear classifier in the
embedding space, which is why it is the usual few-shot evaluation head for frozen embedders.
"""

from __future__ import annotations

import torch

from torchfg._validation import (
    accumulation_dtype,
    check_bool,
    check_choice,
    check_float_tensor,
    check_labels,
    check_positive,
    check_same_device_dtype,
)
from torchfg.ops.metric import METRICS, unit_rows
from torchfg.ops.pairwise import pairwise_distance
from torchfg.ops.precision import autocast_off

__all__ = ["class_prototypes", "prototype_logits", "prototypical_logits"]

def _check_support(support: object, support_labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    support = check_float_tensor(support, "support", ndim=2)
    if support.shape[0] == 0:
        raise ValueError("support must hold at least one embedding, got shape (0, D) (empty support)")
    if support.shape[1] == 0:
        raise ValueError(f"support must have an embedding dimension D >= 1, got shape {tuple(support.shape)}")
    support_labels = check_labels(support_labels, "support_labels", support.shape[0], device=support.device)
    return support, support_labels


@autocast_off
def class_prototypes(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    *,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of the support embeddings and the sorted classes they belong to.

    Args:
        support: (S, D) support embeddings, S >= 1.
        support_labels: (S,) integer labels (any values, e.g. original dataset class ids).
        normalize: L2-normalise each support embedding before averaging. The mean of unit vectors is
            not itself re-normalised (its norm shrinks with the spread of the class), which is what
            ``normalize=True`` means in :func:`prototypical_logits`.

    Returns:
        ``(prototypes, classes)``: prototypes (C, D) in ``support``'s dtype (averaged in fp32, or
        fp64 for fp64 input), and classes (C,) the sorted unique labels; row ``c`` of ``prototypes``
        is the mean of the support items labelled ``classes[c]``. Differentiable w.r.t. ``support``.

    Example:
        >>> support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
        >>> prototypes, classes = class_prototypes(support, torch.tensor([7, 7, 3]))
        >>> classes.tolist(), prototypes.tolist()
        ([3, 7], [[0.0, 4.0], [1.0, 0.0]])
    """
    support, support_labels = _check_support(support, support_labels)
    normalize = check_bool(normalize, "normalize")
    classes, column = torch.unique(support_labels, sorted=True, return_inverse=True)
    acc_dtype = accumulation_dtype(support.dtype)
    support_acc = unit_rows(support, acc_dtype) if normalize else support.to(acc_dtype)
    sums = support_acc.new_zeros(classes.shape[0], support_acc.shape[1]).index_add(0, column, support_acc)
    counts = torch.bincount(column, minlength=classes.shape[0]).to(support_acc.dtype)
    return (sums / counts.unsqueeze(1)).to(support.dtype), classes


@autocast_off
def prototype_logits(
    query: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    metric: str = "sqeuclidean",
    temperature: float = 1.0,
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Logits ``-distance(query, prototype) / temperature`` against precomputed prototypes.

    Args:
        query: (Q, D) query embeddings (Q may be 0).
        prototypes: (C, D) class prototypes, C >= 1, e.g. from :func:`class_prototypes`.
        metric: ``"sqeuclidean"``, ``"euclidean"``, ``"cosine"`` (1 - cos) or ``"dot"`` (negative
            inner product), as in :func:`torchfg.pairwise_distance`.
        temperature: > 0; logits are divided by it (matters for the softmax / loss, not the argmax).
        normalize: L2-normalise the queries first (pair with prototypes built with ``normalize=True``).
        backend: distance backend, see :func:`torchfg.pairwise_distance`.

    Returns:
        (Q, C) logits, fp32 for fp16/bf16/fp32 inputs (fp64 for fp64); column ``c`` is prototype ``c``.

    Example:
        >>> prototype_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        tensor([[-1., -1.]])
    """
    metric = check_choice(metric, "metric", METRICS)
    temperature = check_positive(temperature, "temperature", reciprocal=True)
    normalize = check_bool(normalize, "normalize")
    query = check_float_tensor(query, "query", ndim=2)
    prototypes = check_float_tensor(prototypes, "prototypes", ndim=2)
    if prototypes.shape[0] == 0:
        raise ValueError("prototypes must hold at least one class, got 0 classes (was the support empty?)")
    if query.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"query and the support/prototypes must have the same embedding dimension D, "
            f"got query D={query.shape[1]} and support D={prototypes.shape[1]}"
        )
    check_same_device_dtype(query, "query", prototypes, "support")
    # Logits in the accumulation dtype: fp16 ones overflowed (squared distances past 65504 read
    # -inf, and a cross-entropy over them NaN, where autocast's cdist gives fp32) and bf16 ones
    # are too coarse for a softmax. The (Q, C) distances are small; the cast keeps the gradient.
    acc = accumulation_dtype(query.dtype)
    query = unit_rows(query, acc) if normalize else query.to(acc)
    distances = pairwise_distance(query, prototypes.to(acc), metric, backend=backend)
    logits = -distances
    return logits / temperature if temperature != 1.0 else logits


@autocast_off
def prototypical_logits(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    *,
    metric: str = "sqeuclidean",
    temperature: float = 1.0,
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Prototypical-network logits of one episode.

    ``logits[q, c] = -distance(query[q], prototype[c]) / temperature`` with ``prototype[c]`` the mean
    of the support embeddings labelled ``classes[c]`` and ``classes`` the sorted unique support labels
    (get them with :func:`class_prototypes`, or use :class:`torchfg.heads.PrototypicalHead`, which
    keeps them). Differentiable w.r.t. ``support`` and ``query`` (for episodic training).

    Args:
        support: (S, D) support embeddings, S >= 1.
        support_labels: (S,) integer labels, arbitrary values; classes may have different shot counts.
        query: (Q, D) query embeddings, same dtype and device as ``support``.
        metric: ``"sqeuclidean"`` (the original method), ``"euclidean"``, ``"cosine"`` or ``"dot"``.
        temperature: > 0, divides the logits.
        normalize: L2-normalise support and query embeddings before building prototypes / distances.
        backend: distance backend, see :func:`torchfg.pairwise_distance`.

    Returns:
        (Q, C) logits, C = number of distinct support labels, columns in sorted label order; fp32
        for fp16/bf16/fp32 inputs (fp64 for fp64), as the losses return.

    Example:
        >>> support = torch.randn(10, 64)
        >>> support_labels = torch.arange(5).repeat_interleave(2)  # 5-way 2-shot
        >>> logits = prototypical_logits(support, support_labels, torch.randn(7, 64))
        >>> logits.shape
        torch.Size([7, 5])
    """
    support, support_labels = _check_support(support, support_labels)
    query = check_float_tensor(query, "query", ndim=2)
    if query.shape[1] != support.shape[1]:
        raise ValueError(
            f"query and support must have the same embedding dimension D, "
            f"got query D={query.shape[1]} and support D={support.shape[1]}"
        )
    check_same_device_dtype(query, "query", support, "support")
    prototypes, _ = class_prototypes(support, support_labels, normalize=normalize)
    return prototype_logits(
        query, prototypes, metric=metric, temperature=temperature, normalize=normalize, backend=backend
    )
