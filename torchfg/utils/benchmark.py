"""Timing and memory measurement shared by `torchfg bench` and the scripts in benchmarks/.

Times are medians with p20/p80 over repeated runs (CUDA events on GPU, perf_counter on CPU).
Peak extra memory is the allocator's peak above what was allocated before the call on GPU; on
the CPU it is the growth of the process's peak RSS, which is only meaningful in a fresh process
(measure one configuration per process for CPU memory figures).
"""

from __future__ import annotations

import csv
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = [
    "Measurement",
    "measure",
    "matmul_floor",
    "device_name",
    "environment_fields",
    "append_csv",
]


@dataclass
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_bytes: int
    repeats: int


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(
    fn: Callable[[], Any],
    *,
    device: torch.device | str,
    warmup: int = 2,
    repeat: int = 10,
    max_seconds: float | None = None,
) -> Measurement:
    """Run ``fn`` ``warmup`` times, then time ``repeat`` runs (fewer if ``max_seconds`` runs out).

    Args:
        fn: a closure doing the work (e.g. forward + backward); its result is dropped.
        device: where the work runs; CUDA uses events and the caching allocator's peak.
    """
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_rss_bytes()
    times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(repeat):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    if is_cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _peak_rss_bytes() - base
    return Measurement(
        median_ms=statistics.median(times),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        peak_extra_bytes=max(int(peak), 0),
        repeats=len(times),
    )


def matmul_floor(n: int, d: int, dtype: torch.dtype, device: torch.device | str, **kwargs: Any) -> Measurement:
    """Time of ``x @ x.T`` for x of shape (n, d): the floor any exact all-pairs method must pay."""
    x = torch.randn(n, d, device=device, dtype=dtype)
    return measure(lambda: x @ x.T, device=device, **kwargs)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_fields(device: torch.device | str) -> dict[str, str]:
    """Columns that make a CSV row reproducible: device, versions, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
    }


def append_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a CSV, writing the header when the file is new. Columns are the union of keys."""
    rows = list(rows)
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            fields = next(csv.reader(f), [])
    for row in rows:
        for key in row:
            if key not in fields:
                fields.append(key)
    existing: list[dict[str, str]] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            existing = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in existing + [
            {k: (asdict(v) if isinstance(v, Measurement) else v) for k, v in r.items()} for r in rows
        ]:
            writer.writerow(row)
