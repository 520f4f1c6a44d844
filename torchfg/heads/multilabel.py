"""Multi-label classification head: spatial pooling, then one logit per label."""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from torchfg._validation import check_bool, check_choice, check_float_tensor
from torchfg.functional.semantic import (
    check_channel_indices,
    check_semantic,
    semantic_foreground,
    semantic_weighted_pool,
)

__all__ = ["MultiLabelHead"]

POOLINGS = ("avg", "max", "semantic")


class MultiLabelHead(nn.Module):
    """Pool a feature map and map it to independent per-label logits (train with BCE-with-logits).

    Pooling:

    * ``"avg"``: global average pooling;
    * ``"max"``: global max pooling;
    * ``"semantic"``: weighted average with the region-of-interest map as spatial weights, the
      clamped sum of the ``foreground_channels`` of the semantic map (all by default), resized to
      H x W. An image whose map is all zero falls back to plain average pooling.

    Args:
        in_channels: C, channels of the features.
        num_labels: L, number of binary labels.
        pooling: ``"avg"`` | ``"max"`` | ``"semantic"``.
        dropout: dropout probability on the pooled features.
        foreground_channels: for ``"semantic"``, the map channels that form the region of interest
            (one int for a single channel).
        bias: learn a per-label bias.

    Shapes:
        features (B, C, H, W) with H * W >= 1 (or already pooled (B, C) for ``"avg"``/``"max"``),
        semantic (B, K, h, w) for ``"semantic"`` (ignored otherwise) -> logits (B, L).

    Example:
        >>> head = MultiLabelHead(2048, 12, pooling="semantic")
        >>> head(torch.randn(4, 2048, 7, 7), torch.rand(4, 20, 224, 224)).shape
        torch.Size([4, 12])
    """

    # Declared for type checkers: mypy reads __init__'s ``isinstance(dropout, numbers.Real)`` as
    # always false (typeshed's float is not a numbers.Real), so it infers no type for the attributes
    # set after it, and a user's ``head.in_channels`` was an error ("Cannot determine type").
    in_channels: int
    num_labels: int
    pooling: str
    foreground_channels: list[int] | None
    dropout: nn.Dropout
    classifier: nn.Linear

    def __init__(
        self,
        in_channels: int,
        num_labels: int,
        *,
        pooling: str = "avg",
        dropout: float = 0.0,
        foreground_channels: int | Sequence[int] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_labels", num_labels)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.pooling = check_choice(pooling, "pooling", POOLINGS)
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool):
            raise TypeError(f"dropout must be a number in [0, 1), got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if foreground_channels is not None:
            if self.pooling != "semantic":
                raise ValueError(
                    f"foreground_channels is used by pooling='semantic' only, got it with pooling={self.pooling!r}"
                )
            foreground_channels = check_channel_indices(foreground_channels, "foreground_channels")
        bias = check_bool(bias, "bias")
        self.in_channels = in_channels
        self.num_labels = num_labels
        self.foreground_channels = foreground_channels
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(in_channels, num_labels, bias=bias)

    def extra_repr(self) -> str:
        foreground = "" if self.foreground_channels is None else f", foreground_channels={self.foreground_channels}"
        return (
            f"in_channels={self.in_channels}, num_labels={self.num_labels}, pooling={self.pooling!r}{foreground}, "
            f"bias={self.classifier.bias is not None}"
        )

    def pool(self, features: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features (B, C) from (B, C, H, W) features (and the map for ``"semantic"``)."""
        features = check_float_tensor(features, "features")
        if features.dim() == 2 and self.pooling != "semantic":
            pooled = features
        elif features.dim() == 4:
            if features.shape[-2] * features.shape[-1] == 0:
                raise ValueError(f"features must have a non-empty spatial size, got {tuple(features.shape)}")
            if self.pooling == "avg":
                pooled = features.mean(dim=(-2, -1))
            elif self.pooling == "max":
                pooled = features.amax(dim=(-2, -1))
            else:
                if semantic is None:
                    raise ValueError('semantic is required for pooling="semantic"')
                semantic = check_semantic(semantic, "semantic", batch=features.shape[0], device=features.device)
                if self.foreground_channels is not None and max(self.foreground_channels) >= semantic.shape[1]:
                    raise ValueError(
                        f"foreground_channels {self.foreground_channels} out of range for semantic with "
                        f"{semantic.shape[1]} channels"
                    )
                weights = semantic_foreground(
                    semantic.to(features.dtype), features.shape[-2:], self.foreground_channels
                )
                pooled = semantic_weighted_pool(features, weights, empty="mean")
        else:
            expected = "(B, C, H, W)" if self.pooling == "semantic" else "(B, C, H, W) or (B, C)"
            raise ValueError(f"features must have shape {expected}, got {tuple(features.shape)}")
        if pooled.shape[1] != self.in_channels:
            raise ValueError(f"features must have {self.in_channels} channels (in_channels), got {pooled.shape[1]}")
        return pooled

    def forward(self, features: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L) for features (B, C, H, W) and, for ``"semantic"`` pooling, the map (B, K, h, w)."""
        return self.classifier(self.dropout(self.pool(features, semantic)))
