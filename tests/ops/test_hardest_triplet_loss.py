"""torchfg.ops.hardest_triplet_loss: the fused Triton forward/backward against the reference.

The Triton kernels run under the interpreter here (small tiles: 8 anchors per program, 16 columns
per step, 32 candidates per mining split), on fresh random inputs of odd sizes; every buffer the
kernels write is allocated poisoned, so an element they leave unwritten shows up as a mismatch.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from brute_force import exact_distances
from conftest import TEST_DEVICE, requires_gpu_nan_semantics, requires_triton
from torchfg.ops.hardest_triplet_loss import REDUCTIONS, _hardest_triplet_loss_op, hardest_triplet_loss
from torchfg.ops.metric import METRICS

TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
             # one bf16 rounding of the gradient (the interpreter truncates, a GPU rounds to nearest)
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty / empty_like return NaN-filled floats and -7-filled integers."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture
def small_splits(monkeypatch):
    """32 candidates per mining split on a GPU too, as the interpreter's tiles have: the sizes below
    then merge several splits' bests on both (a GPU's default splits are 512 candidates or more)."""
    import torchfg.ops.triplet.triton as mining

    monkeypatch.setattr(mining, "_default_candidates_per_split", lambda n, m, device: 32)


def _problem(n, m, d, dtype, *, seed, classes=5, text=0, separate=False, int32=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    y = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype) if separate else None
    y_labels = torch.randint(0, classes, (m,), generator=g) if separate else labels
    if int32:
        labels = labels.int()
        y_labels = y_labels.int() if separate else labels
    t = torch.randn(n, text, generator=g) if text else None
    yt = (torch.randn(m, text, generator=g) if separate else t) if text else None
    # On the test device: on a GPU machine the triton backend takes CUDA tensors only.
    return tuple(None if v is None else v.to(TEST_DEVICE) for v in (x, labels, y, y_labels, t, yt))


def _run(backend, x, labels, y, y_labels, t, yt, *, grad_seed=0, candidate_grad=True, **kwargs):
    """(loss, dL/dx, dL/dy or None) for a fresh random upstream gradient."""
    xx = x.clone().requires_grad_()
    yy = None if y is None else y.clone().requires_grad_(candidate_grad)
    loss = hardest_triplet_loss(xx, xx if yy is None else yy, labels, y_labels, t, yt, backend=backend, **kwargs)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=loss.dtype)
    upstream = upstream.to(loss.device)
    loss.backward(upstream)
    return loss.detach(), xx.grad, None if yy is None else yy.grad


def _assert_same(expected, actual, dtype):
    for e, a in zip(expected, actual):
        if e is None or a is None:
            assert e is None and a is None
            continue
        torch.testing.assert_close(a.double(), e.double(), **TOLERANCE[dtype])


CASES = list(itertools.product(METRICS, REDUCTIONS))


@requires_triton
@pytest.mark.parametrize("metric,reduction", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_hard_matches_reference(metric, reduction, dtype, poisoned, small_splits):
    # 41 anchors: 6 programs, the last one partial; 41 candidates: two mining splits to merge.
    problem = _problem(41, 41, 21, dtype, seed=hash((metric, reduction)) % 1000)
    kwargs = dict(metric=metric, base_margin=0.3, exclude_self=True, reduction=reduction, smooth=reduction == "sum")
    _assert_same(_run("torch", *problem, **kwargs), _run("triton", *problem, **kwargs), dtype)


@requires_triton
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_adaptive_margins_match_reference(metric, threshold, poisoned):
    problem = _problem(29, 29, 19, torch.float32, seed=3, text=11)
    kwargs = dict(metric=metric, base_margin=0.1, margin_scale=0.7, text_positive_threshold=threshold,
                  exclude_self=True, reduction="mean")
    _assert_same(_run("torch", *problem, **kwargs), _run("triton", *problem, **kwargs), torch.float32)


@requires_triton
@pytest.mark.parametrize("kind,dtype,metric,n,int32", [
    *(("batch_hard", torch.bfloat16, metric, 41, True) for metric in METRICS),
    ("batch_hard", torch.float32, "euclidean", 7, False),
    ("batch_hard", torch.float32, "cosine", 41, False),
    ("atl", torch.float32, "euclidean", 41, False),
    ("atl", torch.float32, "dot", 7, True),
])
def test_symmetric_mining_matches_reference(kind, dtype, metric, n, int32, poisoned, monkeypatch):
    # The symmetric mining kernel (one tile per pair of row blocks, packed bests) under the loss:
    # every metric, both label widths (int64 takes the wide pass), one and several row blocks.
    import torchfg.ops.triplet.triton as mining

    launches = []
    launch = mining._launch_symmetric
    monkeypatch.setattr(mining, "_launch_symmetric", lambda *a, **k: launches.append(1) or launch(*a, **k))
    monkeypatch.setenv("TORCHFG_SYMMETRIC_MINING", "1")
    problem = _problem(n, n, 21, dtype, seed=n + len(metric), int32=int32, text=9 if kind == "atl" else 0)
    kwargs = dict(metric=metric, base_margin=0.3, exclude_self=True, reduction="mean")
    if kind == "atl":
        kwargs.update(margin_scale=0.7, text_positive_threshold=0.2)
    _assert_same(_run("torch", *problem, **kwargs), _run("triton", *problem, **kwargs), dtype)
    assert launches == [1]


@requires_triton
@pytest.mark.parametrize("exclude_self,offset", [(False, 0), (True, 4), (True, 40)])
@pytest.mark.parametrize("candidate_grad", [True, False])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_separate_candidates(exclude_self, offset, candidate_grad, metric, poisoned, small_splits):
    # A memory-like candidate set of 45 rows (two splits), with or without its own gradient;
    # with exclude_self, anchor i is candidate (offset + i) % 45 (from 40: a batch that wraps
    # around the end of a ring memory).
    x, labels, y, y_labels, t, yt = _problem(13, 45, 17, torch.float32, seed=5, separate=True, text=6)
    if exclude_self:
        slots = (offset + torch.arange(13, device=TEST_DEVICE)) % 45
        y[slots] = x
        y_labels[slots] = labels
    kwargs = dict(metric=metric, base_margin=0.2, margin_scale=0.5, exclude_self=exclude_self, anchor_offset=offset,
                  reduction="mean", candidate_grad=candidate_grad)
    expected = _run("torch", x, labels, y, y_labels, t, yt, **kwargs)
    actual = _run("triton", x, labels, y, y_labels, t, yt, **kwargs)
    _assert_same(expected, actual, torch.float32)
    assert (actual[2] is None) == (not candidate_grad)


def _rows_of_a_batch(backend, c, labels, t, start, n, *, view, **kwargs):
    """(loss, dL/dc, dL/d anchors or None, Triton launches) for the anchors c[start:start + n]:
    ``view`` a slice of ``c`` itself passed with anchors_in_candidates, else a leaf with c's rows."""
    from torchfg.bench.profile import profile_step

    cc = c.clone().requires_grad_()
    anchors = cc[start:start + n] if view else c[start:start + n].clone().requires_grad_()
    text = None if t is None else (t[start:start + n], t)
    out = {}

    def step():
        loss = hardest_triplet_loss(anchors, cc, labels[start:start + n], labels, *(text or (None, None)),
                                    exclude_self=True, anchor_offset=start, anchors_in_candidates=view,
                                    backend=backend, **kwargs)
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=loss.dtype)
        loss.backward(upstream.to(loss.device))
        out["loss"] = loss.detach()

    launches = profile_step(step).triton
    return out["loss"], cc.grad, None if view else anchors.grad, launches


@requires_triton
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("text", [0, 6])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_anchors_in_candidates_take_one_backward_launch(metric, text, reduction, poisoned, small_splits):
    # The cross_rank losses' anchors: rows [9, 26) of a 37-row batch (two mining splits), a view of
    # it. The op takes them as one tensor: one row-statistics pass (the text's too), and one
    # backward launch writing the batch's gradient (the anchor rows' own terms and every partner
    # term), where separate tensors take two and autograd then sums them into the batch's rows.
    c, labels, *_, t, _ = _problem(37, 37, 19, torch.float32, seed=21, text=text)
    kwargs = dict(metric=metric, base_margin=0.2, margin_scale=0.6 if text else 0.0, reduction=reduction)
    loss, grad, none, launches = _rows_of_a_batch("triton", c, labels, t, 9, 17, view=True, **kwargs)
    assert none is None
    assert launches["_hardest_triplet_bwd_kernel"] == 1 and launches["_row_stat_kernel"] <= 1, launches
    # The reference: separate leaves (the anchors' rows and the batch), their gradients summed here.
    ref_loss, ref_grad, ref_anchor_grad, _ = _rows_of_a_batch("torch", c, labels, t, 9, 17, view=False, **kwargs)
    ref_grad[9:26] += ref_anchor_grad
    _assert_same((ref_loss, ref_grad), (loss, grad), torch.float32)
    assert grad[9:26].abs().sum() > 0 and grad[:9].abs().sum() > 0  # anchor and partner terms both arrived
    # The reference backend's one-tensor mode: the same gradient.
    _assert_same((ref_loss, ref_grad), _rows_of_a_batch("torch", c, labels, t, 9, 17, view=True, **kwargs)[:2],
                 torch.float32)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _not_that_slice(case: str, c: torch.Tensor) -> torch.Tensor:
    if case == "made under no_grad":
        with torch.no_grad():
            return c[5:17]
    if case in ("hook", "retain_grad"):
        anchors = c[5:17]
        anchors.register_hook(lambda g: 2 * g) if case == "hook" else anchors.retain_grad()
        return anchors
    return {"detached slice": lambda: c.detach()[5:17], "other offset": lambda: c[6:18],
            "copy": lambda: c[5:17].clone(), "through a Function": lambda: _ReverseGradient.apply(c)[5:17],
            "slice of a slice": lambda: c[1:20][4:16]}.get(case, lambda: c[5:17])()


@pytest.mark.parametrize("case", ["detached slice", "other offset", "copy", "no exclude_self", "made under no_grad",
                                  "through a Function", "slice of a slice", "hook", "retain_grad"])
def test_anchors_in_candidates_refuses_anchors_that_are_not_that_slice(case):
    # Whatever autograd would do with the anchors' own path (a Function, a hook) the candidates'
    # gradient would bypass: refused, as are other rows and other memory.
    c = torch.randn(23, 11, device=TEST_DEVICE, requires_grad=True)
    labels = torch.arange(23, device=TEST_DEVICE) // 3
    kwargs = dict(exclude_self=case != "no exclude_self", anchor_offset=5, anchors_in_candidates=True, backend="torch")
    with pytest.raises(ValueError, match="anchors_in_candidates"):
        hardest_triplet_loss(_not_that_slice(case, c), c, labels[5:17], labels, **kwargs)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_anchors_in_candidates_without_a_gradient(mode):
    # No view tracking under inference mode (a cross_rank validation loss): the memory decides.
    c = torch.randn(23, 11, device=TEST_DEVICE)
    labels = torch.arange(23, device=TEST_DEVICE) // 3
    with getattr(torch, mode)():
        cc = c.clone()
        loss = hardest_triplet_loss(cc[5:17], cc, labels[5:17], labels, exclude_self=True, anchor_offset=5,
                                    anchors_in_candidates=True, backend="torch")
        with pytest.raises(ValueError, match="anchors_in_candidates"):
            hardest_triplet_loss(cc[5:17].clone(), cc, labels[5:17], labels, exclude_self=True, anchor_offset=5,
                                 anchors_in_candidates=True, backend="torch")
    expected = hardest_triplet_loss(c[5:17], c, labels[5:17], labels, exclude_self=True, anchor_offset=5,
                                    backend="torch")
    torch.testing.assert_close(loss, expected)


@requires_triton
def test_a_view_of_the_candidates_keeps_its_own_autograd_path_without_anchors_in_candidates(poisoned):
    # A hook on the anchors (or a gradient-reversal Function between them and the batch) is the
    # user's: without the opt-in the two tensors stay apart and the hook sees the anchors' gradient.
    c, labels, *_ = _problem(23, 23, 11, torch.float32, seed=4)
    grads = {}
    for backend in ("torch", "triton"):
        cc = c.clone().requires_grad_()
        anchors = cc[5:17]
        anchors.register_hook(lambda g: -g)
        hardest_triplet_loss(anchors, cc, labels[5:17], labels, exclude_self=True, anchor_offset=5, reduction="sum",
                             backend=backend).backward()
        grads[backend] = cc.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], **TOLERANCE[torch.float32])


@requires_triton
def test_no_anchors_against_candidates_that_need_a_gradient(poisoned):
    # Cosine with no anchor (a cross_rank rank without rows mines nothing): the mining took no
    # candidate statistics, and the backward read them (a segmentation fault under the interpreter).
    c = torch.randn(40, 8, device=TEST_DEVICE, requires_grad=True)
    labels = torch.arange(40, device=TEST_DEVICE) % 3
    none = torch.zeros(0, 8, device=TEST_DEVICE, requires_grad=True)
    loss = hardest_triplet_loss(none, c, labels[:0], labels, metric="cosine", reduction="sum", backend="triton")
    loss.backward()
    assert loss.item() == 0 and torch.equal(c.grad, torch.zeros_like(c)) and none.grad.shape == (0, 8)
    # The op itself, no anchors among the candidates' rows: the one gradient is zero too.
    cc = c.detach().clone().requires_grad_()
    torch.ops.torchfg.hardest_triplet_loss(cc, None, labels[:0], labels, None, None, "euclidean", 0.2, 0.0, None, 2, 2,
                                           False, "sum", True, "triton")[0].backward()
    assert torch.equal(cc.grad, torch.zeros_like(cc))


@requires_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("self_offset,n", [(4, 6), (-1, 6), (2, 6), (4, 0)])
def test_opcheck_of_anchors_given_as_rows_of_the_candidates(backend, self_offset, n):
    # The op's own contract for candidates=None with anchor_start > 0 (anchors_in_candidates), also
    # where the excluded self rows are not the anchors' (the public function never passes that),
    # and with no anchors (no cosine statistics: the fake kernel said M of them).
    c, labels, *_, t, _ = _problem(13, 13, 7, torch.float32, seed=8, text=3)
    args = (c.clone().requires_grad_(), None, labels[4:4 + n], labels, t[4:4 + n], t, "cosine", 0.2, 0.5, None,
            self_offset, 4, False, "mean", backend == "triton", backend)
    torch.library.opcheck(torch.ops.torchfg.hardest_triplet_loss.default, args)


@requires_triton
@pytest.mark.parametrize("n", [1, 7, 16, 33])
@pytest.mark.parametrize("int32", [False, True])
def test_sizes_splits_and_label_widths(n, int32, poisoned, small_splits):
    # 1 to 33 anchors: one partial program up to five; up to 32 candidates a single mining split
    # (no merge in the forward), 33 two. int64 labels take the mining's second (wide) pass.
    problem = _problem(n, n, 35, torch.float32, seed=n, classes=3, int32=int32)
    kwargs = dict(metric="euclidean", base_margin=0.25, exclude_self=True, reduction="mean")
    _assert_same(_run("torch", *problem, **kwargs), _run("triton", *problem, **kwargs), torch.float32)


@requires_triton
def test_internal_outputs_match_reference(poisoned):
    # pairs, per-anchor terms (d_ap, d_an, slope) and the count, including anchors without a
    # triplet (a singleton label: no positive) and ties (duplicated rows).
    x, labels, *_ = _problem(23, 23, 9, torch.float32, seed=9, classes=4)
    labels[0] = 99
    x[5] = x[6]
    labels[5] = labels[6]
    for reduction in REDUCTIONS:
        args = (x, None, labels, labels, None, None, "euclidean", 0.5, 0.0, None, 0, 0, False, reduction)
        reference = _hardest_triplet_loss_op(*args, False, "torch")
        fused = _hardest_triplet_loss_op(*args, True, "triton")
        for r, f in zip(reference[:4], fused[:4]):
            torch.testing.assert_close(f, r)
        assert reference[1][0, 0] == -1 and reference[2][0].eq(0).all()
        # links: [ticket, heads (23 x 4 stripes), next (46)]; the ticket ends at programs - 1 (it starts at -1).
        from torchfg.ops.hardest_triplet_loss.triton import _blocks

        programs = -(-23 // _blocks(9, torch.float32)[0])  # 8-row programs interpreted, 16 on a GPU
        assert fused[4].shape == (1 + 23 * 4 + 46,) and fused[4][0] == programs - 1


@requires_triton
def test_duplicate_rows_have_zero_gradient_not_nan(poisoned):
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 5.0], [5.0, 5.5]], device=TEST_DEVICE)
    labels = torch.tensor([0, 0, 1, 1], device=TEST_DEVICE)
    loss, grad, _ = _run("triton", x, labels, None, labels, None, None, metric="euclidean", exclude_self=True,
                         base_margin=1.0)
    expected = _run("torch", x, labels, None, labels, None, None, metric="euclidean", exclude_self=True, base_margin=1.0)
    assert torch.isfinite(grad).all()
    _assert_same(expected, (loss, grad, None), torch.float32)


@requires_triton
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_triplet_gives_zero_loss_and_gradient(reduction, poisoned):
    x = torch.randn(6, 4, device=TEST_DEVICE)
    labels = torch.arange(6, device=TEST_DEVICE)  # every label once: no positive anywhere
    loss, grad, _ = _run("triton", x, labels, None, labels, None, None, exclude_self=True, reduction=reduction)
    assert loss.eq(0).all() and grad.eq(0).all()
    loss, grad, _ = _run("triton", x[:0], labels[:0], None, labels[:0], None, None, exclude_self=True, reduction=reduction)
    assert loss.eq(0).all() and grad.shape == (0, 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_candidate_set_gives_zero_loss(backend):
    """No candidates (an empty reference set or memory): no anchor has a pair, the loss is 0 and
    the anchors' gradient is 0, on both backends."""
    if backend == "triton":
        pytest.importorskip("triton")
    x = torch.randn(4, 3, device=TEST_DEVICE, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1], device=TEST_DEVICE)
    empty, empty_labels = torch.empty(0, 3, device=TEST_DEVICE), torch.empty(0, dtype=torch.int64, device=TEST_DEVICE)
    loss = hardest_triplet_loss(x, empty, labels, empty_labels, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0 and grad.eq(0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck_with_undefined_output_gradients(backend):
    """gradcheck's default check_undefined_grad: the backward gets None for the loss's gradient
    (only the op's non-differentiable outputs had one) and must return no gradient, not fail."""
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=TEST_DEVICE)
    assert torch.autograd.gradcheck(
        lambda v: hardest_triplet_loss(v, v, labels, labels, exclude_self=True, backend=backend), (x,)
    )


@requires_triton
def test_fp64_matches_brute_force(poisoned):
    # A brute-force batch-hard loss from the full distance matrix, in fp64.
    x, labels, *_ = _problem(19, 19, 7, torch.float64, seed=11, classes=3)
    dist = exact_distances(x, x, "euclidean")
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(19, dtype=torch.bool, device=x.device)
    hardest_pos = dist.masked_fill(~same | eye, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    expected = torch.relu(hardest_pos - hardest_neg + 0.4).mean()
    loss, _, _ = _run("triton", x, labels, None, labels, None, None, metric="euclidean", exclude_self=True,
                      base_margin=0.4)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@requires_triton
def test_margins_reach_the_kernel_at_fp64_precision():
    # A compiled kernel takes a Python float as fp32; the interpreter keeps fp64, so the fp64 test
    # above passes here either way: the (hi, lo) split itself is what this checks.
    import struct

    from torchfg.ops._triton_utils import split_scalar

    def is_fp32(v):
        return struct.unpack("f", struct.pack("f", v))[0] == v

    def fp32(v):
        return struct.unpack("f", struct.pack("f", v))[0]

    ulp = 2.0**-27  # fp32's last place at 0.1
    # The last two: lo rounds to exactly half of hi's last place, with hi's last bit odd and even.
    tie_odd = fp32(0.1) + ulp / 2 * (1 - 2.0**-26)
    tie_even = fp32(0.1) - ulp + ulp / 2 * (1 - 2.0**-26)
    for value in (0.4, 0.1, -1e-3, 123.456, 1e-30, 0.0, 2.0**-140, tie_odd, -tie_odd, tie_even):
        hi, lo = split_scalar(value)
        assert is_fp32(hi) and is_fp32(lo)
        assert abs(hi + lo - value) <= 2.0**-46 * abs(value), value
        assert fp32(hi + lo) == hi == fp32(value), value  # in an fp32 kernel: the plain float's value
    assert split_scalar(float("inf")) == (float("inf"), 0.0)
    assert split_scalar(-1e300) == (float("-inf"), 0.0)  # past fp32: inf in the kernel, as before


@requires_triton
def test_deterministic_mode_sorts_instead_of_linking(poisoned):
    problem = _problem(37, 37, 13, torch.float32, seed=13)
    kwargs = dict(metric="sqeuclidean", base_margin=0.3, exclude_self=True, reduction="mean")
    expected = _run("triton", *problem, **kwargs)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x, labels = problem[0].clone().requires_grad_(), problem[1]
        outputs = _hardest_triplet_loss_op(x, None, labels, labels, None, None, "sqeuclidean", 0.3, 0.0, None, 0,
                                           0, False, "mean", False, "triton")
        assert outputs[4].numel() == 0  # no partner lists
        actual = _run("triton", *problem, **kwargs)
    finally:
        torch.use_deterministic_algorithms(previous)
    _assert_same(expected, actual, torch.float32)


@requires_triton
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_deterministic_backward_leaves_unpaired_anchors_out_of_the_partner_rows(separate, metric, poisoned,
                                                                                monkeypatch):
    # 40 classes over 43 anchors: most anchors have no positive, so their pairs are -1. They add
    # nothing to any gradient; clamped to row 0 they were all listed under row 0, whose program
    # then walked them one by one (a serial tail on a GPU).
    import torchfg.ops.pair_distances.triton as pair_triton

    x, labels, y, y_labels, _, _ = _problem(43, 29, 11, torch.float32, seed=21, classes=40, separate=separate)
    kwargs = dict(metric=metric, base_margin=0.3, exclude_self=not separate, reduction="mean")
    upstream = torch.tensor(1.7)

    def run(backend):
        # Each operand is a view whose storage holds a NaN row just before it: a kernel that read
        # "row -1" for a pair without a partner would put NaN into the gradient.
        leaves = [torch.cat([torch.full_like(v[:1], float("nan")), v]).requires_grad_()
                  for v in ((x,) if y is None else (x, y))]
        xx, yy = leaves[0][1:], (leaves[0][1:] if y is None else leaves[1][1:])
        loss = hardest_triplet_loss(xx, yy, labels, y_labels, backend=backend, **kwargs)
        loss.backward(upstream)
        return [loss.detach()] + [leaf.grad[1:] for leaf in leaves]

    expected = run("torch")
    listed = []
    csr = pair_triton._csr_by_partner

    def recording_csr(y_idx, rows):
        order, ends, counts = csr(y_idx, rows)
        listed.append(counts.clone())
        return order, ends, counts

    monkeypatch.setattr(pair_triton, "_csr_by_partner", recording_csr)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        actual = run("triton")
        pairs = _hardest_triplet_loss_op(x, y, labels, y_labels, None, None, metric, 0.3, 0.0, None,
                                         0 if y is None else -1, 0, False, "mean", False, "triton")[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float32])
    assert (pairs < 0).sum() >= 10  # the case this test is about
    assert len(listed) == 1
    assert torch.equal(listed[0].cpu(), torch.bincount(pairs[pairs >= 0].cpu(), minlength=listed[0].numel()))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=requires_triton), "torch"])
@pytest.mark.parametrize("metric, margin", [("sqeuclidean", 3.0), ("euclidean", 1.0)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_hinge_slope_is_zero_at_a_violation_of_exactly_zero(backend, metric, margin, deterministic):
    """relu's derivative at 0 is 0 in PyTorch (threshold_backward): an anchor whose violation is
    exactly 0 adds no gradient. Points on a line at integers give exact distances: anchor 0 has
    d(a, p) = 1 and d(a, n) = 4 (sq) or 2, so the margin makes its violation 0; anchor 1's is the
    margin (> 0); anchor 2 has no positive."""
    x = torch.tensor([[0.0], [1.0], [2.0]], device=TEST_DEVICE).requires_grad_()
    labels = torch.tensor([0, 0, 1], device=TEST_DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        loss = hardest_triplet_loss(x, x, labels, labels, metric=metric, base_margin=margin, exclude_self=True,
                                    reduction="sum", backend=backend)
        (grad,) = torch.autograd.grad(loss, x)
    finally:
        torch.use_deterministic_algorithms(previous)
    # Only anchor 1 (p = x0, n = x2, both at distance 1) contributes, d(x1, x0) - d(x1, x2): its
    # derivative is (-1, 2, -1) for Euclidean, twice that for squared Euclidean.
    expected = torch.tensor([[-1.0], [2.0], [-1.0]]) * (2.0 if metric == "sqeuclidean" else 1.0)
    torch.testing.assert_close(loss.detach().cpu(), torch.tensor(margin))
    torch.testing.assert_close(grad.cpu(), expected)


def test_bad_arguments_name_themselves():
    x = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="reduction"):
        hardest_triplet_loss(x, x, labels, labels, reduction="avg")
    with pytest.raises(ValueError, match="anchor_labels"):
        hardest_triplet_loss(x, x, labels[:3], labels)
    with pytest.raises(ValueError, match="margin_scale"):
        hardest_triplet_loss(x, x, labels, labels, margin_scale=-1.0)
    with pytest.raises(TypeError, match="smooth"):
        hardest_triplet_loss(x, x, labels, labels, smooth="yes")
    with pytest.raises(ValueError, match="anchor_text and candidate_text"):
        hardest_triplet_loss(x, x, labels, labels, torch.randn(4, 2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.filterwarnings("error:.*custom operator.*:UserWarning")  # outputs must not alias
def test_torch_compile_fullgraph(backend):
    x, labels, _, _, text, _ = _problem(21, 21, 8, torch.float32, seed=17, text=5)

    def step(x, labels, text):
        return hardest_triplet_loss(x, x, labels, labels, text, text, margin_scale=0.5, exclude_self=True,
                                    backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = compiled(x1, labels, text)
    out.backward()
    expected = step(x2, labels, text)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x1.grad, x2.grad)


@requires_triton
@pytest.mark.parametrize("separate", [False, True])
def test_hub_rows_on_several_stripes(poisoned, separate):
    # A row that most anchors pick as their hardest negative (a hub): its pairs spread over the
    # partner-list stripes (anchor index % LINK_STRIPES), several entries per stripe, next to rows
    # of one pair or none in the same block; its gradient sums them all.
    from torchfg.ops.hardest_triplet_loss import LINK_STRIPES

    x, labels, y, y_labels, *_ = _problem(41, 29, 24, torch.float32, seed=21, classes=6, separate=separate)
    x = x / x.norm(dim=1, keepdim=True)
    y = None if y is None else y / y.norm(dim=1, keepdim=True)
    hub_of = y if separate else x
    hub_labels = y_labels if separate else labels
    # Unit rows in 24 dimensions are about sqrt(2) apart: the origin, at 1, is every anchor's
    # nearest negative but a few.
    hub_of[3] = 0.0
    hub_labels[3] = 99
    kwargs = dict(metric="euclidean", base_margin=3.0, exclude_self=not separate, reduction="sum")
    expected = _run("torch", x, labels, y, y_labels, None, None, **kwargs)
    actual = _run("triton", x, labels, y, y_labels, None, None, **kwargs)
    _assert_same(expected, actual, torch.float32)
    pairs = _hardest_triplet_loss_op(x, y, labels, y_labels, None, None, "euclidean", 3.0, 0.0, None,
                                     0 if not separate else -1, 0, False, "sum", False, "torch")[1]
    hub_anchors = torch.nonzero(pairs[:, 1] == 3).flatten()
    assert len(hub_anchors) >= 3 * LINK_STRIPES  # several pairs on every stripe of the hub
    assert set((hub_anchors % LINK_STRIPES).tolist()) == set(range(LINK_STRIPES))


@requires_triton
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("separate", [False, True])
def test_non_finite_anchor_gives_nan_loss_like_the_reference(metric, bad, separate, poisoned, small_splits):
    """A diverged embedding must show in the loss. Its keys are NaN: the reference's argmax picks
    them, the kernel's strict comparisons never do, so without the anchor check the row dropped
    out and the loss stayed finite (cosine and dot)."""
    x, labels, y, y_labels, t, yt = _problem(23, 29, 20, torch.float32, seed=5, separate=separate)
    x[7, 3] = bad
    for reduction in ("mean", "sum"):
        expected = _run("torch", x, labels, y, y_labels, t, yt, metric=metric, reduction=reduction)[0]
        actual = _run("triton", x, labels, y, y_labels, t, yt, metric=metric, reduction=reduction)[0]
        # NaN, or inf where a dot product is inf on both backends.
        assert not expected.isfinite() and not actual.isfinite(), (reduction, expected, actual)
        assert expected.isnan() == actual.isnan()
    losses = _run("triton", x, labels, y, y_labels, t, yt, metric=metric, reduction="none")[0]
    assert not losses[7].isfinite()
    if separate:
        # Against separate candidates the other anchors' terms do not depend on row 7 at all.
        keep = torch.arange(23, device=x.device) != 7
        clean = _run("triton", x[keep], labels[keep], y, y_labels, t, yt, metric=metric, reduction="none")[0]
        torch.testing.assert_close(losses[keep], clean, rtol=2e-5, atol=2e-5)


@requires_triton
@requires_gpu_nan_semantics
@pytest.mark.parametrize("metric", METRICS)
def test_nan_candidate_is_never_chosen(metric, poisoned, small_splits):
    """docs/concepts/numerics.md: a NaN row that is only a candidate is never chosen by the kernel,
    so every anchor's term is the one it has against the candidates without that row. The
    (sq)euclidean key's clamp at 0 used maxnum, which turned the NaN key into 0: the NaN row was
    every anchor's nearest negative. (An inf row is a legitimate pick: infinitely far.)"""
    x, labels, y, y_labels, _, _ = _problem(23, 29, 20, torch.float32, seed=7, separate=True)
    y[4, 5] = float("nan")
    keep = torch.arange(29, device=y.device) != 4
    kwargs = dict(metric=metric, reduction="none", exclude_self=False)
    losses = _run("triton", x, labels, y, y_labels, None, None, **kwargs)[0]
    clean = _run("triton", x, labels, y[keep], y_labels[keep], None, None, **kwargs)[0]
    torch.testing.assert_close(losses, clean, rtol=2e-5, atol=2e-5)
    assert losses.isfinite().all()


@requires_triton
@pytest.mark.parametrize("text_dtype", [torch.float32, torch.bfloat16])
def test_fp64_adaptive_margin_is_summed_in_the_text_dtype(text_dtype, poisoned):
    """fp64 embeddings, 16/32-bit text: the margin base + scale * (1 - cos) / 2 is summed in the
    text's accumulation dtype (fp32), as the reference and the mining kernel sum it. The fused
    forward summed an fp64 base with the fp32 term: 0.3 vs fp32(0.3), 1.2e-8 on every anchor.
    One-hot texts make every cosine exact (0 or 1), so the margins must agree exactly."""
    x, labels, _, _, _, _ = _problem(37, 37, 19, torch.float64, seed=9)
    g = torch.Generator().manual_seed(10)
    t = torch.nn.functional.one_hot(torch.randint(0, 6, (37,), generator=g), 6).to(TEST_DEVICE, text_dtype)
    kwargs = dict(metric="euclidean", base_margin=0.3, margin_scale=0.7, reduction="none")
    _assert_same(_run("torch", x, labels, None, labels, t, t, **kwargs),
                 _run("triton", x, labels, None, labels, t, t, **kwargs), torch.float64)


@requires_triton
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_non_finite_anchor_text_gives_nan_adaptive_loss_like_the_reference(metric, poisoned, small_splits):
    """The text sets the margin: a NaN description makes every negative key of its anchor NaN."""
    x, labels, y, y_labels, t, yt = _problem(23, 23, 20, torch.float32, seed=6, text=9)
    t = t.clone()
    t[5, 2] = float("nan")
    kwargs = dict(metric=metric, reduction="mean", margin_scale=0.5)
    expected = _run("torch", x, labels, y, y_labels, t, t, **kwargs)[0]
    actual = _run("triton", x, labels, y, y_labels, t, t, **kwargs)[0]
    assert expected.isnan() and actual.isnan(), (expected, actual)
    # Without the margin the text is not read: the loss stays finite on both.
    finite = dict(kwargs, margin_scale=0.0)
    torch.testing.assert_close(_run("triton", x, labels, y, y_labels, t, t, **finite)[0],
                               _run("torch", x, labels, y, y_labels, t, t, **finite)[0], rtol=2e-5, atol=2e-5)
