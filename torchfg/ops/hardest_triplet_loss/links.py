"""Layout of the fused loss's partner lists (the Triton forward builds them, its backward walks them).

Torch-only, so that the op's fake kernel can size them without importing triton.
"""

from __future__ import annotations

__all__ = ["LINK_STRIPES", "links_size"]

# Lists per candidate row: a pair joins stripe (anchor index % LINK_STRIPES) of its partner's
# lists. Random data has hubs, rows that hundreds of anchors pick as their hardest negative (158
# of 8,192 and 317 of 32,768 anchors for N(0, 1) rows, D = 512, 4 per class), and the backward's
# walk of a list is a chain of dependent loads, as long as the block's longest list: four stripes
# cut that chain to about a quarter for 16 more bytes per candidate.
LINK_STRIPES = 4


def links_size(n: int, m: int) -> int:
    """int32 entries of the lists of n anchors against m candidates: [ticket (1), heads (m *
    LINK_STRIPES), next (2n)]."""
    return 1 + m * LINK_STRIPES + 2 * n
