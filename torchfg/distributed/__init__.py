"""Cross-rank helpers on torch.distributed: variable-size gathers with gradients."""

from torchfg.distributed.gather import (
    GatheredBatch,
    all_reduce_sum,
    raise_on_all_ranks,
    all_gather_no_grad,
    all_gather_with_grad,
    gather_batch,
    is_distributed,
    rank,
    world_size,
)

__all__ = [
    "GatheredBatch",
    "all_reduce_sum",
    "raise_on_all_ranks",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "gather_batch",
    "is_distributed",
    "rank",
    "world_size",
]
