"""DINO: the loss op (every backend vs the reference vs a literal transcription), DINOLoss, DINOHead,
MultiCropWrapper and the schedules."""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import TEST_DEVICE, TRITON_OK, backends_to_test, requires_triton
from torchfg.backends import BackendUnavailableError
from torchfg.functional import dino_loss
from torchfg.heads import DINOHead, load_dino_checkpoint
from torchfg.layers import MultiCropWrapper
from torchfg.losses import DINOLoss
from torchfg.ops.dino.reference import dino_loss_backward_reference, dino_loss_reference
from torchfg.utils import cosine_schedule, ema_update_


def transcription(student, teacher, center, n_crops, n_global, student_temp, teacher_temp):
    """The loss exactly as written in the issue, in fp64: a nested loop over (teacher i, student v), v != i."""
    batch = student.shape[0] // n_crops
    s, t, c = student.double(), teacher.double(), center.double()
    p = [torch.softmax((t[i * batch : (i + 1) * batch] - c) / teacher_temp, dim=-1) for i in range(n_global)]
    log_q = [torch.log_softmax(s[v * batch : (v + 1) * batch] / student_temp, dim=-1) for v in range(n_crops)]
    total, pairs = 0.0, 0
    for i in range(n_global):
        for v in range(n_crops):
            if v == i:
                continue
            total = total + (-(p[i] * log_q[v]).sum(dim=-1)).mean()
            pairs += 1
    return total / pairs


def transcription_with_grad(student, teacher, center, n_crops, n_global, student_temp, teacher_temp):
    s = student.detach().double().requires_grad_()
    loss = transcription(s, teacher.detach(), center.detach(), n_crops, n_global, student_temp, teacher_temp)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def make_inputs(n_crops, n_global, batch, k, *, dtype=torch.float32, scale=3.0, seed=0, device=TEST_DEVICE):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_crops * batch, k, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    teacher = (torch.randn(n_global * batch, k, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    center = (torch.randn(k, generator=g, dtype=torch.float64) * 0.5).to(device, torch.float32)
    return student, teacher, center


def loss_and_grad(student, teacher, center, n_crops, n_global, student_temp, teacher_temp, backend):
    s = student.detach().clone().requires_grad_()
    loss = dino_loss(
        s, teacher, center, n_crops=n_crops, n_global_crops=n_global,
        student_temp=student_temp, teacher_temp=teacher_temp, backend=backend,
    )
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def expected_teacher_temps(warmup_temp, temp, warmup_epochs, n_epochs):
    """The original method's schedule, built independently with numpy."""
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(n_epochs - warmup_epochs) * temp))


# --------------------------------------------------------------------------- the acceptance property


@given(
    n_crops=st.integers(2, 10),
    n_global_pick=st.integers(1, 3),
    batch=st.integers(1, 16),
    out_dim=st.integers(1, 5000),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=6)
def test_module_matches_transcription_over_schedule(n_crops, n_global_pick, batch, out_dim, seed):
    """Loss and student gradient equal the fp64 nested loop, across epochs of the temperature ramp
    with the centre evolving as an EMA of the teacher batch mean."""
    n_global = min(n_global_pick, n_crops)
    n_epochs, warmup = 4, 2
    momentum = 0.8
    criterion = DINOLoss(
        out_dim, n_crops, n_global_crops=n_global, student_temp=0.1, teacher_temp=0.07,
        warmup_teacher_temp=0.03, warmup_teacher_temp_epochs=warmup, n_epochs=n_epochs,
        center_momentum=momentum, backend="torch",
    ).double()
    temps = expected_teacher_temps(0.03, 0.07, warmup, n_epochs)
    center = torch.zeros(out_dim, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(n_epochs):
        student = (torch.randn(n_crops * batch, out_dim, generator=g, dtype=torch.float64) * 3).requires_grad_()
        # A shifted teacher so that the centre moves away from zero.
        teacher = torch.randn(n_global * batch, out_dim, generator=g, dtype=torch.float64) * 3 + 1.5
        loss = criterion(student, teacher, epoch)
        (grad,) = torch.autograd.grad(loss, student)
        ref_loss, ref_grad = transcription_with_grad(student, teacher, center, n_crops, n_global, 0.1, temps[epoch])
        assert criterion.teacher_temp_at(epoch) == pytest.approx(temps[epoch], rel=1e-12)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
        center = momentum * center + (1 - momentum) * teacher.mean(dim=0)
        torch.testing.assert_close(criterion.center, center, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- backends vs reference

TOLERANCES = {  # (rtol, atol) on the loss; gradients are compared relative to their largest entry
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rounding_floor(student, teacher, center, n_crops, n_global, student_temp, teacher_temp, upstream=1.0):
    """Absolute error the gradient may carry from rounding in the accumulation dtype.

    Each entry is coef * (n_targets q - P) with coef = upstream / (n_pairs B student_temp); q and p
    are exp of log-domain arguments whose rounding error is ~eps * |argument|, so entries that
    cancel (e.g. every entry when out_dim = 1) keep an absolute error ~coef * n_global * eps * |arg|.
    """
    batch = student.shape[0] // n_crops
    coef = abs(upstream) / (n_global * (n_crops - 1) * batch * student_temp)
    largest_arg = max(
        (student.double().abs().max() / student_temp).item(),
        ((teacher.double() - center.double()).abs().max() / teacher_temp).item(),
        1.0,
    )
    eps = torch.finfo(torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32).eps
    return 8 * coef * (n_global + 1) * eps * largest_arg


def assert_grad_close(grad, ref_grad, dtype, floor):
    """Relative to the largest entry (the output rounding), plus the accumulation rounding floor."""
    assert grad.dtype == dtype and grad.shape == ref_grad.shape
    assert torch.isfinite(grad).all()
    tol = GRAD_TOL[dtype] * ref_grad.abs().max().item() + floor
    err = (grad.double() - ref_grad.double()).abs().max().item()
    assert err <= tol, f"max grad error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_crops, n_global, batch, k", [(5, 2, 3, 77), (2, 2, 1, 1), (9, 1, 2, 45)])
def test_backend_matches_transcription(backend, dtype, n_crops, n_global, batch, k):
    student, teacher, center = make_inputs(n_crops, n_global, batch, k, dtype=dtype, seed=n_crops * 31 + k)
    loss, grad = loss_and_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04, backend)
    # The loss in its accumulation dtype (an fp16 loss overflowed GradScaler's scaled gradient).
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    ref_loss, ref_grad = transcription_with_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    # The gradient is computed in fp32 and rounded once to the input dtype.
    assert_grad_close(grad, ref_grad, dtype, rounding_floor(student, teacher, center, n_crops, n_global, 0.1, 0.04))


@requires_triton
@given(
    n_crops=st.integers(2, 9),
    n_global_pick=st.integers(1, 3),
    batch=st.integers(1, 4),
    k=st.integers(1, 150),
    block_k=st.sampled_from([16, 32]),
    num_splits=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=8)
def test_triton_matches_reference_on_drawn_shapes(n_crops, n_global_pick, batch, k, block_k, num_splits, seed):
    """The kernels directly, with the tiling forced: several K-splits and partial last tiles."""
    from torchfg.ops.dino.triton import dino_loss_backward_triton, dino_loss_triton

    n_global = min(n_global_pick, n_crops)
    student, teacher, center = make_inputs(n_crops, n_global, batch, k, seed=seed)
    args = (student, teacher, center, n_crops, n_global, 0.1, 0.05)
    loss, s_lse, t_lse = dino_loss_triton(*args, block_k=block_k, num_splits=num_splits)
    ref_loss, ref_s_lse, ref_t_lse = dino_loss_reference(*args)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s_lse, ref_s_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_lse, ref_t_lse, rtol=1e-5, atol=1e-5)
    upstream = torch.tensor(1.7, device=TEST_DEVICE)
    grad = dino_loss_backward_triton(upstream, *args[:3], ref_s_lse, ref_t_lse, *args[3:], block_k=block_k)
    ref_grad = dino_loss_backward_reference(upstream, *args[:3], ref_s_lse, ref_t_lse, *args[3:])
    assert_grad_close(grad, ref_grad, torch.float32, rounding_floor(*args, upstream=1.7))


@requires_triton
def test_triton_writes_every_output_element(monkeypatch):
    """Poison every buffer the launchers allocate: an element the kernels skip stays NaN."""
    import torchfg.ops.dino.triton as tri

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(tri.torch, "empty", poisoned_empty)
    for n_crops, n_global, batch, k in [(6, 2, 3, 71), (3, 3, 2, 33)]:
        student, teacher, center = make_inputs(n_crops, n_global, batch, k, seed=k)
        loss, grad = loss_and_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04, "triton")
        assert not loss.isnan() and not grad.isnan().any()
        ref_loss, ref_grad = loss_and_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04, "torch")
        torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-5)
        floor = rounding_floor(student, teacher, center, n_crops, n_global, 0.1, 0.04)
        assert_grad_close(grad, ref_grad, torch.float32, floor)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_step_reads_nothing_from_the_host(dtype):
    """The inverse temperatures were a device tensor built from Python floats: a copy of pageable
    host memory, which synchronises the host with the GPU on every forward and backward and breaks
    CUDA-graph capture. They are kernel arguments now ((hi, lo) pairs: fp64 keeps its value)."""
    from torchfg.bench.profile import profile_step

    student, teacher, center = make_inputs(4, 2, 3, 40, seed=3)
    student, teacher, center = student.to(dtype), teacher.to(dtype), center.to(dtype)
    s = student.clone().requires_grad_()
    step = lambda: dino_loss(s, teacher, center, n_crops=4, n_global_crops=2, student_temp=0.1,  # noqa: E731
                             teacher_temp=0.07, backend="triton").backward()
    profile = profile_step(step)
    assert profile.host_copies == 0 and profile.host_syncs == 0, (profile.host_copies, profile.host_syncs)
    reference = student.clone().requires_grad_()
    loss = dino_loss(reference, teacher, center, n_crops=4, n_global_crops=2, student_temp=0.1, teacher_temp=0.07,
                     backend="torch")
    loss.backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s.grad, reference.grad, **tol)


def test_crop_blocks_leave_no_lane_idle_in_dino_layouts():
    """Power-of-two row blocks from the real crop counts: DINO's 2 + 6 / 8 / 10 crops use every row of
    every block, teachers included (BLOCK_C = 16 for 10 crops idled 37.5% of student and 87.5% of
    teacher lanes)."""
    from torchfg.ops.dino.triton import BLOCK_K_BOUNDS, TILE_ELEMENTS, crop_blocks, launch_config

    assert crop_blocks(8, 2) == (2, (4, 2, 0))
    assert crop_blocks(10, 2) == (2, (8, 0, 0))
    assert crop_blocks(12, 2) == (2, (8, 2, 0))
    assert crop_blocks(2, 2) == (2, (0, 0, 0))
    assert crop_blocks(9, 2) == (2, (4, 2, 1))
    for n_global in range(1, 6):
        for n_local in range(0, 40):
            block_g, local = crop_blocks(n_global + n_local, n_global)
            assert n_global <= block_g < 2 * n_global and block_g & (block_g - 1) == 0
            sizes = [size for size in local if size]
            assert list(local) == sizes + [0] * (3 - len(sizes))  # absent blocks come last
            assert all(size & (size - 1) == 0 for size in sizes)
            idle = sum(sizes) - n_local
            assert idle >= 0
            if bin(n_local).count("1") <= 3:
                assert idle == 0, (n_global, n_local, local)
            else:  # only the third block rounds up
                assert idle < sizes[-1]
            config = launch_config(n_global + n_local, n_global, interpreter=False)
            low, high = BLOCK_K_BOUNDS
            assert low <= config.block_k <= high and config.block_k & (config.block_k - 1) == 0
            assert (2 * block_g + sum(sizes)) * config.block_k <= TILE_ELEMENTS or config.block_k == low


CROP_LAYOUTS = [  # (n_crops, n_global, dtype): every block shape, idle rows included
    (10, 2, torch.bfloat16),  # 2 + 8: one local block
    (8, 2, torch.float16),  # 2 + 6: blocks 4, 2
    (9, 2, torch.float32),  # 2 + 7: blocks 4, 2, 1
    (17, 2, torch.bfloat16),  # 2 + 15: blocks 8, 4, 4 (one idle row)
    (6, 3, torch.float16),  # global block of 4 with one idle row
    (3, 3, torch.float32),  # no local crop
    (5, 1, torch.float32),  # one global crop
]


@requires_triton
@pytest.mark.parametrize("n_crops, n_global, dtype", CROP_LAYOUTS)
def test_triton_crop_layouts_match_reference_with_poisoned_outputs(monkeypatch, n_crops, n_global, dtype):
    """Each block structure against the reference, odd B and K, every buffer the launchers allocate
    poisoned with NaN; the gradient comes back in the input dtype."""
    import torchfg.ops.dino.triton as tri

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    batch, k = 3, 45
    student, teacher, center = make_inputs(n_crops, n_global, batch, k, dtype=dtype, seed=n_crops * 7 + n_global)
    ref_loss, ref_grad = loss_and_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04, "torch")
    monkeypatch.setattr(tri.torch, "empty", poisoned_empty)
    loss, grad = loss_and_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04, "triton")
    monkeypatch.undo()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    assert not loss.isnan() and not grad.isnan().any()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=rtol, atol=atol)
    assert_grad_close(grad, ref_grad.double(), dtype,
                      rounding_floor(student, teacher, center, n_crops, n_global, 0.1, 0.04))


def peak_allocated_bytes(fn) -> int:
    """Peak of the bytes torch allocates on the CPU while ``fn`` runs, from the profiler's records.

    A free whose size matches no block allocated during ``fn`` releases memory from before it (the
    Triton interpreter keeps the previous launch's arguments alive until the next launch): ignored.
    """
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    allocated: Counter[int] = Counter()
    live = peak = 0
    for _, nbytes in records:
        if nbytes < 0:
            if not allocated[-nbytes]:
                continue
            allocated[-nbytes] -= 1
        else:
            allocated[nbytes] += 1
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_against_the_official_loss(dtype):
    """Peak extra memory of one forward + backward, 2 + 8 crops. Official (autocast in bf16, as its
    training loop runs): ~49 (fp32) / ~36 (bf16) fp32 (B, K) buffers. The torch path: the gradient
    and ~5 fp32 (B, K) temporaries, 0.31x / 0.28x the official. The triton path: the gradient (in
    the input dtype) and per-row statistics only, 0.20x / 0.14x. Target: at most half the official."""
    n_crops, batch, k = 10, 4, 512
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n_crops * batch, k, generator=g).to(TEST_DEVICE, dtype).requires_grad_()
    teacher = torch.randn(2 * batch, k, generator=g).to(TEST_DEVICE, dtype)
    official_loss = OfficialDINOLoss(k, n_crops, 0.04, 0.04, 0, 1).to(TEST_DEVICE)
    gradient_bytes = student.numel() * student.element_size()

    def official():
        with torch.autocast(TEST_DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = official_loss(student, teacher, 0)
        torch.autograd.grad(loss, student)

    center = torch.zeros(k, device=TEST_DEVICE)

    def ours(backend):
        def run():
            loss = dino_loss(student, teacher, center, n_crops=n_crops, n_global_crops=2, student_temp=0.1,
                             teacher_temp=0.04, backend=backend)
            torch.autograd.grad(loss, student)
        return run

    if TEST_DEVICE.type != "cpu":
        pytest.skip("measured on the CPU (the profiler's CPU allocator records)")
    for fn in (official, ours("torch")):
        fn()  # warm-up: one-time allocations are not the step's
    official_peak = peak_allocated_bytes(official)
    torch_peak = peak_allocated_bytes(ours("torch"))
    assert official_peak > 4 * gradient_bytes  # the baseline is measured, not empty
    assert gradient_bytes <= torch_peak <= 0.5 * official_peak
    if TRITON_OK:
        triton_peak = peak_allocated_bytes(ours("triton"))
        # No (B, K) temporary besides the gradient: per-row statistics only.
        assert gradient_bytes <= triton_peak < gradient_bytes + batch * k * 4 // 2
        assert triton_peak <= 0.25 * official_peak


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_and_bf16_stay_finite(backend, dtype):
    """|x| up to 1e4 (1e5 after the temperatures): no overflow, no NaN, still the right answer."""
    n_crops, n_global, batch, k = 4, 2, 3, 53
    g = torch.Generator().manual_seed(7)
    student = ((torch.rand(n_crops * batch, k, generator=g) * 2 - 1) * 1e4).to(TEST_DEVICE, dtype)
    teacher = ((torch.rand(n_global * batch, k, generator=g) * 2 - 1) * 1e4).to(TEST_DEVICE, dtype)
    student[0, 0], teacher[1, 3] = 1e4, -1e4
    center = torch.randn(k, generator=g).to(TEST_DEVICE) * 100
    loss, grad = loss_and_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04, backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = transcription_with_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04)
    assert ref_loss > 1e3  # the distributions disagree wildly: a large, exactly representable loss
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
    assert_grad_close(grad, ref_grad, dtype, rounding_floor(student, teacher, center, n_crops, n_global, 0.1, 0.04))


@pytest.mark.parametrize("backend", backends_to_test())
def test_non_contiguous_inputs(backend):
    n_crops, n_global, batch, k = 4, 2, 3, 29
    student, teacher, center = make_inputs(n_crops, n_global, batch, k, seed=3)
    student_nc = student.t().contiguous().t()  # column-major
    teacher_nc = torch.cat([teacher, teacher], dim=1)[:, ::2]  # stride 2 along K
    teacher_nc.copy_(teacher)
    center_nc = torch.stack([center, center], dim=1)[:, 0]
    loss, grad = loss_and_grad(student_nc, teacher_nc, center_nc, n_crops, n_global, 0.1, 0.04, backend)
    ref_loss, ref_grad = transcription_with_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    floor = rounding_floor(student, teacher, center, n_crops, n_global, 0.1, 0.04)
    assert_grad_close(grad, ref_grad, torch.float32, floor)


def test_gradcheck_reference_fp64():
    student, teacher, center = make_inputs(3, 2, 2, 7, dtype=torch.float64, scale=1.0, device="cpu")
    student.requires_grad_()
    center = center.double()

    def fn(s):
        return dino_loss(s, teacher, center, n_crops=3, n_global_crops=2, student_temp=0.3, teacher_temp=0.2,
                         backend="torch")

    assert torch.autograd.gradcheck(fn, (student,))


@pytest.mark.parametrize("backend", backends_to_test())
def test_no_gradient_into_teacher_or_center(backend):
    student, teacher, center = make_inputs(3, 2, 2, 19, seed=5)
    student.requires_grad_()
    teacher.requires_grad_()
    center.requires_grad_()
    loss = dino_loss(student, teacher, center, n_crops=3, n_global_crops=2, student_temp=0.1, teacher_temp=0.04,
                     backend=backend)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and center.grad is None


def test_upstream_gradient_scales_the_student_gradient():
    student, teacher, center = make_inputs(4, 2, 3, 17, seed=9)
    student.requires_grad_()
    loss = dino_loss(student, teacher, center, n_crops=4, n_global_crops=2, student_temp=0.1, teacher_temp=0.04,
                     backend="torch")
    (g1,) = torch.autograd.grad(loss, student, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * -3.0, student)
    torch.testing.assert_close(g3, -3.0 * g1)


def test_torch_compile_fullgraph():
    student, teacher, center = make_inputs(4, 2, 3, 21, device="cpu", seed=11)

    def fn(s, t, c):
        return 2.0 * dino_loss(s, t, c, n_crops=4, n_global_crops=2, student_temp=0.1, teacher_temp=0.04,
                               backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    out, ref = compiled(s1, teacher, center), fn(s2, teacher, center)
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_loss_does_not_recompile_every_epoch(dynamic):
    """The epoch check's operator.index specialised the epoch, and the warm-up temperature reached
    the op as a float, which dynamo guards on: one graph per epoch, FailOnRecompileLimitHit with
    fullgraph after 8 epochs, and under dynamic=True an internal guard failure. Now one static graph
    for the first epoch and one per temperature regime (the ramp, then constant), equal to eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    criterion = DINOLoss(9, n_crops=4, n_global_crops=2, n_epochs=12, warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_epochs=7, backend="torch")
    counter = CompileCounter()
    compiled = torch.compile(criterion, backend=counter, fullgraph=True, dynamic=dynamic)
    student, teacher, _ = make_inputs(4, 2, 3, 9, device="cpu", seed=5)
    for epoch in range(12):  # past the recompile limit
        s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
        criterion.eval()
        expected = criterion(s2, teacher, epoch)
        criterion.train()  # the compiled call updates the centre: the same one as the eager call saw
        out = compiled(s1, teacher, epoch)
        torch.testing.assert_close(out, expected)
        out.backward()
        expected.backward()
        torch.testing.assert_close(s1.grad, s2.grad)
    assert counter.frame_count <= 3, counter.frame_count


def test_torch_compile_fake_tensor_shapes():
    """register_fake agrees with the real op (opcheck runs the op under fake tensors and autograd)."""
    student, teacher, center = make_inputs(3, 2, 2, 9, device="cpu", seed=13)
    student.requires_grad_()
    import torchfg.ops.dino as op

    torch.library.opcheck(
        torch.ops.torchfg.dino_loss.default, (student, teacher, center, 3, 2, 0.1, 0.04, "torch"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_unavailable_backend_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    student, teacher, center = make_inputs(3, 2, 2, 9, device="cpu")
    with pytest.raises(BackendUnavailableError, match="dino_loss"):
        dino_loss(student, teacher, center, n_crops=3, n_global_crops=2, student_temp=0.1, teacher_temp=0.04,
                  backend="triton")


# --------------------------------------------------------------------------- bad input

S, T, C = torch.randn(12, 8), torch.randn(6, 8), torch.zeros(8)  # n_crops=4, n_global=2, B=3


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((S, T, C), {"n_crops": 5}, ValueError, "n_crops"),
        ((S[:11], T, C), {}, ValueError, "n_crops"),
        ((S, T[:5], C), {}, ValueError, "multiple of n_global_crops"),
        ((S, T[:4], C), {}, ValueError, "teacher_output"),
        ((S, T[:, :7], C), {}, ValueError, "out_dim"),
        ((S, T, C[:7]), {}, ValueError, "center"),
        ((S, T, C), {"n_global_crops": 5}, ValueError, "n_global_crops"),
        ((S, T, C), {"n_global_crops": 0}, ValueError, "n_global_crops"),
        ((S[:3], T[:2], C), {"n_crops": 1, "n_global_crops": 1}, ValueError, "n_crops"),
        ((S, T, C), {"student_temp": 0.0}, ValueError, "student_temp"),
        ((S, T, C), {"teacher_temp": -1.0}, ValueError, "teacher_temp"),
        # 1/temp overflows fp32: the loss was NaN on both backends.
        ((S, T, C), {"teacher_temp": 1e-40}, ValueError, "teacher_temp"),
        ((S, T, C), {"student_temp": 1e-40}, ValueError, "student_temp"),
        ((S, T, C), {"n_crops": 4.0}, TypeError, "n_crops"),
        ((S[0], T, C), {}, ValueError, "student_output"),
        ((S, T.long(), C), {}, TypeError, "teacher_output"),
        ((S[:0], T[:0], C), {}, ValueError, "student_output"),
        ((S, T, C), {"backend": "jax"}, ValueError, "backend"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    full = {"n_crops": 4, "n_global_crops": 2, "student_temp": 0.1, "teacher_temp": 0.04, **kwargs}
    with pytest.raises(error, match=match):
        dino_loss(*args, **full)


def test_module_bad_input():
    criterion = DINOLoss(8, 4, n_epochs=10)
    with pytest.raises(ValueError, match="n_crops"):
        criterion(S[:10], T, 0)
    with pytest.raises(ValueError, match="n_global_crops"):
        criterion(S, T[:5], 0)
    with pytest.raises(ValueError, match="out_dim"):
        criterion(S[:, :7], T[:, :7], 0)
    with pytest.raises(ValueError, match="out_dim"):
        criterion(S, T[:, :7], 0)
    for epoch in (-1, 10, 11):
        with pytest.raises(ValueError, match="epoch"):
            criterion(S, T, epoch)
    with pytest.raises(TypeError, match="epoch"):
        criterion(S, T, 1.5)
    assert torch.equal(criterion.center, torch.zeros(8))  # no failed call touched the centre
    with pytest.raises(ValueError, match="n_global_crops"):
        DINOLoss(8, 2, n_global_crops=3)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        DINOLoss(8, 4, warmup_teacher_temp_epochs=11, n_epochs=10)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(8, 4, center_momentum=1.5)
    with pytest.raises(ValueError, match="backend"):
        DINOLoss(8, 4, backend="jax")
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(0, 4)


# --------------------------------------------------------------------------- DINOLoss state


def test_teacher_temperature_schedule():
    for warmup in (0, 1, 2, 7):
        criterion = DINOLoss(4, 2, teacher_temp=0.07, warmup_teacher_temp=0.04,
                             warmup_teacher_temp_epochs=warmup, n_epochs=10)
        expected = expected_teacher_temps(0.04, 0.07, warmup, 10)
        got = [criterion.teacher_temp_at(e) for e in range(10)]
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_center_in_state_dict_round_trip_and_eval_freezes_it():
    criterion = DINOLoss(16, 3, n_global_crops=2, n_epochs=4, center_momentum=0.5)
    for epoch in range(3):
        student, teacher, _ = make_inputs(3, 2, 4, 16, seed=epoch, device="cpu")
        criterion(student, teacher + 2.0, epoch)
    assert criterion.center.abs().sum() > 0
    state = criterion.state_dict()
    assert set(state) == {"center"}
    restored = DINOLoss(16, 3, n_global_crops=2, n_epochs=4, center_momentum=0.5)
    restored.load_state_dict(state)
    assert torch.equal(restored.center, criterion.center)
    restored.eval()
    before = restored.center.clone()
    student, teacher, _ = make_inputs(3, 2, 4, 16, seed=99, device="cpu")
    loss_eval = restored(student, teacher, 3)
    assert torch.equal(restored.center, before)
    # Same centre -> same loss from the trained module.
    criterion.eval()
    torch.testing.assert_close(loss_eval, criterion(student, teacher, 3))


def test_update_center_with_no_rows_leaves_the_centre_unchanged():
    """An update with zero teacher rows (an empty batch, on every rank) has no batch mean: the
    centre must stay as it is, not decay towards 0 as if the batch mean were 0."""
    criterion = DINOLoss(6, 3, center_momentum=0.9)
    criterion.update_center(torch.ones(3, 6))
    before = criterion.center.clone()
    torch.testing.assert_close(before, torch.full((6,), 0.1))  # 0.9 * 0 + 0.1 * 1: a non-zero centre
    criterion.update_center(torch.empty(0, 6))
    assert torch.equal(criterion.center, before)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_teacher_batch_leaves_the_centre_as_it_was(bad):
    """One teacher overflow (fp16 under AMP: the GradScaler skips that step) went into the centre
    and made every later loss NaN."""
    criterion = DINOLoss(8, 4, center_momentum=0.9, backend="torch")
    student, teacher = torch.randn(12, 8), torch.randn(6, 8)
    criterion(student, teacher, 0)
    before = criterion.center.clone()
    teacher_bad = teacher.clone()
    teacher_bad[0, 0] = bad
    assert not torch.isfinite(criterion(student, teacher_bad, 0))
    assert torch.equal(criterion.center, before)
    assert torch.isfinite(criterion(student, torch.randn(6, 8), 0))
    assert not torch.equal(criterion.center, before)  # finite batches update it again


def test_loss_uses_centre_before_update_and_backward_survives_it():
    criterion = DINOLoss(10, 3, n_epochs=2, center_momentum=0.0)
    student, teacher, _ = make_inputs(3, 2, 2, 10, seed=1, device="cpu")
    student.requires_grad_()
    loss = criterion(student, teacher, 0)
    ref = transcription(student.detach(), teacher, torch.zeros(10), 3, 2, 0.1, 0.04)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(criterion.center, teacher.mean(0))  # momentum 0: centre = batch mean
    loss.backward()  # the in-place centre update must not invalidate the saved tensors
    assert torch.isfinite(student.grad).all()


def _center_worker(rank, world_size, student_chunks, teacher_chunks):
    criterion = DINOLoss(24, 3, n_global_crops=2, n_epochs=3, center_momentum=0.7, backend="torch")
    for step, (student, teacher) in enumerate(zip(student_chunks[rank], teacher_chunks[rank])):
        criterion(student, teacher, step)
    return criterion.center


@pytest.mark.distributed
def test_center_update_across_two_ranks_matches_single_process():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    from dist_utils import run_on_ranks

    world_size, steps = 2, 3
    batches = (3, 5)  # unequal per-rank batches: the average must still be over all rows
    g = torch.Generator().manual_seed(0)
    teacher_chunks = [[torch.randn(2 * b, 24, generator=g) + r for _ in range(steps)] for r, b in enumerate(batches)]
    student_chunks = [[torch.randn(3 * b, 24, generator=g) for _ in range(steps)] for b in batches]
    results = run_on_ranks(_center_worker, world_size, student_chunks, teacher_chunks)
    assert all(r[0] == "ok" for r in results), results
    single = DINOLoss(24, 3, n_global_crops=2, n_epochs=3, center_momentum=0.7, backend="torch")
    for step in range(steps):
        # The concatenated batch is no longer crop-major, but the centre only needs the row mean.
        single.update_center(torch.cat([teacher_chunks[r][step] for r in range(world_size)]))
    for _, center in results:
        torch.testing.assert_close(center, single.center, rtol=1e-6, atol=1e-6)


def _empty_rank_worker(rank, world_size, teacher):
    criterion = DINOLoss(24, 3, n_global_crops=2, n_epochs=3, center_momentum=0.7, backend="torch")
    rows = teacher.shape[0] // 2 if rank == 0 else 0
    student = torch.randn(3 * rows, 24, requires_grad=True)
    loss = criterion(student, teacher[: 2 * rows], 0)
    loss.backward()
    # A 16-bit student's loss is fp32 on every rank, the empty one too (a rank with a bf16 loss
    # would differ from the others in the dtype of what it logs and scales).
    half = DINOLoss(24, 3, n_global_crops=2, n_epochs=3, backend="torch")
    half_student = student.detach().bfloat16().requires_grad_()
    half_loss = half(half_student, teacher[: 2 * rows].bfloat16(), 0)
    half_loss.backward()
    return loss.detach(), criterion.center, half_loss.dtype, half_student.grad.dtype


@pytest.mark.distributed
def test_an_empty_rank_joins_the_center_update_instead_of_hanging():
    """An uneven last batch can leave one rank with no rows: the other rank waits in the centre's
    all_reduce, so the empty rank must join it (its loss is 0) rather than raise alone."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    from dist_utils import run_on_ranks

    teacher = torch.randn(8, 24, generator=torch.Generator().manual_seed(3))
    results = run_on_ranks(_empty_rank_worker, 2, teacher)
    assert all(r[0] == "ok" for r in results), results
    single = DINOLoss(24, 3, n_global_crops=2, n_epochs=3, center_momentum=0.7, backend="torch")
    single.update_center(teacher)
    assert results[1][1][0] == 0
    for _, (_, center, half_loss_dtype, half_grad_dtype) in results:
        torch.testing.assert_close(center, single.center, rtol=1e-6, atol=1e-6)
        assert (half_loss_dtype, half_grad_dtype) == (torch.float32, torch.bfloat16)
    # Without a process group an empty batch is still an error.
    with pytest.raises(ValueError, match="0 rows"):
        DINOLoss(24, 3, n_global_crops=2)(torch.randn(0, 24), torch.randn(0, 24), 0)


def _bad_center_update_worker(rank, world_size, teacher):
    criterion = DINOLoss(24, 3, n_global_crops=2, n_epochs=3, center_momentum=0.7, backend="torch")
    try:
        criterion.update_center(teacher[:, :23] if rank == 1 else teacher[:4])
        first = "ok"
    except ValueError as exc:
        first = str(exc)
    criterion.update_center(teacher[4 * rank : 4 * rank + 4])
    return first, criterion.center


@pytest.mark.distributed
def test_a_bad_center_update_on_one_rank_raises_there_and_the_others_go_on():
    """update_center raised on the bad rank before the all_reduce: the other rank waited in it (its
    first call then paired with the bad rank's second, and its own second call hung until the
    process group's timeout). Now the bad rank joins it with an error flag: nobody's centre moves,
    the bad rank raises, and the next update is the single-process update over both batches."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    from dist_utils import run_on_ranks

    teacher = torch.randn(8, 24, generator=torch.Generator().manual_seed(5))
    results = run_on_ranks(_bad_center_update_worker, 2, teacher)
    assert all(r[0] == "ok" for r in results), results
    (first0, center0), (first1, center1) = results[0][1], results[1][1]
    assert first0 == "ok" and "out_dim" in first1
    single = DINOLoss(24, 3, n_global_crops=2, n_epochs=3, center_momentum=0.7, backend="torch")
    single.update_center(teacher)
    torch.testing.assert_close(center0, single.center, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(center1, single.center, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- head, wrapper, schedules


@pytest.mark.parametrize("n_layers, use_bn", [(1, False), (3, False), (3, True)])
def test_dino_head_shapes_and_normalised_prototypes(n_layers, use_bn):
    head = DINOHead(12, out_dim=50, n_layers=n_layers, use_bn=use_bn, hidden_dim=20, bottleneck_dim=8)
    x = torch.randn(6, 12)
    out = head(x)
    assert out.shape == (6, 50)
    # Unit bottleneck times unit-norm prototypes: cosine similarities.
    assert out.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    n_linear = sum(isinstance(m, nn.Linear) for m in head.mlp.modules())
    assert n_linear == n_layers
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == use_bn


def test_dino_head_norm_last_layer_freezes_magnitude():
    frozen = DINOHead(8, out_dim=30, hidden_dim=16, bottleneck_dim=4)
    free = DINOHead(8, out_dim=30, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    for head in (frozen, free):
        optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
        head(torch.randn(5, 8)).pow(2).sum().backward()
        optimizer.step()
    g_frozen = frozen.last_layer.parametrizations.weight.original0
    g_free = free.last_layer.parametrizations.weight.original0
    assert not g_frozen.requires_grad and torch.equal(g_frozen, torch.ones_like(g_frozen))
    torch.testing.assert_close(frozen.last_layer.weight.norm(dim=1), torch.ones(30))
    assert g_free.requires_grad and not torch.equal(g_free, torch.ones_like(g_free))
    assert "last_layer.parametrizations.weight.original0" in frozen.state_dict()


def test_dino_head_bad_args():
    assert "norm_last_layer=False" in repr(DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False))
    with pytest.raises(ValueError, match="n_layers"):
        DINOHead(8, 16, n_layers=0)
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(8, 0)
    with pytest.raises(TypeError, match="in_dim"):
        DINOHead(8.0, 16)



def test_dino_head_refuses_non_bool_flags():
    # "False" is truthy: it used to freeze the magnitude / add BatchNorm silently.
    with pytest.raises(TypeError, match="norm_last_layer must be a bool"):
        DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer="False")
    with pytest.raises(TypeError, match="use_bn must be a bool"):
        DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, use_bn=1)

class CountingBackbone(nn.Module):
    def __init__(self, as_tuple=False):
        super().__init__()
        self.calls: list[tuple[int, ...]] = []
        self.as_tuple = as_tuple

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        features = x.mean(dim=(2, 3)) * x.shape[-1]  # depends on resolution, so order matters
        return (features, None) if self.as_tuple else features


@pytest.mark.parametrize("as_tuple", [False, True])
def test_multicrop_wrapper_groups_resolutions(as_tuple):
    backbone = CountingBackbone(as_tuple)
    head = nn.Linear(3, 5)
    model = MultiCropWrapper(backbone, head)
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(5)]
    out = model(crops)
    assert backbone.calls == [(8, 3, 16, 16), (20, 3, 8, 8)]
    features = torch.cat([c.mean(dim=(2, 3)) * c.shape[-1] for c in crops])
    torch.testing.assert_close(out, head(features))
    assert out.shape == (28, 5)
    backbone.calls.clear()
    model(crops[0])
    assert backbone.calls == [(4, 3, 16, 16)]


def test_multicrop_wrapper_bad_input():
    model = MultiCropWrapper(CountingBackbone(), nn.Identity())
    with pytest.raises(ValueError, match="batch size"):
        model([torch.randn(4, 3, 8, 8), torch.randn(3, 3, 8, 8)])
    with pytest.raises(ValueError, match="crops"):
        model([])
    with pytest.raises(TypeError, match=r"crops\[1\]"):
        model([torch.randn(4, 3, 8, 8), "x"])
    with pytest.raises(TypeError, match="head"):
        MultiCropWrapper(nn.Identity(), lambda x: x)


def test_cosine_schedule_matches_formula():
    base, final, epochs, steps, warmup = 0.5, 0.01, 6, 7, 2
    values = cosine_schedule(base, final, epochs, steps, warmup, start_warmup_value=0.1)
    assert values.shape == (epochs * steps,)
    n_warm = warmup * steps
    np.testing.assert_allclose(values[:n_warm], 0.1 + (base - 0.1) * np.arange(n_warm) / (n_warm - 1))
    n_cos = epochs * steps - n_warm
    j = np.arange(n_cos)
    np.testing.assert_allclose(values[n_warm:], final + (base - final) * (1 + np.cos(np.pi * j / n_cos)) / 2)
    assert np.all(np.diff(values[n_warm:]) < 0)
    half = np.sqrt(3) / 4  # cos(pi / 6) / 2
    np.testing.assert_allclose(
        cosine_schedule(1.0, 0.0, 3, 2), [1.0, 0.5 + half, 0.75, 0.5, 0.25, 0.5 - half], rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 2, 3, warmup_epochs=2), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_cosine_schedule_bad_args():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1.0, 0.0, 3, 10, warmup_epochs=4)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        cosine_schedule(1.0, 0.0, 3, 0)
    with pytest.raises(TypeError, match="epochs"):
        cosine_schedule(1.0, 0.0, 2.5, 10)
    with pytest.raises(TypeError, match="base"):
        cosine_schedule(float("nan"), 0.0, 2, 10)



def test_cosine_schedule_extreme_finite_values_stay_finite():
    # final + (base - final) * w overflowed in base - final although every value lies in [final, base].
    values = cosine_schedule(1e308, -1e308, 2, 2)
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values, 1e308 * np.cos(np.pi * np.arange(4) / 4), rtol=1e-12, atol=1e294)
    assert cosine_schedule(-1e308, 1e308, 1, 1)[0] == -1e308
    warmup = cosine_schedule(1e308, 0.0, 2, 3, warmup_epochs=1, start_warmup_value=-1e308)[:3]
    np.testing.assert_allclose(warmup, [-1e308, 0.0, 1e308], rtol=1e-12, atol=1e294)

def test_ema_update():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher[1].running_mean.fill_(5.0)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update_(teacher, student, 0.9)
    for param, value in zip(teacher.parameters(), expected):
        torch.testing.assert_close(param.detach(), value)
        assert param.grad is None and param.requires_grad
    assert torch.equal(teacher[1].running_mean, torch.full((3,), 5.0))  # buffers are not averaged
    ema_update_(teacher, student, 0.0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(teacher, student, 1.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(nn.Linear(4, 3), nn.Linear(4, 2), 0.5)
    with pytest.raises(ValueError, match="same parameters"):
        ema_update_(nn.Linear(4, 3), nn.Linear(4, 3, bias=False), 0.5)


# --------------------------------------------------------------------------- porting from facebookresearch/dino
# The original classes, written here from their published definitions (facebookresearch/dino,
# vision_transformer.py, main_dino.py, utils.py): the peer the ported checkpoints come from.


def official_trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    def norm_cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        low, high = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
        tensor.uniform_(2 * low - 1, 2 * high - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
        return tensor


class OfficialDINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            official_trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class OfficialDINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = nn.functional.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * nn.functional.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1  # dist.all_reduce(batch_center) and dist.get_world_size() in the original
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class OfficialMultiCropWrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(
            torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0
        )
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx:end_idx]))
            if isinstance(_out, tuple):
                _out = _out[0]
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


class ResNetLike(nn.Module):
    """A torchvision-style backbone: features, then an ImageNet classifier named ``fc``."""

    def __init__(self, width=6, classes=11):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))


class ViTLike(nn.Module):
    """A timm/DINO-ViT-style backbone: patch features, a CLS-like pooled token, a classifier ``head``."""

    def __init__(self, width=6, classes=11):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, width))
        self.patch_embed = nn.Conv2d(3, width, 4, stride=4)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.norm(self.patch_embed(x).mean(dim=(2, 3)) + self.cls_token))


def official_state_dict(head):
    """The original head's state dict with torchfg's parameter names (no translation of values)."""
    return {
        key.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0").replace(
            "last_layer.weight_v", "last_layer.parametrizations.weight.original1"
        ): value
        for key, value in head.state_dict().items()
    }


@pytest.mark.parametrize("n_layers, use_bn, norm_last_layer", [(1, False, True), (3, False, True), (2, True, False)])
def test_dino_head_initialisation_equals_the_original_under_the_same_seed(n_layers, use_bn, norm_last_layer):
    """Same seed, same draws: every parameter equals the original head's, the last layer's directions
    included (kaiming-uniform, not the MLP's truncated normal)."""
    kwargs = dict(use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=40, bottleneck_dim=64)
    torch.manual_seed(123)
    official = OfficialDINOHead(24, 300, nlayers=n_layers, **kwargs)
    torch.manual_seed(123)
    ours = DINOHead(24, 300, n_layers=n_layers, **kwargs)
    expected, got = official_state_dict(official), ours.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert (ours.last_layer.parametrizations.weight.original0.requires_grad
            == official.last_layer.weight_g.requires_grad == (not norm_last_layer))
    x = torch.randn(7, 24)
    torch.testing.assert_close(ours(x), official(x), rtol=0, atol=0)


def test_dino_head_last_layer_init_statistics():
    """Directions ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in), row norm ~ 1/sqrt(3),
    1.8x the norm of a std-0.02 truncated normal at fan_in = 256 (what the head used before)."""
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=4000, hidden_dim=32, bottleneck_dim=256)
    v = head.last_layer.parametrizations.weight.original1.detach()
    bound = 1 / math.sqrt(256)
    assert v.abs().max() <= bound
    assert v.var().item() == pytest.approx(1 / (3 * 256), rel=0.02)
    assert v.norm(dim=1).mean().item() == pytest.approx(1 / math.sqrt(3), rel=0.01)
    assert v.norm(dim=1).mean().item() / (0.02 * math.sqrt(256)) == pytest.approx(1.8, rel=0.02)


def test_dino_head_load_state_dict_accepts_legacy_weight_norm_names():
    torch.manual_seed(5)
    official = OfficialDINOHead(12, 50, nlayers=2, hidden_dim=20, bottleneck_dim=8)
    with torch.no_grad():
        official.last_layer.weight_g.uniform_(0.5, 2.0)  # a trained magnitude, not the initial 1
    ours = DINOHead(12, 50, n_layers=2, hidden_dim=20, bottleneck_dim=8)
    ours.load_state_dict(official.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), official(x))


def make_official_run(tmp_path, *, use_bn, n_layers, backbone_cls, steps=2):
    """Train the original classes for a few steps and save a checkpoint laid out as main_dino.py does."""
    torch.manual_seed(0)
    out_dim, n_local, batch = 40, 3, 4
    head_kwargs = dict(use_bn=use_bn, nlayers=n_layers, hidden_dim=16, bottleneck_dim=8)
    student = OfficialMultiCropWrapper(backbone_cls(), OfficialDINOHead(6, out_dim, **head_kwargs))
    teacher = OfficialMultiCropWrapper(backbone_cls(), OfficialDINOHead(6, out_dim, **head_kwargs))
    teacher.load_state_dict(student.state_dict())
    criterion = OfficialDINOLoss(out_dim, 2 + n_local, 0.04, 0.07, 2, 4, center_momentum=0.8)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for step in range(steps):
        crops = [torch.randn(batch, 3, 16, 16) for _ in range(2)] + [torch.randn(batch, 3, 8, 8) for _ in range(n_local)]
        loss = criterion(student(crops), teacher(crops[:2]).detach(), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(0.9).add_(ps.detach(), alpha=0.1)
    # DDP wraps the student (and the teacher only when it has BatchNorm): keys under 'module.'.
    prefix_teacher = "module." if use_bn else ""
    checkpoint = {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": {f"{prefix_teacher}{k}": v for k, v in teacher.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": steps,
        "args": argparse.Namespace(arch="toy", out_dim=out_dim, norm_last_layer=True, local_crops_number=n_local),
        "dino_loss": criterion.state_dict(),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    return path, student, teacher, criterion, dict(out_dim=out_dim, n_local=n_local, batch=batch)


@pytest.mark.parametrize("use_bn, n_layers, backbone_cls", [(False, 3, ViTLike), (True, 2, ResNetLike), (False, 1, ViTLike)])
def test_load_dino_checkpoint_reproduces_the_original(tmp_path, use_bn, n_layers, backbone_cls):
    """A checkpoint of the original classes (DDP prefixes, weight_g/weight_v, centre (1, K), pickled
    args) loads into torchfg's modules, which then give the same outputs, loss and centre updates."""
    path, official_student, official_teacher, official_loss, sizes = make_official_run(
        tmp_path, use_bn=use_bn, n_layers=n_layers, backbone_cls=backbone_cls
    )
    n_crops = 2 + sizes["n_local"]
    for which, official in (("teacher", official_teacher), ("student", official_student)):
        head = DINOHead.from_dino_checkpoint(path, which=which)
        assert len([m for m in head.mlp.modules() if isinstance(m, nn.Linear)]) == n_layers
        backbone = backbone_cls(classes=3)  # a different classifier: stripped by the wrapper anyway
        ours = MultiCropWrapper(backbone, head)
        load_dino_checkpoint(path, backbone=backbone, which=which)
        fresh_head = DINOHead(6, sizes["out_dim"], use_bn=use_bn, n_layers=n_layers, hidden_dim=16,
                              bottleneck_dim=8)
        load_dino_checkpoint(path, head=fresh_head, which=which)
        for key, value in fresh_head.state_dict().items():
            assert torch.equal(value, head.state_dict()[key]), key
        ours.eval()
        official.eval()  # BatchNorm's running statistics came from the checkpoint too
        crops = [torch.randn(3, 3, 16, 16) for _ in range(2)] + [torch.randn(3, 3, 8, 8) for _ in range(3)]
        torch.testing.assert_close(ours(crops), official(crops), rtol=1e-6, atol=1e-6)

    criterion = DINOLoss(sizes["out_dim"], n_crops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_epochs=2, n_epochs=4, center_momentum=0.8, backend="torch")
    load_dino_checkpoint(path, loss=criterion)
    assert torch.equal(criterion.center, official_loss.center[0])
    g = torch.Generator().manual_seed(1)
    for epoch in (1, 2):  # the loss and the centre keep matching the original's, step after step
        student_out = torch.randn(n_crops * 5, sizes["out_dim"], generator=g)
        teacher_out = torch.randn(2 * 5, sizes["out_dim"], generator=g) + 1
        expected = official_loss(student_out, teacher_out, epoch)
        torch.testing.assert_close(criterion(student_out, teacher_out, epoch), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(criterion.center, official_loss.center[0], rtol=1e-6, atol=1e-7)


def test_load_dino_checkpoint_forms_and_loss_state_dict(tmp_path):
    torch.manual_seed(2)
    official = OfficialDINOHead(10, 30, nlayers=2, hidden_dim=12, bottleneck_dim=6)
    x = torch.randn(4, 10)
    for form in (
        official.state_dict(),                                                   # a head on its own
        {f"head.{k}": v for k, v in official.state_dict().items()},              # a wrapper's state dict
        {f"module.head.{k}": v for k, v in official.state_dict().items()},       # under DDP
        {"teacher": {f"head.{k}": v for k, v in official.state_dict().items()}},  # a training checkpoint
    ):
        head = DINOHead(10, 30, n_layers=2, hidden_dim=12, bottleneck_dim=6)
        load_dino_checkpoint(form, head=head)
        torch.testing.assert_close(head(x), official(x))
    # DINOLoss.load_state_dict takes the original (1, K) centre as it is.
    official_loss = OfficialDINOLoss(30, 4, 0.04, 0.04, 0, 3)
    official_loss.center = torch.randn(1, 30)
    ours = DINOLoss(30, 4, n_epochs=3)
    ours.load_state_dict(official_loss.state_dict())
    assert ours.center.shape == (30,) and torch.equal(ours.center, official_loss.center[0])
    ours = DINOLoss(30, 4, n_epochs=3)
    load_dino_checkpoint(official_loss.state_dict(), loss=ours)
    assert torch.equal(ours.center, official_loss.center[0])


def test_load_dino_checkpoint_errors_name_the_key_and_shapes(tmp_path):
    torch.manual_seed(3)
    official = OfficialDINOHead(10, 30, nlayers=2, hidden_dim=12, bottleneck_dim=6)
    checkpoint = {
        "teacher": {f"head.{k}": v for k, v in official.state_dict().items()},
        "dino_loss": {"center": torch.zeros(1, 30)},
    }
    wrong_k = DINOHead(10, 31, n_layers=2, hidden_dim=12, bottleneck_dim=6)
    before = {k: v.clone() for k, v in wrong_k.state_dict().items()}
    criterion = DINOLoss(30, 4, n_epochs=3)
    criterion.center.fill_(7.0)
    with pytest.raises(ValueError, match=r"teacher:head\.last_layer\.weight_v' has shape \(30, 6\).*\(31, 6\)"):
        load_dino_checkpoint(checkpoint, head=wrong_k, loss=criterion)
    # Nothing was loaded anywhere: the loss's centre (which did fit) is untouched too.
    assert all(torch.equal(v, before[k]) for k, v in wrong_k.state_dict().items())
    assert torch.equal(criterion.center, torch.full((30,), 7.0))
    with pytest.raises(ValueError, match=r"center.*\(1, 30\).*\(29,\)"):
        load_dino_checkpoint(checkpoint, loss=DINOLoss(29, 4, n_epochs=3))
    with pytest.raises(ValueError, match=r"missing from the checkpoint"):
        load_dino_checkpoint(checkpoint, head=DINOHead(10, 30, n_layers=3, hidden_dim=12, bottleneck_dim=6))
    with pytest.raises(ValueError, match="no 'student' entry"):
        load_dino_checkpoint(checkpoint, head=DINOHead(10, 30), which="student")
    with pytest.raises(ValueError, match="which"):
        load_dino_checkpoint(checkpoint, head=DINOHead(10, 30), which="both")
    with pytest.raises(ValueError, match="no teacher backbone"):
        load_dino_checkpoint(checkpoint, backbone=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no DINO loss centre"):
        load_dino_checkpoint({"teacher": checkpoint["teacher"]}, loss=DINOLoss(30, 4, n_epochs=3))
    with pytest.raises(ValueError, match="nothing to load"):
        load_dino_checkpoint(checkpoint)
    with pytest.raises(TypeError, match="checkpoint"):
        load_dino_checkpoint(42, head=DINOHead(10, 30))
    with pytest.raises(TypeError, match="head"):
        load_dino_checkpoint(checkpoint, head=lambda x: x)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_dino_checkpoint(tmp_path / "junk.pth", head=DINOHead(10, 30))


def test_centre_updates_on_every_forward_in_training_mode_like_the_original():
    """A fresh DINOLoss is in training mode: forward after forward, loss and centre follow the
    original's (which updates on every forward). eval() freezes the centre, as BatchNorm's stats."""
    official = OfficialDINOLoss(20, 4, 0.04, 0.07, 2, 5, center_momentum=0.7)
    ours = DINOLoss(20, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2, n_epochs=5,
                    center_momentum=0.7, backend="torch")
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        student, teacher = torch.randn(4 * 3, 20, generator=g), torch.randn(2 * 3, 20, generator=g) + epoch
        torch.testing.assert_close(ours(student, teacher, epoch), official(student, teacher, epoch))
        torch.testing.assert_close(ours.center, official.center[0])
    ours.eval()
    frozen = ours.center.clone()
    ours(torch.randn(12, 20, generator=g), torch.randn(6, 20, generator=g) + 5, 3)
    assert torch.equal(ours.center, frozen)
    ours.update_center(torch.full((6, 20), 2.0))  # the explicit update works in any mode
    torch.testing.assert_close(ours.center, 0.7 * frozen + 0.3 * 2.0)


@pytest.mark.parametrize("backbone_cls, name", [(ResNetLike, "fc"), (ViTLike, "head")])
def test_multicrop_wrapper_strips_the_classifier_like_the_original(backbone_cls, name):
    torch.manual_seed(0)
    ours_backbone = backbone_cls()
    official_backbone = backbone_cls()
    official_backbone.load_state_dict(ours_backbone.state_dict())
    head = nn.Linear(6, 5)
    ours = MultiCropWrapper(ours_backbone, head)
    official = OfficialMultiCropWrapper(official_backbone, head)
    assert isinstance(getattr(ours.backbone, name), nn.Identity)
    assert not any(key.startswith(name) for key in ours.backbone.state_dict())
    assert set(ours.state_dict()) == set(official.state_dict())
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8) for _ in range(4)]
    out = ours(crops)
    assert out.shape == (12, 5)  # the features (width 6) reached the head, not 11 class logits
    torch.testing.assert_close(out, official(crops))
    kept = backbone_cls()
    MultiCropWrapper(kept, nn.Identity(), strip_classifier=False)
    assert isinstance(getattr(kept, name), nn.Linear)
    assert MultiCropWrapper(kept, nn.Identity(), strip_classifier=False)(torch.randn(2, 3, 8, 8)).shape == (2, 11)
    with pytest.raises(TypeError, match="strip_classifier"):
        MultiCropWrapper(backbone_cls(), nn.Identity(), strip_classifier=1)


_COMPILED_CENTRE_SCRIPT = """
import torch
from torchfg.losses import DINOLoss
results = []
for compiled in (False, True):
    torch.manual_seed(0)
    criterion = DINOLoss(16, 4, backend="torch")
    criterion.center.copy_(torch.randn(16))
    student, teacher = torch.randn(8, 16, requires_grad=True), torch.randn(4, 16)
    step = lambda s, t: criterion(s, t, 0)
    if compiled:
        step = torch.compile(step, fullgraph=True)
    step(student, teacher).backward()
    results.append((student.grad, criterion.center.clone()))
torch.testing.assert_close(results[1][0], results[0][0])
torch.testing.assert_close(results[1][1], results[0][1])
print("same")
"""


def test_compiled_code_sees_that_it_is_not_exporting():
    """torch 2.11's dynamo folds a traced torch.compiler.is_exporting() to True (2.13 reads the
    flag): DINOLoss's compile-only centre handling (rebind, not an in-place update) was skipped
    under every torch.compile there, and the compiled backward used the updated centre. The check
    runs eagerly at trace time now, on every torch."""
    from torchfg.losses import dino as dino_module

    # What makes dynamo run it eagerly (torch.compiler.assume_constant_result's mark): without it
    # this test passes on torch 2.13 and fails only on 2.11.
    assert getattr(dino_module._exporting, "_dynamo_marked_constant", False)
    probe = torch.compile(lambda x: x + float(dino_module._exporting()), backend="eager", fullgraph=True)
    assert probe(torch.zeros(1)).item() == 0.0
    compiling = torch.compile(lambda x: x + float(dino_module._compiling_for_inductor()), backend="eager",
                              fullgraph=True)
    assert compiling(torch.zeros(1)).item() == 1.0
    assert not dino_module._compiling_for_inductor()  # eager


def test_compiled_training_step_uses_the_centre_from_before_the_update():
    """torch.compile (inductor) of a training-mode DINOLoss step: the gradient uses the centre of
    before this step's EMA update, as in eager (an in-place update let the compiled backward read
    the updated buffer: ~30 % off). In a fresh interpreter: dynamo's table of torch functions is
    built once per process, and tests that patch torch.empty must not be the ones it saw."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run([sys.executable, "-c", _COMPILED_CENTRE_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and "same" in run.stdout, run.stderr[-3000:]


def test_compiled_training_mode_call_under_inference_mode_keeps_the_centre_trainable():
    """A compiled training-mode DINOLoss called under torch.inference_mode (a validation loop that
    does not call .eval()) rebound the centre to an inference tensor: every later training step
    failed ("Inference tensors cannot be saved for backward"). The centre is updated in place there
    now, as in eager, and the compiled steps keep matching eager ones."""
    torch._dynamo.reset()
    criterion, reference = DINOLoss(16, 3, backend="torch"), DINOLoss(16, 3, backend="torch")
    compiled = torch.compile(criterion, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(12, 16, generator=gen), torch.randn(8, 16, generator=gen)) for _ in range(3)]
    for step, (student, teacher) in enumerate(batches):
        if step == 1:
            with torch.inference_mode():
                compiled(student, teacher, 0)
                reference(student, teacher, 0)
            assert not criterion.center.is_inference()
            continue
        s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
        out, expected = compiled(s1, teacher, 0), reference(s2, teacher, 0)
        out.backward()
        expected.backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(s1.grad, s2.grad)
        torch.testing.assert_close(criterion.center, reference.center)


@pytest.mark.parametrize("backend", backends_to_test())
def test_large_logits_never_give_a_negative_loss(backend):
    """Logits ~100 with a teacher that agrees with the student: the loss is ~1e-61, the difference
    of two fp32 sums of ~1e3 each; rounding must not take it below 0."""
    gen = torch.Generator().manual_seed(0)
    batch, k = 4, 256
    base = torch.randn(batch, k, generator=gen)
    student = base.repeat(4, 1) * 100 + 0.01 * torch.randn(4 * batch, k, generator=gen)
    teacher = base.repeat(2, 1) * 40
    loss = dino_loss(student.to(TEST_DEVICE), teacher.to(TEST_DEVICE), torch.zeros(k, device=TEST_DEVICE),
                     n_crops=4, n_global_crops=2, student_temp=0.1, teacher_temp=0.04, backend=backend)
    assert 0 <= loss.item() < 1e-3


def test_empty_prototype_dim_and_infinite_temperatures_are_refused():
    with pytest.raises(ValueError, match="out_dim >= 1"):
        dino_loss(torch.randn(4, 0), torch.randn(2, 0), torch.zeros(0), n_crops=2, n_global_crops=1,
                  student_temp=0.1, teacher_temp=0.04)
    with pytest.raises(ValueError, match="student_temp must be finite"):
        dino_loss(torch.randn(4, 3), torch.randn(2, 3), torch.zeros(3), n_crops=2, n_global_crops=1,
                  student_temp=float("inf"), teacher_temp=0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        DINOLoss(8, 2, teacher_temp=float("inf"))


def test_inference_mode_forward_then_training_step():
    """A validation forward under torch.inference_mode() with the loss left in training mode (it
    updates the centre) must not turn the centre into an inference tensor: the next training step
    saves it for backward."""
    criterion = DINOLoss(8, 4, backend="torch")
    with torch.inference_mode():
        criterion(torch.randn(8, 8), torch.randn(4, 8), 0)
    assert not criterion.center.is_inference() and criterion.center.abs().sum() > 0
    student = torch.randn(8, 8, requires_grad=True)
    criterion(student, torch.randn(4, 8), 1).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("backend", backends_to_test())
def test_masked_teacher_prototypes_match_the_reference(backend):
    """Teacher logits of -inf (prototypes masked out) in whole leading tiles and whole K-splits: the
    streaming softmax must not form exp(-inf - -inf). The loss and gradient equal the reference's."""
    n_crops, n_global, batch, k = 4, 2, 3, 64
    student, teacher, center = make_inputs(n_crops, n_global, batch, k, seed=11)
    floor = rounding_floor(student, teacher, center, n_crops, n_global, 0.1, 0.04)
    teacher[0, :32] = float("-inf")  # the first split of the interpreter's tiling, and its first tile
    teacher[1, :16] = float("-inf")
    teacher[batch + 2, 16:48] = float("-inf")
    teacher[:, 60:] = float("-inf")  # the last columns of every row
    loss, grad = loss_and_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04, backend)
    ref_loss, ref_grad = transcription_with_grad(student, teacher, center, n_crops, n_global, 0.1, 0.04)
    assert torch.isfinite(ref_loss)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    assert_grad_close(grad, ref_grad, torch.float32, floor)


@requires_triton
@pytest.mark.parametrize("block_k, num_splits", [(16, 1), (16, 2), (16, 4), (32, 2)])
def test_triton_masked_teacher_prototypes_with_forced_tiling(block_k, num_splits):
    from torchfg.ops.dino.triton import dino_loss_triton

    n_crops, n_global, batch, k = 3, 2, 2, 64
    student, teacher, center = make_inputs(n_crops, n_global, batch, k, seed=block_k + num_splits)
    teacher[0, :32] = float("-inf")
    teacher[3, 16:64] = float("-inf")
    args = (student, teacher, center, n_crops, n_global, 0.1, 0.04)
    loss, s_lse, t_lse = dino_loss_triton(*args, block_k=block_k, num_splits=num_splits)
    ref_loss, ref_s_lse, ref_t_lse = dino_loss_reference(*args)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(t_lse, ref_t_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_loss_inside_activation_checkpointing_is_refused(reentrant):
    """A checkpointed function that contains DINOLoss re-runs it in backward, after the centre was
    updated in place: the gradient came from another centre (7 % off on a first step) and with
    use_reentrant=True the centre moved twice. It raises now, naming the fix; checkpointing the
    model alone, with the loss outside, gives the plain gradient."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    head = nn.Linear(8, 16)
    inputs = torch.randn(24, 8, requires_grad=reentrant)
    teacher = torch.randn(8, 16) + 2 * torch.randn(16)
    criterion = DINOLoss(16, n_crops=6)
    loss = checkpoint(lambda x: criterion(head(x), teacher, 0), inputs, use_reentrant=reentrant)
    center_after_forward = criterion.center.clone()
    with pytest.raises(RuntimeError, match="checkpoint the model only"):
        loss.backward()
    assert torch.equal(criterion.center, center_after_forward)  # the refused re-run updated nothing
    plain, checkpointed = DINOLoss(16, n_crops=6), DINOLoss(16, n_crops=6)
    plain(head(inputs), teacher, 0).backward()
    expected, head.weight.grad = head.weight.grad.clone(), None
    checkpointed(checkpoint(head, inputs, use_reentrant=reentrant), teacher, 0).backward()
    torch.testing.assert_close(head.weight.grad, expected)
    torch.testing.assert_close(checkpointed.center, plain.center)
    # In eval mode (no update) the loss may sit inside the checkpoint.
    criterion.eval()
    checkpoint(lambda x: criterion(head(x), teacher, 0), inputs, use_reentrant=reentrant).backward()


def test_fp16_loss_survives_a_grad_scaler_scale():
    """The loss was returned in the student's dtype: in fp16, GradScaler's first scaled gradient
    (65536, above fp16's 65504) became inf before the DINO backward ran, so the step was skipped
    every time the scale grew back. The loss is fp32 now (as the triplet losses'), the gradient
    fp16."""
    # 16 images: every scaled gradient entry (at most 2 / (0.1 * 6 pairs * 16) * 65536) fits fp16.
    student, teacher, _ = make_inputs(4, 2, 16, 32, dtype=torch.float16, seed=3)
    student.requires_grad_(True)
    loss = DINOLoss(32, n_crops=4)(student, teacher, 0)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, student, retain_graph=True)
    (loss * torch.tensor(65536.0, device=loss.device)).backward()
    assert student.grad.dtype == torch.float16 and student.grad.isfinite().all()
    torch.testing.assert_close(student.grad.float() / 65536.0, grad.float(), rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_pickles_copies_and_saves_whole(norm_last_layer):
    """PyTorch refuses to pickle a parametrized module, so a DINOHead (or a model holding one)
    could not be pickled: torch.multiprocessing.spawn with the model as an argument and
    Lightning's ddp_spawn failed at launch, and torch.save(model) failed. The last layer now
    travels as its two parameters: the copy gives the same outputs and state, keeps g's frozen
    flag and the training modes, draws nothing from the global RNG, and still loads the original
    code's weight_g / weight_v names."""
    import copy
    import io
    import pickle

    torch.manual_seed(2)
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=6, use_bn=True, norm_last_layer=norm_last_layer)
    model = MultiCropWrapper(nn.Linear(8, 8), head)
    head.last_layer.eval()  # a mode of the caller's own, inside a model in training mode
    head.probe = nn.Identity()  # a submodule added after the last layer: the order must survive
    x = torch.randn(5, 8)
    rng = torch.random.get_rng_state()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    assert torch.equal(torch.random.get_rng_state(), rng)
    for clone in copies:
        assert isinstance(clone.head.last_layer, nn.Linear)  # as DINOHead.last_layer is annotated
        assert [(n, m.training) for n, m in clone.named_modules()] == [(n, m.training) for n, m in model.named_modules()]
        assert clone.state_dict().keys() == model.state_dict().keys()
        for (name, p), (_, q) in zip(clone.named_parameters(), model.named_parameters()):
            assert torch.equal(p, q) and p.requires_grad == q.requires_grad and p is not q, name
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
        clone.head.last_layer.parametrizations.weight.original1.data.add_(1.0)  # independent of the original
        assert not torch.equal(clone(x), model(x))
    g = copies[0].head.last_layer.parametrizations.weight.original0
    assert g.requires_grad is not norm_last_layer
    # A head whose weight norm was folded (remove_parametrizations) is a plain Linear: it copies as it is.
    from torch.nn.utils import parametrize

    folded = copy.deepcopy(head)
    parametrize.remove_parametrizations(folded.last_layer, "weight")
    torch.testing.assert_close(copy.deepcopy(folded)(x), folded(x), rtol=0, atol=0)
    # The legacy-name hook travels too.
    legacy = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
              for k, v in head.state_dict().items()}
    copies[0].head.load_state_dict(legacy)
    torch.testing.assert_close(copies[0](x), model(x))
