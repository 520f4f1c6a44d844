"""torchfg.ops.pair_distances: exact distances of selected pairs, their analytic backward and chunking."""

from __future__ import annotations

import pytest
import torch

from brute_force import exact_distances
from torchfg.ops.metric import METRICS
from torchfg.ops.pair_distances import anchor_pair_distances, pair_distances


@pytest.mark.parametrize("metric", METRICS)
def test_pair_distances_gradcheck(metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    xi, yi = torch.randint(0, 7, (13,), generator=g), torch.randint(0, 9, (13,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: pair_distances(a, xi, yi, b, metric=metric), (x, y))
    xj = torch.randint(0, 7, (13,), generator=g)
    assert torch.autograd.gradcheck(lambda a: pair_distances(a, xi, xj, metric=metric), (x,))
    expected = exact_distances(x, y, metric)[xi, yi]
    torch.testing.assert_close(pair_distances(x, xi, yi, y, metric=metric), expected)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("separate_y", [False, True])
def test_anchor_pair_distances_gradcheck_and_chunks(metric, separate_y, monkeypatch):
    import torchfg.ops.pair_distances.reference as reference

    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True) if separate_y else None
    idx = torch.randint(0, 8 if separate_y else 11, (11, 3), generator=g)
    if not separate_y:
        idx[0, 0] = 0  # a zero distance: euclidean gradient 0 there, not NaN
    expected = exact_distances(x, x if y is None else y, metric).gather(1, idx)
    whole = anchor_pair_distances(x, idx, y, metric=metric)
    torch.testing.assert_close(whole, expected)
    inputs = (x,) if y is None else (x, y)
    grads = torch.autograd.grad(whole.square().sum(), inputs)
    monkeypatch.setattr(reference, "ANCHORED_CHUNK_ELEMENTS", 2 * 3 * 5)  # 2 anchors per chunk
    chunked = anchor_pair_distances(x, idx, y, metric=metric)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(torch.autograd.grad(chunked.square().sum(), inputs), grads):
        torch.testing.assert_close(a, b)
    if not separate_y:
        idx[0, 0] = 1  # gradcheck away from the non-differentiable zero distance
    assert torch.autograd.gradcheck(lambda *t: anchor_pair_distances(t[0], idx, t[1] if len(t) > 1 else None,
                                                                    metric=metric), inputs)


def test_pair_distances_chunks_match_whole(monkeypatch):
    import torchfg.ops.pair_distances.reference as reference

    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    xi, yi = torch.randint(0, 9, (17,), generator=g), torch.randint(0, 9, (17,), generator=g)
    whole = pair_distances(x, xi, yi)
    (grad,) = torch.autograd.grad(whole.sum(), x)
    monkeypatch.setattr(reference, "PAIR_CHUNK_ELEMENTS", 3 * 4)
    chunked = pair_distances(x, xi, yi)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(torch.autograd.grad(chunked.sum(), x)[0], grad)
