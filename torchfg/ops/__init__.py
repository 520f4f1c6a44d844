"""Differentiable low-level ops, each with a pure-PyTorch reference and fused kernels.

Importing this package imports every op, so that each has declared its backends to
:mod:`torchfg.backends` (what ``torchfg info`` lists). Kernels themselves load lazily.
"""

from torchfg.ops import dino, hardest_triplet_loss, knn, pair_distances, pairwise, triplet  # noqa: F401  (registers the backends)
