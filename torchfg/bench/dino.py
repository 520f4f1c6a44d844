"""Benchmark of the DINO loss (:class:`torchfg.losses.DINOLoss`), one training step's forward + backward.

Batch B = N samples, 2 global + 8 local crops (DINO's default; parameters ``n_global`` and
``n_crops``), out_dim K = D prototypes, student temperature 0.1, teacher temperature 0.04. Each
case is the loss module in training mode, so the step includes the centre's EMA update, as in
DINO training. The baseline, ``dino_official``, is the ``DINOLoss`` of the official
implementation (facebookresearch/dino, ``main_dino.py``): :class:`OfficialDINOLoss` restates its
published definition. In fp16 / bf16 it runs under ``torch.autocast``, as the official training
loop calls it (autocast computes its softmax and log-softmax in fp32).

The loss is memory bound (it reads the (crops * B, K) logits and writes their gradient), so there
is no FLOP model; the floor is one ``log_softmax`` pass over the student logits plus one
``softmax`` over the teacher's, forward only, which any implementation has to match.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from torchfg._validation import check_int
from torchfg.bench.core import Case, OpBench, Problem, api_available, triton_available

__all__ = ["OfficialDINOLoss", "BENCH"]

N_CROPS = 10
N_GLOBAL = 2
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04
CENTER_MOMENTUM = 0.9


class OfficialDINOLoss(nn.Module):
    """The DINO loss as the official implementation defines it (facebookresearch/dino, ``DINOLoss``).

    The student logits are divided by ``student_temp`` and chunked into ``ncrops`` crops; the
    teacher's are centred, divided by the epoch's teacher temperature, soft-maxed, detached and
    chunked into the 2 global crops. The loss is the mean, over every (teacher crop iq, student
    crop v) pair with v != iq, of the batch mean of ``sum(-q * log_softmax(student_v))``. After
    the loss, the centre becomes ``center * m + mean(teacher_output) * (1 - m)``, the mean taken
    over all ranks (``all_reduce``) when ``torch.distributed`` is initialised. The teacher
    temperature ramps linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs``, then stays. Written here from that public definition: it is
    the baseline ``torchfg bench --ops dino`` measures against, not part of torchfg's API.

    Shapes:
        student_output (ncrops * B, out_dim), teacher_output (2 * B, out_dim), crop-major -> 0-dim loss.

    Example:
        >>> loss = OfficialDINOLoss(out_dim=16, ncrops=4)
        >>> loss(torch.randn(4 * 3, 16), torch.randn(2 * 3, 16), epoch=0).shape
        torch.Size([])
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float = TEACHER_TEMP,
        teacher_temp: float = TEACHER_TEMP,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = STUDENT_TEMP,
        center_momentum: float = CENTER_MOMENTUM,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        ramp = [
            warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * i / max(warmup_teacher_temp_epochs - 1, 1)
            for i in range(warmup_teacher_temp_epochs)
        ]
        self.teacher_temp_schedule = ramp + [teacher_temp] * (nepochs - warmup_teacher_temp_epochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss: torch.Tensor | float = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue  # the student's view of the same global crop
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        # Two teacher crops against one or more student crops: at least one term was added.
        return cast(torch.Tensor, total_loss)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            world = torch.distributed.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def make_problem(
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    *,
    n_crops: int = N_CROPS,
    n_global: int = N_GLOBAL,
) -> Problem:
    """The :class:`Problem` of size ``n``: batch N, out_dim D, ``n_crops`` crops of which ``n_global`` global."""
    params = {"n_crops": check_int(n_crops, "n_crops", 2), "n_global": check_int(n_global, "n_global", 1)}
    if params["n_global"] > params["n_crops"]:
        raise ValueError(f"n_global must be <= n_crops, got n_global={n_global} and n_crops={n_crops}")
    return Problem("dino", n, n, d, dtype, device, seed, dict(params), params)


def _inputs(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = problem.generator()
    crops, global_crops = problem.extra["n_crops"], problem.extra["n_global"]
    student = problem.randn(crops * problem.n, problem.d, requires_grad=True, gen=gen)
    teacher = problem.randn(global_crops * problem.n, problem.d, gen=gen)
    center = problem.randn(problem.d, gen=gen).mul_(0.1).float()
    return student, teacher, center


def _step(module: nn.Module, problem: Problem, autocast: bool = False) -> Callable[[], Any]:
    student, teacher, center = _inputs(problem)
    module_center = module.get_buffer("center")
    module_center.copy_(center.view_as(module_center))
    module.to(problem.device)
    half = problem.dtype in (torch.float16, torch.bfloat16)
    initial_center = module.get_buffer("center").clone()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        # Every step starts from the same centre, so that repeated runs (and the cases) compute the
        # same loss; the update itself still runs inside the step.
        module.center = initial_center.clone()
        context = torch.autocast(problem.device.type, dtype=problem.dtype) if autocast and half else contextlib.nullcontext()
        with context:
            loss = module(student, teacher, 0)
        (grad,) = torch.autograd.grad(loss, student)
        return loss.detach().float(), grad

    return run


def _torchfg(backend: str) -> Callable[[Problem], Callable[[], Any]]:
    def setup(problem: Problem) -> Callable[[], Any]:
        from torchfg.losses import DINOLoss

        module = DINOLoss(
            problem.d,
            problem.extra["n_crops"],
            n_global_crops=problem.extra["n_global"],
            student_temp=STUDENT_TEMP,
            teacher_temp=TEACHER_TEMP,
            warmup_teacher_temp=TEACHER_TEMP,
            center_momentum=CENTER_MOMENTUM,
            backend=backend,
        )
        return _step(module, problem)

    return setup


def _official(problem: Problem) -> Callable[[], Any]:
    return _step(OfficialDINOLoss(problem.d, problem.extra["n_crops"]), problem, autocast=True)


def _two_global_crops(problem: Problem) -> tuple[bool, str]:
    if problem.extra["n_global"] != 2:
        return False, "the official DINOLoss has 2 global crops"
    return True, ""


def _softmax_floor(problem: Problem) -> tuple[str, Callable[[], Any]]:
    student, teacher, center = _inputs(problem)
    student, teacher = student.detach(), teacher.detach()

    def run() -> None:
        F.log_softmax(student, dim=-1)
        F.softmax(teacher - center.to(teacher.dtype), dim=-1)

    return "log_softmax(student) + softmax(teacher), forward", run


def cases() -> list[Case]:
    """torchfg backends first, then the official loss."""
    return [
        Case("torchfg[torch]", _torchfg("torch")),
        Case("torchfg[triton]", _torchfg("triton"), available=triton_available, gpu_kernel=True),
        Case("dino_official", _official, kind="baseline", supports=_two_global_crops),
    ]


BENCH = OpBench(
    name="dino",
    title="DINO loss (training step: loss + centre update), batch N, out_dim K = D, forward + backward",
    flop_model="none (memory bound)",
    flops=lambda p: None,
    make_problem=make_problem,
    cases=cases,
    default_sizes={"cpu": (16, 64, 128), "cuda": (64, 128, 256, 512)},
    default_dim={"cpu": 4096, "cuda": 65536},
    shape=lambda p: f"student ({p.extra['n_crops']}*{p.n}, {p.d}), teacher ({p.extra['n_global']}*{p.n}, {p.d})",
    floor=_softmax_floor,
    requires=api_available("torchfg.losses", "DINOLoss"),
    params={"n_crops": N_CROPS, "n_global": N_GLOBAL},
)
