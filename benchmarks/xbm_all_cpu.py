"""All-triplets cross-batch memory on the CPU: torchfg against pytorch-metric-learning.

One process per measurement (run the implementations interleaved, several rounds): the memory is
filled by ``memory // batch`` steps, then ``--steps`` steps (enqueue, mine every triplet, loss,
backward) are timed and one more is profiled for its tensor peak (``torchfg.bench.profile``). Both
use a margin of 0.2 on L2-normalised random embeddings and PML's reducer (``mean_nonzero``). This
is how ``results/xbm_all_cpu.csv`` was measured:

    for round in 1 2 3; do for impl in torchfg pml; do
        python benchmarks/xbm_all_cpu.py --impl $impl; done; done
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torchfg.bench.profile import profile_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("torchfg", "pml"), required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--memory", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.impl == "torchfg":
        from torchfg.losses import CrossBatchMemory, TripletMarginLoss

        loss = TripletMarginLoss(margin=0.2, mining="all", reduction="mean_nonzero")
        xbm = CrossBatchMemory(loss, args.dim, args.memory)
    else:
        from pytorch_metric_learning import losses
        from pytorch_metric_learning.distances import LpDistance

        loss = losses.TripletMarginLoss(margin=0.2, distance=LpDistance(normalize_embeddings=False))
        xbm = losses.CrossBatchMemory(loss, args.dim, memory_size=args.memory)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=gen), dim=1).requires_grad_()
        labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
        value = xbm(x, labels)
        value.backward()
        return float(value.detach())

    for _ in range(max(1, args.memory // args.batch)):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - start)
    peak = profile_step(step).peak_live_bytes
    print(f"impl={args.impl} batch={args.batch} memory={args.memory} dim={args.dim} classes={args.classes} "
          f"median_ms={1000 * statistics.median(times):.1f} loss={value:.4f} tensor_peak_mib={peak / 2**20:.1f}")


if __name__ == "__main__":
    main()
