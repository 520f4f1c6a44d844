"""torchfg: fine-grained visual recognition and retrieval for PyTorch.

Building blocks (losses, miners, heads, layers, metrics, samplers) over fused GPU kernels
"""

from torchfg._version import __version__
from torchfg.ops.pairwise import pairwise_distance
from torchfg.ops.knn import knn

from torchfg import backends, functional  # noqa: E402  (order: ops first)

__all__ = ["__version__", "pairwise_distance", "knn", "backends", "functional"]
