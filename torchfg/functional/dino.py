"""Stateless DINO self-distillation loss (see :class:`torchfg.losses.DINOLoss` for the module)."""

from __future__ import annotations

from torchfg.ops.dino import dino_loss

__all__ = ["dino_loss"]
