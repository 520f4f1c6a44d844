"""``torchfg bench``, the one benchmark engine: time every torchfg backend of an op against the usual baselines.

For each op (``pairwise``, ``triplet``, ``atl``, ``knn``, ``dino``, ``xbm``), each size N and each
case (torchfg backends; the plain PyTorch route; pytorch-metric-learning, faiss and the official
DINO loss when installed) it records the median time with p20/p80, the achieved TFLOP/s under the
op's FLOP model, the ratio to the ``x @ x.T`` floor at the same size and dtype, the peak extra
memory and, on request, the kernel launches per step. :mod:`torchfg.bench.measure` holds the
timing, memory and CSV helpers; :mod:`torchfg.bench.presets` the named runs behind the scripts of
``benchmarks/``.

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
from torchfg.bench.measure import Measurement, append_csv, environment_fields, matmul_floor, measure
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
    "Measurement",
    "append_csv",
    "environment_fields",
    "matmul_floor",
    "measure",
]
