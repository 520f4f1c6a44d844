"""torchfg.metrics."""

__all__: list[str] = []

from torchfg.metrics.auc import multilabel_auc, relative_improvement  # noqa: E402

__all__ += ["multilabel_auc", "relative_improvement"]

from torchfg.metrics.fewshot import few_shot_accuracy  # noqa: E402

__all__ += ["few_shot_accuracy"]

from torchfg.metrics.retrieval import RetrievalMetrics, map_at_r, precision_at_1, r_precision, recall_at_k, retrieval_metrics  # noqa: E402

__all__ += ["RetrievalMetrics", "recall_at_k", "precision_at_1", "r_precision", "map_at_r", "retrieval_metrics"]
