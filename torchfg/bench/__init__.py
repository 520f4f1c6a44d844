"""``torchfg bench``: time every torchfg backend of an op against the usual baselines.

For each op (``pairwise``, ``triplet``, ``atl``, ``knn``, ``dino``), each size N and each case
(torchfg backends; the plain PyTorch route; pytorch-metric-learning and faiss when installed) it
records the median time with p20/p80, the achieved TFLOP/s under the op's FLOP model, the ratio to
the ``x @ x.T`` floor at the same size and dtype, and the peak extra memory.

Example:
    >>> from torchfg.bench import run_benchmarks, format_table
    >>> results = run_benchmarks(["pairwise"], sizes=[16], dim=8, device="cpu", repeat=2, progress=False)
    >>> "torch.cdist" in format_table(results)
    True
"""

from torchfg.bench.core import (
    CSV_COLUMNS,
    OP_NAMES,
    Case,
    OpBench,
    Problem,
    Result,
    load_op,
    run_benchmarks,
)
from torchfg.bench.report import format_table, plot_results, write_csv

__all__ = [
    "CSV_COLUMNS",
    "OP_NAMES",
    "Case",
    "OpBench",
    "Problem",
    "Result",
    "load_op",
    "run_benchmarks",
    "format_table",
    "plot_results",
    "write_csv",
]
