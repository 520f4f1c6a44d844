"""Benchmark of the adaptive triplet loss (:func:`torchfg.functional.adaptive_triplet_loss`), forward + backward.

N image embeddings of width D in classes of 4 (parameter ``per_class``), text embeddings of width
T = D (parameter ``text_dim``, 0 meaning D), euclidean
distance, ``base_margin`` 0.1 and ``margin_scale`` 0.5: the margin of the pair (a, n) is
``0.1 + 0.5 * (1 - cos(t_a, t_n)) / 2`` and the negative is the margin-aware hardest one. FLOP
model: 2 N^2 D + 2 N^2 T, the two N x N products (image distances, text similarities) any exact
method computes. torchfg's backward is O(N D); the plain route backpropagates through cdist.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from torchfg._validation import check_int
from torchfg.bench.core import (
    CUDA_GRAPH_MEMORY, Case, OpBench, Problem, api_available, cuda_graph_available, in_cuda_graph, triton_available,
)
from torchfg.bench.triplet import PER_CLASS, class_labels, with_symmetric_mining

BASE_MARGIN = 0.1
MARGIN_SCALE = 0.5


def make_problem(
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    *,
    per_class: int = PER_CLASS,
    text_dim: int = 0,
) -> Problem:
    """The :class:`Problem` of size ``n``: N embeddings of width D, text of width T (0: T = D), classes of ``per_class``."""
    params = {"per_class": check_int(per_class, "per_class", 2), "text_dim": check_int(text_dim, "text_dim", 0)}
    extra = {"per_class": params["per_class"], "text_dim": params["text_dim"] or d}
    return Problem("atl", n, n, d, dtype, device, seed, extra, params)


def _inputs(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = problem.generator()
    x = problem.randn(problem.n, problem.d, requires_grad=True, gen=gen)
    labels = class_labels(problem.n, problem.extra["per_class"], gen).to(problem.device)
    text = problem.randn(problem.n, problem.extra["text_dim"], gen=gen)
    return x, labels, text


def _loss_and_grad(loss_fn: Callable[..., torch.Tensor], problem: Problem) -> Callable[[], Any]:
    x, labels, text = _inputs(problem)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(x, labels, text)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return run


def _torchfg(backend: str) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.functional import adaptive_triplet_loss

        return _loss_and_grad(
            lambda x, y, t: adaptive_triplet_loss(
                x, y, t, base_margin=BASE_MARGIN, margin_scale=MARGIN_SCALE, backend=backend
            ),
            problem,
        )

    return setup


def adaptive_triplet_cdist(
    x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, base_margin: float, margin_scale: float
) -> torch.Tensor:
    """The plain PyTorch route: full distance and text-similarity matrices, masks, margin-aware argmax.

    x (N, D), labels (N,), text (N, T) -> 0-dim fp32 loss, the mean over anchors with a positive
    and a negative of ``relu(d(a, p*) - d(a, n*) + m(a, n*))``, as
    :func:`torchfg.functional.adaptive_triplet_loss` defines it.
    """
    dist = torch.cdist(x, x).float()
    unit_text = F.normalize(text.float(), dim=1)
    margins = base_margin + margin_scale * (1.0 - unit_text @ unit_text.T) / 2.0
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    hardest_positive = dist.masked_fill(~same | eye, float("-inf")).amax(dim=1)
    negative = (margins - dist.detach()).masked_fill(same, float("-inf")).argmax(dim=1)
    rows = torch.arange(len(labels), device=x.device)
    valid = torch.isfinite(hardest_positive) & ~same.all(dim=1)
    losses = torch.relu(hardest_positive - dist[rows, negative] + margins[rows, negative])[valid]
    return losses.mean()


def _cdist(problem: Problem) -> Callable[[], Any]:
    return _loss_and_grad(lambda x, y, t: adaptive_triplet_cdist(x, y, t, BASE_MARGIN, MARGIN_SCALE), problem)


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
    ]


BENCH = OpBench(
    name="atl",
    title=f"adaptive triplet loss (text width T, base_margin {BASE_MARGIN}, margin_scale {MARGIN_SCALE}), "
    "forward + backward",
    flop_model="2*N*N*D + 2*N*N*T (distance and text-similarity matrices)",
    flops=lambda p: 2.0 * p.n * p.n * (p.d + p.extra["text_dim"]),
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (256, 1024, 2048), "cuda": (4096, 8192, 16384, 32768)},
    default_dim={"cpu": 128, "cuda": 512},
    # One GEMM over the concatenated [embeddings, text] rows: the same 2*N*N*(D+T) FLOPs.
    floor_shape=lambda p: (p.n, p.n, p.d + p.extra["text_dim"]),
    shape=lambda p: f"embeddings ({p.n}, {p.d}), text ({p.n}, {p.extra['text_dim']}), labels ({p.n},)",
    requires=api_available("torchfg.functional", "adaptive_triplet_loss"),
    params={"per_class": PER_CLASS, "text_dim": 0},
)
