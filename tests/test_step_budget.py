"""Launch and memory budget of one fused batch-hard / ATL training step (issue 14), checked on the CPU.

The step (loss forward + backward through ``torchfg.functional`` with ``backend="triton"``) runs
under Triton's interpreter; :func:`torchfg.bench.xbm.profile_step` counts its Triton launches, the
ATen ops that would launch a kernel on a GPU, and the bytes of the tensors it allocates. The
mining kernel's candidate split is pinned to 2 (as on a GPU, where a split bounded by the SM count
needs the merge kernel), instead of the interpreter's fixed 32-candidate splits whose workspace
grows with N^2.

Targets (issue 14): at most 6 kernel launches per step whatever N (Triton and ATen kernels,
autograd's seed of the backward included), and a peak extra memory under
64 MiB at N = 32768, D = 512 in bf16, checked here by fitting ``bytes = a N + b`` at two small N,
verifying the fit at a third (no N^2 term) and extrapolating.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TEST_DEVICE, requires_triton
from torchfg.bench.xbm import profile_step
from torchfg.functional import adaptive_triplet_loss, mine_triplets, triplet_margin_loss

D = 512
TEXT = 64
SIZES = (16, 32, 64)
TARGET_N = 32768
TARGET_BYTES = 64 * 2**20
TRITON_LAUNCH_LIMIT = 6


@pytest.fixture
def gpu_like_splits(monkeypatch):
    import triton

    import torchfg.ops.triplet.triton as mining

    config = dataclasses.replace(mining._INTERPRETER_CONFIG, candidates_per_split=None)
    monkeypatch.setattr(mining, "_INTERPRETER_CONFIG", config)
    monkeypatch.setattr(mining, "_default_candidates_per_split", lambda n, m, device: triton.cdiv(m, 2))


def _step(kind: str, n: int, label_dtype: torch.dtype = torch.int64):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, D, generator=g).to(TEST_DEVICE, torch.bfloat16).requires_grad_()
    labels = (torch.arange(n) // 4).to(TEST_DEVICE, label_dtype)
    text = torch.randn(n, TEXT, generator=g).to(TEST_DEVICE, torch.bfloat16)
    if kind == "batch_hard":
        step = lambda: triplet_margin_loss(x, labels, backend="triton").backward()  # noqa: E731
    else:
        step = lambda: adaptive_triplet_loss(x, labels, text, backend="triton").backward()  # noqa: E731
    if TEST_DEVICE.type == "cuda":
        step()  # the autotuner's first-call timing runs are not the step's launches
        x.grad = None  # else the profiled backward accumulates into it: one more launch (add_)
    return step


@pytest.fixture(scope="module")
def profiles():
    return {}


def _profiles(kind: str, cache: dict) -> list:
    if kind not in cache:
        cache[kind] = [profile_step(_step(kind, n)) for n in SIZES]
    return cache[kind]


@requires_triton
@pytest.mark.parametrize("kind", ["batch_hard", "atl"])
def test_launches_per_step_do_not_grow_with_n(kind, gpu_like_splits, profiles):
    steps = _profiles(kind, profiles)
    assert all(p.launches == steps[0].launches for p in steps), [p.launches for p in steps]
    assert all(p.host_syncs == 0 for p in steps), "a training step must not wait on the device"
    # Nor copy host data to it: with no host reads either, a CUDA graph can capture the step.
    assert all(p.host_copies == 0 for p in steps), [p.host_copies for p in steps]
    # One launch per Triton kernel: row statistics (embeddings and text for ATL, plus the loss's
    # scratch), mining (two passes: the labels are int64), the loss forward (which merges the
    # splits and reduces) and its backward. No chunk loop, no merge launch, no ATen kernel.
    triton = steps[-1].triton
    assert triton == {"_row_stat_kernel": 1, "_mine_hardest_kernel": 2, "_hardest_triplet_fwd_kernel": 1,
                      "_hardest_triplet_bwd_kernel": 1}, triton


@requires_triton
@pytest.mark.parametrize("kind", ["batch_hard", "atl"])
def test_kernel_launches_per_step_meet_the_target(kind, gpu_like_splits, profiles):
    # Everything a GPU would launch, autograd's ones_like for the scalar loss's seed included.
    step = _profiles(kind, profiles)[-1]
    assert step.launches <= TRITON_LAUNCH_LIMIT, (step.triton, step.aten)
    assert dict(step.aten) == {"aten.ones_like.default": 1}, step.aten


@requires_triton
def test_symmetric_mining_step_keeps_the_launch_and_memory_budget(gpu_like_splits, monkeypatch):
    # The symmetric kernel replaces the mining launches one for one (its packed bests are set by
    # the row-statistics launch) and adds 16 bytes per row. ATL: the batch-hard step's launches
    # plus the text's (one CI run of ~27 s covers both paths).
    monkeypatch.setenv("TORCHFG_SYMMETRIC_MINING", "1")
    steps = [profile_step(_step("atl", n)) for n in SIZES]
    assert all(p.launches == steps[0].launches <= TRITON_LAUNCH_LIMIT for p in steps), [p.launches for p in steps]
    assert steps[-1].triton == {"_row_stat_kernel": 1, "_mine_symmetric_kernel": 2, "_hardest_triplet_fwd_kernel": 1,
                                "_hardest_triplet_bwd_kernel": 1}, steps[-1].triton
    assert dict(steps[-1].aten) == {"aten.ones_like.default": 1}, steps[-1].aten
    values = [p.peak_live_bytes for p in steps]
    slope, intercept = _linear(values)
    assert abs(values[2] - (slope * SIZES[2] + intercept)) <= 0.01 * values[2] + 256, values
    assert slope * TARGET_N + intercept < TARGET_BYTES


@requires_triton
def test_int32_labels_need_one_mining_pass(gpu_like_splits):
    step = profile_step(_step("batch_hard", 32, torch.int32))
    assert step.triton["_mine_hardest_kernel"] == 1 and step.launches == TRITON_LAUNCH_LIMIT - 1, (step.triton, step.aten)


@requires_triton
def test_cross_batch_memory_step_that_wraps_the_ring_is_one_fused_step(gpu_like_splits):
    # A memory of 40 slots and batches of 16: the third step writes slots 32..39 and 0..7. It is
    # mined in the same single fused pass as the others (anchor i is slot (32 + i) % 40): the same
    # Triton launches, plus the enqueue's slice copies (two per tensor where the batch wraps).
    from torchfg.losses import CrossBatchMemory, TripletMarginLoss

    def three_steps(profile: bool) -> tuple[CrossBatchMemory, list]:
        xbm = CrossBatchMemory(TripletMarginLoss(margin=0.2, backend="triton"), D, memory_size=40)
        g = torch.Generator().manual_seed(3)
        steps = []
        for _ in range(3):
            x = torch.randn(16, D, generator=g).to(TEST_DEVICE, torch.bfloat16).requires_grad_()
            labels = (torch.randint(0, 6, (16,), generator=g)).to(TEST_DEVICE)
            step = lambda: xbm(x, labels).backward()  # noqa: E731
            steps.append(profile_step(step) if profile else step())
        return xbm, steps

    if TEST_DEVICE.type == "cuda":
        # The memory grows 16, 32, 40 rows: each size bucket is autotuned on its first call, and
        # the autotuner's timing launches are not the step's. Tune them on a throwaway memory.
        three_steps(profile=False)
    xbm, steps = three_steps(profile=True)
    assert xbm.queue_idx == 8
    plain, wrapped = steps[1], steps[2]
    assert wrapped.triton == plain.triton == {"_row_stat_kernel": 1, "_mine_hardest_kernel": 2,
                                              "_hardest_triplet_fwd_kernel": 1, "_hardest_triplet_bwd_kernel": 1}
    assert dict(plain.aten) == {"aten.ones_like.default": 1, "aten.copy_.default": 2}, plain.aten
    assert dict(wrapped.aten) == {"aten.ones_like.default": 1, "aten.copy_.default": 4}, wrapped.aten


def _cross_rank_steps(rank: int, world: int) -> dict:
    """Profiles of one cross_rank batch-hard and ATL step on this gloo rank (run_on_ranks)."""
    import triton

    import torchfg.ops.triplet.triton as mining

    # gpu_like_splits, in the spawned process.
    mining._INTERPRETER_CONFIG = dataclasses.replace(mining._INTERPRETER_CONFIG, candidates_per_split=None)
    mining._default_candidates_per_split = lambda n, m, device: triton.cdiv(m, 2)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(16, D, generator=g).to(torch.bfloat16).requires_grad_()
    labels = (torch.arange(16) // 4 + 2 * rank) % 6  # classes shared across the ranks
    text = torch.randn(16, TEXT, generator=g).to(torch.bfloat16)
    steps = {
        "batch_hard": lambda: triplet_margin_loss(x, labels, cross_rank=True, backend="triton").backward(),
        "atl": lambda: adaptive_triplet_loss(x, labels, text, cross_rank=True, backend="triton").backward(),
        "atl_miner": lambda: mine_triplets(x, labels, text_embeddings=text, margin_scale=0.5, cross_rank=True,
                                           backend="triton"),
    }
    profiles = {}
    for kind, step in steps.items():
        p = profile_step(step)
        x.grad = None
        profiles[kind] = (dict(p.triton), dict(p.aten))
    return profiles


@requires_triton
@pytest.mark.distributed
@pytest.mark.skipif(TEST_DEVICE.type == "cuda", reason="gloo ranks hold CPU tensors (the interpreter's Triton)")
def test_cross_rank_step_is_the_fused_step():
    # cross_rank=True (2 gloo ranks): the launches of a single-process step, on the gathered batch
    # with this rank's anchors as its rows (one tensor: one row-statistics launch with the text's,
    # one backward launch, no sum of an anchor and a batch gradient), instead of mining, a split
    # merge, the pair-distance kernels and ATen's hinge and reduction. The gather's and the input
    # exchange's ops come on top (on the CPU here: on a GPU most of them are host-side metadata
    # checks), so ATen ops are not counted.
    from dist_utils import run_on_ranks

    results = run_on_ranks(_cross_rank_steps, 2)
    assert all(r[0] == "ok" for r in results), [r[1:] for r in results if r[0] != "ok"]
    for profiles in (r[1] for r in results):
        for kind, (triton_launches, aten) in profiles.items():
            # (A miner merges the mining splits in a launch of its own; the loss's forward does it.)
            loss = ({"_merge_splits_kernel": 1} if kind == "atl_miner"
                    else {"_hardest_triplet_fwd_kernel": 1, "_hardest_triplet_bwd_kernel": 1})
            assert triton_launches == {"_row_stat_kernel": 1, "_mine_hardest_kernel": 2, **loss}, (kind, triton_launches)
            assert "aten.relu.default" not in aten and "aten.threshold_backward.default" not in aten, (kind, aten)


def _linear(values: list[int]) -> tuple[float, float]:
    (n0, n1), (v0, v1) = SIZES[:2], values[:2]
    slope = (v1 - v0) / (n1 - n0)
    return slope, v0 - slope * n0


@requires_triton
@pytest.mark.parametrize("kind", ["batch_hard", "atl"])
@pytest.mark.parametrize("measure", ["peak_live_bytes", "allocated_bytes"])
def test_step_memory_is_linear_in_n(kind, measure, gpu_like_splits, profiles):
    # An N x N (or N x M) tensor anywhere in the step, even short-lived, breaks the linear fit:
    # at N = 64 a single fp32 64 x 64 matrix is 16 KiB against ~1 KiB per row.
    values = [getattr(p, measure) for p in _profiles(kind, profiles)]
    slope, intercept = _linear(values)
    predicted = slope * SIZES[2] + intercept
    assert abs(values[2] - predicted) <= 0.01 * values[2] + 256, (values, predicted)
    if measure == "peak_live_bytes":
        # The target: peak extra memory at N = 32768, D = 512, bf16.
        extrapolated = slope * TARGET_N + intercept
        assert extrapolated < TARGET_BYTES, f"{extrapolated / 2**20:.1f} MiB at N={TARGET_N}"


_FIRST_CALL = """
import sys, torch
from torchfg.functional import adaptive_triplet_loss, triplet_margin_loss
x = torch.randn(16, 8).requires_grad_()
labels = torch.arange(16) // 4
triplet_margin_loss(x, labels, backend="torch").backward()
adaptive_triplet_loss(x, labels, torch.randn(16, 5), backend="torch").backward()
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_first_training_step_does_not_import_dynamo():
    # Issue 14's CPU target (first call vs steady step). torch.library.custom_op's first call
    # imports torch._dynamo (~140 MiB of RSS, 1.5 s per process); torchfg registers its ops with
    # the lower-level torch.library API instead (torchfg/ops/_library.py). Measured on the CPU at
    # N = 4096, D = 512 (VmHWM over VmRSS, fresh process), the step's own tensors peak at the same
    # bytes on the first and later calls; the first call's extra was this import (plus ~20 MiB of
    # one-time BLAS/OpenMP state).
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dynamo imported: False" in result.stdout, result.stdout


@requires_triton
def test_step_does_no_per_call_schema_or_constexpr_wrapper_work(monkeypatch):
    # Host time is most of a step at N = 8192 on an H200 (benchmarks/README.md, "Host time of the
    # fused step"). Two costs that had crept in, guarded structurally (no timing): torch's
    # register_autograd kernel rebuilding the argument list on every call, and host calls of
    # triton.cdiv / next_power_of_2, constexpr functions behind a generic wrapper.
    import triton
    from torch._library import utils as library_utils

    calls = {"fill_defaults": 0, "cdiv": 0, "next_power_of_2": 0}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    step = _step("atl", 24)
    step()
    monkeypatch.setattr(library_utils, "fill_defaults", counted("fill_defaults", library_utils.fill_defaults))
    monkeypatch.setattr(triton, "cdiv", counted("cdiv", triton.cdiv))
    monkeypatch.setattr(triton, "next_power_of_2", counted("next_power_of_2", triton.next_power_of_2))
    step()
    assert calls == {"fill_defaults": 0, "cdiv": 0, "next_power_of_2": 0}, calls
