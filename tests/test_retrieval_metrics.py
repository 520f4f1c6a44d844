"""Retrieval metrics: pytorch-metric-learning's AccuracyCalculator, hand-computed cases, bad input."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brute_force import exact_distances
from conftest import TEST_DEVICE, backends_to_test
from torchfg.metrics import RetrievalMetrics, map_at_r, precision_at_1, r_precision, recall_at_k, retrieval_metrics
from torchfg.metrics import retrieval as retrieval_module

PML_KEYS = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "map_at_r": "mean_average_precision_at_r",
}


def clustered(gen, num_items, num_classes, dim, spread=0.8):
    """Embeddings around class centres: non-trivial metrics, distinct distances."""
    labels = torch.randint(0, num_classes, (num_items,), generator=gen)
    centres = torch.randn(num_classes, dim, generator=gen)
    return centres[labels] + spread * torch.randn(num_items, dim, generator=gen), labels


def pml_accuracy(query, query_labels, gallery=None, gallery_labels=None):
    pytest.importorskip("faiss")
    calculator_module = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    calculator = calculator_module.AccuracyCalculator(
        include=tuple(PML_KEYS.values()), k=None, device=torch.device("cpu")
    )
    if gallery is None:
        return calculator.get_accuracy(query, query_labels)
    return calculator.get_accuracy(query, query_labels, gallery, gallery_labels)


@settings(max_examples=8)
@given(
    num_items=st.integers(3, 120),
    num_classes=st.integers(1, 25),
    dim=st.integers(2, 16),
    separate_gallery=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_pytorch_metric_learning(num_items, num_classes, dim, separate_gallery, seed):
    gen = torch.Generator().manual_seed(seed)
    num_queries = 1 + num_items // 3
    everything, all_labels = clustered(gen, num_items + num_queries, num_classes, dim)
    x, labels = everything[:num_items], all_labels[:num_items].clone()
    labels[0] = 10_000  # a lone item: no relevant item anywhere
    if separate_gallery:
        q, ql = everything[num_items:], all_labels[num_items:].clone()
        ql[0] = 20_000  # a query whose label is not in the gallery
        gallery, gallery_labels = x, labels
    else:
        q, ql, gallery, gallery_labels = x, labels, None, None
    expected = pml_accuracy(q, ql, gallery, gallery_labels)
    # PML searches with faiss IndexFlatL2: the Euclidean ranking. With normalised embeddings the
    # same ranking is the cosine one.
    ours = retrieval_metrics(q, ql, gallery, gallery_labels, metric="euclidean", progress=False)
    for key, pml_key in PML_KEYS.items():
        if math.isnan(expected[pml_key]):
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(expected[pml_key], abs=1e-12), key
    normalised_q = torch.nn.functional.normalize(q, dim=1)
    normalised_g = None if gallery is None else torch.nn.functional.normalize(gallery, dim=1)
    expected = pml_accuracy(normalised_q, ql, normalised_g, gallery_labels)
    ours = retrieval_metrics(q, ql, gallery, gallery_labels, metric="cosine", progress=False)
    for key, pml_key in PML_KEYS.items():
        if not math.isnan(expected[pml_key]):
            assert ours[key] == pytest.approx(expected[pml_key], abs=1e-12), key


def test_single_metric_functions_agree_with_retrieval_metrics():
    gen = torch.Generator().manual_seed(1)
    everything, all_labels = clustered(gen, 120, 12, 8)
    x, labels, q, ql = everything[:90], all_labels[:90], everything[90:], all_labels[90:]
    for gallery, gallery_labels, query, query_labels in ((None, None, x, labels), (x, labels, q, ql)):
        everything = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1, 3, 5), progress=False)
        assert recall_at_k(query, query_labels, gallery, gallery_labels, ks=(1, 3, 5), progress=False) == {
            k: everything[f"recall@{k}"] for k in (1, 3, 5)
        }
        p_at_1 = precision_at_1(query, query_labels, gallery, gallery_labels, progress=False)
        assert p_at_1 == everything["precision_at_1"]
        assert r_precision(query, query_labels, gallery, gallery_labels, progress=False) == everything["r_precision"]
        assert map_at_r(query, query_labels, gallery, gallery_labels, progress=False) == everything["map_at_r"]
        assert everything["recall@1"] == everything["precision_at_1"]
        # The fields are what the single-metric functions return, the mapping the flat PML keys.
        assert everything.recall == {k: everything[f"recall@{k}"] for k in (1, 3, 5)}
        assert everything.map_at_r == everything["map_at_r"] and everything.r_precision == everything["r_precision"]
        assert list(everything) == ["recall@1", "recall@3", "recall@5", "precision_at_1", "r_precision", "map_at_r"]
        assert everything == everything.as_dict() and len(everything) == 6


def test_ks_as_numpy_or_torch_integers():
    # A NumPy integer or array of ks (np.arange) was refused, unlike a NumPy n_shot in evaluate.
    import numpy as np

    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    labels = torch.tensor([0, 1, 0, 1])
    expected = recall_at_k(x, labels, ks=(1, 2), metric="euclidean", progress=False)
    for ks in (np.array([1, 2]), torch.tensor([1, 2]), [np.int64(1), np.int64(2)]):
        assert recall_at_k(x, labels, ks=ks, metric="euclidean", progress=False) == expected
    assert recall_at_k(x, labels, ks=np.int64(2), metric="euclidean", progress=False) == {2: expected[2]}
    with pytest.raises(TypeError, match="ks"):
        recall_at_k(x, labels, ks=np.array([1.5]), metric="euclidean", progress=False)


def test_retrieval_metrics_result_is_frozen_and_a_read_only_mapping():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    result = retrieval_metrics(x, torch.tensor([0, 1, 0, 1]), ks=(1, 2), metric="euclidean", progress=False)
    assert isinstance(result, RetrievalMetrics)
    assert result.recall == {1: 0.0, 2: 0.75}
    assert dict(result) == {"recall@1": 0.0, "recall@2": 0.75, "precision_at_1": 0.0,
                            "r_precision": result.r_precision, "map_at_r": result.map_at_r}
    with pytest.raises(KeyError):
        result["recall@4"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.map_at_r = 1.0
    with pytest.raises(TypeError):
        result["map_at_r"] = 1.0


def test_hand_computed_recall_and_map():
    # Points on a line; self-search with each query's own item excluded.
    #   item:   0    1    2    3    4     5
    #   x:      0    1    3    6   10    15
    #   label:  a    b    a    b    a     c (lone)
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0], [15.0]])
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    # Neighbours by Euclidean distance (ties to the lower index), R = other items of the label:
    #   q0 (0):  1 b, 2 a, 3 b, 4 a, 5 c       R=2
    #   q1 (1):  0 a, 2 a, 3 b, 4 a, 5 c       R=1
    #   q2 (3):  1 b, 0 a, 3 b, 4 a, 5 c       R=2  (0 and 3 tie at distance 3)
    #   q3 (6):  2 a, 4 a, 1 b, 0 a, 5 c       R=1
    #   q4 (10): 3 b, 5 c, 2 a, 1 b, 0 a       R=2
    #   q5: lone (no other c), left out
    # First relevant rank: q0 2, q1 3, q2 2, q3 3, q4 3.
    rec = recall_at_k(x, labels, ks=(1, 2, 3, 4, 10), metric="euclidean", progress=False)
    assert rec == {1: 0.0, 2: pytest.approx(2 / 5), 3: 1.0, 4: 1.0, 10: 1.0}
    # MAP@R: q0 and q2 hit at rank 2 of R=2: AP = (1/2) / 2; the others have no hit within R.
    assert map_at_r(x, labels, metric="euclidean", progress=False) == pytest.approx((0.25 + 0.25) / 5)
    assert r_precision(x, labels, metric="euclidean", progress=False) == pytest.approx((0.5 + 0.5) / 5)
    assert precision_at_1(x, labels, metric="euclidean", progress=False) == 0.0


def test_hand_computed_recall_with_separate_gallery():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    gallery_labels = torch.tensor([0, 1, 2, 3])
    query = torch.tensor([[0.9, 0.2], [0.1, -1.0], [-0.2, 0.9]])
    query_labels = torch.tensor([0, 1, 1])
    # Cosine ranks: q0 -> 0, 1, 3, 2 (label 0 first); q1 -> 3, 0, 2, 1 (label 1 last);
    # q2 -> 1, 2, 0, 3 (label 1 first).
    rec = recall_at_k(query, query_labels, gallery, gallery_labels, ks=(1, 3, 4), progress=False)
    assert rec == {1: pytest.approx(2 / 3), 3: pytest.approx(2 / 3), 4: 1.0}


def test_all_lone_queries_give_nan():
    x = torch.randn(5, 3)
    labels = torch.arange(5)
    out = retrieval_metrics(x, labels, progress=False)
    assert all(math.isnan(v) for v in out.values())


def brute_force_retrieval(x: torch.Tensor, labels: torch.Tensor, ks, metric: str) -> dict[str, float]:
    """Self-search metrics from a full fp64 distance matrix and a stable sort (ties: lower index).

    Independent of torchfg's k-NN and metric code: the definitions written out per query.
    """
    x, labels = x.double().cpu(), labels.cpu()
    n = len(x)
    dist = exact_distances(x, x, metric)
    dist.fill_diagonal_(float("inf"))
    recall = {k: 0.0 for k in ks}
    p1 = r_prec = ap = 0.0
    counted = 0
    for q in range(n):
        order = [j for j in torch.sort(dist[q], stable=True).indices.tolist() if j != q]
        rel = [bool(labels[j] == labels[q]) for j in order]
        r = sum(rel)
        if r == 0:
            continue  # lone query: left out, as AccuracyCalculator does
        counted += 1
        for k in ks:
            recall[k] += float(any(rel[:k]))
        p1 += float(rel[0])
        r_prec += sum(rel[:r]) / r
        hits, total = 0, 0.0
        for rank, is_rel in enumerate(rel[:r], start=1):
            if is_rel:
                hits += 1
                total += hits / rank
        ap += total / r
    out = {f"recall@{k}": recall[k] / counted for k in ks}
    out.update(precision_at_1=p1 / counted, r_precision=r_prec / counted, map_at_r=ap / counted)
    return out


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_backends_agree_with_brute_force(backend, metric):
    """Each backend (torch included) against the written-out definitions, not against another backend."""
    gen = torch.Generator().manual_seed(8)
    x, labels = clustered(gen, 45, 6, 10)
    labels[0] = 99  # one lone query
    expected = brute_force_retrieval(x, labels, (1, 2, 5), metric)
    x, labels = x.to(TEST_DEVICE), labels.to(TEST_DEVICE)
    ours = retrieval_metrics(x, labels, ks=(1, 2, 5), metric=metric, backend=backend, progress=False)
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_progress_bar_for_large_searches(monkeypatch, capsys):
    monkeypatch.setattr(retrieval_module, "_PROGRESS_MIN_PAIRS", 0)
    x = torch.randn(40, 4)
    labels = torch.randint(0, 4, (40,))
    retrieval_metrics(x, labels, progress=True)
    assert "k-NN search" in capsys.readouterr().err
    retrieval_metrics(x, labels, progress=False)
    assert "k-NN search" not in capsys.readouterr().err



def test_non_contiguous_labels_give_no_performance_warning():
    # torch.searchsorted warned "input value tensor is non-contiguous" (once per process: warn
    # always here so that the test does not depend on which test ran first).
    gen = torch.Generator().manual_seed(32)
    x, labels = clustered(gen, 30, 5, 4)
    strided = torch.stack([labels, labels], dim=1)[:, 0]
    assert not strided.is_contiguous()
    was_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = retrieval_metrics(x, strided, ks=(1, 2))
            separate = retrieval_metrics(x[:10], strided[:10], x[10:], strided[10:], ks=(1, 2))
    finally:
        torch.set_warn_always(was_always)
    assert result == retrieval_metrics(x, labels.clone(), ks=(1, 2))
    assert separate == retrieval_metrics(x[:10], labels[:10].clone(), x[10:], labels[10:].clone(), ks=(1, 2))

def test_bad_input():
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="query_labels"):
        recall_at_k(x, labels[:5])
    with pytest.raises(TypeError, match="query_labels"):
        recall_at_k(x, labels.float())
    with pytest.raises(ValueError, match="gallery_labels was given without gallery"):
        recall_at_k(x, labels, gallery_labels=labels)
    with pytest.raises(ValueError, match="without gallery_labels"):
        recall_at_k(x, labels, x)
    with pytest.raises(ValueError, match="gallery_labels"):
        recall_at_k(x, labels, x, labels[:2])
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(x, labels, ks=(0, 1))
    with pytest.raises(TypeError, match="ks"):
        recall_at_k(x, labels, ks=())
    with pytest.raises(TypeError, match="ks"):
        recall_at_k(x, labels, ks=(1.5,))
    with pytest.raises(TypeError, match="progress"):
        recall_at_k(x, labels, progress="yes")
    with pytest.raises(ValueError, match="metric"):
        recall_at_k(x, labels, metric="hamming")
    with pytest.raises(ValueError, match="query is empty"):
        recall_at_k(x[:0], labels[:0])
    with pytest.raises(ValueError, match="at least 2 items"):
        recall_at_k(x[:1], labels[:1])
    with pytest.raises(ValueError, match="query"):
        recall_at_k(torch.randn(6), labels)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        map_at_r(bad, labels)


@pytest.mark.parametrize("seed", range(3))
def test_ref_includes_query_equals_pytorch_metric_learning(seed):
    # Issue 18.4: the queries are the first Q items of a larger reference set.
    pytest.importorskip("faiss")
    calculator_module = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    gen = torch.Generator().manual_seed(seed)
    reference, reference_labels = clustered(gen, 90, 12, 6)
    reference_labels[0] = 10_000  # a query that is its label's only item: lone, left out
    q = 31
    calculator = calculator_module.AccuracyCalculator(include=tuple(PML_KEYS.values()), k=None, device=torch.device("cpu"))
    expected = calculator.get_accuracy(reference[:q], reference_labels[:q], reference, reference_labels, ref_includes_query=True)
    ours = retrieval_metrics(reference[:q], reference_labels[:q], reference, reference_labels, metric="euclidean",
                             progress=False, ref_includes_query=True)
    for key, pml_key in PML_KEYS.items():
        assert ours[key] == pytest.approx(expected[pml_key], abs=1e-12), key
    # The gallery=None self-search is the special case Q = G; without the flag the query's own
    # copy is found first and every answerable query scores precision@1 = 1.
    torch.testing.assert_close(
        torch.tensor(list(retrieval_metrics(reference, reference_labels, reference, reference_labels, metric="euclidean",
                                            progress=False, ref_includes_query=True).values())),
        torch.tensor(list(retrieval_metrics(reference, reference_labels, metric="euclidean", progress=False).values())),
    )
    assert precision_at_1(reference[:q], reference_labels[:q], reference, reference_labels, metric="euclidean",
                          progress=False) == 1.0
    assert map_at_r(reference[:q], reference_labels[:q], reference, reference_labels, metric="euclidean", progress=False,
                    ref_includes_query=True) == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-12)


def test_ref_includes_query_bad_input():
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="ref_includes_query"):
        retrieval_metrics(x, labels, x.flip(0), labels, progress=False, ref_includes_query=True)
    with pytest.raises(ValueError, match="ref_includes_query"):
        recall_at_k(x, labels, x[:3], labels[:3], progress=False, ref_includes_query=True)
    with pytest.raises(TypeError, match="ref_includes_query"):
        r_precision(x, labels, x, labels, progress=False, ref_includes_query=1)
