"""torchfg.ops.pair_distances: exact distances of selected pairs, their analytic backward and chunking."""

from __future__ import annotations

import pytest
import torch

from brute_force import exact_distances
from torchfg.ops.metric import METRICS
from torchfg.ops.pair_distances import anchor_pair_distances, pair_distances


@pytest.mark.parametrize("metric", METRICS)
def test_pair_distances_gradcheck(metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    xi, yi = torch.randint(0, 7, (13,), generator=g), torch.randint(0, 9, (13,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: pair_distances(a, xi, yi, b, metric=metric), (x, y))
    xj = torch.randint(0, 7, (13,), generator=g)
    assert torch.autograd.gradcheck(lambda a: pair_distances(a, xi, xj, metric=metric), (x,))
    expected = exact_distances(x, y, metric)[xi, yi]
    torch.testing.assert_close(pair_distances(x, xi, yi, y, metric=metric), expected)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("separate_y", [False, True])
def test_anchor_pair_distances_gradcheck_and_chunks(metric, separate_y, monkeypatch):
    import torchfg.ops.pair_distances.reference as reference

    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True) if separate_y else None
    idx = torch.randint(0, 8 if separate_y else 11, (11, 3), generator=g)
    if not separate_y:
        idx[0, 0] = 0  # a zero distance: euclidean gradient 0 there, not NaN
    expected = exact_distances(x, x if y is None else y, metric).gather(1, idx)
    whole = anchor_pair_distances(x, idx, y, metric=metric)
    torch.testing.assert_close(whole, expected)
    inputs = (x,) if y is None else (x, y)
    grads = torch.autograd.grad(whole.square().sum(), inputs)
    monkeypatch.setattr(reference, "ANCHORED_CHUNK_ELEMENTS", 2 * 3 * 5)  # 2 anchors per chunk
    chunked = anchor_pair_distances(x, idx, y, metric=metric)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(torch.autograd.grad(chunked.square().sum(), inputs), grads):
        torch.testing.assert_close(a, b)
    if not separate_y:
        idx[0, 0] = 1  # gradcheck away from the non-differentiable zero distance
    assert torch.autograd.gradcheck(lambda *t: anchor_pair_distances(t[0], idx, t[1] if len(t) > 1 else None,
                                                                    metric=metric), inputs)


def test_pair_distances_chunks_match_whole(monkeypatch):
    import torchfg.ops.pair_distances.reference as reference

    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    xi, yi = torch.randint(0, 9, (17,), generator=g), torch.randint(0, 9, (17,), generator=g)
    whole = pair_distances(x, xi, yi)
    (grad,) = torch.autograd.grad(whole.sum(), x)
    monkeypatch.setattr(reference, "PAIR_CHUNK_ELEMENTS", 3 * 4)
    chunked = pair_distances(x, xi, yi)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(torch.autograd.grad(chunked.sum(), x)[0], grad)


# ----------------------------------------------------------------------------- triton backend

from conftest import TEST_DEVICE, requires_triton  # noqa: E402

# (atol, rtol) of the triton backend against the reference, per input dtype. Both accumulate in
# fp32 (fp64) from the same input values, so only summation order differs.
_TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1e-4, 1e-4),  # distances: fp32 from exact bf16 inputs
    torch.float16: (1e-4, 1e-4),
}
# Gradients are rounded to the input dtype at the end: one ulp of it.
_GRAD_TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-5, 2e-5),
                    torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _random_case(g, n, m, d, k, dtype, separate_y):
    # Drawn on the CPU (one generator), used on the test device: on a GPU machine the triton
    # backend takes CUDA tensors only.
    x = torch.randn(n, d, generator=g).to(dtype).to(TEST_DEVICE).requires_grad_()
    y = torch.randn(m, d, generator=g).to(dtype).to(TEST_DEVICE).requires_grad_() if separate_y else None
    idx = torch.randint(0, m if separate_y else n, (n, k), generator=g).to(TEST_DEVICE)
    return x, y, idx


@requires_triton
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("separate_y", [False, True])
def test_anchor_pair_distances_triton_matches_reference(metric, dtype, separate_y):
    # Fresh random odd sizes every run (several anchor blocks and D chunks of the interpreter tiles).
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    n, m, d, k = (int(v) for v in torch.randint(9, 30, (4,), generator=g))
    k = k % 4 + 1
    x, y, idx = _random_case(g, n, m, d, k, dtype, separate_y)
    # Duplicate partners (the same row twice for one anchor, and one row for many anchors): the
    # backward's atomics must accumulate every term.
    # (Python ints: CUDA refuses a write whose source element is a view of the written tensor.)
    idx[1, :] = int(idx[1, 0])
    idx[: n // 2, 0] = int(idx[0, 0])
    weights = torch.randn(n, k, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    inputs = (x,) if y is None else (x, y)
    results = {}
    for backend in ("torch", "triton"):
        dist = anchor_pair_distances(x, idx, y, metric=metric, backend=backend)
        grads = torch.autograd.grad((dist * weights.to(dist.dtype)).sum(), inputs)
        results[backend] = dist, grads
    (ref, ref_grads), (out, grads) = results["torch"], results["triton"]
    atol, rtol = _TOLERANCES[dtype]
    assert out.dtype == ref.dtype and out.shape == (n, k)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"seed {seed}: {m}")
    atol, rtol = _GRAD_TOLERANCES[dtype]
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"seed {seed}: {m}")


@requires_triton
@pytest.mark.parametrize("metric", METRICS)
def test_anchor_pair_distances_triton_zero_distance_and_zero_rows(metric):
    # A partner equal to its anchor (distance 0), and an all-zero row (cosine 0 to everything):
    # finite gradients, 0 where the reference defines a zero subgradient.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x[4] = 0.0
    x = x.to(TEST_DEVICE).requires_grad_()
    idx = torch.tensor([[0, 1], [1, 1], [0, 2], [3, 3], [4, 0], [6, 5], [4, 4]], device=TEST_DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        dist = anchor_pair_distances(x, idx, metric=metric, backend=backend)
        grads.append(torch.autograd.grad(dist.sum(), x)[0])
        assert torch.isfinite(grads[-1]).all()
    torch.testing.assert_close(grads[1], grads[0])
    if metric == "euclidean":
        # Row 3 only meets itself (distance 0): no gradient at all, not NaN.
        assert (grads[1][3] == 0).all()


@requires_triton
@pytest.mark.parametrize("metric", METRICS)
def test_anchor_pair_distances_triton_writes_every_output(metric):
    from torchfg.ops.pair_distances.reference import anchor_pair_distances_reference
    from torchfg.ops.pair_distances.triton import anchor_pair_distances_triton

    g = torch.Generator().manual_seed(4)
    x = torch.randn(19, 21, generator=g).to(TEST_DEVICE)
    y = torch.randn(23, 21, generator=g).to(TEST_DEVICE)
    idx = torch.randint(0, 23, (19, 3), generator=g).to(TEST_DEVICE)
    poisoned = torch.full((19, 3), float("nan"), device=TEST_DEVICE)
    out = anchor_pair_distances_triton(x, y, idx, metric, out=poisoned)
    assert out is poisoned and not out.isnan().any()
    torch.testing.assert_close(out, anchor_pair_distances_reference(x, y, idx, metric), atol=2e-5, rtol=2e-5)


@requires_triton
def test_anchor_pair_distances_triton_detached_partners_and_strides():
    # y without requires_grad (a cross-batch memory): only anchor gradients; strided inputs.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(15, 22, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    x = base[:, ::2].requires_grad_()  # non-contiguous rows
    bank = torch.randn(40, 11, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    idx = torch.randint(0, 40, (15, 2), generator=g).to(TEST_DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        dist = anchor_pair_distances(x, idx, bank, backend=backend)
        grads.append(torch.autograd.grad(dist.sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_pair_distances_rejects_masks_and_out_of_range_indices():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="x_idx must be an integer index tensor, got torch.bool"):
        pair_distances(x, torch.tensor([True, False, True]), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="y_idx"):
        pair_distances(x, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    for x_idx, y_idx, y in (([0, 4], [1, 2], None), ([0, -1], [1, 2], None), ([0, 1], [1, 5], torch.randn(5, 3))):
        with pytest.raises(ValueError, match="x_idx entries must be in \\[0, 4\\) and y_idx entries in"):
            pair_distances(x, torch.tensor(x_idx), torch.tensor(y_idx), y)


def test_anchor_pair_distances_rejects_out_of_range_partners():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="y_idx"):
        anchor_pair_distances(x, torch.tensor([[0], [1], [2], [4]]))
    with pytest.raises(ValueError, match="y_idx"):
        anchor_pair_distances(x, torch.tensor([[0], [-1], [2], [3]]), torch.randn(5, 3))


@requires_triton
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("separate_y", [False, True])
def test_anchor_pair_distances_triton_backward_writes_every_gradient_row(metric, separate_y, monkeypatch):
    # Gradients are written row by row into torch.empty buffers: poison every float allocation
    # with NaN so that a row the kernels skip (e.g. one no anchor chose) is caught.
    from torchfg.ops.pair_distances.reference import anchor_pair_distances_backward_reference
    from torchfg.ops.pair_distances.triton import anchor_pair_distances_backward_triton

    g = torch.Generator().manual_seed(6)
    x = torch.randn(17, 19, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    y = torch.randn(29, 19, generator=g, dtype=torch.float64).to(TEST_DEVICE) if separate_y else x
    idx = torch.randint(0, y.shape[0] // 2, (17, 2), generator=g).to(TEST_DEVICE)  # half of y's rows: no anchor's
    out = anchor_pair_distances(x, idx, None if not separate_y else y, metric=metric)
    grad = torch.randn(17, 2, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    expected = anchor_pair_distances_backward_reference(grad, x, y, idx, out, metric, y_is_x=not separate_y)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    got = anchor_pair_distances_backward_triton(grad, x, y, idx, out, metric, y_is_x=not separate_y)
    monkeypatch.undo()
    for a, b in zip(got, expected):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b)


@requires_triton
@pytest.mark.parametrize("separate_y", [False, True])
def test_anchor_pair_distances_triton_backward_never_reads_the_device(separate_y):
    """The partner CSR took a bincount, which on CUDA reads the ids' minimum and maximum back to
    the host: two synchronisations in every backward. It is a sort and a searchsorted now; the
    gradients still equal the reference's, with partners that no pair chose and repeated ones."""
    from torchfg.bench.profile import profile_step
    from torchfg.ops.pair_distances.reference import anchor_pair_distances_backward_reference

    g = torch.Generator().manual_seed(8)
    x = torch.randn(23, 7, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    y = torch.randn(31, 7, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_() if separate_y else None
    rows = 31 if separate_y else 23
    idx = torch.randint(0, rows // 2, (23, 3), generator=g).to(TEST_DEVICE)
    idx[:, 2] = rows - 1  # every anchor's last partner is the same (last) row
    grad = torch.randn(23, 3, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    out = anchor_pair_distances(x, idx, y, metric="euclidean", backend="triton")
    profile = profile_step(lambda: out.backward(grad))
    assert "aten.bincount.default" not in profile.aten and profile.host_syncs == 0, profile.aten
    y_ref = x if y is None else y
    expected = anchor_pair_distances_backward_reference(grad, x.detach(), y_ref.detach(), idx, out.detach(),
                                                        "euclidean", y_is_x=y is None)
    torch.testing.assert_close(x.grad, expected[0])
    if y is not None:
        torch.testing.assert_close(y.grad, expected[1])
