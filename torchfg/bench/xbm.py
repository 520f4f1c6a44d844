"""Benchmark of cross-batch memory (:class:`torchfg.losses.CrossBatchMemory`), one training step.

A batch of B embeddings (parameter ``batch``; 0, the default, means 4096 on CUDA and 256 on the
CPU) in classes of 4 is enqueued into a memory of M rows (the benchmark's size N; filled
beforehand with random rows of the same classes) and mined against all M rows, batch-hard,
euclidean, margin 0.2; forward + backward. FLOP model: 2 B M D, the one B x M distance product
any exact miner computes; the floor is ``x @ memory.T``. The baseline is pytorch-metric-learning's
``CrossBatchMemory(TripletMarginLoss, BatchHardMiner)``, which builds the B x M matrix.

(:func:`profile_step`, which counts what a step launches and allocates, lives in
:mod:`torchfg.bench.profile`; it is re-exported here for older imports.)
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torchfg._validation import check_int
from torchfg.bench.core import Case, OpBench, Problem, api_available, module_installed, triton_available
from torchfg.bench.profile import StepProfile, profile_step
from torchfg.bench.triplet import class_labels, pml_batch_hard, pml_batch_hard_miner

__all__ = ["StepProfile", "profile_step", "BENCH"]

MARGIN = 0.2
PER_CLASS = 4
BATCH = {"cuda": 4096, "cpu": 256}

# ----------------------------------------------------------------------------- benchmark cases


def make_problem(
    m: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    *,
    batch: int = 0,
    per_class: int = PER_CLASS,
) -> Problem:
    """A batch of B rows against a memory of M rows, B <= M.

    ``batch`` 0 means the device type's ``BATCH``, cut to M (the ``n`` column records the B used);
    a ``batch`` asked for explicitly must fit the memory.
    """
    params = {"batch": check_int(batch, "batch", 0), "per_class": check_int(per_class, "per_class", 2)}
    if params["batch"] > m:
        # A smaller batch than asked would be timed under the params column's batch.
        raise ValueError(f"batch must be <= N (the memory's rows), got batch={params['batch']} for N={m}: "
                         "raise the sizes or lower batch")
    b = params["batch"] or min(BATCH.get(torch.device(device).type, BATCH["cpu"]), m)
    extra = {"per_class": params["per_class"], "margin": MARGIN}
    return Problem("xbm", b, m, d, dtype, device, seed, extra, params)


def _inputs(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = problem.generator()
    x = problem.randn(problem.n, problem.d, requires_grad=True, gen=gen)
    classes = max(problem.m // problem.extra["per_class"], 1)
    labels = class_labels(problem.n, problem.extra["per_class"], gen) % classes
    memory = problem.randn(problem.m, problem.d, gen=gen)
    memory_labels = torch.randint(0, classes, (problem.m,), generator=gen)
    return x, labels.to(problem.device), memory, memory_labels.to(problem.device)


def _step(module: torch.nn.Module, problem: Problem) -> tuple[Callable[[], Any], torch.Tensor, torch.Tensor]:
    x, labels, memory, memory_labels = _inputs(problem)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        loss = module(x, labels)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return run, memory, memory_labels


def _torchfg(backend: str) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.losses import CrossBatchMemory, TripletMarginLoss

        xbm = CrossBatchMemory(TripletMarginLoss(margin=MARGIN, backend=backend), problem.d, problem.m)
        run, memory, memory_labels = _step(xbm, problem)
        xbm.embedding_memory = memory.clone()
        xbm.label_memory = memory_labels.clone()
        xbm.size = problem.m  # a full memory: every step mines against all M rows
        return run

    return setup


def _pml(problem: Problem) -> Callable[[], Any]:
    from pytorch_metric_learning import losses

    loss = pml_batch_hard(MARGIN)
    xbm = losses.CrossBatchMemory(loss, problem.d, memory_size=problem.m, miner=pml_batch_hard_miner())
    run, memory, memory_labels = _step(xbm, problem)
    xbm.embedding_memory = memory.clone()
    xbm.label_memory = memory_labels.clone()
    xbm.has_been_filled = True
    return run


def cases() -> list[Case]:
    """torchfg backends first, then the baseline."""
    return [
        Case("torchfg[torch]", _torchfg("torch")),
        Case("torchfg[triton]", _torchfg("triton"), available=triton_available, gpu_kernel=True),
        Case("pml.CrossBatchMemory", _pml, kind="baseline", available=module_installed("pytorch_metric_learning")),
    ]


BENCH = OpBench(
    name="xbm",
    title=f"cross-batch memory, batch-hard triplet loss (margin {MARGIN}), batch B against a memory of M = N rows, "
    "forward + backward",
    flop_model="2*B*M*D (batch x memory distance product)",
    flops=lambda p: 2.0 * p.n * p.m * p.d,
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (4096, 16384), "cuda": (65536, 262144, 1048576)},
    default_dim={"cpu": 128, "cuda": 512},
    shape=lambda p: f"batch ({p.n}, {p.d}), memory ({p.m}, {p.d}), labels ({p.n},)",
    requires=api_available("torchfg.losses", "CrossBatchMemory"),
    params={"batch": 0, "per_class": PER_CLASS},
    smallest_size=lambda params: params["batch"] or 2,
)
