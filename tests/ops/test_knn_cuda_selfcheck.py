"""The CUDA k-NN kernel's first-use self-check (torchfg/ops/knn/cuda.py), exercised on the CPU.

The kernel call is replaced by a brute-force fake that honours the kernel's contract; the check
must pass on it and fail on each deliberately wrong variant (a check that were a no-op would let
every mutant through, and these tests would fail).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from torchfg.backends import resolve_backend
from torchfg.ops import _cuda_extension
from torchfg.ops.knn import cuda as knn_cuda_mod

LIMIT_K = 600  # the battery's "device limit" k on the CPU (keeps the brute force quick)


def _brute_distances(query, gallery, query_aux, gallery_aux, metric, symmetric, self_offset):
    dot = query.double() @ gallery.double().T
    if metric in (0, 1):
        # sqrt after the fp32 rounding, as the kernel's sqrtf
        d = (query_aux.double()[:, None] + gallery_aux.double()[None] - 2 * dot).clamp_min(0).float()
        d = d.sqrt().double() if metric == 1 else d.double()
    elif metric == 2:
        d = 1 - dot * query_aux.double()[:, None] * gallery_aux.double()[None]
    else:
        d = -dot
    rows = torch.arange(query.shape[0])
    if symmetric:
        diag = d[rows, rows]
        if metric == 2:
            d[rows, rows] = torch.where(query_aux > 0, torch.zeros_like(diag), diag)
        elif metric != 3:
            d[rows, rows] = 0
    d = d.float()  # the kernel's distances are fp32
    if self_offset >= 0:
        cols = rows + self_offset
        keep = cols < gallery.shape[0]
        d[rows[keep], cols[keep]] = float("inf")
    return d


def _fake_kernel(mutation: str | None = None) -> Callable:
    """A CPU stand-in for torch.ops.torchfg_cuda.knn; ``mutation`` breaks one part of the contract."""

    def call(query, gallery, query_aux, gallery_aux, k, metric, symmetric, self_offset, split_size):
        if mutation == "ignore_self_offset":
            self_offset = -1
        if mutation == "ignore_symmetric":
            symmetric = False
        d = _brute_distances(query, gallery, query_aux, gallery_aux, metric, symmetric, self_offset)
        num_query, num_gallery = d.shape
        splits = -(-num_gallery // split_size)
        out_d = torch.full((splits, num_query, k), float("inf"))
        out_i = torch.full((splits, num_query, k), -1, dtype=torch.int64)
        for s in range(splits):
            lo, hi = s * split_size, min((s + 1) * split_size, num_gallery)
            block = d[:, lo:hi]
            idx = torch.arange(lo, hi).expand(num_query, -1)
            if mutation == "ties_to_higher_index":
                idx = idx.flip(1)
                block = block.flip(1)
            order = torch.sort(block, dim=1, stable=True).indices
            sd, si = block.gather(1, order), idx.gather(1, order)
            valid = torch.isfinite(sd)
            si = torch.where(valid, si, torch.full_like(si, -1))
            n = min(k, hi - lo)
            out_d[s, :, :n], out_i[s, :, :n] = sd[:, :n], si[:, :n]
        if mutation == "k1_second_best" and k == 1 and num_gallery > 1:
            full = torch.sort(d, dim=1, stable=True)
            out_d[0, :, 0], out_i[0, :, 0] = full.values[:, 1], full.indices[:, 1]
        if mutation == "last_split_dropped" and splits > 1:
            out_d[-1], out_i[-1] = float("inf"), -1
        if mutation == "unfilled_zero" and splits > 1:
            out_d[torch.isinf(out_d)] = 0.0
        if mutation == "large_k_truncated" and k > 512:
            out_d[:, :, 512:], out_i[:, :, 512:] = float("inf"), -1
        if mutation == "off_by_ulp":
            out_d = torch.nextafter(out_d, torch.tensor(float("inf")))
        if mutation == "unaligned_rows_misread" and query.data_ptr() % 16:
            out_i = torch.where(out_i >= 0, (out_i + 1) % num_gallery, out_i)
        if mutation == "crash" and k == 129:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return out_d, out_i

    return call


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    # monkeypatch restores both after the test, whatever it marked.
    monkeypatch.setattr(_cuda_extension, "_self_check_failure", None)
    monkeypatch.setattr(knn_cuda_mod, "_self_checked", set())


def test_self_check_reaches_unaligned_rows(monkeypatch):
    seen = []
    correct = _fake_kernel()

    def spy(query, gallery, *args):
        seen.append(query.data_ptr() % 16 != 0 or (query.stride(0) * query.element_size()) % 16 != 0)
        return correct(query, gallery, *args)

    monkeypatch.setattr(knn_cuda_mod, "_kernel_call", spy)
    assert knn_cuda_mod.run_self_check(torch.device("cpu"), LIMIT_K) == []
    assert any(seen) and not all(seen)


def test_self_check_passes_a_correct_kernel(monkeypatch):
    monkeypatch.setattr(knn_cuda_mod, "_kernel_call", _fake_kernel())
    assert knn_cuda_mod.run_self_check(torch.device("cpu"), LIMIT_K) == []
    knn_cuda_mod.self_check(torch.device("cpu"), LIMIT_K)
    assert _cuda_extension.self_check_failure() is None


MUTATIONS = [
    "ties_to_higher_index",
    "ignore_self_offset",
    "ignore_symmetric",
    "k1_second_best",
    "last_split_dropped",
    "unfilled_zero",
    "large_k_truncated",
    "off_by_ulp",
    "unaligned_rows_misread",
    "crash",
]


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_self_check_catches_a_wrong_kernel(monkeypatch, mutation):
    monkeypatch.setattr(knn_cuda_mod, "_kernel_call", _fake_kernel(mutation))
    assert knn_cuda_mod.run_self_check(torch.device("cpu"), LIMIT_K), f"the self-check let {mutation!r} through"
    with pytest.raises(_cuda_extension.KernelSelfCheckError, match="disagrees with the torch reference"):
        knn_cuda_mod.self_check(torch.device("cpu"), LIMIT_K)
    assert "self-check" in _cuda_extension.status()[1]
    assert _cuda_extension.status()[0] is False
    # Later calls fail fast, without rerunning the battery, and the loader refuses too.
    monkeypatch.setattr(knn_cuda_mod, "_kernel_call", _fake_kernel())
    with pytest.raises(_cuda_extension.KernelSelfCheckError):
        knn_cuda_mod.self_check(torch.device("cpu"), LIMIT_K)
    with pytest.raises(_cuda_extension.KernelSelfCheckError):
        _cuda_extension.load()


def test_cases_past_the_device_limit_are_skipped(monkeypatch):
    correct = _fake_kernel()

    def small_device(query, gallery, query_aux, gallery_aux, k, *args):
        if k > 100:
            raise RuntimeError("torchfg_cuda::knn: k needs more shared memory than this device offers")
        return correct(query, gallery, query_aux, gallery_aux, k, *args)

    monkeypatch.setattr(knn_cuda_mod, "_kernel_call", small_device)
    assert knn_cuda_mod.run_self_check(torch.device("cpu"), 100) == []


def test_battery_covers_the_contract():
    cases = knn_cuda_mod._CASES
    assert {c.dtype for c in cases} == set(knn_cuda_mod.SUPPORTED_DTYPES)
    assert {c.metric for c in cases} == {"sqeuclidean", "euclidean", "cosine", "dot"}
    ks = {c.k for c in cases}
    assert {1, 0, -1, 128, 129, 513} <= ks and any(k % 2 for k in ks if k > 1)
    assert any(c.symmetric for c in cases) and any(c.self_offset >= 0 for c in cases)
    assert any(c.symmetric and c.self_offset == 0 for c in cases)
    assert any(c.duplicates for c in cases) and any(c.zero_row for c in cases)
    assert any(c.split_size < 1000 and c.k > c.split_size for c in cases)  # unfilled split slots
    assert any(c.dim % 8 for c in cases) and any(c.num_query % 16 for c in cases)
    assert {c.dtype for c in cases if c.unaligned} >= {torch.float16, torch.float32}
    # every configuration row of the kernel (k <= 128, <= 512, <= 1024) sees every dtype
    for lo, hi in ((1, 128), (129, 512), (513, 1024)):
        assert {c.dtype for c in cases if lo <= c.k <= hi or (c.k <= 0 and hi == 1024)} == set(
            knn_cuda_mod.SUPPORTED_DTYPES
        ), (lo, hi)


def test_failed_self_check_takes_cuda_out_of_auto(monkeypatch):
    # Pretend a built extension on a CUDA device; the k is past Triton's bound, so only the
    # CUDA kernel (or the torch fallback) can serve it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda_extension, "_loaded", "test stand-in")
    monkeypatch.setattr(knn_cuda_mod, "max_k", lambda *args, **kwargs: 1024)
    device = torch.device("cuda", 0)
    assert _cuda_extension.backend_status(device)[0]
    assert resolve_backend("knn", device, torch.float16, "auto", k=200) == "cuda"
    _cuda_extension.mark_self_check_failed("test: wrong neighbours")
    ok, why = _cuda_extension.backend_status(device)
    assert not ok and "self-check" in why and "wrong neighbours" in why
    assert resolve_backend("knn", device, torch.float16, "auto", k=200) == "torch"


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and _cuda_extension.status()[0]


@pytest.mark.skipif(not _cuda_ready(), reason="CUDA extension unavailable (needs a GPU and nvcc)")
def test_real_kernel_passes_its_self_check():
    device = torch.device("cuda", torch.cuda.current_device())
    limit = knn_cuda_mod.max_k(device.index)
    failures = knn_cuda_mod.run_self_check(device, limit)
    assert failures == [], "\n".join(failures)


@pytest.mark.skipif(not _cuda_ready(), reason="CUDA extension unavailable (needs a GPU and nvcc)")
def test_real_kernel_config_table():
    index = torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    for dtype in knn_cuda_mod.SUPPORTED_DTYPES:
        sizes = [knn_cuda_mod.smem_bytes(dtype, k) for k in range(1, knn_cuda_mod.KERNEL_MAX_K + 1)]
        assert all(b >= a > 0 for a, b in zip(sizes, sizes[1:]))  # max_k's bisection relies on it
        assert knn_cuda_mod.smem_bytes(dtype, knn_cuda_mod.KERNEL_MAX_K + 1) == -1
        if major >= 9:  # 227 KB per block: the whole table fits, small k on 32-query blocks
            assert knn_cuda_mod.max_k(index, dtype) == knn_cuda_mod.KERNEL_MAX_K
            assert knn_cuda_mod.kernel_config(dtype, 10, index).block_q == 32
            assert knn_cuda_mod.kernel_config(dtype, 1024, index).index == 2
