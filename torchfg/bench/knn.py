"""Benchmark of exact k-nearest-neighbour search (:func:`torchfg.knn`), forward only.

Queries = gallery = N rows of width D (the gallery is the query set, as in retrieval
evaluation), euclidean distance, k = 10 including the item itself. FLOP model: 2 N^2 D, the
distance matrix any exact search computes. The plain PyTorch route materialises the whole
N x N matrix and calls ``topk``; faiss-cpu's ``IndexFlatL2`` runs on CPU tensors only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torchfg.bench.core import Case, OpBench, Problem, api_available, module_installed, triton_available

K = 10
METRIC = "euclidean"


def make_problem(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """The :class:`Problem` of size ``n``: queries = gallery = N rows of width D, k = min(10, N)."""
    return Problem("knn", n, n, d, dtype, device, seed, {"k": min(K, n)})


def _query(problem: Problem) -> torch.Tensor:
    return problem.randn(problem.n, problem.d)


def _torchfg(backend: str) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.ops.knn import knn

        x, k = _query(problem), problem.extra["k"]
        return lambda: knn(x, None, k, metric=METRIC, backend=backend)

    return setup


def knn_cdist_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch route: the whole N x N ``torch.cdist`` matrix, then ``topk``.

    x (N, D) -> (distances (N, k), indices (N, k)), nearest first, each row's own index included.

    Example:
        >>> knn_cdist_topk(torch.tensor([[0.0], [1.0], [3.0]]), 2)[1].tolist()
        [[0, 1], [1, 0], [2, 1]]
    """
    distances, indices = torch.cdist(x, x).topk(k, dim=1, largest=False, sorted=True)
    return distances, indices


def _cdist_topk(problem: Problem) -> Callable[[], Any]:
    x, k = _query(problem), problem.extra["k"]
    return lambda: knn_cdist_topk(x, k)


def _faiss(problem: Problem) -> Callable[[], Any]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    x, k = _query(problem).float().contiguous().numpy(), problem.extra["k"]
    index = faiss.IndexFlatL2(problem.d)
    index.add(x)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        squared, indices = index.search(x, k)
        # IndexFlatL2 returns squared distances.
        return torch.from_numpy(squared).clamp_min_(0).sqrt_(), torch.from_numpy(indices)

    return run


def _faiss_ok(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    ok, why = module_installed("faiss")(device, dtype)
    if not ok:
        return ok, why + " (pip install faiss-cpu)"
    if device.type != "cpu":
        return False, "faiss-cpu searches CPU arrays only"
    return True, ""


def _cuda_extension_ok(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    from torchfg.backends import backend_status

    return backend_status("knn", "cuda", device)


def cases() -> list[Case]:
    """torchfg backends first, then the baselines."""
    return [
        Case("torchfg[torch]", _torchfg("torch")),
        Case("torchfg[triton]", _torchfg("triton"), available=triton_available, gpu_kernel=True),
        Case("torchfg[cuda]", _torchfg("cuda"), available=_cuda_extension_ok, gpu_kernel=True),
        Case("torch.cdist+topk", _cdist_topk, kind="baseline"),
        Case("faiss.IndexFlatL2", _faiss, kind="baseline", available=_faiss_ok),
    ]


BENCH = OpBench(
    name="knn",
    title=f"exact k-NN, queries = gallery = N, {METRIC}, k = {K}, forward",
    flop_model="2*N*N*D (the distance matrix)",
    flops=lambda p: 2.0 * p.n * p.n * p.d,
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (1024, 2048, 4096), "cuda": (8192, 32768, 131072)},
    default_dim={"cpu": 128, "cuda": 512},
    shape=lambda p: f"query = gallery ({p.n}, {p.d}), k = {p.extra['k']}",
    requires=api_available("torchfg.ops.knn", "knn"),
)
