"""Benchmark of the DINO loss (:func:`torchfg.functional.dino_loss`), forward + backward.

Batch B = N samples, 2 global + 8 local crops (DINO's default), out_dim K = D prototypes,
student temperature 0.1, teacher temperature 0.04. The loss is memory bound (it reads the
(crops * B, K) logits and writes their gradient), so there is no FLOP model; the floor is one
``log_softmax`` pass over the student logits plus one ``softmax`` over the teacher's, forward
only, which any implementation has to match.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from torchfg.bench.core import Case, OpBench, Problem, api_available, triton_available

N_CROPS = 10
N_GLOBAL = 2
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04


def make_problem(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """The :class:`Problem` of size ``n``: batch N, out_dim D, 10 crops."""
    return Problem("dino", n, n, d, dtype, device, seed, {"n_crops": N_CROPS, "n_global": N_GLOBAL})


def _inputs(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = problem.generator()
    crops, global_crops = problem.extra["n_crops"], problem.extra["n_global"]
    student = problem.randn(crops * problem.n, problem.d, requires_grad=True, gen=gen)
    teacher = problem.randn(global_crops * problem.n, problem.d, gen=gen)
    center = problem.randn(problem.d, gen=gen).mul_(0.1)
    return student, teacher, center


def _loss_and_grad(loss_fn: Callable[..., torch.Tensor], problem: Problem) -> Callable[[], Any]:
    student, teacher, center = _inputs(problem)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(student, teacher, center)
        (grad,) = torch.autograd.grad(loss, student)
        return loss.detach(), grad

    return run


def _torchfg(backend: str) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.functional import dino_loss

        return _loss_and_grad(
            lambda s, t, c: dino_loss(
                s, t, c, n_crops=N_CROPS, n_global_crops=N_GLOBAL, student_temp=STUDENT_TEMP,
                teacher_temp=TEACHER_TEMP, backend=backend,
            ),
            problem,
        )

    return setup


def dino_loss_plain(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch route of the original DINO code: chunk per crop, loop over crop pairs.

    student (10 B, K), teacher (2 B, K), center (K,) -> 0-dim loss (crop-major rows, as
    :func:`torchfg.functional.dino_loss` takes them).
    """
    student_crops = (student / STUDENT_TEMP).chunk(N_CROPS)
    teacher_probs = F.softmax((teacher - center) / TEACHER_TEMP, dim=-1).detach().chunk(N_GLOBAL)
    total, terms = 0.0, 0
    for i, target in enumerate(teacher_probs):
        for v, logits in enumerate(student_crops):
            if v == i:
                continue
            total = total + torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def _plain(problem: Problem) -> Callable[[], Any]:
    return _loss_and_grad(dino_loss_plain, problem)


def _softmax_floor(problem: Problem) -> tuple[str, Callable[[], Any]]:
    student, teacher, center = _inputs(problem)
    student, teacher = student.detach(), teacher.detach()

    def run() -> None:
        F.log_softmax(student, dim=-1)
        F.softmax(teacher - center, dim=-1)

    return "log_softmax(student) + softmax(teacher), forward", run


def cases() -> list[Case]:
    """torchfg backends first, then the baselines."""
    return [
        Case("torchfg[torch]", _torchfg("torch")),
        Case("torchfg[triton]", _torchfg("triton"), available=triton_available, gpu_kernel=True),
        Case("plain PyTorch (DINO repo)", _plain, kind="baseline"),
    ]


BENCH = OpBench(
    name="dino",
    title=f"DINO loss, {N_GLOBAL} global + {N_CROPS - N_GLOBAL} local crops, batch N, out_dim K = D, "
    "forward + backward",
    flop_model="none (memory bound)",
    flops=lambda p: None,
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (16, 64, 128), "cuda": (64, 128, 256, 512)},
    default_dim={"cpu": 4096, "cuda": 65536},
    shape=lambda p: f"student ({p.extra['n_crops']}*{p.n}, {p.d}), teacher ({p.extra['n_global']}*{p.n}, {p.d})",
    floor=_softmax_floor,
    requires=api_available("torchfg.functional", "dino_loss"),
)
