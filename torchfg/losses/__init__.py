"""torchfg.losses."""

__all__: list[str] = []

from torchfg.losses.dino import DINOLoss  # noqa: E402

__all__ += ["DINOLoss"]

from torchfg.losses.triplet import AdaptiveTripletLoss, TripletMarginLoss  # noqa: E402

__all__ += ["TripletMarginLoss", "AdaptiveTripletLoss"]

from torchfg.losses.xbm import CrossBatchMemory  # noqa: E402

__all__ += ["CrossBatchMemory"]
