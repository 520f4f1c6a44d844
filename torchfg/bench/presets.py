"""Named runs of the engine: the sizes and settings of each issue's benchmark, behind ``benchmarks/bench_*.py``.

A preset is a list of ``torchfg bench`` argument lists, one per device type: the scripts in
``benchmarks/`` only call :func:`main` with their preset's name, so every baseline, timer and CSV
row comes from the one engine (:mod:`torchfg.bench`). Arguments given to the script are appended
to each of the preset's runs, so they override its choices (``--sizes``, ``--repeat``, ``--csv``,
``--param k=5``, ...). ``--show`` prints the equivalent ``torchfg bench`` command lines instead of
running them.

Example:
    >>> [" ".join(run) for run in preset_runs("knn", "cpu")][0]  # doctest: +ELLIPSIS
    '--ops knn --sizes 4096,8192 --dim 512 --dtype fp32 --param k=10 ...'
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from typing import Sequence

from torchfg.bench import cli as bench_cli

__all__ = ["Preset", "PRESETS", "preset_runs", "main"]


@dataclass(frozen=True)
class Preset:
    """A named benchmark: one or more engine runs per device type.

    Args:
        name: the preset's name (``benchmarks/bench_<name>.py``).
        description: what it measures, for ``--help``.
        runs: device type (``"cpu"``, ``"cuda"``) -> the argument lists of ``torchfg bench``.
    """

    name: str
    description: str
    runs: dict[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)


# On a CPU every measurement runs in its own process: peak-RSS memory figures need one.
_CPU = ("--isolate", "--threads", "1", "--max-seconds", "30")

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "triplet",
            "batch-hard and adaptive triplet loss, forward + backward, against plain PyTorch, "
            "pytorch-metric-learning and the x @ x.T floor (issue 14)",
            {
                "cuda": (("--ops", "triplet,atl", "--sizes", "4096,8192,16384,32768", "--dim", "512",
                          "--dtype", "bf16,fp32", "--launches"),),
                "cpu": (("--ops", "triplet,atl", "--sizes", "1024,4096", "--dim", "512", "--dtype", "fp32",
                         "--repeat", "5", *_CPU),),
            },
        ),
        Preset(
            "knn",
            "exact k-NN (k = 10 and 100) against torch.cdist + topk, faiss and the x @ x.T floor (issue 15)",
            {
                "cuda": tuple(
                    ("--ops", "knn", "--sizes", "8192,32768,131072", "--dim", "512", "--dtype", "bf16,fp32",
                     "--param", f"k={k}")
                    for k in (10, 100)
                ),
                "cpu": tuple(
                    ("--ops", "knn", "--sizes", "4096,8192", "--dim", "512", "--dtype", "fp32",
                     "--param", f"k={k}", "--repeat", "3", *_CPU)
                    for k in (10, 100)
                ),
            },
        ),
        Preset(
            "dino",
            "DINO loss training step (2 global + 8 local crops) against the official facebookresearch/dino "
            "DINOLoss, time and peak memory (issue 15)",
            {
                "cuda": (("--ops", "dino", "--sizes", "64,128,256", "--dim", "65536", "--dtype", "bf16,fp32"),),
                "cpu": (("--ops", "dino", "--sizes", "8,16,32", "--dim", "16384", "--dtype", "fp32,bf16",
                         "--repeat", "7", *_CPU),),
            },
        ),
        Preset(
            "xbm",
            "cross-batch memory (batch 4096 against banks of 65,536 to 1,048,576 rows, D = 512), batch-hard "
            "and ATL, forward + backward, with PML, the floor, peak memory and launches per step (issue 14)",
            {
                "cuda": (
                    ("--ops", "xbm", "--sizes", "65536,262144,1048576", "--dim", "512", "--param", "batch=4096",
                     "--launches"),
                    ("--ops", "triplet,atl", "--sizes", "4096,8192,32768", "--dim", "512", "--launches"),
                ),
                # 2 B M D FLOPs at B = 4096: the 1,048,576 bank is minutes per step on one CPU core.
                "cpu": (
                    ("--ops", "xbm", "--sizes", "65536,262144", "--dim", "512", "--param", "batch=4096",
                     "--launches", "--repeat", "3", "--warmup", "0", "--case-timeout", "600",
                     "--memory-limit-gib", "6", *_CPU),
                    ("--ops", "triplet,atl", "--sizes", "4096", "--dim", "512", "--dtype", "fp32", "--launches",
                     "--repeat", "5", *_CPU),
                ),
            },
        ),
    )
}


def preset_runs(name: str, device_type: str) -> list[list[str]]:
    """The ``torchfg bench`` argument lists of preset ``name`` on a ``"cpu"`` or ``"cuda"`` device."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    return [list(run) for run in PRESETS[name].runs[device_type]]


def main(name: str, argv: Sequence[str] | None = None) -> int:
    """Run preset ``name`` through the engine; ``argv`` (default ``sys.argv[1:]``) is added to each run.

    Returns the first non-zero exit status of a run, else 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = PRESETS.get(name)
    if preset is None:
        print(f"presets: no preset {name!r}; there are {sorted(PRESETS)}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog=f"bench_{name}.py",
        description=f"Preset '{name}' of torchfg bench: {preset.description}. Any torchfg bench option "
        "given here is added to (and overrides) each of the preset's runs.",
    )
    parser.add_argument("--show", action="store_true", help="print the torchfg bench command lines and exit")
    bench_cli.add_arguments(parser)
    show = "--show" in argv
    argv = [arg for arg in argv if arg != "--show"]
    # The device decides the preset's sizes and dtypes: read it first.
    device = _device_type(argv)
    status = 0
    for run in preset_runs(name, device):
        full = [*run, *argv]
        if show:
            print("torchfg bench " + " ".join(shlex.quote(arg) for arg in full))
            continue
        code = bench_cli.run(parser.parse_args(full))
        status = status or code
    return status


def _device_type(argv: Sequence[str]) -> str:
    import torch

    reader = argparse.ArgumentParser(add_help=False)
    reader.add_argument("--device", default="auto")
    device = reader.parse_known_args(list(argv))[0].device
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(f"usage: python -m torchfg.bench.presets {{{','.join(PRESETS)}}} [torchfg bench options]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
