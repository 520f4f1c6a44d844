"""torchfg.data."""

__all__: list[str] = []

from torchfg.data.samplers import EpisodicSampler, PKSampler, split_episode  # noqa: E402

__all__ += ["EpisodicSampler", "PKSampler", "split_episode"]
