"""Benchmark exact k-NN search: torchfg's backends against faiss-cpu and the x @ x.T floor.

Queries = gallery = N rows of width D (retrieval evaluation searches a set against itself).

Implementations (``--impls``):

* ``torch``: ``torchfg.knn(x, k=k, backend="torch")``, the self-search (gallery=None): chunked
  GEMM + topk that computes each pair once (symmetric tiles).
* ``torch-gallery``: ``torchfg.knn(x, x, k=k, backend="torch")``: the same search given an
  explicit gallery, i.e. the general chunked mm + topk path (every pair computed twice).
* ``triton``, ``cuda``: the streaming kernels (CUDA devices only; interpreted Triton timings are
  meaningless and skipped).
* ``faiss``: faiss-cpu ``IndexFlatL2`` (``IndexFlatIP`` for ``--metric dot/cosine``; cosine is
  searched on L2-normalised copies, made outside the timed region), CPU and fp32 only. Adding the
  gallery to the index is timed with the search.
* ``floor``: ``x @ x.T`` in the same dtype, the product any exact method computes.

Each row: median / p20 / p80 time, the ratio to the floor (timed in the same process), the
achieved TFLOP/s under the 2 N^2 D model, and peak extra memory (CUDA allocator peak; on a CPU
the peak RSS growth, meaningful with ``--isolate``: one fresh process per measurement).

``--interleave`` (for shared, noisy machines) times all implementations of one (dtype, N, k)
round-robin in one process, so that load changes hit them alike; rows then also carry the fastest
run (``min_ms``) and the median process CPU time (``cpu_ms``, all threads), and no memory figure.

Examples:
    python benchmarks/bench_knn.py                                # issue sizes on CUDA
    python benchmarks/bench_knn.py --device cpu --sizes 8192 16384 32768 --dtypes fp32 \\
        --impls torch torch-gallery faiss floor --repeat 3 --interleave
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchfg.backends import backend_status, triton_status  # noqa: E402
from torchfg.ops.knn import knn  # noqa: E402
from torchfg.utils.benchmark import append_csv, environment_fields, matmul_floor, measure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("torch", "torch-gallery", "triton", "cuda", "faiss", "floor")


def make_step(impl: str, n: int, d: int, k: int, dtype: torch.dtype, metric: str, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device, dtype)
    if impl == "floor":
        return lambda: x @ x.T
    if impl == "torch":
        return lambda: knn(x, k=k, metric=metric, backend="torch")
    if impl == "torch-gallery":
        return lambda: knn(x, x, k=k, metric=metric, backend="torch")
    if impl in ("triton", "cuda"):
        return lambda: knn(x, k=k, metric=metric, backend=impl)
    if impl == "faiss":
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        data = x.float()
        if metric == "cosine":
            data = torch.nn.functional.normalize(data, dim=1)
        data = data.contiguous().numpy()
        index_type = faiss.IndexFlatL2 if metric in ("sqeuclidean", "euclidean") else faiss.IndexFlatIP

        def search():
            index = index_type(d)
            index.add(data)
            return index.search(data, k)

        return search
    raise ValueError(impl)


def _load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return ""


def run_one(cfg: dict) -> dict:
    """Measure one configuration in this process; returns a CSV row."""
    device = torch.device(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    dtype = DTYPES[cfg["dtype"]]
    n, d, k, metric = cfg["n"], cfg["d"], cfg["k"], cfg["metric"]
    # One tiny call first: imports, kernel compilation and dispatcher set-up are not timed.
    make_step(cfg["impl"], max(2 * k, 64), d, k, dtype, metric, device)()
    step = make_step(cfg["impl"], n, d, k, dtype, metric, device)
    timing = measure(step, device=device, warmup=cfg["warmup"], repeat=cfg["repeat"], max_seconds=cfg["max_seconds"])
    floor = matmul_floor(n, d, dtype, device, warmup=1, repeat=max(3, min(cfg["repeat"], 10)),
                         max_seconds=cfg["max_seconds"])
    flops = 2.0 * n * n * d
    return {
        "op": "knn",
        "impl": cfg["impl"],
        "metric": metric,
        "dtype": cfg["dtype"],
        "n": n,
        "d": d,
        "k": k,
        "median_ms": round(timing.median_ms, 3),
        "p20_ms": round(timing.p20_ms, 3),
        "p80_ms": round(timing.p80_ms, 3),
        "floor_ms": round(floor.median_ms, 3),
        "x_floor": round(timing.median_ms / floor.median_ms, 3),
        "tflops": round(flops / (timing.median_ms * 1e-3) / 1e12, 4),
        "peak_extra_mib": round(timing.peak_extra_bytes / 2**20, 1),
        "memory_method": timing.memory_method,
        "repeats": timing.repeats,
        "threads": torch.get_num_threads(),
        "load_avg": _load_average(),
        **environment_fields(device),
        "note": cfg.get("note", ""),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_interleaved(impls: list[str], base: dict) -> list[dict]:
    """Time ``impls`` round-robin on the same data: ``base["repeat"]`` rounds after one warm-up."""
    device = torch.device(base["device"])
    if base.get("threads"):
        torch.set_num_threads(base["threads"])
    dtype = DTYPES[base["dtype"]]
    n, d, k, metric = base["n"], base["d"], base["k"], base["metric"]
    steps = {}
    for impl in impls:
        make_step(impl, max(2 * k, 64), d, k, dtype, metric, device)()
        steps[impl] = make_step(impl, n, d, k, dtype, metric, device)
    wall = {impl: [] for impl in impls}
    cpu = {impl: [] for impl in impls}
    for round_ in range(base["warmup"] + base["repeat"]):
        for impl in impls:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[impl]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= base["warmup"]:
                wall[impl].append((time.perf_counter() - t0) * 1e3)
                cpu[impl].append((time.process_time() - c0) * 1e3)
    floor_ms = statistics.median(wall["floor"]) if "floor" in wall else float("nan")
    flops = 2.0 * n * n * d
    rows = []
    for impl in impls:
        median = statistics.median(wall[impl])
        rows.append({
            "op": "knn", "impl": impl, "metric": metric, "dtype": base["dtype"], "n": n, "d": d, "k": k,
            "median_ms": round(median, 3),
            "p20_ms": round(_quantile(wall[impl], 0.2), 3),
            "p80_ms": round(_quantile(wall[impl], 0.8), 3),
            "min_ms": round(min(wall[impl]), 3),
            "cpu_ms": round(statistics.median(cpu[impl]), 3),
            "floor_ms": round(floor_ms, 3),
            "x_floor": round(median / floor_ms, 3),
            "tflops": round(flops / (median * 1e-3) / 1e12, 4),
            "peak_extra_mib": "",
            "memory_method": "not measured (interleaved)",
            "repeats": len(wall[impl]),
            "threads": torch.get_num_threads(),
            "load_avg": _load_average(),
            **environment_fields(device),
            "note": base.get("note", ""),
        })
    return rows


def available(impl: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if impl in ("torch", "torch-gallery", "floor"):
        return True, ""
    if impl == "faiss":
        if device.type != "cpu":
            return False, "faiss-cpu searches CPU arrays only"
        if dtype != torch.float32:
            return False, "faiss searches fp32 only"
        try:
            import faiss  # noqa: F401
        except ImportError:
            return False, "faiss is not installed (pip install faiss-cpu)"
        return True, ""
    if device.type != "cuda":
        return False, "kernel backends need a CUDA device (interpreted Triton is not a benchmark)"
    if impl == "triton":
        return triton_status(device)
    return backend_status("knn", "cuda", device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072], help="N (queries = gallery)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--metric", default="euclidean", choices=["sqeuclidean", "euclidean", "cosine", "dot"])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--isolate", action="store_true", help="one fresh process per measurement (CPU memory)")
    parser.add_argument("--interleave", action="store_true",
                        help="time all impls of one (dtype, N, k) round-robin in one process (noisy machines)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/knn_<device type>.csv")
    parser.add_argument("--note", default="", help="free text stored in every row (e.g. machine load)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: JSON config, prints a row
    args = parser.parse_args(argv)

    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    device = torch.device(args.device)
    rows = []
    for dtype_name in args.dtypes:
        for n in args.sizes:
            for k in args.ks:
                impls = []
                for impl in args.impls:
                    if impl == "floor" and k != args.ks[0] and not args.interleave:
                        continue  # the floor does not depend on k
                    ok, why = available(impl, device, DTYPES[dtype_name])
                    if ok:
                        impls.append(impl)
                    else:
                        print(f"skip {impl} {dtype_name} N={n} k={k}: {why}")
                base = {
                    "dtype": dtype_name, "n": n, "d": args.dim, "k": k, "metric": args.metric,
                    "device": str(device), "warmup": args.warmup, "repeat": args.repeat,
                    "max_seconds": args.max_seconds, "threads": args.threads, "note": args.note,
                }
                if args.interleave:
                    new_rows = run_interleaved(impls, base)
                else:
                    new_rows = []
                    for impl in impls:
                        cfg = {**base, "impl": impl}
                        if args.isolate:
                            out = subprocess.run(
                                [sys.executable, __file__, "--one", json.dumps(cfg)],
                                capture_output=True, text=True, check=True, env=os.environ.copy(),
                            )
                            new_rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                        else:
                            new_rows.append(run_one(cfg))
                for row in new_rows:
                    extra = f"  min {row['min_ms']:.1f} cpu {row['cpu_ms']:.1f}" if "min_ms" in row else \
                        f"  peak extra {row['peak_extra_mib']:8.1f} MiB"
                    print(f"{row['impl']:>13} {dtype_name} N={n:<7} k={k:<4} {row['median_ms']:11.1f} ms "
                          f"(p20 {row['p20_ms']:.1f}, p80 {row['p80_ms']:.1f})  x floor {row['x_floor']:6.2f}"
                          f"{extra}  load {row['load_avg']}", flush=True)
                rows.extend(new_rows)
    path = args.csv or Path(__file__).resolve().parent / "results" / f"knn_{device.type}.csv"
    append_csv(path, rows)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
