"""torch.library.opcheck on every custom op in torch.ops.torchfg (schema, fake, autograd registration).

The op calls are captured from the PUBLIC functions (forward and backward) by a dispatch mode,
so every op is checked with the arguments the library really passes. The op list comes from
``torch.ops.torchfg``: a new op that no public call below reaches fails
``test_every_custom_op_is_checked``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchfg.ops.dino as dino_ops
import torchfg.ops.hardest_triplet_loss as hardest_loss_ops
import torchfg.ops.knn as knn_ops
import torchfg.ops.pair_distances as pair_ops
import torchfg.ops.pairwise as pairwise_ops
import torchfg.ops.triplet as triplet_ops

# Ops whose forward has an autograd formula: opcheck gets inputs that require grad.
DIFFERENTIABLE = {"pairwise_distance", "pair_distances", "anchor_pair_distances", "dino_loss", "hardest_triplet_loss"}


class _FirstCalls(TorchDispatchMode):
    """The first (args, kwargs) each torchfg::* op is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, tuple[torch._ops.OpOverload, tuple, dict]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "torchfg":
            name = func._schema.name.split("::")[1]
            keep = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
            self.calls.setdefault(name, (func, *keep))
        return func(*args, **kwargs)


def _public_calls() -> None:
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(7, 5, generator=gen, requires_grad=True)
    y = torch.randn(6, 5, generator=gen, requires_grad=True)
    pairwise_ops.pairwise_distance(x, y, "euclidean", backend="torch").sum().backward()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    triplet_ops.mine_hardest(x.detach(), x.detach(), labels, labels, backend="torch")
    triplet_ops.mine_semi_hard(x.detach(), x.detach(), labels, labels)
    triplet_ops.mine_all_triplets(labels, labels)
    idx_a, idx_b = torch.tensor([0, 1, 2, 6]), torch.tensor([1, 3, 0, 6])
    pair_ops.pair_distances(x, idx_a, idx_b).sum().backward()
    pair_ops.anchor_pair_distances(x, torch.tensor([[1, 2], [0, 2], [3, 1], [2, 1], [5, 4], [4, 5], [0, 3]]), backend="torch").sum().backward()
    knn_ops.knn(x.detach(), y.detach(), 3, metric="euclidean", backend="torch")
    text = torch.randn(7, 4, generator=gen)
    hardest_loss_ops.hardest_triplet_loss(
        x, x, labels, labels, text, text, margin_scale=0.5, exclude_self=True, backend="torch"
    ).backward()
    student = torch.randn(3 * 2, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(2 * 2, 9, generator=gen)
    dino_ops.dino_loss(
        student, teacher, torch.zeros(9), n_crops=3, n_global_crops=2, student_temp=0.1, teacher_temp=0.04,
        backend="torch",
    ).backward()


@pytest.fixture(scope="module")
def captured() -> dict:
    with _FirstCalls() as mode:
        _public_calls()
    return mode.calls


def _all_ops() -> list[str]:
    return sorted(n for n in dir(torch.ops.torchfg) if not n.startswith("_") and n != "name")


def test_every_custom_op_is_checked(captured):
    assert len(_all_ops()) >= 14  # pairwise, pair, anchor-pair, dino, hardest loss (each + backward), knn, 3 mining
    missing = set(_all_ops()) - set(captured)
    assert not missing, f"custom ops no public call in this file reaches (add one): {sorted(missing)}"


@pytest.mark.parametrize("name", _all_ops())
def test_opcheck(captured, name):
    if name not in captured:
        pytest.fail(f"torchfg::{name} was not reached by the public calls")
    func, args, kwargs = captured[name]
    if name in DIFFERENTIABLE:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(func, args, kwargs)


def test_autograd_kernel_passes_needs_input_grad_and_skips_the_graph_without_grad():
    # torchfg registers its own Autograd kernels (torchfg.ops._library): the user's backward must
    # see one needs_input_grad flag per op input, and a call without grad must build no graph.
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(5, 4)
    expected = torch.autograd.grad((torch.cdist(x, y).pow(2) * weights).sum(), (x, y))
    out = pairwise_ops.pairwise_distance(x, y, "sqeuclidean", backend="torch")
    actual = torch.autograd.grad((out * weights).sum(), (x, y))
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=1e-5)
    out = pairwise_ops.pairwise_distance(x, y.detach(), "sqeuclidean", backend="torch")
    (gx,) = torch.autograd.grad((out * weights).sum(), x)  # y needs no gradient: the backward is told so
    assert torch.allclose(gx, expected[0], atol=1e-5)
    with torch.no_grad():
        assert pairwise_ops.pairwise_distance(x, y, "sqeuclidean", backend="torch").grad_fn is None


def test_autograd_kernel_refuses_schemas_it_cannot_pass_through():
    from torchfg.ops._library import custom_op

    def with_default(x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return x * scale

    op = custom_op("torchfg::_test_op_with_default")(with_default)
    with pytest.raises(TypeError, match="default values"):
        op.register_autograd(lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


def test_host_grid_arithmetic_matches_triton():
    triton = pytest.importorskip("triton")
    from torchfg.ops._triton_utils import cdiv, next_power_of_2

    for n in [0, 1, 2, 3, 15, 16, 17, 1000, 4095, 4096, 4097, 2**31 - 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 16, 64, 127):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def _second_order_cases() -> dict:
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    text = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    return {
        "pairwise_distance": (x, lambda v: pairwise_ops.pairwise_distance(v, v.flip(0), "euclidean", backend="torch")),
        "pair_distances": (x, lambda v: pair_ops.pair_distances(v, torch.tensor([0, 1, 2]), torch.tensor([1, 3, 5]))),
        "anchor_pair_distances": (
            x, lambda v: pair_ops.anchor_pair_distances(v, torch.tensor([[1, 2]] * 7), backend="torch")
        ),
        "hardest_triplet_loss": (x, lambda v: hardest_loss_ops.hardest_triplet_loss(
            v, v, labels, labels, text, text, margin_scale=0.5, exclude_self=True, backend="torch")),
        "dino_loss": (torch.randn(6, 9, generator=gen, dtype=torch.float64), lambda v: dino_ops.dino_loss(
            v, teacher, torch.zeros(9, dtype=torch.float64), n_crops=3, n_global_crops=2, student_temp=0.1,
            teacher_temp=0.04, backend="torch")),
    }


@pytest.mark.parametrize("name", sorted(DIFFERENTIABLE))
def test_second_order_gradient_raises_instead_of_vanishing(name):
    """A backward op has no derivative: a gradient of a gradient (create_graph=True) must raise, naming
    the op, not come out as zero; the first-order gradient with create_graph=True is unchanged."""
    assert set(_second_order_cases()) == DIFFERENTIABLE
    inputs, function = _second_order_cases()[name]
    x = inputs.clone().requires_grad_()
    weights = torch.rand_like(function(x.detach()), dtype=torch.float64)
    (plain,) = torch.autograd.grad((function(x) * weights).sum(), x)
    (graphed,) = torch.autograd.grad((function(x) * weights).sum(), x, create_graph=True)
    torch.testing.assert_close(graphed.detach(), plain, rtol=0, atol=0)
    assert graphed.requires_grad
    with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
        torch.autograd.grad(graphed.square().sum(), x)


def test_ops_run_on_their_inputs_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device, whatever the pointers: an op given cuda:1 tensors
    while cuda:0 is current must switch devices for the call. Every op's registered kernel is the
    guard; the guard, on fake cuda tensors (no GPU here), enters cuda:1 and only then."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchfg.ops import _library

    guard_code = _library.on_input_device(lambda: None).__code__
    ops = [value for module in (dino_ops, hardest_loss_ops, knn_ops, pair_ops, pairwise_ops, triplet_ops)
           for value in vars(module).values() if isinstance(value, _library.TorchfgOp)]
    # Every op the package defines (tests may register ops of their own in the same library).
    package_ops = {name for name, kernel in _library._KERNELS.items() if kernel.__module__.startswith("torchfg.")}
    assert {op.qualname for op in ops} == package_ops, sorted(package_ops)
    assert all(op.impl.__code__ is guard_code for op in ops)

    entered, seen = [], []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    kernel = _library.on_input_device(lambda *args: seen.append(len(entered)) or "out")
    with FakeTensorMode():
        on_one, on_zero = torch.empty(3, device="cuda:1"), torch.empty(3, device="cuda:0")
    assert kernel(None, 2, on_one, on_zero) == "out" and entered == [torch.device("cuda:1")] and seen == [1]
    entered.clear()
    assert kernel(on_zero, on_one) == "out" and entered == []  # the first CUDA tensor decides
    assert kernel(torch.ones(2), 3.0) == "out" and entered == []
