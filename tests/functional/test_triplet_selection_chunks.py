"""Chunked triplet mining keeps no per-chunk tensor alive past its chunk.

Results collected as lists of per-chunk tensors outlive their chunk: on the CPU glibc places
those small blocks in the heap space that the chunk's (chunk x M) temporaries have just freed,
the next chunk's temporaries no longer fit there, and the heap grows by about one block per
chunk (RSS ~ N x M, and worse for the all-triplets loss, while live tensors stay flat). The
structural property tested here: the peak number of live tensors created during a call does not
grow with the number of chunks.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchfg.functional import _triplet_selection as selection
from torchfg.ops.triplet import reference


class _LiveTensors(TorchDispatchMode):
    """Peak number of simultaneously live tensors returned by the ops run under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}  # by id: tensors compare elementwise

    def _track(self, t: torch.Tensor) -> None:
        ref = self._refs.get(id(t))
        if ref is not None and ref() is t:  # an in-place or out= op returns a tracked tensor
            return
        key = id(t)

        def release(_ref, key=key):
            self.live -= 1
            if self._refs.get(key) is _ref:
                del self._refs[key]

        self._refs[key] = weakref.ref(t, release)
        self.live += 1
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _peak_live(fn) -> int:
    mode = _LiveTensors()
    with mode:
        result = fn()
    del result
    return mode.peak


def _batch(n: int = 48, d: int = 3, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % classes


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_semi_hard_reference_live_tensors_do_not_grow_with_chunks(metric):
    x, labels = _batch()

    def mine(chunk_rows):
        return lambda: reference.mine_semi_hard_reference(x, x, labels, labels, metric=metric, self_offset=0,
                                                          chunk_rows=chunk_rows)

    few, many = _peak_live(mine(24)), _peak_live(mine(2))  # 2 chunks against 24
    assert many <= few + 4, (few, many)


def test_all_triplets_reference_live_tensors_do_not_grow_with_chunks():
    _, labels = _batch()

    def mine(chunk_rows):
        return lambda: reference.mine_all_triplets_reference(labels, labels, self_offset=0, chunk_rows=chunk_rows)

    few, many = _peak_live(mine(24)), _peak_live(mine(2))
    assert many <= few + 4, (few, many)


@pytest.mark.parametrize("with_position", [False, True])
def test_select_triplets_live_tensors_do_not_grow_with_chunks(monkeypatch, with_position):
    x, labels = _batch()
    x = x.requires_grad_(True)

    def select():
        return selection.select_triplets(x, labels, x, labels, 0, metric="euclidean",
                                         interval=selection.violating(0.5), with_position=with_position)

    monkeypatch.setattr(selection, "BLOCK_ELEMENTS", 24 * 48)  # 2 chunks of anchors
    few = _peak_live(select)
    monkeypatch.setattr(selection, "BLOCK_ELEMENTS", 2 * 48)  # 24 chunks
    many = _peak_live(select)
    assert many <= few + 4, (few, many)


def test_sample_triplets_live_tensors_do_not_grow_with_chunks(monkeypatch):
    _, labels = _batch()

    def sample():
        return selection.sample_triplets(labels, labels, 0, 2, torch.Generator().manual_seed(0))

    monkeypatch.setattr(selection, "BLOCK_ELEMENTS", 24 * 48)
    few = _peak_live(sample)
    monkeypatch.setattr(selection, "BLOCK_ELEMENTS", 2 * 48)
    many = _peak_live(sample)
    assert many <= few + 4, (few, many)


def test_chunk_output_grows_and_trims():
    from torchfg.ops.triplet.reference import ChunkOutput

    out = ChunkOutput(2, torch.device("cpu"))
    out.append(torch.arange(2))
    out.append(torch.arange(3))  # past the capacity: grown
    values = out.result()
    assert values.tolist() == [0, 1, 0, 1, 2]
    assert values.untyped_storage().nbytes() == 5 * values.element_size()  # trimmed to its size
    exact = ChunkOutput(3, torch.device("cpu"))
    exact.append(torch.arange(3))
    buffer = exact.buffer
    assert exact.result() is buffer  # filled exactly: no copy
    empty = ChunkOutput(4, torch.device("cpu")).result()
    assert empty.numel() == 0 and empty.untyped_storage().nbytes() == 0
