"""Triplet miners returning index tuples (usable as pytorch-metric-learning ``indices_tuple``)."""

from __future__ import annotations

import torch
from torch import nn

from torchfg._validation import check_choice
from torchfg.functional.triplet import mine_triplets
from torchfg.ops.triplet import METRICS

__all__ = ["BatchHardMiner", "SemiHardMiner"]


class _TripletMiner(nn.Module):
    strategy: str

    def __init__(self, *, metric: str = "euclidean", cross_rank: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.metric = check_choice(metric, "metric", METRICS)
        if not isinstance(cross_rank, bool):
            raise TypeError(f"cross_rank must be a bool, got {type(cross_rank).__name__}")
        self.cross_rank = cross_rank
        self.backend = backend

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mine_triplets(
            embeddings,
            labels,
            strategy=self.strategy,
            metric=self.metric,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            cross_rank=self.cross_rank,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, cross_rank={self.cross_rank}"


class BatchHardMiner(_TripletMiner):
    """Per anchor, the farthest positive and the closest negative (one triplet per anchor).

    Anchors without a positive or a negative are left out. Fused Triton kernel on CUDA, chunked
    reference elsewhere; never materialises an N x M matrix.

    Args:
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        cross_rank: under torch.distributed, mine among all ranks' items; positives and negatives
            then index the concatenation of all ranks' batches (see
            :func:`torchfg.functional.mine_triplets`).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Shapes:
        forward(embeddings (N, D), labels (N,), ref_embeddings (M, D) = None, ref_labels (M,) = None)
        -> (anchors (T,), positives (T,), negatives (T,)) int64; positives / negatives index
        ``ref_embeddings`` when given.

    Example:
        >>> miner = BatchHardMiner()
        >>> emb = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
        >>> miner(emb, torch.tensor([0, 0, 1, 1]))
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 2, 1, 1]))
    """

    strategy = "batch_hard"


class SemiHardMiner(_TripletMiner):
    """FaceNet semi-hard triplets: per anchor-positive pair, the closest negative strictly farther
    than the positive, else the farthest negative (chunked reference on every device).

    Args:
        metric: ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        cross_rank: mine among all ranks' items (see :class:`BatchHardMiner`).

    Shapes:
        forward(embeddings (N, D), labels (N,), ref_embeddings (M, D) = None, ref_labels (M,) = None)
        -> (anchors (T,), positives (T,), negatives (T,)) int64, one triplet per valid pair.

    Example:
        >>> miner = SemiHardMiner()
        >>> emb = torch.tensor([[0.0], [1.0], [1.5], [4.0]])
        >>> miner(emb, torch.tensor([0, 0, 1, 1]))
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 3, 0, 1]))
    """

    strategy = "semi_hard"

    def __init__(self, *, metric: str = "euclidean", cross_rank: bool = False) -> None:
        super().__init__(metric=metric, cross_rank=cross_rank, backend="torch")
