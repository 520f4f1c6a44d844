"""cross_rank=True triplet losses and miners on 2 and 3 gloo ranks equal the single-process loss."""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_DEVICE, requires_triton
from dist_utils import run_on_ranks
from torchfg.functional import adaptive_triplet_loss, mine_triplets, triplet_margin_loss
from torchfg.losses import AdaptiveTripletLoss, TripletMarginLoss

pytestmark = pytest.mark.distributed

# Rows per rank of each layout (its world size is their count), and the rank whose items have
# labels found nowhere else. Layout 3: rank 1 is empty. "3 last empty": rank 2, the last, is (its
# anchors start at the gathered batch's end, an offset the mining ops refuse: that rank raised and
# the others waited in a collective).
SIZES = {2: [5, 7], 3: [6, 0, 3], "3 last empty": [6, 3, 0]}
SINGLETONS = {3: 2, "3 last empty": 1}
TEXT_DIM = 5
# CPU tensors (gloo) take the Triton backend under the interpreter only.
cpu_triton = [requires_triton, pytest.mark.skipif(TEST_DEVICE.type == "cuda", reason="gloo ranks hold CPU tensors")]


def _rank_batch(rank: int, layout: int | str):
    g = torch.Generator().manual_seed(10 * len(SIZES[layout]) + rank)
    n = SIZES[layout][rank]
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    if SINGLETONS.get(layout) == rank:
        labels = torch.arange(100, 100 + n)  # singletons: no positive on any rank
    else:
        labels = torch.randint(0, 3, (n,), generator=g)
    text = torch.randn(n, TEXT_DIM, generator=g, dtype=torch.float64)
    return x, labels, text


def _concatenated(layout: int | str):
    parts = [_rank_batch(r, layout) for r in range(len(SIZES[layout]))]
    return tuple(torch.cat(p) for p in zip(*parts))


LOSSES = {
    "batch_hard": lambda x, y, t, **kw: triplet_margin_loss(x, y, margin=0.3, **kw),
    "batch_hard_sum": lambda x, y, t, **kw: triplet_margin_loss(x, y, margin=0.3, reduction="sum", **kw),
    "mean_nonzero_sq": lambda x, y, t, **kw: triplet_margin_loss(
        x, y, margin=0.3, metric="sqeuclidean", reduction="mean_nonzero", **kw
    ),
    "atl": lambda x, y, t, **kw: adaptive_triplet_loss(x, y, t, base_margin=0.1, margin_scale=0.8, **kw),
    "atl_none": lambda x, y, t, **kw: adaptive_triplet_loss(x, y, t, margin_scale=0.8, reduction="none", **kw),
    "module_triplet": lambda x, y, t, **kw: TripletMarginLoss(margin=0.3, **kw)(x, y),
    "module_atl": lambda x, y, t, **kw: AdaptiveTripletLoss(margin_scale=0.5, **kw)(x, y, t),
    # PyTorch mining only, whatever the backend asked for the others.
    "semi_hard": lambda x, y, t, backend, **kw: triplet_margin_loss(x, y, margin=0.3, mining="semi_hard", **kw),
    "all_sum": lambda x, y, t, backend, **kw: triplet_margin_loss(x, y, margin=0.3, mining="all", reduction="sum", **kw),
}


def _cross_rank_losses(rank: int, world: int, layout: int | str, backend: str):
    x, labels, text = _rank_batch(rank, layout)
    out = {}
    for name, fn in LOSSES.items():
        emb = x.clone().requires_grad_()
        loss = fn(emb, labels, text, cross_rank=True, backend=backend)
        loss.sum().backward()
        out[name] = (loss.detach(), emb.grad)
    out["miner"] = mine_triplets(x, labels, cross_rank=True)
    out["semi_hard_miner"] = mine_triplets(x, labels, strategy="semi_hard", cross_rank=True)
    try:
        bad_labels = labels[:-1] if rank == 0 else labels
        triplet_margin_loss(x.clone().requires_grad_(), bad_labels, cross_rank=True)
        out["bad"] = None
    except ValueError as exc:
        out["bad"] = str(exc)
    return out


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=cpu_triton)])
@pytest.mark.parametrize("layout", list(SIZES))
def test_cross_rank_equals_single_process(layout, backend):
    # "triton": the fused loss op on the gathered batch (Triton's interpreter on the CPU), against
    # the single-process loss of the default backend.
    world = len(SIZES[layout])
    results = run_on_ranks(_cross_rank_losses, world, layout, backend)
    assert all(r[0] == "ok" for r in results), [r[1:] for r in results if r[0] != "ok"]
    per_rank = [r[1] for r in results]
    x, labels, text = _concatenated(layout)
    offsets = [sum(SIZES[layout][:r]) for r in range(world)]
    for name, fn in LOSSES.items():
        emb = x.clone().requires_grad_()
        loss = fn(emb, labels, text, backend="auto")
        loss.sum().backward()
        if loss.dim():  # "none": this rank's anchors' losses, unscaled (and so is their gradient)
            torch.testing.assert_close(torch.cat([p[name][0] for p in per_rank]), loss.detach(), msg=name)
            scale = 1
        else:
            # Documented scaling: the mean over ranks of the returned values is the single-process
            # loss, and each rank's embedding gradient is world_size x the single-process gradient
            # (DDP divides).
            torch.testing.assert_close(torch.stack([p[name][0] for p in per_rank]).mean(), loss.detach(), msg=name)
            scale = world
        for r in range(world):
            rows = slice(offsets[r], offsets[r] + SIZES[layout][r])
            torch.testing.assert_close(per_rank[r][name][1], scale * emb.grad[rows], msg=f"{name} rank {r}")
    # The miner's local anchors index this rank's batch; positives/negatives index the gathered batch.
    as_set = lambda t: {tuple(row) for row in t.tolist()}  # noqa: E731
    for miner, strategy in (("miner", "batch_hard"), ("semi_hard_miner", "semi_hard")):
        a_all, p_all, n_all = mine_triplets(x, labels, strategy=strategy)
        gathered = []
        for r in range(world):
            a, p, n = per_rank[r][miner]
            gathered.append(torch.stack([a + offsets[r], p, n], 1))
        assert as_set(torch.cat(gathered)) == as_set(torch.stack([a_all, p_all, n_all], 1)), strategy
        assert len(torch.cat(gathered)) == len(a_all), strategy
    for r in range(world):
        assert per_rank[r]["bad"] is not None and "labels" in per_rank[r]["bad"], per_rank[r]["bad"]


def _per_anchor_losses_with_a_diverged_row(rank: int, world: int, backend: str):
    x, labels, text = _rank_batch(rank, world)
    if rank == 1:
        x[2, 0] = float("nan")
    emb = x.clone().requires_grad_()
    loss = triplet_margin_loss(emb, labels, margin=0.3, reduction="none", cross_rank=True, backend=backend)
    loss.sum().backward()
    return loss.detach()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=cpu_triton)])
def test_a_diverged_row_on_one_rank_leaves_the_other_per_anchor_losses_as_in_one_process(backend):
    # reduction="none": the gather's graph connection added NaN (the NaN row's sum x 0) to every
    # anchor's loss on every rank, where a single process gives NaN only where the row reaches.
    results = run_on_ranks(_per_anchor_losses_with_a_diverged_row, 2, backend)
    assert all(r[0] == "ok" for r in results), [r[1:] for r in results if r[0] != "ok"]
    x, labels, _ = _concatenated(2)
    x[SIZES[2][0] + 2, 0] = float("nan")
    single = triplet_margin_loss(x, labels, margin=0.3, reduction="none", backend=backend)
    assert single.isfinite().sum() > 0
    torch.testing.assert_close(torch.cat([r[1] for r in results]), single, equal_nan=True)


def test_ddp_example_runs_under_torchrun():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "examples" / "ddp_triplet.py"), "--steps", "12"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if done.returncode != 0 and _gloo_exit_abort(done.stdout + done.stderr, last_step=11):
        # gloo (torch 2.13, CPU) aborted about one exit in 13 ("terminate called without an active
        # exception" in one rank as the interpreter exits, once every step has run) while the DDP
        # reducer, kept alive by reference cycles, outlived destroy_process_group; the example
        # collects it first now (0 aborts in 70 runs). Should torch still abort at exit: run again.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(losses) >= 2 and all(loss == loss for loss in losses)  # printed and finite
    assert losses[-1] < losses[0], losses  # it trains


def _gloo_exit_abort(output: str, last_step: int) -> bool:
    """Whether a failed run is gloo's abort at exit: every step printed, then the C++ terminate."""
    return f"step {last_step:4d}" in output and "terminate called without an active exception" in output


def test_gloo_exit_abort_is_recognised_only_after_the_last_step():
    aborted = "step    0  loss 0.6\nstep   11  loss 0.3\nterminate called without an active exception\n"
    assert _gloo_exit_abort(aborted, last_step=11)
    assert not _gloo_exit_abort(aborted.replace("step   11", "step   10"), last_step=11)
    assert not _gloo_exit_abort("step   11  loss 0.3\nTraceback: RuntimeError\n", last_step=11)


# ----------------------------------------------------------------------------- an error on one rank


def _bad_on_rank_one(rank: int, world: int, case: str):
    """Each case passes a bad argument on rank 1 only (the same call everywhere else)."""
    from torchfg.losses import CrossBatchMemory, DINOLoss

    g = torch.Generator().manual_seed(rank)
    x, labels = torch.randn(4, 3, generator=g), torch.tensor([0, 0, 1, 1])
    bad = rank == 1
    if case == "mine_triplets margin":
        return mine_triplets(x, labels, margin=float("nan") if bad else 0.2, cross_rank=True)
    if case == "backend":  # BackendUnavailableError is a RuntimeError, not a ValueError
        return triplet_margin_loss(x, labels, mining="semi_hard", backend="triton" if bad else "torch", cross_rank=True)
    if case == "indices_tuple":  # checked after the gather: the bound is all ranks' candidates
        positive = torch.tensor([99 if bad else 1])
        return triplet_margin_loss(x, labels, (torch.tensor([0]), positive, torch.tensor([2])), cross_rank=True)
    if case == "memory_triplet_loss indices_tuple":  # the public functional, outside the module
        from torchfg.functional.xbm import memory_triplet_loss

        memory, memory_labels = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 0, 1, 2, 2])
        negative = torch.tensor([99 if bad else 1])
        return memory_triplet_loss(x, labels, memory, memory_labels, None, cross_rank=True,
                                   indices_tuple=(torch.tensor([0]), torch.tensor([0]), negative))
    if case == "xbm embedding_size":
        xbm = CrossBatchMemory(TripletMarginLoss(cross_rank=True), 3, 16)
        return xbm(torch.randn(4, 5) if bad else x, labels)
    criterion = DINOLoss(5, n_crops=2, n_global_crops=2, n_epochs=3)
    teacher = torch.randn(4, 5, dtype=torch.float64 if bad and case == "dino fp64" else torch.float32)
    epoch = 7 if bad and case == "dino epoch" else 0
    try:
        criterion(torch.randn(4, 5), teacher, epoch)
    finally:
        centre = criterion.center.clone()
    return centre


@pytest.mark.parametrize(
    "case", ["mine_triplets margin", "backend", "indices_tuple", "memory_triplet_loss indices_tuple", "xbm embedding_size"]
)
def test_a_bad_argument_on_one_rank_raises_on_every_rank(case):
    """Checked on one rank only, outside the error exchange, the other ranks went on into the next
    collective alone and waited there (until the process group's timeout)."""
    results = run_on_ranks(_bad_on_rank_one, 2, case)
    assert all(r[0] == "error" for r in results), [r[:2] for r in results]
    assert "another rank" in results[0][1], results[0][1]


def test_dino_error_on_one_rank_joins_the_centre_update():
    """The failing rank still joins the centre's all_reduce (the others waited in it), raises, and
    every rank's centre stays as it was."""
    results = run_on_ranks(_bad_on_rank_one, 2, "dino epoch")
    assert results[1][0] == "error" and "epoch" in results[1][1], results[1][:2]
    assert results[0][0] == "ok" and torch.equal(results[0][1], torch.zeros(5)), results[0][:2]


def test_dino_teachers_of_two_dtypes_average_into_one_centre():
    """The centre's statistics were all-reduced in the teacher's dtype: an fp32 and an fp64 rank
    sent buffers of two sizes and gloo aborted the processes."""
    results = run_on_ranks(_bad_on_rank_one, 2, "dino fp64")
    assert all(r[0] == "ok" for r in results), [r[:2] for r in results]
    torch.testing.assert_close(results[0][1], results[1][1])


# ----------------------------------------------------------------------------- ranks that make different calls


def _different_call_on_rank_one(rank: int, world: int, case: str):
    """Rank 1 passes another setting than rank 0 (each call valid on its own), then backward."""
    from torchfg.losses import CrossBatchMemory

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 3, generator=g, requires_grad=True)
    labels, text = torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(6, 4, generator=g)
    other = rank == 1
    if case == "reduction":  # "sum" reduces without the count's all_reduce: the collectives diverged
        loss = triplet_margin_loss(x, labels, reduction="sum" if other else "mean", cross_rank=True)
    elif case == "mining":
        loss = triplet_margin_loss(x, labels, mining="all" if other else "batch_hard", cross_rank=True)
    elif case == "indices_tuple":  # rank 1 checks its tuple in one more collective
        triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])) if other else None
        loss = triplet_margin_loss(x, labels, triplets, cross_rank=True)
    elif case == "margin_scale":  # the same collectives, but not one loss over the global batch
        loss = adaptive_triplet_loss(x, labels, text, margin_scale=0.9 if other else 0.5, cross_rank=True)
    elif case == "function":
        loss = (adaptive_triplet_loss(x, labels, text, cross_rank=True) if other
                else triplet_margin_loss(x, labels, cross_rank=True))
    elif case == "xbm enqueue_mask":
        xbm = CrossBatchMemory(TripletMarginLoss(cross_rank=True), 3, 16)
        loss = xbm(x, labels, enqueue_mask=labels == 0 if other else None)
    elif case == "numpy margin":  # the same value as another type is the same call
        import numpy as np

        loss = triplet_margin_loss(x, labels, margin=np.float64(0.3) if other else 0.3, cross_rank=True)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(
    "case, argument",
    [("reduction", "reduction: rank 0 'mean', rank 1 'sum'"), ("mining", "mining"), ("indices_tuple", "indices_tuple"),
     ("margin_scale", "margin_scale: rank 0 0.5, rank 1 0.9"), ("function", "function"),
     ("xbm enqueue_mask", "enqueue_mask")],
)
def test_ranks_that_make_different_calls_all_raise(case, argument):
    """Ranks that disagreed on the call ran different collectives next: gloo waited until the
    timeout or paired unrelated collectives. Every rank raises in the first exchange, naming the
    argument and each rank's value."""
    results = run_on_ranks(_different_call_on_rank_one, 2, case)
    assert all(r[0] == "error" for r in results), [r[:2] for r in results]
    for r in results:
        assert "different calls" in r[1] and argument in r[1], r[1]


def test_the_same_value_of_another_number_type_is_the_same_call():
    results = run_on_ranks(_different_call_on_rank_one, 2, "numpy margin")
    assert all(r[0] == "ok" for r in results), [r[:2] for r in results]


def _edge_case_worker(rank: int, world: int):
    from torchfg.distributed import all_gather_no_grad
    from torchfg.losses import CrossBatchMemory
    from torchfg.miners import BatchHardMiner

    out = {}
    # fp16 features whose gathered sum passes 65504: the loss was NaN on every rank.
    g = torch.Generator().manual_seed(rank)
    x16 = (torch.rand(32, 128, generator=g) * 20).half().requires_grad_()
    labels16 = torch.arange(32) % 4
    loss = triplet_margin_loss(x16, labels16, cross_rank=True)
    loss.backward()
    out["fp16"] = (loss.detach().float(), bool(torch.isfinite(x16.grad).all()))
    # The miners' statistics under cross_rank were never set.
    x, labels, _ = _rank_batch(rank, world)
    miner = BatchHardMiner(cross_rank=True, collect_stats=True)
    out["triplets"] = miner(x, labels)
    out["stats"] = (miner.pos_pair_dist, miner.neg_pair_dist, miner.avg_triplet_margin)
    # int16 labels: gloo has no int16 ("Invalid scalar type").
    out["int16"] = all_gather_no_grad((torch.arange(3 + rank) * (rank + 1)).to(torch.int16))
    # A memory restored on rank 0 only: the ranks mined against different memories, silently.
    memory = CrossBatchMemory(TripletMarginLoss(margin=0.3, cross_rank=True), embedding_size=4, memory_size=16)
    if rank == 0:
        memory.set_extra_state({"queue_idx": 5, "size": 5})
    try:
        memory(x, labels)
        out["memory"] = None
    except ValueError as exc:
        out["memory"] = str(exc)
    return out


def test_cross_rank_edge_cases():
    """fp16 sums past 65504 keep the loss finite (the mean over ranks is the single-process loss);
    the miners' collect_stats works under cross_rank (this rank's triplets, from the gathered
    rows); int16 tensors gather; a memory whose ring state differs between ranks is refused on
    every rank, naming the state."""
    results = run_on_ranks(_edge_case_worker, 2)
    assert all(r[0] == "ok" for r in results), [r[1:] for r in results if r[0] != "ok"]
    per_rank = [r[1] for r in results]
    x16 = torch.cat([(torch.rand(32, 128, generator=torch.Generator().manual_seed(r)) * 20).half() for r in range(2)])
    single = triplet_margin_loss(x16, torch.cat([torch.arange(32) % 4] * 2))
    rank_losses = torch.stack([p["fp16"][0] for p in per_rank])
    assert torch.isfinite(rank_losses).all() and all(p["fp16"][1] for p in per_rank), rank_losses
    torch.testing.assert_close(rank_losses.mean(), single.float(), rtol=1e-2, atol=1e-2)

    x, _, _ = _concatenated(2)
    for rank, p in enumerate(per_rank):
        a, pos, neg = p["triplets"]
        anchors = x[a + sum(SIZES[2][:rank])]
        d_ap, d_an = (anchors - x[pos]).norm(dim=1), (anchors - x[neg]).norm(dim=1)
        assert a.numel() > 0
        torch.testing.assert_close(torch.tensor(p["stats"], dtype=torch.float64),
                                   torch.stack([d_ap.mean(), d_an.mean(), d_an.mean() - d_ap.mean()]))

    expected = torch.cat([torch.arange(3) * 1, torch.arange(4) * 2]).to(torch.int16)
    assert all(p["int16"].dtype == torch.int16 and torch.equal(p["int16"], expected) for p in per_rank)
    assert all(p["memory"] is not None and "size" in p["memory"] and "queue_idx" in p["memory"] for p in per_rank), \
        [p["memory"] for p in per_rank]


def _inference_mode_losses(rank: int, world: int, sizes: list[int]):
    x, labels, text = _rank_batch(rank, 3)
    x, labels, text = x[: sizes[rank]], labels[: sizes[rank]], text[: sizes[rank]]
    with torch.inference_mode():
        x = x.clone()  # an inference tensor, as a validation step's embeddings are
        return (triplet_margin_loss(x, labels, margin=0.3, cross_rank=True, backend="triton"),
                adaptive_triplet_loss(x, labels, text, margin_scale=0.8, cross_rank=True, backend="triton"))


@pytest.mark.parametrize("sizes", [[6], [6, 3], [6, 0]], ids=["no process group", "2 ranks", "one empty"])
@pytest.mark.skipif(TEST_DEVICE.type == "cuda", reason="gloo ranks hold CPU tensors")
@requires_triton
def test_cross_rank_losses_under_inference_mode(sizes):
    # Under inference mode the gathered batch's rows are no tracked view: the fused op refused them
    # as the anchors' slice, after the gather, so a rank without rows waited in the reduction.
    world = len(sizes)
    if world == 1:
        results = [("ok", _inference_mode_losses(0, 1, sizes))]
    else:
        results = run_on_ranks(_inference_mode_losses, world, sizes)
    assert all(r[0] == "ok" for r in results), [r[1:] for r in results if r[0] != "ok"]
    parts = [_rank_batch(r, 3) for r in range(world)]
    x, labels, text = (torch.cat([p[i][: sizes[r]] for r, p in enumerate(parts)]) for i in range(3))
    expected = (triplet_margin_loss(x, labels, margin=0.3), adaptive_triplet_loss(x, labels, text, margin_scale=0.8))
    for got, want in zip(zip(*(r[1] for r in results)), expected):
        torch.testing.assert_close(torch.stack(got).mean(), want)
