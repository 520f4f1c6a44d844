"""Semantic channel attention, the three fusion baselines, wrap_backbone and the multi-label head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchfg.functional import resize_semantic, semantic_foreground, semantic_weighted_pool
from torchfg.heads import MultiLabelHead
from torchfg.layers import (
    SemanticBackbone,
    SemanticChannelAttention,
    SemanticFusion,
    make_semantic_module,
    widen_first_conv,
    wrap_backbone,
)

KINDS = ("attention", "input_concat", "feature_concat", "mask")
FUSION_MODES = ("input_concat", "feature_concat", "mask")


def _randomize(module: nn.Module, seed: int) -> None:
    """Move every parameter off its init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("semantic_size", [(13, 11), (5, 7), (3, 2), (40, 33), (1, 1), (5, 31)])
def test_attention_shapes_for_any_semantic_resolution(semantic_size):
    torch.manual_seed(0)
    layer = SemanticChannelAttention(24, 5, reduction=4)
    features = torch.randn(3, 24, 5, 7)
    semantic = torch.rand(3, 5, *semantic_size)
    out, weights = layer(features, semantic, return_attention=True)
    assert out.shape == features.shape and out.dtype == features.dtype
    assert weights.shape == (3, 24)
    assert bool(((weights > 0) & (weights < 1)).all())
    torch.testing.assert_close(out, features * 2 * weights[:, :, None, None])
    assert torch.isfinite(out).all()


def test_attention_without_residual_is_plain_gating():
    torch.manual_seed(1)
    layer = SemanticChannelAttention(16, 3, residual=False)
    features, semantic = torch.randn(2, 16, 6, 6), torch.rand(2, 3, 12, 12)
    out, weights = layer(features, semantic, return_attention=True)
    torch.testing.assert_close(out, features * weights[:, :, None, None])


@pytest.mark.parametrize("trained", [False, True])
def test_zero_map_gives_identity_with_residual(trained):
    torch.manual_seed(2)
    layer = SemanticChannelAttention(32, 6, embed_channels=8, reduction=4)
    if trained:
        _randomize(layer, seed=3)
    features = torch.randn(2, 32, 7, 5)
    out, weights = layer(features, torch.zeros(2, 6, 20, 20), return_attention=True)
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5))
    torch.testing.assert_close(out, features)


def test_random_map_changes_features_and_depends_on_image():
    torch.manual_seed(4)
    layer = SemanticChannelAttention(16, 4, reduction=2)
    _randomize(layer, seed=5)
    features = torch.randn(2, 16, 6, 6)
    semantic = torch.rand(2, 4, 9, 9)
    out, weights = layer(features, semantic, return_attention=True)
    assert (out - features).abs().max() > 1e-2
    # Per-image weights: swapping the maps of the two images changes each image's weights.
    _, swapped = layer(features, semantic.flip(0), return_attention=True)
    assert (swapped - weights).abs().max() > 1e-3


def test_attention_ignores_features_outside_the_region_of_interest():
    """Background clutter (features where the map is zero) must not move the channel weights."""
    torch.manual_seed(6)
    layer = SemanticChannelAttention(12, 2, reduction=2)
    _randomize(layer, seed=7)
    features = torch.randn(2, 12, 8, 8)
    semantic = torch.zeros(2, 2, 8, 8)
    semantic[:, 0, 2:5, 1:4] = 1.0
    semantic[:, 1, 5:7, 5:8] = 0.7
    cluttered = features.clone()
    background = (semantic.sum(1, keepdim=True) == 0).expand_as(features)
    cluttered[background] = torch.randn(int(background.sum())) * 10
    _, clean_weights = layer(features, semantic, return_attention=True)
    _, cluttered_weights = layer(cluttered, semantic, return_attention=True)
    torch.testing.assert_close(cluttered_weights, clean_weights)
    # ... whereas foreground features do move them.
    changed = features.clone()
    changed[~background] += 3.0
    _, foreground_weights = layer(changed, semantic, return_attention=True)
    assert (foreground_weights - clean_weights).abs().max() > 1e-3


def _attention_weights_by_hand(layer, features, semantic, channel_weights):
    """The documented definition of SemanticChannelAttention's weights ``w`` (B, C), step by step, for
    a map at twice the features' resolution (area averaging = the mean of each 2 x 2 block)."""
    batch, channels, height, width = features.shape
    # 1. resize: each output cell is the mean of the 2 x 2 input cells it covers.
    s = semantic.unflatten(-2, (height, 2)).unflatten(-1, (width, 2)).mean(dim=(-3, -1))
    # 2. two 3x3 bias-free conv + ReLU, then the average over space: the semantic embedding (B, E).
    h = torch.relu(F.conv2d(s, layer.embedding[0].weight, padding=1))
    h = torch.relu(F.conv2d(h, layer.embedding[2].weight, padding=1))
    embedded = h.sum(dim=(-2, -1)) / (height * width)
    # 3. region of interest: the map's channels summed with positive weights; the features'
    #    weighted spatial mean over it (semantic_weighted_pool, with its eps of 1e-6).
    roi = (s * channel_weights[None, :, None, None]).sum(dim=1, keepdim=True)
    pooled = (features * roi).sum(dim=(-2, -1)) / (roi.sum(dim=(-2, -1)) + 1e-6)
    # 4. bias-free MLP C + E -> hidden -> C, then the sigmoid.
    z = torch.cat([pooled, embedded], dim=1)
    z = torch.relu(z @ layer.mlp[0].weight.T) @ layer.mlp[2].weight.T
    return torch.sigmoid(z)


def test_attention_weights_follow_the_documented_definition():
    """The weights computed by hand (fp64) from the documented steps: in particular the semantic
    embedding is the spatial *average* of the conv stack's output, and the region of interest is
    weighted by softplus of the learned foreground logits."""
    layer = SemanticChannelAttention(10, 3, embed_channels=6, reduction=2).double()
    _randomize(layer, seed=20)
    g = torch.Generator().manual_seed(21)
    features = torch.randn(2, 10, 6, 4, generator=g, dtype=torch.float64)
    semantic = torch.rand(2, 3, 12, 8, generator=g, dtype=torch.float64)
    out, weights = layer(features, semantic, return_attention=True)
    expected = _attention_weights_by_hand(layer, features, semantic, F.softplus(layer.foreground_logits))
    assert (expected - 0.5).abs().max() > 0.05  # away from the zero-map value: the test has teeth
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, features * 2 * expected[:, :, None, None])


def test_region_of_interest_starts_as_the_plain_channel_sum():
    """At init the learned channel weights softplus(foreground_logits) are all exactly 1 (as the
    docstring says), so the region of interest is the plain sum of the K channels. Checked on the
    parameter itself: the weighted mean pool is blind to a common scale of the region (up to eps)."""
    torch.manual_seed(22)
    layer = SemanticChannelAttention(10, 4, embed_channels=6, reduction=2).double()
    torch.testing.assert_close(F.softplus(layer.foreground_logits), torch.ones(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(23)
    features = torch.randn(2, 10, 4, 4, generator=g, dtype=torch.float64)
    semantic = torch.rand(2, 4, 8, 8, generator=g, dtype=torch.float64)
    _, weights = layer(features, semantic, return_attention=True)
    torch.testing.assert_close(weights, _attention_weights_by_hand(layer, features, semantic, torch.ones(4, dtype=torch.float64)))


def test_gradients_reach_features_embedding_and_mlp():
    torch.manual_seed(8)
    layer = SemanticChannelAttention(20, 3, embed_channels=6, reduction=4)
    features = torch.randn(2, 20, 5, 5, requires_grad=True)
    semantic = torch.rand(2, 3, 17, 13)
    target = torch.randn(2, 20, 5, 5)
    ((layer(features, semantic) - target) ** 2).sum().backward()
    grads = {"features": features.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    assert set(grads) == {"features", "embedding.0.weight", "embedding.2.weight", "foreground_logits",
                          "mlp.0.weight", "mlp.2.weight"}
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, name


def test_bool_map_equals_float_map():
    torch.manual_seed(9)
    layer = SemanticChannelAttention(8, 2)
    features = torch.randn(2, 8, 4, 4)
    mask = torch.rand(2, 2, 8, 8) > 0.5
    torch.testing.assert_close(layer(features, mask), layer(features, mask.float()))


def test_the_map_helpers_take_bool_masks_too():
    """The module docstring says bool masks are accepted; the helpers raised a TypeError."""
    mask = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    for resized, expected in [(resize_semantic(mask, 4), resize_semantic(mask.float(), 4)),
                              (resize_semantic(mask, (11, 9)), resize_semantic(mask.float(), (11, 9))),
                              (semantic_foreground(mask, 4, channels=[0, 2]), semantic_foreground(mask.float(), 4, channels=[0, 2]))]:
        assert resized.dtype == torch.float32
        torch.testing.assert_close(resized, expected)


@pytest.mark.parametrize(
    "features_shape, semantic_shape, semantic_dtype, error, match",
    [
        ((2, 9, 4, 4), (2, 3, 8, 8), torch.float32, ValueError, "features must have 8 channels"),
        ((2, 8, 4), (2, 3, 8, 8), torch.float32, ValueError, "features must have 4 dims"),
        ((2, 8, 4, 4), (2, 4, 8, 8), torch.float32, ValueError, "semantic must have 3 channels"),
        ((2, 8, 4, 4), (3, 3, 8, 8), torch.float32, ValueError, "semantic must have batch size 2"),
        ((2, 8, 4, 4), (2, 3, 8), torch.float32, ValueError, r"semantic must have shape \(B, K, h, w\)"),
        ((2, 8, 4, 4), (2, 3, 0, 8), torch.float32, ValueError, "semantic must have a non-empty"),
        ((2, 8, 4, 4), (2, 3, 8, 8), torch.int64, TypeError, "semantic must be a floating-point or bool"),
    ],
)
def test_attention_rejects_bad_input(features_shape, semantic_shape, semantic_dtype, error, match):
    layer = SemanticChannelAttention(8, 3)
    semantic = torch.zeros(semantic_shape, dtype=semantic_dtype)
    with pytest.raises(error, match=match):
        layer(torch.randn(features_shape), semantic)
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        layer([1.0], torch.zeros(2, 3, 8, 8))


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        SemanticChannelAttention(0, 3)
    with pytest.raises(TypeError, match="semantic_channels"):
        SemanticChannelAttention(8, 2.5)
    with pytest.raises(ValueError, match="reduction"):
        SemanticChannelAttention(8, 3, reduction=0)
    with pytest.raises(TypeError, match="residual"):
        SemanticChannelAttention(8, 3, residual=1)
    with pytest.raises(ValueError, match="mode"):
        SemanticFusion(8, 3, mode="add")
    with pytest.raises(ValueError, match="foreground_channels"):
        SemanticFusion(8, 3, mode="mask", foreground_channels=[3])
    with pytest.raises(ValueError, match="kind"):
        make_semantic_module("se", 8, 3)
    # Arguments of another mode are refused, not ignored.
    with pytest.raises(ValueError, match="embed_channels is used by mode='feature_concat' only"):
        SemanticFusion(8, 3, mode="mask", embed_channels=4)
    with pytest.raises(ValueError, match="foreground_channels is used by mode='mask' only"):
        SemanticFusion(8, 3, mode="feature_concat", foreground_channels=[0])
    with pytest.raises(ValueError, match="foreground_channels is used by pooling='semantic' only"):
        MultiLabelHead(8, 4, pooling="avg", foreground_channels=[1])


def test_reprs_show_the_settings():
    assert "embed_channels=4" in repr(SemanticFusion(8, 3, mode="feature_concat", embed_channels=4))
    assert "foreground_channels=[1, 2]" in repr(SemanticFusion(8, 3, mode="mask", foreground_channels=[1, 2]))
    text = repr(MultiLabelHead(8, 4, pooling="semantic", foreground_channels=2, bias=False))
    for part in ("in_channels=8", "num_labels=4", "pooling='semantic'", "foreground_channels=[2]", "bias=False"):
        assert part in text


# ---------------------------------------------------------------- fusions


def test_input_concat_appends_the_resized_map():
    torch.manual_seed(10)
    fusion = SemanticFusion(3, 4, mode="input_concat")
    images, semantic = torch.randn(2, 3, 16, 12), torch.rand(2, 4, 32, 24)
    out = fusion(images, semantic)
    assert out.shape == (2, 7, 16, 12) and fusion.out_channels == 7
    torch.testing.assert_close(out[:, :3], images)
    torch.testing.assert_close(out[:, 3:], F.avg_pool2d(semantic, 2))


def test_mask_multiplies_by_the_region_of_interest():
    torch.manual_seed(11)
    features = torch.randn(2, 5, 6, 6)
    semantic = torch.rand(2, 3, 6, 6)
    out = SemanticFusion(5, 3, mode="mask")(features, semantic)
    torch.testing.assert_close(out, features * semantic.sum(1, keepdim=True).clamp(0, 1))
    out = SemanticFusion(5, 3, mode="mask", foreground_channels=[1, 2])(features, semantic)
    torch.testing.assert_close(out, features * semantic[:, 1:].sum(1, keepdim=True).clamp(0, 1))


def test_feature_concat_starts_as_identity_and_learns_to_use_the_map():
    torch.manual_seed(12)
    fusion = SemanticFusion(10, 3, mode="feature_concat", embed_channels=4)
    features, semantic = torch.randn(2, 10, 5, 5, requires_grad=True), torch.rand(2, 3, 15, 15)
    out = fusion(features, semantic)
    torch.testing.assert_close(out, features)
    out.pow(2).sum().backward()
    assert fusion.project.weight.grad[:, 10:].abs().max() > 0  # the map's part of the projection learns
    _randomize(fusion, seed=13)
    out_a = fusion(features, semantic)
    out_b = fusion(features, torch.rand(2, 3, 15, 15))
    assert out_a.shape == (2, 10, 5, 5) and (out_a - out_b).abs().max() > 1e-3


def test_make_semantic_module_builds_every_kind():
    for kind in KINDS:
        module = make_semantic_module(kind, 8, 3)
        out = module(torch.randn(2, 8, 4, 4), torch.rand(2, 3, 9, 9))
        expected_channels = 11 if kind == "input_concat" else 8
        assert out.shape == (2, expected_channels, 4, 4), kind


def test_widen_first_conv_keeps_the_function_and_learns_the_new_channels():
    torch.manual_seed(14)
    conv = nn.Conv2d(3, 6, 5, stride=2, padding=2, bias=True)
    widened = widen_first_conv(conv, 4)
    assert widened.weight.shape == (6, 7, 5, 5)
    assert widened.stride == conv.stride and widened.padding == conv.padding
    images, semantic = torch.randn(2, 3, 11, 9), torch.rand(2, 4, 11, 9)
    out = widened(torch.cat([images, semantic], 1))
    torch.testing.assert_close(out, conv(images))
    out.sum().backward()
    assert widened.weight.grad[:, 3:].abs().max() > 0
    with pytest.raises(ValueError, match="groups"):
        widen_first_conv(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError, match="conv"):
        widen_first_conv(nn.Linear(3, 3), 2)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_on_cpu(kind):
    torch.manual_seed(15)
    in_channels = 3 if kind == "input_concat" else 16
    module = make_semantic_module(kind, in_channels, 3)
    _randomize(module, seed=16)
    features = torch.randn(2, in_channels, 6, 5, requires_grad=True)
    semantic = torch.rand(2, 3, 13, 10)
    reference = module(features, semantic)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(features, semantic)
    assert out.shape == reference.shape
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert torch.isfinite(features.grad).all()
    # bf16 end to end
    module_bf16 = make_semantic_module(kind, in_channels, 3)
    module_bf16.load_state_dict(module.state_dict())
    out_bf16 = module_bf16.to(torch.bfloat16)(features.detach().bfloat16(), semantic.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), reference, atol=0.15, rtol=0.05)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_forward_backward(kind, dynamic):
    """Graph capture without breaks plus AOT autograd (fast 'aot_eager' backend). dynamic=True
    makes the module's float eps a SymFloat, which math.isfinite in the argument check could not
    trace."""
    torch.manual_seed(17)
    in_channels = 3 if kind == "input_concat" else 16
    module = make_semantic_module(kind, in_channels, 3)
    features = torch.randn(2, in_channels, 5, 7, requires_grad=True)
    semantic = torch.rand(2, 3, 11, 9)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    out = compiled(features, semantic)
    torch.testing.assert_close(out, module(features, semantic))
    (grad,) = torch.autograd.grad(out.pow(2).sum(), features)
    (expected,) = torch.autograd.grad(module(features, semantic).pow(2).sum(), features)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    "kind",
    # Inductor compiles take ~10-40 s each on a busy 2-core CPU: only the attention runs by default;
    # every mode is covered by the aot_eager fullgraph test above.
    ["attention"] + [pytest.param(mode, marks=pytest.mark.slow) for mode in FUSION_MODES],
)
def test_compile_inductor_forward(kind):
    torch.manual_seed(18)
    in_channels = 3 if kind == "input_concat" else 16
    module = make_semantic_module(kind, in_channels, 3)
    _randomize(module, seed=19)
    features, semantic = torch.randn(2, in_channels, 5, 7), torch.rand(2, 3, 11, 9)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(features, semantic), module(features, semantic), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compile_inductor_attention_backward():
    torch.manual_seed(20)
    module = SemanticChannelAttention(16, 3, reduction=4)
    features = torch.randn(2, 16, 5, 7, requires_grad=True)
    semantic = torch.rand(2, 3, 11, 9)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(features, semantic).sum(), features)
    (expected,) = torch.autograd.grad(module(features, semantic).sum(), features)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- wrap_backbone


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """Stage names and call order as torchvision's ResNet (conv1, bn1, relu, maxpool, layer1..4, fc)."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 24, 32), num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = widths[0]
        for index, width in enumerate(widths, start=1):
            setattr(self, f"layer{index}", _BasicBlock(in_channels, width, 1 if index == 1 else 2))
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def _reference_forward(resnet: nn.Module, images: torch.Tensor, attention: nn.Module, semantic: torch.Tensor):
    """torchvision ResNet.forward written out, with the attention after layer3."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
    x = attention(resnet.layer3(resnet.layer2(resnet.layer1(x))), semantic)
    return resnet.fc(torch.flatten(resnet.avgpool(resnet.layer4(x)), 1))


def _tiny_resnet_with_attention(stage: str, channels: int, semantic_channels: int, seed: int):
    """(model, backbone, an unwrapped copy, attention): a TinyResNet in eval mode, seeded with
    ``seed``, with a randomised SemanticChannelAttention (seed + 1) after ``stage``."""
    torch.manual_seed(seed)
    backbone = TinyResNet().eval()
    unwrapped = copy.deepcopy(backbone)
    attention = SemanticChannelAttention(channels, semantic_channels, reduction=4)
    _randomize(attention, seed=seed + 1)
    return wrap_backbone(backbone, stage, attention), backbone, unwrapped, attention


def test_wrap_backbone_applies_attention_after_the_named_stage():
    model, backbone, unwrapped, attention = _tiny_resnet_with_attention("layer3", 24, 4, seed=21)
    assert isinstance(model, SemanticBackbone)
    assert {id(p) for p in attention.parameters()} <= {id(p) for p in model.parameters()}
    assert any(k.startswith("semantic_module.") for k in model.state_dict())
    images, semantic = torch.randn(2, 3, 64, 48), torch.rand(2, 4, 30, 22)
    logits = model(images, semantic)
    torch.testing.assert_close(logits, _reference_forward(unwrapped, images, attention, semantic))
    assert (logits - model(images, torch.rand(2, 4, 30, 22))).abs().max() > 1e-4
    # Zero map: the residual attention is the identity, so the wrapped net equals the plain one.
    torch.testing.assert_close(model(images, torch.zeros(2, 4, 3, 3)), unwrapped(images))

    with pytest.raises(RuntimeError, match="call the SemanticBackbone wrapper"):
        backbone(images)
    with pytest.raises(ValueError, match="semantic must have 4 channels"):
        model(images, torch.rand(2, 3, 30, 22))
    assert model._semantic is None  # a failing call leaves no stale map behind


def test_a_direct_backbone_call_on_a_tensor_a_wrapped_call_saw_still_raises():
    """The map each stage input met is kept for checkpointing's recomputation in backward; a direct
    backbone call outside backward on that same tensor applied the old call's map, silently."""
    model, backbone, unwrapped, attention = _tiny_resnet_with_attention("conv1", 8, 3, seed=25)
    images, semantic = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 16, 16)
    wrapped = model(images, semantic)
    assert (wrapped - unwrapped(images)).abs().max() > 1e-4  # the map changes the output
    for direct_input in (images, images.clone()):
        with pytest.raises(RuntimeError, match="call the SemanticBackbone wrapper"):
            backbone(direct_input)


def _reference_two_stages(resnet, images, first, second, semantic):
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
    x = first(resnet.layer1(x), semantic)
    x = second(resnet.layer3(resnet.layer2(x)), semantic)
    return resnet.fc(torch.flatten(resnet.avgpool(resnet.layer4(x)), 1))


def test_semantic_modules_at_two_stages_by_wrapping_the_wrapper():
    """Two stages: the wrapper is wrapped (a second wrapper on the same CNN would meet the first
    one's hook without a map, and its own hook would raise in the first one's calls)."""
    torch.manual_seed(27)
    backbone = TinyResNet().eval()
    unwrapped = copy.deepcopy(backbone)
    first, second = SemanticChannelAttention(8, 3, reduction=4), SemanticChannelAttention(24, 3, reduction=4)
    _randomize(first, seed=28)
    _randomize(second, seed=29)
    inner = wrap_backbone(backbone, "layer1", first)
    with pytest.raises(ValueError, match="already has a semantic module at stage 'layer1'.*wrap that wrapper"):
        wrap_backbone(backbone, "layer3", second)
    with pytest.raises(ValueError, match="method must be 'forward'"):
        wrap_backbone(inner, "backbone.layer3", second, method="__call__")
    with pytest.raises(ValueError, match="method must be 'forward'"):
        SemanticBackbone(inner, "backbone.layer3", second, method="forward_features")
    outer = wrap_backbone(inner, "backbone.layer3", second)
    images, semantic = torch.randn(2, 3, 64, 48), torch.rand(2, 3, 30, 22)
    torch.testing.assert_close(outer(images, semantic),
                               _reference_two_stages(unwrapped, images, first, second, semantic))
    assert {id(p) for p in [*first.parameters(), *second.parameters()]} <= {id(p) for p in outer.parameters()}
    with pytest.raises(RuntimeError, match="'layer1' is wrapped"):
        backbone(images)
    with pytest.raises(RuntimeError, match="'backbone.layer3' is wrapped"):
        inner(images, semantic)  # the outer wrapper's stage has no map in the inner one's call


def test_wrap_backbone_dotted_name_method_and_training_step():
    torch.manual_seed(23)
    backbone = TinyResNet()
    fusion = SemanticFusion(16, 2, mode="feature_concat")
    model = wrap_backbone(backbone, "layer2.conv2", fusion, method="forward_features")
    features = model(torch.randn(2, 3, 32, 32), torch.rand(2, 2, 32, 32))
    assert features.shape == (2, 32, 1, 1)
    features.sum().backward()
    assert fusion.project.weight.grad is not None and backbone.conv1.weight.grad is not None


def test_wrap_backbone_input_concat_before_a_widened_first_conv():
    torch.manual_seed(24)
    backbone = TinyResNet().eval()
    images, semantic = torch.randn(2, 3, 40, 40), torch.rand(2, 6, 20, 20)
    plain = backbone(images)
    backbone.conv1 = widen_first_conv(backbone.conv1, 6)
    model = wrap_backbone(backbone, "conv1", SemanticFusion(3, 6, mode="input_concat"), position="before")
    torch.testing.assert_close(model(images, semantic), plain)  # zero-initialised new filters
    with torch.no_grad():
        backbone.conv1.weight[:, 3:] = 0.1
    assert (model(images, semantic) - plain).abs().max() > 1e-4


def test_wrap_backbone_rejects_bad_arguments():
    backbone = TinyResNet()
    attention = SemanticChannelAttention(8, 2)
    with pytest.raises(ValueError, match="layer_name 'layer9'"):
        wrap_backbone(backbone, "layer9", attention)
    with pytest.raises(TypeError, match="attention"):
        wrap_backbone(backbone, "layer1", lambda x, s: x)
    with pytest.raises(TypeError, match="backbone"):
        wrap_backbone("resnet", "layer1", attention)
    with pytest.raises(ValueError, match="position"):
        wrap_backbone(backbone, "layer1", attention, position="inside")
    with pytest.raises(ValueError, match="method"):
        wrap_backbone(backbone, "layer1", attention, method="forward_head")


def test_semantic_backbone_checks_its_arguments_as_wrap_backbone_does():
    # The class is public too: a position other than "after" was taken as "before" (the module saw
    # the stage's input), a wrong stage name gave an AttributeError, and a second wrapper on one
    # CNN was taken (its hook then raised in the other's calls).
    from torchfg.layers import SemanticBackbone

    backbone = TinyResNet()
    attention = SemanticChannelAttention(8, 2)
    with pytest.raises(ValueError, match="position"):
        SemanticBackbone(backbone, "layer1", attention, position="After")
    with pytest.raises(ValueError, match="layer_name 'layer9'"):
        SemanticBackbone(backbone, "layer9", attention)
    with pytest.raises(TypeError, match="module"):
        SemanticBackbone(backbone, "layer1", lambda x, s: x)
    with pytest.raises(ValueError, match="method"):
        SemanticBackbone(backbone, "layer1", attention, method="forward_head")
    model = SemanticBackbone(backbone, "layer1", attention)
    with pytest.raises(ValueError, match="already has a semantic module"):
        SemanticBackbone(backbone, "layer2", SemanticChannelAttention(8, 2))
    # The map itself: None was reported as a call of the backbone without the wrapper.
    with pytest.raises(TypeError, match="semantic must be a tensor"):
        model(torch.randn(1, 3, 32, 32), None)


def test_wrapped_backbone_shared_by_threads_uses_each_calls_own_map():
    """The call's map was one attribute of the wrapper: two inference threads sharing a model got
    each other's maps (about half the calls, silently) or a misleading "call the wrapper" error."""
    import threading

    torch.manual_seed(26)
    model = wrap_backbone(TinyResNet(widths=(8, 8, 8, 8)), "layer2", SemanticChannelAttention(8, 3)).eval()
    inputs = [(torch.randn(2, 3, 32, 32), torch.rand(2, 3, 16, 16)) for _ in range(2)]
    with torch.no_grad():
        expected = [model(images, semantic) for images, semantic in inputs]
    wrong, errors = [0, 0], []
    barrier = threading.Barrier(2, timeout=30)

    def serve(t: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(15):
                    wrong[t] += not torch.equal(model(*inputs[t]), expected[t])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and wrong == [0, 0], (errors, wrong)
    assert not model._semantic_of_thread


def _wrapped_tiny_resnet(seed: int):
    """(backbone, wrapped model, images, semantic): attention after layer2 of a small ResNet."""
    torch.manual_seed(seed)
    backbone = TinyResNet(widths=(8, 8, 8, 8))
    model = wrap_backbone(backbone, "layer2", SemanticChannelAttention(8, 3))
    return backbone, model, torch.randn(2, 3, 32, 32), torch.rand(2, 3, 16, 16)


def test_a_stage_compiled_on_its_own_still_meets_its_map():
    """Regional compilation (``stage.compile()``) runs the stage's hook under dynamo inside the
    eager wrapper call; with the map kept only per thread, the hook found none there and raised."""
    backbone, model, images, semantic = _wrapped_tiny_resnet(27)
    expected = model(images, semantic)
    torch._dynamo.reset()
    backbone.layer2.compile(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(model(images, semantic), expected)
    assert model._semantic is None and not model._semantic_of_thread


def test_a_pickle_from_before_the_per_thread_maps_still_runs(monkeypatch):
    import pickle

    _, model, images, semantic = _wrapped_tiny_resnet(28)
    current = SemanticBackbone.__getstate__

    def earlier_state(self):  # what an earlier version pickled: no per-thread entry
        state = current(self)
        del state["_semantic_of_thread"]
        return state

    monkeypatch.setattr(SemanticBackbone, "__getstate__", earlier_state)
    saved = pickle.dumps(model)
    monkeypatch.setattr(SemanticBackbone, "__getstate__", current)
    restored = pickle.loads(saved)
    torch.testing.assert_close(restored(images, semantic), model(images, semantic))


def test_wrapped_backbone_compiles_fullgraph():
    _, model, images, semantic = _wrapped_tiny_resnet(25)
    expected = model(images, semantic)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images, semantic), expected)
    assert model._semantic is None


def test_wrap_backbone_on_torchvision_resnet18():
    try:
        import torchvision
    except Exception as error:  # the wheel can fail with RuntimeError, not only ImportError
        pytest.skip(f"torchvision unusable here: {type(error).__name__}: {error}")
    torch.manual_seed(26)
    resnet = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    unwrapped = copy.deepcopy(resnet)
    attention = SemanticChannelAttention(256, 5)
    model = wrap_backbone(resnet, "layer3", attention)
    images, semantic = torch.randn(2, 3, 64, 64), torch.rand(2, 5, 64, 64)
    logits = model(images, semantic)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, _reference_forward(unwrapped, images, attention, semantic))
    torch.testing.assert_close(model(images, torch.zeros(2, 5, 8, 8)), unwrapped(images))


# ---------------------------------------------------------------- functional helpers and head


def test_resize_semantic_area_when_shrinking_bilinear_otherwise():
    semantic = torch.rand(2, 3, 12, 8)
    torch.testing.assert_close(resize_semantic(semantic, (3, 2)), F.avg_pool2d(semantic, 4))
    torch.testing.assert_close(
        resize_semantic(semantic, (24, 8)), F.interpolate(semantic, size=(24, 8), mode="bilinear", align_corners=False)
    )
    assert resize_semantic(semantic, (12, 8)) is semantic
    with pytest.raises(ValueError, match="size"):
        resize_semantic(semantic, (0, 4))


def test_resize_semantic_averages_the_shrinking_axis_when_the_other_grows():
    # A one-pixel band of a 64 x 8 map: bilinear along the shrinking axis sampled it away (mass 0).
    band = torch.zeros(1, 1, 64, 8)
    band[..., 33, :] = 1.0
    resized = resize_semantic(band, (8, 16))
    torch.testing.assert_close(resized.sum(), torch.tensor(band.sum().item() * 8 * 16 / (64 * 8)))
    expected = F.interpolate(F.adaptive_avg_pool2d(band, (8, 8)), size=(8, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, expected)
    semantic = torch.rand(2, 3, 5, 12)  # the other way round: height grows, width shrinks
    expected = F.interpolate(F.avg_pool2d(semantic, (1, 3)), size=(10, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_semantic(semantic, (10, 4)), expected)


def test_semantic_weighted_pool_is_the_masked_mean():
    torch.manual_seed(27)
    features = torch.randn(3, 7, 9, 5)
    weights = torch.zeros(3, 1, 9, 5)
    weights[0, :, 1:4, 2:5] = 1
    weights[1, :, 0, 0] = 0.3
    torch.testing.assert_close(semantic_weighted_pool(features, weights)[0], features[0, :, 1:4, 2:5].mean((-2, -1)))
    torch.testing.assert_close(semantic_weighted_pool(features, weights)[1], features[1, :, 0, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(semantic_weighted_pool(features, weights)[2], torch.zeros(7))
    torch.testing.assert_close(semantic_weighted_pool(features, weights, empty="mean")[2], features[2].mean((-2, -1)))
    with pytest.raises(ValueError, match="weights must have shape"):
        semantic_weighted_pool(features, weights[:, :, :4])


def test_semantic_foreground_channels():
    semantic = torch.rand(2, 4, 6, 6)
    torch.testing.assert_close(semantic_foreground(semantic, channels=[0, 3]),
                               (semantic[:, 0] + semantic[:, 3]).clamp(0, 1)[:, None])
    with pytest.raises(ValueError, match="channels"):
        semantic_foreground(semantic, channels=[4])


@pytest.mark.parametrize("pooling", ["avg", "max", "semantic"])
def test_multilabel_head_pooling(pooling):
    torch.manual_seed(28)
    head = MultiLabelHead(12, 5, pooling=pooling)
    features = torch.randn(3, 12, 6, 4, requires_grad=True)
    semantic = torch.zeros(3, 2, 12, 8)
    semantic[:, 1, 2:6, 0:4] = 1.0  # -> rows 1:3, cols 0:2 at 6 x 4
    logits = head(features, semantic)
    assert logits.shape == (3, 5)
    expected_pooled = {
        "avg": features.mean((-2, -1)),
        "max": features.amax((-2, -1)),
        "semantic": features[:, :, 1:3, 0:2].mean((-2, -1)),
    }[pooling]
    torch.testing.assert_close(logits, head.classifier(expected_pooled), atol=1e-5, rtol=1e-5)
    logits.sum().backward()
    assert features.grad.abs().max() > 0 and head.classifier.weight.grad.abs().max() > 0


def test_multilabel_head_semantic_edge_cases():
    torch.manual_seed(29)
    head = MultiLabelHead(6, 3, pooling="semantic", foreground_channels=[1])
    features = torch.randn(2, 6, 4, 4)
    # An empty region of interest falls back to average pooling.
    torch.testing.assert_close(head(features, torch.zeros(2, 2, 4, 4)), head.classifier(features.mean((-2, -1))))
    with pytest.raises(ValueError, match="semantic is required"):
        head(features)
    with pytest.raises(ValueError, match="foreground_channels"):
        MultiLabelHead(6, 3, pooling="semantic", foreground_channels=[2])(features, torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match="features must have 6 channels"):
        MultiLabelHead(6, 3)(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="pooling"):
        MultiLabelHead(6, 3, pooling="gem")
    pooled = torch.randn(2, 6)
    assert MultiLabelHead(6, 3)(pooled).shape == (2, 3)



def test_non_bool_flags_are_refused():
    # "no" is truthy: it used to add a bias / return the weights silently.
    with pytest.raises(TypeError, match="bias must be a bool"):
        MultiLabelHead(4, 2, bias="no")
    assert MultiLabelHead(4, 2, bias=False).classifier.bias is None
    layer = SemanticChannelAttention(8, 3)
    with pytest.raises(TypeError, match="return_attention must be a bool"):
        layer(torch.randn(2, 8, 4, 4), torch.rand(2, 3, 4, 4), return_attention="no")


def test_one_int_is_one_channel_and_other_types_name_the_argument():
    torch.manual_seed(30)
    semantic = torch.rand(2, 4, 6, 6)
    torch.testing.assert_close(semantic_foreground(semantic, channels=1), semantic_foreground(semantic, channels=[1]))
    with pytest.raises(TypeError, match="channels must be an int or a sequence of ints"):
        semantic_foreground(semantic, channels=1.0)
    with pytest.raises(ValueError, match="channels"):
        semantic_foreground(semantic, channels=4)
    features = torch.randn(2, 6, 4, 4)
    head = MultiLabelHead(6, 3, pooling="semantic", foreground_channels=3)
    assert head.foreground_channels == [3]
    listed = MultiLabelHead(6, 3, pooling="semantic", foreground_channels=[3])
    listed.load_state_dict(head.state_dict())
    torch.testing.assert_close(head(features, semantic), listed(features, semantic))
    with pytest.raises(TypeError, match="foreground_channels must be an int or a sequence of ints"):
        MultiLabelHead(6, 3, pooling="semantic", foreground_channels=2.0)
    assert SemanticFusion(6, 4, mode="mask", foreground_channels=2).foreground_channels == [2]
    with pytest.raises(ValueError, match="foreground_channels"):
        SemanticFusion(6, 4, mode="mask", foreground_channels=4)


def test_resize_semantic_size_is_an_int_or_a_pair_of_ints():
    semantic = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(resize_semantic(semantic, 4), resize_semantic(semantic, (4, 4)))
    for size in [(2.9, 3.9), 4.0, (True, 2), "ab"]:
        with pytest.raises(TypeError, match="size must be an int or a pair"):
            resize_semantic(semantic, size)
    with pytest.raises(ValueError, match="size must be an int or a pair"):
        resize_semantic(semantic, (2, 3, 4))
    with pytest.raises(ValueError, match="size must be positive"):
        resize_semantic(semantic, 0)


@pytest.mark.parametrize("height, width", [(0, 5), (5, 0)])
def test_empty_spatial_features_are_refused(height, width):
    # They pooled to NaN (mean of nothing), a raw amax IndexError or 0 (sum of nothing).
    features = torch.randn(2, 4, height, width)
    for pooling in ("avg", "max", "semantic"):
        with pytest.raises(ValueError, match="features must have a non-empty spatial size"):
            MultiLabelHead(4, 2, pooling=pooling)(features, torch.rand(2, 1, 3, 3))
    for empty in ("zero", "mean"):
        with pytest.raises(ValueError, match="features must have a non-empty spatial size"):
            semantic_weighted_pool(features, torch.rand(2, 1, height, width), empty=empty)

@pytest.mark.parametrize("position", ["after", "before"])
def test_wrap_backbone_under_activation_checkpointing(position):
    """A checkpointed stage (timm's set_grad_checkpointing) is re-run during backward, after the
    wrapped call has returned: it must see its own call's map, and the gradients must equal those
    of the same network without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.checkpointed = checkpointed

        def forward(self, x):
            x = self.stem(x)
            x = checkpoint(self.stage, x, use_reentrant=False) if self.checkpointed else self.stage(x)
            return x.mean((2, 3))

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = wrap_backbone(Net(checkpointed), "stage", SemanticChannelAttention(8, 3), position=position)
        gen = torch.Generator().manual_seed(1)
        images, maps = torch.randn(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
        out = model(images, maps)
        model(images[:1], maps[:1])  # a second call must not disturb the first one's backward
        out.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)
    with pytest.raises(RuntimeError, match="not the backbone directly"):
        model.backbone(images)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_a_region_that_contains_the_stage_says_so(reentrant):
    """A checkpointed region that contains the wrapped stage recomputes it in backward on tensors
    the call never saw (its intermediates; or, reentrant, detached inputs): the map cannot be
    found. The error said to call the wrapper, which the user had done; it now names checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=reentrant).mean()

    model = wrap_backbone(Net(), "block.1", SemanticChannelAttention(8, 4))
    images = torch.randn(2, 3, 6, 6, requires_grad=reentrant)
    out = model(images, torch.rand(2, 4, 12, 12))
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        out.backward()


def test_wrapped_backbone_saves_after_a_call_and_lets_go_of_the_map():
    """torch.save(model) / pickle after training steps (the per-call map bookkeeping holds weak
    references, which cannot be pickled), and a call's map is released with its activations."""
    import gc
    import io
    import pickle
    import weakref

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    model = wrap_backbone(net, "1", SemanticChannelAttention(8, 3))
    images, maps = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    out = model(images, maps)
    out.sum().backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(images, maps), model(images, maps))
    assert pickle.loads(pickle.dumps(model))(images, maps).shape == (2, 8)
    # Once the call's outputs (and with them the stage input) are gone, so is its map.
    map_ref = weakref.ref(maps)
    del out, maps
    gc.collect()
    assert map_ref() is None and not model._semantic_of_input


@pytest.mark.parametrize("kind", ["attention", "feature_concat", "mask"])
def test_meta_construction_then_reset_parameters_is_the_constructors_init(kind):
    """Built on the meta device, then to_empty + the usual loop over every submodule's
    reset_parameters + the layer's own: the same parameters as an eager construction from the
    same seed. Neither layer had a reset_parameters, so foreground_logits stayed uninitialised
    memory and the feature_concat projection kept a kaiming init instead of the identity."""
    from torchfg.layers import SemanticChannelAttention, SemanticFusion

    def build():
        if kind == "attention":
            return SemanticChannelAttention(8, 3, embed_channels=4)
        return SemanticFusion(8, 3, mode=kind)

    torch.manual_seed(5)
    eager = build()
    with torch.device("meta"):
        layer = build()
    layer.to_empty(device="cpu")
    for p in layer.parameters():
        torch.nn.init.constant_(p, float("nan"))  # poison: every value must be written below
    torch.manual_seed(5)
    for module in layer.modules():
        if module is not layer and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.manual_seed(5)
    layer.reset_parameters()
    eager_state, state = eager.state_dict(), layer.state_dict()
    assert eager_state.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(state[name], eager_state[name], rtol=0, atol=0, msg=name)
    # Any order of the submodules' resets (FSDP resets each module that owns parameters; a
    # parent-first loop resets the layer before its projection): the constructor's fixed parts.
    with torch.device("meta"):
        layer = build()
    layer.to_empty(device="cpu")
    for module in layer.modules():  # parent first
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if kind == "attention":
        torch.testing.assert_close(layer.foreground_logits, eager.foreground_logits, rtol=0, atol=0)
    if kind == "feature_concat":
        torch.testing.assert_close(layer.project.weight, eager.project.weight, rtol=0, atol=0)


def test_identity_projection_draws_what_a_plain_conv_draws():
    """SemanticFusion("feature_concat") takes the same draws from the global RNG as when its
    projection was a plain Conv2d overwritten with the identity, so seeded results (the demo's
    numbers) do not move."""
    from torchfg.layers import SemanticFusion
    from torchfg.layers.semantic import _semantic_embedding

    torch.manual_seed(3)
    layer = SemanticFusion(8, 3, mode="feature_concat", embed_channels=4)
    after = torch.rand(4)
    torch.manual_seed(3)
    _semantic_embedding(3, 4)
    nn.Conv2d(12, 8, kernel_size=1, bias=False)
    torch.testing.assert_close(after, torch.rand(4), rtol=0, atol=0)
    torch.testing.assert_close(layer.project.weight[:, :8, 0, 0], torch.eye(8), rtol=0, atol=0)
