"""Stateless functions behind every torchfg module.

One file per topic; this module re-exports the public names.
"""

from torchfg.ops.pairwise import pairwise_distance

__all__ = ["pairwise_distance"]

from torchfg.functional.semantic import (  # noqa: E402
    check_semantic,
    resize_semantic,
    semantic_foreground,
    semantic_weighted_pool,
)

__all__ += ["resize_semantic", "semantic_foreground", "semantic_weighted_pool", "check_semantic"]

from torchfg.functional.fewshot import class_prototypes, prototype_logits, prototypical_logits  # noqa: E402

__all__ += ["class_prototypes", "prototype_logits", "prototypical_logits"]

from torchfg.functional.triplet import (  # noqa: E402
    adaptive_triplet_loss,
    mine_triplets,
    mine_triplets_and_candidates,
    triplet_margin_loss,
)

__all__ += ["triplet_margin_loss", "adaptive_triplet_loss", "mine_triplets", "mine_triplets_and_candidates"]

from torchfg.functional.xbm import enqueue, gather_for_memory, memory_triplet_loss  # noqa: E402

__all__ += ["memory_triplet_loss", "enqueue", "gather_for_memory"]

from torchfg.functional.dino import dino_loss  # noqa: E402

__all__ += ["dino_loss"]
