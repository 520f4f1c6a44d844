"""torchfg.knn: every backend against an fp64 brute force, faiss-cpu, bad input, torchfg/csrc compile check."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TEST_DEVICE, backends_to_test, requires_triton
from torchfg import knn
from torchfg.backends import BackendUnavailableError
from torchfg.ops.knn import knn_search
from torchfg.ops.knn import cpu as cpu_module
from torchfg.ops.knn import reference as ref_module
from torch.utils._python_dispatch import TorchDispatchMode
from torchfg.ops.metric import METRICS

ROOT = Path(__file__).resolve().parents[2]

# Distances of O(D) magnitude computed in fp32 against fp64 brute force.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def brute_force_matrix(query: torch.Tensor, gallery: torch.Tensor, metric: str) -> torch.Tensor:
    """(Q, G) fp64 distances from explicit differences / normalised rows: independent of the fast paths."""
    q, g = query.double().cpu(), gallery.double().cpu()
    if metric in ("sqeuclidean", "euclidean"):
        sq = (q.unsqueeze(1) - g.unsqueeze(0)).square().sum(-1)
        return sq if metric == "sqeuclidean" else sq.sqrt()
    if metric == "dot":
        return -(q @ g.T)
    qn, gn = q.norm(dim=1, keepdim=True), g.norm(dim=1, keepdim=True)
    qh = torch.where(qn > 0, q / qn.clamp_min(1e-300), 0.0)
    gh = torch.where(gn > 0, g / gn.clamp_min(1e-300), 0.0)
    return 1 - qh @ gh.T


def brute_force_knn(query, gallery, k, metric, exclude_self=False):
    """(distances, indices) in fp64 with a stable sort: ties go to the lower index."""
    full = brute_force_matrix(query, query if gallery is None else gallery, metric)
    if exclude_self:
        rows = torch.arange(query.shape[0])
        full[rows, rows] = float("inf")
    order = torch.sort(full, dim=1, stable=True).indices[:, :k]
    return full.gather(1, order), order, full


def assert_knn_matches(distances, indices, query, gallery, k, metric, exclude_self=False, tol=1e-4):
    """Distances match the brute force position by position; indices match wherever the brute-force
    distance is separated by more than ``tol`` from its neighbours (near-ties may legitimately swap
    under rounding); ties in the output are ordered by index; every index is a valid, distinct row."""
    num_query = query.shape[0]
    assert distances.shape == (num_query, k) and indices.shape == (num_query, k)
    assert indices.dtype == torch.int64
    assert distances.dtype == query.dtype
    distances, indices = distances.double().cpu(), indices.cpu()
    ref_d, ref_i, full = brute_force_knn(query, gallery, k, metric, exclude_self)
    num_gallery = full.shape[1]
    assert ((indices >= 0) & (indices < num_gallery)).all()
    assert not torch.isnan(distances).any()
    assert (torch.sort(indices, dim=1).values.diff(dim=1) > 0).all(), "indices must be distinct"
    if exclude_self:
        assert (indices != torch.arange(num_query).unsqueeze(1)).all()
    scale = 1.0 + full.abs().amax()
    atol = tol * float(scale)
    torch.testing.assert_close(distances, ref_d, atol=atol, rtol=0)
    # The pairs returned are at the distance reported.
    torch.testing.assert_close(full.gather(1, indices), distances, atol=atol, rtol=0)
    assert (distances.diff(dim=1) >= 0).all()
    if query.dtype not in (torch.float16, torch.bfloat16):
        # (Half outputs are rounded from the fp32 distances that decided the order, so rounding
        # may create equal values that were not ties.)
        same = distances.diff(dim=1) == 0
        assert (indices.diff(dim=1)[same] > 0).all(), "equal distances must be ordered by index"
    # Where the brute-force order is unambiguous, the indices must be identical.
    gaps = torch.sort(full, dim=1, stable=True).values.diff(dim=1)
    pad = torch.full((num_query, 1), float("inf"), dtype=gaps.dtype)
    before, after = torch.cat([pad, gaps], 1)[:, :k], torch.cat([gaps, pad], 1)[:, :k]
    separated = (before > 2 * atol) & (after > 2 * atol)
    assert torch.equal(indices[separated], ref_i[separated])


def integer_data(gen, rows, dim, low=-2, high=3):
    """Small integers: every product and sum is exact in fp32, so equal distances are exact ties."""
    return torch.randint(low, high, (rows, dim), generator=gen).float()


# ---------------------------------------------------------------------------------------------
# torch backend (the reference) against brute force


@given(
    num_query=st.integers(1, 40),
    num_gallery=st.integers(1, 60),
    dim=st.integers(1, 20),
    k_frac=st.floats(0, 1),
    metric=st.sampled_from(METRICS),
    self_search=st.booleans(),
    exclude_self=st.booleans(),
    chunk=st.sampled_from([None, 1, 3, 7]),
    integers=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_equals_brute_force(
    num_query, num_gallery, dim, k_frac, metric, self_search, exclude_self, chunk, integers, seed
):
    gen = torch.Generator().manual_seed(seed)
    draw = (lambda r: integer_data(gen, r, dim)) if integers else (lambda r: torch.randn(r, dim, generator=gen))
    query = draw(num_query)
    gallery = None if self_search else draw(max(num_gallery, num_query if exclude_self else 0))
    num_g = num_query if gallery is None else gallery.shape[0]
    eligible = num_g - int(exclude_self)
    if eligible < 1:
        return
    k = 1 + int(k_frac * (eligible - 1))
    d, i = knn(query, gallery, k, metric=metric, exclude_self=exclude_self, backend="torch", chunk_size=chunk)
    if integers and metric != "cosine":
        # Exact arithmetic: identical distances and identical (tie-broken) indices.
        ref_d, ref_i, _ = brute_force_knn(query, gallery, k, metric, exclude_self)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(d.double(), ref_d, atol=1e-6 if metric == "euclidean" else 0, rtol=1e-6)
    else:
        assert_knn_matches(d, i, query, gallery, k, metric, exclude_self)


@pytest.mark.parametrize("metric", METRICS)
def test_edge_shapes_k1_kG_q1_d1(metric):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(9, 1, generator=gen, dtype=torch.float64)
    q = torch.randn(1, 1, generator=gen, dtype=torch.float64)
    for k in (1, 9):
        d, i = knn(q, g, k, metric=metric, backend="torch")
        assert_knn_matches(d, i, q, g, k, metric, tol=1e-9)
    d, i = knn(g, k=8, metric=metric, exclude_self=True, backend="torch")
    assert_knn_matches(d, i, g, None, 8, metric, exclude_self=True, tol=1e-9)


def test_symmetric_path_tiles(monkeypatch):
    """Self-search over symmetric tiles of 8 rows (a partial last tile), 37 points with ties."""
    # Counts the reference's own searches (the compiled selection may search twice: test_knn_cpu.py).
    monkeypatch.setattr(cpu_module, "enabled", False)
    calls = []
    real_symmetric = ref_module._knn_symmetric
    monkeypatch.setattr(ref_module, "_knn_symmetric", lambda *a: calls.append(1) or real_symmetric(*a))
    gen = torch.Generator().manual_seed(11)
    x = integer_data(gen, 37, 3, -1, 2)
    for metric in ("sqeuclidean", "euclidean", "dot"):
        for exclude in (False, True):
            k = 36 if exclude else 37
            for kk in (1, 5, k):
                d, i = knn(x, k=kk, metric=metric, exclude_self=exclude, backend="torch", chunk_size=8)
                ref_d, ref_i, _ = brute_force_knn(x, None, kk, metric, exclude)
                assert torch.equal(i, ref_i), (metric, exclude, kk)
                torch.testing.assert_close(d.double(), ref_d, atol=1e-6, rtol=0)
    assert len(calls) == 2 * 3 * 3


@pytest.mark.parametrize("k", [7, 40])
def test_default_cpu_tiles_cover_a_partial_last_tile(monkeypatch, k):
    """With no chunk_size a CPU self-search of 2 * tile + 37 rows takes the symmetric path at the
    default tile side: exact on integer data with ties, for a small and a large k."""
    tile = ref_module.default_tile_size(torch.device("cpu"), 2 * 1024 + 37)
    assert tile == 1024 and ref_module.default_tile_size(torch.device("cpu"), 8192) == 2048
    # The PyTorch selection's default tiles (the compiled one has its own: test_knn_cpu.py).
    monkeypatch.setattr(cpu_module, "enabled", False)
    tiles_seen = []
    real_symmetric = ref_module._knn_symmetric
    monkeypatch.setattr(ref_module, "_knn_symmetric", lambda *a: tiles_seen.append(a[4]) or real_symmetric(*a))
    x = integer_data(torch.Generator().manual_seed(k), 2 * tile + 37, 3, -2, 3)
    d, i = knn(x, k=k, metric="sqeuclidean", exclude_self=True, backend="torch")
    ref_d, ref_i, _ = brute_force_knn(x, None, k, "sqeuclidean", True)
    assert tiles_seen == [tile]
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(d.double(), ref_d, atol=0, rtol=0)


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed_view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("finish_kind", ["sqrt", "aux_sqrt", "plus_one", "plus_one_clamped", "identity"])
def test_smallest_k_where_the_finish_merges_keys_at_the_cut(finish_kind, dtype, transposed):
    """Raw keys a few ulps apart, which the finish (sqrt, + |q|^2 with a large |q|^2, + 1) maps to
    equal distances: the k selected are the k smallest (distance, column) pairs of the finished
    block, as an explicit full sort finds them. Also for a block that is a transposed view (the
    symmetric search's second selection reads its tile that way)."""
    gen = torch.Generator().manual_seed(hash(finish_kind) % 2**16)
    rows, width = 37, 211
    aux = (torch.rand(rows, generator=gen, dtype=torch.float64) * 1e6).to(dtype)
    finishes = {
        "sqrt": lambda raw, r: raw.clamp_min(0.0).sqrt(),
        "aux_sqrt": lambda raw, r: (raw + aux[r].unsqueeze(1)).clamp_min(0.0).sqrt(),
        "plus_one": lambda raw, r: raw + 1.0,
        "plus_one_clamped": lambda raw, r: (raw + 1.0).clamp_min(0.0),  # cosine's finish
        "identity": lambda raw, r: raw,
    }
    finish = finishes[finish_kind]
    # plus_one_clamped: raw keys in (-1.5, -0.75], so some finish to 0 and tie there.
    base = {"sqrt": 1024.0, "aux_sqrt": 1.0, "plus_one": -0.5, "plus_one_clamped": -0.75, "identity": 3.0}[finish_kind]
    for trial in range(4):
        # A few base values, each spread over 0-40 ulps: long runs of keys that merge when finished.
        levels = base * (1 + torch.rand(rows, 6, generator=gen, dtype=torch.float64)).to(dtype)
        block = levels.gather(1, torch.randint(0, 6, (rows, width), generator=gen))
        ulps = torch.randint(0, 40, (rows, width), generator=gen)
        for _ in range(int(ulps.max())):
            block = torch.where(ulps > 0, torch.nextafter(block, torch.full_like(block, float("inf"))), block)
            ulps = ulps - 1
        if transposed:
            block = block.t().contiguous().t()
        for k in (1, 7, 50, width - 1):
            distances, columns = ref_module.smallest_k(block, k, finish)
            full = finish(block, torch.arange(rows))
            by_column = torch.arange(width).expand(rows, width)
            expected_d, expected_c = ref_module.sort_by_distance_then_index(full, by_column)
            assert torch.equal(columns, expected_c[:, :k]), (finish_kind, trial, k)
            assert torch.equal(distances, expected_d[:, :k]), (finish_kind, trial, k)


def merging_keys(gen, rows, width, base, dtype=torch.float32, levels=6, spread=40):
    """Raw keys on a few levels, each spread over 0-``spread`` ulps: runs that finish to equal
    distances under sqrt or + 1, and exact ties."""
    values = base * (1 + torch.rand(rows, levels, generator=gen, dtype=torch.float64)).to(dtype)
    block = values.gather(1, torch.randint(0, levels, (rows, width), generator=gen))
    ulps = torch.randint(0, spread, (rows, width), generator=gen)
    for _ in range(int(ulps.max())):
        block = torch.where(ulps > 0, torch.nextafter(block, torch.full_like(block, float("inf"))), block)
        ulps = ulps - 1
    return block


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed_view"])
@pytest.mark.parametrize("finish_kind", ["sqrt", "plus_one", "plus_one_clamped", "identity"])
def test_bounded_pool_equals_a_full_sort(finish_kind, transposed):
    """The symmetric search's running-bound pool, offered a row block tile by tile (tiles of
    widths that group by 4, by 2 and not at all, with a partial last group), returns exactly the
    k smallest (distance, column) pairs of the whole finished row, on keys with exact ties and
    with runs that the finish merges; an excluded diagonal (+inf) is never returned."""
    gen = torch.Generator().manual_seed(len(finish_kind) + 10 * transposed)
    finish = {
        "sqrt": lambda raw, r: raw.clamp_min(0.0).sqrt(),
        "plus_one": lambda raw, r: raw + 1.0,
        "plus_one_clamped": lambda raw, r: (raw + 1.0).clamp_min(0.0),  # cosine's finish
        "identity": lambda raw, r: raw,
    }[finish_kind]
    base = {"sqrt": 1024.0, "plus_one": -0.5, "plus_one_clamped": -0.75, "identity": 3.0}[finish_kind]
    rows, widths = 37, [64, 66, 50, 64, 13, 64]
    seen_sizes = set()
    for k in (1, 3, 6, 7):
        for trial in range(3):
            full = merging_keys(gen, rows, sum(widths), base, levels=3 if trial == 0 else 6)
            full[torch.arange(rows), torch.randint(0, sum(widths), (rows,), generator=gen)] = float("inf")
            pool = ref_module._BoundedPool(k, rows, finish, full.dtype, full.device)
            offset = 0
            for width in widths:
                seen_sizes.add(ref_module._bounded_group_size(width, k))
                tile = full[:, offset : offset + width]
                pool.offer(tile.t().contiguous().t() if transposed else tile.contiguous(), offset)
                offset += width
            distances, columns = pool.result()
            columns_all = torch.arange(full.shape[1]).expand_as(full)
            expected_d, expected_c = ref_module.sort_by_distance_then_index(finish(full, None), columns_all)
            assert columns.dtype == torch.int64
            assert torch.equal(columns, expected_c[:, :k]), (k, trial)
            assert torch.equal(distances, expected_d[:, :k]), (k, trial)
    assert seen_sizes == {0, 2, 4}, seen_sizes


def test_symmetric_search_with_running_bounds(monkeypatch):
    """A self-search over enough tiles per side to take the running-bound pools, on integer data
    (exact ties everywhere) with a partial last tile: equal to the brute force, index for index."""
    # The running bounds belong to the pure PyTorch selection (the compiled one has its own test file).
    monkeypatch.setattr(cpu_module, "enabled", False)
    calls = []
    real = ref_module._use_running_bounds
    monkeypatch.setattr(ref_module, "_use_running_bounds", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(ref_module, "_BOUNDED_MIN_K", 1)
    tile = 32
    x = integer_data(torch.Generator().manual_seed(3), ref_module._BOUNDED_MIN_TILES * tile + 7, 3, -2, 3)
    for metric in ("sqeuclidean", "euclidean", "dot", "cosine"):
        for exclude in (False, True):
            for k in (1, 4, 8):
                d, i = knn(x, k=k, metric=metric, exclude_self=exclude, backend="torch", chunk_size=tile)
                ref_d, ref_i, _ = brute_force_knn(x, None, k, metric, exclude)
                if metric == "cosine":
                    # Unit rows are rounded: compare as the other metrics' near-ties allow.
                    assert_knn_matches(d, i, x, None, k, metric, exclude_self=exclude)
                    continue
                assert torch.equal(i, ref_i), (metric, exclude, k)
                torch.testing.assert_close(d.double(), ref_d, atol=1e-6, rtol=0)
    assert calls == [True] * (4 * 2 * 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_running_bounds_with_one_column_tails_and_a_one_row_tile(monkeypatch, dtype):
    """Tiles of 33 columns leave a one-column tail after the groups, and 8 * 33 + 1 rows a last
    tile of one row. A one-column slice of a transposed tile (or a one-row tile) is already
    contiguous, so the pool kept a view of the GEMM buffer that the next tile overwrote (wrong
    neighbours), and the selection's scatter of a one-row tile into itself raised."""
    monkeypatch.setattr(cpu_module, "enabled", False)
    monkeypatch.setattr(ref_module, "_BOUNDED_MIN_K", 1)
    calls = []
    real = ref_module._use_running_bounds
    monkeypatch.setattr(ref_module, "_use_running_bounds", lambda *a: calls.append(real(*a)) or calls[-1])
    tile = 33
    generator = torch.Generator().manual_seed(11)
    for n in (ref_module._BOUNDED_MIN_TILES * tile + 1, ref_module._BOUNDED_MIN_TILES * tile + 2):
        x = torch.randn(n, 4, generator=generator, dtype=dtype)
        for k in (4, 8):  # groups of 4 and of 2 columns: 33 = 8 * 4 + 1 = 16 * 2 + 1
            d, i = knn(x, k=k, metric="euclidean", backend="torch", chunk_size=tile)
            assert_knn_matches(d, i, x, None, k, "euclidean")
    assert calls and all(calls)


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed_view"])
def test_smallest_raw_matches_topk_where_it_discards_groups(transposed):
    """The grouped selection (group minima, then the candidates of the best groups) returns the
    values torch.topk returns, and columns that hold them, on odd widths (a partial last group)
    and with many ties; the widths cover every group size and the plain-topk fallback."""
    gen = torch.Generator().manual_seed(5)
    seen_sizes = set()
    for rows, width, count in [(9, 4099, 2), (33, 1031, 11), (17, 1000, 5), (5, 333, 2), (7, 200, 6), (12, 96, 7), (3, 64, 4)]:
        seen_sizes.add(ref_module._group_size(width, count))
        for levels in (3, 1000):
            block = torch.randint(0, levels, (rows, width), generator=gen).float()
            if transposed:
                block = block.t().contiguous().t()
            values, columns = ref_module.smallest_raw(block, count)
            expected = torch.topk(block, count, dim=1, largest=False, sorted=True).values
            assert torch.equal(values, expected), (rows, width, count, levels)
            assert torch.equal(block.gather(1, columns), values)
            # Distinct columns per row.
            assert bool((columns.sort(1).values.diff(1) > 0).all())
    assert seen_sizes == {1, 2, 4, 8, 16}, seen_sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_exact_recomputation_over_many_blocks(monkeypatch, metric, dtype):
    """The recomputation of the selected distances in cache-sized blocks (here 3-4 rows per block,
    with a partial last block) equals the brute force for every metric, input dtype and a zero row."""
    import torchfg.ops.knn as knn_module

    gen = torch.Generator().manual_seed(5)
    query = torch.randn(23, 9, generator=gen).to(dtype)
    gallery = torch.randn(31, 9, generator=gen).to(dtype)
    query[4] = 0.0
    gallery[7] = 0.0
    k = 5
    monkeypatch.setattr(knn_module, "_RECOMPUTE_BLOCK_CPU", 3 * k * 9 + 7)
    d, i = knn(query, gallery, k, metric=metric, backend="torch")
    assert_knn_matches(d, i, query, gallery, k, metric, tol=TOL[dtype])
    full = brute_force_matrix(query, gallery, metric)
    torch.testing.assert_close(d.double(), full.gather(1, i).to(dtype).double(), atol=TOL[dtype], rtol=0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_kernel_searches_recompute_with_the_pair_kernel(monkeypatch, metric, dtype):
    """The Triton search recomputes its k winners with the selected-pair kernel (one launch, not
    the chunked loop), and the result equals the brute force, zero rows included."""
    import torchfg.ops.pair_distances.triton as pair_triton

    calls = []
    real = pair_triton.anchor_pair_distances_triton

    def counted(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(pair_triton, "anchor_pair_distances_triton", counted)
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(21, 11, generator=gen).to(dtype)
    gallery = torch.randn(37, 11, generator=gen).to(dtype)
    query[4] = 0.0
    gallery[7] = 0.0
    gallery[12] = query[2]  # a duplicate: distance exactly 0
    k = 6
    d, i = knn(query.to(TEST_DEVICE), gallery.to(TEST_DEVICE), k, metric=metric, backend="triton")
    assert calls == ["sqeuclidean" if metric == "cosine" else metric]
    d, i = d.cpu(), i.cpu()
    assert_knn_matches(d, i, query, gallery, k, metric, tol=TOL[dtype])
    full = brute_force_matrix(query, gallery, metric)
    torch.testing.assert_close(d.double(), full.gather(1, i).to(dtype).double(), atol=TOL[dtype], rtol=0)
    if metric != "dot":
        assert i[2, 0] == 12 and d[2, 0] == 0


def test_self_search_puts_each_row_first_at_distance_zero():
    x = torch.randn(45, 6)
    x[3] = 0.0  # cosine: a zero row is at distance 1 from everything, itself included
    for metric in ("sqeuclidean", "euclidean", "cosine"):
        d, i = knn(x, k=3, metric=metric, backend="torch")
        rows = torch.arange(45)
        nonzero = rows != 3
        assert torch.equal(i[nonzero, 0], rows[nonzero]), metric
        assert (d[nonzero, 0] == 0).all(), metric
    d, i = knn(x, k=3, metric="cosine", backend="torch")
    assert (d[3] == 1).all()


class _RecordOutputs(TorchDispatchMode):
    """Records the element count of every tensor any ATen op returns (empty, mm, addmm, cdist, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torchfg":
            # A custom op is opaque to the mode (it runs with the mode popped): its Python
            # implementation runs under the mode instead, so that its allocations are recorded.
            # Without this the guards below saw only the op's (Q, k) outputs and could not fail.
            from torchfg.ops._library import python_kernel

            with self:
                return python_kernel(func)(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        # Views, no-op conversions and out= results reuse an input's memory: not recorded.
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), leaf.numel()))
        return out


def test_dispatch_recorder_sees_a_query_by_gallery_matrix(monkeypatch):
    """The guard below can fail: an addmm / @ / cdist (Q, G) result is recorded, also inside the
    knn custom op (a search in one chunk makes a (Q, G) block)."""
    import torchfg.ops.knn.reference as reference

    q, g = torch.randn(61, 4), torch.randn(53, 4)
    for make in (lambda: q @ g.T, lambda: torch.cdist(q, g), lambda: torch.addmm(torch.zeros(1), q, g.T)):
        with _RecordOutputs() as rec:
            make()
        assert max(n for _, n in rec.sizes) >= 61 * 53
    with _RecordOutputs() as rec:
        knn(q, g, 4, metric="dot", backend="torch", chunk_size=61)
    assert max(n for name, n in rec.sizes if "torchfg" not in name) >= 61 * 53


def test_reference_never_allocates_query_by_gallery():
    """Memory: no tensor of Q x G elements is produced by ANY op (chunk 5 of 61 queries against 53 rows)."""
    q, g = torch.randn(61, 4), torch.randn(53, 4)
    with _RecordOutputs() as rec:
        knn(q, g, 4, metric="dot", backend="torch", chunk_size=5)
        knn(q, g, 4, metric="euclidean", backend="torch", chunk_size=5)
        knn(q, k=4, metric="cosine", backend="torch", chunk_size=16)
    assert rec.sizes
    biggest = max(rec.sizes, key=lambda item: item[1])
    assert biggest[1] <= 16 * 61 < 61 * 53, biggest


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_many_queries_against_a_tiny_gallery_copy_the_queries_at_most_once(metric):
    """Q = 3000 queries against G = 3 < D rows: the only (Q, D) result is the unit rows (cosine),
    which the search and the recomputation share. The search negated its whole chunk (the chunk is
    all Q rows when G is tiny), the recomputation compared every element with 0 for the zero-row
    masks, and both normalised the rows: 4 copies for cosine, at 3.2x the time of normalise + mm +
    topk, then 2 (2.2x at Q = 1M). The answers are checked against the brute force."""
    gen = torch.Generator().manual_seed(11)
    q, g = torch.randn(3000, 24, generator=gen), torch.randn(3, 24, generator=gen)
    q[7] = 0.0
    with _RecordOutputs() as rec:
        d, i = knn(q, g, 2, metric=metric, backend="torch")
    copies = [name for name, n in rec.sizes if n >= q.numel()]
    assert len(copies) <= (1 if metric == "cosine" else 0), copies
    assert_knn_matches(d, i, q, g, 2, metric, tol=TOL[torch.float32])
    if metric == "cosine":
        assert d[7].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("compiled", [True, False])
def test_cosine_self_search_normalises_the_rows_once(compiled, monkeypatch):
    """A tiled cosine self-search makes three (N, D) results: the unit rows, their negation (the
    left operand of the symmetric tiles) and the diagonal's zero-row test. It normalised the rows
    twice more: as the query and as the gallery of the recomputation. The answers are checked
    against the brute force, with a zero row and a scaled copy of another row."""
    if not compiled:
        monkeypatch.setenv("TORCHFG_CPU_KERNELS", "0")
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1100, 24, generator=gen)
    x[7] = 0.0
    x[9] = 2 * x[4]  # a power of two: the same unit row
    with _RecordOutputs() as rec:
        d, i = knn(x, k=5, metric="cosine", backend="torch", chunk_size=300)
    # Exactly (N, D) elements: the (300, 300) tile buffers are larger.
    copies = [name for name, n in rec.sizes if n == x.numel()]
    assert len(copies) <= 3, copies
    assert_knn_matches(d, i, x, x, 5, "cosine", tol=TOL[torch.float32])
    assert i[4, :2].tolist() == [4, 9] and d[4, :2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch_selection"])
def test_a_long_gallery_is_searched_in_column_tiles(compiled, monkeypatch):
    """Queries against a gallery too long for the block budget at the minimum query chunk: the
    gallery is cut into column tiles whose selections merge. The block was (256, G) whatever G
    (1 KiB per gallery row: 4.3 GB against 4M rows). Scaled down here (a 6 KiB budget, chunks of
    at least 12 rows, tiles of 128 columns): no result holds more than the budget's elements, and integer data give the
    brute force's exact neighbours, ties by index, with the excluded and own columns in any tile.
    The PyTorch selection's tiles are 4x wider (a 1.5 KiB budget, the same tiles)."""
    if not compiled:
        monkeypatch.setenv("TORCHFG_CPU_KERNELS", "0")
    monkeypatch.setattr(ref_module, "_CPU_BLOCK_BYTES", 6 * 1024 if compiled else 6 * 256)
    monkeypatch.setattr(ref_module, "_CPU_MIN_CHUNK", 12)
    gen = torch.Generator().manual_seed(13)
    q = torch.randint(-3, 4, (23, 3), generator=gen).float()
    g = torch.randint(-3, 4, (907, 3), generator=gen).float()
    g[400:423] = q  # query i's copy, a column of a middle tile
    knn(q[:2], g[:5], 1, metric="dot", backend="torch")  # the compiled kernel's first-use self-check, unrecorded
    for metric in ("sqeuclidean", "dot", "euclidean", "cosine"):
        for exclude_self, k in ((False, 17), (True, 9)):
            with _RecordOutputs() as rec:
                d, i = knn(q, g, k, metric=metric, exclude_self=exclude_self, backend="torch")
            # The budget's fp32 elements, or a (G, D) result (the gallery's norms, its unit rows).
            biggest = max(rec.sizes, key=lambda item: item[1])
            assert biggest[1] <= max(2 * 6 * 1024 // 4, g.numel()) < 12 * 907, (metric, biggest)
            assert_knn_matches(d, i, q, g, k, metric, exclude_self=exclude_self, tol=TOL[torch.float32])
            if metric != "cosine":
                full = brute_force_knn(q, g, k, metric, exclude_self)[2]
                order = torch.sort(full, dim=1, stable=True)
                assert torch.equal(i, order.indices[:, :k]), metric
    # Excluded columns in later tiles (query i is gallery row i, up to row 199), a self-search
    # below two symmetric tiles with the own column in every tile, and 21 tiles with k >= 32 (the
    # PyTorch selection's running-bound pool).
    wide = torch.randint(-3, 4, (2600, 3), generator=gen).float()
    bounded = []
    monkeypatch.setattr(ref_module, "_BoundedPool", lambda *a, pool=ref_module._BoundedPool: bounded.append(1) or pool(*a))
    for query, gallery, exclude_self, k in ((wide[:200], wide[:907], True, 6), (wide[:400], None, False, 5),
                                            (wide[:50], wide, False, 32)):
        d, i = knn(query, gallery, k, metric="sqeuclidean", exclude_self=exclude_self, backend="torch")
        full = brute_force_knn(query, gallery, k, "sqeuclidean", exclude_self)[2]
        order = torch.sort(full, dim=1, stable=True)
        assert torch.equal(i, order.indices[:, :k]) and torch.equal(d.double(), order.values[:, :k])
    assert bool(bounded) == (not compiled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_unit_rows_masks_from_the_norms_equal_the_elementwise_test(dtype):
    """The recomputation's zero-row masks come from the inverse norms instead of an (R, D)
    comparison: the same mask as comparing the unit rows with 0, on zero rows, rows whose squares
    underflow, subnormal and huge rows, and D = 0 and 1."""
    from torchfg.ops.metric import nonzero_rows, unit_and_nonzero_rows, unit_rows

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tiny = torch.finfo(dtype).tiny
    for width in (0, 1, 5, 33):
        x = torch.randn(12, width, generator=torch.Generator().manual_seed(width)).to(dtype)
        if width:
            x[1] = 0.0
            x[2] = 1e-30 if dtype != torch.float64 else 1e-170  # squares underflow
            x[3, 0] = tiny / 4 if dtype != torch.bfloat16 else tiny  # subnormal (bf16: smallest normal)
            x[4] = x[4] * 1e15 if dtype != torch.bfloat16 else x[4] * 1e15
            x[5] = -0.0
        unit, mask = unit_and_nonzero_rows(x, acc)
        assert torch.equal(unit, unit_rows(x, acc))
        assert torch.equal(mask, nonzero_rows(unit)), (width, mask, nonzero_rows(unit))
        if width:
            assert not mask[1] and not mask[5] and mask[0]


def test_bf16_and_fp16_inputs_return_input_dtype():
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(20, 16, generator=gen).to(dtype)
        g = torch.randn(50, 16, generator=gen).to(dtype)
        d, i = knn(q, g, 6, metric="euclidean", backend="torch")
        assert d.dtype == dtype
        assert_knn_matches(d, i, q, g, 6, "euclidean", tol=TOL[dtype])


def test_empty_query_and_zero_dim():
    d, i = knn(torch.randn(0, 4), torch.randn(5, 4), 3, backend="torch")
    assert d.shape == (0, 3) and i.shape == (0, 3)
    # D = 0: every distance is 0 (cosine: 1), ties resolved by index.
    d, i = knn(torch.randn(3, 0), torch.randn(5, 0), 2, metric="sqeuclidean", backend="torch")
    assert torch.equal(i, torch.tensor([[0, 1]] * 3)) and (d == 0).all()
    for gallery in (None, torch.randn(5, 0)):  # zero-width rows are zero rows: cosine 1
        d, i = knn(torch.randn(3, 0), gallery, 2, metric="cosine", backend="torch")
        assert torch.equal(i, torch.tensor([[0, 1]] * 3)) and (d == 1).all()


def test_progress_reports_every_query():
    x = torch.randn(50, 5)
    for gallery, exclude in ((None, True), (torch.randn(30, 5), False)):
        seen = []
        d, i = knn_search(x, gallery, 4, metric="cosine", exclude_self=exclude, backend="torch", chunk_size=7,
                          progress=seen.append)
        assert sum(seen) == 50 and len(seen) > 1
        d2, i2 = knn(x, gallery, 4, metric="cosine", exclude_self=exclude, backend="torch", chunk_size=7)
        assert torch.equal(i, i2)


def test_torch_compile_fullgraph():
    q, g = torch.randn(9, 6), torch.randn(14, 6)

    def fn(a, b):
        d, i = knn(a, b, 3, metric="euclidean", backend="torch")
        return d * 2, i

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (d1, i1), (d2, i2) = compiled(q, g), fn(q, g)
    torch.testing.assert_close(d1, d2)
    assert torch.equal(i1, i2)


@pytest.mark.parametrize("backend", backends_to_test())
def test_torch_compile_still_refuses_nan_rows(backend):
    """The magnitude check was skipped under torch.compile: the Triton kernel's clamp maps a NaN
    distance to 0, so a NaN gallery row was every query's nearest neighbour. It is a traced
    assertion there now (fullgraph holds), raised as in eager."""
    q, g = torch.randn(9, 6), torch.randn(14, 6)
    compiled = torch.compile(lambda a, b: knn(a, b, 3, backend=backend), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, g)[1], knn(q, g, 3, backend=backend)[1])
    g[7] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        compiled(q, g)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_self_search_puts_each_row_ahead_of_a_near_duplicate(metric):
    """A self-search below two tiles sets each row's own key to its exact distance (0): a
    near-duplicate whose fast-form distance rounds to 0 must not win a row's k = 1. Without the
    self key, row 0 returned row 1 (cosine, norm 8 rows 1e-4 apart)."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(300, 64, generator=gen) * 8
    x[1::2] = x[0::2] + 1e-4 * torch.randn(150, 64, generator=gen)  # row 2j + 1 next to row 2j
    d, i = knn(x, None, 1, metric=metric, backend="torch")
    # Row 2j + 1 may return row 2j: their fast-form distance rounds to 0, a tie the lower index
    # wins (the GEMM form cannot tell rows 1e-4 apart at norm 8; numerics.md). Row 2j is the lower.
    assert torch.equal(i[0::2, 0], torch.arange(0, 300, 2)) and (d[0::2] == 0).all()


def test_torch_compile_dynamic_k_from_a_shape_is_one_graph():
    """k taken from a shape is a SymInt under dynamic=True: the check keeps it symbolic."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = lambda q: knn(q, k=q.shape[0] // 2, exclude_self=True, backend="torch")  # noqa: E731
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for n in (6, 9, 12):
        q = torch.randn(n, 5)
        (d1, i1), (d2, i2) = compiled(q), fn(q)
        torch.testing.assert_close(d1, d2)
        assert torch.equal(i1, i2)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# faiss-cpu


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_duplicated_row_is_at_exactly_zero(backend, metric):
    """Issue 18.3: fp32 rows of norm ~8 and their identical copies: the returned distance is 0."""
    gen = torch.Generator().manual_seed(18)
    base = torch.randn(40, 64, generator=gen)
    base = base / base.norm(dim=1, keepdim=True) * 8 + 0.01 * torch.randn(40, 64, generator=gen)
    gallery = torch.cat([torch.randn(30, 64, generator=gen) * 8 / 8**0.5, base]).to(TEST_DEVICE)
    query = base.clone().to(TEST_DEVICE)  # query j is gallery row 30 + j
    d, i = knn(query, gallery, 3, metric=metric, backend=backend)
    assert torch.equal(i[:, 0].cpu(), torch.arange(30, 70)), metric
    assert (d[:, 0] == 0).all(), (metric, d[:, 0].abs().max().item())
    # The other returned distances equal an fp64 brute force to fp32 rounding, sorted.
    full = brute_force_matrix(query, gallery, metric)
    torch.testing.assert_close(d.double().cpu(), full.gather(1, i.cpu()), atol=1e-5, rtol=1e-6)
    assert (d.diff(dim=1) >= 0).all()


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("compiled_cpu", [True, False], ids=["compiled", "torch_selection"])
def test_cosine_copies_never_rank_ahead_of_the_row_itself(backend, compiled_cpu, monkeypatch):
    """A self-search over identical rows: the GEMM form puts some copies a rounding below cosine
    distance 0, where (unclamped) they beat the row's own exact 0 and the row could drop out of its
    own top k. Clamped, each row's list holds the row itself unless k copies of lower index come
    first (ties go to the lower index)."""
    if backend != "torch" and not compiled_cpu:
        pytest.skip("the compiled CPU selection is the torch backend's")
    if not compiled_cpu:
        monkeypatch.setenv("TORCHFG_CPU_KERNELS", "0")
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1, 8, generator=gen).repeat(5, 1),  # five copies of one row
                   torch.randn(4, 8, generator=gen)])
    x = torch.cat([x, x[torch.randperm(9, generator=gen)]]).to(TEST_DEVICE)  # and copies of those
    for k in (1, 2, 3, 6):
        d, i = knn(x, k=k, metric="cosine", backend=backend)
        i = i.cpu()
        for row in range(x.shape[0]):
            assert row in i[row] or (i[row] < row).all(), (k, row, i[row].tolist())
        assert (d >= 0).all()


def test_duplicated_row_distances_equal_faiss():
    """Against faiss's flat L2 index: same nearest row, distances to faiss's rounding, ours exactly 0."""
    faiss = pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(19)
    base = torch.randn(50, 32, generator=gen) * 1.4 + 3.0  # norms ~ 17
    gallery = torch.cat([torch.randn(77, 32, generator=gen) * 4, base])
    index = faiss.IndexFlatL2(32)
    index.add(gallery.numpy())
    f_d, f_i = index.search(base.numpy(), 4)
    d, i = knn(base, gallery, 4, metric="sqeuclidean", backend="torch")
    assert torch.equal(torch.from_numpy(f_i)[:, 0], i[:, 0])
    assert (d[:, 0] == 0).all()
    torch.testing.assert_close(d, torch.from_numpy(f_d).clamp_min(0), atol=1e-3, rtol=1e-5)


def test_cpu_equals_faiss_flat_l2_and_ip():
    faiss = pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(97, 24, generator=gen)
    g = torch.randn(403, 24, generator=gen)
    k = 13
    for metric, index_type in (("sqeuclidean", faiss.IndexFlatL2), ("dot", faiss.IndexFlatIP)):
        index = index_type(24)
        index.add(g.numpy())
        f_d, f_i = index.search(q.numpy(), k)
        f_d, f_i = torch.from_numpy(f_d), torch.from_numpy(f_i)
        if metric == "dot":
            f_d = -f_d
        d, i = knn(q, g, k, metric=metric, backend="torch")
        torch.testing.assert_close(d, f_d, atol=1e-3, rtol=1e-4)
        # Identical neighbours wherever the order is not decided by rounding noise.
        _, _, full = brute_force_knn(q, g, k, metric)
        gaps = torch.sort(full, dim=1).values[:, : k + 1].diff(dim=1)
        clear = torch.ones(97, k, dtype=torch.bool)
        clear[:, 1:] &= gaps[:, : k - 1] > 1e-3
        clear &= gaps[:, :k] > 1e-3
        assert clear.float().mean() > 0.9
        assert torch.equal(i[clear], f_i[clear]), metric
    # Self-search against an index of the same points.
    index = faiss.IndexFlatL2(24)
    index.add(g.numpy())
    f_d, f_i = index.search(g.numpy(), 5)
    d, i = knn(g, k=5, metric="sqeuclidean", backend="torch")
    assert (torch.from_numpy(f_i) == i).float().mean() > 0.99
    torch.testing.assert_close(d, torch.from_numpy(f_d).clamp_min(0), atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) and CUDA kernels against brute force / the reference


def _kernel_backends() -> list[str]:
    return [b for b in backends_to_test() if b != "torch"] + (["cuda"] if _cuda_ready() else [])


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from torchfg.ops import _cuda_extension

    return _cuda_extension.status()[0]


kernel_backends = pytest.mark.parametrize(
    "backend",
    _kernel_backends() or [pytest.param("none", marks=pytest.mark.skip(reason="no kernel backend runs here"))],
)


@kernel_backends
@settings(max_examples=10)
@given(
    num_query=st.integers(1, 21),
    num_gallery=st.integers(1, 40),
    dim=st.integers(1, 19),
    k_frac=st.floats(0, 1),
    metric=st.sampled_from(METRICS),
    self_search=st.booleans(),
    exclude_self=st.booleans(),
    integers=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_brute_force(
    backend, num_query, num_gallery, dim, k_frac, metric, self_search, exclude_self, integers, seed
):
    gen = torch.Generator().manual_seed(seed)
    draw = (lambda r: integer_data(gen, r, dim)) if integers else (lambda r: torch.randn(r, dim, generator=gen))
    query = draw(num_query).to(TEST_DEVICE)
    gallery = None if self_search else draw(max(num_gallery, num_query if exclude_self else 0)).to(TEST_DEVICE)
    num_g = num_query if gallery is None else gallery.shape[0]
    eligible = num_g - int(exclude_self)
    if eligible < 1:
        return
    k = 1 + int(k_frac * (min(eligible, 40) - 1))
    d, i = knn(query, gallery, k, metric=metric, exclude_self=exclude_self, backend=backend)
    if integers and metric != "cosine":
        ref_d, ref_i, _ = brute_force_knn(query, gallery, k, metric, exclude_self)
        assert torch.equal(i.cpu(), ref_i)
        torch.testing.assert_close(d.double().cpu(), ref_d, atol=1e-5, rtol=1e-6)
    else:
        assert_knn_matches(d, i, query, gallery, k, metric, exclude_self)


@requires_triton
def test_dispatch_limit_matches_triton_kernel():
    from torchfg.ops.knn import TRITON_MAX_K
    from torchfg.ops.knn.triton import MAX_K

    assert TRITON_MAX_K == MAX_K


@requires_triton
def test_triton_gallery_splits_and_ties():
    """Splits of 16 rows, merged on (distance, index), over data with many exact ties."""
    from torchfg.ops.knn.triton import TileConfig, knn_triton

    gen = torch.Generator().manual_seed(2)
    q = integer_data(gen, 19, 2, -1, 2).to(TEST_DEVICE)
    g = integer_data(gen, 70, 2, -1, 2).to(TEST_DEVICE)
    for metric in ("sqeuclidean", "dot"):
        for splits in (1, 3):
            cfg = TileConfig(block_q=16, block_g=16, block_d=16, splits=splits)
            for k in (1, 9, 33):
                d, i = knn_triton(q, g, k, metric, config=cfg)
                ref_d, ref_i, _ = brute_force_knn(q, g, k, metric)
                assert torch.equal(i.cpu(), ref_i), (metric, splits, k)
                assert torch.equal(d.double().cpu(), ref_d), (metric, splits, k)


@requires_triton
def test_triton_selection_when_every_tile_improves():
    """A gallery in decreasing distance: every tile beats everything before it, so lane queues fill
    and merge on every tile; rows orthogonal to the queries are exact dot ties that go to the lower
    index. Exact against the brute force, for k below, at and above the tile width, with and
    without splits."""
    from torchfg.ops.knn.triton import TileConfig, knn_triton

    num_gallery = 150
    steps = torch.arange(num_gallery, 0, -1, dtype=torch.float32)  # 150 .. 1
    gallery = torch.zeros(num_gallery, 3)
    gallery[:, 0] = steps
    gallery[::7, 0] = 0.0  # orthogonal rows: dot 0 with every query
    gallery[::7, 1] = torch.arange(0, num_gallery, 7, dtype=torch.float32) % 3 - 1
    query = torch.zeros(6, 3)
    query[:, 0] = -torch.arange(1, 7, dtype=torch.float32)  # dot distance = |q0| * g0, increasing in g0
    query[:, 2] = 1.0
    query, gallery = query.to(TEST_DEVICE), gallery.to(TEST_DEVICE)
    cases = [("sqeuclidean", 1, 16), ("sqeuclidean", 3, 1), ("sqeuclidean", 1, 40), ("dot", 1, 40), ("dot", 3, 15)]
    for metric, splits, k in cases:
        cfg = TileConfig(block_q=16, block_g=16, block_d=16, splits=splits)
        d, i = knn_triton(query, gallery, k, metric, config=cfg)
        ref_d, ref_i, _ = brute_force_knn(query, gallery, k, metric)
        assert torch.equal(i.cpu(), ref_i), (metric, splits, k)
        assert torch.equal(d.double().cpu(), ref_d), (metric, splits, k)


@requires_triton
def test_triton_writes_every_output(monkeypatch):
    """Poison the kernel's output buffers: an unwritten slot would surface as NaN or index -7."""
    import torchfg.ops.knn.triton as tri

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(tri.torch, "empty", poisoned_empty)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(23, 11, generator=gen).to(TEST_DEVICE)
    g = torch.randn(37, 11, generator=gen).to(TEST_DEVICE)
    for metric in METRICS:
        for cfg in (None, tri.TileConfig(block_q=16, block_g=16, block_d=16, splits=2)):
            d, i = tri.knn_triton(q, g, 17, metric, config=cfg)
            assert not torch.isnan(d).any() and (i >= 0).all(), metric
            assert_knn_matches(d, i, q, g, 17, metric)


@requires_triton
def test_triton_half_inputs():
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(17, 24, generator=gen).to(dtype).to(TEST_DEVICE)
        g = torch.randn(33, 24, generator=gen).to(dtype).to(TEST_DEVICE)
        d, i = knn(q, g, 5, metric="cosine", backend="triton")
        assert d.dtype == dtype
        assert_knn_matches(d, i, q, g, 5, "cosine", tol=TOL[dtype])


@requires_triton
def test_triton_gallery_tiles_wider_than_the_top_k():
    """Gallery tiles of 64 columns with K_PAD 16 or 32 (the GPU's default shape; the interpreter's
    default tiles are K_PAD wide): a lane merge takes the column-wise minimum over the tile's
    K_PAD-wide chunks. Integer rows with exact ties, a partial last tile: exact against the
    brute force."""
    from torchfg.ops.knn.triton import TileConfig, knn_triton

    gen = torch.Generator().manual_seed(41)
    q = integer_data(gen, 9, 3).to(TEST_DEVICE)
    g = integer_data(gen, 80, 3).to(TEST_DEVICE)
    cfg = TileConfig(block_q=16, block_g=64, block_d=16)
    for metric, k in (("sqeuclidean", 5), ("dot", 20)):  # 4 chunks of 16, 2 of 32
        d, i = knn_triton(q, g, k, metric, config=cfg)
        ref_d, ref_i, _ = brute_force_knn(q, g, k, metric)
        assert torch.equal(i.cpu(), ref_i), (metric, k)
        assert torch.equal(d.double().cpu(), ref_d), (metric, k)


@requires_triton
def test_triton_stores_nothing_past_its_outputs(monkeypatch):
    """The kernel's output buffers are followed by a poisoned guard region: a store past a row's
    k slots (the (k + 1)-th lands on the next row, and the last row's past the buffer) or past the
    last query row would change it. k = 5 of K_PAD = 16 slots, 19 queries (a partial block)."""
    import torchfg.ops.knn.triton as tri

    real_empty = torch.empty
    guards = []

    def guarded_empty(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        numel = int(np.prod(shape))
        base = real_empty(numel + 64, **kwargs)
        base.fill_(float("nan") if base.is_floating_point() else -7)
        guards.append(base[numel:])
        return base[:numel].view(shape)

    monkeypatch.setattr(tri.torch, "empty", guarded_empty)
    gen = torch.Generator().manual_seed(23)
    q = torch.randn(19, 7, generator=gen).to(TEST_DEVICE)
    g = torch.randn(21, 7, generator=gen).to(TEST_DEVICE)
    for splits in (1, 2):
        cfg = tri.TileConfig(block_q=16, block_g=16, block_d=16, splits=splits)
        d, i = tri.knn_triton(q, g, 5, "sqeuclidean", config=cfg)
        assert_knn_matches(d, i, q, g, 5, "sqeuclidean")
    assert guards
    for guard in guards:
        untouched = guard.isnan() if guard.is_floating_point() else guard == -7
        assert untouched.all(), guard


@requires_triton
def test_triton_self_search_zero_row_under_cosine():
    """Cosine self-search: a zero row is at distance 1 from every row, itself included (the
    kernel's diagonal is 0 only for nonzero rows), so its k nearest are rows 0 .. k - 1 by the
    tie rule; every other row is its own nearest at 0. The kernel's own distances, no recomputation."""
    from torchfg.ops.knn.triton import TileConfig, knn_triton

    gen = torch.Generator().manual_seed(29)
    x = torch.randn(21, 6, generator=gen)
    x[17] = 0.0
    x = x.to(TEST_DEVICE)
    cfg = TileConfig(block_q=16, block_g=16, block_d=16)
    d, i = knn_triton(x, x, 3, "cosine", symmetric=True, config=cfg)
    d, i = d.cpu(), i.cpu()
    assert i[17].tolist() == [0, 1, 2] and d[17].tolist() == [1.0, 1.0, 1.0]
    others = torch.arange(21) != 17
    assert torch.equal(i[others, 0], torch.arange(21)[others]) and (d[others, 0] == 0).all()
    assert_knn_matches(d, i, x, None, 3, "cosine")


@requires_triton
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_triton_self_search_puts_each_row_ahead_of_a_near_duplicate(metric):
    """The Triton self-search sets each row's own distance to exactly 0, and clamps the GEMM form
    at 0: at norm ~45 that form is rounding noise of |x|^2 for rows 1e-4 apart, above or below 0.
    Either the noise of d(i, i) or a negative near-duplicate distance would let row 2j + 1 win row
    2j's k = 1 (row 2j + 1 may return row 2j: a tie at 0 that the lower index wins)."""
    from torchfg.ops.knn.triton import TileConfig, knn_triton

    gen = torch.Generator().manual_seed(31)
    x = torch.randn(32, 32, generator=gen) * 8
    x[1::2] = x[0::2] + 1e-4 * torch.randn(16, 32, generator=gen)
    x = x.to(TEST_DEVICE)
    cfg = TileConfig(block_q=16, block_g=16, block_d=16)
    d, i = knn_triton(x, x, 1, metric, symmetric=True, config=cfg)
    assert torch.equal(i[0::2, 0].cpu(), torch.arange(0, 32, 2)) and (d[0::2] == 0).all()


@requires_triton
def test_triton_exclude_self_in_query_blocks():
    """knn_search runs a long self-search in query blocks, each a gallery search that leaves out
    gallery row (block start + row): the kernel's self_offset. Integer rows (exact ties to the
    lower index) in blocks of 8 of 21 rows: equal to the brute force, index for index."""
    gen = torch.Generator().manual_seed(37)
    x = integer_data(gen, 21, 3).to(TEST_DEVICE)
    seen = []
    d, i = knn_search(x, None, 4, metric="sqeuclidean", exclude_self=True, backend="triton", query_block=8,
                      progress=seen.append)
    assert seen == [8, 8, 5]
    ref_d, ref_i, _ = brute_force_knn(x, None, 4, "sqeuclidean", exclude_self=True)
    assert torch.equal(i.cpu(), ref_i)
    torch.testing.assert_close(d.double().cpu(), ref_d, atol=0, rtol=0)


@requires_triton
def test_triton_pinned_splits_stay_within_cudas_grid_y_cap(monkeypatch):
    """Gallery splits are the streaming kernel's grid y, which CUDA caps at 65535 (the
    interpreter has none): a pinned ``splits`` past it failed to launch on a GPU. With the cap
    patched to 2, a pinned 5 splits of a 70-row gallery launches 2, and the neighbours equal the
    brute force's."""
    import torchfg.ops.knn.triton as tri

    monkeypatch.setattr(tri, "MAX_GRID_YZ", 2, raising=False)
    grids = []
    kernel_type = type(tri._knn_kernel)
    real_getitem = kernel_type.__getitem__

    def recording_getitem(kernel, grid):
        if kernel is tri._knn_kernel:
            grids.append(grid)
        return real_getitem(kernel, grid)

    monkeypatch.setattr(kernel_type, "__getitem__", recording_getitem)
    gen = torch.Generator().manual_seed(8)
    q = integer_data(gen, 19, 3, -2, 3).to(TEST_DEVICE)
    g = integer_data(gen, 70, 3, -2, 3).to(TEST_DEVICE)
    cfg = tri.TileConfig(block_q=16, block_g=16, block_d=16, splits=5)
    d, i = tri.knn_triton(q, g, 7, "sqeuclidean", config=cfg)
    monkeypatch.undo()
    assert grids and max(grid[1] for grid in grids) <= 2, grids
    ref_d, ref_i, _ = brute_force_knn(q, g, 7, "sqeuclidean")
    assert torch.equal(i.cpu(), ref_i) and torch.equal(d.double().cpu(), ref_d)


# ---------------------------------------------------------------------------------------------
# Triton filter search (bound, filter kernel, top-k of the lists, streaming fallback)


def _small_filter_config(**overrides):
    from torchfg.ops.knn.triton import FilterConfig

    return FilterConfig(**{"block_q": 16, "block_g": 16, "block_d": 16, "group_q": 2, **overrides})


@contextlib.contextmanager
def append_layout(flat: bool):
    """The filter kernel's append from a flattened tile (as triton >= 3.7 compiles it) or in the
    dot's layout (as triton 3.6 does). The interpreter runs either; a compiled kernel keeps the
    installed Triton's (it refuses a changed global, and 3.9 cannot compile the other)."""
    import triton.language as tl

    import torchfg.ops.knn.triton as tri
    from torchfg.backends import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        yield
        return
    saved = tri._FLAT_APPEND
    tri._FLAT_APPEND = tl.constexpr(flat)
    try:
        yield
    finally:
        tri._FLAT_APPEND = saved


@pytest.fixture
def fallback_rows(monkeypatch):
    """The number of rows each filter search sent to the streaming fallback, in call order."""
    import torchfg.ops.knn.triton as tri

    seen = []
    real = tri._knn_streaming

    def spy(*args, **kwargs):
        if kwargs.get("needed") is not None:
            seen.append(int(kwargs["needed"].sum()))
        return real(*args, **kwargs)

    monkeypatch.setattr(tri, "_knn_streaming", spy)
    return seen


@requires_triton
@settings(max_examples=8)
@given(
    num_query=st.integers(1, 21),
    num_gallery=st.integers(1, 90),
    dim=st.integers(1, 19),
    k_frac=st.floats(0, 1),
    metric=st.sampled_from(METRICS),
    self_search=st.booleans(),
    exclude_self=st.booleans(),
    integers=st.booleans(),
    capacity=st.sampled_from([16, 32, 64]),
    sample_stride=st.sampled_from([1, 2, 4]),
    groups_per_k=st.sampled_from([1, 2, 4]),
    flat_append=st.booleans(),
    query_chunk=st.sampled_from([16, 1 << 30]),
    pair_once=st.sampled_from([None, False]),
    seed=st.integers(0, 2**16),
)
def test_filter_search_equals_brute_force(
    num_query, num_gallery, dim, k_frac, metric, self_search, exclude_self, integers, capacity, sample_stride,
    groups_per_k, flat_append, query_chunk, pair_once, seed,
):
    """Every configuration path: bounded or not, lists that overflow or not (small capacities),
    query chunks (block_bytes of one 16-row chunk), both append layouts, self-searches that
    compute each pair once or not."""
    from torchfg.ops.knn.triton import knn_filter_triton

    gen = torch.Generator().manual_seed(seed)
    draw = (lambda r: integer_data(gen, r, dim)) if integers else (lambda r: torch.randn(r, dim, generator=gen))
    query = draw(num_query).to(TEST_DEVICE)
    gallery = query if self_search else draw(max(num_gallery, num_query if exclude_self else 0)).to(TEST_DEVICE)
    eligible = gallery.shape[0] - int(exclude_self)
    if eligible < 1:
        return
    k = 1 + int(k_frac * (min(eligible, capacity) - 1))
    cfg = _small_filter_config(capacity=capacity, sample_stride=sample_stride, groups_per_k=groups_per_k,
                               block_bytes=min(query_chunk, 16 * capacity * 32), pair_once=pair_once)
    with append_layout(flat_append):
        d, i = knn_filter_triton(query, gallery, k, metric, symmetric=self_search,
                                 self_offset=0 if exclude_self else -1, config=cfg)
    reference_gallery = None if self_search else gallery
    if integers and metric != "cosine":
        ref_d, ref_i, _ = brute_force_knn(query, reference_gallery, k, metric, exclude_self)
        assert torch.equal(i.cpu(), ref_i)
        torch.testing.assert_close(d.double().cpu(), ref_d, atol=1e-5, rtol=1e-6)
    else:
        assert_knn_matches(d, i, query, reference_gallery, k, metric, exclude_self)


@requires_triton
@pytest.mark.parametrize("flat_append", [False, True])
def test_filter_search_bounded_lists_without_fallback(flat_append, fallback_rows):
    """The main path on random rows: the sample bounds every row, no list overflows, nothing
    falls back, and the result equals the brute force (two query chunks, one of two blocks)."""
    from torchfg.ops.knn.triton import knn_filter_triton

    gen = torch.Generator().manual_seed(21)
    query = torch.randn(40, 13, generator=gen).to(TEST_DEVICE)
    gallery = torch.randn(600, 13, generator=gen).to(TEST_DEVICE)
    for metric in METRICS:
        # Chunks of 32 rows (two query blocks each: 64 slots of 32 bytes a row) and of 8.
        cfg = _small_filter_config(capacity=64, block_bytes=32 * 64 * 32)
        with append_layout(flat_append):
            d, i = knn_filter_triton(query, gallery, 4, metric, config=cfg)
        assert_knn_matches(d, i, query, gallery, 4, metric)
    assert fallback_rows == [0, 0, 0, 0]


@requires_triton
@pytest.mark.parametrize("flat_append", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_filter_self_search_computes_each_pair_once(flat_append, exclude_self, fallback_rows):
    """A self-search over 5 x 5 tiles runs only the 15 on and above the diagonal, each
    off-diagonal one filling both its rows' and its columns' lists: exact against the brute
    force on integer rows (exact ties, to the lower index), with nothing sent to the fallback,
    and the same as the search that computes every tile."""
    import torchfg.ops.knn.triton as tri

    gen = torch.Generator().manual_seed(17)
    x = integer_data(gen, 70, 3).to(TEST_DEVICE)
    launched = []
    real_kernel = tri._knn_filter_kernel

    class Counting:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append((grid, kwargs["PAIR_ONCE"]))
                return real_kernel[grid](*args, **kwargs)

            return run

    tri._knn_filter_kernel = Counting()
    try:
        results = {}
        for pair_once in (True, False):
            cfg = _small_filter_config(capacity=32, sample_stride=2, pair_once=pair_once)
            with append_layout(flat_append):
                results[pair_once] = tri.knn_filter_triton(x, x, 6, "sqeuclidean", symmetric=True,
                                                           self_offset=0 if exclude_self else -1, config=cfg)
    finally:
        tri._knn_filter_kernel = real_kernel
    assert [once for _, once in launched] == [True, False]
    ref_d, ref_i, _ = brute_force_knn(x, None, 6, "sqeuclidean", exclude_self)
    for d, i in results.values():
        assert torch.equal(i.cpu(), ref_i)
        assert torch.equal(d.double().cpu(), ref_d)
    assert fallback_rows == [0, 0]


@requires_triton
def test_filter_search_exact_ties_overflow_into_the_fallback(fallback_rows):
    """Integer rows with many exact ties at every bound (9 points, about 22 copies each): rows
    whose ties overflow a 32-slot list are searched again by the streaming kernel, the others
    are answered from their lists (both happen for two metrics); all exact, ties to the lower
    index."""
    from torchfg.ops.knn.triton import knn_filter_triton

    gen = torch.Generator().manual_seed(3)
    query = integer_data(gen, 19, 2, -1, 2).to(TEST_DEVICE)
    gallery = integer_data(gen, 200, 2, -1, 2).to(TEST_DEVICE)
    for metric, k in (("sqeuclidean", 9), ("dot", 16), ("euclidean", 1)):
        d, i = knn_filter_triton(query, gallery, k, metric, config=_small_filter_config(capacity=32))
        ref_d, ref_i, _ = brute_force_knn(query, gallery, k, metric)
        assert torch.equal(i.cpu(), ref_i), metric
        assert torch.equal(d.double().cpu(), ref_d), metric
    assert len(fallback_rows) == 3 and all(0 < rows < 19 for rows in fallback_rows[:2]), fallback_rows


@requires_triton
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_filter_search_fp16_dots_beyond_the_fp16_range(metric, fallback_rows):
    """fp16 rows whose dot products pass 65504: the bound kernel accumulates in fp32, so the
    bounds stay finite and tight enough that no row falls back. (Metrics whose distances
    themselves pass 65504 would return inf in fp16: the output dtype is the input's.)"""
    from torchfg.ops.knn.triton import knn_filter_triton

    gen = torch.Generator().manual_seed(13)
    query = (40 * torch.randn(20, 64, generator=gen) + 60).half().to(TEST_DEVICE)
    gallery = (40 * torch.randn(300, 64, generator=gen) + 60).half().to(TEST_DEVICE)
    assert (query.float() @ gallery.float().T).abs().max() > 65504
    d, i = knn_filter_triton(query, gallery, 3, metric, config=_small_filter_config(capacity=64))
    assert fallback_rows == [0]
    assert_knn_matches(d, i, query, gallery, 3, metric, tol=TOL[torch.float16])


@requires_triton
def test_filter_search_too_tight_bound_falls_back(monkeypatch, fallback_rows):
    """A bound under every distance leaves the lists with fewer than k candidates: every row
    must be searched again, and the answer is still exact."""
    import torchfg.ops.knn.triton as tri

    monkeypatch.setattr(tri._BoundSample, "bounds", lambda self, rows, *a: torch.full(
        (rows.shape[0],), -1.0, device=rows.device))
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(18, 9, generator=gen).to(TEST_DEVICE)
    gallery = torch.randn(150, 9, generator=gen).to(TEST_DEVICE)
    d, i = tri.knn_filter_triton(query, gallery, 5, "euclidean", config=_small_filter_config(capacity=32))
    assert fallback_rows == [18]
    assert_knn_matches(d, i, query, gallery, 5, "euclidean")


@requires_triton
@pytest.mark.parametrize("layout", ["random", "class_by_class"])
def test_filter_bound_keeps_lists_near_their_expected_size(layout):
    """The bound's promise behind default_capacity: about 4.6 k candidates per list (ranks
    alone decide it), far under the 16 k slots, also when the gallery is stored class by class
    (4 rows per class: the strided groups spread each class). The bound kernel only."""
    from torchfg.ops.knn.triton import FilterConfig, _BoundSample, default_capacity
    from torchfg.ops.metric import row_statistics

    gen = torch.Generator().manual_seed(11)
    k, rows, dim = 10, 8192, 32
    if layout == "random":
        gallery = torch.randn(rows, dim, generator=gen)
    else:
        centres = torch.randn(rows // 4, dim, generator=gen).repeat_interleave(4, dim=0)
        gallery = centres + 0.5 * torch.randn(rows, dim, generator=gen)
    gallery = gallery.to(TEST_DEVICE)
    query = gallery[:200]
    aux = row_statistics(gallery, "euclidean")
    # Large tiles: few programs for the interpreter. 4 k = 40 groups, rounded up to 64 (blocks of 32).
    cfg = FilterConfig(block_q=64, block_g=64, block_d=32)
    bound = _BoundSample(gallery, aux, "euclidean", k, cfg).bounds(query, aux, 0, -1)
    sizes = (torch.cdist(query.cpu(), gallery.cpu()) <= bound.cpu()[:, None]).sum(dim=1).float()
    assert (sizes >= k).all()
    assert 3 * k < sizes.mean() < 7 * k, sizes.mean()
    assert sizes.max() < default_capacity(k) / 2, sizes.max()


@requires_triton
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
@pytest.mark.parametrize("mode", ["cross", "exclude_self", "offset"])
@pytest.mark.parametrize("layout", ["fp32_slice", "fp16_colmajor"])
@pytest.mark.parametrize("groups_per_k", [4, 10])
def test_filter_bound_kernel_group_minima(monkeypatch, metric, mode, layout, groups_per_k):
    """The bound kernel's group minima against an fp64 brute force: odd sizes (masked rows,
    groups and sample rows), a strided sample of a gallery whose rows are not contiguous
    (a column slice, or column-major fp16), a query chunk that starts mid-gallery, and the own
    row left out where it is excluded; unwritten minima are NaN. groups_per_k 4: 20 groups
    rounded up to two blocks of 16, the second step partial; 10: all 51 sample rows are groups,
    one step, the last block of groups partial."""
    import torchfg.ops.knn.triton as tri
    from torchfg.ops.metric import row_statistics

    real_empty = torch.empty
    monkeypatch.setattr(tri.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    captured = []
    real_kthvalue = torch.kthvalue
    monkeypatch.setattr(tri.torch, "kthvalue", lambda x, *a, **kw: captured.append(x.clone()) or real_kthvalue(x, *a, **kw))
    gen = torch.Generator().manual_seed(zlib.crc32(f"{metric}-{mode}-{layout}-{groups_per_k}".encode()))
    k, dim = 5, 21
    wide = torch.randn(203, dim + 5, generator=gen)
    wide[7] = 0.0  # a zero row: cosine's inverse norm is 0
    if layout == "fp32_slice":
        gallery = wide[:, 2 : 2 + dim].to(TEST_DEVICE)  # rows not contiguous, base not aligned
    else:
        gallery = wide[:, :dim].half().to(TEST_DEVICE).T.contiguous().T  # column-major
    start, chunk = 41, 29
    offset = {"cross": -1, "exclude_self": 0, "offset": 5}[mode]
    if mode == "cross":
        query_all = torch.randn(start + chunk, dim, generator=gen).to(gallery.dtype).to(TEST_DEVICE)
    else:
        query_all = gallery[offset:]
    aux_q = None if metric == "dot" else row_statistics(query_all, metric)
    aux_g = torch.empty(1, device=TEST_DEVICE) if metric == "dot" else row_statistics(gallery, metric)
    cfg = tri.FilterConfig(block_q=16, block_g=32, block_d=16, groups_per_k=groups_per_k)
    sample = tri._BoundSample(gallery, aux_g, metric, k, cfg)
    groups = 32 if groups_per_k == 4 else 51
    assert sample.stride == 4 and sample.rows == 51 and sample.block_groups == 16 and sample.groups == groups
    rows = query_all[start : start + chunk]
    bound = sample.bounds(rows, aux_q if aux_q is not None else aux_g, start, offset)
    minima = captured[-1]
    assert minima.shape == (chunk, groups) and not minima.isnan().any()

    q64, s64 = rows.double().cpu(), gallery[::4].double().cpu()
    if metric in ("euclidean", "sqeuclidean"):
        dist = torch.cdist(q64, s64).square()
    elif metric == "dot":
        dist = -(q64 @ s64.T)
    else:
        qn, sn = q64.norm(dim=1, keepdim=True), s64.norm(dim=1, keepdim=True)
        dist = 1 - (q64 @ s64.T) / (qn * sn.T).clamp_min(1e-300) * ((qn > 0) & (sn.T > 0))
    if offset >= 0:
        own = torch.arange(start, start + chunk) + offset
        for row, g in enumerate(own.tolist()):
            if g % 4 == 0 and g // 4 < dist.shape[1]:
                dist[row, g // 4] = float("inf")
    steps = -(-51 // groups)
    padded = torch.full((chunk, steps * groups), float("inf"), dtype=torch.float64)
    padded[:, : dist.shape[1]] = dist
    expected = padded.view(chunk, steps, groups).amin(dim=1)  # group c: sample rows c, c + groups, ...
    scale = 1 + (q64.square().sum(1, keepdim=True) + s64.square().sum(1).max())
    minima = minima.double().cpu()
    # (A group whose one row is the excluded own row is +inf on both sides.)
    assert ((minima == expected) | ((minima - expected).abs() <= 1e-5 * scale)).all()
    if offset >= 0 and groups == 51:
        assert torch.isinf(minima).any()  # the case above occurs
    kth = expected.kthvalue(k, dim=1).values
    if metric == "euclidean":
        assert (bound.double().cpu() >= kth.sqrt() - 1e-5).all()
    else:
        assert (bound.double().cpu() >= kth - 1e-5).all()


@requires_triton
def test_filter_search_writes_every_output(monkeypatch):
    """Poisoned allocations (NaN, -7): the lists' unwritten slots must never reach the result,
    and every output element is written."""
    import torchfg.ops.knn.triton as tri

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(tri.torch, "empty", poisoned_empty)
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(23, 11, generator=gen).to(TEST_DEVICE)
    gallery = torch.randn(210, 11, generator=gen).to(TEST_DEVICE)
    for metric in ("euclidean", "dot"):
        d, i = tri.knn_filter_triton(query, gallery, 7, metric, config=_small_filter_config(capacity=128))
        assert not torch.isnan(d).any() and (i >= 0).all(), metric
        assert_knn_matches(d, i, query, gallery, 7, metric)


@requires_triton
def test_filter_search_no_host_sync_and_bounded_memory():
    """What the GPU path would do, counted under the interpreter: no device-to-host read, one
    bound and one filter launch per query chunk plus one fallback launch, and tensors alive at
    once within the chunk budget plus the outputs (nothing (Q, G)-sized, nor (Q, G / 4))."""
    from torchfg.bench.profile import profile_step
    from torchfg.ops.knn.triton import knn_filter_triton

    gen = torch.Generator().manual_seed(8)
    query = torch.randn(64, 16, generator=gen).to(TEST_DEVICE)
    gallery = torch.randn(1024, 16, generator=gen).to(TEST_DEVICE)
    # Two 32-row chunks: per row, the larger of a 64-slot list (32 bytes a slot with its keys)
    # and its 16 group minima (4 k groups, 8 bytes each).
    budget = 32 * max(64 * 32, 16 * 8)
    cfg = _small_filter_config(capacity=64, block_bytes=budget)
    profile = profile_step(lambda: knn_filter_triton(query, gallery, 4, "euclidean", config=cfg))
    assert profile.host_syncs == 0 and profile.host_copies == 0
    assert profile.triton == {"_knn_bound_kernel": 2, "_knn_filter_kernel": 2, "_knn_kernel": 1}
    small = 16 * 1024  # outputs, bounds, counts, the sample's statistics
    assert profile.peak_live_bytes < budget + small, profile.peak_live_bytes
    # A self-search that computes each pair once: one filter launch for all rows.
    x = gallery[:256]
    cfg = _small_filter_config(capacity=64, block_bytes=budget, pair_once=True)
    profile = profile_step(lambda: knn_filter_triton(x, x, 4, "euclidean", symmetric=True, config=cfg))
    assert profile.host_syncs == 0 and profile.host_copies == 0
    assert profile.triton == {"_knn_bound_kernel": 1, "_knn_filter_kernel": 1, "_knn_kernel": 1}
    lists = 256 * 64 * 8  # every row's list, alive at once; the rest is per chunk of rows
    small = 32 * 1024  # outputs, bounds, counts, the sample's statistics
    assert profile.peak_live_bytes < lists + budget + small, profile.peak_live_bytes


def test_filter_config_and_capacity_errors():
    pytest.importorskip("triton")
    from torchfg.ops.knn.triton import FilterConfig, knn_filter_triton

    with pytest.raises(ValueError, match="block_g"):
        FilterConfig(block_g=48)
    with pytest.raises(ValueError, match="sample_stride"):
        FilterConfig(sample_stride=0)
    with pytest.raises(ValueError, match="pair_once"):
        FilterConfig(block_q=64, block_g=128, pair_once=True)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="capacity"):
        knn_filter_triton(x, x, 3, "euclidean", config=FilterConfig(capacity=24))
    with pytest.raises(ValueError, match="capacity"):
        knn_filter_triton(x, x, 3, "euclidean", config=FilterConfig(capacity=2))


def test_packed_keys_order_by_distance_then_index():
    pytest.importorskip("triton")
    from torchfg.ops.knn.triton import pack_keys, unpack_keys

    distances = torch.tensor([0.5, -0.0, 0.0, -2.0, float("inf"), 0.5, 3e38, -1e-30])
    indices = torch.tensor([7, 9, 3, 1, 0, 2, 5, 4], dtype=torch.int32)
    keys = pack_keys(distances, indices)
    order = torch.argsort(keys)
    expected = sorted(range(8), key=lambda j: (float(distances[j]) + 0.0, int(indices[j])))
    assert order.tolist() == expected
    back_d, back_i = unpack_keys(keys)
    assert torch.equal(back_d, distances + 0.0) and torch.equal(back_i, indices.long())


@requires_triton
def test_filter_search_chosen_by_the_environment(monkeypatch):
    import torchfg.ops.knn.triton as tri

    calls = []
    real = tri.knn_filter_triton
    monkeypatch.setattr(tri, "knn_filter_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(12, 5).to(TEST_DEVICE)
    monkeypatch.setenv("TORCHFG_KNN_FILTER", "0")
    knn(x, k=3, metric="euclidean", backend="triton")
    assert calls == []
    monkeypatch.setenv("TORCHFG_KNN_FILTER", "1")
    d, i = knn(x, k=3, metric="euclidean", backend="triton")
    assert calls == [1]
    assert_knn_matches(d, i, x, None, 3, "euclidean")


@pytest.mark.skipif(not _cuda_ready(), reason="CUDA extension unavailable (needs a GPU and nvcc)")
def test_cuda_kernel_large_k_and_splits():
    from torchfg.ops.knn.cuda import knn_cuda

    gen = torch.Generator().manual_seed(12)
    q = torch.randn(70, 100, generator=gen).cuda()
    g = torch.randn(3000, 100, generator=gen).cuda()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for metric in METRICS:
            for k, split in ((1, None), (100, None), (300, 256), (1000, 640)):
                d, i = knn_cuda(q.to(dtype), g.to(dtype), k, metric, split_size=split)
                assert_knn_matches(d, i, q.to(dtype), g.to(dtype), k, metric, tol=TOL[dtype])


_TRITON_GPU_COMPILE = """
import inspect
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchfg.ops.knn import triton as kt

names = list(inspect.signature(kt._knn_kernel.fn).parameters)
consts = dict(K=10, K_PAD=16, METRIC=1, SYMMETRIC=True, EXCLUDE=True, DOT_DTYPE=tl.bfloat16,
              INPUT_PRECISION="ieee", BLOCK_Q=64, BLOCK_G=64, BLOCK_D=64)
pointers = {"q_ptr": "*bf16", "g_ptr": "*bf16", "out_i_ptr": "*i32"}
signature = {n: "constexpr" if n in consts else pointers.get(n, "*fp32" if n.endswith("_ptr") else "i32")
             for n in names}
source = ASTSource(fn=kt._knn_kernel, signature=signature,
                   constexprs={(names.index(n),): v for n, v in consts.items()})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
assert compiled.asm["cubin"]
print("compiled")
"""


def _triton_has_cuda_backend() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ImportError:
        return False


@requires_triton
@pytest.mark.skipif(not _triton_has_cuda_backend(), reason="triton has no CUDA compiler backend here")
def test_triton_kernel_compiles_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (e.g. non-constexpr globals): compile
    the kernel for sm_90 ahead of time, in a process without TRITON_INTERPRET. Needs no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_GPU_COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_clear_errors():
    x = torch.randn(6, 3)
    with pytest.raises(TypeError, match="query"):
        knn([[1.0]], k=1)
    with pytest.raises(TypeError, match="query"):
        knn(torch.ones(4, 2, dtype=torch.int64), k=1)
    with pytest.raises(ValueError, match="query"):
        knn(torch.randn(5), k=1)
    with pytest.raises(ValueError, match="gallery"):
        knn(x, torch.randn(2, 3, 3), k=1)
    with pytest.raises(TypeError, match="dtype"):
        knn(x, x.double(), k=1)
    with pytest.raises(ValueError, match="feature size"):
        knn(x, torch.randn(6, 4), k=1)
    with pytest.raises(ValueError, match="k"):
        knn(x, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        knn(x, k=2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        knn(x, k=True)
    with pytest.raises(ValueError, match="k=7 exceeds the 6"):
        knn(x, k=7)
    with pytest.raises(ValueError, match="own row"):
        knn(x, k=6, exclude_self=True)
    with pytest.raises(ValueError, match="len\\(query\\) <= len\\(gallery\\)"):
        knn(x, x[:3], k=1, exclude_self=True)
    with pytest.raises(ValueError, match="metric"):
        knn(x, k=1, metric="manhattan")
    with pytest.raises(TypeError, match="exclude_self"):
        knn(x, k=1, exclude_self=1)
    with pytest.raises(ValueError, match="chunk_size"):
        knn(x, k=1, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        knn(x, k=1, backend="faiss")
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="query contains NaN"):
        knn(bad, k=1)
    with pytest.raises(ValueError, match="gallery contains NaN"):
        knn(x, bad.clone().fill_(float("inf")), k=1)
    with pytest.raises(ValueError, match="overflow"):
        knn(x * 1e19, k=1, metric="sqeuclidean")
    with pytest.raises(ValueError, match="k=1 exceeds the 0"):
        knn(x, torch.randn(0, 3), k=1)



def test_k_accepts_numpy_and_index_like_ints_but_not_bool():
    # As check_int does elsewhere: np.int64(2) was refused as "k must be an int".
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(31))
    expected = knn(x, k=2)
    for k in (np.int64(2), np.int32(2), torch.tensor(2)):
        for got, want in zip(knn(x, k=k), expected):
            assert torch.equal(got, want)
        for got, want in zip(knn_search(x, None, k, metric="cosine", exclude_self=False), expected):
            assert torch.equal(got, want)
    with pytest.raises(TypeError, match="k must be an int"):
        knn(x, k=True)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn(x, k=np.int64(0))

def test_unavailable_backends_are_reported():
    x = torch.randn(6, 3)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            knn(x, k=1, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="supports dtypes"):
        knn(x.double(), k=1, backend="triton")
    with pytest.raises(BackendUnavailableError, match="k <= 128"):
        knn(torch.randn(200, 3), k=129, backend="triton")


# ---------------------------------------------------------------------------------------------
# torchfg/csrc: compile-only check with the machine's nvcc


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_csrc_compiles_for_sm90():
    result = subprocess.run(
        ["bash", str(ROOT / "torchfg" / "csrc" / "check_compile.sh")],
        env={**os.environ, "NVCC": _nvcc(), "ARCH": "sm_90"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   knn/knn_kernel.cu (sm_90)" in result.stdout


def test_cuda_extension_sources_are_found():
    from torchfg.ops import _cuda_extension

    found = _cuda_extension.csrc_dir()
    assert found is not None
    for source in _cuda_extension.SOURCES:
        assert (found / source).is_file()
    ok, why = _cuda_extension.status()
    assert isinstance(ok, bool) and why
    # Python's k bound of the CUDA kernel is the header's.
    from torchfg.ops.knn.cuda import KERNEL_MAX_K

    header = (found / "knn" / "knn_kernel.h").read_text()
    assert f"#define TORCHFG_KNN_MAX_K {KERNEL_MAX_K}" in header
