"""torchfg.pairwise_distance: every backend against the reference and torch.cdist."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_DEVICE, backends_to_test, requires_triton
from torchfg import pairwise_distance
from torchfg.backends import BackendUnavailableError
from torchfg.ops.metric import METRICS
from torchfg.ops.pairwise.reference import pairwise_distance_backward_reference, pairwise_distance_reference

# (atol, rtol) per dtype for values of size ~ D.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}


def brute_force(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances from explicit differences in fp64: independent of the fast path."""
    x, y = x.double(), y.double()
    if metric in ("sqeuclidean", "euclidean"):
        sq = (x.unsqueeze(-2) - y.unsqueeze(-3)).square().sum(-1)
        return sq if metric == "sqeuclidean" else sq.sqrt()
    if metric == "dot":
        return -(x @ y.transpose(-1, -2))
    xn, yn = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
    xh = torch.where(xn > 0, x / xn.clamp_min(1e-300), 0.0)
    yh = torch.where(yn > 0, y / yn.clamp_min(1e-300), 0.0)
    return 1 - xh @ yh.transpose(-1, -2)


shapes = st.tuples(
    st.integers(0, 3),  # batch (0 = no batch dim)
    st.integers(0, 130),  # N
    st.integers(0, 130),  # M
    st.integers(1, 300),  # D
)


@given(shape=shapes, metric=st.sampled_from(METRICS), seed=st.integers(0, 2**16))
def test_reference_matches_brute_force(shape, metric, seed):
    b, n, m, d = shape
    g = torch.Generator().manual_seed(seed)
    lead = (b,) if b else ()
    x = torch.randn(*lead, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(*lead, m, d, generator=g, dtype=torch.float64)
    out = pairwise_distance(x, y, metric, backend="torch")
    assert out.shape == (*lead, n, m)
    torch.testing.assert_close(out, brute_force(x, y, metric), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_backend_forward_backward_matches_reference(backend, metric, dtype):
    # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED), so inputs would differ per run.
    torch.manual_seed(zlib.crc32(f"{backend}-{metric}-{dtype}".encode()))
    x = torch.randn(2, 19, 37, dtype=dtype, device=TEST_DEVICE, requires_grad=True)
    y = torch.randn(2, 23, 37, dtype=dtype, device=TEST_DEVICE, requires_grad=True)
    out = pairwise_distance(x, y, metric, backend=backend)
    assert out.dtype == dtype and out.shape == (2, 19, 23)
    ref = brute_force(x.detach(), y.detach(), metric)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol * 37, rtol=rtol)
    grad = torch.randn_like(out)
    gx, gy = torch.autograd.grad(out, (x, y), grad)
    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    gx_ref, gy_ref = torch.autograd.grad(brute_force(x64, y64, metric), (x64, y64), grad.double())
    scale = 23 if dtype in (torch.float32, torch.float64) else 23 * 8
    torch.testing.assert_close(gx.double(), gx_ref, atol=atol * scale, rtol=rtol * 4)
    torch.testing.assert_close(gy.double(), gy_ref, atol=atol * scale, rtol=rtol * 4)


def euclidean_grad_slack(x: torch.Tensor, y: torch.Tensor | None, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row bound on how far two fp32 GEMM-form Euclidean backwards may disagree: (dL/dx,) when
    ``y`` is None (y = x), else (dL/dx, dL/dy); each (..., rows, 1).

    Both backends compute d = sqrt(|x|^2 + |y|^2 - 2 x.y), whose rounding error is about
    eps (|x|^2 + |y|^2) / (2 d) in d, so each pair's term g (x - y) / d carries a relative error
    of about eps (|x|^2 + |y|^2) / (2 d^2), rounded differently in each backend. Near-duplicate
    rows (common at D = 1) make that large for both, and neither is the ground truth then. The
    slack is that error, doubled for the two backends and again for margin, capped at 2 |g| per
    pair; exact zeros (the diagonal of y = x) are 0 in both.
    """
    other = x if y is None else y
    x64, y64 = x.double(), other.double()
    sq = (x64.unsqueeze(-2) - y64.unsqueeze(-3)).square().sum(-1)
    scale = x64.square().sum(-1).unsqueeze(-1) + y64.square().sum(-1).unsqueeze(-2)
    eps = torch.finfo(torch.float32).eps
    relative = torch.where(sq > 0, 2 * eps * scale / sq, 0.0).clamp(max=2.0)
    # A pair's term reaches dL/dx_i and dL/dy_j with |x_i - y_j| / d <= 1 per coordinate.
    term = grad.double().abs() * relative
    rows, cols = term.sum(-1).unsqueeze(-1), term.sum(-2).unsqueeze(-1)
    return (rows + cols,) if y is None else (rows, cols)


@requires_triton
@given(shape=shapes, metric=st.sampled_from(METRICS), seed=st.integers(0, 2**16), symmetric=st.booleans())
def test_triton_equals_reference_on_drawn_shapes(shape, metric, seed, symmetric):
    b, n, m, d = shape
    # The interpreter is slow: cap the work per example, keep odd sizes.
    n, m, d = min(n, 67), min(m, 45), min(d, 70)
    g = torch.Generator().manual_seed(seed)
    lead = (b,) if b else ()
    x = torch.randn(*lead, n, d, generator=g).to(TEST_DEVICE).requires_grad_()
    y = None if symmetric else torch.randn(*lead, m, d, generator=g).to(TEST_DEVICE).requires_grad_()
    out = pairwise_distance(x, y, metric, backend="triton")
    ref = pairwise_distance(x, y, metric, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if out.numel():
        # From the example's own generator: hypothesis replays a failing example and needs the same gradient.
        grad = torch.randn(out.shape, generator=g).to(out)
        inputs = (x,) if y is None else (x, y)
        grads = torch.autograd.grad(out, inputs, grad)
        ref_grads = torch.autograd.grad(ref, inputs, grad)
        if metric == "euclidean":
            slack = euclidean_grad_slack(x.detach(), None if y is None else y.detach(), grad)
        else:
            slack = (torch.zeros(()),) * len(inputs)
        for a, r, extra in zip(grads, ref_grads, slack):
            excess = (a - r).abs() - (1e-3 + 1e-4 * r.abs() + extra.to(a.device))
            assert (excess <= 0).all(), f"gradients differ by up to {excess.max().item():.3g} past the bound"


@requires_triton
def test_triton_writes_every_output_element(monkeypatch):
    """Poison the output buffer: any element the kernel skips stays NaN."""
    import torchfg.ops.pairwise.triton as tri

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(tri.torch, "empty", poisoned_empty)
    x = torch.randn(3, 33, 29, device=TEST_DEVICE, requires_grad=True)
    y = torch.randn(3, 17, 29, device=TEST_DEVICE, requires_grad=True)
    for metric in METRICS:
        out = pairwise_distance(x, y, metric, backend="triton")
        assert not out.isnan().any(), metric
        gx, gy = torch.autograd.grad(out.sum(), (x, y))
        assert not gx.isnan().any() and not gy.isnan().any(), metric


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
def test_gradcheck_reference_fp64(metric):
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_distance(a, b, metric, backend="torch"), (x, y))
    assert torch.autograd.gradcheck(lambda a: pairwise_distance(a, None, metric, backend="torch"), (x,))


@pytest.mark.parametrize("backend", backends_to_test())
def test_matches_cdist_and_broadcasts(backend):
    x = torch.randn(4, 1, 31, 13, device=TEST_DEVICE)
    y = torch.randn(3, 26, 13, device=TEST_DEVICE)
    out = pairwise_distance(x, y, backend=backend)
    assert out.shape == (4, 3, 31, 26)
    torch.testing.assert_close(out, torch.cdist(x, y), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", backends_to_test())
def test_euclidean_gradient_at_zero_distance_is_finite(backend):
    x = torch.randn(5, 8, device=TEST_DEVICE)
    x = torch.cat([x, x[:2]]).requires_grad_()  # duplicate rows: zero off-diagonal distances
    out = pairwise_distance(x, metric="euclidean", backend=backend)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all()
    y = x.detach().clone().requires_grad_()
    out = pairwise_distance(x, y, metric="euclidean", backend=backend)
    gx, gy = torch.autograd.grad(out.sum(), (x, y))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_give_nan_not_a_distance(backend, metric, bad):
    """As torch.cdist: a row holding NaN is at distance NaN from everything, and a row holding inf
    at NaN or inf (inf - inf, or inf). The Euclidean clamp at 0 must not turn either into 0, a
    perfect match."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(4, 6, generator=gen).to(TEST_DEVICE)
    y = torch.randn(5, 6, generator=gen).to(TEST_DEVICE)
    x[1, 2] = bad
    out = pairwise_distance(x, y, metric, backend=backend)
    if bad != bad:
        assert out[1].isnan().all(), out[1]
    else:
        assert not out[1].isfinite().any(), out[1]
    others = torch.tensor([0, 2, 3], device=TEST_DEVICE)
    assert out[others].isfinite().all()


@pytest.mark.parametrize("backend", backends_to_test())
def test_second_order_gradient_raises(backend):
    x = torch.randn(6, 5, device=TEST_DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(pairwise_distance(x, x.flip(0), "sqeuclidean", backend=backend).sum(), x,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="torchfg.pairwise_distance: second-order gradients"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("backend", backends_to_test())
def test_non_contiguous_inputs(backend):
    base = torch.randn(2, 40, 22, device=TEST_DEVICE)
    x = base.transpose(0, 1)[:, :, ::2]  # (40, 2, 11), strided
    y = torch.randn(11, 2, 15, device=TEST_DEVICE).permute(1, 2, 0)  # (2, 15, 11)
    out = pairwise_distance(x.transpose(0, 1), y, "sqeuclidean", backend=backend)
    ref = brute_force(x.transpose(0, 1), y, "sqeuclidean")
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@given(n=st.integers(1, 40), d=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_metric_properties(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    for metric in METRICS:
        dist = pairwise_distance(x, metric=metric)
        torch.testing.assert_close(dist, dist.T)
        if metric != "dot":
            assert (dist >= -1e-12).all()
            torch.testing.assert_close(dist.diagonal(), torch.zeros(n, dtype=torch.float64), atol=0, rtol=0)
    e = pairwise_distance(x, metric="euclidean")
    # d(i, k) <= d(i, j) + d(j, k) for all i, j, k
    assert (e.unsqueeze(1) <= e.unsqueeze(2) + e.unsqueeze(0) + 1e-9).all()
    scales = torch.rand(n, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(pairwise_distance(x * scales, metric="cosine"), pairwise_distance(x, metric="cosine"))


@pytest.mark.parametrize("backend", backends_to_test())
def test_empty_inputs(backend):
    x = torch.randn(2, 0, 5, device=TEST_DEVICE)
    y = torch.randn(2, 7, 5, device=TEST_DEVICE)
    assert pairwise_distance(x, y, backend=backend).shape == (2, 0, 7)
    assert pairwise_distance(y, x, backend=backend).shape == (2, 7, 0)
    y.requires_grad_()
    out = pairwise_distance(y, x, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), y)
    assert (g == 0).all()


def test_torch_compile_fullgraph():
    x = torch.randn(9, 6)
    y = torch.randn(4, 6)

    def fn(a, b):
        return pairwise_distance(a, b, "euclidean", backend="torch").sum(-1) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), fn(x, y))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.randn(5),), {}, ValueError, "x"),
        ((torch.tensor(1.0),), {}, ValueError, "x"),
        ((torch.randn(3, 4), torch.randn(3, 5)), {}, ValueError, "feature size"),
        ((torch.randn(2, 3, 4), torch.randn(3, 3, 4)), {}, ValueError, "broadcast"),
        ((torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)), {}, TypeError, "dtype"),
        ((torch.ones(3, 4, dtype=torch.int64),), {}, TypeError, "x"),
        ((torch.randn(3, 4), torch.ones(3, 4, dtype=torch.int32)), {}, TypeError, "y"),
        ((torch.randn(3, 4),), {"metric": "manhattan"}, ValueError, "metric"),
        ((torch.randn(3, 4),), {"backend": "jax"}, ValueError, "backend"),
        (([[1.0, 2.0]],), {}, TypeError, "x"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        pairwise_distance(*args, **kwargs)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailableError, match="CPU|triton"):
        pairwise_distance(torch.randn(3, 4), backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA|not implemented"):
        pairwise_distance(torch.randn(3, 4), backend="cuda")


def test_env_var_forces_backend(monkeypatch):
    calls = []
    import torchfg.ops.pairwise as op

    real = op.pairwise_distance_reference
    monkeypatch.setattr(op, "pairwise_distance_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("TORCHFG_BACKEND", "torch")
    pairwise_distance(torch.randn(3, 4))
    assert calls
    monkeypatch.setenv("TORCHFG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="TORCHFG_BACKEND"):
        pairwise_distance(torch.randn(3, 4))


def test_reference_chunking_matches_single_chunk():
    x = torch.randn(1, 50, 7)
    y = torch.randn(1, 33, 7)
    for metric in METRICS:
        torch.testing.assert_close(
            pairwise_distance_reference(x, y, metric, chunk_rows=7), pairwise_distance_reference(x, y, metric)
        )
        torch.testing.assert_close(
            pairwise_distance_reference(x, x, metric, symmetric=True, chunk_rows=7),
            pairwise_distance_reference(x, x, metric, symmetric=True),
        )


@pytest.mark.parametrize("metric", METRICS)
def test_reference_backward_is_chunked_and_exact(metric, monkeypatch):
    """The backward in row chunks equals autograd through explicit fp64 math, and no temporary
    of the backward is as large as the (B, N, M) gradient it receives."""
    import torchfg.ops.pairwise.reference as reference
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(11)
    b, n, m, d = 2, 37, 29, 6
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    y[0, 3] = x[0, 5]  # a zero euclidean distance: gradient 0 there
    y[1, 4] = 0.0  # a zero row: cosine 0 to everything, no gradient
    grad = torch.randn(b, n, m, generator=g, dtype=torch.float64)
    out = pairwise_distance_reference(x, y, metric)

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func.is_view:  # a view allocates nothing
                return result
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return result

    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", b * m * 4)  # 4 rows per chunk
    with LargestOutput():
        gx, gy = reference.pairwise_distance_backward_reference(grad, x, y, out, metric)
    # The gradients themselves are (B, N, D) and (B, M, D); everything else is at most one chunk.
    assert LargestOutput.largest <= max(b * m * 4, b * n * d, b * m * d) < b * n * m // 4

    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    if metric == "dot":
        dist = -(xr @ yr.transpose(1, 2))
    elif metric == "cosine":
        xn, yn = xr.norm(dim=-1, keepdim=True), yr.norm(dim=-1, keepdim=True)
        xh = torch.where(xn > 0, xr / xn.clamp_min(1e-300), torch.zeros_like(xr))
        yh = torch.where(yn > 0, yr / yn.clamp_min(1e-300), torch.zeros_like(yr))
        dist = 1.0 - xh @ yh.transpose(1, 2)
    else:
        diff = xr.unsqueeze(2) - yr.unsqueeze(1)
        sq = diff.square().sum(-1)
        dist = sq if metric == "sqeuclidean" else torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() * (sq > 0)
    ex, ey = torch.autograd.grad(dist, (xr, yr), grad)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gy, ey)


@pytest.mark.parametrize("metric", METRICS)
def test_reference_splits_a_large_batch_instead_of_one_row_gemms(metric, monkeypatch):
    """With B * M above the block budget, whole-batch blocks were one row each: N batched GEMVs,
    each re-reading all of y (3-4x torch.cdist at B = 256, M = 4096). Blocks of fewer batch
    elements keep the rows per GEMM; forward and backward equal the single-block computation."""
    import torchfg.ops.pairwise.reference as reference
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(12)
    b, n, m, d = 6, 9, 20, 5
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    grad = torch.randn(b, n, m, generator=g, dtype=torch.float64)
    expected = pairwise_distance_reference(x, y, metric, chunk_rows=n)
    expected_grads = pairwise_distance_backward_reference(grad, x, y, expected, metric)

    class GemmRows(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
                self.rows.append(args[-2 if func.overloadpacket is torch.ops.aten.baddbmm else 0].shape[1])
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 3 * m)  # 3 rows of one batch element per block
    with GemmRows() as mode:
        out = pairwise_distance_reference(x, y, metric)
        gx, gy = pairwise_distance_backward_reference(grad, x, y, out, metric)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, expected_grads[0])
    torch.testing.assert_close(gy, expected_grads[1])
    assert mode.rows and min(mode.rows) >= 3, mode.rows


# ----------------------------------------------------------------------------- the backend registry


def test_registry_resolves_by_capability(monkeypatch):
    from torchfg import backends

    monkeypatch.delenv("TORCHFG_BACKEND", raising=False)
    calls = []
    spec = backends.BackendSpec(
        "cuda", dtypes=(torch.float32,), max_k=8, status=lambda device: (True, "test"), needs_build=True,
        is_built=lambda: False, prepare=lambda device: calls.append("built"),
    )
    backends.register_op("test_registry_op", backends.BackendSpec("triton", max_k=4, auto_max_k=2), spec)
    cpu = torch.device("cpu")
    try:
        # auto: no interpreted Triton on the CPU, and never a build behind the user's back
        assert backends.resolve_backend("test_registry_op", cpu, torch.float32, "auto", k=1) == "torch"
        assert calls == []
        assert backends.resolve_backend("test_registry_op", cpu, torch.float32, "cuda", k=3) == "cuda"
        assert calls == ["built"]
        with pytest.raises(BackendUnavailableError, match="supports dtypes"):
            backends.resolve_backend("test_registry_op", cpu, torch.float64, "cuda")
        with pytest.raises(BackendUnavailableError, match="k <= 8"):
            backends.resolve_backend("test_registry_op", cpu, torch.float32, "cuda", k=9)
        monkeypatch.setenv("TORCHFG_BACKEND", "cuda")  # a global switch falls back where it cannot apply
        assert backends.resolve_backend("test_registry_op", cpu, torch.float64) == "torch"
        assert backends.resolve_backend("test_registry_op", cpu, torch.float32, "torch") == "torch"
        with pytest.raises(ValueError, match="backend must be one of"):
            backends.resolve_backend("test_registry_op", cpu, torch.float32, "fast")
        with pytest.raises(KeyError, match="not a registered op"):
            backends.resolve_backend("no_such_op", cpu, torch.float32)
    finally:
        backends._REGISTRY.pop("test_registry_op", None)


def test_auto_order_honours_auto_max_k(monkeypatch):
    from torchfg import backends

    monkeypatch.delenv("TORCHFG_BACKEND", raising=False)
    ready = lambda device: (True, "test")  # noqa: E731
    backends.register_op(
        "test_order_op",
        backends.BackendSpec("triton", max_k=128, auto_max_k=64, status=ready),
        backends.BackendSpec("cuda", max_k=1024, status=ready, needs_build=True, is_built=lambda: built[0]),
    )
    gpu = torch.device("cuda")  # only the status functions above look at it
    built = [False]
    try:
        pick = lambda k: backends.resolve_backend("test_order_op", gpu, torch.float16, k=k)  # noqa: E731
        assert (pick(10), pick(100), pick(500)) == ("triton", "triton", "torch")  # cuda not built yet
        built[0] = True
        assert (pick(10), pick(100), pick(500)) == ("triton", "cuda", "cuda")
    finally:
        backends._REGISTRY.pop("test_order_op", None)


@requires_triton
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_every_gpu_config_matches_reference(direction, monkeypatch):
    """Each tile configuration the GPU autotuner may pick, run pinned under the interpreter on odd
    sizes spanning several tiles, output poisoned: the same distances and gradients as the reference."""
    import torchfg.ops.pairwise.triton as tri

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(tri.torch, "empty", poisoned_empty)

    table = tri.FORWARD_CONFIGS if direction == "forward" else tri.BACKWARD_CONFIGS
    dtypes = {"16bit": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
    for cls, configs in table.items():
        dtype = dtypes[cls]
        assert tri.operand_class(dtype) == cls
        atol, rtol = TOLERANCES[dtype]
        for config in configs:
            g = torch.Generator().manual_seed(zlib.crc32(f"{direction}-{cls}-{config}".encode()))
            n, m, d = config.block_m + 13, 2 * config.block_n + 5, config.block_d + 7
            x = torch.randn(2, n, d, generator=g).to(TEST_DEVICE, dtype)
            y = torch.randn(2, m, d, generator=g).to(TEST_DEVICE, dtype)
            for metric in METRICS:
                ref = pairwise_distance_reference(x.double(), y.double(), metric)
                if direction == "forward":
                    out = tri.pairwise_distance_triton(x, y, metric, symmetric=False, config=config)
                    torch.testing.assert_close(out.double(), ref, atol=atol * d, rtol=rtol, msg=f"{config} {metric}")
                    continue
                grad = torch.randn(2, n, m, generator=g).to(TEST_DEVICE, dtype)
                out = ref.to(dtype)
                gx, gy = tri.pairwise_distance_backward_triton(grad, x, y, out, metric, config=config)
                x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
                gx_ref, gy_ref = torch.autograd.grad(
                    pairwise_distance_reference(x64, y64, metric), (x64, y64), grad.double()
                )
                scale = m if dtype != torch.bfloat16 else 8 * m
                torch.testing.assert_close(gx.double(), gx_ref, atol=atol * scale, rtol=rtol * 4, msg=f"{config} {metric}")
                torch.testing.assert_close(gy.double(), gy_ref, atol=atol * scale, rtol=rtol * 4, msg=f"{config} {metric}")


@requires_triton
def test_autotune_prune_drops_the_configs_that_spill_at_a_ragged_d():
    """At D = 100 (not a multiple of BLOCK_D) the autotuner only times the configs that compiled
    without spills on sm_90 (benchmarks/results/sm90_compile_*.csv); at D = 512 it times them all."""
    import triton

    import torchfg.ops.pairwise.triton as tri

    for direction, table in (("forward", tri.FORWARD_CONFIGS), ("backward", tri.BACKWARD_CONFIGS)):
        prune = tri.prune_for_ragged_d(direction)
        configs = [
            triton.Config(tri._tile_meta(c, direction), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in table["16bit"]
        ]
        assert prune(configs, {"D": 512}) == configs
        kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps) for c in prune(configs, {"D": 100})}
        if direction == "forward":
            assert kept == {(64, 64, 64, 4)}
        else:
            assert (128, 32, 128, 8) not in kept and (64, 64, 64, 4) in kept and len(kept) == 3
        # Never empty: a D that no config divides keeps at least the smallest accumulator.
        assert prune(configs[:1], {"D": 100})


@requires_triton
@pytest.mark.parametrize("offset", [0.0, 32.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_gemm_backward_matches_reference(dtype, offset, monkeypatch):
    """The 16-bit backward (W in row chunks, then two GEMMs that also give its sums): several
    chunks and column blocks, a batch of 2, buffers poisoned; gradients within a few 16-bit
    roundings of the fp64 reference relative to their scale, also for data far from the origin
    (uncentred operands were 5 % off there in bf16, the fused kernel 0.5 %)."""
    import torchfg.ops.pairwise.triton as tri

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def fused_path(*args, **kwargs):
        raise AssertionError("the 16-bit backward took the fused kernel")

    monkeypatch.setattr(tri.torch, "empty", poisoned_empty)
    monkeypatch.setattr(tri, "_backward_one_side", fused_path)
    g = torch.Generator().manual_seed(zlib.crc32(f"weights-gemm-{dtype}-{offset}".encode()))
    n, m, d = 29, 37, 21
    # 3 chunks of 12, 12 and 5 rows, each row in 3 column blocks of the interpreter's 16.
    monkeypatch.setattr(tri, "WEIGHTS_BLOCK_ELEMENTS", 2 * 12 * m)
    x = (torch.randn(2, n, d, generator=g) + offset).to(TEST_DEVICE, dtype)
    y = (torch.randn(2, m, d, generator=g) + offset).to(TEST_DEVICE, dtype)
    # A duplicate: its distance from the 16-bit output is 0.06 at offset 32, not 0, under the
    # noise floor, so W is 0 there (without the floor fp16 was 0.66 % off; with it 0.05 %).
    y[0, 3] = x[0, 5]
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for metric in [m for m in tri.WEIGHTS_GEMM_METRICS if tri.uses_weights_gemm(dtype, m)]:
        out = pairwise_distance_reference(x, y, metric)
        grad = torch.randn(2, n, m, generator=g).to(TEST_DEVICE, dtype)
        gx, gy = tri.pairwise_distance_backward_triton(grad, x, y, out, metric)
        # The reference backward in fp64 (its euclidean gradient is 0 at a zero distance).
        x64, y64 = x.double(), y.double()
        gx_ref, gy_ref = pairwise_distance_backward_reference(
            grad.double(), x64, y64, pairwise_distance_reference(x64, y64, metric), metric)
        for got, want, name in ((gx, gx_ref, "x"), (gy, gy_ref, "y")):
            assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any()
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < tolerance, f"{metric} d{name}: relative error {err:.3g}"
    # Cosine keeps the fused kernel (its projection cancels when rows point alike).
    with pytest.raises(AssertionError, match="fused kernel"):
        tri.pairwise_distance_backward_triton(grad, x, y, pairwise_distance_reference(x, y, "cosine"), "cosine")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_backward_of_duplicate_rows(dtype):
    """A P x K batch with repeated images: identical rows' distances from the GEMM-form forward
    are rounding noise, not 0. The W + GEMM backward gives them the zero subgradient (as the
    reference does at distance 0) instead of a W of g / noise (376 % error in bf16 without it)."""
    import torchfg.ops.pairwise.triton as tri

    g = torch.Generator().manual_seed(zlib.crc32(f"duplicates-{dtype}".encode()))
    rows = torch.nn.functional.normalize(torch.randn(2, 12, 48, generator=g), dim=-1) * 3
    x = rows.repeat(1, 3, 1).to(TEST_DEVICE, dtype)  # every row three times
    out = tri.pairwise_distance_triton(x, x, "euclidean", symmetric=True)  # as the op's forward
    grad = torch.randn(out.shape, generator=g).to(TEST_DEVICE, dtype)
    gx, gy = tri.pairwise_distance_backward_triton(grad, x, x, out, "euclidean")
    assert tri.uses_weights_gemm(dtype, "euclidean") == (dtype == torch.bfloat16)  # fp16: the fused kernel
    x64 = x.double()
    gx_ref, gy_ref = pairwise_distance_backward_reference(
        grad.double(), x64, x64, pairwise_distance_reference(x64, x64, "euclidean"), "euclidean")
    for got, want, name in ((gx, gx_ref, "x"), (gy, gy_ref, "y")):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-2, f"d{name}: relative error {err:.3g}"


@requires_triton
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "dot"])
def test_fp16_backward_under_loss_scaling(metric):
    """fp16 training scales the upstream gradient (GradScaler starts at 65536). W = g / (2 d) and
    the row sums of G are not bounded by the gradient: stored in fp16 they overflowed to inf and
    the gradient came out NaN (euclidean: unit rows 0.015 apart at g = 4096; sqeuclidean: a row
    sum of 300 columns at g = 300), where the gradient itself is well inside fp16's range."""
    g = torch.Generator().manual_seed(zlib.crc32(f"fp16-scaled-{metric}".encode()))
    if metric == "euclidean":
        x = torch.nn.functional.normalize(torch.randn(1, 5, 24, generator=g), dim=-1)
        y = x + 0.003 * torch.randn(1, 5, 24, generator=g)
        scale = 4096.0
    else:  # rows close together: the gradient is small, G's row sums (300 x 300) are not
        centre = torch.randn(1, 1, 24, generator=g)
        x = centre + 0.01 * torch.randn(1, 3, 24, generator=g)
        y = centre + 0.01 * torch.randn(1, 300, 24, generator=g)
        scale = 300.0 if metric == "sqeuclidean" else 1.0  # dot: the GEMMs are the gradient
    x, y = x.to(TEST_DEVICE, torch.float16), y.to(TEST_DEVICE, torch.float16)
    upstream = torch.full((1, x.shape[1], y.shape[1]), scale, device=TEST_DEVICE, dtype=torch.float16)
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    pairwise_distance(xx, yy, metric, backend="triton").backward(upstream)
    x64, y64 = x.double(), y.double()
    want = pairwise_distance_backward_reference(
        upstream.double(), x64, y64, pairwise_distance_reference(x64, y64, metric), metric)
    for got, ref, name in zip((xx.grad, yy.grad), want, ("x", "y")):
        assert ref.abs().max() < 30000  # the gradient itself is well inside fp16's range
        assert torch.isfinite(got).all(), f"d{name} not finite"
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 4e-3, f"d{name}: relative error {err:.3g}"


@requires_triton
def test_bf16_backward_when_the_gradient_cancels():
    """A row at the centre of 700 rows placed symmetrically about it: its gradient is a small
    residue of large terms. With the operands shifted by an inexact mean (every bf16(y - c)
    rounded alike) and 16-bit GEMM outputs (the row sum 700 became 704), dL/dx was 400 % off."""
    g = torch.Generator().manual_seed(zlib.crc32(b"bf16-cancel"))
    x = torch.randn(1, 1, 8, generator=g).to(TEST_DEVICE, torch.bfloat16)
    e = torch.randn(350, 8, generator=g).to(TEST_DEVICE)
    y = torch.cat([x[0, 0].float() + e, x[0, 0].float() - e])[None].to(torch.bfloat16)
    upstream = torch.ones(1, 1, 700, device=TEST_DEVICE, dtype=torch.bfloat16)
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    pairwise_distance(xx, yy, "sqeuclidean", backend="triton").backward(upstream)
    x64, y64 = x.double(), y.double()
    want = pairwise_distance_backward_reference(
        upstream.double(), x64, y64, pairwise_distance_reference(x64, y64, "sqeuclidean"), "sqeuclidean")
    for got, ref, name in zip((xx.grad, yy.grad), want, ("x", "y")):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, f"d{name}: relative error {err:.3g}"


@requires_triton
def test_fp32_gemm_keeps_an_out_of_memory_error(monkeypatch):
    """cuBLAS's fp32-output bmm running out of memory must not fall back to upcast operands, which
    need more memory still: the caller gets the out-of-memory error, not a later and vaguer one.
    Other errors (an older torch without out_dtype) still take the fallback."""
    kernel = pytest.importorskip("torchfg.ops.pairwise.triton")

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    a = torch.randn(1, 3, 4).to(torch.bfloat16).as_subclass(FakeCuda)
    b = torch.randn(1, 4, 5).to(torch.bfloat16)
    bmm = torch.bmm

    def failing(error):
        def fake_bmm(x, y, **kwargs):
            if "out_dtype" in kwargs:
                raise error
            return bmm(x.as_subclass(torch.Tensor), y)
        return fake_bmm

    monkeypatch.setattr(torch, "bmm", failing(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        kernel._bmm_fp32(a, b)
    monkeypatch.setattr(torch, "bmm", failing(TypeError("unexpected keyword argument 'out_dtype'")))
    out = kernel._bmm_fp32(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.as_subclass(torch.Tensor), bmm(a.as_subclass(torch.Tensor).float(), b.float()))


@requires_triton
@pytest.mark.parametrize("dtype, metric", [(torch.float32, "cosine"), (torch.bfloat16, "euclidean")])
def test_triton_batches_beyond_the_grid_z_limit_launch_in_slices(dtype, metric, monkeypatch):
    """The kernels put the batch on grid z, which CUDA caps at 65535 (the interpreter has no cap):
    a larger batch is launched in slices. Here the cap is 3 for a batch of 7; every launch's grid z
    stays within it, and the distances and both gradients equal the reference's. bf16 Euclidean
    takes the W-map + GEMM backward, fp32 cosine the fused one."""
    import torchfg.ops.pairwise.triton as pairwise_triton

    monkeypatch.setattr(pairwise_triton, "MAX_GRID_BATCH", 3)
    grids = []
    # The interpreter's kernels are InterpretedFunction, compiled ones JITFunction.
    kernel_type = type(pairwise_triton._pairwise_forward_kernel)
    real_getitem = kernel_type.__getitem__

    def recording_getitem(kernel, grid):
        grids.append(grid({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}) if callable(grid) else grid)
        return real_getitem(kernel, grid)

    monkeypatch.setattr(kernel_type, "__getitem__", recording_getitem)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(7, 5, 8, generator=g).to(dtype).requires_grad_()
    y = torch.randn(7, 6, 8, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(7, 5, 6, generator=g).to(dtype)
    out = pairwise_distance(x, y, metric=metric, backend="triton")
    gx, gy = torch.autograd.grad(out, (x, y), grad)
    assert len(grids) >= 3 * 2 and max(grid[2] for grid in grids) <= 3, grids
    x64, y64 = x.detach().double(), y.detach().double()
    expected = pairwise_distance_reference(x64, y64, metric)
    ex, ey = pairwise_distance_backward_reference(grad.double(), x64, y64, expected, metric)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(gx.double(), ex, **tol)
    torch.testing.assert_close(gy.double(), ey, **tol)


@requires_triton
@pytest.mark.parametrize("path", ["fused", "weights"])
def test_triton_backward_grids_stay_within_cudas_y_cap_for_millions_of_rows(path, monkeypatch):
    """CUDA caps grid y and z at 65535 (the interpreter has no cap). The fused backward puts its
    row blocks on grid y: fp64's 32-row tiles passed the cap at N > 2.1M rows, so larger N is
    launched in row slices. The W map put its column blocks there: 67M columns in 1024-column
    blocks. Launches are recorded, not run (millions of interpreted programs): every grid of every
    config a GPU may pick, and the interpreter's, keeps y and z within the cap and the launches
    cover every (row, column) block once."""
    import torchfg.ops.pairwise.triton as tri

    cap, launched = 65535, []
    kernel_type = type(tri._pairwise_backward_kernel)

    def recording_getitem(kernel, grid):
        def launch(*args, **kwargs):
            launched.append((kernel, grid(kwargs) if callable(grid) else grid, kwargs, args))
        return launch

    monkeypatch.setattr(kernel_type, "__getitem__", recording_getitem)
    if path == "fused":
        # 2.2M rows against 3: fp64, D = 1 (17 MB an operand).
        n, m = 2_200_000, 3
        x, y = torch.zeros(1, n, 1, dtype=torch.float64), torch.zeros(1, m, 1, dtype=torch.float64)
        grad, out = torch.zeros(1, n, m, dtype=torch.float64), torch.ones(1, n, m, dtype=torch.float64)
        configs = list(tri.BACKWARD_CONFIGS["fp64"]) + list(tri.BACKWARD_CONFIGS["fp32"]) + [tri.INTERPRETER_CONFIG]
        for config in configs:
            launched.clear()
            tri.pairwise_distance_backward_triton(grad, x, y, out, "euclidean", config=config)
            per_launch = cap * config.block_m
            assert len(launched) == -(-n // per_launch) + 1  # dL/dx in slices, then dL/dy
            for _, grid, meta, args in launched:
                rows = args[6]
                assert grid[1] <= cap and grid[2] <= cap, (config, grid)
                assert grid[:2] == (1, -(-rows // meta["BLOCK_M"])), (config, grid, rows)
            assert sum(args[6] for *_, args in launched) == n + m
    else:
        # One row against 1.2M columns, bf16 Euclidean (the W map + GEMM backward); the
        # interpreter's 16-column blocks pass the cap at 1M columns as a GPU's 1024 do at 67M.
        m = 1_200_000
        x, y = torch.ones(1, 1, 1, dtype=torch.bfloat16), torch.zeros(1, m, 1, dtype=torch.bfloat16)
        grad, out = torch.ones(1, 1, m, dtype=torch.bfloat16), torch.ones(1, 1, m, dtype=torch.bfloat16)
        tri.pairwise_distance_backward_triton(grad, x, y, out, "euclidean")
        grids = [grid for kernel, grid, *_ in launched if kernel is tri._pairwise_grad_weights_kernel]
        assert grids and all(g[1] <= cap and g[2] <= cap for g in grids), grids
        assert sum(g[0] * g[1] for g in grids) == -(-m // tri._WEIGHTS_BLOCK_INTERPRETER)


@requires_triton
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_triton_backward_row_slices_match_the_reference(metric, monkeypatch):
    """The row slices of a backward past the grid cap, run: with the cap at 2 row blocks of the
    interpreter's 16-row tiles, 70 x 45 rows take 3 and 2 slices a side; gradients (buffers
    poisoned) equal the reference's."""
    import torchfg.ops.pairwise.triton as tri

    monkeypatch.setattr(tri, "MAX_GRID_YZ", 2)
    real_empty = torch.empty
    monkeypatch.setattr(tri.torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                             else t)(real_empty(*a, **k)))
    g = torch.Generator().manual_seed(23)
    x, y = torch.randn(2, 70, 19, generator=g), torch.randn(2, 45, 19, generator=g)
    grad = torch.randn(2, 70, 45, generator=g)
    out = pairwise_distance_reference(x, y, metric)
    gx, gy = tri.pairwise_distance_backward_triton(grad, x, y, out, metric)
    ex, ey = pairwise_distance_backward_reference(grad.double(), x.double(), y.double(), out.double(), metric)
    torch.testing.assert_close(gx.double(), ex, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gy.double(), ey, atol=1e-4, rtol=1e-4)


@requires_triton
def test_triton_symmetric_cosine_zero_row_and_near_duplicate_gradients():
    """Symmetric cosine: a zero row is at distance 1 from everything, itself included (the Triton
    diagonal wrote 0 for it). Euclidean backward: rows whose fast-form distance clamps to 0 but
    differ (norm 1000, 1e-4 apart) get the documented zero gradient, not g (x - y) / 0-ish."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(20, 8, generator=g)
    x[3] = 0.0
    out = pairwise_distance(x, metric="cosine", backend="triton")
    assert out[3, 3] == 1.0
    torch.testing.assert_close(out, pairwise_distance_reference(x.unsqueeze(0), x.unsqueeze(0), "cosine", True)[0])
    rows = torch.tensor([[1000.0, 0.0], [1000.0001, 0.0], [3.0, 4.0]], requires_grad=True)
    dist = pairwise_distance(rows, metric="euclidean", backend="triton")
    assert dist[0, 1] == 0.0  # the fast form rounds the pair to 0
    (grad,) = torch.autograd.grad(dist[0, 1], rows)
    assert torch.equal(grad, torch.zeros_like(grad))
