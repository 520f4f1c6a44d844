"""torchfg.demo: three small experiments that show each method of torchfg working, on a CPU, in minutes.

``torchfg demo`` (or :func:`run_demo`) runs them in a row on the embedded
:class:`~torchfg.datasets.SyntheticProducts` data; each is also a function returning its metrics.
"""

from torchfg.demo.backbone import EmbeddingNet, SmallCNN
from torchfg.demo.fewshot import few_shot_experiment
from torchfg.demo.retrieval import atl_vs_triplet_experiment, recall_curve
from torchfg.demo.run import FULL_CONFIG, QUICK_CONFIG, run_demo
from torchfg.demo.semantic import AttributeClassifier, semantic_attention_experiment

__all__: list[str] = [
    "AttributeClassifier",
    "EmbeddingNet",
    "FULL_CONFIG",
    "QUICK_CONFIG",
    "SmallCNN",
    "atl_vs_triplet_experiment",
    "few_shot_experiment",
    "recall_curve",
    "run_demo",
    "semantic_attention_experiment",
]
