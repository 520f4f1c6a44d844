"""Arguments and entry point of ``torchfg demo`` (wired into :mod:`torchfg.cli`)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

__all__ = ["add_arguments", "run", "check_out_dir"]

EXPERIMENT_NAMES = ("semantic_attention", "atl_vs_triplet", "few_shot")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchfg demo``."""
    parser.add_argument("--quick", action="store_true",
                        help="every method with fewer steps on a smaller catalogue (under a minute on one CPU core)")
    parser.add_argument("--out", default="torchfg_demo", metavar="DIR",
                        help="directory for results.json and demo.png (default: ./torchfg_demo)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the dataset, initial weights, batch order and episodes (default 0)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads during the run (default 1: the demo's small convolutions gain "
                             "little from more, and one thread makes results independent of the core count)")
    parser.add_argument("--no-figure", action="store_true", help="do not write demo.png")
    parser.add_argument("--only", action="append", choices=EXPERIMENT_NAMES, metavar="EXPERIMENT",
                        help="run only this experiment (repeatable): " + ", ".join(EXPERIMENT_NAMES))
    parser.add_argument("--map-quality", choices=("predicted", "exact", "both"), default=None,
                        help="semantic maps of the attribute experiment: predicted (default; a parsing model's "
                             "errors), exact (the rendered ground truth) or both")


def check_out_dir(path: str | Path) -> str | None:
    """Why ``results.json`` and ``demo.png`` could not be written to ``path`` (None: they can).

    Checked before the experiments run, so that a read-only folder fails in a second with a
    message instead of a traceback after minutes of training. The folder is created if needed.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".torchfg-demo-write-test-"):
            pass
    except OSError as exc:
        return (f"--out: cannot write to {out} ({exc.strerror or exc}); "
                "pass --out DIR with a folder you can write to")
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``torchfg demo`` with parsed arguments; returns the exit status."""
    from torchfg.demo._common import resolve_device
    from torchfg.demo.run import run_demo

    try:
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"torchfg demo: {error}", file=sys.stderr)
        return 2
    why = check_out_dir(args.out)
    if why:
        print(f"torchfg demo: {why}", file=sys.stderr)
        return 2
    run_demo(
        quick=args.quick,
        out_dir=args.out,
        device=device,
        seed=args.seed,
        threads=args.threads,
        figure=not args.no_figure,
        experiments=args.only,
        map_quality=args.map_quality,
    )
    return 0
