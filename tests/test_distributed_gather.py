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


def _second_order(rank: int, world: int):
    x = _rank_data(rank, world).requires_grad_()
    gathered = all_gather_with_grad(x)
    weights = torch.linspace(0.5, 2.0, gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (first,) = torch.autograd.grad((weights * gathered**2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((first**2).sum(), x)
    return first.detach(), second


@pytest.mark.parametrize("world", [2, 3])
def test_all_gather_with_grad_second_order(world):
    """loss_r = sum(w_r * g**2) over the gathered g: dL/dx = 2 W x and d|dL/dx|^2/dx = 8 W^2 x on
    each rank's rows, W = sum_r w_r. The backward's untracked in-place all-reduce made the second
    order miss the other ranks' terms (silently, with a torch warning)."""
    results = run_on_ranks(_second_order, world)
    assert all(r[0] == "ok" for r in results), results
    total = sum(SIZES[world])
    weights = torch.linspace(0.5, 2.0, total * 6, dtype=torch.float64).reshape(total, 6)
    w_sum = weights * sum(r + 1 for r in range(world))
    offset = 0
    for r, (_, (first, second)) in enumerate(results):
        n = SIZES[world][r]
        x, w = _rank_data(r, world), w_sum[offset : offset + n]
        torch.testing.assert_close(first, 2 * w * x)
        torch.testing.assert_close(second, 8 * w**2 * x)
        offset += n


def _mismatched_dim(rank: int, world: int):
    return all_gather_no_grad(torch.zeros(2, 4 + rank))


def _inconsistent_labels(rank: int, world: int):
    labels = torch.zeros(3 if rank == 0 else 2, dtype=torch.int64)
    return gather_batch([torch.zeros(2, 4), labels], ["embeddings", "labels"])


def _text_on_one_rank(rank: int, world: int):
    text = torch.zeros(2, 3) if rank == 0 else None
    return gather_batch([torch.zeros(2, 4), text], ["embeddings", "text_embeddings"])


@pytest.mark.parametrize(
    "fn, match",
    [
        (_mismatched_dim, "trailing"),
        (_inconsistent_labels, "rank 0 has inconsistent batch sizes"),
        # One metadata row fewer on rank 1: the exchange's buffers differed and gloo aborted.
        (_text_on_one_rank, "text_embeddings is given on rank(s) [0] but not on [1]"),
    ],
)
def test_bad_shapes_raise_on_every_rank(fn, match):
    results = run_on_ranks(fn, 2)
    for r in results:
        assert r[0] == "error" and "ValueError" in r[1] and match in r[1], r


def _mismatched_label_dtype(rank: int, world: int):
    labels = torch.zeros(2, dtype=torch.int32 if rank == 0 else torch.int64)
    return gather_batch([torch.zeros(2, 4), labels], ["embeddings", "labels"])


def _mismatched_float_dtype(rank: int, world: int):
    return all_gather_with_grad(torch.zeros(2, 4, dtype=torch.float32 if rank == 0 else torch.float64))


@pytest.mark.parametrize("fn, match", [(_mismatched_label_dtype, "labels has different dtypes.*int32.*int64"),
                                       (_mismatched_float_dtype, "x has different dtypes.*float32.*float64")])
def test_different_dtypes_raise_on_every_rank_instead_of_aborting(fn, match):
    """Buffers of different byte sizes in one all_gather abort the process inside gloo."""
    import re

    results = run_on_ranks(fn, 2)
    for r in results:
        assert r[0] == "error" and "ValueError" in r[1] and re.search(match, r[1]), r


def _two_gathers_into_one_sum(rank: int, world: int):
    a = _rank_data(rank, world).requires_grad_()
    b = (2 * _rank_data(rank, world)).requires_grad_()
    # Autograd hands the gradient of the sum to both gathers as one tensor.
    gathered = all_gather_with_grad(a) + all_gather_with_grad(b)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    c = _rank_data(rank, world).requires_grad_()
    upstream = torch.ones(sum(SIZES[world]), 6, dtype=torch.float64)
    all_gather_with_grad(c).backward(upstream)
    return a.grad, b.grad, upstream


@pytest.mark.parametrize("world", [2, 3])
def test_gradient_shared_by_two_gathers_is_reduced_once(world):
    results = run_on_ranks(_two_gathers_into_one_sum, world)
    assert all(r[0] == "ok" for r in results), results
    total = sum(SIZES[world])
    weights = torch.arange(total * 6, dtype=torch.float64).reshape(total, 6) * sum(r + 1 for r in range(world))
    offset = 0
    for r, (_, (grad_a, grad_b, upstream)) in enumerate(results):
        n = SIZES[world][r]
        torch.testing.assert_close(grad_a, weights[offset : offset + n])
        torch.testing.assert_close(grad_b, weights[offset : offset + n])
        torch.testing.assert_close(upstream, torch.ones_like(upstream))  # the caller's tensor is left alone
        offset += n


def test_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    batch = gather_batch([x, None], ["x", "t"])
    assert batch.offset == 0 and batch.sizes == [3] and batch.tensors[1] is None


def test_the_call_fingerprint_takes_numbers_by_value():
    """Ranks passing margin=1 and margin=1.0 (or NumPy scalars) make the same call."""
    import numpy as np

    from torchfg.distributed.gather import _fingerprint

    assert _fingerprint({"margin": 1}) == _fingerprint({"margin": 1.0}) == _fingerprint({"margin": np.float32(1.0)})
    assert _fingerprint({"k": np.int64(3)}) == _fingerprint({"k": 3})
    assert _fingerprint({"k": 2**60}) != _fingerprint({"k": 2**60 + 1})  # beyond float64: exact ints
    assert _fingerprint({"margin": 1}) != _fingerprint({"margin": "1"})
    assert _fingerprint({"a": 1, "b": 2}) == _fingerprint({"b": 2, "a": 1})
    assert _fingerprint({"reduction": "sum"}) != _fingerprint({"reduction": "mean"})


def test_gathered_batch_copies_and_pickles():
    """GatheredBatch (a tuple subclass with a three-argument __new__) could not be copied,
    deep-copied or pickled: tuple's __getnewargs__ passed one tuple."""
    import copy
    import pickle

    from torchfg.distributed.gather import GatheredBatch

    batch = GatheredBatch([torch.arange(3.0), None], 1, [1, 2])
    for clone in (copy.copy(batch), copy.deepcopy(batch), pickle.loads(pickle.dumps(batch))):
        assert isinstance(clone, GatheredBatch) and clone.offset == 1 and clone.sizes == [1, 2]
        assert torch.equal(clone.tensors[0], batch.tensors[0]) and clone.tensors[1] is None


# ----------------------------------------------------------------------------- the status in the shape exchange


def _gather_with_status(rank: int, world: int, case: str):
    """gather_batch with this rank's validation outcome and call (rank 1 differs by ``case``)."""
    x, labels = torch.randn(2 + rank, 4), torch.arange(2 + rank)
    failed = rank == 1 and case == "error"
    error = ValueError("margin must be finite, got nan") if failed else None
    call = {"margin": 0.3 if rank == 1 and case == "call" else 0.2, "reduction": "mean"}
    tensors = [None, None] if failed or case == "nothing" else [x, labels]
    batch = gather_batch(tensors, ["embeddings", "labels"], error=error, call=call)
    return batch.sizes, batch.offset, batch.tensors[1]


@pytest.mark.parametrize("case", ["error", "call"])
def test_an_error_or_another_call_in_the_shape_exchange_raises_on_every_rank(case):
    """A rank whose checks failed passes its error and no tensors (it has none it could check):
    every rank raises before anything is gathered, each with its own error or a ValueError naming
    the other rank's; a different call raises the same way."""
    results = run_on_ranks(_gather_with_status, 2, case)
    assert all(r[0] == "error" for r in results), [r[:2] for r in results]
    if case == "error":
        assert "another rank" in results[0][1] and "margin must be finite" in results[0][1], results[0][1]
        assert "margin must be finite" in results[1][1], results[1][1]
    else:
        for r in results:
            assert "different calls" in r[1] and "margin: rank 0 0.2, rank 1 0.3" in r[1], r[1]


def test_the_status_travels_with_the_shapes_in_one_collective():
    results = run_on_ranks(_gather_with_status, 2, "ok")
    assert all(r[0] == "ok" for r in results), [r[:2] for r in results]
    for r, (_, (sizes, offset, labels)) in enumerate(results):
        assert sizes == [2, 3] and offset == 2 * r
        assert torch.equal(labels, torch.cat([torch.arange(2), torch.arange(3)]))


def test_a_gather_of_no_tensor_gathers_nothing():
    """Only None entries: the row check indexed the first of no given tensors (an IndexError)."""
    results = run_on_ranks(_gather_with_status, 2, "nothing")
    assert all(r[0] == "ok" for r in results), [r[:2] for r in results]
    assert all(r[1] == ([0, 0], 0, None) for r in results), results


def test_an_error_without_process_group_is_raised():
    with pytest.raises(KeyError, match="here"):
        gather_batch([None], ["x"], error=KeyError("here"))
    with pytest.raises(ValueError, match="names must name each of the 2 tensors, got 1"):
        gather_batch([torch.zeros(1), None], ["x"])


def _collectives_of_a_step(rank: int, world: int, kind: str) -> dict[str, int]:
    """How many collectives of each kind one cross_rank step (forward and backward) makes."""
    import torch.distributed as dist

    from torchfg.functional import adaptive_triplet_loss, mine_triplets, triplet_margin_loss
    from torchfg.losses import CrossBatchMemory, TripletMarginLoss

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    labels, text = torch.tensor([0, 0, 1, 1, 2, 2]) + rank, torch.randn(6, 3, generator=g)
    xbm = CrossBatchMemory(TripletMarginLoss(cross_rank=True), 4, 32)
    steps = {
        "batch_hard": lambda: triplet_margin_loss(x, labels, cross_rank=True).backward(),
        "atl": lambda: adaptive_triplet_loss(x, labels, text, cross_rank=True).backward(),
        "mine_triplets": lambda: mine_triplets(x, labels, cross_rank=True),
        "xbm": lambda: xbm(x, labels).backward(),
    }
    counts: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "all_gather_object", "broadcast")}

    def counted(name):
        def collective(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return collective

    for name in originals:
        setattr(dist, name, counted(name))
    try:
        steps[kind]()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return counts


@pytest.mark.parametrize("kind, expected", [
    # The inputs' status and shapes in one all_gather, then one per gathered tensor; the mean's
    # count and the backward's gradient sum are all_reduces.
    ("batch_hard", {"all_gather": 3, "all_reduce": 2}),
    ("atl", {"all_gather": 4, "all_reduce": 2}),
    ("mine_triplets", {"all_gather": 3}),
    # The memory's rows arrive without gradient: no backward collective; the mean's count.
    ("xbm", {"all_gather": 3, "all_reduce": 1}),
])
def test_a_cross_rank_step_exchanges_status_and_shapes_once(kind, expected):
    """The status exchange (an error on any rank, the call's fingerprint) and the shape exchange
    were two all_gathers, each a host synchronisation on NCCL; they are one."""
    results = run_on_ranks(_collectives_of_a_step, 2, kind)
    assert all(r[0] == "ok" for r in results), [r[:2] for r in results]
    for r in results:
        assert r[1] == expected, (kind, r[1])
