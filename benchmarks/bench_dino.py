"""Benchmark the DINO loss, forward + backward: naive PyTorch vs the reference vs the fused kernel.

Implementations:

* ``naive``: the original method's formulation (softmax / log_softmax per crop, a Python loop over
  crop pairs, autograd), in fp32 math.
* ``reference``: ``torchfg.functional.dino_loss(..., backend="torch")``.
* ``fused``: ``backend="triton"`` (CUDA only; interpreted Triton timings are meaningless).

Each configuration reports the median / p20 / p80 time of one forward + backward and the peak
extra memory of that step (CUDA: allocator peak above what was allocated before; CPU: growth of
peak RSS measured in a fresh subprocess per configuration). Rows are appended to
``benchmarks/results/dino_<device>.csv``.

Examples:
    python benchmarks/bench_dino.py                                   # the issue's sizes, on CUDA
    python benchmarks/bench_dino.py --device cpu --out-dim 8192 --batch-sizes 8 16 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchfg.backends import triton_status  # noqa: E402
from torchfg.functional import dino_loss  # noqa: E402
from torchfg.utils.benchmark import append_csv, environment_fields, measure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("naive", "reference", "fused")
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def naive_dino_loss(student, teacher, center, n_crops, n_global):
    """The original method's loss: every pair's log_softmax product materialised by autograd."""
    student_out = (student.float() / STUDENT_TEMP).chunk(n_crops)
    teacher_out = F.softmax((teacher.float() - center) / TEACHER_TEMP, dim=-1).detach().chunk(n_global)
    total, pairs = 0.0, 0
    for i, q in enumerate(teacher_out):
        for v in range(n_crops):
            if v == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            pairs += 1
    return (total / pairs).to(student.dtype)


def make_step(impl: str, batch: int, n_crops: int, n_global: int, out_dim: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    student = (torch.randn(n_crops * batch, out_dim, generator=g) * 3).to(device, dtype).requires_grad_()
    teacher = (torch.randn(n_global * batch, out_dim, generator=g) * 3).to(device, dtype)
    center = (torch.randn(out_dim, generator=g) * 0.1).to(device)

    def step():
        if impl == "naive":
            loss = naive_dino_loss(student, teacher, center, n_crops, n_global)
        else:
            loss = dino_loss(
                student, teacher, center, n_crops=n_crops, n_global_crops=n_global,
                student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP,
                backend="torch" if impl == "reference" else "triton",
            )
        loss.backward()
        student.grad = None

    return step


def run_one(cfg: dict) -> dict:
    """Measure one configuration in this process; returns a CSV row."""
    device = torch.device(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    step = make_step(cfg["impl"], cfg["batch"], cfg["n_crops"], cfg["n_global"], cfg["out_dim"],
                     DTYPES[cfg["dtype"]], device)
    if device.type == "cpu":
        # Peak RSS only grows: the memory figure is the first full-size call of a fresh process,
        # after a tiny call that loads the code paths (lazy imports, dispatcher set-up).
        make_step(cfg["impl"], 1, cfg["n_crops"], cfg["n_global"], 8, DTYPES[cfg["dtype"]], device)()
        memory = measure(step, device=device, warmup=0, repeat=1)
        timing = measure(step, device=device, warmup=cfg["warmup"], repeat=cfg["repeat"], max_seconds=cfg["max_seconds"])
    else:
        timing = measure(step, device=device, warmup=cfg["warmup"], repeat=cfg["repeat"], max_seconds=cfg["max_seconds"])
        memory = timing
    return {
        "op": "dino_loss",
        "impl": cfg["impl"],
        "dtype": cfg["dtype"],
        "batch": cfg["batch"],
        "n_crops": cfg["n_crops"],
        "n_global": cfg["n_global"],
        "out_dim": cfg["out_dim"],
        "median_ms": round(timing.median_ms, 4),
        "p20_ms": round(timing.p20_ms, 4),
        "p80_ms": round(timing.p80_ms, 4),
        "peak_extra_mib": round(memory.peak_extra_bytes / 2**20, 2),
        "memory_method": getattr(memory, "memory_method", ""),
        "repeats": timing.repeats,
        "threads": torch.get_num_threads(),
        **environment_fields(device),
        "note": cfg.get("note", ""),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--n-crops", type=int, default=10)
    parser.add_argument("--n-global", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/dino_<device type>.csv")
    parser.add_argument("--note", default="", help="free text stored in every row (e.g. machine load)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: JSON config, prints a row
    args = parser.parse_args(argv)

    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    device = torch.device(args.device)
    impls = list(args.impls)
    if "fused" in impls:
        ok, why = triton_status(device)
        if not ok or device.type != "cuda":
            print(f"skipping fused: {why if not ok else 'interpreted Triton on the CPU is not a benchmark'}")
            impls.remove("fused")
    rows = []
    for dtype in args.dtypes:
        for batch in args.batch_sizes:
            for impl in impls:
                cfg = {
                    "impl": impl, "dtype": dtype, "batch": batch, "n_crops": args.n_crops, "n_global": args.n_global,
                    "out_dim": args.out_dim, "device": str(device), "warmup": args.warmup, "repeat": args.repeat,
                    "max_seconds": args.max_seconds, "note": args.note, "threads": args.threads,
                }
                if device.type == "cpu":
                    out = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(cfg)],
                        capture_output=True, text=True, check=True, env=os.environ.copy(),
                    )
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    row = run_one(cfg)
                rows.append(row)
                print(f"{impl:>9} {dtype} B={batch:<4} {row['median_ms']:9.3f} ms "
                      f"(p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})  peak extra {row['peak_extra_mib']:8.1f} MiB")
    path = args.csv or Path(__file__).resolve().parent / "results" / f"dino_{device.type}.csv"
    append_csv(path, rows)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
