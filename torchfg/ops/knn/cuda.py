"""Binding to the k-NN CUDA kernel in ``csrc/knn`` (op ``torch.ops.torchfg_cuda.knn``).

The kernel computes distance tiles on tensor cores (fp16/bf16; plain fp32 FMAs for fp32) and
keeps each query's top-k in shared memory, merged across gallery tiles; see
``csrc/knn/knn_kernel.cu``. It is built on first use by :mod:`torchfg.ops._cuda_extension`.
"""

from __future__ import annotations

import functools

import torch

from torchfg.ops import _cuda_extension
from torchfg.ops.metric import metric_code, row_statistics
from torchfg.ops.knn.reference import select_candidates

__all__ = ["KERNEL_MAX_K", "max_k", "knn_cuda"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Compile-time bound of the kernel (TORCHFG_KNN_MAX_K); a device may allow less (shared memory).
KERNEL_MAX_K = 1024
# Gallery rows per kernel tile: split sizes are multiples of it.
_TILE_ROWS = 64


@functools.lru_cache(maxsize=None)
def max_k(device_index: int) -> int:
    """Largest k whose shared-memory footprint fits one block on this device."""
    ops = _cuda_extension.ops()
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    lo, hi = 0, KERNEL_MAX_K
    while lo < hi:  # the footprint grows with k
        mid = (lo + hi + 1) // 2
        need = ops.knn_smem_bytes(mid)
        if 0 <= need <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _split_size(num_query: int, num_gallery: int, device: torch.device) -> int:
    """Gallery rows per split: enough blocks to fill the device, a few tiles per block at least."""
    blocks_q = -(-num_query // 32)
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(-(-target // blocks_q), num_gallery // (8 * _TILE_ROWS), 65535))
    size = -(-num_gallery // splits)
    return -(-size // _TILE_ROWS) * _TILE_ROWS


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
    dtype fp16/bf16/fp32 and 1 <= k <= :func:`max_k` for the device.
    """
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"knn_cuda supports float16, bfloat16 and float32 inputs, got {query.dtype}")
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    limit = max_k(query.device.index if query.device.index is not None else torch.cuda.current_device())
    if not 1 <= k <= limit:
        raise ValueError(f"knn_cuda supports 1 <= k <= {limit} on this device, got k={k}")
    query = query.contiguous()
    gallery = query if symmetric else gallery.contiguous()
    if metric == "dot":
        q_aux = g_aux = torch.empty(0, dtype=torch.float32, device=query.device)
    else:
        q_aux = row_statistics(query, metric)
        g_aux = q_aux if symmetric else row_statistics(gallery, metric)
    size = split_size or _split_size(num_query, num_gallery, query.device)
    out_d, out_i = _cuda_extension.ops().knn(
        query, gallery, q_aux, g_aux, k, metric_code(metric), symmetric, self_offset, size
    )
    splits = out_d.shape[0]
    if splits == 1:
        distances, indices = out_d[0], out_i[0]
    else:
        # Each split's list is exact for its gallery range and the ranges are disjoint: an exact
        # (distance, index) selection over their union is the global answer. Unfilled slots
        # hold +inf and are never chosen while k <= the number of eligible gallery rows.
        distances, indices = select_candidates(
            out_d.permute(1, 0, 2).reshape(num_query, splits * k),
            out_i.permute(1, 0, 2).reshape(num_query, splits * k),
            k,
        )
    return distances.to(query.dtype), indices
