"""The ``torchfg`` command: ``torchfg info``, ``torchfg bench`` and ``torchfg demo``."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Sequence

import torch

import torchfg
import torchfg.ops  # noqa: F401  (registers every op's backends)
from torchfg.backends import registered_ops, triton_interpreter_enabled


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def info_lines() -> list[str]:
    """What `torchfg info` prints: versions, the device and each backend's availability."""
    device = _device()
    lines = [
        f"torchfg {torchfg.__version__}",
        f"python  {platform.python_version()} ({sys.executable})",
        f"torch   {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"device  {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
        f"TRITON_INTERPRET={'1' if triton_interpreter_enabled() else 'unset'}",
        "backends per op (auto's order; torch, the pure PyTorch reference, runs anywhere):",
    ]
    for op, specs in sorted(registered_ops().items()):
        lines.append(f"  {op}")
        for spec in specs:
            ok, why = spec.available(device)
            limits = []
            if spec.dtypes is not None:
                limits.append("dtypes " + "/".join(str(d).removeprefix("torch.") for d in spec.dtypes))
            if spec.max_k is not None:
                limits.append(f"k <= {spec.max_k}")
            if spec.needs_build:
                limits.append("built on first explicit use; auto takes it once built")
            extra = f"; {', '.join(limits)}" if limits else ""
            lines.append(f"    {spec.name:<7} {'available' if ok else 'unavailable'} ({why}{extra})")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchfg", description="torchfg: fine-grained recognition and retrieval.")
    parser.add_argument("--version", action="version", version=f"torchfg {torchfg.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends").set_defaults(func=_cmd_info)
    from torchfg.bench import cli as bench_cli

    bench = sub.add_parser("bench", help="time every backend of each op against the baselines",
                           description="Time every torchfg backend of each op against the baselines.")
    bench_cli.add_arguments(bench)
    bench.set_defaults(func=bench_cli.run)
    from torchfg.demo import cli as demo_cli

    demo = sub.add_parser("demo", help="train and evaluate each method on the embedded synthetic dataset",
                          description="Three small experiments on SyntheticProducts: semantic attention, "
                                      "ATL vs triplet retrieval, few-shot with DINO. Prints a table and "
                                      "writes results.json and demo.png.")
    demo_cli.add_arguments(demo)
    demo.set_defaults(func=demo_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
