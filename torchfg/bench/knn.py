"""Benchmark of exact k-nearest-neighbour search (:func:`torchfg.knn`), forward only.

Queries = gallery = N rows of width D (the gallery is the query set, as in retrieval
evaluation), k = 10 including the item itself, euclidean distance (parameters ``k`` and
``metric``). FLOP model: 2 N^2 D, the distance matrix any exact search computes. Cases:
torchfg's self-search (``gallery=None``, each pair computed once), on a CPU the same with the
pure PyTorch selection instead of the compiled one (``TORCHFG_CPU_KERNELS=0``), the same search
given the gallery explicitly (the general chunked path), the kernels (Triton's filter search,
opt-in until timed, as its own cases: ``TORCHFG_KNN_FILTER=1``, the self-search computing each
pair once and, with the gallery given, every tile in chunks of queries), the plain PyTorch route (the whole
N x N ``torch.cdist`` matrix, then ``topk``; euclidean only) and faiss-cpu's flat index
(``IndexFlatL2``, or ``IndexFlatIP`` for ``dot`` / ``cosine``; CPU tensors only, fp32 runs only). Building
the faiss index is part of its timed step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torchfg._validation import check_choice, check_int
from torchfg.bench.core import Case, OpBench, Problem, api_available, module_installed, triton_available, with_environment
from torchfg.ops.metric import METRICS

K = 10
METRIC = "euclidean"


def make_problem(
    n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0, *, k: int = K, metric: str = METRIC
) -> Problem:
    """The :class:`Problem` of size ``n``: queries = gallery = N rows of width D, k <= N neighbours."""
    k = check_int(k, "k", 1)
    metric = check_choice(metric, "metric", METRICS)
    if k > n:
        # Searching fewer than k rows would time a smaller k than the params column records.
        raise ValueError(f"k must be <= N (the gallery's rows), got k={k} for N={n}: raise the sizes or lower k")
    return Problem("knn", n, n, d, dtype, device, seed, {"k": k, "metric": metric}, {"k": k, "metric": metric})


def _query(problem: Problem) -> torch.Tensor:
    return problem.randn(problem.n, problem.d)


def _torchfg(backend: str, explicit_gallery: bool = False) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.ops.knn import knn

        x, k, metric = _query(problem), problem.extra["k"], problem.extra["metric"]
        gallery = x if explicit_gallery else None
        return lambda: knn(x, gallery, k, metric=metric, backend=backend)

    return setup


def _torchfg_pure_selection(problem: Problem) -> Callable[[], Any]:
    """The ``torch`` backend's self-search with the compiled CPU selection switched off."""
    from torchfg.ops.knn import cpu, knn

    x, k, metric = _query(problem), problem.extra["k"], problem.extra["metric"]

    def run() -> Any:
        previous, cpu.enabled = cpu.enabled, False
        try:
            return knn(x, None, k, metric=metric, backend="torch")
        finally:
            cpu.enabled = previous

    return run


def _compiled_cpu_selection_ok(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    from torchfg.ops.knn import cpu

    if device.type != "cpu":
        return False, "the compiled selection is the CPU path"
    ok, why = cpu.status()
    if not ok or not cpu.is_usable(device, dtype):
        return False, f"torchfg[torch] already runs the pure PyTorch selection here ({why})"
    return True, ""


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


def faiss_flat_search(x: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss-cpu's exact flat index over ``x`` (N, D), searched with ``x``: the faiss baseline.

    Builds ``IndexFlatL2`` (euclidean, sqeuclidean) or ``IndexFlatIP`` (dot; cosine on
    L2-normalised rows), adds the rows, searches them; returns ``(distances, indices)`` (N, k)
    under torchfg's metric definitions (faiss returns squared L2 or inner products).
    """
    import faiss

    data = x.detach().float()
    if metric == "cosine":
        data = torch.nn.functional.normalize(data, dim=1)
    rows = data.contiguous().numpy()
    index = (faiss.IndexFlatL2 if metric in ("sqeuclidean", "euclidean") else faiss.IndexFlatIP)(x.shape[1])
    index.add(rows)
    found_scores, indices = index.search(rows, k)
    scores = torch.from_numpy(found_scores)
    if metric == "euclidean":
        scores = scores.clamp_min_(0).sqrt_()
    elif metric == "cosine":
        scores = 1.0 - scores
    elif metric == "dot":
        scores = -scores
    return scores, torch.from_numpy(indices)


def _faiss(problem: Problem) -> Callable[[], Any]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    x, k, metric = _query(problem), problem.extra["k"], problem.extra["metric"]
    return lambda: faiss_flat_search(x, k, metric)


def _faiss_ok(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    ok, why = module_installed("faiss")(device, dtype)
    if not ok:
        return ok, why + " (pip install faiss-cpu)"
    if device.type != "cpu":
        return False, "faiss-cpu searches CPU arrays only"
    if dtype != torch.float32:
        # faiss_flat_search hands faiss float32 copies: its row would be labelled with a dtype it never ran in.
        return False, f"faiss-cpu searches float32 only, not {str(dtype).removeprefix('torch.')}"
    return True, ""


def _cuda_extension_ok(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    from torchfg.backends import backend_status

    return backend_status("knn", "cuda", device)


def _euclidean_only(problem: Problem) -> tuple[bool, str]:
    if problem.extra["metric"] != "euclidean":
        return False, f"torch.cdist computes euclidean distances, not {problem.extra['metric']}"
    return True, ""


def cases() -> list[Case]:
    """torchfg backends first, then the baselines."""
    return [
        Case("torchfg[torch]", _torchfg("torch")),
        Case("torchfg[torch] TORCHFG_CPU_KERNELS=0", _torchfg_pure_selection, available=_compiled_cpu_selection_ok),
        Case("torchfg[torch] gallery=x", _torchfg("torch", explicit_gallery=True)),
        Case("torchfg[triton]", _torchfg("triton"), available=triton_available, gpu_kernel=True),
        Case("torchfg[triton] filter", with_environment(_torchfg("triton"), "TORCHFG_KNN_FILTER", "1"),
             available=triton_available, gpu_kernel=True),
        Case("torchfg[triton] filter gallery=x",
             with_environment(_torchfg("triton", explicit_gallery=True), "TORCHFG_KNN_FILTER", "1"),
             available=triton_available, gpu_kernel=True),
        Case("torchfg[cuda]", _torchfg("cuda"), available=_cuda_extension_ok, gpu_kernel=True),
        Case("torch.cdist+topk", _cdist_topk, kind="baseline", supports=_euclidean_only),
        Case("faiss.IndexFlat", _faiss, kind="baseline", available=_faiss_ok, countable=False, own_thread_pool=True),
    ]


BENCH = OpBench(
    name="knn",
    title="exact k-NN, queries = gallery = N, forward",
    flop_model="2*N*N*D (the distance matrix)",
    flops=lambda p: 2.0 * p.n * p.n * p.d,
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (1024, 2048, 4096), "cuda": (8192, 32768, 131072)},
    default_dim={"cpu": 128, "cuda": 512},
    shape=lambda p: f"query = gallery ({p.n}, {p.d}), k = {p.extra['k']}, {p.extra['metric']}",
    requires=api_available("torchfg.ops.knn", "knn"),
    params={"k": K, "metric": METRIC},
    smallest_size=lambda params: params["k"],
)
