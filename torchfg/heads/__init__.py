"""torchfg.heads."""

__all__: list[str] = []

from torchfg.heads.multilabel import MultiLabelHead  # noqa: E402

__all__ += ["MultiLabelHead"]

from torchfg.heads.prototypical import PrototypicalHead  # noqa: E402

__all__ += ["PrototypicalHead"]

from torchfg.heads.dino import DINOHead, load_dino_checkpoint  # noqa: E402

__all__ += ["DINOHead", "load_dino_checkpoint"]
