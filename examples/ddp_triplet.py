"""Train an embedder with cross-rank batch-hard triplet mining on torch.distributed.

    torchrun --nproc_per_node=2 examples/ddp_triplet.py              # CPU: gloo
    torchrun --nproc_per_node=8 examples/ddp_triplet.py --steps 200  # GPUs: nccl, one GPU per rank

Each rank embeds its own batch; with ``cross_rank=True`` the loss mines positives and negatives
among the embeddings of *all* ranks (gathered with gradients), so the effective mining batch is
world_size times larger. The loss is scaled so that DDP's gradient averaging yields exactly the
gradient of the single-process loss over the concatenated batch.

Runs unchanged without torchrun (a single process, no process group).
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

from torchfg.losses import TripletMarginLoss


def clustered_batch(n_classes: int, per_class: int, dim: int, generator: torch.Generator):
    """Points around fixed class centres, shuffled: a stand-in for an image dataset."""
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    points = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return points[order], labels[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--classes-per-rank", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=4)
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    use_cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    loss_fn = TripletMarginLoss(margin=0.2, cross_rank=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank sees its own data

    for step in range(args.steps):
        x, labels = clustered_batch(args.classes_per_rank, args.per_class, 32, generator)
        embeddings = nn.functional.normalize(model(x.to(device)), dim=-1)
        loss = loss_fn(embeddings, labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            reported = loss.detach().clone()
            if distributed:
                dist.all_reduce(reported)
                reported /= dist.get_world_size()
            if rank == 0:
                print(f"step {step:4d}  loss {reported.item():.4f}", flush=True)

    if distributed:
        # Tear down in order: every rank past its last collective, then the DDP reducer (it holds
        # the group), then the group. Without this, gloo on torch 2.13 aborted ~1 exit in 12 with
        # "terminate called without an active exception" when one rank closed its pairs first.
        dist.barrier()
        del model, optimizer
        gc.collect()  # the reducer sits in reference cycles (autograd hooks): free it before the group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
