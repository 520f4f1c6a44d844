"""Host (Python) time of one fused training step on the GPU code path, measured on any machine.

At N = 8192 the fused batch-hard step is host-bound on an H200 (1.25 ms per step, of which the
kernels are 0.53 ms; `h200_kernels.csv`). This script times what the host does per step without
a GPU: the launchers take their GPU branch (autotuned tiles, an emulated H100's SM count for the
split sizes, as `compile_sm90.py` traces them) and every Triton JIT launch is replaced by a
counter, so the time is torchfg's and PyTorch's Python work, the autotuner's and the dispatcher's,
but not Triton's own launcher (binding the arguments, the driver call), which needs a GPU.

Each case runs `--warmup` steps (the first tunes: the autotuner's benchmark is replaced by fixed
timings), then `--chunks` chunks of `--steps` steps; a chunk's time is the median of its steps'
CPU time of this thread (`time.thread_time`: a shared VM's stolen time is not counted), and the
row reports the median and the best chunk. One row per case is appended to `--out` as soon as that
case is done.

Examples:
    python benchmarks/step_host.py --out benchmarks/results/step_host_cpu.csv --note "..."
    python benchmarks/step_host.py --n 256 --steps 5 --chunks 2 --out /tmp/host.csv
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

# The GPU code path: kernels must be JIT functions, not the interpreter's.
os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = ("batch_hard", "atl")
FIELDS = ["device", "python", "torch", "triton", "commit", "load_avg", "note", "case", "n", "d", "dtype",
          "host_us_median", "host_us_best", "chunks", "steps_per_chunk", "jit_launches"]


def _stub_launches() -> list[int]:
    """Replace every JIT launch by a counter and the autotuner's benchmark by fixed timings."""
    from triton.runtime import autotuner, jit

    import torchfg.backends as backends

    count = [0]

    def run(fn, *args, grid, warmup=False, **kwargs):  # noqa: ARG001 - nothing is launched
        count[0] += 1

    jit.JITFunction.run = run
    autotuner.Autotuner._bench = lambda tuner, *args, config, **kwargs: [1.0, 1.0, 1.0]
    # CPU tensors stand in for CUDA ones: the backends must accept them.
    backends.triton_status = lambda device=None: (True, "launches stubbed (step_host.py)")
    return count


def _cases(n: int, d: int, text_dim: int) -> dict[str, Callable[[], object]]:
    import torch

    from torchfg.functional import adaptive_triplet_loss, triplet_margin_loss

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16).requires_grad_()
    labels = torch.arange(n) // 4
    text = torch.randn(n, text_dim, generator=gen).to(torch.bfloat16)
    return {
        "batch_hard": lambda: torch.autograd.grad(
            triplet_margin_loss(x, labels, margin=0.2, mining="batch_hard", backend="triton"), x),
        "atl": lambda: torch.autograd.grad(adaptive_triplet_loss(x, labels, text, backend="triton"), x),
    }


def measure(fn: Callable[[], object], warmup: int, chunks: int, steps: int) -> tuple[float, float]:
    """(median, best) over chunks of the chunk's median step time, in microseconds."""
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(chunks):
        times = []
        for _ in range(steps):
            start = time.thread_time()
            fn()
            times.append(time.thread_time() - start)
        medians.append(statistics.median(times))
    return statistics.median(medians) * 1e6, min(medians) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cases", default="batch_hard,atl")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown or not names:
        parser.error(f"--cases takes a comma list among {','.join(CASES)}, got {args.cases!r}")

    import torch
    import triton

    from compile_sm90 import _EmulatedH100
    from torchfg.bench.measure import append_csv, git_commit

    launches = _stub_launches()
    cases = _cases(args.n, args.d, args.text_dim)
    # The commit as torchfg bench records it: TORCHFG_BENCH_COMMIT where the checkout's history is
    # not the code's (the device machines), "+dirty" only for changes under torchfg/.
    commit = git_commit()
    with _EmulatedH100():
        for name in names:
            median, best = measure(cases[name], args.warmup, args.chunks, args.steps)
            launches[0] = 0
            cases[name]()
            row = {
                "device": f"CPU {platform.machine()} x{os.cpu_count()}", "python": platform.python_version(),
                "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
                "load_avg": f"{os.getloadavg()[0]:.2f}", "note": args.note, "case": name, "n": args.n, "d": args.d,
                "dtype": "bfloat16", "host_us_median": f"{median:.0f}", "host_us_best": f"{best:.0f}",
                "chunks": args.chunks, "steps_per_chunk": args.steps, "jit_launches": launches[0],
            }
            # Written and flushed now: a step budget that runs out (gpu_session.sh) keeps the cases done.
            append_csv(args.out, [{field: row[field] for field in FIELDS}])
            print(f"{name}: {median:.0f} us per step (best chunk {best:.0f}), {launches[0]} JIT launches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
