"""torchfg.distributed gathers on 2 and 3 gloo ranks in spawned CPU processes."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_on_ranks
from torchfg.distributed import all_gather_no_grad, all_gather_with_grad, gather_batch

pytestmark = pytest.mark.distributed

SIZES = {2: [3, 5], 3: [4, 0, 2]}  # rows per rank, an empty batch included


def _rank_data(rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(SIZES[world][rank], 6, generator=g, dtype=torch.float64)


def _gather_and_backward(rank: int, world: int):
    x = _rank_data(rank, world).requires_grad_()
    gathered = all_gather_with_grad(x)
    # A loss that differs per rank, so the summed gradient is not a trivial multiple.
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    return gathered.detach(), x.grad


@pytest.mark.parametrize("world", [2, 3])
def test_all_gather_with_grad_concatenates_and_sums_gradients(world):
    results = run_on_ranks(_gather_and_backward, world)
    assert all(r[0] == "ok" for r in results), results
    expected = torch.cat([_rank_data(r, world) for r in range(world)])
    total_weight = sum(r + 1 for r in range(world))
    weights = torch.arange(expected.numel(), dtype=torch.float64).reshape(expected.shape) * total_weight
    offset = 0
    for r, (_, (gathered, grad)) in enumerate(results):
        torch.testing.assert_close(gathered, expected)
        n = SIZES[world][r]
        torch.testing.assert_close(grad, weights[offset : offset + n])
        offset += n


def _mismatched_dim(rank: int, world: int):
    return all_gather_no_grad(torch.zeros(2, 4 + rank))


def _inconsistent_labels(rank: int, world: int):
    labels = torch.zeros(3 if rank == 0 else 2, dtype=torch.int64)
    return gather_batch([torch.zeros(2, 4), labels], ["embeddings", "labels"])


@pytest.mark.parametrize(
    "fn, match", [(_mismatched_dim, "trailing"), (_inconsistent_labels, "rank 0 has inconsistent batch sizes")]
)
def test_bad_shapes_raise_on_every_rank(fn, match):
    results = run_on_ranks(fn, 2)
    for r in results:
        assert r[0] == "error" and "ValueError" in r[1] and match in r[1], r


def test_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    batch = gather_batch([x, None], ["x", "t"])
    assert batch.offset == 0 and batch.sizes == [3] and batch.tensors[1] is None
