"""Exact k-nearest-neighbour search: chunked PyTorch reference, streaming Triton and CUDA kernels."""

from __future__ import annotations

from typing import Callable, cast

import torch

from torchfg._validation import accumulation_dtype, check_choice, check_float_tensor, check_int, check_same_device_dtype
from torchfg.backends import BackendSpec, register_op, resolve_backend, triton_status
from torchfg.ops._library import custom_op
from torchfg.ops import _cuda_extension
from torchfg.ops.knn.cuda import KERNEL_MAX_K as CUDA_MAX_K
from torchfg.ops.knn import cpu as _cpu
from torchfg.ops.knn.reference import knn_reference
from torchfg.ops.metric import METRICS, unit_and_nonzero_rows
from torchfg.ops.precision import autocast_off

__all__ = ["knn", "METRICS", "TRITON_MAX_K", "AUTO_TRITON_MAX_K"]

# Largest k of the Triton kernel (its running top-k lives in registers); equals
# torchfg.ops.knn.triton.MAX_K, repeated here so that dispatch does not import triton.
TRITON_MAX_K = 128
# Largest k for which "auto" prefers Triton over the CUDA kernel on GPUs. Both kernels are
# untuned; revisit with measurements (benchmarks/bench_knn.py).
AUTO_TRITON_MAX_K = 64
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Elements of one (rows, k, D) block of gathered gallery rows in the PyTorch exact recomputation
# (fp32 CPU rows take the compiled one, torchfg.ops.knn.cpu.exact_selected). On a CPU the block
# should stay in the L2 cache (2 MiB of fp32), so that the gather, the difference
# and the reduction each run from cache: 16 MiB blocks made the recomputation 20x slower at
# N = 4096, k = 10 (73 ms against 3 ms on 2 cores), as slow as the search. On a GPU every block
# is a few launches, so blocks are large.
_RECOMPUTE_BLOCK_CPU = 1 << 19
_RECOMPUTE_BLOCK_GPU = 1 << 22


def _exact_selected(
    query: torch.Tensor,
    gallery: torch.Tensor,
    distances: torch.Tensor,
    indices: torch.Tensor,
    metric: str,
    *,
    pair_kernel: bool = False,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k selected distances recomputed from the rows themselves, re-sorted by (distance, index).

    Every backend selects with the expanded GEMM form |q|^2 + |g|^2 - 2 q.g, whose fp32 rounding
    error grows with the row norms (up to ~5e-3 for a row and its identical copy at norm 8).
    Recomputing only the k winners from the difference q - g costs O(Q k D), and makes the
    returned distances as exact as a brute force: a duplicated row is at exactly 0. Cosine uses
    |q^ - g^|^2 / 2 (= 1 - cos for unit rows; exact 0 for parallel rows), 1 where either row is 0.

    The selection itself is unchanged (the same k indices); only their order within the k may
    change where the recomputed distances reorder them. The sort is by (distance, index), so the
    lower-index tie rule holds on the returned distances. fp32 rows on a CPU are recomputed by the
    compiled kernel (one pass per pair, its own order of summation: the same neighbours as the
    PyTorch recomputation, with distances that differ by rounding). ``pair_kernel``: the Triton
    kernels' searches recompute with the selected-pair kernel of :mod:`torchfg.ops.pair_distances`
    (one launch; the chunked PyTorch loop below cost 4 ms in 40 blocks of small launches after a
    10.5 ms search at N = 32768, k = 10 on the H200). ``nonzero``: cosine only, ``query`` and
    ``gallery`` are already the unit rows and these their (Q,) and (G,) non-zero masks, as
    :func:`~torchfg.ops.metric.unit_and_nonzero_rows` returns them.
    """
    num_query, k = indices.shape
    if num_query == 0 or k == 0:
        return distances, indices
    acc = accumulation_dtype(query.dtype)
    query_nonzero = gallery_nonzero = None
    if nonzero is not None:
        query_nonzero, gallery_nonzero = nonzero
    elif metric == "cosine":
        # The masks from the norms: an (Q, D) comparison cost as much as the search for Q = 1M
        # queries against a 4-row gallery.
        query, query_nonzero = unit_and_nonzero_rows(query, acc)
        gallery, gallery_nonzero = unit_and_nonzero_rows(gallery, acc)
    if pair_kernel:
        from torchfg.ops.pair_distances.triton import anchor_pair_distances_triton

        # Cosine: the squared difference of the unit rows, halved (as the loop below).
        exact = anchor_pair_distances_triton(query, gallery, indices.contiguous(),
                                             "sqeuclidean" if metric == "cosine" else metric)
        if metric == "cosine":
            # Both masks are set above for cosine (given, or from the norms).
            query_mask, gallery_mask = cast(torch.Tensor, query_nonzero), cast(torch.Tensor, gallery_nonzero)
            exact = torch.where(query_mask.unsqueeze(1) & gallery_mask[indices], exact * 0.5, 1.0)
        return _sorted_by_distance_then_index(exact, indices, distances.dtype)
    if query.dtype == torch.float32 and _cpu.is_usable(query.device, query.dtype, gallery.shape[0]):
        # fp32 rows on a CPU (cosine: the unit rows of any input): the compiled recomputation,
        # one pass per pair over the rows where they lie.
        exact, indices = _cpu.exact_selected(query, gallery, indices, metric, query_nonzero, gallery_nonzero)
        return exact.to(distances.dtype), indices
    width = query.shape[1]
    budget = _RECOMPUTE_BLOCK_GPU if query.device.type == "cuda" else _RECOMPUTE_BLOCK_CPU
    rows_per_block = min(num_query, max(1, budget // max(1, k * width)))
    exact = torch.empty(num_query, k, dtype=acc, device=query.device)
    # Gathered rows land in one reused buffer when no dtype conversion is needed (a fresh block
    # per step costs page faults on a CPU); the difference is then taken in place.
    buffer = torch.empty(rows_per_block * k, width, dtype=acc, device=query.device) if gallery.dtype == acc else None
    for start in range(0, num_query, rows_per_block):
        stop = min(start + rows_per_block, num_query)
        idx = indices[start:stop]
        flat = idx.reshape(-1)
        if buffer is not None:
            g = torch.index_select(gallery, 0, flat, out=buffer[: flat.numel()])
        else:
            g = gallery.index_select(0, flat).to(acc)
        g = g.view(stop - start, k, width)
        q = query[start:stop].to(acc).unsqueeze(1)
        out = exact[start:stop]
        if metric == "dot":
            torch.sum(g.mul_(q), dim=-1, out=out).neg_()
            continue
        torch.sum(g.sub_(q).square_(), dim=-1, out=out)
        if metric == "euclidean":
            out.sqrt_()
        elif metric == "cosine":
            # Both masks are set above for cosine (given, or from the norms).
            both = cast(torch.Tensor, query_nonzero)[start:stop].unsqueeze(1) & cast(torch.Tensor, gallery_nonzero)[idx]
            out.copy_(torch.where(both, out * 0.5, torch.ones_like(out)))
    return _sorted_by_distance_then_index(exact, indices, distances.dtype)


def _sorted_by_distance_then_index(
    exact: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # Sort by index, then a stable sort by distance keeps index order on ties.
    by_index = indices.argsort(dim=1)
    exact, indices = exact.gather(1, by_index), indices.gather(1, by_index)
    order = exact.argsort(dim=1, stable=True)
    return exact.gather(1, order).to(dtype), indices.gather(1, order)


@custom_op("torchfg::knn")
def _knn_op(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool,
    self_offset: int,
    backend: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from torchfg.ops.knn.triton import knn_triton

        distances, indices = knn_triton(query, gallery, k, metric, symmetric, self_offset)
    elif backend == "cuda":
        from torchfg.ops.knn.cuda import knn_cuda

        distances, indices = knn_cuda(query, gallery, k, metric, symmetric, self_offset)
    else:
        return _torch_knn(query, gallery, k, metric, symmetric, self_offset, chunk_size or None)
    pair_kernel = backend != "torch" and triton_status(query.device)[0]
    return _exact_selected(query, gallery, distances, indices, metric, pair_kernel=pair_kernel)


def _torch_knn(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool,
    self_offset: int,
    chunk_size: int | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend: :func:`_torch_search`, then :func:`_exact_selected`.

    Cosine normalises the rows once for both (and once for a self-search's query and gallery):
    each normalisation is a full (Q, D) pass, and for 1M queries against a 4-row gallery the
    three of them took half of the whole search.
    """
    if metric != "cosine":
        distances, indices = _torch_search(query, gallery, k, metric, symmetric, self_offset, chunk_size, progress)
        return _exact_selected(query, gallery, distances, indices, metric)
    acc = accumulation_dtype(query.dtype)
    query_unit, query_nonzero = unit_and_nonzero_rows(query, acc)
    if gallery is query:
        gallery_unit, gallery_nonzero = query_unit, query_nonzero
    else:
        gallery_unit, gallery_nonzero = unit_and_nonzero_rows(gallery, acc)
    # Checked on the inputs' dtype: the unit rows of 16-bit inputs are fp32.
    compiled = _cpu.is_usable(query.device, query.dtype, gallery.shape[0])
    distances, indices = _torch_search(
        query_unit, gallery_unit, k, metric, symmetric, self_offset, chunk_size, progress, unit=True, compiled=compiled
    )
    distances, indices = _exact_selected(
        query_unit, gallery_unit, distances, indices, metric, nonzero=(query_nonzero, gallery_nonzero)
    )
    return distances.to(query.dtype), indices


def _torch_search(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool,
    self_offset: int,
    chunk_size: int | None,
    progress: Callable[[int], None] | None = None,
    *,
    unit: bool = False,
    compiled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend's search: the reference search, with the compiled selection of
    :mod:`torchfg.ops.knn.cpu` on CPU tensors where it built (the same neighbours, bit for bit,
    on the same tiles; see that module for the self-search's narrower default tiles;
    ``TORCHFG_CPU_KERNELS=0`` keeps the pure PyTorch selection). ``unit``: cosine rows already
    normalised (see :func:`~torchfg.ops.knn.reference.knn_reference`); ``compiled``: whether to
    take the compiled selection (default: :func:`torchfg.ops.knn.cpu.is_usable` for the inputs)."""
    if compiled is None:
        compiled = _cpu.is_usable(query.device, query.dtype, gallery.shape[0])
    if compiled:
        return _cpu.knn_cpu(query, gallery, k, metric, symmetric, self_offset, chunk_size, progress, unit)
    return knn_reference(query, gallery, k, metric, symmetric, self_offset, chunk_size, progress, unit=unit)


@_knn_op.register_fake
def _(query, gallery, k, metric, symmetric, self_offset, backend, chunk_size):
    return query.new_empty(query.shape[0], k), query.new_empty(query.shape[0], k, dtype=torch.int64)


def _check_magnitudes(tensors: tuple[tuple[torch.Tensor, str], ...]) -> None:
    """Finite rows whose squared norms (and so every distance) stay finite in the accumulation dtype.

    On a GPU the check never synchronises with the host: it is a device-side assertion
    (``torch._assert_async``) queued before the search, which fails the CUDA stream with the
    message below if the input is bad (and, like every device-side assert, leaves that CUDA
    context unusable). Under ``torch.compile`` it is that assertion on every device (a traced op,
    no graph break). Elsewhere it is one host read for all the tensors together, with a
    per-tensor diagnosis that runs only when the check fails.
    """
    if not tensors:
        return
    acc = accumulation_dtype(tensors[0][0].dtype)
    # |q|^2 + |g|^2 - 2 q.g <= 4 max(|q|^2, |g|^2): bounding the norms bounds every distance.
    # A NaN norm fails the comparison too, so one reduction covers non-finite values.
    limit = (torch.finfo(acc).max / 4) ** 0.5
    within = torch.stack([(torch.linalg.vector_norm(x, dim=1, dtype=acc) <= limit).all() for x, _ in tensors]).all()
    # Under torch.compile too (traced, no graph break): skipped there, a NaN gallery row became every
    # query's nearest neighbour at distance 0 in the Triton kernel (its clamp maps NaN to 0).
    if within.device.type == "cuda" or torch.compiler.is_compiling():
        names = " or ".join(name for _, name in tensors)
        torch._assert_async(
            within, f"torchfg.knn: {names} contains NaN/infinite values or rows with norms above {limit:.3g}"
        )
        return
    if bool(within):
        return
    for x, name in tensors:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        if not bool((torch.linalg.vector_norm(x, dim=1, dtype=acc) <= limit).all()):
            raise ValueError(f"{name} has rows with norms above {limit:.3g}: their distances would overflow {acc}")


def _cuda_device_max_k(device: torch.device) -> int:
    from torchfg.ops.knn.cuda import max_k

    return max_k(device.index if device.index is not None else torch.cuda.current_device())


register_op(
    "knn",
    BackendSpec("triton", dtypes=_KERNEL_DTYPES, max_k=TRITON_MAX_K, auto_max_k=AUTO_TRITON_MAX_K),
    BackendSpec(
        "cuda",
        dtypes=_KERNEL_DTYPES,
        max_k=CUDA_MAX_K,
        status=_cuda_extension.backend_status,
        needs_build=True,
        is_built=_cuda_extension.is_built,
        prepare=lambda device: _cuda_extension.load(),
        device_max_k=_cuda_device_max_k,
    ),
)


def _validate(
    query: torch.Tensor,
    gallery: torch.Tensor | None,
    k: int,
    metric: str,
    exclude_self: bool,
    chunk_size: int | None,
) -> int:
    """Check the arguments; returns ``k`` as a Python int (NumPy / index-like ints accepted)."""
    check_float_tensor(query, "query", ndim=2)
    if gallery is not None:
        check_float_tensor(gallery, "gallery", ndim=2)
        check_same_device_dtype(query, "query", gallery, "gallery")
        if gallery.shape[1] != query.shape[1]:
            raise ValueError(
                f"query and gallery must have the same feature size D, got {query.shape[1]} and {gallery.shape[1]}"
            )
    k = check_int(k, "k", 1)  # a SymInt k (torch.compile(dynamic=True)) stays symbolic
    check_choice(metric, "metric", METRICS)
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    num_query = query.shape[0]
    num_gallery = num_query if gallery is None else gallery.shape[0]
    if exclude_self and gallery is not None and num_query > num_gallery:
        raise ValueError(
            "exclude_self=True with a gallery means query row i is gallery row i, so it needs "
            f"len(query) <= len(gallery), got {num_query} > {num_gallery}"
        )
    eligible = num_gallery - (1 if exclude_self else 0)
    if num_query and k > eligible:
        own = " once each query's own row is excluded" if exclude_self else ""
        raise ValueError(f"k={k} exceeds the {eligible} gallery rows available to each query{own}")
    _check_magnitudes(((query, "query"),) + (() if gallery is None else ((gallery, "gallery"),)))
    return k


@autocast_off
def knn(
    query: torch.Tensor,
    gallery: torch.Tensor | None = None,
    k: int = 10,
    *,
    metric: str = "cosine",
    exclude_self: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of every query row among the gallery rows.

    Never materialises the (Q, G) distance matrix: memory is O((Q + G) D + Q k) plus one
    bounded working block.

    Args:
        query: (Q, D) floating-point tensor (fp16, bf16, fp32 or fp64).
        gallery: (G, D), same dtype and device; None searches ``query`` against itself (then
            d(i, i) is exactly 0 for the Euclidean metrics and for non-zero rows under cosine,
            and the torch backend computes each pair once).
        k: neighbours per query, 1 <= k <= G (G - 1 with ``exclude_self``).
        metric: ``"cosine"`` (1 - cosine similarity; a zero row has similarity 0 to everything),
            ``"euclidean"``, ``"sqeuclidean"`` or ``"dot"`` (negative inner product), the
            definitions of :func:`torchfg.pairwise_distance`.
        exclude_self: never return query i's own row: gallery row i. With an explicit gallery
            this means the queries are the first Q gallery rows (needs Q <= G).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :mod:`torchfg.backends`).
            Auto on a GPU takes Triton for k <= 64 and the CUDA kernel beyond once it is built
            (``backend="cuda"`` JIT-builds it, minutes the first time; auto never does), else
            Triton up to k = 128, else the chunked PyTorch search. ``TORCHFG_KNN_FILTER=1``
            makes the Triton backend search by bound and filter (same results; opt-in until
            timed on a GPU, see docs/concepts/backends.md).
        chunk_size: torch backend only: queries per chunk (default: a (chunk, G) fp32 block
            of 16 MiB, at least 256 rows, on CPU, with a long gallery cut into column tiles:
            past 32768 rows with the compiled selection, 131072 with the PyTorch one; 512 MiB
            on GPU). A self-search of at least
            two tiles uses it as the tile side instead (default on CPU: 512 below 8192 rows, else
            1024, with the compiled selection of fp32/fp16/bf16 inputs; 1024 below 8192, else
            2048, with the PyTorch selection (fp64, ``TORCHFG_CPU_KERNELS=0``); on GPU 8192).

    Returns:
        ``(distances, indices)``, each (Q, k): distances in the input dtype (computed in fp32,
        fp64 for fp64), indices int64, sorted by increasing distance with ties broken by the
        lower gallery index (ties of the fp32 distances: rounding fp16/bf16 outputs can make
        distinct distances equal). Every backend selects the k neighbours with the fast GEMM
        form, then the returned distances are recomputed exactly from the selected rows (from
        ``q - g``; cosine from the unit rows' difference), as faiss does: a row's identical copy
        is at exactly 0 whatever the row norm. The k are then re-sorted by (recomputed distance,
        index); the selection is unchanged. Not differentiable (compute :func:`torchfg.pairwise_distance` on
        the returned pairs for gradients).

    Raises:
        ValueError: k out of range, NaN/inf inputs, mismatched shapes, unknown metric.
        TypeError: non-float tensors, mismatched dtypes, non-int k.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [3.0], [4.0]])
        >>> d, i = knn(x, k=2, metric="euclidean", exclude_self=True)
        >>> i.tolist()
        [[1, 2], [0, 2], [3, 1], [2, 1]]
        >>> d[:, 0].tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    k = _validate(query, gallery, k, metric, exclude_self, chunk_size)
    symmetric = gallery is None
    chosen = resolve_backend("knn", query.device, query.dtype, backend, k=k)
    query = query.detach()
    gallery = query if gallery is None else gallery.detach()
    self_offset = 0 if exclude_self else -1
    return _knn_op(query, gallery, k, metric, symmetric, self_offset, chosen, chunk_size or 0)


@autocast_off
def knn_search(
    query: torch.Tensor,
    gallery: torch.Tensor | None,
    k: int,
    *,
    metric: str,
    exclude_self: bool,
    backend: str = "auto",
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    query_block: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn` that reports progress: ``progress(n)`` after every ``n`` finished queries.

    For evaluation loops (torchfg.metrics). The torch backend reports from inside its chunk
    loop; the kernel backends run ``query_block`` queries per call. A self-search without
    ``exclude_self`` is not split (kernels set d(i, i) only on the full square), so it reports
    once at the end.
    """
    k = _validate(query, gallery, k, metric, exclude_self, chunk_size)
    chosen = resolve_backend("knn", query.device, query.dtype, backend, k=k)
    query = query.detach()
    symmetric = gallery is None
    gallery = query if gallery is None else gallery.detach()
    self_offset = 0 if exclude_self else -1
    num_query = query.shape[0]
    if chosen == "torch":
        return _torch_knn(query, gallery, k, metric, symmetric, self_offset, chunk_size, progress)
    if (symmetric and not exclude_self) or num_query <= query_block:
        out = _knn_op(query, gallery, k, metric, symmetric, self_offset, chosen, 0)
        if progress is not None:
            progress(num_query)
        return out
    distances, indices = [], []
    for start in range(0, num_query, query_block):
        stop = min(start + query_block, num_query)
        offset = start if exclude_self else -1
        d, i = _knn_op(query[start:stop], gallery, k, metric, False, offset, chosen, 0)
        distances.append(d)
        indices.append(i)
        if progress is not None:
            progress(stop - start)
    return torch.cat(distances), torch.cat(indices)
