"""The compiled CPU kernels of the k-NN search (torchfg/ops/knn/cpu.py, torchfg/csrc/knn_cpu/): the
selection against the pure PyTorch selection it replaces (bit for bit), a full sort and the brute force; the
exact recomputation of the selected distances against fp64 and the PyTorch recomputation; and the
fallback to the PyTorch path when they are switched off or cannot be built."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from brute_force import exact_distances
from torchfg import knn
from torchfg.ops.knn import _exact_selected, _torch_search, knn_search
from torchfg.ops.knn import cpu as cpu_module
from torchfg.ops.knn import reference as ref_module
from torchfg.ops.metric import METRICS

COMPILED_OK, COMPILED_WHY = cpu_module.status()
requires_compiled = pytest.mark.skipif(not COMPILED_OK, reason=f"compiled CPU selection unavailable: {COMPILED_WHY}")

FINISHES = {
    "euclidean": lambda raw, aux: ((raw if aux is None else raw + aux.unsqueeze(1)).clamp_min(0.0)).sqrt(),
    "sqeuclidean": lambda raw, aux: (raw if aux is None else raw + aux.unsqueeze(1)).clamp_min(0.0),
    "cosine": lambda raw, aux: raw + 1.0,
    "dot": lambda raw, aux: raw,
}


def merging_keys(gen: torch.Generator, rows: int, width: int, base: float, levels: int = 6, spread: int = 40) -> torch.Tensor:
    """(rows, width) fp32 keys on a few levels, each spread over 0-``spread`` ulps: exact ties, and
    runs of distinct keys that the finishes (sqrt, + 1, + a large norm) map to equal distances."""
    values = base * (1 + torch.rand(rows, levels, generator=gen, dtype=torch.float64)).float()
    block = values.gather(1, torch.randint(0, levels, (rows, width), generator=gen))
    ulps = torch.randint(0, spread, (rows, width), generator=gen)
    for _ in range(int(ulps.max())):
        block = torch.where(ulps > 0, torch.nextafter(block, torch.full_like(block, float("inf"))), block)
        ulps = ulps - 1
    return block


def integer_data(gen: torch.Generator, rows: int, dim: int, low: int = -2, high: int = 3) -> torch.Tensor:
    """Small integers: products and sums are exact in fp32, so equal distances are exact ties."""
    return torch.randint(low, high, (rows, dim), generator=gen).float()


def pure_torch(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the compiled kernels switched off."""
    cpu_module.enabled = False
    try:
        return fn(*args, **kwargs)
    finally:
        cpu_module.enabled = True


def both_paths(*args, **kwargs):
    """``knn(*args, **kwargs)`` with the compiled kernels, then with the pure PyTorch path."""
    return knn(*args, **kwargs), pure_torch(knn, *args, **kwargs)


def both_selections(query, gallery, k, metric, exclude_self=False, chunk_size=None):
    """The search before the exact recomputation (``_torch_search``), with the compiled selection
    and with the PyTorch one."""
    args = (query, query if gallery is None else gallery, k, metric, gallery is None, 0 if exclude_self else -1, chunk_size)
    return _torch_search(*args), pure_torch(_torch_search, *args)


def assert_identical(compiled, pure, context) -> None:
    assert torch.equal(compiled[1], pure[1]), context
    # Bit for bit, -0.0 included (torch.equal would accept -0.0 == 0.0).
    assert torch.equal(compiled[0].view(torch.int32 if compiled[0].dtype == torch.float32 else torch.int16),
                       pure[0].view(torch.int32 if pure[0].dtype == torch.float32 else torch.int16)), context


def assert_same_final_search(compiled, pure, integers: bool, metric: str, context) -> None:
    """After the exact recomputation: bit for bit on integer data, which sums exactly in any order
    (but cosine, whose unit rows do not, and euclidean, since torch's CPU sqrt is not IEEE: cpu.py);
    else the same neighbours with distances equal up to rounding (:func:`assert_same_search`)."""
    exact = integers and metric in ("sqeuclidean", "dot")
    (assert_identical if exact else assert_same_search)(compiled, pure, context)


def assert_sorted_by_distance_then_index(distances, indices, context) -> None:
    d = distances.float()
    step_up = d[:, 1:] > d[:, :-1]
    tie_by_index = (d[:, 1:] == d[:, :-1]) & (indices[:, 1:] > indices[:, :-1])
    assert bool((step_up | tie_by_index).all()), context


def assert_same_search(compiled, pure, context) -> None:
    """The compiled path's result against the PyTorch path's: the same neighbours, and distances
    that differ by the rounding of the recomputation's sums only (its order of summation is not
    torch's), each result in (distance, index) order."""
    (d, i), (pure_d, pure_i) = compiled, pure
    by_index, pure_by_index = i.argsort(dim=1), pure_i.argsort(dim=1)
    assert torch.equal(i.gather(1, by_index), pure_i.gather(1, pure_by_index)), context
    # Relative to the largest distance: a dot product's rounding error scales with its terms.
    eps = torch.finfo(d.dtype).eps
    atol = 32 * eps * (1.0 + float(pure_d.abs().max())) if pure_d.numel() else 0.0
    torch.testing.assert_close(d.gather(1, by_index), pure_d.gather(1, pure_by_index), rtol=4 * eps, atol=atol, msg=str(context))
    assert_sorted_by_distance_then_index(d, i, context)


@pytest.fixture
def count_offers(monkeypatch):
    """Counts the blocks offered to compiled pools: a test of the compiled path fails if the
    search silently took the PyTorch one."""
    calls = []
    real = cpu_module.CompiledPool.offer
    monkeypatch.setattr(cpu_module.CompiledPool, "offer", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


# ---------------------------------------------------------------------------------------------
# The pool alone


@requires_compiled
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed_view"])
@pytest.mark.parametrize("finish_kind", ["euclidean", "aux_euclidean", "sqeuclidean", "aux_sqeuclidean", "cosine", "dot"])
def test_pool_equals_a_full_sort(finish_kind, transposed):
    """Offered a row block tile by tile (odd widths, one narrower than k), the pool returns exactly
    the k smallest (distance, column) pairs of the finished row (finished by torch), on keys with
    exact ties and with runs the finish merges (where selecting on the raw key alone would take
    the wrong column); an excluded entry (+inf) is never returned. Where torch's sqrt merges more
    entries at the k-th distance than the Euclidean slack holds, the pool says so instead."""
    gen = torch.Generator().manual_seed(len(finish_kind) + 100 * transposed)
    metric = finish_kind.removeprefix("aux_")
    base = {"euclidean": 1024.0, "sqeuclidean": 3.0, "cosine": -0.5, "dot": 3.0}[metric]
    rows, widths = 45, [64, 3, 71, 1, 40, 97]
    total = sum(widths)
    aux = (torch.rand(rows, generator=gen, dtype=torch.float64) * 1e6).float() if finish_kind.startswith("aux_") else None
    returned = exhausted = 0
    for k in (1, 2, 9, 33, 150, total - 1):
        for trial in range(3):
            if trial == 2:
                full = torch.rand(rows, total, generator=gen) * base  # few merges: never exhausts the slack
            else:
                full = merging_keys(gen, rows, total, base, levels=3 if trial == 0 else 8)
            if metric == "sqeuclidean":
                full = full - 4.5  # half the keys negative: the clamp merges them all at 0
            full[torch.arange(rows), torch.randint(0, total, (rows,), generator=gen)] = float("inf")
            pool = cpu_module.CompiledPool(k, rows, metric, aux)
            offset = 0
            for width in widths:
                tile = full[:, offset : offset + width]
                pool.offer(tile.t().contiguous().t() if transposed else tile.contiguous(), offset)
                offset += width
            try:
                distances, columns = pool.result()
            except cpu_module.SlackExhausted:
                assert metric == "euclidean" and trial < 2, (k, trial)
                exhausted += 1
                continue
            returned += 1
            finished = FINISHES[metric](full, aux)
            order = torch.sort(finished, dim=1, stable=True).indices[:, :k]
            assert columns.dtype == torch.int64 and distances.dtype == torch.float32
            assert torch.equal(columns, order), (k, trial)
            assert torch.equal(distances, finished.gather(1, order)), (k, trial)
            assert torch.isfinite(distances).all()
    assert returned >= 6


@requires_compiled
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_pool_sized_to_the_columns_it_will_be_offered(metric, monkeypatch):
    """``num_columns`` caps each row's buffer (1M queries against a 4-row gallery kept 20 keys a
    row: 160 MiB for 16 MiB of results) at no change in the answer, also where more columns than
    announced arrive; the search announces its gallery."""
    gen = torch.Generator().manual_seed(3)
    for k, total in ((1, 1), (3, 4), (4, 4), (5, 30), (9, 200)):
        keys = merging_keys(gen, 13, total, 2.0) if metric != "cosine" else torch.rand(13, total, generator=gen) - 1
        results = []
        for announced in (None, total, 2):
            pool = cpu_module.CompiledPool(k, 13, metric, num_columns=announced)
            if announced is not None:
                assert pool._capacity == max(pool._kept + 1, min(announced, max(2 * pool._kept, pool._kept + 16)))
            for start in range(0, total, 7):
                pool.offer(keys[:, start : start + 7].contiguous(), start)
            try:
                results.append(pool.result())
            except cpu_module.SlackExhausted:
                results.append(None)
        assert all(r is None for r in results) or all(
            torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1]) for r in results
        ), (k, total)
    capacities = []
    real_pool = cpu_module.CompiledPool

    def recording_pool(*args, **kwargs):
        pool = real_pool(*args, **kwargs)
        capacities.append(pool._capacity)
        return pool

    monkeypatch.setattr(cpu_module, "CompiledPool", recording_pool)
    query, gallery = torch.randn(300, 8, generator=gen), torch.randn(4, 8, generator=gen)
    assert_identical(*both_selections(query, gallery, 3, metric), metric)
    assert capacities and max(capacities) == 4 + (cpu_module._EUCLIDEAN_SLACKS[0] if metric == "euclidean" else 0), capacities


@requires_compiled
def test_pool_sorts_nan_distances_last_whatever_the_offer_order():
    """A NaN finish (-inf + inf: x86's default NaN has its sign bit set) made a key below -inf that
    won the selection, and a NaN k-th distance rejected every later entry. NaN now sorts after +inf
    as in torch.sort, and the offer order does not matter. (knn() refuses such inputs up front;
    this is the pool's own contract.)"""
    raw = torch.zeros(2, 20)
    raw[:, :10] = float("-inf")
    raw[1, 15] = float("nan")
    aux = torch.tensor([float("inf"), float("inf")])
    finished = raw + aux.unsqueeze(1)
    expected = torch.sort(finished, dim=1, stable=True)
    for blocks in (((0, 10), (10, 20)), ((10, 20), (0, 10)), ((5, 17), (0, 5), (17, 20))):
        pool = cpu_module.CompiledPool(12, 2, "sqeuclidean", aux, num_columns=20)
        for start, stop in blocks:
            pool.offer(raw[:, start:stop].contiguous(), start)
        distances, columns = pool.result()
        assert torch.equal(columns, expected.indices[:, :12]), blocks
        want = expected.values[:, :12]
        assert torch.equal(distances.isnan(), want.isnan()), blocks
        assert torch.equal(distances.nan_to_num(), want.nan_to_num()), blocks


@requires_compiled
@pytest.mark.parametrize("metric", ["dot", "sqeuclidean"])
def test_pool_ties_negative_and_positive_zero(metric):
    """-0.0 and +0.0 are equal distances: the lower column wins the tie. Without folding -0.0 into
    +0.0 the key of -0.0 ordered before +0.0's, and column 1 won."""
    for block in (torch.tensor([[0.0, -0.0, 1.0, 2.0]]), torch.tensor([[-0.0, 0.0, 1.0, 2.0]])):
        pool = cpu_module.CompiledPool(1, 1, metric)
        pool.offer(block, 0)
        assert pool.result()[1].tolist() == [[0]], block


@requires_compiled
def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        cpu_module.CompiledPool(3, 4, "manhattan")
    with pytest.raises(ValueError, match="k must be"):
        cpu_module.CompiledPool(0, 4, "dot")
    pool = cpu_module.CompiledPool(2, 4, "dot")
    with pytest.raises(RuntimeError, match="offset"):
        pool.offer(torch.randn(4, 5), -1)
    with pytest.raises(RuntimeError, match=r"\(4, W\)"):
        pool.offer(torch.randn(3, 5), 0)
    with pytest.raises(RuntimeError, match="fp32"):
        pool.offer(torch.randn(4, 5, dtype=torch.float64), 10)
    # A block that is neither row- nor column-contiguous is copied, not misread.
    strided = torch.randn(8, 30)[::2, ::3]
    pool = cpu_module.CompiledPool(3, 4, "dot")
    pool.offer(strided, 0)
    distances, columns = pool.result()
    expected = torch.sort(strided, dim=1, stable=True)
    assert torch.equal(columns, expected.indices[:, :3]) and torch.equal(distances, expected.values[:, :3])


@requires_compiled
def test_pool_reads_a_single_column_with_any_strides():
    """A (R, 1) view may report strides (2, 2): neither is 1, yet it is contiguous. It was refused."""
    block = torch.tensor([[3.0, -1.0]])[:, ::2]
    assert block.stride() == (2, 2)
    pool = cpu_module.CompiledPool(1, 1, "dot")
    pool.offer(block, 0)
    assert pool.result()[1].tolist() == [[0]]


@requires_compiled
def test_nan_rows_are_refused_under_torch_compile_too():
    """Under torch.compile knn() skipped its input check; a NaN row then reached the selection. The
    check now runs there too (a traced assertion), with the eager message."""
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    x[3] = float("nan")
    compiled = torch.compile(lambda a: knn(a, k=19, metric="sqeuclidean", backend="torch"), backend="eager")
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="NaN"):
        compiled(x)


# ---------------------------------------------------------------------------------------------
# The search: compiled selection against the pure PyTorch one, bit for bit


@requires_compiled
@pytest.mark.parametrize("metric", METRICS)
def test_self_search_equals_the_torch_path(metric, count_offers):
    """Symmetric tiles (a partial last tile) and the plain chunked search, k from 1 to more than a
    tile, with and without exclude_self, on random and on integer data (exact ties everywhere):
    the compiled selection returns the same indices and distances as the pure PyTorch selection,
    bit for bit; after the exact recomputation, the same neighbours (bit for bit on integer data,
    whose sums are exact in any order, but for the Euclidean root: the kernel's is IEEE)."""
    gen = torch.Generator().manual_seed(METRICS.index(metric))
    for integers in (False, True):
        x = integer_data(gen, 131, 5) if integers else torch.randn(131, 24, generator=gen)
        for tile in (40, None):
            for exclude in (False, True):
                for k in (1, 7, 45):
                    context = (integers, tile, exclude, k)
                    assert_identical(*both_selections(x, None, k, metric, exclude, tile), context)
                    compiled, pure = both_paths(x, k=k, metric=metric, exclude_self=exclude, backend="torch", chunk_size=tile)
                    assert_same_final_search(compiled, pure, integers, metric, context)
    assert count_offers


@requires_compiled
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "dot"])
def test_integer_data_equals_the_brute_force(metric):
    """Exact arithmetic: the compiled search returns the brute force's indices (ties to the lower
    index) over symmetric tiles, a plain chunked search and a gallery with exclude_self."""
    gen = torch.Generator().manual_seed(7)
    x = integer_data(gen, 173, 4, -1, 2)
    gallery = torch.cat([x, integer_data(gen, 30, 4, -1, 2)])
    for query, other, exclude, chunk in ((x, None, True, 16), (x, None, False, 16), (x, None, True, None), (x, gallery, True, 50)):
        reference = gallery if other is not None else x
        full = exact_distances(query, reference, metric)
        if exclude:
            full[torch.arange(query.shape[0]), torch.arange(query.shape[0])] = float("inf")
        for k in (1, 5, 60):
            d, i = knn(query, other, k, metric=metric, exclude_self=exclude, backend="torch", chunk_size=chunk)
            order = torch.sort(full, dim=1, stable=True).indices[:, :k]
            assert torch.equal(i, order), (exclude, chunk, k)
            torch.testing.assert_close(d.double(), full.gather(1, order), atol=1e-6, rtol=0)


@requires_compiled
@pytest.mark.parametrize("metric", METRICS)
def test_query_gallery_search_equals_the_torch_path(metric, count_offers):
    """The chunked query-by-gallery search (per-row norms added before the clamp), odd sizes,
    several chunk sizes, exclude_self with a gallery: bit for bit the pure PyTorch selection, and
    the same neighbours after the recomputation."""
    gen = torch.Generator().manual_seed(10 + METRICS.index(metric))
    for integers in (False, True):
        draw = (lambda r: integer_data(gen, r, 7)) if integers else (lambda r: torch.randn(r, 33, generator=gen) * 3)
        query, gallery = draw(67), draw(211)
        for chunk in (1, 13, None):
            for exclude in (False, True):
                for k in (1, 11, 210):
                    context = (integers, chunk, exclude, k)
                    assert_identical(*both_selections(query, gallery, k, metric, exclude, chunk), context)
                    compiled, pure = both_paths(query, gallery, k, metric=metric, exclude_self=exclude, backend="torch", chunk_size=chunk)
                    assert_same_final_search(compiled, pure, integers, metric, context)
    assert count_offers


@requires_compiled
def test_euclidean_settle_reorders_only_rows_whose_roots_merge(monkeypatch):
    """With k + slack above the gallery size the kept rows end in +inf fillers; counting their
    equality as merged roots re-sorted every row (3.5x cdist + topk at k = G - 1). Random rows of
    a small gallery have no merged roots: nothing is reordered, and the result is unchanged."""
    reordered = []
    real = cpu_module.order_runs_by_index
    monkeypatch.setattr(cpu_module, "order_runs_by_index", lambda d, i: reordered.append(d.shape[0]) or real(d, i))
    gen = torch.Generator().manual_seed(21)
    query, gallery = torch.randn(50, 6, generator=gen), torch.randn(12, 6, generator=gen)
    for k in (5, 11, 12):
        compiled, pure = both_paths(query, gallery, k, metric="euclidean", exclude_self=False, backend="torch")
        assert torch.equal(compiled[1], pure[1]), k
        torch.testing.assert_close(compiled[0], pure[0])
    assert sum(reordered) <= 2, reordered


def test_order_runs_by_index_equals_a_sort_by_distance_then_index():
    gen = torch.Generator().manual_seed(22)
    for _ in range(20):
        distances = torch.randint(0, 6, (7, 30), generator=gen).float()
        distances[:, -3:] = float("inf")
        distances = distances.sort(dim=1).values
        indices = torch.stack([torch.randperm(1000, generator=gen)[:30] for _ in range(7)])
        order = ref_module.order_runs_by_index(distances, indices)
        expected = ref_module.order_by_distance_then_index(distances, indices)
        assert torch.equal(indices.gather(1, order), indices.gather(1, expected))


@requires_compiled
@pytest.mark.parametrize("copies", [40, 100])
def test_euclidean_fallback_when_the_slack_is_exhausted(monkeypatch, copies):
    """Many copies of a few rows (a k-th distance shared by dozens of entries) exhaust the
    Euclidean slack of 8: the search is redone with a slack of 64 (enough for 40 copies), then
    with the PyTorch selection (100 copies). Either way it returns the same as the pure path and
    reports each query once. Random rows never need a second attempt."""
    attempts = []
    real_search = ref_module.knn_reference

    def spy(*args, **kwargs):
        attempts.append(args[8] is None if len(args) > 8 else True)  # True: the PyTorch selection
        return real_search(*args, **kwargs)

    monkeypatch.setattr(cpu_module, "knn_reference", spy)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(6 if copies == 40 else 3, 10, generator=gen).repeat(copies, 1)
    for chunk in (64, None):
        seen = []
        attempts.clear()
        d, i = knn_search(x, None, 12, metric="euclidean", exclude_self=True, backend="torch", chunk_size=chunk, progress=seen.append)
        assert attempts == ([False, False] if copies == 40 else [False, False, True]), chunk
        assert sum(seen) == x.shape[0], chunk
        pure = pure_torch(knn, x, k=12, metric="euclidean", exclude_self=True, backend="torch", chunk_size=chunk)
        assert_same_search((d, i), pure, chunk)
    attempts.clear()
    x = torch.randn(500, 32, generator=gen)
    for chunk in (64, 1000):
        compiled, pure = both_paths(x, k=20, metric="euclidean", backend="torch", chunk_size=chunk)
        assert_same_search(compiled, pure, chunk)
    assert attempts == [False, False]


@requires_compiled
def test_half_inputs_and_progress(count_offers):
    """fp16 / bf16 inputs are selected on their fp32 blocks by the compiled path; knn_search
    reports progress from it and returns the same as knn."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(150, 16, generator=gen).to(dtype)
        compiled, pure = both_paths(x, k=9, metric="euclidean", exclude_self=True, backend="torch", chunk_size=40)
        assert_identical(compiled, pure, dtype)
        assert compiled[0].dtype == dtype
    seen = []
    x = torch.randn(150, 16, generator=gen)
    d, i = knn_search(x, None, 5, metric="cosine", exclude_self=True, backend="torch", chunk_size=40, progress=seen.append)
    assert sum(seen) == 150 and len(seen) > 1
    assert torch.equal(i, knn(x, k=5, metric="cosine", exclude_self=True, backend="torch", chunk_size=40)[1])
    assert count_offers


@requires_compiled
def test_default_tiles_of_the_compiled_search(monkeypatch):
    """With no chunk_size, a self-search of two default tiles and a partial one takes the symmetric
    path at the compiled path's tile side and equals the pure PyTorch search."""
    tile = cpu_module.default_tile_size(2 * 512 + 37)
    tiles_seen = []
    real_symmetric = ref_module._knn_symmetric
    monkeypatch.setattr(ref_module, "_knn_symmetric", lambda *a: tiles_seen.append(a[4]) or real_symmetric(*a))
    x = integer_data(torch.Generator().manual_seed(2), 2 * tile + 37, 3)
    compiled, pure = both_paths(x, k=12, metric="sqeuclidean", exclude_self=True, backend="torch")
    assert tiles_seen[0] == tile
    assert_identical(compiled, pure, tile)


@requires_compiled
@pytest.mark.parametrize("n", [513, 900])
def test_self_search_below_two_tiles_keeps_the_torch_paths_query_chunks(n):
    """Below two of its tiles, the compiled self-search must compute the same GEMMs as the pure
    PyTorch one, so near-ties (copies of one row, random non-integer data) resolve alike. Its
    512 tile also served as the query chunk: N = 513 ran a 512-row and a 1-row GEMM, which round
    the keys otherwise, and the two paths returned different copies."""
    gen = torch.Generator().manual_seed(1)
    # Rows away from the origin: the GEMM form's rounding noise is then well above an ulp of 0.
    pool = torch.randn(60, 16, generator=gen) * 10 + 5
    x = pool[torch.randint(0, pool.shape[0], (n,), generator=gen)]
    for metric in ("sqeuclidean", "euclidean"):
        compiled, pure = both_paths(x, k=10, metric=metric, backend="torch")
        assert torch.equal(compiled[1], pure[1]), metric


# ---------------------------------------------------------------------------------------------
# The exact recomputation of the selected distances


def distinct_columns(gen: torch.Generator, rows: int, num_gallery: int, k: int) -> torch.Tensor:
    """(rows, k) distinct gallery rows per query, in random order, as a search selects them."""
    return torch.rand(rows, num_gallery, generator=gen).argsort(dim=1)[:, :k]


def fp64_distances(query, gallery, columns, metric):
    q, g = query.double().unsqueeze(1), gallery.double()[columns]
    if metric == "dot":
        return -(q * g).sum(-1)
    if metric == "cosine":
        q, g = q / q.norm(dim=-1, keepdim=True), g / g.norm(dim=-1, keepdim=True)
        both = (q.abs().amax(-1) > 0) & (g.abs().amax(-1) > 0)
        return torch.where(both, ((q - g) ** 2).sum(-1).nan_to_num() * 0.5, torch.ones_like(both, dtype=torch.float64))
    squared = ((q - g) ** 2).sum(-1)
    return squared.sqrt() if metric == "euclidean" else squared


@requires_compiled
@pytest.mark.parametrize("metric", METRICS)
def test_exact_recomputation_against_fp64(metric):
    """Widths around the kernel's 32 lanes, strided query rows (a slice of a wider matrix), k from 1
    to the whole gallery, zero rows (cosine: distance 1) and queries with an identical gallery row
    (exactly 0): the compiled recomputation returns the selected columns with their fp64 distances
    to fp32 rounding, in (distance, index) order, and agrees with the PyTorch recomputation."""
    gen = torch.Generator().manual_seed(30 + METRICS.index(metric))
    for width in (1, 31, 32, 33, 70, 130):
        wide = torch.randn(23, width + 5, generator=gen) * 3
        query = wide[:, 2 : width + 2]  # row stride width + 5
        gallery = torch.randn(41, width, generator=gen) * 3
        gallery[7] = query[4]
        gallery[12] = query[4]  # a tie at distance 0, which goes to the lower index
        query[9] = 0.0
        gallery[3] = 0.0
        for k in (1, 6, 41):
            columns = distinct_columns(gen, 23, 41, k)
            columns[4, :2] = torch.tensor([12, 7] if k > 1 else [7])  # in reverse order
            if k > 2:
                rest = [c for c in range(41) if c not in (7, 12)]
                columns[4, 2:] = torch.tensor(rest)[torch.randperm(len(rest), generator=gen)[: k - 2]]
            distances = torch.full((23, k), float("nan"))
            d, i = _exact_selected(query, gallery, distances, columns, metric)
            context = (width, k)
            assert d.dtype == torch.float32 and i.dtype == torch.int64, context
            assert torch.equal(i.sort(dim=1).values, columns.sort(dim=1).values), context
            expected = fp64_distances(query, gallery, i, metric)
            scale = 1.0 if metric == "cosine" else 9.0 * width
            torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5 * scale, msg=str(context))
            assert_sorted_by_distance_then_index(d, i, context)
            if metric != "dot":
                copies = (i[4] == 7) | (i[4] == 12)
                assert int(copies.sum()) == min(k, 2) and (d[4][copies] == 0.0).all(), context
            pure = pure_torch(_exact_selected, query, gallery, distances, columns, metric)
            assert_same_search((d, i), pure, context)


@requires_compiled
def test_exact_recomputation_bits_do_not_depend_on_simd_or_threads(tmp_path, monkeypatch):
    """The 32 lanes are summed in one fixed order: a build without AVX2 and one thread return the
    same bits as the loaded library on all threads."""
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    flags = [flag for flag in cpu_module._flags() if flag != "-mavx2"]
    monkeypatch.setattr(cpu_module, "_flags", lambda: flags)
    scalar = ctypes.CDLL(str(cpu_module._build(cpu_module._source_path(), cpu_module._compiler())))
    cpu_module._bind(scalar)
    assert scalar.tfg_knn_cpu_simd() == 1
    gen = torch.Generator().manual_seed(5)
    for width in (33, 512):
        query, gallery = torch.randn(300, width, generator=gen), torch.randn(200, width, generator=gen)
        columns = distinct_columns(gen, 300, 200, 17)
        nonzero_q, nonzero_g = torch.ones(300, dtype=torch.bool), torch.ones(200, dtype=torch.bool)
        for metric in METRICS:
            loaded = cpu_module.exact_selected(query, gallery, columns, metric, nonzero_q, nonzero_g)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                plain = cpu_module.exact_selected(query, gallery, columns, metric, nonzero_q, nonzero_g, library=scalar)
            finally:
                torch.set_num_threads(threads)
            assert_identical(loaded, plain, (width, metric))


@requires_compiled
def test_exact_recomputation_rejects_bad_arguments():
    x, columns = torch.randn(4, 6), torch.zeros(4, 2, dtype=torch.int64)
    columns[:, 1] = 1
    with pytest.raises(ValueError, match="indices must lie in"):
        cpu_module.exact_selected(x, x, columns + 3, "dot")
    with pytest.raises(ValueError, match="indices must lie in"):
        cpu_module.exact_selected(x, x, columns - 1, "dot")
    with pytest.raises(ValueError, match="query must be"):
        cpu_module.exact_selected(x.double(), x, columns, "dot")
    with pytest.raises(ValueError, match="gallery must be"):
        cpu_module.exact_selected(x, torch.randn(4, 5), columns, "dot")
    with pytest.raises(ValueError, match="indices must be"):
        cpu_module.exact_selected(x, x, columns.int(), "dot")
    with pytest.raises(ValueError, match="metric"):
        cpu_module.exact_selected(x, x, columns, "manhattan")
    with pytest.raises(ValueError, match="cosine needs"):
        cpu_module.exact_selected(x, x, columns, "cosine")
    # The kernel reads the flags at every selected row and column: short ones would be read past.
    with pytest.raises(ValueError, match="nonzero must have shapes"):
        cpu_module.exact_selected(x, torch.randn(40, 6), columns, "cosine", torch.ones(4, dtype=torch.bool),
                                  torch.ones(1, dtype=torch.bool))


@requires_compiled
def test_knn_takes_the_compiled_recomputation(monkeypatch):
    """fp32 rows (and the fp32 unit rows of cosine, whatever the input dtype) are recomputed by the
    kernel; fp16 / bf16 rows under the other metrics keep the PyTorch recomputation."""
    calls = []
    real = cpu_module.exact_selected
    monkeypatch.setattr(cpu_module, "exact_selected", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    x = torch.randn(60, 8)
    knn(x, k=3, metric="euclidean", backend="torch")
    assert calls == [torch.float32]
    knn(x.half(), k=3, metric="cosine", backend="torch")
    assert calls == [torch.float32] * 2
    knn(x.bfloat16(), k=3, metric="euclidean", backend="torch")
    knn(x.double(), k=3, metric="euclidean", backend="torch")
    assert len(calls) == 2


@requires_compiled
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("self_search", [False, True], ids=["gallery", "self"])
def test_galleries_past_the_kernels_columns_take_the_pytorch_path(monkeypatch, count_offers, metric, self_search):
    """The kernels hold a column in 31 bits: a gallery of 2**31 - 1 rows or more is searched and
    recomputed by the PyTorch path instead of raising (the limit lowered here to stand for it)."""
    gen = torch.Generator().manual_seed(31)
    query, gallery = torch.randn(37, 5, generator=gen), torch.randn(90, 5, generator=gen)
    expected = pure_torch(knn, query, None if self_search else gallery, k=4, metric=metric, backend="torch")
    monkeypatch.setattr(cpu_module, "_INT32_MAX", query.shape[0] if self_search else gallery.shape[0])
    recomputed = []
    real = cpu_module.exact_selected
    monkeypatch.setattr(cpu_module, "exact_selected", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    distances, indices = knn(query, None if self_search else gallery, k=4, metric=metric, backend="torch")
    assert not count_offers and not recomputed
    torch.testing.assert_close(indices, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(distances, expected[0], rtol=0, atol=0)
    # One row fewer is still the kernels'.
    monkeypatch.setattr(cpu_module, "_INT32_MAX", (query.shape[0] if self_search else gallery.shape[0]) + 1)
    knn(query, None if self_search else gallery, k=4, metric=metric, backend="torch")
    assert count_offers and recomputed


# ---------------------------------------------------------------------------------------------
# Build, cache, fallback


@pytest.mark.skipif(cpu_module._compiler() is None, reason="no C compiler: the PyTorch path is the only one")
def test_kernels_are_usable_where_a_compiler_exists():
    """Every other test of the kernels skips when they are unusable, so a kernel that fails its
    first-use self-check (or a build that breaks) must fail here instead of passing quietly."""
    assert COMPILED_OK, COMPILED_WHY


@requires_compiled
def test_build_is_cached(tmp_path, monkeypatch):
    """A build into an empty cache writes the library once; a second build finds it without
    running the compiler."""
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    source, compiler = cpu_module._source_path(), cpu_module._compiler()
    path = cpu_module._build(source, compiler)
    assert path.is_file() and tmp_path in path.parents
    monkeypatch.setattr(cpu_module.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert cpu_module._build(source, compiler) == path


@requires_compiled
def test_a_killed_builds_leftovers_are_removed_by_the_next_build(tmp_path, monkeypatch):
    """A process killed while compiling never ran its cleanup: its private tmp*.so (finished by
    the compiler it left behind) and tmp* digest stayed in the cache for good. The next build
    removes the ones older than any live build; a younger one (another process's build in
    progress) stays."""
    import time

    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    source, compiler = cpu_module._source_path(), cpu_module._compiler()
    path = cpu_module._build(source, compiler)
    path.unlink()  # the next call builds again, in the same folder
    stale_library, stale_digest = path.parent / "tmpkilled1.so", path.parent / "tmpkilled2"
    live = path.parent / "tmplive.so"
    for leftover in (stale_library, stale_digest, live):
        leftover.write_bytes(b"x" * 100)
    stale = time.time() - 3 * cpu_module._BUILD_TIMEOUT_S
    os.utime(stale_library, (stale, stale))
    os.utime(stale_digest, (stale, stale))
    assert cpu_module._build(source, compiler) == path and path.is_file()
    assert not stale_library.exists() and not stale_digest.exists() and live.exists()


def test_an_environment_variable_unset_by_another_thread_mid_check_is_no_error(monkeypatch):
    """TORCHFG_CPU_KERNELS was read twice (the flag, then the message): a thread unsetting it in
    between made every CPU knn call's first check raise KeyError."""
    monkeypatch.setenv("TORCHFG_CPU_KERNELS", "0")

    def flag_then_unset(name, default):
        value = os.environ[name]
        del os.environ[name]  # what another thread does between the two reads
        return value not in ("0",)

    monkeypatch.setattr(cpu_module, "env_flag", flag_then_unset)
    assert cpu_module._switched_off().startswith("disabled by TORCHFG_CPU_KERNELS")


@requires_compiled
def test_cached_library_is_readable_by_other_users(tmp_path, monkeypatch):
    """A shared TORCHFG_CACHE_DIR serves every user: the library gets 0755 less the umask (the
    private 0600 of the temporary file it is compiled to would lock others out)."""
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    source, compiler = cpu_module._source_path(), cpu_module._compiler()
    old = os.umask(0o022)
    try:
        path = cpu_module._build(source, compiler)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    # One cached by an earlier version with 0600 is opened up by its owner on the next load.
    path.chmod(0o600)
    monkeypatch.setattr(cpu_module.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    old = os.umask(0o027)
    try:
        assert cpu_module._build(source, compiler) == path
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o750


@requires_compiled
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """A truncated library in the cache killed every later process with SIGBUS inside dlopen (and
    a foreign one raised AttributeError from knn): the file is checked against the digest recorded
    at its build, and rebuilt when it does not match."""
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    source, compiler = cpu_module._source_path(), cpu_module._compiler()
    path = cpu_module._build(source, compiler)
    built = path.read_bytes()
    for damaged in (built[: len(built) // 2], b"", b"\x7fELF" + bytes(64)):
        path.write_bytes(damaged)
        assert cpu_module._build(source, compiler) == path
        assert path.read_bytes() == built
    # The platform is part of the key: another machine type builds into another folder.
    monkeypatch.setattr(cpu_module.platform, "machine", lambda: "aarch64")
    assert cpu_module._build(source, compiler).parent != path.parent


@requires_compiled
def test_a_library_without_the_kernels_symbols_falls_back(tmp_path, monkeypatch):
    """A loadable library without the kernel's functions raised AttributeError from every knn and
    from status() (only OSError / RuntimeError were caught)."""
    other = tmp_path / "other.so"
    source = tmp_path / "other.c"
    source.write_text("int tfg_unrelated(void) { return 1; }\n")
    import subprocess

    subprocess.run([*cpu_module._compiler(), "-shared", "-fPIC", str(source), "-o", str(other)], check=True)
    monkeypatch.setattr(cpu_module, "_library", None)
    monkeypatch.setattr(cpu_module, "_failure", None)
    monkeypatch.setattr(cpu_module, "_build", lambda *args: other)
    ok, why = cpu_module.status()
    assert not ok and "tfg_knn_cpu" in why, why
    x = integer_data(torch.Generator().manual_seed(1), 40, 3)
    _, i = knn(x, k=3, metric="euclidean", exclude_self=True, backend="torch")
    full = exact_distances(x, x, "euclidean")
    full.fill_diagonal_(float("inf"))
    assert torch.equal(i, torch.sort(full, dim=1, stable=True).indices[:, :3])


def test_a_compiler_that_writes_nothing_is_a_failed_build(tmp_path, monkeypatch):
    """CC exiting 0 without output left an empty library in the cache for good."""
    monkeypatch.setattr(cpu_module, "_library", None)
    monkeypatch.setattr(cpu_module, "_failure", None)
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("true") or "/bin/true")
    ok, why = cpu_module.status()
    assert not ok and "wrote no library" in why, why
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_during_a_build_leaves_the_child_a_usable_lock():
    """DataLoader workers forked while another thread built the kernel (holding the module's lock)
    inherited the held lock, owned by a thread the child does not have: their first knn waited
    forever. The child gets a fresh lock."""
    import threading

    holding, release = threading.Event(), threading.Event()

    def build():
        with cpu_module._lock:
            holding.set()
            release.wait(10)

    builder = threading.Thread(target=build)
    builder.start()
    holding.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: the lock must be free
            os._exit(0 if cpu_module._lock.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        builder.join()
    assert os.waitstatus_to_exitcode(status) == 0


def test_cache_folder_is_the_documented_one(tmp_path, monkeypatch):
    """TORCHFG_CACHE_DIR, else XDG_CACHE_HOME, else ~/.cache, as docs/concepts/backends.md says."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "concepts" / "backends.md").read_text()
    for documented in ("`$TORCHFG_CACHE_DIR/knn_cpu/`", "`$XDG_CACHE_HOME/torchfg/knn_cpu/`",
                       "`~/.cache/torchfg/knn_cpu/`"):
        assert documented in doc, documented
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu_module._cache_root() == tmp_path / "own" / "knn_cpu"
    monkeypatch.delenv("TORCHFG_CACHE_DIR")
    assert cpu_module._cache_root() == tmp_path / "xdg" / "torchfg" / "knn_cpu"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cpu_module._cache_root() == tmp_path / "home" / ".cache" / "torchfg" / "knn_cpu"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("cc", ["{gcc} -O2", "env {gcc}", "'{gcc}'"])
def test_cc_with_arguments_is_a_compiler(tmp_path, monkeypatch, cc):
    """CC is split as a shell would: CC="ccache gcc" or CC="gcc -O2" is a compiler command, not
    "no C compiler"; the kernel builds with it and passes its self-check."""
    monkeypatch.setattr(cpu_module, "_library", None)
    monkeypatch.setattr(cpu_module, "_failure", None)
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", cc.format(gcc=shutil.which("gcc")))
    command = cpu_module._compiler()
    assert command is not None and Path(command[0]).is_file()
    ok, why = cpu_module.status()
    assert ok, why
    assert tmp_path in Path(why.removeprefix("loaded: ").split(" (simd")[0]).parents


def test_cc_naming_no_program_says_so(monkeypatch):
    monkeypatch.setattr(cpu_module, "_library", None)
    monkeypatch.setattr(cpu_module, "_failure", None)
    monkeypatch.setenv("CC", "no-such-compiler-xyz -O2")
    ok, why = cpu_module.status()
    assert not ok and "no C compiler" in why and "no-such-compiler-xyz" in why


def test_failed_build_falls_back_to_the_torch_path(tmp_path, monkeypatch):
    """A compiler that fails (or none) leaves the search on the PyTorch path, with the reason in
    status(); nothing raises."""
    monkeypatch.setattr(cpu_module, "_library", None)
    monkeypatch.setattr(cpu_module, "_failure", None)
    monkeypatch.setenv("TORCHFG_CACHE_DIR", str(tmp_path))
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    ok, why = cpu_module.status()
    assert not ok and "internal error" in why
    assert not cpu_module.is_usable(torch.device("cpu"), torch.float32)
    x = integer_data(torch.Generator().manual_seed(0), 90, 3)
    d, i = knn(x, k=4, metric="euclidean", exclude_self=True, backend="torch", chunk_size=16)
    full = exact_distances(x, x, "euclidean")
    full.fill_diagonal_(float("inf"))
    assert torch.equal(i, torch.sort(full, dim=1, stable=True).indices[:, :4])

    monkeypatch.setattr(cpu_module, "_failure", None)
    monkeypatch.setattr(cpu_module, "_compiler", lambda: None)
    ok, why = cpu_module.status()
    assert not ok and "no C compiler" in why


def test_switches_keep_the_torch_path(monkeypatch):
    """TORCHFG_CPU_KERNELS=0 and the module flag: no compiled pool is made, and the search is the
    pure PyTorch one; fp64 inputs never take the fp32 kernel."""
    monkeypatch.setattr(cpu_module, "CompiledPool", lambda *a, **k: pytest.fail("compiled pool used"))
    monkeypatch.setattr(cpu_module, "exact_selected", lambda *a, **k: pytest.fail("compiled recomputation used"))
    x = torch.randn(70, 6)
    monkeypatch.setenv("TORCHFG_CPU_KERNELS", "0")
    ok, why = cpu_module.status()
    assert not ok and "TORCHFG_CPU_KERNELS=0" in why
    knn(x, k=5, metric="euclidean", backend="torch", chunk_size=16)
    monkeypatch.delenv("TORCHFG_CPU_KERNELS")
    monkeypatch.setattr(cpu_module, "enabled", False)
    assert "enabled = False" in cpu_module.status()[1]
    knn(x, k=5, metric="euclidean", backend="torch", chunk_size=16)
    monkeypatch.setattr(cpu_module, "enabled", True)
    assert not cpu_module.is_usable(torch.device("cpu"), torch.float64)
    knn(x.double(), k=5, metric="euclidean", backend="torch", chunk_size=16)


@requires_compiled
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_shares_torchs_openmp_runtime_next_to_faiss():
    """The kernel runs on torch's libgomp (no second OpenMP runtime of its own), and a process
    that also runs faiss (which brings its own libgomp) gets the same neighbours from both."""
    faiss = pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(600, 32, generator=gen)
    d, i = knn(x, k=8, metric="sqeuclidean", backend="torch", chunk_size=128)
    index = faiss.IndexFlatL2(32)
    index.add(x.numpy())
    _, faiss_i = index.search(x.numpy(), 8)
    d2, i2 = knn(x, k=8, metric="sqeuclidean", backend="torch", chunk_size=128)
    assert torch.equal(i, i2)
    # Distances from explicit differences: the index sets may differ only at fp32 near-ties.
    assert (torch.from_numpy(faiss_i) == i).float().mean() > 0.99
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    # The kernel asks for the soname libgomp.so.1: a second file of that name (e.g. the system's
    # next to torch's) would be a second runtime. Wheels that bundle their own copy (faiss,
    # scikit-learn) load it under a mangled name (libgomp-<hash>.so), which is theirs, not ours.
    ours = [path for path in mapped if Path(path).name == "libgomp.so.1"]
    assert len(ours) <= 1, f"torch and the kernel loaded two OpenMP runtimes: {ours}"
