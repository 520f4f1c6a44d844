"""Deployment and conversion paths: torch.export, torch.func.functional_call, meta-device
construction, inference-mode fitting. Each checks the converted module against eager."""

from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim, export
from torch.func import functional_call

from torchfg.heads import DINOHead, MultiLabelHead, PrototypicalHead
from torchfg.layers import SemanticChannelAttention, SemanticFusion
from torchfg.losses import DINOLoss


@pytest.mark.parametrize(
    "make",
    [
        lambda: SemanticChannelAttention(16, 3),
        lambda: SemanticFusion(16, 3, mode="mask"),
        lambda: MultiLabelHead(16, 4, pooling="semantic"),
    ],
    ids=["attention", "fusion_mask", "multilabel_semantic"],
)
def test_semantic_layers_export_non_strict_with_dynamic_spatial_dims(make):
    # Non-strict export (torch.export's default) hands real SymInts to the size checks; an
    # operator.index there fixed H and W to the example's (export error for a dynamic dim).
    torch.manual_seed(0)
    module = make().eval()
    batch, side = Dim("B", min=2, max=32), Dim("H", min=2, max=64)
    features, semantic = torch.randn(2, 16, 7, 7), torch.rand(2, 3, 28, 28)
    dynamic = ({0: batch, 2: side, 3: side}, {0: batch, 2: 4 * side, 3: 4 * side})
    program = export(module, (features, semantic), dynamic_shapes=dynamic, strict=False)
    features, semantic = torch.randn(3, 16, 9, 9), torch.rand(3, 3, 36, 36)
    torch.testing.assert_close(program.module()(features, semantic), module(features, semantic))


K = 16


def _dino_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4 * 3, K, generator=generator), torch.randn(2 * 3, K, generator=generator)


def test_dino_center_update_reaches_the_buffer_passed_to_functional_call():
    # As for BatchNorm's running stats: a stateless training loop owns the centre and sees it move.
    student, teacher = _dino_batch(1)
    criterion = DINOLoss(K, 4).train()
    reference = DINOLoss(K, 4).train()
    center = torch.zeros(K)
    loss = functional_call(criterion, {"center": center}, (student, teacher, 0))
    torch.testing.assert_close(loss, reference(student, teacher, 0))
    torch.testing.assert_close(center, reference.center)
    assert center.abs().sum() > 0
    assert criterion.center.abs().sum() == 0  # the module's own buffer is not the one passed


def test_dino_center_update_in_place_keeps_the_gradient():
    # The update now writes into the buffer: the loss must have kept its own copy for backward.
    student, teacher = _dino_batch(2)
    first = DINOLoss(K, 4).train()
    buffer = first.center
    student = student.double().requires_grad_()
    first.double()
    first(student, teacher.double(), 0).backward()
    grad = student.grad.clone()
    assert first.center is first._buffers["center"] and first.center.abs().sum() > 0
    assert buffer.data_ptr() == first.center.data_ptr() or first.center.dtype != buffer.dtype
    student.grad = None
    fresh = DINOLoss(K, 4).double()
    fresh.eval()(student, teacher.double(), 0).backward()  # no update: the centre the step used
    torch.testing.assert_close(grad, student.grad)


@pytest.mark.parametrize("strict", [False, True])
def test_exported_dino_training_step_updates_the_center(strict):
    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = DINOLoss(K, 4)

        def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
            return self.loss(student, teacher, 0)

    student, teacher = _dino_batch(3)
    program = export(Step().train(), (student, teacher), strict=strict).module()
    eager = Step().train()
    for seed in (3, 4):
        student, teacher = _dino_batch(seed)
        torch.testing.assert_close(program(student, teacher), eager(student, teacher))
        torch.testing.assert_close(dict(program.named_buffers())["loss.center"], eager.loss.center)
    assert eager.loss.center.abs().sum() > 0


def test_dino_modules_reset_after_meta_device_construction():
    with torch.device("meta"):
        head = DINOHead(32, 64, use_bn=True, hidden_dim=48, bottleneck_dim=16)
        criterion = DINOLoss(64, 4)
    head.to_empty(device="cpu")
    criterion.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*head.parameters(), *head.buffers(), *criterion.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)  # uninitialised memory
    torch.manual_seed(0)
    head.reset_parameters()
    criterion.reset_parameters()
    assert torch.equal(criterion.center, torch.zeros(64))
    for tensor in [*head.parameters(), *head.buffers()]:
        assert torch.isfinite(tensor).all()
    linear = [m for m in head.mlp.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linear])
    assert 0.017 < weights.std().item() < 0.023 and weights.abs().max() < 0.2  # trunc normal, std 0.02
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linear)
    weight_norm = head.last_layer.parametrizations.weight
    assert torch.equal(weight_norm.original0, torch.ones_like(weight_norm.original0))
    assert not weight_norm.original0.requires_grad  # norm_last_layer keeps g frozen
    assert weight_norm.original1.abs().max() <= 1 / math.sqrt(16) and weight_norm.original1.std() > 0.1
    norm = next(m for m in head.mlp.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert torch.equal(norm.running_var, torch.ones(48)) and norm.num_batches_tracked == 0
    assert torch.isfinite(head.eval()(torch.randn(4, 32))).all()


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine", "dot"])
def test_prototypes_fitted_under_inference_mode_serve_a_differentiable_query(metric):
    torch.manual_seed(5)
    embedder = torch.nn.Linear(8, 4)
    support, labels = torch.randn(10, 8), torch.arange(5).repeat_interleave(2)
    head, reference = PrototypicalHead(metric), PrototypicalHead(metric)
    with torch.inference_mode():
        head.fit(embedder(support), labels)
    with torch.no_grad():
        reference.fit(embedder(support), labels)
    query = torch.randn(6, 8)
    loss = torch.nn.functional.cross_entropy(head(embedder(query)), labels[:6])
    loss.backward()
    assert embedder.weight.grad is not None and torch.isfinite(embedder.weight.grad).all()
    torch.testing.assert_close(head(embedder(query)), reference(embedder(query)))
    assert not head.prototypes.is_inference() and not head.classes.is_inference()
    with torch.inference_mode():  # the three-argument form records its episode the same way
        head(embedder(support), labels, embedder(query))
    assert not head.prototypes.is_inference()
