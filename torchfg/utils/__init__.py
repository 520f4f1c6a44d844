"""torchfg.utils."""

__all__: list[str] = []

from torchfg.utils.schedules import cosine_schedule, ema_update_  # noqa: E402

__all__ += ["cosine_schedule", "ema_update_"]
