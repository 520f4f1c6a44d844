"""Semantic modules on real backbones: torchvision and timm models, and a ViT's tokens.

torchvision and timm are optional. On the CPU development machines the PyPI torchvision wheel is
built against a CUDA torch and fails to import against the CPU torch there (``RuntimeError:
operator torchvision::nms does not exist``); timm imports torchvision, so both sets of tests skip
there with that reason. Only the import is guarded: a failure anywhere after it fails the test.
The ViT token tests run everywhere on a small transformer laid out like timm's VisionTransformer.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from torchfg.layers import (
    SemanticChannelAttention,
    SemanticFusion,
    TokenGridAdapter,
    make_semantic_module,
    widen_first_conv,
    wrap_backbone,
)

K = 4  # semantic channels in these tests


def _import_optional(name: str, why_needed: str = ""):
    """Import ``name`` or skip, telling "not installed" from "installed but does not import".

    Only those two cases skip: ``ModuleNotFoundError`` for ``name`` itself, and, for torchvision, the
    error its compiled ops raise when the wheel does not match the installed torch. Anything else
    raised by the import propagates and fails the test.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:
            pytest.skip(f"{name} is not installed{why_needed}")
        raise


def _torchvision():
    try:
        return _import_optional("torchvision")
    except RuntimeError as error:
        # A torchvision wheel built for another torch registers its C++ ops against a torch that
        # does not have them: "operator torchvision::nms does not exist".
        if "torchvision::" not in str(error):
            raise
        pytest.skip(f"torchvision is installed but does not import against torch {torch.__version__}: {error}")


def _timm():
    _torchvision()  # timm imports torchvision; skip with its reason when that is what fails
    return _import_optional("timm")


def _check_wrapped(model: nn.Module, images: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
    """Forward and backward through a wrapped backbone; the semantic module (if it has weights) and the
    backbone's weights get finite gradients."""
    out = model(images, semantic)
    out.float().square().mean().backward()
    for part in (model.semantic_module, model.backbone):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    return out


# ----------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("kind", ["attention", "feature_concat", "mask"])
def test_torchvision_resnet18_feature_level(kind):
    torchvision = _torchvision()
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=7)
    model = wrap_backbone(resnet, "layer3", make_semantic_module(kind, 256, K))
    out = _check_wrapped(model, torch.rand(2, 3, 96, 80), torch.rand(2, K, 24, 20))
    assert out.shape == (2, 7)


def test_torchvision_resnet18_input_concat_starts_as_the_plain_network():
    torchvision = _torchvision()
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    images, semantic = torch.rand(2, 3, 64, 64), torch.rand(2, K, 64, 64)
    with torch.no_grad():
        plain = resnet(images)
    resnet.conv1 = widen_first_conv(resnet.conv1, K)
    model = wrap_backbone(resnet, "conv1", SemanticFusion(3, K, mode="input_concat"), position="before")
    with torch.no_grad():
        torch.testing.assert_close(model(images, semantic), plain)  # new filters start at zero


def test_torchvision_convnext_tiny_attention():
    torchvision = _torchvision()
    torch.manual_seed(0)
    convnext = torchvision.models.convnext_tiny(weights=None, num_classes=3)
    # features.5 is the third stage: 384 channels at 1/16 of the input.
    model = wrap_backbone(convnext, "features.5", SemanticChannelAttention(384, K))
    assert _check_wrapped(model, torch.rand(1, 3, 64, 64), torch.rand(1, K, 16, 16)).shape == (1, 3)


# ----------------------------------------------------------------------------- timm


def test_timm_resnet_forward_features():
    timm = _timm()
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model = wrap_backbone(net, "layer3", SemanticChannelAttention(256, K), method="forward_features")
    assert _check_wrapped(model, torch.rand(2, 3, 64, 64), torch.rand(2, K, 64, 64)).shape == (2, 512, 2, 2)


def test_timm_vit_small_patch16_attention_on_tokens_and_input_concat():
    timm = _timm()
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    adapter = TokenGridAdapter(
        SemanticChannelAttention(vit.embed_dim, K), prefix_tokens=vit.num_prefix_tokens,
        grid_size=vit.patch_embed.grid_size,
    )
    model = wrap_backbone(vit, "blocks.8", adapter)
    images, semantic = torch.rand(1, 3, 224, 224), torch.rand(1, K, 56, 56)
    assert _check_wrapped(model, images, semantic).shape == (1, 384)

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        plain = vit(images)
    vit.patch_embed.proj = widen_first_conv(vit.patch_embed.proj, K)
    model = wrap_backbone(vit, "patch_embed", SemanticFusion(3, K, mode="input_concat"), position="before")
    with torch.no_grad():
        torch.testing.assert_close(model(images, semantic), plain, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- a ViT's tokens, no timm needed


class TinyViT(nn.Module):
    """Laid out like timm's VisionTransformer: patch_embed.proj, a class token, blocks, norm."""

    def __init__(self, dim: int = 32, patch: int = 8, depth: int = 3, prefix_tokens: int = 1) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.prefix = nn.Parameter(torch.randn(1, prefix_tokens, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.prefix.expand(x.shape[0], -1, -1), x), dim=1)
        return self.norm(self.blocks(x))[:, 0]


@pytest.mark.parametrize("prefix_tokens, size", [(1, (48, 48)), (0, (32, 56)), (5, (40, 24))])
def test_token_grid_adapter_matches_the_map_module_on_the_patch_tokens(prefix_tokens, size):
    torch.manual_seed(1)
    h, w = size[0] // 8, size[1] // 8
    module = SemanticChannelAttention(32, K)
    adapter = TokenGridAdapter(module, prefix_tokens=prefix_tokens, grid_size=(h, w))
    tokens = torch.randn(3, prefix_tokens + h * w, 32)
    semantic = torch.rand(3, K, 13, 17)
    out = adapter(tokens, semantic)
    assert out.shape == tokens.shape
    torch.testing.assert_close(out[:, :prefix_tokens], tokens[:, :prefix_tokens])  # prefix untouched
    # Patch token (i, j) sits at row-major position i * w + j: compare with the module on the map.
    grid = torch.stack([tokens[:, prefix_tokens + i * w + j] for i in range(h) for j in range(w)], dim=2)
    expected = module(grid.view(3, 32, h, w), semantic)
    torch.testing.assert_close(out[:, prefix_tokens:].transpose(1, 2).reshape(3, 32, h, w), expected)


def test_token_grid_adapter_in_a_vit_trains_and_checks_its_input():
    torch.manual_seed(2)
    vit = TinyViT()
    adapter = TokenGridAdapter(make_semantic_module("mask", 32, K))  # square grid inferred
    model = wrap_backbone(vit, "blocks.1", adapter)
    assert _check_wrapped(model, torch.rand(2, 3, 48, 48), torch.rand(2, K, 48, 48)).shape == (2, 32)
    with pytest.raises(ValueError, match="square grid"):
        model(torch.rand(2, 3, 48, 40), torch.rand(2, K, 48, 40))  # 6 x 5 patches and no grid_size
    with pytest.raises(ValueError, match="grid_size"):
        TokenGridAdapter(adapter.module, grid_size=(4, 0))
    with pytest.raises(ValueError, match="prefix_tokens"):
        TokenGridAdapter(adapter.module, prefix_tokens=-1)
    with pytest.raises(TypeError, match="module"):
        TokenGridAdapter(lambda x, s: x)  # type: ignore[arg-type]


@pytest.mark.parametrize("grid_size", [None, (4, 4)])
def test_token_grid_adapter_compiles_with_dynamic_shapes(grid_size):
    """math.isqrt of the SymInt token count could not be traced: dynamic=True with fullgraph failed
    for an inferred square grid."""
    torch.manual_seed(4)
    adapter = TokenGridAdapter(make_semantic_module("mask", 8, K), prefix_tokens=1, grid_size=grid_size)
    torch._dynamo.reset()
    compiled = torch.compile(adapter, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (2, 3):
        tokens, semantic = torch.randn(batch, 1 + 16, 8), torch.rand(batch, K, 5, 5)
        torch.testing.assert_close(compiled(tokens, semantic), adapter(tokens, semantic))
    with pytest.raises(Exception, match="grid of patch tokens"):
        compiled(torch.randn(2, 1 + 15, 8), torch.rand(2, K, 5, 5))


def test_widen_first_conv_on_a_vit_patch_embedding_starts_as_the_plain_network():
    torch.manual_seed(3)
    vit = TinyViT().eval()
    images, semantic = torch.rand(2, 3, 32, 32), torch.rand(2, K, 32, 32)
    with torch.no_grad():
        plain = vit(images)
    vit.patch_embed.proj = widen_first_conv(vit.patch_embed.proj, K)
    model = wrap_backbone(vit, "patch_embed.proj", SemanticFusion(3, K, mode="input_concat"), position="before")
    with torch.no_grad():
        torch.testing.assert_close(model(images, semantic), plain)
    # The new filters learn: they get gradients from the map.
    model.train()
    model(images, semantic).square().mean().backward()
    assert vit.patch_embed.proj.weight.grad[:, 3:].abs().sum() > 0
