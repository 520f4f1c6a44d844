"""Preset 'knn' of `torchfg bench`: exact k-NN against faiss and torch.cdist + topk (issue 15).

A thin wrapper: the sizes, dtypes and options live in `torchfg.bench.presets.PRESETS["knn"]`,
every case and baseline in `torchfg/bench/`. Options given here are added to each of the preset's
`torchfg bench` runs and override its choices; `--show` prints those command lines.

Examples:
    python benchmarks/bench_knn.py --show
    python benchmarks/bench_knn.py --csv benchmarks/results/torchfg_bench_cpu.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchfg.bench.presets import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("knn"))
