"""Retrieval metrics over exact k-NN: Recall@K, precision@1, R-precision and MAP@R.

Definitions follow pytorch-metric-learning's ``AccuracyCalculator`` where they overlap:

* a query's relevant items are the gallery items with its label; R is their number. When the
  gallery is the query set (``gallery=None``), each query's own item is excluded from the
  neighbours and from R; likewise with ``ref_includes_query=True``, where the queries are the
  first Q rows of a larger gallery (PML's ``ref_includes_query``).
* queries with R = 0 ("lone" queries: nothing relevant to find) are left out of every average;
  with no query left the metric is NaN.
* ``precision_at_1``: fraction of queries whose nearest neighbour is relevant.
* ``r_precision``: mean over queries of (relevant among the R nearest) / R.
* ``map_at_r``: mean over queries of (1 / R) * sum over the R nearest of precision@i at each
  relevant position i ("MAP@R", Musgrave et al., A Metric Learning Reality Check, 2020).
* ``recall_at_k`` (not in AccuracyCalculator; the usual Recall@K of retrieval papers): fraction
  of queries with at least one relevant item among their k nearest. A k beyond the number of
  gallery items counts all of them.

Return types, one rule: a metric with one value returns a Python ``float``; Recall@K, one value
per K, returns ``dict[int, float]`` keyed by K; :func:`retrieval_metrics` returns a frozen
:class:`RetrievalMetrics` whose fields are exactly what the single-metric functions return
(``.recall == recall_at_k(...)``, ``.map_at_r == map_at_r(...)``, but see exact ties below). It is also a read-only mapping
with pytorch-metric-learning's flat keys (``result["recall@1"]``, ``result["map_at_r"]``,
``dict(result)``), so code written for the earlier plain-dict return keeps working.

Neighbours come from :func:`torchfg.knn` (ties broken by the lower gallery index), one search
for all metrics of a call. Among distances that are equal in exact arithmetic (binary or
quantised codes, parallel rows under ``"cosine"``) the search's fast path may round two of them
apart, and which of them a search of k keeps can then depend on k (``docs/concepts/numerics.md``).
A combined call searches ``max(K, max R)`` neighbours where ``recall_at_k`` alone searches
``max(K)``, so on such data the two may differ by those ties; with distinct distances they agree. ``progress=True`` shows a tqdm progress bar for searches over many
pairs (off by default; tqdm is imported only then).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Sequence

import torch

from torchfg._validation import check_bool, check_int, check_labels, check_tensor
from torchfg.ops.knn import knn_search

__all__ = ["RetrievalMetrics", "recall_at_k", "precision_at_1", "r_precision", "map_at_r", "retrieval_metrics"]

# Searches over fewer (query, gallery) pairs than this finish too fast to need a progress bar.
_PROGRESS_MIN_PAIRS = 2**26


@dataclass(frozen=True, eq=False)
class RetrievalMetrics(Mapping[str, float]):
    """Every retrieval metric of one search (floats in [0, 1], NaN when no query has a relevant item).

    Attributes:
        recall: ``{K: Recall@K}`` for each requested K (as :func:`recall_at_k` returns it).
        precision_at_1, r_precision, map_at_r: as the functions of the same name return them.

    As a read-only mapping it has PML ``AccuracyCalculator``-style flat keys, in this order:
    ``"recall@K"`` for each K, ``"precision_at_1"``, ``"r_precision"``, ``"map_at_r"``; it compares
    equal to a dict with the same items.
    """

    recall: dict[int, float]
    precision_at_1: float
    r_precision: float
    map_at_r: float

    def as_dict(self) -> dict[str, float]:
        """The flat ``{"recall@K": ..., "precision_at_1": ..., "r_precision": ..., "map_at_r": ...}``."""
        out = {f"recall@{k}": v for k, v in self.recall.items()}
        out.update(precision_at_1=self.precision_at_1, r_precision=self.r_precision, map_at_r=self.map_at_r)
        return out

    def __getitem__(self, key: str) -> float:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.recall) + 3


def _check_ks(ks: object) -> tuple[int, ...]:
    if isinstance(ks, torch.Tensor) or type(ks).__module__ == "numpy":
        ks = ks.tolist()  # type: ignore[attr-defined]  # a NumPy / torch integer or 1-D array of them
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, Sequence) or isinstance(ks, str) or len(ks) == 0:
        raise TypeError(f"ks must be a non-empty sequence of ints, got {ks!r}")
    return tuple(check_int(k, "ks", 1) for k in ks)


def _relevance(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None,
    gallery_labels: torch.Tensor | None,
    k_wanted: int,
    need_r: bool,
    metric: str,
    backend: str,
    progress: bool,
    ref_includes_query: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(same-label matrix (Q, k) bool over the k nearest, R per query (Q,) int64)."""
    query = check_tensor(query, "query")
    if query.dim() != 2:
        raise ValueError(f"query must have 2 dims (Q, D), got shape {tuple(query.shape)}")
    query_labels = check_labels(query_labels, "query_labels", query.shape[0], device=query.device)
    if gallery is None:
        if gallery_labels is not None:
            raise ValueError("gallery_labels was given without gallery")
        gallery_labels = query_labels
        self_search = True
    else:
        if gallery_labels is None:
            raise ValueError("gallery was given without gallery_labels")
        gallery = check_tensor(gallery, "gallery")
        if gallery.dim() != 2:
            raise ValueError(f"gallery must have 2 dims (G, D), got shape {tuple(gallery.shape)}")
        gallery_labels = check_labels(gallery_labels, "gallery_labels", gallery.shape[0], device=query.device)
        self_search = _check_ref_includes_query(ref_includes_query, query, query_labels, gallery, gallery_labels)
    check_bool(progress, "progress")
    num_query = query.shape[0]
    num_gallery = num_query if gallery is None else gallery.shape[0]
    eligible = num_gallery - int(self_search)
    if num_query == 0:
        raise ValueError("query is empty: retrieval metrics need at least one query")
    if eligible < 1:
        raise ValueError(
            "the gallery has no item to retrieve"
            + (" (a self-search needs at least 2 items)" if self_search else "")
        )

    unique, counts = torch.unique(gallery_labels, return_counts=True)
    # A strided view (a column of a label table) makes searchsorted copy it and warn.
    position = torch.searchsorted(unique, query_labels.contiguous()).clamp_max(unique.numel() - 1)
    found = unique[position] == query_labels
    relevant_count = torch.where(found, counts[position], 0) - int(self_search)

    k = k_wanted
    if need_r:
        k = max(k, int(relevant_count.max()))
    k = max(1, min(k, eligible))
    from tqdm.auto import tqdm  # lazily: importing torchfg.metrics does not load tqdm

    bar = tqdm(
        total=num_query,
        desc="k-NN search",
        unit="query",
        disable=not progress or num_query * num_gallery < _PROGRESS_MIN_PAIRS,
        leave=False,
    )
    with bar:
        _, indices = knn_search(
            query, gallery, k, metric=metric, exclude_self=self_search, backend=backend, progress=bar.update
        )
    same = gallery_labels[indices] == query_labels.unsqueeze(1)
    return same, relevant_count


def _check_ref_includes_query(
    ref_includes_query: object,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
) -> bool:
    """Whether query i is gallery item i (and so never its own neighbour), checked as PML checks it."""
    if not check_bool(ref_includes_query, "ref_includes_query"):
        return False
    q = query.shape[0]
    if gallery.shape[0] < q or not (
        torch.equal(gallery[:q], query) and torch.equal(gallery_labels[:q], query_labels)
    ):
        raise ValueError(
            "ref_includes_query=True needs the first Q rows of gallery and gallery_labels to be the query "
            f"and query_labels (Q = {q}, G = {gallery.shape[0]})"
        )
    return True


def _mean_over_answerable(per_query: torch.Tensor, relevant_count: torch.Tensor) -> float:
    answerable = relevant_count > 0
    if not bool(answerable.any()):
        return float("nan")
    return per_query[answerable].double().mean().item()


def _recall(same: torch.Tensor, relevant_count: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    return {k: _mean_over_answerable(same[:, :k].any(1), relevant_count) for k in ks}


def _r_masked_hits(same: torch.Tensor, relevant_count: torch.Tensor) -> torch.Tensor:
    within_r = torch.arange(same.shape[1], device=same.device).unsqueeze(0) < relevant_count.unsqueeze(1)
    return same & within_r


def _r_precision(same: torch.Tensor, relevant_count: torch.Tensor) -> float:
    hits = _r_masked_hits(same, relevant_count).sum(1).double()
    return _mean_over_answerable(hits / relevant_count.clamp_min(1), relevant_count)


def _map_at_r(same: torch.Tensor, relevant_count: torch.Tensor) -> float:
    hits = _r_masked_hits(same, relevant_count)
    ranks = torch.arange(1, same.shape[1] + 1, device=same.device, dtype=torch.float64)
    precision_at_hits = hits.cumsum(1).double() * hits / ranks
    average_precision = precision_at_hits.sum(1) / relevant_count.clamp_min(1)
    return _mean_over_answerable(average_precision, relevant_count)


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "cosine",
    backend: str = "auto",
    progress: bool = False,
    ref_includes_query: bool = False,
) -> RetrievalMetrics:
    """All retrieval metrics from one k-NN search.

    Args:
        query: (Q, D) embeddings.
        query_labels: (Q,) integer labels.
        gallery: (G, D) embeddings, same dtype and device; None uses the query set (each
            query's own item excluded).
        gallery_labels: (G,) integer labels; required with ``gallery``.
        ks: the K of Recall@K.
        metric: distance of :func:`torchfg.knn`.
        backend: k-NN backend (see :mod:`torchfg.backends`).
        progress: show a progress bar for large searches (default off).
        ref_includes_query: the queries are the first Q items of ``gallery`` (a reference set
            larger than the query set, as PML's ``ref_includes_query``): each query's own item is
            excluded from its neighbours and from R.

    Returns:
        :class:`RetrievalMetrics`: ``.recall`` ``{K: Recall@K}``, ``.precision_at_1``,
        ``.r_precision``, ``.map_at_r``; also a mapping with the flat keys ``"recall@K"``,
        ``"precision_at_1"``, ``"r_precision"``, ``"map_at_r"``. Floats in [0, 1] (NaN when no
        query has a relevant item).

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.2]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> result = retrieval_metrics(x, labels, ks=(1,), progress=False)
        >>> result.recall, result.map_at_r
        ({1: 1.0}, 1.0)
        >>> dict(result)
        {'recall@1': 1.0, 'precision_at_1': 1.0, 'r_precision': 1.0, 'map_at_r': 1.0}
    """
    ks = _check_ks(ks)
    same, relevant_count = _relevance(
        query, query_labels, gallery, gallery_labels, max(ks), True, metric, backend, progress, ref_includes_query
    )
    return RetrievalMetrics(
        recall=_recall(same, relevant_count, ks),
        precision_at_1=_mean_over_answerable(same[:, 0], relevant_count),
        r_precision=_r_precision(same, relevant_count),
        map_at_r=_map_at_r(same, relevant_count),
    )


def recall_at_k(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "cosine",
    *,
    backend: str = "auto",
    progress: bool = False,
    ref_includes_query: bool = False,
) -> dict[int, float]:
    """Recall@K: fraction of queries with a same-label item among their K nearest gallery items.

    Args: as :func:`retrieval_metrics`.

    Returns:
        ``{K: recall}`` for each K in ``ks`` (``retrieval_metrics(...).recall``).

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
        >>> recall_at_k(x, torch.tensor([0, 1, 0, 1]), ks=(1, 2), metric="euclidean", progress=False)
        {1: 0.0, 2: 0.75}
    """
    ks = _check_ks(ks)
    same, relevant_count = _relevance(
        query, query_labels, gallery, gallery_labels, max(ks), False, metric, backend, progress, ref_includes_query
    )
    return _recall(same, relevant_count, ks)


def precision_at_1(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    metric: str = "cosine",
    *,
    backend: str = "auto",
    progress: bool = False,
    ref_includes_query: bool = False,
) -> float:
    """Fraction of queries whose nearest gallery item has their label (AccuracyCalculator's
    ``precision_at_1``). Args as :func:`retrieval_metrics`.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
        >>> precision_at_1(x, torch.tensor([0, 0, 1, 1]), metric="euclidean", progress=False)
        0.75
    """
    same, relevant_count = _relevance(query, query_labels, gallery, gallery_labels, 1, False, metric, backend, progress,
                                        ref_includes_query)
    return _mean_over_answerable(same[:, 0], relevant_count)


def r_precision(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    metric: str = "cosine",
    *,
    backend: str = "auto",
    progress: bool = False,
    ref_includes_query: bool = False,
) -> float:
    """Mean over queries of (same-label items among the R nearest) / R, R = number of same-label
    gallery items (AccuracyCalculator's ``r_precision``). Args as :func:`retrieval_metrics`.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
        >>> r_precision(x, torch.tensor([0, 1, 0, 0]), metric="euclidean", progress=False)
        0.5
    """
    same, relevant_count = _relevance(query, query_labels, gallery, gallery_labels, 1, True, metric, backend, progress,
                                        ref_includes_query)
    return _r_precision(same, relevant_count)


def map_at_r(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    metric: str = "cosine",
    *,
    backend: str = "auto",
    progress: bool = False,
    ref_includes_query: bool = False,
) -> float:
    """MAP@R: mean over queries of the average precision over the R nearest, R = number of
    same-label gallery items (AccuracyCalculator's ``mean_average_precision_at_r``). Args as
    :func:`retrieval_metrics`.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
        >>> round(map_at_r(x, torch.tensor([0, 1, 0, 0]), metric="euclidean", progress=False), 4)
        0.3333
    """
    same, relevant_count = _relevance(query, query_labels, gallery, gallery_labels, 1, True, metric, backend, progress,
                                        ref_includes_query)
    return _map_at_r(same, relevant_count)
