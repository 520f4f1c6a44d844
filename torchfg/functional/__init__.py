"""Stateless functions behind every torchfg module.

One file per topic; this module re-exports the public names.
"""

from torchfg.ops.pairwise import pairwise_distance

__all__ = ["pairwise_distance"]

from torchfg.functional.semantic import (  # noqa: E402
    resize_semantic,
    semantic_foreground,
    semantic_weighted_pool,
)

__all__ += ["resize_semantic", "semantic_foreground", "semantic_weighted_pool"]

from torchfg.functional.fewshot import class_prototypes, prototype_logits, prototypical_logits  # noqa: E402

__all__ += ["class_prototypes", "prototype_logits", "prototypical_logits"]

from torchfg.functional.triplet import adaptive_triplet_loss, mine_triplets, triplet_margin_loss  # noqa: E402

__all__ += ["triplet_margin_loss", "adaptive_triplet_loss", "mine_triplets"]

from torchfg.functional.dino import dino_loss  # noqa: E402

__all__ += ["dino_loss"]
