"""torchfg.metrics."""

__all__: list[str] = []

from torchfg.metrics.auc import multilabel_auc, relative_improvement  # noqa: E402

__all__ += ["multilabel_auc", "relative_improvement"]

from torchfg.metrics.fewshot import few_shot_accuracy  # noqa: E402

__all__ += ["few_shot_accuracy"]
