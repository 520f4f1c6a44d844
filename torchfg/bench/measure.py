"""Timing, memory and CSV helpers of the benchmark engine (``torchfg bench`` and its presets).

Times are medians with p20/p80 over repeated runs (CUDA events on GPU, perf_counter on CPU).
Peak extra memory is the allocator's peak above what was allocated before the call on GPU. On
the CPU it is the process's peak resident set size (RSS) above its RSS before the first call: on
Linux the peak is reset first (``/proc/self/clear_refs``), elsewhere it is the growth of the
lifetime peak. Either way the C allocator keeps freed pages of earlier work resident, so CPU figures
are only trustworthy in a fresh process (one configuration per process; ``torchfg bench --isolate``).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gc
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

__all__ = [
    "Measurement",
    "measure",
    "current_rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "matmul_floor",
    "device_name",
    "environment_fields",
    "git_commit",
    "append_csv",
]


@dataclass
class Measurement:
    """Timing quantiles over ``repeats`` runs and the peak memory above the starting point.

    ``memory_method`` says how ``peak_extra_bytes`` was obtained: ``"cuda_allocator"``,
    ``"rss_reset_peak"`` (Linux, peak reset before the first call) or ``"rss_peak_growth"``; or
    ``"not measured: <why>"`` with ``peak_extra_bytes`` None, for a case whose memory the
    measurement cannot see (:attr:`torchfg.bench.core.Case.memory_unmeasured`).
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_bytes: int | None
    repeats: int
    memory_method: str = ""


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_bytes() -> int:
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (since start or the last :func:`reset_peak_rss`)."""
    return _peak_rss_bytes()


def current_rss_bytes() -> int | None:
    """The process's resident set size in bytes now, or None where /proc is not available."""
    rss = _proc_status_kib("VmRSS")
    return None if rss is None else rss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


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
        warmup: untimed runs first (compilation, autotuning, caches).
        repeat: timed runs.
        max_seconds: stop timing after this long once at least 3 runs are done.

    Returns:
        A :class:`Measurement` (times in ms, peak memory in bytes above the state before ``fn``).

    Example:
        >>> x = torch.randn(64, 32)
        >>> m = measure(lambda: x @ x.T, device="cpu", warmup=1, repeat=5)
        >>> m.repeats, m.p20_ms <= m.median_ms <= m.p80_ms
        (5, True)
    """
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not is_cuda:
        # The warmup is inside the CPU memory window: after it, freed pages stay resident in the C
        # allocator and the timed runs would show no growth at all.
        # Young generations only: a full collection costs ~0.5 s once torch is imported.
        gc.collect(1)
        current = current_rss_bytes()
        if current is not None and reset_peak_rss():
            memory_method, base = "rss_reset_peak", current
        else:
            memory_method, base = "rss_peak_growth", _peak_rss_bytes()
    for _ in range(warmup):
        fn()
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory_method, base = "cuda_allocator", torch.cuda.memory_allocated(device)
    times: list[float] = []
    # The events go on the measured device's stream: record() without one uses the current
    # device's, which is not ``device`` when a run on cuda:1 did not make it current.
    stream = torch.cuda.current_stream(device) if is_cuda else None
    start_all = time.perf_counter()
    for _ in range(repeat):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
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
        memory_method=memory_method,
    )


def matmul_floor(
    n: int, d: int, dtype: torch.dtype, device: torch.device | str, m: int | None = None, **kwargs: Any
) -> Measurement:
    """Time of ``x @ y.T`` for x (n, d) and y (m, d), y = x when ``m`` is None.

    That product (2 n m d FLOPs) is the floor any exact all-pairs method must pay; ``kwargs`` go to
    :func:`measure`.

    Example:
        >>> matmul_floor(32, 16, torch.float32, "cpu", repeat=3).repeats
        3
    """
    x = torch.randn(n, d, device=device, dtype=dtype)
    y = x if m is None else torch.randn(m, d, device=device, dtype=dtype)
    return measure(lambda: x @ y.T, device=device, **kwargs)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


# The folder holding the ``torchfg`` package: the checkout's root when torchfg runs from one.
_CHECKOUT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=_CHECKOUT)
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit() -> str:
    """Short commit of the checkout, with ``+dirty`` when the measured code differs from it.

    The measured code is the package, C and CUDA sources included (changed or untracked files
    under ``torchfg/``); unrelated files of the checkout (notebooks, results) do not count. Git is
    trusted only when the folder above the ``torchfg`` package is the top of its work tree: an
    install inside another repository (a project's ``.venv``, a vendored copy) would otherwise
    record that repository's commit, so it records ``unknown``. ``TORCHFG_BENCH_COMMIT``
    overrides it, for a copy of the tree whose git history is not the code's (the device
    machines here ship the working tree over the last landed commit's history).
    """
    override = os.environ.get("TORCHFG_BENCH_COMMIT", "").strip()
    if override:
        return override
    try:
        top = _git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != _CHECKOUT:
            return "unknown"
        commit = _git("rev-parse", "--short", "HEAD")
        if not commit:
            return "unknown"
        changed = _git("status", "--porcelain", "--", ":/torchfg")
        return commit + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_fields(device: torch.device | str) -> dict[str, str]:
    """Columns that make a CSV row reproducible: device, versions, commit."""
    from torchfg._version import __version__ as torchfg_version

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {
        "device": device_name(device),
        # The package's own version: the commit is "unknown" outside a checkout of torchfg.
        "torchfg": torchfg_version,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "threads": str(torch.get_num_threads()),
        # CPU timings on a shared machine depend on what else runs: keep the 1-minute load.
        "load_avg": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
    }


def append_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a CSV and flush them to disk before returning; the header is written when the file is new.

    Rows are appended to the end of the file (never a rewrite), flushed and fsynced, so a run
    killed right after this call (``timeout``, SIGKILL, an out-of-memory kill) keeps every row
    written so far. Only when a row brings a column the header lacks is the file rewritten with
    the union of the columns, through a temporary file and an atomic rename, so that an
    interruption leaves either the old file or the new one.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.csv"
        >>> append_csv(path, [{"case": "a", "ms": 1.5}])
        >>> append_csv(path, [{"case": "b", "ms": 2.0, "note": "x"}])
        >>> path.read_text().splitlines()
        ['case,ms,note', 'a,1.5,', 'b,2.0,x']
    """
    rows = [{k: (asdict(v) if isinstance(v, Measurement) else v) for k, v in r.items()} for r in rows]
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path):
        _append_rows(path, rows)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``<path>.lock`` for the block: two benchmark processes writing
    one CSV lost rows when one appended while the other rewrote the file under a wider header. (A
    lock on the CSV itself would not do: the rewrite replaces that file.)"""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    header: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    fields = list(header)
    for row in rows:
        fields += [key for key in row if key not in fields]
    if header and fields != header:
        # A new column: rewrite the whole file under the wider header, atomically.
        with path.open(newline="") as f:
            existing = list(csv.DictReader(f))
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(existing + rows)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, path.stat().st_mode & 0o7777)  # the CSV's mode, not mkstemp's 0600
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    if header:
        _ensure_trailing_newline(path)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not header:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _ensure_trailing_newline(path: Path) -> None:
    """A file cut mid-line (by hand, or an old writer killed mid-write) must not merge with the next row."""
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) not in (b"\n", b"\r"):
            f.write(b"\r\n")
