"""Multi-crop wrapper: one backbone call per group of same-resolution crops, one head call."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from torchfg._validation import check_bool

__all__ = ["MultiCropWrapper"]


class MultiCropWrapper(nn.Module):
    """Run ``backbone`` on a list of crops grouped by resolution, then ``head`` on all features.

    Consecutive crops with the same shape are concatenated along the batch and go through the
    backbone together (DINO's 2 global + n local crops take two backbone calls); the features are
    concatenated crop-major, in the order of the input list, and the head runs once. A backbone
    returning a tuple contributes its first element.

    As in the original code (facebookresearch/dino), the backbone's ImageNet classifier is removed:
    its ``fc`` (torchvision ResNets) and ``head`` (timm and DINO ViTs) submodules, where present,
    are replaced in place by ``nn.Identity()``, so the backbone returns its features. Pass
    ``strip_classifier=False`` for a backbone whose ``fc`` or ``head`` is part of the features.

    Args:
        backbone: maps (n * B, C, H, W) images (any per-crop shape) to (n * B, D) features.
        head: maps (N, D) features to the output, e.g. :class:`torchfg.heads.DINOHead`.
        strip_classifier: replace ``backbone.fc`` and ``backbone.head`` by ``nn.Identity()``.

    Shapes:
        crops: a tensor (B, ...) or a sequence of n tensors (B, ...), all with the same B
        -> head(features of shape (n * B, D)); row ``v * B + b`` is crop v of sample b.

    Example:
        >>> backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, 3, H, W) -> (N, 3)
        >>> model = MultiCropWrapper(backbone, nn.Linear(3, 10))
        >>> crops = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 6
        >>> model(crops).shape
        torch.Size([32, 10])
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, strip_classifier: bool = True) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
        if check_bool(strip_classifier, "strip_classifier"):
            for name in ("fc", "head"):
                # Only submodules: an attribute of another kind named fc/head is not a classifier.
                if isinstance(getattr(backbone, name, None), nn.Module):
                    setattr(backbone, name, nn.Identity())
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Crops (a tensor or a sequence of tensors sharing the batch size) -> head output."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not isinstance(crops, (list, tuple)) or len(crops) == 0:
            raise ValueError("crops must be a tensor or a non-empty list/tuple of tensors")
        for index, crop in enumerate(crops):
            if not isinstance(crop, torch.Tensor):
                raise TypeError(f"crops[{index}] must be a torch.Tensor, got {type(crop).__name__}")
            if crop.dim() == 0 or crop.shape[0] != crops[0].shape[0]:
                raise ValueError(
                    f"every crop must have the same batch size (dim 0): crops[0] has shape "
                    f"{tuple(crops[0].shape)}, crops[{index}] has {tuple(crop.shape)}"
                )
        features = []
        start = 0
        while start < len(crops):
            stop = start + 1
            while stop < len(crops) and crops[stop].shape == crops[start].shape:
                stop += 1
            out = self.backbone(torch.cat(crops[start:stop]))
            if isinstance(out, tuple):
                out = out[0]
            features.append(out)
            start = stop
        return self.head(torch.cat(features) if len(features) > 1 else features[0])
