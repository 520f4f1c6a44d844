"""torchfg.miners: index tuples that pytorch-metric-learning losses accept as ``indices_tuple``."""

from __future__ import annotations

import pytest
import torch

from torchfg import functional as TF
from torchfg.miners import BatchHardMiner, SemiHardMiner

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


def test_semi_hard_miner_triplets_are_valid():
    x, labels = _batch(5, classes=4)
    a, p, n = SemiHardMiner()(x, labels)
    assert a.shape == p.shape == n.shape and a.numel() > 0
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    assert torch.all(a[1:] >= a[:-1])  # sorted by anchor


def test_miners_have_no_gradient_and_respect_metric():
    x, labels = _batch(6)
    x = x.requires_grad_(True)
    for miner in (BatchHardMiner(metric="cosine"), SemiHardMiner(metric="dot")):
        out = miner(x, labels)
        assert not any(t.requires_grad for t in out)
    cosine = BatchHardMiner(metric="cosine")(x * torch.rand(x.shape[0], 1, dtype=x.dtype) * 10 + 0, labels)
    # Cosine mining ignores row scale.
    assert all(torch.equal(a, b) for a, b in zip(cosine, BatchHardMiner(metric="cosine")(x, labels)))
    assert "cosine" in repr(BatchHardMiner(metric="cosine"))


def test_miner_bad_input():
    with pytest.raises(ValueError, match="metric"):
        BatchHardMiner(metric="manhattan")
    with pytest.raises(ValueError, match="labels"):
        BatchHardMiner()(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ref_labels"):
        SemiHardMiner()(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(5, 3))
