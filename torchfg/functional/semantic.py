"""Stateless helpers for semantic-map guided layers: resizing, foreground maps, weighted pooling.

A *semantic map* is a (B, K, h, w) float tensor of K region-of-interest channels (human parsing
probabilities, a segmentation one-hot, a localisation heat map), at any resolution; bool masks are
accepted too. These helpers bring it to a feature map's H x W and turn it into spatial weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Sequence

import torch
import torch.nn.functional as F

from torchfg._validation import accumulation_dtype, as_int, check_choice, check_float_tensor, check_positive, check_tensor

__all__ = ["resize_semantic", "semantic_foreground", "semantic_weighted_pool", "check_semantic"]


def check_semantic(
    semantic: object, name: str, *, batch: int, channels: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Validate a (B, K, h, w) semantic map; bool masks become float32.

    Args:
        semantic: the map to check.
        name: argument name used in error messages.
        batch: required B.
        channels: required K, or None for any.
        device: required device, or None for any.

    Returns:
        The map as a floating-point tensor of shape (B, K, h, w).
    """
    semantic = check_tensor(semantic, name)
    if semantic.dtype == torch.bool:
        semantic = semantic.to(torch.float32)
    elif not semantic.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point or bool tensor of shape (B, K, h, w), got {semantic.dtype}; "
            "one-hot encode integer label maps first"
        )
    if semantic.dim() != 4:
        raise ValueError(f"{name} must have shape (B, K, h, w), got {tuple(semantic.shape)}")
    if semantic.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (as the features), got {semantic.shape[0]}")
    if channels is not None and semantic.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (semantic_channels), got {semantic.shape[1]}")
    if semantic.shape[2] == 0 or semantic.shape[3] == 0:
        raise ValueError(f"{name} must have a non-empty spatial size, got {tuple(semantic.shape)}")
    if device is not None and semantic.device != device:
        raise ValueError(f"{name} must be on {device} (the features' device), got {semantic.device}")
    return semantic


def check_channel_indices(channels: object, name: str, num_channels: int | None = None) -> list[int]:
    """``channels`` as a non-empty list of channel indices >= 0 (and < ``num_channels`` when given);
    a single int is a one-element list."""
    if isinstance(channels, int) and not isinstance(channels, bool):
        index = [channels]
    elif isinstance(channels, (str, bytes)) or not isinstance(channels, Iterable):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(channels).__name__}")
    else:
        index = list(channels)
    if not index or any(
        not isinstance(c, int) or isinstance(c, bool) or c < 0 or (num_channels is not None and c >= num_channels)
        for c in index
    ):
        bound = ">= 0" if num_channels is None else f"in [0, {num_channels})"
        raise ValueError(f"{name} must be a non-empty list of indices {bound}, got {channels!r}")
    return index


def _check_size(size: object) -> tuple[int, int]:
    def side(value: object) -> int:
        # as_int keeps a SymInt side of features.shape (torch.compile, torch.export) symbolic;
        # the sign is checked below, on both sides, with this function's message.
        try:
            return as_int(value, "size")
        except TypeError:
            raise TypeError(f"size must be an int or a pair (H, W) of ints, got {size!r}") from None

    if isinstance(size, Sequence) and not isinstance(size, (str, bytes)):
        if len(size) != 2:
            raise ValueError(f"size must be an int or a pair (H, W) of ints, got {len(size)} values: {tuple(size)}")
        height, width = side(size[0]), side(size[1])
    else:
        height = width = side(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {(height, width)}")
    return height, width


def _check_map(semantic: object) -> torch.Tensor:
    # Bool masks are semantic maps too (the module docstring, check_semantic): as float32.
    if isinstance(semantic, torch.Tensor) and semantic.dtype == torch.bool:
        semantic = semantic.to(torch.float32)
    return check_float_tensor(semantic, "semantic", ndim=4)


def resize_semantic(semantic: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize a semantic map to a feature map's spatial size.

    Each axis that shrinks is area-averaged (each output cell is the mean of the input cells it
    covers, so thin regions are not lost the way bilinear sampling drops them); then each axis
    that grows is interpolated bilinearly. The same size returns the input unchanged.

    Args:
        semantic: (B, K, h, w) floating-point map, or a bool mask (taken as float32).
        size: target (H, W), two ints >= 1; one int means H = W (as in ``F.interpolate``).

    Returns:
        (B, K, H, W) map in the input's dtype (float32 for a bool mask).

    Example:
        >>> resize_semantic(torch.rand(2, 5, 64, 48), (8, 6)).shape
        torch.Size([2, 5, 8, 6])
    """
    semantic = _check_map(semantic)
    height, width = _check_size(size)
    in_height, in_width = semantic.shape[-2:]
    if (in_height, in_width) == (height, width):
        return semantic
    if in_height >= height and in_width >= width:
        return F.adaptive_avg_pool2d(semantic, (height, width))
    if in_height > height or in_width > width:
        # One axis shrinks, the other grows: averaged along the first (bilinear would sample it
        # and drop a one-pixel band), then the bilinear pass leaves it as it is (same size).
        semantic = F.adaptive_avg_pool2d(semantic, (min(in_height, height), min(in_width, width)))
    return F.interpolate(semantic, size=(height, width), mode="bilinear", align_corners=False)


def semantic_foreground(
    semantic: torch.Tensor, size: int | Sequence[int] | None = None, channels: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Region-of-interest weights: the sum of the chosen semantic channels, clamped to [0, 1].

    Args:
        semantic: (B, K, h, w) floating-point map, or a bool mask (taken as float32).
        size: target (H, W) or one int for both, as in :func:`resize_semantic`; None keeps (h, w).
        channels: indices of the foreground channels (e.g. leave out a parsing "background"
            channel), or one int for a single channel; None sums all K.

    Returns:
        (B, 1, H, W) weights in [0, 1], in the map's dtype (float32 for a bool mask).

    Example:
        >>> semantic_foreground(torch.rand(2, 4, 32, 32), (7, 7), channels=[1, 2, 3]).shape
        torch.Size([2, 1, 7, 7])
    """
    semantic = _check_map(semantic)
    if channels is not None:
        semantic = semantic[:, check_channel_indices(channels, "channels", semantic.shape[1])]
    foreground = semantic.sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    if size is not None:
        foreground = resize_semantic(foreground, size)
    return foreground


def semantic_weighted_pool(
    features: torch.Tensor, weights: torch.Tensor, *, eps: float = 1e-6, empty: str = "zero"
) -> torch.Tensor:
    """Weighted spatial average ``sum(features * weights) / sum(weights)`` per image and channel.

    Accumulates in fp32 (fp64 for fp64 input) and returns the features' dtype.

    Args:
        features: (B, C, H, W).
        weights: (B, 1, H, W) or (B, C, H, W) non-negative spatial weights on the same grid.
        eps: added to the weight mass, so an image whose weights are all zero does not divide by 0.
        empty: what an image with no weight mass pools to: ``"zero"`` (the weighted sum, i.e. 0) or
            ``"mean"`` (plain average pooling; the blend ``(sum(f w) + eps mean(f)) / (sum(w) + eps)``
            is exact average pooling at zero mass and the weighted mean once the mass dwarfs eps).

    Returns:
        (B, C) pooled features.

    Raises:
        ValueError: ``features`` with H * W == 0 (there is nothing to average), or ``weights`` whose
            shape does not match.

    Example:
        >>> f = torch.randn(2, 8, 7, 7)
        >>> w = torch.zeros(2, 1, 7, 7); w[..., 2:5, 2:5] = 1
        >>> torch.allclose(semantic_weighted_pool(f, w), f[..., 2:5, 2:5].mean((-2, -1)), atol=1e-5)
        True
    """
    features = check_float_tensor(features, "features", ndim=4)
    weights = check_float_tensor(weights, "weights", ndim=4)
    check_choice(empty, "empty", ("zero", "mean"))
    eps = check_positive(eps, "eps")
    batch, channels, height, width = features.shape
    if height * width == 0:
        raise ValueError(f"features must have a non-empty spatial size, got {tuple(features.shape)}")
    if weights.shape[0] != batch or weights.shape[1] not in (1, channels) or weights.shape[2:] != (height, width):
        raise ValueError(
            f"weights must have shape ({batch}, 1 or {channels}, {height}, {width}) to match features, "
            f"got {tuple(weights.shape)}"
        )
    acc = accumulation_dtype(features.dtype)
    features_acc = features.to(acc)
    weights_acc = weights.to(acc)
    weighted_sum = (features_acc * weights_acc).sum(dim=(-2, -1))
    mass = weights_acc.sum(dim=(-2, -1))
    if empty == "mean":
        weighted_sum = weighted_sum + eps * features_acc.mean(dim=(-2, -1))
    return (weighted_sum / (mass + eps)).to(features.dtype)
