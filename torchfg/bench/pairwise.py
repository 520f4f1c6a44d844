"""Benchmark of :func:`torchfg.pairwise_distance` (euclidean, x against itself, forward + backward).

FLOP model: the forward is one (N x D) @ (D x N) product, 2 N^2 D FLOPs; the backward needs two
more of the same size (dL/dx from both sides), so forward + backward counts 3 x 2 N^2 D = 6 N^2 D.
The upstream gradient is a fixed random (N, N) tensor made during setup (outside the timing).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torchfg.bench.core import Case, OpBench, Problem, module_installed, triton_available

METRIC = "euclidean"


def make_problem(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """The :class:`Problem` of size ``n``: x (N, D) against itself."""
    return Problem("pairwise", n, n, d, dtype, device, seed, {"metric": METRIC})


def _inputs(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    gen = problem.generator()
    x = problem.randn(problem.n, problem.d, requires_grad=True, gen=gen)
    upstream = problem.randn(problem.n, problem.n, gen=gen)
    return x, upstream


def _forward_backward(distance: Callable[[torch.Tensor], torch.Tensor], problem: Problem) -> Callable[[], Any]:
    x, upstream = _inputs(problem)

    def run() -> torch.Tensor:
        # Returns dL/dx so that tests can check every case computes the same thing.
        (grad,) = torch.autograd.grad(distance(x), x, upstream)
        return grad

    return run


def _torchfg(backend: str) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.ops.pairwise import pairwise_distance

        return _forward_backward(lambda x: pairwise_distance(x, metric=METRIC, backend=backend), problem)

    return setup


def _cdist(problem: Problem) -> Callable[[], Any]:
    return _forward_backward(lambda x: torch.cdist(x, x), problem)


def _pml(problem: Problem) -> Callable[[], Any]:
    from pytorch_metric_learning.distances import LpDistance

    distance = LpDistance(normalize_embeddings=False, p=2, power=1)
    return _forward_backward(distance, problem)


def cases() -> list[Case]:
    """torchfg backends first, then the baselines."""
    return [
        Case("torchfg[torch]", _torchfg("torch")),
        Case("torchfg[triton]", _torchfg("triton"), available=triton_available, gpu_kernel=True),
        Case("torch.cdist", _cdist, kind="baseline"),
        Case("pml.LpDistance", _pml, kind="baseline", available=module_installed("pytorch_metric_learning")),
    ]


BENCH = OpBench(
    name="pairwise",
    title=f"pairwise_distance(x, metric={METRIC!r}) of x (N, D) with itself, forward + backward",
    flop_model="6*N*N*D (2*N*N*D forward GEMM + 2 backward GEMMs)",
    flops=lambda p: 6.0 * p.n * p.n * p.d,
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (256, 1024, 2048), "cuda": (4096, 8192, 16384, 32768)},
    default_dim={"cpu": 128, "cuda": 512},
    shape=lambda p: f"x ({p.n}, {p.d})",
)
