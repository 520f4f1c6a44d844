"""torchfg.miners: index tuples that pytorch-metric-learning losses accept as ``indices_tuple``."""

from __future__ import annotations

import pytest
import torch

from torchfg import functional as TF
from torchfg.errors import BackendUnavailableError
from torchfg.miners import BatchHardMiner, SemiHardMiner, TripletMarginMiner

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402


def _batch(seed: int, n: int = 50, d: int = 10, classes: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _pml_distance():
    return pml_distances.LpDistance(normalize_embeddings=False)


@pytest.mark.parametrize("seed", range(3))
def test_batch_hard_miner_equals_pml(seed):
    x, labels = _batch(seed)
    ours = BatchHardMiner()(x, labels)
    theirs = pml_miners.BatchHardMiner(distance=_pml_distance())(x, labels)
    assert all(a.dtype == torch.int64 for a in ours)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_batch_hard_miner_with_reference_set_equals_pml():
    x, labels = _batch(1, n=17)
    ref, ref_labels = _batch(2, n=40)
    ours = BatchHardMiner()(x, labels, ref, ref_labels)
    theirs = pml_miners.BatchHardMiner(distance=_pml_distance())(x, labels, ref, ref_labels)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("miner_cls", [BatchHardMiner, SemiHardMiner])
def test_indices_tuple_feeds_pml_loss(miner_cls):
    x, labels = _batch(4)
    x = x.requires_grad_(True)
    triplets = miner_cls()(x, labels)
    loss_fn = pml_losses.TripletMarginLoss(margin=0.2, distance=_pml_distance(), reducer=pml_reducers.MeanReducer())
    theirs = loss_fn(x, labels, triplets)
    mining = "batch_hard" if miner_cls is BatchHardMiner else "semi_hard"
    ours = TF.triplet_margin_loss(x, labels, margin=0.2, mining=mining)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


@pytest.mark.parametrize("reference", [False, True])
def test_batch_hard_miner_keeps_non_finite_anchors_so_the_loss_shows_nan(reference):
    """An anchor row holding NaN or inf is at distance NaN from everything: mining picks nothing for
    it. Left out, a loss over the miner's triplets was finite where the loss's own batch-hard (and
    PML's miner) gives NaN, and a diverged model (every row NaN) got a loss of 0. It now gets its
    first positive and first negative by index (never itself), when its labels give it both."""
    from torchfg.losses import TripletMarginLoss

    x, labels = _batch(4, n=30, d=6, classes=5)
    labels[29] = 99  # a class of one: no positive, so no triplet even when non-finite
    bad = [3, 17, 29]
    x[3, 1], x[17, 0], x[29, 2] = float("nan"), float("inf"), float("nan")
    ref = ref_labels = None
    if reference:  # anchors against a finite reference set
        ref, ref_labels = torch.randn(12, 6, generator=torch.Generator().manual_seed(5), dtype=x.dtype), torch.arange(
            12) % 5
    a, p, n = BatchHardMiner()(x, labels, ref, ref_labels)
    cand_labels = labels if ref_labels is None else ref_labels
    for row in bad:
        chosen = (a == row).nonzero().flatten().tolist()
        if row == 29:
            assert chosen == []
            continue
        assert len(chosen) == 1, row
        (t,) = chosen
        positives = [j for j in range(cand_labels.numel()) if cand_labels[j] == labels[row] and (reference or j != row)]
        negatives = [j for j in range(cand_labels.numel()) if cand_labels[j] != labels[row]]
        assert (int(p[t]), int(n[t])) == (positives[0], negatives[0]), row
    # The finite anchors keep the mining op's hardest pairs.
    from torchfg.ops.triplet import mine_hardest

    pos, neg = mine_hardest(x, x if ref is None else ref, labels, cand_labels, exclude_self=not reference)
    kept = [(i, int(pos[i]), int(neg[i])) for i in range(30) if i not in bad and pos[i] >= 0 and neg[i] >= 0]
    assert kept == [(int(i), int(j), int(k)) for i, j, k in zip(a, p, n) if int(i) not in bad]
    loss = TripletMarginLoss(0.2)
    assert loss(x, labels, (a, p, n), ref, ref_labels).isnan()
    assert loss(x, labels, ref_embeddings=ref, ref_labels=ref_labels).isnan()
    # A diverged model: every row NaN.
    diverged = torch.full_like(x, float("nan"))
    assert loss(diverged, labels, BatchHardMiner()(diverged, labels)).isnan()


def test_non_finite_anchor_fallback_respects_text_positives_and_counts_margin_text():
    """With text-defined positives (a threshold) the fallback's negative is the first other-label
    row whose text is not a near-duplicate of the anchor's (row 0 here shares the NaN anchor's
    description, so row 3 is taken); there was no fallback triplet at all before, so a diverged
    model mined with a threshold trained on a loss of 0. An anchor whose every other-label row is
    a text positive has none. With adaptive margins, a non-finite *text* row makes the anchor
    non-finite too, as in the fused loss."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 1, 1, 2, 2, 1])
    text = torch.randn(6, 5, generator=gen)
    text[0] = text[1]  # labels 0 and 1 share a description
    bad = x.clone()
    bad[1, 0] = float("nan")
    a, p, n = TF.mine_triplets(bad, labels, text_embeddings=text, text_positive_threshold=0.9)
    (t,) = (a == 1).nonzero().flatten().tolist()
    assert (int(p[t]), int(n[t])) == (2, 3)
    # Every other-label row a text positive of the anchor: no negative, no triplet.
    same_text = text.clone()
    same_text[[3, 4]] = 2.0 * text[1]
    a, p, n = TF.mine_triplets(bad, labels, text_embeddings=same_text, text_positive_threshold=0.9)
    assert 1 not in a.tolist()
    # A diverged model mined under a threshold: the loss over the mined triplets is NaN, as the
    # fused adaptive loss is.
    diverged = torch.full_like(x, float("nan"))
    a, p, n = TF.mine_triplets(diverged, labels, text_embeddings=text, text_positive_threshold=0.9)
    assert a.numel() > 0 and (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
    cos = torch.nn.functional.cosine_similarity(text[a], text[n], dim=1)
    assert (cos < 0.9).all()
    assert TF.adaptive_triplet_loss(diverged, labels, text, text_positive_threshold=0.9).isnan()
    assert TF.triplet_margin_loss(diverged, labels, indices_tuple=(a, p, n)).isnan()
    text_bad = text.clone()
    text_bad[3, 2] = float("inf")
    a, p, n = TF.mine_triplets(x, labels, text_embeddings=text_bad, base_margin=0.1, margin_scale=0.5)
    (t,) = (a == 3).nonzero().flatten().tolist()
    assert (int(p[t]), int(n[t])) == (4, 0)


def test_semi_hard_miner_triplets_are_valid():
    x, labels = _batch(5, classes=4)
    a, p, n = SemiHardMiner()(x, labels)
    assert a.shape == p.shape == n.shape and a.numel() > 0
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    assert torch.all(a[1:] >= a[:-1])  # sorted by anchor


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
def test_miner_triplets_are_valid_and_leave_autograd_alone(metric):
    x, labels = _batch(6)
    x = x.requires_grad_(True)
    for miner in (BatchHardMiner(metric=metric), SemiHardMiner(metric=metric), TripletMarginMiner(0.3, metric=metric)):
        a, p, n = miner(x, labels)
        assert a.numel() > 0 and miner.num_triplets == a.numel()
        assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
        # Mining on a tensor that requires grad must not put anything into its gradient.
        loss = (x[a] - x[p]).square().sum()
        (grad,) = torch.autograd.grad(loss, x)
        expected = torch.zeros_like(x).index_add_(0, a, 2 * (x[a] - x[p]).detach()).index_add_(0, p, -2 * (x[a] - x[p]).detach())
        torch.testing.assert_close(grad, expected)


def test_cosine_mining_ignores_row_scale():
    x, labels = _batch(6)
    scaled = x * torch.rand(x.shape[0], 1, dtype=x.dtype, generator=torch.Generator().manual_seed(0)) * 10
    for miner in (BatchHardMiner(metric="cosine"), TripletMarginMiner(0.1, metric="cosine")):
        assert all(torch.equal(a, b) for a, b in zip(miner(scaled, labels), miner(x, labels)))
    assert "cosine" in repr(BatchHardMiner(metric="cosine"))


def _pml_margin_miner(margin, kind, metric="euclidean", **kw):
    distance = pml_distances.LpDistance(normalize_embeddings=False, power=2 if metric == "sqeuclidean" else 1)
    return pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind, distance=distance, **kw)


@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("margin", [0.4, -0.2])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_triplet_margin_miner_equals_pml(kind, margin, metric):
    x, labels = _batch(7, n=37, d=6, classes=5)
    ours = TripletMarginMiner(margin, kind, metric=metric, collect_stats=True)
    theirs = _pml_margin_miner(margin, kind, metric, collect_stats=True)
    got, expected = ours(x, labels), theirs(x, labels)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert ours.num_triplets == theirs.num_triplets == got[0].numel()
    for name in ("pos_pair_dist", "neg_pair_dist", "avg_triplet_margin"):
        assert getattr(ours, name) == pytest.approx(getattr(theirs, name), rel=1e-9, abs=1e-12)


def test_triplet_margin_miner_with_reference_set_equals_pml():
    x, labels = _batch(8, n=15)
    ref, ref_labels = _batch(9, n=41)
    for kind in ("all", "semihard"):
        got = TripletMarginMiner(0.5, kind)(x, labels, ref, ref_labels)
        expected = _pml_margin_miner(0.5, kind)(x, labels, ref, ref_labels)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_triplet_margin_miner_classifies_exact_boundaries_exactly():
    # Integer points where t = d(a, n) - d(a, p) is exactly 0 or exactly the margin (sqeuclidean):
    # the fp32 fast path is off by rounding, the exact test is not. The last row is at squared
    # distance 21 from row 1, as row 2 (its positive) is: t = 0 for the triplet (1, 2, 4).
    x = torch.tensor([[3.0, 0, 3], [1, -3, 0], [3, 1, -1], [2, -3, 2], [5, -1, 1]]) + 1000.0
    labels = torch.tensor([3, 1, 1, 0, 0])
    dist = (x.double()[:, None] - x.double()[None]).square().sum(-1)
    for kind in ("all", "hard", "semihard", "easy"):
        a, p, n = TripletMarginMiner(1.0, kind, metric="sqeuclidean")(x, labels)
        t = dist[a, n] - dist[a, p]
        every = TF.mine_triplets(x, labels, strategy="all")
        t_all = dist[every[0], every[2]] - dist[every[0], every[1]]
        keep = {"all": t_all <= 1, "hard": t_all <= 0, "semihard": (t_all > 0) & (t_all <= 1), "easy": t_all > 1}[kind]
        assert torch.equal(a, every[0][keep]) and torch.equal(n, every[2][keep]), kind
        assert t.numel() == int(keep.sum())
    assert (t_all == 1).any()  # the case holds a margin exactly on the boundary
    assert (t_all == 0).any()  # and a negative exactly as far as the positive (hard, not semihard)
    assert (t_all < 0).any() and (t_all > 1).any()


def _exact_margins(x, triplets):
    """t = d(a, n) - d(a, p) per returned triplet, squared distances from explicit fp64 differences."""
    a, p, n = triplets
    x = x.double()
    return (x[a] - x[n]).square().sum(-1) - (x[a] - x[p]).square().sum(-1)


def _square_with_ties():
    # sqeuclidean: d(0, 1) = d(0, 2) = 1 and d(3, 2) = d(3, 1) = 41, so t(0, 1, 2) = t(3, 2, 1) = 0;
    # t(1, 0, 2) = 1, every other triplet has |t| >= 9.
    return torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]), torch.tensor([0, 0, 1, 1])


def test_hard_triplets_include_a_negative_exactly_as_far_as_the_positive():
    """PML's "hard" is ``t <= 0`` (closed): a negative at exactly the positive's distance (t == 0)
    is hard, not dropped, whatever the (positive) margin."""
    x, labels = _square_with_ties()
    got = TripletMarginMiner(0.5, "hard", metric="sqeuclidean")(x, labels)
    triplets = list(zip(*(t.tolist() for t in got)))
    assert triplets == [(0, 1, 2), (2, 3, 0), (2, 3, 1), (3, 2, 1)]
    t = _exact_margins(x, got)
    assert t[triplets.index((0, 1, 2))].item() == 0.0 and t[triplets.index((3, 2, 1))].item() == 0.0
    assert (t <= 0).all()


def test_semihard_triplets_exclude_a_negative_exactly_as_far_as_the_positive():
    """PML's "semihard" is ``0 < t <= margin``: open at 0 (a tie is hard, not semihard), closed
    at the margin."""
    x, labels = _square_with_ties()
    got = TripletMarginMiner(0.5, "semihard", metric="sqeuclidean")(x, labels)
    assert all(t.numel() == 0 for t in got)  # t = 0 ties are out, and no t lies in (0, 0.5]
    got = TripletMarginMiner(1.0, "semihard", metric="sqeuclidean")(x, labels)
    assert list(zip(*(t.tolist() for t in got))) == [(1, 0, 2)]  # t == 1 == margin in, t == 0 out
    assert _exact_margins(x, got).tolist() == [1.0]


def test_miner_statistics_of_the_returned_triplets():
    # PML's BatchHardMiner records min/max pair distances; ours records the means over the
    # returned triplets (documented), checked here against PML's triplets and exact distances.
    x, labels = _batch(10)
    ours = BatchHardMiner(collect_stats=True)
    theirs = pml_miners.BatchHardMiner(distance=_pml_distance())
    ours(x, labels)
    a, p, n = theirs(x, labels)
    assert ours.num_triplets == theirs.num_triplets == a.numel()
    assert ours.pos_pair_dist == pytest.approx((x[a] - x[p]).norm(dim=1).mean().item(), rel=1e-12)
    assert ours.neg_pair_dist == pytest.approx((x[a] - x[n]).norm(dim=1).mean().item(), rel=1e-12)
    assert ours.avg_triplet_margin == pytest.approx(ours.neg_pair_dist - ours.pos_pair_dist)
    assert BatchHardMiner().pos_pair_dist is None  # off by default: no host sync in training


def test_semi_hard_miner_honours_or_rejects_backend():
    # backend="torch" runs (against a brute-force FaceNet rule), an explicit kernel is refused.
    x, labels = _batch(11, n=23)
    a, p, n = SemiHardMiner(backend="torch")(x, labels)
    dist = torch.cdist(x, x)
    expected = []
    for i in range(x.shape[0]):
        negatives = [k for k in range(x.shape[0]) if labels[k] != labels[i]]
        for j in range(x.shape[0]):
            if j == i or labels[j] != labels[i] or not negatives:
                continue
            farther = [k for k in negatives if dist[i, k] > dist[i, j]]
            k = min(farther, key=lambda k: (dist[i, k], k)) if farther else min(negatives, key=lambda k: (-dist[i, k], k))
            expected.append((i, j, k))
    assert expected and list(zip(a.tolist(), p.tolist(), n.tolist())) == expected
    with pytest.raises(BackendUnavailableError, match="semi_hard"):
        SemiHardMiner(backend="triton")


def test_miner_bad_input():
    with pytest.raises(ValueError, match="metric"):
        BatchHardMiner(metric="manhattan")
    with pytest.raises(ValueError, match="labels"):
        BatchHardMiner()(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ref_labels"):
        SemiHardMiner()(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(5, 3))
    with pytest.raises(ValueError, match="type_of_triplets"):
        TripletMarginMiner(type_of_triplets="semi_hard")
    with pytest.raises(ValueError, match="margin"):
        TripletMarginMiner(margin=float("inf"))
    with pytest.raises(TypeError, match="collect_stats"):
        BatchHardMiner(collect_stats=1)


def test_non_finite_fallback_reads_text_only_where_it_counts_and_excludes_at_the_threshold():
    """Without adaptive margins (margin_scale=0) a NaN text row does not make the anchor
    diverged: its hardest positive stays. A text cosine exactly at the threshold is a near
    duplicate (mining excludes cos >= threshold), so the fallback's negative skips it."""
    x = torch.tensor([[0.0], [0.1], [3.0], [10.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    text = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    text[0, 1] = float("nan")
    a, p, n = TF.mine_triplets(x, labels, text_embeddings=text, margin_scale=0.0, text_positive_threshold=0.99)
    (t,) = (a == 0).nonzero().flatten().tolist()
    assert int(p[t]) == 2  # the farthest positive, not the first
    x = torch.tensor([[float("nan")], [1.0], [2.0], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    a, p, n = TF.mine_triplets(x, labels, text_embeddings=text, margin_scale=0.5, text_positive_threshold=1.0)
    (t,) = (a == 0).nonzero().flatten().tolist()
    assert (int(p[t]), int(n[t])) == (1, 3)  # row 2's text cosine with row 0 is exactly 1


def test_semi_hard_miner_lists_a_diverged_anchor_with_its_first_negative():
    """A diverged anchor against a reference set that also holds a NaN row: the anchor keeps its
    pairs (every candidate, the NaN row too) and takes its first negative, so a loss over the
    mined triplets is NaN; the finite anchors never take the NaN row."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ref_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ref[1, 0], x[4, 0] = float("nan"), float("nan")
    a, p, n = SemiHardMiner()(x, labels, ref, ref_labels)
    rows = (a == 4).nonzero().flatten()
    assert p[rows].tolist() == [2, 5] and n[rows].tolist() == [0, 0]  # label 2's pairs, first negative 0
    finite = a != 4
    assert not ((p[finite] == 1) | (n[finite] == 1)).any()
