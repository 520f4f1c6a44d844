"""Triplet mining reference, dispatch, triplet_margin_loss and adaptive_triplet_loss.

* The chunked mining reference against a brute-force loop over exact fp64 distances (indices
  exactly on integer inputs, where every distance and tie is exact; selection keys otherwise).
* Every backend of ``mine_hardest`` against the reference (Triton through the interpreter on CPU).
* Losses against pytorch-metric-learning (loss and gradient), properties (hypothesis), reductions,
  degenerate batches, torch.compile, bad input.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from brute_force import cosine_matrix, exact_distances
from conftest import INTERPRETER_MAXNUM_OK, TEST_DEVICE, TRITON_OK, backends_to_test
from torchfg import functional as TF
from torchfg.backends import BackendUnavailableError
from torchfg.losses import AdaptiveTripletLoss, TripletMarginLoss
from torchfg.ops.triplet import mine_all_triplets, mine_hardest, mine_semi_hard
from torchfg.ops.triplet import reference as triplet_reference
from torchfg.ops.metric import METRICS
from torchfg.ops.triplet.reference import mine_hardest_reference

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402

TRITON_FILE = importlib.util.find_spec("torchfg.ops.triplet.triton") is not None


# ----------------------------------------------------------------------------- brute force


def brute_force_keys(anchors, candidates, al, cl, at, ct, *, metric, base_margin, margin_scale, threshold, self_offset):
    """Per (anchor, candidate), the positive key d, the negative key m - d and their validity, by loops."""
    dist = exact_distances(anchors, candidates, metric)
    n, m = dist.shape
    text_cos = cosine_matrix(at, ct) if at is not None else None
    pos_valid = torch.zeros(n, m, dtype=torch.bool)
    neg_valid = torch.zeros(n, m, dtype=torch.bool)
    neg_key = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            same = bool(al[i] == cl[j])
            pos_valid[i, j] = same and j != self_offset + i if self_offset >= 0 else same
            margin = base_margin
            ok = not same
            if text_cos is not None:
                margin = base_margin + margin_scale * (1.0 - float(text_cos[i, j])) / 2.0
                if threshold is not None and float(text_cos[i, j]) >= threshold:
                    ok = False
            neg_valid[i, j] = ok
            neg_key[i, j] = margin - float(dist[i, j])
    return dist, pos_valid, neg_key, neg_valid


def first_best(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row: argmax of key over valid entries, the lowest index on exact ties, -1 if none."""
    out = []
    for row_key, row_valid in zip(key.tolist(), valid.tolist()):
        best, best_j = -math.inf, -1
        for j, (k, ok) in enumerate(zip(row_key, row_valid)):
            if ok and (best_j < 0 or k > best):
                best, best_j = k, j
        out.append(best_j)
    return torch.tensor(out, dtype=torch.int64)


def assert_near_best(idx, key, valid, tol, name):
    """idx is -1 exactly where nothing is valid, else a valid index whose key is within tol of the best."""
    has = valid.any(1)
    assert torch.equal(idx == -1, ~has), f"{name}: {idx.tolist()} vs valid rows {has.tolist()}"
    rows = has.nonzero().squeeze(1)
    if rows.numel():
        chosen = idx[rows]
        assert valid[rows, chosen].all(), f"{name}: invalid choice"
        best = key.masked_fill(~valid, -math.inf).max(1).values[rows]
        assert (best - key[rows, chosen] <= tol).all(), f"{name}: worse than the best by {(best - key[rows, chosen]).max()}"


@st.composite
def mining_cases(draw, integer_data: bool):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(1, 23))
    mode = draw(st.sampled_from(["same", "slice", "disjoint"]))
    if mode == "same":
        m, offset = n, 0
    elif mode == "slice":
        extra = draw(st.integers(0, 9))
        m, offset = n + extra, draw(st.integers(0, extra))
    else:
        m, offset = draw(st.integers(1, 23)), -1
    d = draw(st.integers(1, 19))
    metric = draw(st.sampled_from(METRICS))
    if integer_data:
        # Small integers: squared distances and inner products are exact in fp64, ties are exact.
        if metric == "cosine":
            metric = "euclidean"
        candidates = torch.randint(-2, 3, (m, d), generator=gen).double()
    else:
        candidates = torch.randn(m, d, generator=gen, dtype=torch.float64)
    classes = draw(st.integers(1, 6))
    candidate_labels = torch.randint(0, classes, (m,), generator=gen)
    if offset >= 0:
        anchors, anchor_labels = candidates[offset : offset + n], candidate_labels[offset : offset + n]
    else:
        anchors = torch.randint(-2, 3, (n, d), generator=gen).double() if integer_data else torch.randn(n, d, generator=gen, dtype=torch.float64)
        anchor_labels = torch.randint(0, classes, (n,), generator=gen)
    use_text = draw(st.booleans())
    at = ct = None
    margin_scale, threshold = 0.0, None
    if use_text:
        width = draw(st.integers(1, 7))
        ct = torch.randn(m, width, generator=gen, dtype=torch.float64)
        ct[torch.rand(m, generator=gen) < 0.15] = 0.0  # zero rows: cosine 0
        at = ct[offset : offset + n] if offset >= 0 else torch.randn(n, width, generator=gen, dtype=torch.float64)
        # Integer data keeps constant margins so that keys (and ties) stay exact.
        margin_scale = 0.0 if integer_data else draw(st.sampled_from([0.0, 0.5, 3.0]))
        threshold = draw(st.sampled_from([None, 0.2017, 0.8513]))
    return dict(
        anchors=anchors, candidates=candidates, al=anchor_labels, cl=candidate_labels, at=at, ct=ct,
        metric=metric, base_margin=draw(st.sampled_from([0.0, 0.2])), margin_scale=margin_scale,
        threshold=threshold, self_offset=offset,
    )


def run_reference(case, **kwargs):
    return mine_hardest_reference(
        case["anchors"], case["candidates"], case["al"], case["cl"], case["at"], case["ct"],
        metric=case["metric"], base_margin=case["base_margin"], margin_scale=case["margin_scale"],
        text_positive_threshold=case["threshold"], self_offset=case["self_offset"], **kwargs,
    )


def brute_force(case):
    return brute_force_keys(
        case["anchors"], case["candidates"], case["al"], case["cl"], case["at"], case["ct"],
        metric=case["metric"], base_margin=case["base_margin"], margin_scale=case["margin_scale"],
        threshold=case["threshold"], self_offset=case["self_offset"],
    )


# ----------------------------------------------------------------------------- mining reference


@given(case=mining_cases(integer_data=True), sparse=st.sampled_from([None, True, False]), chunk=st.sampled_from([None, 1, 4]))
def test_reference_indices_equal_brute_force_on_exact_inputs(case, sparse, chunk):
    dist, pos_valid, neg_key, neg_valid = brute_force(case)
    pos, neg = run_reference(case, sparse_positives=sparse, chunk_rows=chunk)
    assert torch.equal(pos, first_best(dist, pos_valid))
    assert torch.equal(neg, first_best(neg_key, neg_valid))


@given(case=mining_cases(integer_data=False), sparse=st.sampled_from([None, True, False]), chunk=st.sampled_from([None, 3]))
def test_reference_selects_best_keys_on_random_inputs(case, sparse, chunk):
    dist, pos_valid, neg_key, neg_valid = brute_force(case)
    pos, neg = run_reference(case, sparse_positives=sparse, chunk_rows=chunk)
    assert_near_best(pos, dist, pos_valid, 1e-9, "positive")
    assert_near_best(neg, neg_key, neg_valid, 1e-9, "negative")


def test_reference_clamped_zero_distances_tie_to_lowest_index():
    # Duplicates of the anchor: the fast path's squared distances are ~0 (+-rounding) and clamp to 0.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g) * 30
    x = torch.cat([base, base, base, base + 100.0, base, base])
    labels = torch.tensor([0, 1, 1, 2, 1, 0])
    for sparse in (True, False):
        pos, neg = mine_hardest_reference(x, x, labels, labels, None, None, metric="euclidean", base_margin=0.2,
                                          margin_scale=0.0, text_positive_threshold=None, self_offset=0,
                                          sparse_positives=sparse)
        assert neg[0].item() == 1  # 1, 2, 4 are all at distance 0: lowest wins
        assert pos[1].item() == 2 and pos[2].item() == 1  # the positives of 1 at distance 0: 2 before 4
        assert neg[5].item() == 1


def _rounding_below_zero_case() -> tuple[float, float] | None:
    """(x, e) with e = ulp(x) in fp32 such that this BLAS's fast path gives a negative squared
    distance between x + e and x (D = 1) while giving exactly 0 between x and x."""
    for x in (3000.0, 3001.0, 5000.0, 6001.0, 1234.5, 777.25):
        e = torch.tensor(x).nextafter(torch.tensor(1e9)).item() - x
        for k in (1, 2, 3, 5):
            a, c = torch.tensor([[x]]), torch.tensor([[x + k * e], [x]])
            v = torch.addmm(torch.linalg.vecdot(c, c), a, c.T, alpha=-2.0) + torch.linalg.vecdot(a, a)[:, None]
            if v[0, 0] < 0 and v[0, 1] == 0:
                return x, k * e
    return None


@pytest.mark.parametrize("sparse", [True, False])
def test_reference_clamps_rounded_squared_distances_like_the_contract(sparse):
    # The fast path rounds |a|^2 + |b|^2 - 2 a.b below 0 for b = x + e but not for b = x. Both clamp
    # to 0, so the contract's tie rule picks the lowest index; an unclamped arg-reduction would
    # pick the other one (the exact distances agree with the contract here).
    case = _rounding_below_zero_case()
    if case is None:
        pytest.skip("this BLAS does not round the probe below zero")
    x, e = case
    anchors = torch.tensor([[x]])
    candidates = torch.tensor([[x + e], [x], [x], [x + e]])
    pos, neg = mine_hardest_reference(anchors, candidates, torch.tensor([0]), torch.tensor([0, 0, 1, 1]), None, None,
                                      metric="euclidean", base_margin=0.0, margin_scale=0.0,
                                      text_positive_threshold=None, self_offset=-1, sparse_positives=sparse,
                                      chunk_rows=1)
    assert pos.item() == 0 and neg.item() == 2


@st.composite
def labelled_integer_batches(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(1, 20))
    extra = draw(st.integers(0, 6))
    m = n + extra
    offset = draw(st.sampled_from([-1, 0, extra]))
    candidates = torch.randint(-2, 3, (m, draw(st.integers(1, 5))), generator=gen).double()
    cl = torch.randint(0, draw(st.integers(1, 5)), (m,), generator=gen)
    if offset >= 0:
        anchors, al = candidates[offset : offset + n], cl[offset : offset + n]
    else:
        anchors = torch.randint(-2, 3, (n, candidates.shape[1]), generator=gen).double()
        al = torch.randint(0, 5, (n,), generator=gen)
    return anchors, candidates, al, cl, offset


@pytest.mark.parametrize("semi_hard_path", ["per_pair", "sorted"])
@given(batch=labelled_integer_batches(), metric=st.sampled_from(["euclidean", "sqeuclidean", "dot"]))
def test_semi_hard_and_all_mining_equal_brute_force(semi_hard_path, batch, metric):
    # Semi-hard mining takes a pass per pair for few positives per anchor and sorts each
    # anchor's negatives for many: both paths, whatever the batch.
    threshold = triplet_reference._SEMI_HARD_SORT_PAIRS
    triplet_reference._SEMI_HARD_SORT_PAIRS = 10**9 if semi_hard_path == "per_pair" else -1
    try:
        _check_semi_hard_and_all_mining(batch, metric)
    finally:
        triplet_reference._SEMI_HARD_SORT_PAIRS = threshold


@pytest.mark.parametrize("semi_hard_path", ["per_pair", "sorted"])
def test_semi_hard_takes_a_farther_negative_at_infinite_distance(monkeypatch, semi_hard_path):
    """The only negative farther than the positive is at d = inf (its squares overflow fp32):
    the per-pair pass's argmin over an inf-filled row tied it with the fill and took column 0,
    the anchor itself."""
    monkeypatch.setattr(triplet_reference, "_SEMI_HARD_SORT_PAIRS", 10**9 if semi_hard_path == "per_pair" else -1)
    x = torch.tensor([[0.0], [1.0], [0.5], [1e20]])
    labels = torch.tensor([0, 0, 1, 1])
    a, p, n = mine_semi_hard(x[:1], x, labels[:1], labels, metric="euclidean", exclude_self=True)
    assert (a.tolist(), p.tolist(), n.tolist()) == ([0], [1], [3])


def _check_semi_hard_and_all_mining(batch, metric):
    anchors, candidates, al, cl, offset = batch
    dist = exact_distances(anchors, candidates, metric).tolist()
    expected_semi, expected_all = [], []
    for i in range(anchors.shape[0]):
        positives = [j for j in range(candidates.shape[0]) if cl[j] == al[i] and (offset < 0 or j != offset + i)]
        negatives = [j for j in range(candidates.shape[0]) if cl[j] != al[i]]
        for j in positives:
            expected_all += [(i, j, k) for k in negatives]
            if not negatives:
                continue
            farther = [k for k in negatives if dist[i][k] > dist[i][j]]
            if farther:
                k = min(farther, key=lambda k: (dist[i][k], k))
            else:
                k = min(negatives, key=lambda k: (-dist[i][k], k))
            expected_semi.append((i, j, k))
    self_rows = dict(exclude_self=offset >= 0, anchor_offset=max(offset, 0))
    semi = mine_semi_hard(anchors, candidates, al, cl, metric=metric, **self_rows)
    assert list(zip(*(t.tolist() for t in semi))) == expected_semi
    every = mine_all_triplets(al, cl, **self_rows)
    assert list(zip(*(t.tolist() for t in every))) == expected_all


def test_mine_hardest_example_and_validation():
    x = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
    labels = torch.tensor([0, 0, 1, 1])
    pos, neg = mine_hardest(x, x, labels, labels, exclude_self=True, backend="torch")
    assert pos.tolist() == [1, 0, 3, 2] and neg.tolist() == [2, 2, 1, 1]
    # Anchor 0 is its label's only candidate: without exclude_self it is its own positive, with it none.
    alone = torch.tensor([0, 1, 1, 1])
    assert mine_hardest(x[:1], x, alone[:1], alone, exclude_self=False, backend="torch")[0].tolist() == [0]
    assert mine_hardest(x[:1], x, alone[:1], alone, exclude_self=True, backend="torch")[0].tolist() == [-1]
    pos, _ = mine_hardest(x[2:], x, labels[2:], labels, exclude_self=True, anchor_offset=2, backend="torch")
    assert pos.tolist() == [3, 2]
    # Anchor i is candidate (anchor_offset + i) % M: from slot 3 the second anchor is candidate 0.
    wrapped = torch.tensor([3, 0])
    pos, neg = mine_hardest(x[wrapped], x, labels[wrapped], labels, exclude_self=True, anchor_offset=3, backend="torch")
    assert pos.tolist() == [2, 1] and neg.tolist() == [1, 2]
    with pytest.raises(ValueError, match="anchor_offset"):
        mine_hardest(x, x, labels, labels, exclude_self=True, anchor_offset=4)
    with pytest.raises(ValueError, match="candidates is anchors"):  # a rotation needs a separate tensor
        mine_hardest(x, x, labels, labels, exclude_self=True, anchor_offset=1)
    pos, _ = mine_hardest(x, x.clone(), labels, labels, exclude_self=True, anchor_offset=1, backend="torch")
    assert pos.tolist() == [0, 0, 2, 2]  # anchor i excludes candidate (1 + i) % 4, not itself
    with pytest.raises(ValueError, match="anchor_offset"):
        mine_hardest(torch.cat([x, x]), x, labels.repeat(2), labels, exclude_self=True)
    with pytest.raises(TypeError, match="exclude_self"):
        mine_hardest(x, x, labels, labels, exclude_self=0)
    with pytest.raises(ValueError, match="anchor_text and candidate_text"):
        mine_hardest(x, x, labels, labels, torch.randn(4, 3), None)
    with pytest.raises(ValueError, match="margin_scale"):
        mine_hardest(x, x, labels, labels, margin_scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        mine_hardest(x, x, labels, labels, backend="fast")
    with pytest.raises(TypeError, match="candidates"):
        mine_hardest(x, x.double(), labels, labels)
    with pytest.raises(BackendUnavailableError, match="not implemented"):  # mining has no csrc kernel
        mine_hardest(x, x, labels, labels, backend="cuda")


# ----------------------------------------------------------------------------- every backend


KERNEL_BACKENDS = [b for b in backends_to_test() if b != "torch"]  # compared with the reference


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(case=mining_cases(integer_data=True))
@settings(max_examples=6)
def test_backend_equals_reference_exact(backend, case):
    if backend == "triton" and not TRITON_FILE:
        pytest.skip("torchfg/ops/triplet/triton.py is not there yet")
    case = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    expected = run_reference(case)
    on_device = {k: (v.to(TEST_DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    got = mine_hardest(
        on_device["anchors"], on_device["candidates"], on_device["al"], on_device["cl"], on_device["at"],
        on_device["ct"], metric=case["metric"], base_margin=case["base_margin"], margin_scale=case["margin_scale"],
        text_positive_threshold=case["threshold"], exclude_self=case["self_offset"] >= 0,
        anchor_offset=max(case["self_offset"], 0), backend=backend,
    )
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])




@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_losses_equal_reference(backend, dtype):
    if backend == "triton" and not TRITON_FILE:
        pytest.skip("torchfg/ops/triplet/triton.py is not there yet")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 24, generator=g).to(TEST_DEVICE, dtype)
    labels = torch.randint(0, 7, (37,), generator=g).to(TEST_DEVICE)
    text = torch.randn(37, 10, generator=g).to(TEST_DEVICE)
    for loss_fn in (
        lambda b: TF.triplet_margin_loss(x, labels, margin=0.3, reduction="none", backend=b),
        lambda b: TF.adaptive_triplet_loss(x, labels, text, margin_scale=1.0, reduction="none", backend=b),
    ):
        torch.testing.assert_close(loss_fn(backend), loss_fn("torch"), atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-3)


@pytest.mark.parametrize("metric", METRICS)
def test_reference_batch_hard_loss_equals_brute_force(metric):
    # The reference (backend="torch") against explicit loops over fp64 distances, so that the
    # kernel-vs-reference test above compares with something independently checked.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(31, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (31,), generator=g)
    labels[0] = 77  # no positive
    ours = TF.triplet_margin_loss(x, labels, margin=0.25, metric=metric, reduction="none", backend="torch")
    dist = exact_distances(x, x, metric)
    expected = torch.zeros(31, dtype=torch.float64)
    for i in range(31):
        positives = [j for j in range(31) if j != i and labels[j] == labels[i]]
        negatives = [j for j in range(31) if labels[j] != labels[i]]
        if positives and negatives:
            hardest = max(float(dist[i, j]) for j in positives) - min(float(dist[i, j]) for j in negatives)
            expected[i] = max(hardest + 0.25, 0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert ours[0].item() == 0.0


# ----------------------------------------------------------------------------- against pytorch-metric-learning


def pml_batch_hard(x, labels, margin, reducer, ref=None, ref_labels=None, smooth=False):
    distance = pml_distances.LpDistance(normalize_embeddings=False)
    miner = pml_miners.BatchHardMiner(distance=distance)
    loss_fn = pml_losses.TripletMarginLoss(margin=margin, distance=distance, reducer=reducer, smooth_loss=smooth)
    if ref is None:
        return loss_fn(x, labels, miner(x, labels))
    return loss_fn(x, labels, miner(x, labels, ref, ref_labels), ref, ref_labels)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("smooth", [False, True])
def test_batch_hard_matches_pml_loss_and_gradient(seed, smooth):
    g = torch.Generator().manual_seed(seed)
    n = [29, 64, 97, 130][seed]
    x = torch.randn(n, 33, generator=g, dtype=torch.float64)
    labels = torch.randint(0, max(n // 5, 2), (n,), generator=g)
    x1 = x.clone().requires_grad_(True)
    ours = TF.triplet_margin_loss(x1, labels, margin=0.2, smooth=smooth, backend="torch")
    ours.backward()
    x2 = x.clone().requires_grad_(True)
    theirs = pml_batch_hard(x2, labels, 0.2, pml_reducers.MeanReducer(), smooth=smooth)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=1e-8)


def test_batch_hard_mean_nonzero_matches_pml_default_reducer():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(80, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 12, (80,), generator=g)
    ours = TF.triplet_margin_loss(x, labels, margin=0.5, reduction="mean_nonzero")
    theirs = pml_batch_hard(x, labels, 0.5, pml_reducers.AvgNonZeroReducer())
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


def test_cross_batch_reference_set_matches_pml():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(21, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(45, 12, generator=g, dtype=torch.float64, requires_grad=True)
    labels, ref_labels = torch.randint(0, 6, (21,), generator=g), torch.randint(0, 6, (45,), generator=g)
    ours = TF.triplet_margin_loss(x, labels, margin=0.3, ref_embeddings=ref, ref_labels=ref_labels)
    theirs = pml_batch_hard(x, labels, 0.3, pml_reducers.MeanReducer(), ref, ref_labels)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (x, ref)), torch.autograd.grad(theirs, (x, ref))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mining", ["batch_hard", "all"])
def test_the_batch_as_its_own_reference_set_is_a_self_search_like_pml(mining):
    """ref_embeddings is embeddings and ref_labels is labels (the same objects): PML then drops the
    (i, i) pairs, as without a reference set; a copy of the batch stays a separate reference set."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (16,), generator=g)
    plain = TF.triplet_margin_loss(x, labels, mining=mining)
    same = TF.triplet_margin_loss(x, labels, mining=mining, ref_embeddings=x, ref_labels=labels)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    pml_loss = pml_losses.TripletMarginLoss(margin=0.2, distance=pml_distances.LpDistance(normalize_embeddings=False),
                                            reducer=pml_reducers.MeanReducer())
    if mining == "all":
        torch.testing.assert_close(same, pml_loss(x, labels, ref_emb=x, ref_labels=labels))
        # A copy is another reference set: its (i, i) positives at distance 0 change the mean.
        copy = TF.triplet_margin_loss(x, labels, mining=mining, ref_embeddings=x.clone(), ref_labels=labels.clone())
        assert not torch.allclose(copy, plain)


@pytest.mark.parametrize("smooth", [False, True])
def test_all_mining_keeps_nan_triplets(smooth):
    """A NaN embedding makes the all-triplets loss NaN (as batch-hard's, and PML's), instead of its
    triplets silently failing the margin test."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x[0, 0] = float("nan")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for reduction in ("mean", "sum", "mean_nonzero"):
        assert TF.triplet_margin_loss(x, labels, mining="all", smooth=smooth, reduction=reduction).isnan(), reduction
    per_triplet = TF.triplet_margin_loss(x, labels, mining="all", smooth=smooth, reduction="none")
    assert per_triplet.isnan().any() and not per_triplet[~per_triplet.isnan()].isnan().any()
    finite = TF.triplet_margin_loss(x[2:], labels[2:], mining="all", smooth=smooth)  # without the NaN row
    assert finite.isfinite()


@pytest.mark.parametrize("reducer,reduction", [(pml_reducers.MeanReducer, "mean"), (pml_reducers.AvgNonZeroReducer, "mean_nonzero")])
def test_all_triplets_match_pml(reducer, reduction):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(31, 9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (31,), generator=g)
    ours = TF.triplet_margin_loss(x, labels, margin=0.4, mining="all", reduction=reduction)
    loss_fn = pml_losses.TripletMarginLoss(
        margin=0.4, distance=pml_distances.LpDistance(normalize_embeddings=False), reducer=reducer()
    )
    theirs = loss_fn(x, labels)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])
    # Same triplets in the same (lexicographic) order as PML's all-triplets enumeration.
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    for a, b in zip(TF.mine_triplets(x, labels, strategy="all"), lmu.get_all_triplets_indices(labels)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", range(3))
def test_semi_hard_selection_agrees_with_pml_semihard_miner(seed):
    """PML's semihard set for (a, p) is {n : d(a,p) < d(a,n) <= d(a,p) + margin}. FaceNet (ours) takes
    the closest negative farther than p; so where PML's set is non-empty ours is its closest member,
    and where it is empty ours lies beyond the margin or, if no negative is farther, is the farthest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(57, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (57,), generator=g)
    margin = 0.5
    miner = pml_miners.TripletMarginMiner(
        margin=margin, type_of_triplets="semihard", distance=pml_distances.LpDistance(normalize_embeddings=False)
    )
    pa, pp, pn = miner(x, labels)
    a, p, n = TF.mine_triplets(x, labels, strategy="semi_hard")
    dist = exact_distances(x, x, "euclidean")
    same = labels[:, None] == labels[None, :]
    ours = {(i, j): k for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())}
    expected_pairs = {(i, j) for i in range(57) for j in range(57) if i != j and same[i, j] and (~same[i]).any()}
    assert set(ours) == expected_pairs
    pml_sets: dict[tuple[int, int], list[int]] = {}
    for i, j, k in zip(pa.tolist(), pp.tolist(), pn.tolist()):
        pml_sets.setdefault((i, j), []).append(k)
    checked = 0
    for (i, j), k in ours.items():
        assert not same[i, k]
        if (i, j) in pml_sets:
            assert k in pml_sets[(i, j)]
            assert dist[i, k] == min(dist[i, c] for c in pml_sets[(i, j)])
            checked += 1
        else:
            farther = dist[i][~same[i]] > dist[i, j]
            if farther.any():
                assert dist[i, k] > dist[i, j] + margin
            else:
                assert dist[i, k] == dist[i][~same[i]].max()
    assert checked > 0


def test_semi_hard_loss_uses_mined_triplets():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (40,), generator=g)
    a, p, n = TF.mine_triplets(x, labels, strategy="semi_hard")
    per_triplet = TF.triplet_margin_loss(x, labels, margin=0.2, mining="semi_hard", reduction="none")
    d = exact_distances(x.detach(), x.detach(), "euclidean")
    torch.testing.assert_close(per_triplet.detach(), F.relu(d[a, p] - d[a, n] + 0.2))
    # Gradient equals autograd through explicit differences of the same triplets.
    x2 = x.detach().clone().requires_grad_(True)
    manual = F.relu((x2[a] - x2[p]).norm(dim=1) - (x2[a] - x2[n]).norm(dim=1) + 0.2).mean()
    ours = TF.triplet_margin_loss(x, labels, margin=0.2, mining="semi_hard")
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(manual, x2)[0])


# ----------------------------------------------------------------------------- properties


@st.composite
def batches(draw, max_n=40):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(2, max_n))
    x = torch.randn(n, draw(st.integers(1, 12)), generator=gen, dtype=torch.float64)
    labels = torch.randint(0, draw(st.integers(1, 8)), (n,), generator=gen)
    return x, labels, gen


LOSS_KWARGS = st.sampled_from([
    dict(mining="batch_hard"),
    dict(mining="batch_hard", smooth=True, metric="sqeuclidean"),
    dict(mining="batch_hard", metric="cosine"),
    dict(mining="semi_hard"),
    dict(mining="all", metric="dot"),
])


@given(batch=batches(), kwargs=LOSS_KWARGS, reduction=st.sampled_from(["mean", "sum", "mean_nonzero"]))
def test_invariant_to_batch_permutation_and_relabelling(batch, kwargs, reduction):
    x, labels, gen = batch
    loss = TF.triplet_margin_loss(x, labels, reduction=reduction, **kwargs)
    perm = torch.randperm(x.shape[0], generator=gen)
    torch.testing.assert_close(TF.triplet_margin_loss(x[perm], labels[perm], reduction=reduction, **kwargs), loss)
    relabel = torch.randperm(20, generator=gen) * 7 - 50  # a bijection onto other (also negative) values
    torch.testing.assert_close(TF.triplet_margin_loss(x, relabel[labels], reduction=reduction, **kwargs), loss)


@given(batch=batches(), kwargs=LOSS_KWARGS)
def test_duplicate_embeddings_give_finite_gradients(batch, kwargs):
    x, labels, gen = batch
    # Every row appears twice (zero distances between the copies, same or different labels).
    x = torch.cat([x, x]).requires_grad_(True)
    labels = torch.cat([labels, torch.randint(0, 3, labels.shape, generator=gen)])
    loss = TF.triplet_margin_loss(x, labels, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_all_identical_embeddings_give_zero_gradient_not_nan():
    x = torch.ones(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = TF.triplet_margin_loss(x, labels, margin=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.1)
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["distinct", "single"])
@pytest.mark.parametrize("kwargs", [dict(mining="batch_hard"), dict(mining="semi_hard"), dict(mining="all"),
                                    dict(mining="batch_hard", reduction="mean_nonzero", smooth=True)])
def test_batches_without_triplets_give_zero_and_zero_gradient(kind, kwargs):
    x = torch.randn(9, 5, requires_grad=True)
    labels = torch.arange(9) if kind == "distinct" else torch.full((9,), 4)
    loss = TF.triplet_margin_loss(x, labels, **kwargs)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    atl = TF.adaptive_triplet_loss(x, labels, torch.randn(9, 3))
    atl.backward()
    assert atl.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(n):
    x = torch.randn(n, 4, requires_grad=True)
    labels = torch.zeros(n, dtype=torch.int64)
    loss = TF.triplet_margin_loss(x, labels)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == x.shape
    assert TF.triplet_margin_loss(x, labels, reduction="none").shape == (n,)
    assert all(t.numel() == 0 for t in TF.mine_triplets(x, labels))


@given(batch=batches(), base_margin=st.sampled_from([0.0, 0.1, 0.7]))
@settings(max_examples=10)
def test_atl_with_zero_margin_scale_is_batch_hard(batch, base_margin):
    x, labels, gen = batch
    x = x.requires_grad_(True)
    text = torch.randn(x.shape[0], 5, generator=gen, dtype=torch.float64)
    for metric in ("euclidean", "cosine"):
        atl = TF.adaptive_triplet_loss(x, labels, text, base_margin=base_margin, margin_scale=0.0, metric=metric)
        bh = TF.triplet_margin_loss(x, labels, margin=base_margin, metric=metric)
        torch.testing.assert_close(atl, bh)
        torch.testing.assert_close(torch.autograd.grad(atl, x)[0], torch.autograd.grad(bh, x)[0])


@given(batch=batches(max_n=25), margin_scale=st.sampled_from([0.5, 2.0, 10.0]),
       threshold=st.sampled_from([None, 0.3017]), metric=st.sampled_from(["euclidean", "cosine"]))
def test_atl_margin_aware_negative_equals_brute_force_loop(batch, margin_scale, threshold, metric):
    x, labels, gen = batch
    n = x.shape[0]
    text = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    base = 0.1
    a, p, neg = TF.mine_triplets(x, labels, metric=metric, text_embeddings=text, base_margin=base,
                                 margin_scale=margin_scale, text_positive_threshold=threshold)
    dist = exact_distances(x, x, metric)
    cos = cosine_matrix(text, text)
    chosen = {i: (pj, nj) for i, pj, nj in zip(a.tolist(), p.tolist(), neg.tolist())}
    has_triplet = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        negatives = [j for j in range(n) if labels[j] != labels[i] and (threshold is None or cos[i, j] < threshold)]
        if not (positives and negatives):
            continue
        has_triplet.append(i)
        pj, nj = chosen[i]
        scores = {j: base + margin_scale * (1 - float(cos[i, j])) / 2 - float(dist[i, j]) for j in negatives}
        best_negative = max(negatives, key=lambda j: (scores[j], -j))
        # Exact choice, except on near-ties that fp64 rounding may order either way.
        assert nj == best_negative or (nj in scores and scores[best_negative] - scores[nj] < 1e-12)
        assert pj in positives and float(dist[i, pj]) > max(float(dist[i, j]) for j in positives) - 1e-12
    assert sorted(chosen) == has_triplet
    # The loss uses that negative and its margin.
    x1 = x.clone().requires_grad_(True)
    loss = TF.adaptive_triplet_loss(x1, labels, text, base_margin=base, margin_scale=margin_scale, metric=metric,
                                    text_positive_threshold=threshold, reduction="none")
    manual = torch.zeros(n, dtype=torch.float64)
    for i, (pj, nj) in chosen.items():
        m = base + margin_scale * (1 - cos[i, nj]) / 2
        manual[i] = max(float(dist[i, pj] - dist[i, nj] + m), 0.0)
    torch.testing.assert_close(loss.detach(), manual)


def test_atl_loss_dtype_follows_embeddings_not_text():
    x = torch.randn(12, 5, requires_grad=True)
    labels = torch.arange(12) // 3
    loss = TF.adaptive_triplet_loss(x, labels, torch.randn(12, 4, dtype=torch.float64), reduction="none")
    assert loss.dtype == torch.float32


def test_atl_margin_grows_with_text_distance():
    # Anchor 0 with positive 1; negatives 2 (near, same description) and 3 (farther, opposite description).
    x = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 1.2]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    _, _, neg = TF.mine_triplets(x, labels, text_embeddings=text, base_margin=0.0, margin_scale=1.0)
    assert neg[0].item() == 3  # m - d: 1 - 1.2 > 0 - 1.0
    _, _, neg = TF.mine_triplets(x, labels, text_embeddings=text, base_margin=0.0, margin_scale=1.0,
                                 text_positive_threshold=None)
    loss = TF.adaptive_triplet_loss(x, labels, text, base_margin=0.0, margin_scale=1.0, reduction="none")
    assert loss[0].item() == pytest.approx(0.5 - 1.2 + 1.0)
    # A near-duplicate description is never a negative.
    _, _, neg = TF.mine_triplets(x, labels, text_embeddings=text, base_margin=0.0, margin_scale=0.0,
                                 text_positive_threshold=0.9)
    assert neg[0].item() == 3


# ----------------------------------------------------------------------------- reductions, dtypes


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
@pytest.mark.parametrize("smooth", [False, True])
def test_reductions_are_consistent(mining, smooth):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (33,), generator=g)
    labels[0] = 99  # an anchor without positive
    kw = dict(margin=0.3, mining=mining, smooth=smooth)
    per = TF.triplet_margin_loss(x, labels, reduction="none", **kw)
    a, p, n = TF.mine_triplets(x, labels, strategy=mining)
    d = exact_distances(x, x, "euclidean")
    values = d[a, p] - d[a, n] + 0.3
    values = F.softplus(values) if smooth else F.relu(values)
    if mining == "batch_hard":
        assert per.shape == (33,) and per[0].item() == 0.0
        torch.testing.assert_close(per[a], values)
        count = a.numel()
    else:
        torch.testing.assert_close(per, values)
        count = per.numel()
    torch.testing.assert_close(TF.triplet_margin_loss(x, labels, reduction="sum", **kw), values.sum())
    torch.testing.assert_close(TF.triplet_margin_loss(x, labels, reduction="mean", **kw), values.sum() / count)
    nonzero = max(int((values > 0).sum()), 1)
    torch.testing.assert_close(TF.triplet_margin_loss(x, labels, reduction="mean_nonzero", **kw), values.sum() / nonzero)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(45, 32, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 9, (45,), generator=g)
    loss = TF.triplet_margin_loss(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    x32 = x.detach().float().requires_grad_(True)
    ref = TF.triplet_margin_loss(x32, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)  # same rows, same selection, fp32 math
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=1e-2, rtol=1e-2)


def test_mining_chunk_size_does_not_change_the_result(monkeypatch):
    import torchfg.ops.triplet.reference as reference

    g = torch.Generator().manual_seed(3)
    x = torch.randn(70, 6, generator=g)
    labels = torch.randint(0, 9, (70,), generator=g)
    text = torch.randn(70, 3, generator=g)
    expected = [TF.mine_triplets(x, labels), TF.mine_triplets(x, labels, text_embeddings=text)]
    monkeypatch.setattr(reference, "MAX_CHUNK_ROWS", 7)  # 10 chunks of anchors
    got = [TF.mine_triplets(x, labels), TF.mine_triplets(x, labels, text_embeddings=text)]
    for e, o in zip(expected, got):
        assert all(torch.equal(a, b) for a, b in zip(e, o))


def test_modules_match_functional():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 4, (20,), generator=g)
    text = torch.randn(20, 6, generator=g)
    module = TripletMarginLoss(margin=0.3, mining="semi_hard", reduction="sum", smooth=True)
    assert torch.equal(module(x, labels), TF.triplet_margin_loss(x, labels, margin=0.3, mining="semi_hard",
                                                                reduction="sum", smooth=True))
    atl = AdaptiveTripletLoss(base_margin=0.2, margin_scale=0.8, text_positive_threshold=0.9)
    assert torch.equal(atl(x, labels, text), TF.adaptive_triplet_loss(x, labels, text, base_margin=0.2,
                                                                       margin_scale=0.8, text_positive_threshold=0.9))
    assert "margin=0.3" in repr(module)


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(24, 8, generator=g)
    labels = torch.randint(0, 5, (24,), generator=g)
    text = torch.randn(24, 4, generator=g)

    def step(x, labels, text):
        return (TF.triplet_margin_loss(x, labels, backend="torch")
                + TF.adaptive_triplet_loss(x, labels, text, margin_scale=0.5, backend="torch"))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = compiled(x1, labels, text)
    out.backward()
    expected = step(x2, labels, text)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("case", ["batch_hard", "batch_hard/no anchors", "semi_hard", "all", "indices_tuple"])
@pytest.mark.parametrize("backend", backends_to_test())
def test_no_triplet_gives_a_zero_gradient_to_a_trainable_reference_set(case, backend):
    """Frozen anchors against a trainable reference set (a gallery encoder), and no valid triplet:
    the zero loss must still backward(). It had no grad_fn (the fallbacks reached the anchors only)."""
    if backend == "triton" and case in ("semi_hard", "all"):
        pytest.skip("semi_hard and all mining have the torch reference only")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 4, generator=g).to(TEST_DEVICE)
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device=TEST_DEVICE)
    ref = torch.randn(8, 4, generator=g).to(TEST_DEVICE).requires_grad_()
    ref_labels = torch.full((8,), 9, device=TEST_DEVICE)  # no positive for any anchor
    mining = case.split("/")[0] if case != "indices_tuple" else "batch_hard"
    if case == "batch_hard/no anchors":
        x, labels = x[:0], labels[:0]
    kwargs = dict(mining=mining, ref_embeddings=ref, ref_labels=ref_labels, backend=backend)
    if case == "indices_tuple":
        kwargs["indices_tuple"] = (torch.empty(0, dtype=torch.int64, device=TEST_DEVICE),) * 3
    loss = TF.triplet_margin_loss(x, labels, **kwargs)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(ref.grad, torch.zeros_like(ref))


def test_torch_compile_fullgraph_dynamic_modules():
    """Under dynamic=True a module's float margin reaches the argument checks as a SymFloat, which
    math.isfinite cannot trace: fullgraph failed ("torch.* op returned non-Tensor")."""
    from torchfg.losses import AdaptiveTripletLoss, TripletMarginLoss

    g = torch.Generator().manual_seed(7)
    x = torch.randn(24, 8, generator=g)
    labels = torch.randint(0, 5, (24,), generator=g)
    text = torch.randn(24, 4, generator=g)
    triplet = TripletMarginLoss(margin=0.3, backend="torch")
    adaptive = AdaptiveTripletLoss(base_margin=0.1, margin_scale=0.5, text_positive_threshold=0.9, backend="torch")

    def step(x, labels, text):
        return triplet(x, labels) + adaptive(x, labels, text)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (24, 17):  # a second batch size reuses the dynamic graph
        x1, x2 = x[:n].clone().requires_grad_(True), x[:n].clone().requires_grad_(True)
        out = compiled(x1, labels[:n], text[:n])
        out.backward()
        expected = step(x2, labels[:n], text[:n])
        expected.backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x1.grad, x2.grad)


# ----------------------------------------------------------------------------- bad input


BAD_CALLS = [
    (lambda x, y: TF.triplet_margin_loss(x[0], y), ValueError, "embeddings"),
    (lambda x, y: TF.triplet_margin_loss(x.long(), y), TypeError, "embeddings"),
    (lambda x, y: TF.triplet_margin_loss(x, y.float()), TypeError, "labels"),
    (lambda x, y: TF.triplet_margin_loss(x, y[:-1]), ValueError, "labels"),
    (lambda x, y: TF.triplet_margin_loss(x, y, margin=float("inf")), ValueError, "margin"),
    (lambda x, y: TF.triplet_margin_loss(x, y, margin=float("nan")), ValueError, "margin"),
    # Finite in fp64 but inf in fp32 arithmetic (and in a kernel's fp32 scalar).
    (lambda x, y: TF.triplet_margin_loss(x, y, margin=1e39), ValueError, "margin"),
    (lambda x, y: TF.adaptive_triplet_loss(x, y, x, margin_scale=1e39), ValueError, "margin_scale"),
    (lambda x, y: TF.triplet_margin_loss(x, y, metric="l1"), ValueError, "metric"),
    (lambda x, y: TF.triplet_margin_loss(x, y, mining="hard"), ValueError, "mining"),
    (lambda x, y: TF.triplet_margin_loss(x, y, reduction="avg"), ValueError, "reduction"),
    (lambda x, y: TF.triplet_margin_loss(x, y, smooth=1), TypeError, "smooth"),
    (lambda x, y: TF.triplet_margin_loss(x, y, ref_embeddings=x), ValueError, "ref_labels"),
    (lambda x, y: TF.triplet_margin_loss(x, y, ref_embeddings=x.double(), ref_labels=y), TypeError, "ref_embeddings"),
    (lambda x, y: TF.triplet_margin_loss(x, y, ref_embeddings=x[:, :2], ref_labels=y), ValueError, "ref_embeddings"),
    (lambda x, y: TF.triplet_margin_loss(x, y, backend="gpu"), ValueError, "backend"),
    (lambda x, y: TF.triplet_margin_loss(x, y, mining="semi_hard", backend="gpu"), ValueError, "backend"),
    (lambda x, y: TF.adaptive_triplet_loss(x, y, x, backend=None), ValueError, "backend"),
    (lambda x, y: TF.triplet_margin_loss(x[:, :0], y), ValueError, "embeddings"),
    (lambda x, y: TF.adaptive_triplet_loss(x, y, x[:-1]), ValueError, "text_embeddings"),
    (lambda x, y: TF.adaptive_triplet_loss(x, y, x, margin_scale=-1), ValueError, "margin_scale"),
    (lambda x, y: TF.adaptive_triplet_loss(x, y, x, text_positive_threshold=1.5), ValueError, "text_positive_threshold"),
    (lambda x, y: TF.adaptive_triplet_loss(x, y, None), TypeError, "text_embeddings"),
    (lambda x, y: TF.mine_triplets(x, y, strategy="semi_hard", text_embeddings=x), ValueError, "strategy"),
    (lambda x, y: TF.mine_triplets(x, y, margin_scale=0.5), ValueError, "margin_scale"),
    (lambda x, y: TF.mine_triplets(x, y, strategy="random"), ValueError, "strategy"),
    (lambda x, y: TripletMarginLoss(margin=float("nan")), ValueError, "margin"),
    (lambda x, y: TF.triplet_margin_loss(x, y, mining="semi_hard", backend="triton"), BackendUnavailableError, "semi_hard"),
    (lambda x, y: TF.triplet_margin_loss(x, y, mining="all", backend="cuda"), BackendUnavailableError, "all"),
    (lambda x, y: TripletMarginLoss(mining="semi_hard", backend="triton"), BackendUnavailableError, "semi_hard"),
    (lambda x, y: TF.mine_triplets(x, y, strategy="semi_hard", backend="triton"), BackendUnavailableError, "semi_hard"),
    (lambda x, y: TF.triplet_margin_loss(x, y, (y, y)), ValueError, "indices_tuple"),
    (lambda x, y: TF.triplet_margin_loss(x, y, y), ValueError, "indices_tuple"),
    (lambda x, y: TF.triplet_margin_loss(x, y, (y, y, y.float())), TypeError, "negatives"),
    (lambda x, y: TF.triplet_margin_loss(x, y, (y, y, y[:-1])), ValueError, "equal lengths"),
    (lambda x, y: TF.triplet_margin_loss(x, y, (y, y + 5, y)), ValueError, "positives"),
    (lambda x, y: TF.triplet_margin_loss(x, y, (y - 1, y, y)), ValueError, "anchors"),
    (lambda x, y: TF.triplet_margin_loss(x, y, (y, y, y[:3], y)), ValueError, "anchors2"),
    (lambda x, y: TF.triplet_margin_loss(x, y, mining="all", triplets_per_anchor=0), ValueError, "triplets_per_anchor"),
    (lambda x, y: TF.triplet_margin_loss(x, y, triplets_per_anchor=3), ValueError, "triplets_per_anchor"),
    (lambda x, y: TF.triplet_margin_loss(x, y, mining="all", triplets_per_anchor="some"), TypeError, "triplets_per_anchor"),
    (lambda x, y: TF.triplet_margin_loss(x, y, swap=1), TypeError, "swap"),
    (lambda x, y: TF.adaptive_triplet_loss(x, y, x, (y, y)), ValueError, "indices_tuple"),
    (lambda x, y: AdaptiveTripletLoss(reduction="max"), ValueError, "reduction"),
]


@pytest.mark.parametrize("call,error,name", BAD_CALLS)
def test_bad_input_raises_naming_the_argument(call, error, name):
    x = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(error, match=name):
        call(x, y)


# ----------------------------------------------------------------------------- "all" mining, exactly (issue 18)


def _brute_all(x, labels, margin, metric, reduction, swap=False, smooth=False):
    """Every triplet by loops, distances by explicit differences (autograd through them)."""
    values = []
    n = x.shape[0]

    def dist(i, j):
        if metric == "cosine":
            return 1.0 - F.cosine_similarity(x[i], x[j], dim=0)
        if metric == "dot":
            return -(x[i] * x[j]).sum()
        sq = (x[i] - x[j]).square().sum()
        return sq.sqrt() if metric == "euclidean" else sq

    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for q in range(n):
                if labels[q] == labels[a]:
                    continue
                d_an = torch.minimum(dist(a, q), dist(p, q)) if swap else dist(a, q)
                v = dist(a, p) - d_an + margin
                values.append(F.softplus(v) if smooth else F.relu(v))
    v = torch.stack(values)
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    return v.sum() / (v > 0).sum().clamp_min(1)


def _pml_all(x, labels, margin, metric, reducer, swap=False, smooth=False, indices_tuple=None, ref=None, ref_labels=None):
    distance = pml_distances.LpDistance(normalize_embeddings=False, power=2 if metric == "sqeuclidean" else 1)
    loss_fn = pml_losses.TripletMarginLoss(margin=margin, distance=distance, reducer=reducer, swap=swap, smooth_loss=smooth)
    return loss_fn(x, labels, indices_tuple, ref, ref_labels)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _three_way(x64, labels, margin, metric, reduction, reducer):
    """(ours fp32, PML fp32, brute force fp64): (loss, grad) each."""
    out = []
    for who in ("ours", "pml", "brute"):
        x = x64.to(torch.float64 if who == "brute" else torch.float32).clone().requires_grad_(True)
        if who == "ours":
            loss = TF.triplet_margin_loss(x, labels, margin=margin, metric=metric, mining="all", reduction=reduction)
        elif who == "pml":
            loss = _pml_all(x, labels, margin, metric, reducer)
        else:
            loss = _brute_all(x, labels, margin, metric, reduction)
        out.append((loss.detach().double(), torch.autograd.grad(loss, x)[0].double()))
    return out


def test_all_mining_is_exact_for_close_unit_vectors():
    # Issue 18.1: 16 unit vectors 0.1 degree apart, margin 0.2. Before: gradient error 2.3e-3 vs
    # fp64 (expanded-form distances); PML and now torchfg: 6.5e-6 by this measure.
    angle = torch.arange(16, dtype=torch.float64) * math.radians(0.1)
    x = torch.stack([angle.cos(), angle.sin()], 1)
    labels = torch.arange(16) // 4
    (ol, og), (pl, pg), (bl, bg) = _three_way(x, labels, 0.2, "euclidean", "mean", pml_reducers.MeanReducer())
    assert abs(ol - bl).item() <= 1e-6 * bl.item() and abs(ol - pl).item() <= 1e-6 * pl.item()
    assert _rel(og, bg) <= max(1.5 * _rel(pg, bg), 1e-6) and _rel(og, bg) < 2e-5
    assert _rel(og, pg) <= 1e-6


def test_all_mining_margin_zero_mean_nonzero_like_pml_miner_test():
    # Issue 18.1, PML's own miner test flavour: unit vectors, margin 0, mean over non-zero.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    labels = torch.randint(0, 4, (32,), generator=g)
    (ol, og), (pl, pg), (bl, bg) = _three_way(x, labels, 0.0, "euclidean", "mean_nonzero", pml_reducers.AvgNonZeroReducer())
    assert abs(ol - bl).item() <= 1e-6 * bl.item() and abs(ol - pl).item() <= 1e-6 * pl.item()
    assert _rel(og, bg) <= 1e-6 and _rel(og, pg) <= 1e-6


def test_exact_zero_violation_is_not_counted():
    # Issue 18.2: triplet (1, 2, 0) has violation exactly 0 (sqeuclidean, margin 1). Before: 7.33.
    x = torch.tensor([[3, 0, 3], [1, -3, 0], [3, 1, -1], [2, -3, 2]], dtype=torch.float64)
    labels = torch.tensor([3, 1, 1, 0])
    (ol, og), (pl, pg), (bl, bg) = _three_way(x, labels, 1.0, "sqeuclidean", "mean_nonzero", pml_reducers.AvgNonZeroReducer())
    assert ol.item() == pl.item() == bl.item() == 11.0
    assert torch.equal(og, pg) and torch.equal(og, bg)
    per = TF.triplet_margin_loss(x.float(), labels, margin=1.0, metric="sqeuclidean", mining="all", reduction="none")
    a, p, n = TF.mine_triplets(x, labels, strategy="all")
    assert per[((a == 1) & (p == 2) & (n == 0)).nonzero().item()].item() == 0.0


@st.composite
def hard_for_the_fast_path(draw):
    """Batches where the expanded form is wrong: large offsets, near-duplicates, integer ties."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(2, 24))
    d = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["offset", "duplicates", "integers", "unit"]))
    if kind == "offset":
        x = 300.0 + torch.randn(n, d, generator=gen) * 1e-2
    elif kind == "duplicates":
        base = torch.randn(max(n // 3, 1), d, generator=gen) * 5
        x = base[torch.randint(0, base.shape[0], (n,), generator=gen)] + torch.randn(n, d, generator=gen) * 1e-4
    elif kind == "integers":
        x = torch.randint(-3, 4, (n, d), generator=gen).float()
    else:
        x = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    labels = torch.randint(0, draw(st.integers(2, 5)), (n,), generator=gen)
    margin = draw(st.sampled_from([0.0, 1e-3, 0.2, 1.0, -0.1]))
    return x, labels, margin, draw(st.sampled_from(METRICS))


@given(case=hard_for_the_fast_path(), smooth=st.booleans())
@settings(max_examples=25, deadline=None)
def test_all_mining_never_drops_or_adds_a_triplet(case, smooth):
    # The band selection against the full list: every triplet's loss from exact fp32 pair distances.
    x, labels, margin, metric = case
    a, p, n = TF.mine_triplets(x, labels, strategy="all")
    from torchfg.ops.pair_distances import pair_distances

    v = pair_distances(x, a, p, metric=metric) - pair_distances(x, a, n, metric=metric) + margin
    full = F.softplus(v) if smooth else F.relu(v)
    per = TF.triplet_margin_loss(x, labels, margin=margin, metric=metric, mining="all", reduction="none", smooth=smooth)
    assert per.shape == full.shape
    torch.testing.assert_close(per, full, rtol=0, atol=0)
    expected = full.sum() / (full > 0).sum().clamp_min(1)
    got = TF.triplet_margin_loss(x, labels, margin=margin, metric=metric, mining="all", reduction="mean_nonzero", smooth=smooth)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_all_mining_streams_in_chunks(monkeypatch):
    import torchfg.functional._triplet_selection as selection

    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (40,), generator=g)
    expected = TF.triplet_margin_loss(x, labels, mining="all", reduction="none", swap=True)
    grad = torch.autograd.grad(expected.sum(), x)[0]
    monkeypatch.setattr(selection, "BLOCK_ELEMENTS", 64)  # one anchor / one pair per chunk
    got = TF.triplet_margin_loss(x, labels, mining="all", reduction="none", swap=True)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], grad)


# ----------------------------------------------------------------------------- PML's options (issue 17.2, 18.4)


@pytest.mark.parametrize("reduction,reducer", [("mean", pml_reducers.MeanReducer), ("mean_nonzero", pml_reducers.AvgNonZeroReducer)])
def test_indices_tuple_equals_own_mining_and_pml(reduction, reducer):
    from torchfg.miners import BatchHardMiner

    g = torch.Generator().manual_seed(21)
    emb = torch.randn(48, 12, generator=g, requires_grad=True)
    labels = torch.randint(0, 8, (48,), generator=g)
    loss_fn = TripletMarginLoss(reduction=reduction)
    tuple_loss = loss_fn(emb, labels, indices_tuple=BatchHardMiner()(emb, labels))
    own = loss_fn(emb, labels)
    torch.testing.assert_close(tuple_loss, own, rtol=0, atol=0)
    triplets = BatchHardMiner()(emb, labels)
    theirs = _pml_all(emb, labels, 0.2, "euclidean", reducer(), indices_tuple=triplets)
    torch.testing.assert_close(tuple_loss, theirs)
    torch.testing.assert_close(torch.autograd.grad(tuple_loss, emb)[0], torch.autograd.grad(theirs, emb)[0])


def test_pair_tuple_and_reference_set_follow_pml():
    g = torch.Generator().manual_seed(22)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(33, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels, ref_labels = torch.randint(0, 4, (20,), generator=g), torch.randint(0, 4, (33,), generator=g)
    pairs = pml_miners.PairMarginMiner(pos_margin=0.5, neg_margin=3.0)(x, labels, ref, ref_labels)
    assert all(t.numel() for t in pairs)
    ours = TF.triplet_margin_loss(x, labels, pairs, margin=0.3, ref_embeddings=ref, ref_labels=ref_labels,
                                  reduction="mean_nonzero")
    theirs = _pml_all(x, labels, 0.3, "euclidean", pml_reducers.AvgNonZeroReducer(), indices_tuple=pairs, ref=ref,
                      ref_labels=ref_labels)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (x, ref)), torch.autograd.grad(theirs, (x, ref))):
        torch.testing.assert_close(a, b)


def test_pair_tuple_conversion_is_linear_in_the_triplets():
    """PML pairs (a1, p, a2, n) become the triplets (a1[i], p[i], n[j]) for every a1[i] == a2[j],
    in i-then-j order, as PML's mask does; without the (|a1|, |a2|) mask, which for every pair of
    a 24 x 8 batch is 190 times the triplets (3 GiB for 0.1 GiB of triplets at N = 768)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from torchfg.functional.triplet import _check_indices_tuple

    g = torch.Generator().manual_seed(24)
    for _ in range(200):
        n1, n2, top = (int(v) for v in torch.randint(0, 30, (3,), generator=g))
        a1, a2 = torch.randint(0, top + 1, (n1,), generator=g), torch.randint(0, top + 1, (n2,), generator=g)
        p, n = torch.randint(0, 50, (n1,), generator=g), torch.randint(0, 50, (n2,), generator=g)
        i, j = torch.where(a1[:, None] == a2[None, :])
        got = _check_indices_tuple((a1, p, a2, n), 31, 50, torch.device("cpu"))
        for x, y in zip(got, (a1[i], p[i], n[j])):
            assert torch.equal(x, y), (a1, a2)

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for leaf in torch.utils._pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    Largest.largest = max(Largest.largest, leaf.numel())
            return out

    # Columns of (M, 2) pair lists, as a user builds them: strided. (The conversion makes them
    # contiguous for searchsorted, whose warning about strided values comes once per process, so
    # it is not asserted here.)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    same = labels[:, None] == labels[None, :]
    pos, neg = (same & ~torch.eye(8, dtype=torch.bool)).nonzero(), (~same).nonzero()
    got = _check_indices_tuple((pos[:, 0], pos[:, 1], neg[:, 0], neg[:, 1]), 8, 8, torch.device("cpu"))
    i, j = torch.where(pos[:, 0, None] == neg[None, :, 0])
    assert all(torch.equal(x, y) for x, y in zip(got, (pos[i, 0], pos[i, 1], neg[j, 1])))

    labels = torch.arange(24).repeat_interleave(8)
    same = labels[:, None] == labels[None, :]
    a2, n = (~same).nonzero(as_tuple=True)
    same.fill_diagonal_(False)
    a1, p = same.nonzero(as_tuple=True)
    with Largest():
        triplets = _check_indices_tuple((a1, p, a2, n), 192, 192, torch.device("cpu"))
    assert triplets[0].numel() == 192 * 7 * 184
    assert Largest.largest <= triplets[0].numel() < a1.numel() * a2.numel() // 100


def test_atl_with_indices_tuple_uses_text_margins():
    g = torch.Generator().manual_seed(23)
    x = torch.randn(18, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (18,), generator=g)
    text = torch.randn(18, 7, generator=g, dtype=torch.float64)
    a, p, n = TF.mine_triplets(x, labels, strategy="semi_hard")
    per = TF.adaptive_triplet_loss(x, labels, text, (a, p, n), base_margin=0.1, margin_scale=2.0, reduction="none")
    dist = exact_distances(x, x, "euclidean")
    cos = cosine_matrix(text, text)
    expected = F.relu(dist[a, p] - dist[a, n] + 0.1 + 2.0 * (1 - cos[a, n]) / 2)
    torch.testing.assert_close(per, expected)
    # The own mining equals the tuple of the margin-aware miner.
    own = TF.adaptive_triplet_loss(x, labels, text, base_margin=0.1, margin_scale=2.0)
    mined = TF.mine_triplets(x, labels, text_embeddings=text, base_margin=0.1, margin_scale=2.0)
    torch.testing.assert_close(AdaptiveTripletLoss(0.1, 2.0)(x, labels, text, mined), own)


@pytest.mark.parametrize("backend", backends_to_test())
def test_atl_sends_no_gradient_into_the_text_embeddings(backend):
    """Text embeddings are weak-label targets, not parameters: the margins read them detached, so
    a backward through the loss (own mining, an indices_tuple, the module) leaves a text tensor
    that requires grad with no .grad, while the image embeddings get theirs."""
    g = torch.Generator().manual_seed(33)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    tuple_ = (torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4]), torch.tensor([6, 0, 1]))
    calls = {
        "mean": lambda e, t: TF.adaptive_triplet_loss(e, labels, t, margin_scale=2, backend=backend),
        "none": lambda e, t: TF.adaptive_triplet_loss(e, labels, t, margin_scale=2, reduction="none", backend=backend).sum(),
        "indices_tuple": lambda e, t: TF.adaptive_triplet_loss(e, labels, t, tuple_, margin_scale=2, backend=backend),
        "module": lambda e, t: AdaptiveTripletLoss(0.1, 2.0, backend=backend)(e, labels, t),
    }
    for name, call in calls.items():
        e = torch.randn(8, 4, generator=g).requires_grad_()
        t = torch.randn(8, 5, generator=g).requires_grad_()
        loss = call(e, t)
        assert loss.item() > 0, name  # margins of up to 2.1: some triplet is active
        loss.backward()
        assert t.grad is None, name
        assert e.grad is not None and e.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mining", ["all", "batch_hard"])
@pytest.mark.parametrize("margin", [0.3, -0.05])
def test_swap_and_negative_margin_match_pml(mining, margin):
    g = torch.Generator().manual_seed(24)
    x = torch.randn(26, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (26,), generator=g)
    ours = TF.triplet_margin_loss(x, labels, margin=margin, mining=mining, swap=True, reduction="mean_nonzero")
    tuple_ = None if mining == "all" else pml_miners.BatchHardMiner(distance=pml_distances.LpDistance(normalize_embeddings=False))(x, labels)
    theirs = _pml_all(x, labels, margin, "euclidean", pml_reducers.AvgNonZeroReducer(), swap=True, indices_tuple=tuple_)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])
    # swap never lowers any triplet's loss
    plain = TF.triplet_margin_loss(x, labels, margin=margin, mining=mining, reduction="sum")
    assert TF.triplet_margin_loss(x, labels, margin=margin, mining=mining, swap=True, reduction="sum") >= plain


def test_triplets_per_anchor_samples_valid_triplets_like_pml():
    g = torch.Generator().manual_seed(25)
    x = torch.randn(30, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (30,), generator=g)
    labels[0] = 9  # no positive: no triplet
    torch.manual_seed(0)
    per = TF.triplet_margin_loss(x, labels, mining="all", triplets_per_anchor=5, reduction="none", margin=10.0)
    assert per.shape == (29 * 5,)
    from torchfg.functional._triplet_selection import sample_triplets

    a, p, n = sample_triplets(labels, labels, 0, 5, torch.Generator().manual_seed(1))
    assert torch.equal(torch.bincount(a, minlength=30), torch.tensor([0] + [5] * 29))
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    # One positive and one negative per anchor: every draw is that triplet, so k changes nothing but the count.
    x2, ref = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.1
    l2 = torch.tensor([0, 1])
    module = TripletMarginLoss(0.5, mining="all", triplets_per_anchor=3, reduction="sum")
    once = TF.triplet_margin_loss(x2, l2, margin=0.5, mining="all", reduction="sum", ref_embeddings=ref, ref_labels=l2)
    assert once > 0
    torch.testing.assert_close(module(x2, l2, None, ref, l2), 3 * once)
    pml_loss = pml_losses.TripletMarginLoss(margin=0.5, triplets_per_anchor=3, distance=pml_distances.LpDistance(normalize_embeddings=False),
                                            reducer=pml_reducers.MeanReducer())
    torch.testing.assert_close(pml_loss(x2, l2, None, ref, l2.clone()), module(x2, l2, None, ref, l2) / 6)


def test_an_indices_tuple_replaces_triplets_per_anchor_as_in_pml():
    """A loss configured with mining="all", triplets_per_anchor=k refused an indices_tuple; PML's
    loss uses the tuple (k belongs to its own mining) and so does torchfg's now."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    triplets = (torch.tensor([0, 1, 3, 3]), torch.tensor([2, 0, 4, 5]), torch.tensor([6, 3, 8, 0]))
    pairs = (torch.tensor([0, 3]), torch.tensor([1, 4]), torch.tensor([0, 3, 3]), torch.tensor([5, 6, 1]))
    for tpa in (3, "all"):
        module = TripletMarginLoss(0.2, mining="all", triplets_per_anchor=tpa, reduction="mean")
        pml_loss = pml_losses.TripletMarginLoss(
            margin=0.2, triplets_per_anchor=tpa, distance=pml_distances.LpDistance(normalize_embeddings=False),
            reducer=pml_reducers.MeanReducer(),
        )
        for tuple_ in (triplets, pairs):
            ours = module(x, labels, tuple_)
            expected = pml_loss(x, labels, tuple_)
            torch.testing.assert_close(ours, expected)
            (g1,) = torch.autograd.grad(ours, x)
            (g2,) = torch.autograd.grad(expected, x)
            torch.testing.assert_close(g1, g2)


def test_indices_tuple_index_equal_to_the_row_count_is_rejected():
    """Indices must lie in [0, rows): an index equal to the number of rows is one past the end and
    must raise the ValueError naming indices_tuple (the bound is exclusive, ``high >= bound``), not
    slip through to an out-of-range gather. The last valid row is still accepted."""
    e = torch.randn(4, 3, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    ok = (torch.tensor([0]), torch.tensor([1]), torch.tensor([3]))
    assert TF.triplet_margin_loss(e, labels, ok, reduction="none").shape == (1,)
    off_by_one = {
        "anchors": (torch.tensor([4]), torch.tensor([1]), torch.tensor([3])),
        "positives": (torch.tensor([0]), torch.tensor([4]), torch.tensor([3])),
        "negatives": (torch.tensor([0]), torch.tensor([1]), torch.tensor([4])),
    }
    for name, tuple_ in off_by_one.items():
        with pytest.raises(ValueError, match=f"indices_tuple {name} must be in \\[0, 4\\), got values in \\[4, 4\\]"):
            TF.triplet_margin_loss(e, labels, tuple_)


@pytest.mark.parametrize("size", [3, 4])
def test_an_empty_indices_tuple_of_any_dtype_lists_no_triplet(size):
    """A custom miner's "none found" is often ``torch.tensor([])``, which is float32: PML takes an
    empty tuple of any dtype as no triplets (zero loss); torchfg raised a TypeError. A non-empty
    float index is still refused, naming the argument."""
    e = torch.randn(4, 3, generator=torch.Generator().manual_seed(33), dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    for reduction in ("mean", "sum", "none"):
        loss = TF.triplet_margin_loss(e, labels, (torch.tensor([]),) * size, reduction=reduction)
        same = TF.triplet_margin_loss(e, labels, (torch.empty(0, dtype=torch.int64),) * size, reduction=reduction)
        assert loss.shape == same.shape and torch.equal(loss.detach(), same.detach()), reduction
        (grad,) = torch.autograd.grad(loss.sum(), e)
        assert torch.equal(grad, torch.zeros_like(e))
    with pytest.raises(TypeError, match="indices_tuple anchors must be a 1-D integer tensor"):
        TF.triplet_margin_loss(e, labels, (torch.tensor([0.0]), torch.tensor([1]), torch.tensor([3])))
    with pytest.raises(TypeError, match="indices_tuple positives must be a 1-D integer tensor"):
        TF.triplet_margin_loss(e, labels, (torch.tensor([0]), torch.empty(0, 1), torch.tensor([3])))


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_diverged_anchor_without_a_positive_still_gives_a_nan_loss(backend, bad):
    """numerics.md: NaN or inf embeddings give a NaN loss (mean / sum) on every path. An anchor
    without a positive that held an inf vanished on the PyTorch path (0 for invalid anchors; the
    others' d(a, n) = inf hinges to 0) while the fused Triton loss gave NaN; semi-hard and "all"
    never select a NaN or infinitely far triplet, so the loss stayed finite there for NaN too."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, generator=gen).to(TEST_DEVICE)
    x[5, 0] = bad
    labels = torch.tensor([0, 0, 1, 1, 2, 3], device=TEST_DEVICE)  # row 5: no positive
    text = torch.randn(6, 3, generator=gen).to(TEST_DEVICE)
    for reduction in ("mean", "sum", "mean_nonzero"):
        assert TF.triplet_margin_loss(x, labels, reduction=reduction, backend=backend).isnan(), reduction
        assert TF.adaptive_triplet_loss(x, labels, text, reduction=reduction, backend=backend).isnan(), reduction
        if backend == "torch":
            for mining in ("semi_hard", "all"):
                assert TF.triplet_margin_loss(x, labels, mining=mining, reduction=reduction).isnan(), (mining, reduction)
    # Per anchor: the diverged anchor is marked on both backends, the others keep their values.
    per_anchor = TF.triplet_margin_loss(x, labels, reduction="none", backend=backend)
    assert per_anchor[5].isnan() and per_anchor[4] == 0
    # A finite batch is unchanged (no NaN from the check itself).
    x[5, 0] = 1.0
    assert TF.triplet_margin_loss(x, labels, mining="semi_hard", backend="torch").isfinite()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
def test_the_pytorch_path_never_chooses_a_nan_key(metric, bad):
    """numerics.md: a NaN key is never chosen. The PyTorch mining's argmax / argmin took NaN keys
    first, so the anchors that chose a diverged row got NaN terms there and not on Triton, and a
    NaN row in a CrossBatchMemory made every later loss NaN on the PyTorch path only."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0, 1])
    text = torch.randn(13, 5, generator=gen, dtype=torch.float64)
    # A candidate-only NaN row (a separate reference set): every anchor's term is the one without it.
    ref, ref_labels = torch.randn(9, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    ref_bad = ref.clone()
    ref_bad[2, 3] = float("nan")
    keep = torch.arange(9) != 2
    with_row = TF.triplet_margin_loss(x, labels, metric=metric, reduction="none", ref_embeddings=ref_bad,
                                      ref_labels=ref_labels, backend="torch")
    without = TF.triplet_margin_loss(x, labels, metric=metric, reduction="none", ref_embeddings=ref[keep],
                                     ref_labels=ref_labels[keep], backend="torch")
    torch.testing.assert_close(with_row, without)
    # A diverged anchor among the candidates: the same per-anchor losses (NaN / inf entries too) as
    # the fused Triton kernel, which never takes a NaN key.
    x[4, 1] = bad
    if TRITON_OK and INTERPRETER_MAXNUM_OK:
        for fn in (lambda b: TF.triplet_margin_loss(x.float(), labels, metric=metric, reduction="none", backend=b),
                   lambda b: TF.adaptive_triplet_loss(x.float(), labels, text.float(), metric=metric, reduction="none",
                                                      backend=b)):
            torch.testing.assert_close(fn("torch"), fn("triton"), equal_nan=True, rtol=1e-5, atol=1e-5)
    if bad != bad:  # NaN: only the diverged anchor's own term is NaN
        per_anchor = TF.triplet_margin_loss(x, labels, metric=metric, reduction="none", backend="torch")
        assert per_anchor.isnan().nonzero().flatten().tolist() == [4]


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
def test_a_nan_row_in_the_memory_leaves_later_losses_finite_on_the_pytorch_path(mining):
    """Semi-hard and all-triplets memories (new) chose the NaN row as long as it stayed in the
    ring: every later loss was NaN."""
    from torchfg.losses import CrossBatchMemory

    gen = torch.Generator().manual_seed(8)
    xbm = CrossBatchMemory(TripletMarginLoss(backend="torch", mining=mining), 4, 32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    bad = torch.randn(8, 4, generator=gen)
    bad[3, 0] = float("nan")
    assert xbm(bad, labels).isnan()  # the diverged batch itself shows it
    for _ in range(2):
        assert xbm(torch.randn(8, 4, generator=gen), labels).isfinite()


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_nan_embedding_gives_nan_batch_hard_and_adaptive_loss(backend, metric):
    """A diverged (NaN) embedding must not vanish from the loss on any backend."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(13, 6, generator=gen).to(TEST_DEVICE)
    x[4, 1] = float("nan")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0, 1], device=TEST_DEVICE)
    text = torch.randn(13, 5, generator=gen).to(TEST_DEVICE)
    assert TF.triplet_margin_loss(x, labels, metric=metric, backend=backend).isnan()
    assert TF.adaptive_triplet_loss(x, labels, text, metric=metric, backend=backend).isnan()


def test_mine_triplets_takes_any_margin_without_text_and_a_non_negative_one_with_it():
    """Without text the margin selects nothing, and the losses take negative margins: so does
    mine_triplets. With text it is the adaptive margins' base and must be >= 0."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 5, generator=gen)
    labels = torch.arange(12) % 3
    for strategy in ("batch_hard", "semi_hard", "all"):
        expected = TF.mine_triplets(x, labels, strategy=strategy, margin=0.2)
        for got, want in zip(TF.mine_triplets(x, labels, strategy=strategy, margin=-0.1), expected):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="margin.*base margin.*>= 0"):
        TF.mine_triplets(x, labels, margin=-0.1, text_embeddings=torch.randn(12, 4, generator=gen))
    with pytest.raises(ValueError, match="margin must be finite"):
        TF.mine_triplets(x, labels, margin=float("nan"))


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
def test_labels_given_as_a_column_view_warn_nothing(mining):
    """Labels are often a column of a label table (a strided view): the positive-pair index passed
    them to searchsorted, which warned about (and copied) the non-contiguous query on every call."""
    import warnings

    g = torch.Generator().manual_seed(4)
    emb = torch.randn(12, 3, generator=g)
    table = torch.stack([torch.arange(12), torch.arange(12) // 3], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = TF.triplet_margin_loss(emb, table[:, 1], mining=mining, backend="torch")
    assert torch.equal(loss, TF.triplet_margin_loss(emb, table[:, 1].contiguous(), mining=mining, backend="torch"))


def test_numpy_scalars_are_numbers_everywhere_a_number_is_taken():
    """A margin read from a numpy config (np.float32, np.int64) was refused as "not a number",
    where PML takes it; bools (numpy's too) and tensors still are refused."""
    import numpy as np

    from torchfg.datasets.synthetic_products import split_product_ids
    from torchfg.heads import MultiLabelHead, PrototypicalHead
    from torchfg.utils import cosine_schedule

    gen = torch.Generator().manual_seed(5)
    x, labels = torch.randn(12, 5, generator=gen), torch.arange(12) % 3
    expected = TripletMarginLoss(margin=0.25)(x, labels)
    for margin in (np.float32(0.25), np.float64(0.25), np.float16(0.25)):
        torch.testing.assert_close(TripletMarginLoss(margin=margin)(x, labels), expected)
    assert TripletMarginLoss(margin=np.int64(1)).margin == 1.0
    assert PrototypicalHead(temperature=np.float32(0.5)).temperature == 0.5
    MultiLabelHead(5, 3, dropout=np.float32(0.1))
    # A non-number is a TypeError, as for the other number arguments; a number out of range a ValueError.
    for bad in (True, "0.1", torch.tensor(0.1)):
        with pytest.raises(TypeError, match="dropout must be a number"):
            MultiLabelHead(5, 3, dropout=bad)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1.0"):
        MultiLabelHead(5, 3, dropout=1.0)
    assert split_product_ids(10, novel_fraction=np.float32(0.2)) == split_product_ids(10, novel_fraction=0.2)
    assert (cosine_schedule(np.float32(1.0), 0.0, 3, 4) == cosine_schedule(1.0, 0.0, 3, 4)).all()
    for bad in (True, np.bool_(True), torch.tensor(0.2), "0.2"):
        with pytest.raises(TypeError, match="margin must be a number"):
            TripletMarginLoss(margin=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_semi_hard_and_all_leave_a_non_finite_candidate_row_out(metric, bad):
    """numerics.md: a NaN row that is only a candidate is never chosen. Semi-hard took it as a
    positive (a pair at NaN distance) or as the farthest negative (argmax takes NaN first), and
    "all" kept its NaN triplets on purpose (for NaN anchors): the loss against a reference set
    with one diverged row was NaN. Such a row is now absent for finite anchors, in every
    strategy, reduction and in the miners: the same results as without the row."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3])
    ref, ref_labels = torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1])
    ref_bad = ref.clone()
    ref_bad[2, 3] = bad
    keep = torch.arange(9) != 2
    old_index = keep.nonzero().flatten()  # candidate index without the row -> with it
    for mining, smooth in (("semi_hard", False), ("all", False), ("all", True)):
        for reduction in ("mean", "sum", "none", "mean_nonzero"):
            kw = dict(metric=metric, mining=mining, smooth=smooth, reduction=reduction)
            with_row = TF.triplet_margin_loss(x, labels, ref_embeddings=ref_bad, ref_labels=ref_labels, **kw)
            without = TF.triplet_margin_loss(x, labels, ref_embeddings=ref[keep], ref_labels=ref_labels[keep], **kw)
            torch.testing.assert_close(with_row, without, msg=f"{mining} smooth={smooth} {reduction}")
        got = TF.mine_triplets(x, labels, strategy=mining, metric=metric, ref_embeddings=ref_bad, ref_labels=ref_labels)
        want = TF.mine_triplets(x, labels, strategy=mining, metric=metric, ref_embeddings=ref[keep],
                                ref_labels=ref_labels[keep])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], old_index[want[1]]), mining
        assert torch.equal(got[2], old_index[want[2]]), mining
    # Random triplets per anchor never draw the row either.
    sampled = TF.triplet_margin_loss(x, labels, metric=metric, mining="all", triplets_per_anchor=3, reduction="none",
                                     ref_embeddings=ref_bad, ref_labels=ref_labels)
    assert sampled.shape == (30,) and sampled.isfinite().all()
    # A diverged anchor still shows: its own triplets are NaN.
    x_bad = x.clone()
    x_bad[4, 0] = bad
    for mining in ("semi_hard", "all"):
        assert TF.triplet_margin_loss(x_bad, labels, metric=metric, mining=mining, ref_embeddings=ref_bad,
                                      ref_labels=ref_labels).isnan()


def test_every_row_diverged_keeps_every_triplet_of_all_mining():
    """Every anchor diverged: each keeps its candidates (non-finite ones are absent only for
    finite anchors), so "all" mining lists every triplet by labels and the loss is NaN."""
    x = torch.full((4, 3), float("nan"), dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    assert TF.triplet_margin_loss(x, labels, mining="all").isnan()
    per_triplet = TF.triplet_margin_loss(x, labels, mining="all", reduction="none")
    assert per_triplet.shape == (8,) and per_triplet.isnan().all()  # 4 anchors x 1 positive x 2 negatives
    listed = TF.mine_triplets(x, labels, strategy="all")
    assert all(torch.equal(a, b) for a, b in zip(listed, mine_all_triplets(labels, labels, exclude_self=True)))
    # Semi-hard: each diverged anchor keeps its pair and takes its first negative.
    a, p, n = TF.mine_triplets(x, labels, strategy="semi_hard")
    assert (a.tolist(), p.tolist(), n.tolist()) == ([0, 1, 2, 3], [1, 0, 3, 2], [2, 2, 0, 0])


def test_all_selection_and_absent_rows_stream_in_chunks(monkeypatch):
    """The chunked selection (one anchor per chunk) gives the anchors' own indices (each chunk's
    offset) and each chunk's own finite-anchor mask: the same triplets and per-triplet losses as
    one chunk, with a diverged anchor and a diverged reference row."""
    import torchfg.functional._triplet_selection as selection
    from torchfg.miners import TripletMarginMiner

    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (40,), generator=g)
    ref = torch.randn(9, 5, generator=g, dtype=torch.float64)
    ref_labels = torch.arange(9) % 5
    ref[2, 3], x[0, 0] = float("nan"), float("nan")
    miner = TripletMarginMiner(0.3, type_of_triplets="all")
    expected_triplets = miner(x[1:], labels[1:])
    expected = TF.triplet_margin_loss(x, labels, mining="all", reduction="none", ref_embeddings=ref, ref_labels=ref_labels)
    monkeypatch.setattr(selection, "BLOCK_ELEMENTS", 9)  # one anchor per chunk
    assert all(torch.equal(a, b) for a, b in zip(miner(x[1:], labels[1:]), expected_triplets))
    got = TF.triplet_margin_loss(x, labels, mining="all", reduction="none", ref_embeddings=ref, ref_labels=ref_labels)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert got.isnan().any() and not got[-20:].isnan().any()  # anchor 0's triplets come first


def test_semi_hard_anchor_whose_only_negatives_are_non_finite_has_no_triplet():
    """A finite anchor whose only other-label candidate is a NaN row has no negative: no triplet
    (it took a bogus one when the negatives were counted by labels alone)."""
    x, labels = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    ref = torch.tensor([[1.0, 0.0], [2.0, 0.0], [float("nan"), 0.0]])
    ref_labels = torch.tensor([0, 0, 1])
    assert TF.triplet_margin_loss(x, labels, mining="semi_hard", reduction="none", ref_embeddings=ref,
                                  ref_labels=ref_labels).numel() == 0
    assert TF.mine_triplets(x, labels, strategy="semi_hard", ref_embeddings=ref, ref_labels=ref_labels)[0].numel() == 0
