"""torchfg.miners."""

__all__: list[str] = []

from torchfg.miners.triplet import BatchHardMiner, SemiHardMiner, TripletMarginMiner  # noqa: E402

__all__ += ["BatchHardMiner", "SemiHardMiner", "TripletMarginMiner"]
