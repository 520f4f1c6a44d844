"""Under torch.autocast every public loss, miner and op gives what it gives outside it.

Autocast recasts matmuls to 16 bits: inside torchfg's PyTorch paths that either failed (bf16
operands into fp32 ``out=`` buffers) or silently dropped fp32 inputs to bf16 precision. The entry
points run with autocast off and take their inputs' dtypes as they are.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_DEVICE, backends_to_test
from torchfg import functional as TF
from torchfg import knn, pairwise_distance
from torchfg.heads import PrototypicalHead
from torchfg.losses import AdaptiveTripletLoss, CrossBatchMemory, DINOLoss, TripletMarginLoss
from torchfg.miners import BatchHardMiner, SemiHardMiner, TripletMarginMiner

DEVICE_TYPE = torch.device(TEST_DEVICE).type


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=gen).to(TEST_DEVICE, dtype)
    labels = (torch.arange(24) % 5).to(TEST_DEVICE)
    text = torch.randn(24, 7, generator=gen).to(TEST_DEVICE)
    return x, labels, text


def _calls(backend):
    return {
        "TripletMarginLoss batch_hard": lambda x, y, t: TripletMarginLoss(backend=backend)(x, y),
        "TripletMarginLoss semi_hard": lambda x, y, t: TripletMarginLoss(mining="semi_hard")(x, y),
        "TripletMarginLoss all": lambda x, y, t: TripletMarginLoss(mining="all")(x, y),
        "AdaptiveTripletLoss": lambda x, y, t: AdaptiveTripletLoss(backend=backend)(x, y, t),
        "CrossBatchMemory": lambda x, y, t: CrossBatchMemory(TripletMarginLoss(backend=backend), 16, 48)(x, y),
        "triplet_margin_loss cosine": lambda x, y, t: TF.triplet_margin_loss(x, y, metric="cosine", backend=backend),
        "BatchHardMiner": lambda x, y, t: BatchHardMiner(backend=backend)(x, y),
        "SemiHardMiner": lambda x, y, t: SemiHardMiner()(x, y),
        "TripletMarginMiner": lambda x, y, t: TripletMarginMiner(margin=0.5)(x, y),
        "mine_triplets": lambda x, y, t: TF.mine_triplets(x, y, backend=backend),
        "pairwise_distance": lambda x, y, t: pairwise_distance(x, x[:9], "euclidean", backend=backend),
        "knn": lambda x, y, t: knn(x, x[:9], k=3, backend=backend),
        "prototypical_logits": lambda x, y, t: TF.prototypical_logits(x[:10], y[:10], x[10:]),
        "PrototypicalHead": lambda x, y, t: PrototypicalHead()(x[:10], y[:10], x[10:]),
    }


def _grads_or_values(out, x):
    outs = out if isinstance(out, tuple) else (out,)
    values = [o.detach() for o in outs]
    if x.requires_grad and outs[0].is_floating_point() and outs[0].requires_grad:
        (grad,) = torch.autograd.grad(outs[0].sum(), x)
        values.append(grad)
    return values


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_inside_autocast_equal_those_outside(backend, dtype):
    for name, call in _calls(backend).items():
        x, labels, text = _inputs(dtype)
        x.requires_grad_()
        expected = _grads_or_values(call(x, labels, text), x)
        with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
            actual = _grads_or_values(call(x, labels, text), x)
        assert len(actual) == len(expected), name
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype, name
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", backends_to_test())
def test_dino_loss_under_autocast(backend):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(12, 40, generator=gen).to(TEST_DEVICE).requires_grad_()
    teacher = torch.randn(6, 40, generator=gen).to(TEST_DEVICE)
    results = []
    for enabled in (False, True):
        criterion = DINOLoss(40, 4, n_global_crops=2, backend=backend)
        with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16, enabled=enabled):
            loss = criterion(student, teacher, 0)
            (grad,) = torch.autograd.grad(loss, student)  # backward inside the region too
        results.append((loss.detach(), grad, criterion.center.clone()))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_compiled_loss_under_autocast_matches_eager():
    x, labels, _ = _inputs()
    criterion = TripletMarginLoss(backend="torch")
    compiled = torch.compile(criterion, backend="aot_eager", fullgraph=True)
    with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x, labels), criterion(x, labels), rtol=0, atol=0)
