"""What ``torchfg bench`` prints and writes: the stdout table, CSV rows and the PNG charts."""

from __future__ import annotations

import importlib.util
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from torchfg.bench.core import Result, load_op
from torchfg.bench.measure import append_csv

__all__ = ["format_table", "write_csv", "is_csv_row", "plot_results", "matplotlib_available", "MATPLOTLIB_MISSING"]

MATPLOTLIB_MISSING = "--plot needs matplotlib: pip install matplotlib (or pip install 'torchfg[bench]')"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mib(size: int | None) -> float | None:
    return None if size is None else size / 2**20


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table per (op, dtype): time, TFLOP/s, ratio to the floor, peak extra memory, status.

    Example:
        >>> from torchfg.bench import run_benchmarks
        >>> print(format_table(run_benchmarks(["pairwise"], sizes=[8], dim=4, device="cpu", repeat=1,
        ...       progress=False)).splitlines()[0])  # doctest: +ELLIPSIS
        == pairwise: ...
    """
    lines: list[str] = []
    # `--dtype bf16,fp32` runs every op once per dtype: one table each, or the rows of both would
    # sit under the first one's dtype.
    by_op_and_dtype: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        by_op_and_dtype[(r.op, r.dtype)].append(r)
    header = f"{'N':>7} {'case':<26} {'median ms':>11} {'p20-p80 ms':>21} {'TFLOP/s':>8} {'x floor':>8} {'peak MiB':>9}  status"
    for (op_name, dtype), rows in by_op_and_dtype.items():
        op = load_op(op_name)
        if len(rows) == 1 and rows[0].case == "-":
            lines += [f"== {op_name}: {rows[0].status}", ""]
            continue
        ok = next((r for r in rows if r.measurement is not None), rows[0])
        lines.append(f"== {op_name}: {op.title}")
        floor = (ok.floor or "x @ y.T").split(" (")[0]
        lines.append(f"   dtype {dtype}; FLOP model {op.flop_model}; floor: {floor}, same N, D and dtype, "
                     "timed right after each case")
        lines.append(header)
        previous_n = None
        for r in rows:
            if previous_n is not None and (r.size or r.n) != previous_n:
                lines.append("")
            previous_n = r.size or r.n
            m = r.measurement
            if m is None:
                lines.append(f"{r.size or r.n:>7} {r.case:<26} {'-':>11} {'-':>21} {'-':>8} {'-':>8} {'-':>9}  {r.status}")
                continue
            spread = f"{m.p20_ms:.4g}-{m.p80_ms:.4g}"
            lines.append(
                f"{r.size or r.n:>7} {r.case:<26} {m.median_ms:>11.4g} {spread:>21} {_fmt(r.tflops, '.3g'):>8} "
                f"{_fmt(r.floor_ratio, '.3g'):>8} {_fmt(_mib(m.peak_extra_bytes), '.1f'):>9}  "
                f"ok (floor {_fmt(r.floor_ms, '.4g')} ms)"
            )
        lines.append("")
    gpu_skipped = sorted({f"{r.op}:{r.case}" for r in results if r.gpu_kernel and r.status.startswith("skipped")})
    if gpu_skipped:
        lines.append("GPU kernels skipped (no CUDA device): " + ", ".join(gpu_skipped))
    cpu_rows = [r for r in results if r.measurement is not None and r.measurement.memory_method.startswith("rss")]
    if cpu_rows and not all(r.isolated for r in cpu_rows):
        lines.append(
            "CPU peak memory is the growth of the process's peak RSS; measured in-process it is approximate "
            "(freed pages stay resident): use --isolate for one fresh process per measurement."
        )
    return "\n".join(lines).rstrip("\n")


def write_csv(path: str | os.PathLike, results: Sequence[Result]) -> int:
    """Append one row per measured or failed result to ``path`` (skipped cases are left out).

    Returns the number of rows written.
    """
    rows = [r.csv_row() for r in results if is_csv_row(r)]
    append_csv(path, rows)
    return len(rows)


def is_csv_row(result: Result) -> bool:
    """Measured and failed cases get a CSV row; skipped ones (not measurements) do not."""
    return not result.status.startswith("skipped")


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_results(results: Sequence[Result], path: str | os.PathLike) -> Path:
    """Time-vs-N (top row, with the floor dashed) and memory-vs-N (bottom row) per (op, dtype), to a PNG.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: no measured result to plot.
    """
    if not matplotlib_available():
        raise ImportError(MATPLOTLIB_MISSING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.measurement is not None]
    if not measured:
        raise ValueError("no measured result to plot")
    # One column per dtype too: the lines of two dtypes' runs of a case would be joined into one.
    panels = list(dict.fromkeys((r.op, r.dtype) for r in measured))
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
    for col, (op_name, dtype) in enumerate(panels):
        rows = [r for r in measured if (r.op, r.dtype) == (op_name, dtype)]
        time_ax, mem_ax = axes[0][col], axes[1][col]
        for case in dict.fromkeys(r.case for r in rows):
            pts = sorted(((r.size or r.n, m.median_ms, m.p20_ms, m.p80_ms, _mib(m.peak_extra_bytes))
                          for r in rows if r.case == case for m in [r.measurement] if m is not None),
                         key=lambda p: p[0])
            ns = [p[0] for p in pts]
            line = time_ax.plot(ns, [p[1] for p in pts], marker="o", label=case)[0]
            time_ax.fill_between(ns, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.2)
            # A case whose memory was not measured has no point there, rather than a zero.
            memory = [(p[0], p[4]) for p in pts if p[4] is not None]
            if memory:
                mem_ax.plot([p[0] for p in memory], [p[1] for p in memory], marker="o", label=case,
                            color=line.get_color())
        # The floor is timed next to every case: plot its median per N.
        floor_times: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if r.floor_ms:
                floor_times[r.size or r.n].append(r.floor_ms)
        floor = [(n, statistics.median(times)) for n, times in sorted(floor_times.items())]
        if floor:
            time_ax.plot([f[0] for f in floor], [f[1] for f in floor], "k--", label=f"floor: {rows[0].floor.split(' (')[0]}")
        title = f"{op_name} ({dtype}, D={rows[0].d})"
        time_ax.set(title=title, xlabel="N", ylabel="median time (ms), p20-p80 shaded", yscale="log")
        mem_ax.set(title=f"{op_name} ({dtype}): peak extra memory", xlabel="N", ylabel="MiB")
        # symlog: a zero growth (memory reused) still shows, linear below 1 MiB.
        mem_ax.set_yscale("symlog", linthresh=1.0)
        for ax in (time_ax, mem_ax):
            ax.set_xscale("log", base=2)
        time_ax.legend(fontsize=7)
        mem_ax.legend(fontsize=7)
        for ax in (time_ax, mem_ax):
            ax.grid(True, which="both", alpha=0.3)
    device = measured[0].env.get("device", "")
    fig.suptitle(f"torchfg bench on {device} (torch {measured[0].env.get('torch', '?')})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
