"""DINO: the loss op (every backend vs the reference vs a literal transcription), DINOLoss, DINOHead,
MultiCropWrapper and the schedules."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import TEST_DEVICE, backends_to_test, requires_triton
from torchfg.backends import BackendUnavailableError
from torchfg.functional import dino_loss
from torchfg.heads import DINOHead
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
    assert loss.dtype == dtype and loss.shape == ()
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
    upstream = torch.tensor(1.7)
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


def test_torch_compile_fake_tensor_shapes():
    """register_fake agrees with the real op (opcheck runs the op under fake tensors and autograd)."""
    student, teacher, center = make_inputs(3, 2, 2, 9, device="cpu", seed=13)
    student.requires_grad_()
    import torchfg.ops.dino as op

    torch.library.opcheck(
        op._dino_loss_op, (student, teacher, center, 3, 2, 0.1, 0.04, "torch"),
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
    with pytest.raises(ValueError, match="n_layers"):
        DINOHead(8, 16, n_layers=0)
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(8, 0)
    with pytest.raises(TypeError, match="in_dim"):
        DINOHead(8.0, 16)


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
