"""Listing more triplets than memory holds fails with an error that says so.

The "all" strategy lists every valid triplet, sum over anchors of #positives x #negatives, which
grows as the cube of the batch. Its outputs are sized from the labels before any chunk runs; an
allocation that cannot succeed must say how many triplets and bytes were asked for and what to do,
not surface as a bare allocator error, and must stay the allocator's kind of error (an
out-of-memory error on CUDA) for the handlers that catch it.
"""

from __future__ import annotations

import pytest
import torch

from torchfg.functional import mine_triplets, triplet_margin_loss
from torchfg.functional import _triplet_selection as selection
from torchfg import errors
from torchfg.ops.triplet import reference

# 10**6 rows in 2 classes: 10**6 x 499,999 x 500,000 valid triplets, 2 x 10**18 bytes per index
# array: past any address space, so the allocation fails at once (no memory is touched).
HUGE = 10**6
HUGE_COUNT = HUGE * (HUGE // 2 - 1) * (HUGE // 2)


def _huge_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(HUGE, 1), torch.arange(HUGE) % 2


def _assert_clear(error: BaseException, count: int, outputs: int) -> None:
    message = str(error)
    assert f"{count:,} " in message, message
    assert f"{count * outputs * 8:,} bytes" in message, message
    assert "batch_hard" in message and "semi_hard" in message and "smaller batches" in message, message
    assert isinstance(error, errors.TripletMemoryError)
    assert isinstance(error.__cause__, RuntimeError)
    assert str(error.__cause__) in message  # the allocator's text, for handlers that look for it
    assert len(error.args) == 1


def test_mine_triplets_all_beyond_memory_names_triplets_and_bytes():
    x, labels = _huge_batch()
    with pytest.raises(RuntimeError) as excinfo:
        mine_triplets(x, labels, strategy="all")
    _assert_clear(excinfo.value, HUGE_COUNT, 3)


def test_all_triplets_smooth_loss_beyond_memory_fails_before_any_chunk():
    # smooth: every valid triplet carries a loss, so the selection is sized for all of them.
    x, labels = _huge_batch()
    with pytest.raises(RuntimeError) as excinfo:
        triplet_margin_loss(x, labels, mining="all", smooth=True)
    _assert_clear(excinfo.value, HUGE_COUNT, 5)


class _FailingAllocation:
    """Stands for ChunkOutput where an allocation of more than ``limit`` values fails as ``error``."""

    def __init__(self, limit: int, error: RuntimeError) -> None:
        self.limit, self.error = limit, error

    def __call__(self, capacity: int, device: torch.device, dtype: torch.dtype = torch.int64) -> reference.ChunkOutput:
        if capacity > self.limit:
            raise self.error
        return _REAL_CHUNK_OUTPUT(capacity, device, dtype)


_REAL_CHUNK_OUTPUT = reference.ChunkOutput
_CUDA_OOM = "CUDA out of memory. Tried to allocate 7.45 GiB. GPU 0 has a total capacity of 79.10 GiB"
_CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory"


def test_out_of_memory_stays_an_out_of_memory_error(monkeypatch):
    # On CUDA the allocator raises torch.OutOfMemoryError: code that catches it (to skip a batch,
    # or a batch-size finder) must still catch the clearer error, whose text keeps the original.
    monkeypatch.setattr(reference, "ChunkOutput", _FailingAllocation(0, torch.OutOfMemoryError(_CUDA_OOM)))
    labels = torch.arange(12) % 3
    with pytest.raises(torch.OutOfMemoryError) as excinfo:
        reference.mine_all_triplets_reference(labels, labels, self_offset=0)
    count = 12 * 3 * 8
    _assert_clear(excinfo.value, count, 3)
    assert _CUDA_OOM in str(excinfo.value)


def test_cpu_allocator_error_stays_a_plain_runtime_error(monkeypatch):
    monkeypatch.setattr(reference, "ChunkOutput", _FailingAllocation(0, RuntimeError(_CPU_OOM)))
    labels = torch.arange(12) % 3
    with pytest.raises(RuntimeError) as excinfo:
        reference.mine_all_triplets_reference(labels, labels, self_offset=0)
    assert not isinstance(excinfo.value, torch.OutOfMemoryError)
    _assert_clear(excinfo.value, 12 * 3 * 8, 3)


@pytest.mark.parametrize("with_position", [False, True])
def test_all_triplets_smooth_loss_sizes_its_outputs_once(monkeypatch, with_position):
    # Every valid triplet is kept: the outputs are allocated for all of them before any chunk,
    # where an allocation that fails is reported with their number.
    monkeypatch.setattr(reference, "ChunkOutput", _FailingAllocation(1000, RuntimeError(_CPU_OOM)))
    labels = torch.arange(64) % 2
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError) as excinfo:
        triplet_margin_loss(x, labels, mining="all", smooth=True, reduction="none" if with_position else "mean")
    _assert_clear(excinfo.value, 64 * 31 * 32, 6 if with_position else 5)


def _growth_error(monkeypatch, select) -> BaseException:
    """The error of ``select(x, labels)`` on 48 rows in 4 classes when no output can grow."""
    def fail(self, capacity):
        raise RuntimeError(_CPU_OOM)

    monkeypatch.setattr(reference.ChunkOutput, "ensure", fail)
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(48, 3, generator=g), torch.arange(48) % 4
    with pytest.raises(RuntimeError) as excinfo:
        select(x, labels)
    error = excinfo.value
    assert "smaller batches" in str(error) and str(error.__cause__) in str(error)
    assert isinstance(error, errors.TripletMemoryError) and isinstance(error.__cause__, RuntimeError)
    return error


def test_select_triplets_growth_beyond_memory_names_the_projection(monkeypatch):
    # With a margin the kept triplets are not known beforehand: the outputs grow, sized from the
    # share kept so far, and a growth that cannot be allocated is reported the same way.
    error = _growth_error(monkeypatch, lambda x, labels: selection.select_triplets(
        x, labels, x, labels, 0, metric="euclidean", interval=selection.violating(0.5)))
    assert "selected triplets (those found so far)" in str(error)


def test_select_triplets_pair_growth_beyond_memory_names_the_pairs(monkeypatch):
    # Every valid triplet kept (smooth): the triplet outputs are sized once, so the only growth is
    # the (anchor, candidate) pair lists of the exact distances; a failure there names them too.
    error = _growth_error(monkeypatch, lambda x, labels: triplet_margin_loss(x, labels, mining="all", smooth=True))
    assert "(anchor, candidate) pairs of selected triplets" in str(error)


def test_select_triplets_projection_failure_retries_at_the_found_size(monkeypatch):
    # A projected growth that cannot be allocated is a guess, not an error: the outputs grow to the
    # values found so far instead, and the result is the one an unconstrained run gives. The
    # projections here are 2**60 values: a real allocation that fails at once.
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(40, 3, generator=g), torch.arange(40) % 5
    expected = triplet_margin_loss(x, labels, mining="all", margin=0.3)
    projections = []

    def impossible(stop, capacity, done, total, limit):
        projections.append(stop)
        return 2**60

    monkeypatch.setattr(selection, "_grown_capacity", impossible)
    torch.testing.assert_close(triplet_margin_loss(x, labels, mining="all", margin=0.3), expected, rtol=0, atol=0)
    assert len(projections) >= 2  # the triplet outputs and the pair lists both fell back
