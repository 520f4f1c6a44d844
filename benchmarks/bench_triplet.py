"""Preset 'triplet' of `torchfg bench`: batch-hard and adaptive triplet loss (issue 14).

A thin wrapper: the sizes, dtypes and options live in `torchfg.bench.presets.PRESETS["triplet"]`,
every case and baseline in `torchfg/bench/`. Options given here are added to each of the preset's
`torchfg bench` runs and override its choices; `--show` prints those command lines.

Examples:
    python benchmarks/bench_triplet.py --show
    python benchmarks/bench_triplet.py --csv benchmarks/results/torchfg_bench_cpu.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchfg.bench.presets import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("triplet"))
