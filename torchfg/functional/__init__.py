"""Stateless functions behind every torchfg module.

One file per topic; this module re-exports the public names.
"""

from torchfg.ops.pairwise import pairwise_distance

__all__ = ["pairwise_distance"]
