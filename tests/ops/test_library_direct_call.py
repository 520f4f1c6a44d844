"""The Autograd kernel of torchfg's ops (torchfg/ops/_library.py) calls the op's own kernel directly
where a redispatch would reach nothing else (plain CPU or CUDA tensors, no dispatch mode), and
redispatches otherwise: a dispatch mode, fake or meta tensors, functionalization must still see
the op below Autograd."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchfg.ops import _library
from torchfg.ops.hardest_triplet_loss import hardest_triplet_loss

DK, KS = torch._C.DispatchKey, torch._C.DispatchKeySet


@pytest.fixture
def redispatches(monkeypatch):
    """The keysets torchfg ops were redispatched with."""
    calls: list[str] = []
    real = torch._ops.OpOverload.redispatch

    def spy(self, keyset, *args, **kwargs):
        if self.namespace == "torchfg":
            calls.append(str(keyset))
        return real(self, keyset, *args, **kwargs)

    monkeypatch.setattr(torch._ops.OpOverload, "redispatch", spy)
    return calls


class _Seen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torchfg":
            self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


def _step(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    loss = hardest_triplet_loss(x, x, labels, labels, exclude_self=True, base_margin=0.5, backend="torch")
    loss.backward()
    return loss.detach(), x.grad


def test_plain_tensors_reach_the_kernel_without_a_redispatch(redispatches):
    gen = torch.Generator().manual_seed(5)
    x, labels = torch.randn(12, 6, generator=gen), torch.arange(12) // 3
    direct = _step(x, labels)
    with torch.no_grad():
        no_grad = hardest_triplet_loss(x, x, labels, labels, exclude_self=True, base_margin=0.5, backend="torch")
    assert redispatches == []
    with _Seen() as mode:  # the redispatch path: same loss and gradient
        through_mode = _step(x, labels)
    assert mode.ops == ["hardest_triplet_loss", "hardest_triplet_loss_backward"]
    assert redispatches == ["DispatchKeySet(CPU, Python)"] * 2
    torch.testing.assert_close(direct, through_mode, rtol=0, atol=0)
    torch.testing.assert_close(no_grad, direct[0], rtol=0, atol=0)


def test_meta_tensors_still_reach_the_fake_kernel(redispatches):
    x = torch.empty(12, 6, device="meta", requires_grad=True)
    labels = torch.empty(12, dtype=torch.int64, device="meta")
    loss = hardest_triplet_loss(x, x, labels, labels, exclude_self=True, backend="torch")
    assert loss.device.type == "meta" and loss.shape == ()
    assert redispatches == ["DispatchKeySet(Meta)"]


def test_only_a_lone_cpu_or_cuda_key_is_called_directly():
    direct = [KS(DK.CPU), KS(DK.CUDA), KS(DK.CPU) | KS(DK.ADInplaceOrView), KS(DK.CUDA) | KS(DK.ADInplaceOrView)]
    redispatched = [
        KS(DK.CPU) | KS(DK.Python), KS(DK.CUDA) | KS(DK.Python), KS(DK.Meta), KS(DK.CPU) | KS(DK.Functionalize),
        KS(DK.CPU) | KS(DK.CUDA), KS(DK.CPU) | KS(DK.Conjugate), KS(DK.CPU) | KS(DK.FuncTorchDynamicLayerBackMode),
        KS(DK.PrivateUse1),
    ]
    assert all(_library._reaches_kernel_directly(keyset) for keyset in direct)
    assert not any(_library._reaches_kernel_directly(keyset) for keyset in redispatched)
