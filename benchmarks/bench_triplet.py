"""Benchmark batch-hard / adaptive triplet loss, forward + backward.

Methods:
  fused      torchfg with backend="triton" (CUDA; CPU only under TRITON_INTERPRET=1, slow)
  reference  torchfg with backend="torch" (chunked mining, exact O(N D) loss)
  torch      plain PyTorch: torch.cdist + label masks + max/min (N x N matrices)
  pml        pytorch-metric-learning BatchHardMiner + TripletMarginLoss
             (LpDistance(normalize_embeddings=False), MeanReducer)
  floor      x @ x.T at the same size and dtype: what any exact all-pairs method pays

Each row reports the median / p20 / p80 time in ms and the peak extra memory: on CUDA the
allocator's peak above the inputs, on the CPU the growth of the process's peak RSS over the whole
run (warm-up included; the peak mark is reset first where Linux allows), which is only meaningful
in a fresh process: use --fresh-process (one (method, N, dtype) per subprocess) for CPU memory
figures. Before the baseline, each method runs once on a tiny batch so that one-off code loading
(imports, dispatch tables, BLAS scratch) is not counted. Rows carry the 1-minute load average:
on a shared CPU, timings (and especially multi-threaded ones) are inflated by other processes.

Examples:
  python benchmarks/bench_triplet.py --device cuda --csv benchmarks/results/triplet_h100.csv
  python benchmarks/bench_triplet.py --device cpu --sizes 4096 8192 --dtypes fp32 \\
      --methods reference pml floor --fresh-process --csv benchmarks/results/triplet_cpu.csv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchfg.utils.benchmark import append_csv, environment_fields, matmul_floor, measure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("fused", "reference", "torch", "pml", "floor")
LOSSES = ("batch_hard", "adaptive")
MIB = 2**20


def make_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device, per_class: int, text_dim: int, seed: int = 0):
    """Embeddings (n, d), P x K labels (shuffled) and text embeddings (n, text_dim)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    labels = (torch.arange(n) // per_class)[torch.randperm(n, generator=gen)].to(device)
    text = torch.randn(n, text_dim, generator=gen).to(device=device, dtype=dtype)
    return x, labels, text


def plain_torch_batch_hard(x: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """The textbook implementation: full distance matrix, masks, max/min."""
    dist = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    hardest_pos = dist.masked_fill(~same | eye, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    valid = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
    losses = torch.relu(hardest_pos - hardest_neg + margin)
    return torch.where(valid, losses, torch.zeros_like(losses)).sum() / valid.sum().clamp_min(1)


def build_step(method: str, loss: str, x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, margin: float):
    """A closure running forward + backward once (None for the floor, which times x @ x.T)."""
    if loss == "adaptive" and method in ("torch", "pml"):
        raise ValueError(f"method {method!r} has no adaptive triplet loss")
    leaf = x.detach().requires_grad_(True)
    if method in ("fused", "reference"):
        import torchfg.functional as TF

        backend = "triton" if method == "fused" else "torch"
        if loss == "adaptive":

            def step():
                leaf.grad = None
                TF.adaptive_triplet_loss(leaf, labels, text, base_margin=margin, margin_scale=0.5, backend=backend).backward()

        else:

            def step():
                leaf.grad = None
                TF.triplet_margin_loss(leaf, labels, margin=margin, backend=backend).backward()

        return step
    if method == "torch":

        def step():
            leaf.grad = None
            plain_torch_batch_hard(leaf, labels, margin).backward()

        return step
    if method == "pml":
        from pytorch_metric_learning import distances, losses, miners, reducers

        distance = distances.LpDistance(normalize_embeddings=False)
        miner = miners.BatchHardMiner(distance=distance)
        loss_fn = losses.TripletMarginLoss(margin=margin, distance=distance, reducer=reducers.MeanReducer())

        def step():
            leaf.grad = None
            loss_fn(leaf, labels, miner(leaf, labels)).backward()

        return step
    raise ValueError(method)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_baseline() -> tuple[int, str]:
    """Resets the peak-RSS mark where Linux allows it; returns (baseline bytes, how).

    Peak RSS (ru_maxrss) only moves when it exceeds every earlier peak, so a transient peak during
    imports would hide the computation's memory. Writing 5 to /proc/self/clear_refs resets the
    mark to the current RSS; the growth of VmHWM over VmRSS is then the computation's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss * 1024, "hwm"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "maxrss"


def _peak_since(how: str) -> int:
    if how == "hwm":
        return (_status_kib("VmHWM") or 0) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(args: argparse.Namespace, method: str, loss: str, n: int, dtype_name: str) -> dict:
    """Measures one configuration in this process and returns its CSV row."""
    device = torch.device(args.device)
    dtype = DTYPES[dtype_name]
    # The load average says how shared the machine was: CPU timings on a busy host are inflated.
    row = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg_1min": round(os.getloadavg()[0], 2),
           "method": method, "loss": "-" if method == "floor" else loss, "n": n, "d": args.dim, "dtype": dtype_name, "per_class": args.per_class}
    kwargs = dict(warmup=args.warmup, repeat=args.repeat, max_seconds=args.max_seconds)
    try:
        if method == "floor":
            matmul_floor(64, args.dim, dtype, device, warmup=1, repeat=1)
            base, how = _rss_baseline()
            m = matmul_floor(n, args.dim, dtype, device, **kwargs)
        else:
            # A tiny call first loads code and lazily built dispatch state (custom-op machinery,
            # BLAS scratch), so the peak below is what the size-n computation itself needs.
            tiny = make_inputs(4 * args.per_class, args.dim, dtype, device, args.per_class, args.text_dim, seed=1)
            build_step(method, loss, *tiny, args.margin)()
            del tiny
            x, labels, text = make_inputs(n, args.dim, dtype, device, args.per_class, args.text_dim)
            step = build_step(method, loss, x, labels, text, args.margin)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            base, how = _rss_baseline()
            m = measure(step, device=device, **kwargs)
    except Exception as exc:  # a method that cannot run at this size is recorded, not fatal
        row.update(error=f"{type(exc).__name__}: {exc}"[:300])
        return row
    if device.type == "cuda":
        peak = m.peak_extra_bytes
    else:
        # Whole-run peak RSS growth (warm-up included): measure()'s own figure starts after warm-up.
        peak = max(_peak_since(how) - base, 0)
    row.update(
        median_ms=round(m.median_ms, 3),
        p20_ms=round(m.p20_ms, 3),
        p80_ms=round(m.p80_ms, 3),
        repeats=m.repeats,
        peak_extra_mib=round(peak / MIB, 1),
        threads=torch.get_num_threads(),
    )
    return row


def run_fresh(args: argparse.Namespace, method: str, loss: str, n: int, dtype_name: str) -> dict:
    """Runs one configuration in a subprocess (clean peak RSS) and returns its row."""
    cmd = [
        sys.executable, __file__, "--child", "--device", args.device, "--dim", str(args.dim),
        "--per-class", str(args.per_class), "--text-dim", str(args.text_dim), "--margin", str(args.margin),
        "--warmup", str(args.warmup), "--repeat", str(args.repeat), "--max-seconds", str(args.max_seconds),
        *(["--threads", str(args.threads)] if args.threads else []),
        "--methods", method, "--losses", "batch_hard" if method == "floor" else loss, "--sizes", str(n),
        "--dtypes", dtype_name,
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"method": method, "loss": loss, "n": n, "d": args.dim, "dtype": dtype_name, "error": f"timeout {args.timeout}s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"method": method, "loss": loss, "n": n, "d": args.dim, "dtype": dtype_name,
                "error": f"exit {out.returncode}: {out.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--losses", nargs="+", default=["batch_hard"], choices=LOSSES)
    parser.add_argument("--per-class", type=int, default=4, help="items per label (P x K batches)")
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating after this long (>= 3 runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--fresh-process", action="store_true", help="one subprocess per configuration (CPU memory)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-subprocess limit, seconds")
    parser.add_argument("--csv", default=None, help="append rows here (with device, versions, commit)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:
        row = run_one(args, args.methods[0], args.losses[0], args.sizes[0], args.dtypes[0])
        print(json.dumps(row))
        return

    env = environment_fields(args.device)
    rows = []
    for dtype_name in args.dtypes:
        for n in args.sizes:
            floor_ms = None
            configs = [("floor", "-")] if "floor" in args.methods else []
            configs += [(m, loss) for loss in args.losses for m in args.methods if m != "floor"]
            for method, loss in configs:
                if method in ("torch", "pml") and loss == "adaptive":
                    continue
                if method == "fused" and args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                    continue
                runner = run_fresh if args.fresh_process else run_one
                t0 = time.perf_counter()
                row = runner(args, method, loss, n, dtype_name)
                if method == "floor":
                    floor_ms = row.get("median_ms")
                if floor_ms and "median_ms" in row:
                    row["floor_ms"] = floor_ms
                    row["x_floor"] = round(row["median_ms"] / floor_ms, 2)
                row["fresh_process"] = args.fresh_process
                row.update(env)
                rows.append(row)
                shown = {k: row.get(k) for k in ("method", "loss", "n", "dtype", "median_ms", "peak_extra_mib", "x_floor", "error")}
                print(json.dumps({k: v for k, v in shown.items() if v is not None}), f"({time.perf_counter() - t0:.0f}s)", flush=True)
    if args.csv:
        append_csv(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
