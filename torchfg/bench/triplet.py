"""Benchmark of batch-hard triplet loss (:func:`torchfg.functional.triplet_margin_loss`), forward + backward.

The batch has N embeddings of width D in classes of 4 (P x K sampling with K = 4; parameter
``per_class``), euclidean distance, margin 0.2 (parameter ``margin``). FLOP model: 2 N^2 D, the one N x N distance matrix any exact miner has to
compute; it is the same for every case, so TFLOP/s compares their times directly. torchfg's
backward touches only the selected pairs (O(N D)); the baselines backpropagate through the
whole distance matrix.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from torchfg._validation import check_int, check_number
from torchfg.bench.core import (
    CUDA_GRAPH_MEMORY, Case, OpBench, Problem, api_available, cuda_graph_available, environment_variable, in_cuda_graph,
    module_installed, triton_available, with_environment,
)

MARGIN = 0.2
PER_CLASS = 4


def class_labels(n: int, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) int64 labels in classes of ``per_class`` (the last class has at least 2 items), shuffled.

    Example:
        >>> class_labels(6, 4, torch.Generator().manual_seed(0)).bincount().tolist()
        [4, 2]
    """
    labels = torch.arange(n) // per_class
    if n % per_class == 1 and n > 1:
        labels[-1] = labels[-2]
    return labels[torch.randperm(n, generator=gen)]


def make_problem(
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    *,
    per_class: int = PER_CLASS,
    margin: float = MARGIN,
) -> Problem:
    """The :class:`Problem` of size ``n``: N embeddings of width D in classes of ``per_class``."""
    params = {"per_class": check_int(per_class, "per_class", 2), "margin": check_number(margin, "margin", low=0)}
    return Problem("triplet", n, n, d, dtype, device, seed, dict(params), params)


def _inputs(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    gen = problem.generator()
    x = problem.randn(problem.n, problem.d, requires_grad=True, gen=gen)
    labels = class_labels(problem.n, problem.extra["per_class"], gen).to(problem.device)
    return x, labels


def _loss_and_grad(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], problem: Problem) -> Callable[[], Any]:
    x, labels = _inputs(problem)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        # Returns (loss, dL/dx) so that tests can check the cases compute the same thing.
        loss = loss_fn(x, labels)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return run


def _torchfg(backend: str) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.functional import triplet_margin_loss

        margin = problem.extra["margin"]
        return _loss_and_grad(
            lambda x, y: triplet_margin_loss(x, y, margin=margin, mining="batch_hard", backend=backend), problem
        )

    return setup


def symmetric_mining(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """``TORCHFG_SYMMETRIC_MINING`` set to "1" (or "0") inside the block, restored after it."""
    return environment_variable("TORCHFG_SYMMETRIC_MINING", "1" if on else "0")


def with_symmetric_mining(setup: Callable[[Problem], Callable[[], Any]]) -> Callable[[Problem], Callable[[], Any]]:
    """A case's setup whose steps run with ``TORCHFG_SYMMETRIC_MINING=1`` (the symmetric mining
    kernel, opt-in until a GPU run has timed it against the default)."""
    return with_environment(setup, "TORCHFG_SYMMETRIC_MINING", "1")


def batch_hard_cdist(x: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """The plain PyTorch route: full ``torch.cdist`` matrix, masks, max/min per row, hinge, mean.

    x (N, D), labels (N,) -> 0-dim fp32 loss (mean over anchors with a positive and a negative).

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
        >>> batch_hard_cdist(x, torch.tensor([0, 0, 1, 1]), margin=0.2)
        tensor(0.)
    """
    dist = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    hardest_positive = dist.masked_fill(~same | eye, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(same, float("inf")).amin(dim=1)
    valid = torch.isfinite(hardest_positive) & torch.isfinite(hardest_negative)
    losses = torch.relu(hardest_positive - hardest_negative + margin)[valid]
    return losses.float().mean()


def _cdist(problem: Problem) -> Callable[[], Any]:
    margin = problem.extra["margin"]
    return _loss_and_grad(lambda x, y: batch_hard_cdist(x, y, margin), problem)


def pml_batch_hard(margin: float) -> Callable[..., torch.Tensor]:
    """pytorch-metric-learning's batch-hard triplet loss: the PML baseline of ``triplet`` and ``xbm``.

    ``BatchHardMiner`` + ``TripletMarginLoss`` with un-normalised euclidean distances
    (``LpDistance(normalize_embeddings=False)``) and a mean over the mined triplets, which is
    torchfg's definition. Returns the loss module; call it as ``loss(x, labels, miner(x, labels))``
    through :func:`pml_batch_hard_loss`.
    """
    from pytorch_metric_learning import losses, reducers
    from pytorch_metric_learning.distances import LpDistance

    distance = LpDistance(normalize_embeddings=False)
    return losses.TripletMarginLoss(margin=margin, distance=distance, reducer=reducers.MeanReducer())


def pml_batch_hard_miner() -> Callable[..., Any]:
    """PML's ``BatchHardMiner`` on un-normalised euclidean distances (see :func:`pml_batch_hard`)."""
    from pytorch_metric_learning import miners
    from pytorch_metric_learning.distances import LpDistance

    return miners.BatchHardMiner(distance=LpDistance(normalize_embeddings=False))


def _pml(problem: Problem) -> Callable[[], Any]:
    loss_fn, miner = pml_batch_hard(problem.extra["margin"]), pml_batch_hard_miner()
    return _loss_and_grad(lambda x, y: loss_fn(x, y, miner(x, y)), problem)


def cases() -> list[Case]:
    """torchfg backends first, then the baselines."""
    return [
        Case("torchfg[torch]", _torchfg("torch")),
        Case("torchfg[triton]", _torchfg("triton"), available=triton_available, gpu_kernel=True),
        Case("torchfg[triton] symmetric", with_symmetric_mining(_torchfg("triton")), available=triton_available,
             gpu_kernel=True),
        # The same step captured in a CUDA graph: its kernels' time without the host's launch work.
        # Its memory was taken at capture (the graph's pool), before the measurement's window: not
        # measured. A replay launches nothing the profiler's dispatch mode sees: not countable.
        Case("torchfg[triton] cudagraph", in_cuda_graph(_torchfg("triton")), available=cuda_graph_available,
             gpu_kernel=True, countable=False, memory_unmeasured=CUDA_GRAPH_MEMORY),
        Case("torch.cdist+masks", _cdist, kind="baseline"),
        Case("pml.BatchHard", _pml, kind="baseline", available=module_installed("pytorch_metric_learning")),
    ]


BENCH = OpBench(
    name="triplet",
    title="batch-hard triplet loss (euclidean), forward + backward",
    flop_model="2*N*N*D (one distance matrix; backward of the selected pairs is O(N*D))",
    flops=lambda p: 2.0 * p.n * p.n * p.d,
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (256, 1024, 2048), "cuda": (4096, 8192, 16384, 32768)},
    default_dim={"cpu": 128, "cuda": 512},
    shape=lambda p: f"embeddings ({p.n}, {p.d}), labels ({p.n},)",
    requires=api_available("torchfg.functional", "triplet_margin_loss"),
    params={"per_class": PER_CLASS, "margin": MARGIN},
)
