"""What benchmarks/README.md and docs/benchmarks.md say about recorded results, checked against the CSVs they cite."""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
DOCS = ROOT / "docs" / "benchmarks.md"


def _rows(name: str) -> list[dict[str, str]]:
    with (RESULTS / name).open(newline="") as f:
        return list(csv.DictReader(f))


def _prose(path: Path) -> str:
    """The page's own text, without the generated tables, on one line."""
    text = path.read_text(encoding="utf-8").split("<!-- results:start -->")[0]
    return re.sub(r"\s+", " ", text)


def _missing(page: Path, says: list[str], never: list[str]) -> list[str]:
    """What ``page`` fails to say (``says``) or says although it must not (``never``), quoted."""
    text = _prose(page)
    return [f"missing: {s!r}" for s in says if s not in text] + [f"wrong: {s!r}" for s in never if s in text]


def test_faiss_rows_of_torchfg_bench_cpu_are_described_as_isolated():
    # Those rows ran one process per measurement at one thread: the pages must not blame their
    # faiss gap on two OpenMP runtimes sharing a process.
    knn = [r for r in _rows("torchfg_bench_cpu.csv") if r["op"] == "knn"]
    assert knn and {(r["isolated"], r["threads"]) for r in knn} == {("1", "1")}
    assert not _missing(README, says=["`isolated` = 1", "why faiss was faster at D = 128 was not found"],
                        never=["it ran in the same process as torch"])
    assert not _missing(DOCS, says=["The `knn` rows of `torchfg_bench_cpu.csv` each ran in a process of their own"],
                        never=["the `knn` rows of `torchfg_bench_cpu.csv` were recorded with both in one process"])


def test_knn_mm_plus_topk_time_is_the_one_in_h200_kernels_csv():
    # The page compared the Triton k-NN kernel with an "mm + topk" time found in no CSV: the figure
    # it quotes must be the GEMM and top-k kernels of the cdist + topk step that session profiled.
    kernels = [r for r in _rows("h200_kernels.csv") if r["op"] == "knn" and r["case"] == "torch.cdist+topk"
               and r["commit"] == "9271181" and r["params"].startswith("k=10;")]
    gemm = sum(float(r["ms_per_step"]) for r in kernels if "gemm" in r["kernel"])
    topk = sum(float(r["ms_per_step"]) for r in kernels if "topk" in r["kernel"] or "SortKV" in r["kernel"])
    assert (round(gemm, 1), round(topk, 1)) == (5.4, 7.8)
    assert not _missing(README, says=[f"GEMM takes {gemm:.1f} ms and its top-k {topk:.1f} ms, {gemm + topk:.1f} ms together"],
                        never=["mm + topk, 10.2 ms"])


def test_official_dino_outlier_is_described_as_the_csv_has_it():
    # h200_bench.csv's first-call B = 64 row of the official DINO loss came third in its process.
    rows = _rows("h200_bench.csv")
    outlier = next(i for i, r in enumerate(rows) if r["op"] == "dino" and r["case"] == "dino_official"
                   and r["n"] == "64")
    assert rows[outlier]["median_ms"] == "11.948"
    # The rows of that `torchfg bench` process: the consecutive dino rows at one load average.
    first = outlier
    while first > 0 and rows[first - 1]["op"] == "dino" and rows[first - 1]["load_avg"] == rows[outlier]["load_avg"]:
        first -= 1
    assert outlier - first + 1 == 3
    assert not _missing(README, says=["11.9 ms (p20-p80 7.04-15.5 ms), the third measurement of its process"],
                        never=["it was the first measurement of that process"])
