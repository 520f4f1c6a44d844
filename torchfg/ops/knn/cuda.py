"""Binding to the k-NN CUDA kernel in ``torchfg/csrc/knn`` (op ``torch.ops.torchfg_cuda.knn``).

The kernel stages query and gallery slices in shared memory with multi-stage ``cp.async``
copies, computes distance tiles with ``mma.sync`` tensor-core instructions (fp16/bf16; a
register-blocked FMA tile for fp32), and keeps each query's top-k in shared memory, merged across
gallery tiles by the whole block; see ``torchfg/csrc/knn/knn_kernel.cu``. It is built on first
use by :mod:`torchfg.ops._cuda_extension`.

The kernel has never run on hardware in this project's CI, so the first call on every device
runs a small battery against :func:`torchfg.ops.knn.reference.knn_reference` (:func:`self_check`);
a mismatch raises :class:`~torchfg.ops._cuda_extension.KernelSelfCheckError` and takes the
``cuda`` backend out of service for the process (``"auto"`` never picks it again).
"""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import torch

from torchfg.ops import _cuda_extension
from torchfg.ops.metric import metric_code, row_statistics
from torchfg.ops.knn.reference import knn_reference, select_candidates

__all__ = [
    "KERNEL_MAX_K",
    "KernelConfig",
    "max_k",
    "smem_bytes",
    "kernel_config",
    "knn_cuda",
    "run_self_check",
    "self_check",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Compile-time bound of the kernel (TORCHFG_KNN_MAX_K); a device may allow less (shared memory).
KERNEL_MAX_K = 1024
# Gallery rows per kernel tile: split sizes are multiples of it.
_TILE_ROWS = 64
# The kernel's TorchfgKnnDtype codes.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# cp.async moves 16-byte chunks: rows whose byte length or start is not a multiple of 16 are
# zero-padded (zeros change no inner product and no norm) rather than sent down the kernel's
# slow element-wise staging path.
_ROW_ALIGN_BYTES = 16


class KernelConfig(NamedTuple):
    """One entry of the kernel's per-k configuration table (``torchfg/csrc/knn/knn_kernel.cu``)."""

    # The table's own name, kept for callers; it shadows tuple.index, which nothing calls on a config.
    index: int  # type: ignore[assignment]  # table row, -1 when no row fits the device
    block_q: int  # query rows per block
    block_g: int  # gallery rows per tile
    block_d: int  # embedding columns per pipeline stage
    stages: int  # cp.async pipeline depth
    candidates: int  # per-query candidate buffer between merges
    smem_bytes: int  # dynamic shared memory per block


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _max_smem(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def smem_bytes(dtype: torch.dtype, k: int) -> int:
    """Smallest dynamic shared memory (bytes) the kernel needs for ``k`` (-1: k out of range)."""
    return int(_cuda_extension.ops().knn_smem_bytes(_DTYPE_CODES[dtype], k))


def kernel_config(dtype: torch.dtype, k: int, device_index: int) -> KernelConfig:
    """The table entry a launch with this dtype and k uses on the device (``index`` -1: none fits)."""
    return KernelConfig(*_cuda_extension.ops().knn_config(_DTYPE_CODES[dtype], k, _max_smem(device_index)))


@functools.lru_cache(maxsize=None)
def max_k(device_index: int, dtype: torch.dtype = torch.float32) -> int:
    """Largest k whose smallest shared-memory footprint fits one block on this device."""
    limit = _max_smem(device_index)
    lo, hi = 0, KERNEL_MAX_K
    while lo < hi:  # the smallest footprint is non-decreasing in k
        mid = (lo + hi + 1) // 2
        need = smem_bytes(dtype, mid)
        if 0 <= need <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _split_size(num_query: int, num_gallery: int, device: torch.device, block_q: int) -> int:
    """Gallery rows per split: enough blocks to fill the device, a few tiles per block at least."""
    blocks_q = -(-num_query // block_q)
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(-(-target // blocks_q), num_gallery // (8 * _TILE_ROWS), 65535))
    size = -(-num_gallery // splits)
    return -(-size // _TILE_ROWS) * _TILE_ROWS


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """(R, D) contiguous -> (R, D') with D' * itemsize a multiple of 16 bytes and a 16-byte-aligned start."""
    x = x.contiguous()
    per_chunk = _ROW_ALIGN_BYTES // x.element_size()
    pad = (-x.shape[1]) % per_chunk
    if pad == 0 and x.data_ptr() % _ROW_ALIGN_BYTES == 0:
        return x
    # A fresh allocation is aligned whatever the storage offset of x.
    out = x.new_zeros(x.shape[0], x.shape[1] + pad)
    out[:, : x.shape[1]] = x
    return out


def _kernel_call(
    query: torch.Tensor,
    gallery: torch.Tensor,
    query_aux: torch.Tensor,
    gallery_aux: torch.Tensor,
    k: int,
    metric: int,
    symmetric: bool,
    self_offset: int,
    split_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw op: per gallery split s, the k best of query (Q, D) among gallery rows
    [s * split_size, (s + 1) * split_size) -> (distances (splits, Q, k) fp32, indices (splits, Q, k) int64).

    The seam the self-check tests replace with a deliberately wrong kernel.
    """
    return _cuda_extension.ops().knn(query, gallery, query_aux, gallery_aux, k, metric, symmetric, self_offset, split_size)


def _knn_fp32(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool,
    self_offset: int,
    split_size: int,
    align: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel search with the splits merged: (Q, D), (G, D) -> (fp32 distances (Q, k), int64 indices (Q, k)).

    ``align=False`` hands the rows over as they are (unit column stride needed), so that the
    self-check also reaches the kernel's element-wise staging of unaligned rows.
    """
    num_query = query.shape[0]
    if metric == "dot":
        q_aux = g_aux = torch.empty(0, dtype=torch.float32, device=query.device)
    else:
        q_aux = row_statistics(query, metric)
        g_aux = q_aux if symmetric else row_statistics(gallery, metric)
    if align:
        query = _aligned_rows(query)
        gallery = query if symmetric else _aligned_rows(gallery)
    out_d, out_i = _kernel_call(query, gallery, q_aux, g_aux, k, metric_code(metric), symmetric, self_offset, split_size)
    splits = out_d.shape[0]
    if splits == 1:
        return out_d[0], out_i[0]
    # Each split's list is exact for its gallery range and the ranges are disjoint: an exact
    # (distance, index) selection over their union is the global answer. Unfilled slots hold
    # +inf and are never chosen while k <= the number of eligible gallery rows.
    return select_candidates(
        out_d.permute(1, 0, 2).reshape(num_query, splits * k),
        out_i.permute(1, 0, 2).reshape(num_query, splits * k),
        k,
    )


def knn_cuda(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool = False,
    self_offset: int = -1,
    split_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA k-NN: query (Q, D), gallery (G, D) -> (distances (Q, k) in query's dtype, indices (Q, k) int64).

    Same contract as :func:`torchfg.ops.knn.reference.knn_reference`. Needs CUDA tensors of
    dtype fp16/bf16/fp32 and 1 <= k <= :func:`max_k` for the device. The first call on a device
    runs :func:`self_check` first.

    Raises:
        KernelSelfCheckError: the kernel failed (now or earlier in this process) its self-check.
    """
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"knn_cuda supports float16, bfloat16 and float32 inputs, got {query.dtype}")
    index = _device_index(query.device)
    limit = max_k(index)
    if not 1 <= k <= limit:
        raise ValueError(f"knn_cuda supports 1 <= k <= {limit} on this device, got k={k}")
    self_check(query.device)
    size = split_size or _split_size(
        query.shape[0], gallery.shape[0], query.device, max(kernel_config(query.dtype, k, index).block_q, 1)
    )
    gallery = query if symmetric else gallery
    distances, indices = _knn_fp32(query, gallery, k, metric, symmetric, self_offset, size)
    return distances.to(query.dtype), indices


# ---------------------------------------------------------------------------------------------
# First-use self-check

_self_checked: set[tuple[str, int | None]] = set()
_self_check_lock = threading.Lock()


class _Case(NamedTuple):
    dtype: torch.dtype
    metric: str
    num_query: int
    num_gallery: int  # ignored when symmetric (= num_query)
    dim: int
    k: int  # 0: the device's largest k, -1: one below it
    symmetric: bool = False
    self_offset: int = -1
    split_size: int = 1 << 20  # one split unless smaller
    duplicates: bool = False  # gallery rows repeated: exact ties between distinct indices
    zero_row: bool = False
    unaligned: bool = False  # rows passed as views starting 1 element into 16-byte-unaligned rows


# Small integer entries make every product, sum and distance exact in fp32 (and the inputs exact
# in fp16/bf16), so the kernel must reproduce the reference bit for bit, including which of many
# equal distances it keeps (the lower index); cosine alone is compared within a tolerance.
_CASES = (
    _Case(torch.float32, "sqeuclidean", 45, 203, 37, 1),
    _Case(torch.float16, "sqeuclidean", 45, 203, 37, 7, split_size=64),
    _Case(torch.bfloat16, "dot", 33, 300, 64, 129),
    _Case(torch.float16, "euclidean", 77, 0, 19, 5, symmetric=True),
    _Case(torch.float32, "euclidean", 50, 120, 24, 11, self_offset=0),
    _Case(torch.bfloat16, "sqeuclidean", 90, 0, 16, 33, symmetric=True, self_offset=0),
    _Case(torch.float16, "cosine", 20, 250, 40, 17),
    _Case(torch.float32, "cosine", 31, 0, 12, 9, symmetric=True, zero_row=True),
    _Case(torch.float32, "sqeuclidean", 16, 128, 8, 20, duplicates=True),
    _Case(torch.bfloat16, "euclidean", 19, 203, 5, 100, split_size=64),
    _Case(torch.float16, "dot", 3, 700, 9, 513),
    _Case(torch.float32, "sqeuclidean", 17, 130, 33, 128, self_offset=2),
    _Case(torch.float16, "sqeuclidean", 5, 0, 8, 0),
    _Case(torch.float32, "dot", 4, 0, 70, -1),
    _Case(torch.float32, "sqeuclidean", 21, 400, 20, 257, split_size=192),
    _Case(torch.float16, "euclidean", 300, 0, 24, 200, symmetric=True, self_offset=0),
    _Case(torch.bfloat16, "dot", 7, 760, 24, 700),
    _Case(torch.float16, "sqeuclidean", 37, 150, 21, 6, unaligned=True),
    _Case(torch.float32, "cosine", 151, 0, 13, 140, symmetric=True, unaligned=True),
)


def _case_inputs(case: _Case, k: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_gallery = case.num_gallery or max(case.num_query, k + 37 + max(case.self_offset, 0))
    query = torch.randint(-3, 4, (case.num_query, case.dim), generator=gen).float()
    if case.symmetric:
        gallery = query
    else:
        gallery = torch.randint(-3, 4, (num_gallery, case.dim), generator=gen).float()
        if case.self_offset >= 0:  # the queries are gallery rows, as exclude_self means
            gallery[case.self_offset : case.self_offset + case.num_query] = query
        if case.duplicates:
            gallery[1::2] = gallery[0::2][: gallery[1::2].shape[0]]
    if case.zero_row:
        query[3] = 0
    return query.to(device), gallery.to(device)


def _unaligned_view(x: torch.Tensor) -> torch.Tensor:
    """(R, D) -> the same values as a view one element into rows of D + 3 elements (unaligned)."""
    wide = x.new_zeros(x.shape[0], x.shape[1] + 3)
    wide[:, 1 : x.shape[1] + 1] = x
    return wide[:, 1 : x.shape[1] + 1]


def _compare(
    case: _Case,
    query: torch.Tensor,
    gallery: torch.Tensor,
    got: tuple[torch.Tensor, torch.Tensor],
    want: tuple[torch.Tensor, torch.Tensor],
) -> str | None:
    """Why the kernel's (distances, indices) differ from the reference's, or None."""
    got_d, got_i = got[0].float().cpu(), got[1].cpu()
    want_d, want_i = want[0].float().cpu(), want[1].cpu()
    if got_d.shape != want_d.shape or got_i.shape != want_i.shape:
        return f"shapes {tuple(got_d.shape)}/{tuple(got_i.shape)}, expected {tuple(want_d.shape)}"
    if case.metric != "cosine":
        if not torch.equal(got_i, want_i):
            rows = (got_i != want_i).any(1).nonzero().flatten()
            r = int(rows[0])
            return (
                f"indices differ in {rows.numel()} rows, e.g. row {r}: got {got_i[r, :8].tolist()}"
                f" {got_d[r, :8].tolist()}, expected {want_i[r, :8].tolist()} {want_d[r, :8].tolist()}"
            )
        if not torch.equal(got_d, want_d):
            return f"distances differ by up to {float((got_d - want_d).abs().max())}"
        return None
    # Cosine: inverse norms round differently, so the selection is checked up to that rounding.
    if not torch.allclose(got_d, want_d, rtol=0, atol=1e-5):
        return f"cosine distances differ by up to {float((got_d - want_d).abs().max())}"
    num_gallery = gallery.shape[0]
    if bool(((got_i < 0) | (got_i >= num_gallery)).any()):
        return "indices out of range"
    if got_i.shape[1] > 1:
        ordered = (got_d[:, 1:] > got_d[:, :-1]) | ((got_d[:, 1:] == got_d[:, :-1]) & (got_i[:, 1:] > got_i[:, :-1]))
        if not bool(ordered.all()):
            return "cosine results are not sorted by (distance, index) or repeat an index"
    q = torch.nn.functional.normalize(query.double().cpu(), dim=1)
    g = torch.nn.functional.normalize(gallery.double().cpu(), dim=1)
    exact = 1 - (q.unsqueeze(1) * g[got_i]).sum(-1)
    if case.symmetric:
        own = got_i == torch.arange(got_i.shape[0]).unsqueeze(1)
        own = own & (q.abs().amax(1, keepdim=True) > 0)
        # The kernel sets a non-zero row's own distance to exactly 0 (the GEMM form leaves ~1e-7).
        if not bool((got_d[own] == 0).all()):
            return "symmetric cosine: a row's distance to itself is not exactly 0"
        exact = torch.where(own, torch.zeros_like(exact), exact)
    if not torch.allclose(got_d.double(), exact, rtol=0, atol=1e-5):
        return "cosine distances do not belong to the returned indices"
    return None


def _check_splits(case: _Case, query: torch.Tensor, gallery: torch.Tensor, k: int) -> str | None:
    """Raw kernel output of a split gallery: each split's unfillable slots are (+inf, -1)."""
    metric = case.metric
    q_aux = row_statistics(query, metric) if metric != "dot" else torch.empty(0, device=query.device)
    g_aux = row_statistics(gallery, metric) if metric != "dot" else q_aux
    query, gallery = _aligned_rows(query.to(case.dtype)), _aligned_rows(gallery.to(case.dtype))
    out_d, out_i = _kernel_call(query, gallery, q_aux, g_aux, k, metric_code(metric), False, -1, case.split_size)
    num_gallery = gallery.shape[0]
    splits = -(-num_gallery // case.split_size)
    if tuple(out_d.shape) != (splits, query.shape[0], k) or tuple(out_i.shape) != tuple(out_d.shape):
        return f"raw outputs have shape {tuple(out_d.shape)}, expected {(splits, query.shape[0], k)}"
    out_d, out_i = out_d.cpu(), out_i.cpu()
    for s in range(splits):
        rows = min(case.split_size, num_gallery - s * case.split_size)
        filled = min(rows, k)
        if not bool(torch.isfinite(out_d[s, :, :filled]).all()):
            return f"split {s} left slots empty below its {rows} rows"
        lo, hi = s * case.split_size, s * case.split_size + rows
        if not bool(((out_i[s, :, :filled] >= lo) & (out_i[s, :, :filled] < hi)).all()):
            return f"split {s} returned indices outside its range [{lo}, {hi})"
        if filled < k and not (
            bool(torch.isinf(out_d[s, :, filled:]).all()) and bool((out_i[s, :, filled:] == -1).all())
        ):
            return f"split {s}: slots past its {rows} rows are not (+inf, -1)"
    return None


def run_self_check(device: torch.device, limit_k: int) -> list[str]:
    """Run the battery on ``device``; returns one line per failed case (empty: all passed).

    Covers the three dtypes and four metrics, k = 1, odd k, k at the kernel's configuration
    boundaries and at ``limit_k`` (the device's largest k), odd Q, G and D (unaligned rows),
    gallery splits, symmetric searches, self exclusion, a zero row and exact ties. Calls the
    kernel through ``_kernel_call`` and compares with ``knn_reference`` on the same data.
    """
    gen = torch.Generator().manual_seed(20150)
    failures = []
    for n, case in enumerate(_CASES):
        k = limit_k if case.k == 0 else (limit_k - 1 if case.k == -1 else case.k)
        if not 1 <= k <= limit_k:  # a device with less shared memory than the case needs
            continue
        query, gallery = _case_inputs(case, k, device, gen)
        try:
            want = knn_reference(query, gallery, k, case.metric, case.symmetric, case.self_offset)
            q, g = query.to(case.dtype), gallery.to(case.dtype)
            if case.unaligned:
                q, g = _unaligned_view(q), _unaligned_view(g)
            got = _knn_fp32(q, q if case.symmetric else g, k, case.metric, case.symmetric, case.self_offset,
                            case.split_size, align=not case.unaligned)
            why = _compare(case, query, gallery, got, want)
            if why is None and case.split_size < gallery.shape[0] and not case.symmetric and case.self_offset < 0:
                why = _check_splits(case, query, gallery, k)
        except Exception as exc:  # a crash of the kernel is a failed check too
            why = f"raised {type(exc).__name__}: {exc}"
        if why is not None:
            failures.append(
                f"case {n} ({str(case.dtype).replace('torch.', '')}, {case.metric}, Q={query.shape[0]}, "
                f"G={gallery.shape[0]}, D={case.dim}, k={k}, symmetric={case.symmetric}, "
                f"self_offset={case.self_offset}, split_size={case.split_size}): {why}"
            )
    return failures


def self_check(device: torch.device, limit_k: int | None = None) -> None:
    """Run :func:`run_self_check` once per device and process; on failure disable the backend.

    Raises:
        KernelSelfCheckError: this or an earlier check failed. The failure is recorded with
            :func:`torchfg.ops._cuda_extension.mark_self_check_failed`, so ``backend_status``
            reports the ``cuda`` backend unavailable and ``"auto"`` never picks it.
    """
    failed = _cuda_extension.self_check_failure()
    if failed is not None:
        raise _cuda_extension.KernelSelfCheckError(failed)
    key = (device.type, device.index if device.type != "cuda" else _device_index(device))
    if key in _self_checked:
        return
    with _self_check_lock:
        if key in _self_checked:
            return
        if limit_k is None:
            limit_k = max_k(_device_index(device))
        failures = run_self_check(device, limit_k)
        if failures:
            reason = (
                f"the knn CUDA kernel disagrees with the torch reference on {device} in {len(failures)} of "
                f"{len(_CASES)} self-check cases; the cuda backend is disabled for this process. "
                + " | ".join(failures[:3])
            )
            _cuda_extension.mark_self_check_failed(reason)
            raise _cuda_extension.KernelSelfCheckError(reason)
        _self_checked.add(key)
