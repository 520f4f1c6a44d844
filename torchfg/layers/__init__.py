"""torchfg.layers."""

__all__: list[str] = []

from torchfg.layers.semantic import (  # noqa: E402
    SemanticBackbone,
    SemanticChannelAttention,
    SemanticFusion,
    TokenGridAdapter,
    make_semantic_module,
    widen_first_conv,
    wrap_backbone,
)

__all__ += [
    "SemanticBackbone",
    "SemanticChannelAttention",
    "SemanticFusion",
    "TokenGridAdapter",
    "make_semantic_module",
    "widen_first_conv",
    "wrap_backbone",
]

from torchfg.layers.multicrop import MultiCropWrapper  # noqa: E402

__all__ += ["MultiCropWrapper"]
