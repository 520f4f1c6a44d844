"""Arguments and entry point of ``torchfg bench`` (wired into :mod:`torchfg.cli`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import torch

from torchfg.bench.core import (
    OP_NAMES, Result, default_dtype, kernel_time_rows, parse_dtype, parse_param, resolve_device, run_benchmarks,
)

__all__ = ["add_arguments", "run", "check_csv_format", "check_writable", "unmet_requests"]


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ops(text: str) -> list[str]:
    ops = _csv_list(text)
    unknown = [op for op in ops if op not in OP_NAMES]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(f"--ops takes a comma list among {','.join(OP_NAMES)}, got {text!r}")
    return ops


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes must be integers >= 2, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < math.inf:  # inf would reach int() and the subprocess timeout as a crash
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**64:  # torch.Generator.manual_seed's range; past it every case failed alike
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64 - 1, got {text!r}")
    return value


def _param(text: str) -> tuple[str, object]:
    try:
        return parse_param(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--param: {exc}") from None


def check_csv_format(path: str | os.PathLike) -> str | None:
    """Why rows of ``torchfg bench`` must not be appended to ``path`` (None: they may).

    A CSV written by another tool (the per-op scripts before the engine, a spreadsheet) would be
    rewritten under the union of both headers; better to say so before measuring anything.
    """
    import csv
    from pathlib import Path

    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    core = {"op", "case", "status", "n", "median_ms"}
    if not core <= set(header):
        return (f"{path} was not written by torchfg bench (its header lacks {sorted(core - set(header))}); "
                "append to a new file")
    return None


def check_writable(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be written (None: it can), found before anything is measured.

    The file is opened for appending, as the rows will be (its folder is created, as
    :func:`~torchfg.bench.measure.append_csv` would); a file that did not exist is removed again.
    """
    from pathlib import Path

    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        return f"cannot write {path} ({exc.strerror or exc})"
    if not existed:
        try:
            path.unlink()
        except OSError:
            pass
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchfg bench``."""
    parser.add_argument("--ops", type=_ops, default=list(OP_NAMES),
                        help=f"comma list of ops (default: all of {','.join(OP_NAMES)})")
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="comma list of N (default: per op and device; small on CPU)")
    parser.add_argument("--dim", type=_positive_int, default=None, help="feature width D (default: per op and device)")
    parser.add_argument("--dtype", default="auto",
                        help="bf16, fp16, fp32, fp64 or auto (bf16 on CUDA, fp32 on CPU); a comma list runs each in turn")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--repeat", type=_positive_int, default=10, help="timed runs per measurement (default 10)")
    parser.add_argument("--warmup", type=_non_negative_int, default=None, help="untimed runs first (default 2 on CUDA, 1 on CPU)")
    parser.add_argument("--max-seconds", type=_positive_float, default=5.0,
                        help="time budget of one measurement's timed runs; at least 3 runs (default 5)")
    parser.add_argument("--cases", type=_csv_list, default=None,
                        help="comma list of case names to run (default: all), e.g. 'torchfg[torch],pml.BatchHard'")
    parser.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                        help="an op parameter, e.g. k=100 (knn), n_crops=6 (dino), batch=4096 (xbm); repeatable")
    parser.add_argument("--kernel-times", metavar="PATH",
                        help="also profile 3 steps of each case and append its largest kernels' times per step "
                             "to this CSV (GPU kernels on CUDA, ATen ops' CPU time on a CPU; not with --isolate)")
    parser.add_argument("--launches", action="store_true",
                        help="also count each case's kernel launches per step and the peak bytes of its tensors "
                             "alive at once (one extra profiled step)")
    parser.add_argument("--case-timeout", type=_positive_float, default=None, metavar="SECONDS",
                        help="with --isolate: a measurement not done after this long is recorded as timed out")
    parser.add_argument("--memory-limit-gib", type=_positive_float, default=None, metavar="GIB",
                        help="with --isolate: a measurement allocating more is recorded as out of memory")
    parser.add_argument("--csv", default=None, metavar="PATH",
                        help="append one row per measurement to this CSV, written and flushed as each is measured")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write time-vs-N and memory-vs-N charts to this PNG")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=False,
                        help="run each measurement in a fresh subprocess (needed for meaningful CPU peak memory)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (torch.set_num_threads); default: torch's default")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (0 to 2**64 - 1)")
    parser.add_argument("--note", default=None, help="free text stored in a 'note' column of every CSV row")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def unmet_requests(results: Sequence[Result], requested: Sequence[str] | None) -> list[str]:
    """Why a finished run did not do what was asked (empty: it did), one line per reason.

    Nothing measured at all is a failure; so is any case named in ``--cases`` that was skipped or
    failed at some size: a script that asked for it by name must not read its absence as success.
    Cases that were not named (the default: every case) may be skipped, e.g. a GPU kernel on a CPU.
    """
    reasons = []
    if not any(r.status == "ok" for r in results):
        reasons.append("no case was measured")
    if requested:
        for r in results:
            if r.case in requested and r.status != "ok":
                size = f" N={r.size or r.n}" if r.n else ""
                reasons.append(f"--cases {r.case} ({r.op}{size}, {r.dtype}): {r.status}")
    return reasons


def run(args: argparse.Namespace) -> int:
    """Run ``torchfg bench`` with parsed arguments; returns the exit status.

    0 when every case named in ``--cases`` was measured at every size (without ``--cases``: when
    at least one case was), 1 otherwise (:func:`unmet_requests` says why on stderr), 2 for bad
    arguments. Each CSV row is appended and flushed to disk as soon as its case is measured (or
    has failed), so a run stopped by a timeout or a kill keeps every row it finished.
    """
    from torchfg.bench.measure import append_csv
    from torchfg.bench.report import MATPLOTLIB_MISSING, format_table, is_csv_row, matplotlib_available, plot_results

    if args.plot and not matplotlib_available():
        # Fail before spending minutes measuring.
        print(f"torchfg bench: {MATPLOTLIB_MISSING}", file=sys.stderr)
        return 2
    # Unwritable outputs fail now, not after minutes of measuring.
    for option, path in (("--csv", args.csv), ("--kernel-times", args.kernel_times), ("--plot", args.plot)):
        why = path and check_writable(path)
        if why:
            print(f"torchfg bench: {option}: {why}", file=sys.stderr)
            return 2
    if args.csv:
        why = check_csv_format(args.csv)
        if why:
            print(f"torchfg bench: --csv: {why}", file=sys.stderr)
            return 2
    if args.kernel_times and args.isolate:
        print("torchfg bench: --kernel-times profiles in this process; with --isolate it is ignored", file=sys.stderr)
        args.kernel_times = None
    if (args.case_timeout or args.memory_limit_gib) and not args.isolate:
        # Only a separate process can be stopped or bounded; say so rather than fail a preset run.
        print("torchfg bench: --case-timeout and --memory-limit-gib apply with --isolate only; ignored",
              file=sys.stderr)
        args.case_timeout = args.memory_limit_gib = None
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"torchfg bench: --device: {exc}", file=sys.stderr)
        return 2
    try:
        names = _csv_list(args.dtype) or ["auto"]
        dtypes = [default_dtype(device) if name == "auto" else parse_dtype(name) for name in names]
    except ValueError as exc:
        print(f"torchfg bench: --dtype: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        # Also exported so that --isolate subprocesses use the same number.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        print("torchfg bench: no CUDA device in use: timing the CPU paths; GPU kernels are skipped.", file=sys.stderr)
    written = []

    def save(result) -> None:
        # Row by row, written and flushed now: a run that is interrupted keeps what it measured.
        if args.csv and is_csv_row(result):
            append_csv(args.csv, [result.csv_row()])
            written.append(result)
        if args.kernel_times and result.kernel_times:
            append_csv(args.kernel_times, kernel_time_rows(result))

    results = []
    for dtype in dtypes:
        try:
            results += run_benchmarks(
                args.ops,
                sizes=args.sizes,
                dim=args.dim,
                dtype=dtype,
                device=device,
                repeat=args.repeat,
                warmup=args.warmup,
                max_seconds=args.max_seconds,
                isolate=args.isolate,
                seed=args.seed,
                progress=not args.no_progress,
                extra_fields={"note": args.note} if args.note else None,
                on_result=save,
                cases=args.cases,
                params=dict(args.param),
                launches=args.launches,
                kernel_times=bool(args.kernel_times),
                case_timeout=args.case_timeout,
                memory_limit_bytes=int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None,
            )
        except (ValueError, TypeError) as exc:
            # Bad --cases / --param values are found while planning, before anything is measured.
            print(f"torchfg bench: {exc}", file=sys.stderr)
            return 2
    print(format_table(results))
    if args.csv:
        print(f"\n{len(written)} rows appended to {args.csv}")
    if args.plot:
        try:
            path = plot_results(results, args.plot)
        except ValueError as exc:
            print(f"torchfg bench: no plot: {exc}", file=sys.stderr)
            return 1
        print(f"plot written to {path}")
    unmet = unmet_requests(results, args.cases)
    for reason in unmet:
        print(f"torchfg bench: {reason}", file=sys.stderr)
    return 1 if unmet else 0
