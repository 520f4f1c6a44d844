"""AutotunedLaunch (torchfg.ops._triton_utils): a memoised launch must be the launch the autotuner
and the heuristics would have made, and nothing is memoised that the autotuner did not decide.

Kernels are not executed here: the JIT function's ``run`` is replaced by a recorder (the launch's
grid and arguments are what is compared), and the autotuner's benchmark by fixed timings.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.runtime import autotuner  # noqa: E402

from torchfg.ops._triton_utils import AutotunedLaunch  # noqa: E402


@triton.jit
def _toy_kernel(x_ptr, n, scale, BLOCK: tl.constexpr, EVEN: tl.constexpr, HALF: tl.constexpr, FLAG: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * scale, mask=offsets < n)


class _Launches:
    """Records JIT launches (the kernel object's class ``run``) and autotuner runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kernel_class: type, timings: dict[int, float]) -> None:
        self.launches: list[tuple] = []
        self.autotuner_runs = 0
        launches = self.launches

        def run(fn, *args, grid, warmup, **kwargs):  # noqa: ARG001 - nothing is launched
            resolved = grid(dict(zip(fn.arg_names, args), **kwargs)) if callable(grid) else grid
            launches.append((fn, resolved, args, dict(kwargs)))

        original = autotuner.Autotuner.run

        def autotuner_run(tuner, *args, **kwargs):
            self.autotuner_runs += 1
            return original(tuner, *args, **kwargs)

        monkeypatch.setattr(kernel_class, "run", run)
        monkeypatch.setattr(autotuner.Autotuner, "run", autotuner_run)
        monkeypatch.setattr(autotuner.Autotuner, "_bench",
                            lambda tuner, *args, config, **kwargs: [timings[config.kwargs["BLOCK"]]] * 3)


def _toy_tuned():
    configs = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2)]
    return triton.autotune(configs=configs, key=["n"])(triton.heuristics({
        "EVEN": lambda args: args["n"] % args["BLOCK"] == 0,
        "HALF": lambda args: args["BLOCK"] // 2 if args["EVEN"] else 0,  # reads the heuristic before it
    })(_toy_kernel))


def test_memoised_launch_equals_the_autotuned_one(monkeypatch):
    recorder = _Launches(monkeypatch, type(_toy_kernel), timings={16: 2.0, 32: 1.0})
    launch = AutotunedLaunch(_toy_tuned())
    x = torch.zeros(64)
    grid = lambda meta: (triton.cdiv(64, meta["BLOCK"]),)  # noqa: E731

    first = launch(grid, x, 64, 0.5, FLAG=True)
    second = launch(grid, x, 64, 0.5, FLAG=True)
    assert first.kwargs == second.kwargs == {"BLOCK": 32}
    assert recorder.autotuner_runs == 1  # the second launch went straight to the JIT function
    (fn1, grid1, args1, kw1), (fn2, grid2, args2, kw2) = recorder.launches
    assert fn1 is fn2 is _toy_kernel and grid1 == grid2 == (2,) and args1 == args2
    assert kw1 == kw2 and kw1["EVEN"] is True and kw1["HALF"] == 16 and kw1["FLAG"] is True
    assert kw1["num_warps"] == 2

    # Another value of a scalar the heuristics read: the autotuner and the heuristics run again.
    launch(grid, x, 40, 0.5, FLAG=True)
    assert recorder.autotuner_runs == 2
    assert recorder.launches[-1][3]["EVEN"] is False and recorder.launches[-1][3]["HALF"] == 0
    # Another tensor dtype is another key too (the autotuner's key has the dtypes).
    launch(grid, x.double(), 64, 0.5, FLAG=True)
    assert recorder.autotuner_runs == 3


def test_nothing_is_memoised_that_the_autotuner_did_not_cache(monkeypatch):
    # A tool that replaces Autotuner.run (compile_sm90's tracer) picks configs without caching
    # them: every launch must keep going through it.
    recorder = _Launches(monkeypatch, type(_toy_kernel), timings={16: 1.0, 32: 2.0})
    tuned = _toy_tuned()
    picks = []

    def tracer_run(tuner, *args, **kwargs):
        tuner.best_config = tuner.configs[len(picks) % 2]
        picks.append(tuner.best_config)
        return tuner.fn.run(*args, **kwargs, **tuner.best_config.all_kwargs())

    monkeypatch.setattr(autotuner.Autotuner, "run", tracer_run)
    launch = AutotunedLaunch(tuned)
    x = torch.zeros(64)
    assert [launch((1,), x, 64, 0.5, FLAG=False).kwargs["BLOCK"] for _ in range(3)] == [16, 32, 16]
    assert len(picks) == 3 and [kw["BLOCK"] for *_, kw in recorder.launches] == [16, 32, 16]


def test_mining_launches_are_memoised_as_the_autotuner_made_them(monkeypatch):
    # The fused mining launcher on its GPU path (autotuned tiles, an emulated GPU's splits): the
    # second identical call skips the autotuner and launches exactly what the first launched.
    import torchfg.ops.triplet.triton as mining

    recorder = _Launches(monkeypatch, type(mining._mine_hardest_kernel), timings={})
    monkeypatch.setattr(autotuner.Autotuner, "_bench",
                        lambda tuner, *args, config, **kwargs: [float(config.kwargs["BLOCK_D"] + config.num_warps)] * 3)
    monkeypatch.setattr(mining, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(mining, "_default_candidates_per_split", lambda n, m, device: 256)
    monkeypatch.setattr(mining, "_TUNED_KERNELS", {})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(600, 512, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, 40, (600,), generator=gen)

    def mine(rows):
        recorder.launches.clear()
        mining.mine_hardest_splits_triton(
            rows, rows, labels[: rows.shape[0]], labels[: rows.shape[0]], None, None, metric="euclidean",
            base_margin=0.2, margin_scale=0.0, text_positive_threshold=None, self_offset=0,
        )
        return [(fn.fn.__name__, grid, kwargs) for fn, grid, _, kwargs in recorder.launches]

    first = mine(x)
    assert recorder.autotuner_runs == 1
    second = mine(x)
    assert recorder.autotuner_runs == 1 and second == first
    assert [name for name, *_ in first] == ["_row_stat_kernel", "_mine_hardest_kernel", "_mine_hardest_kernel"]
    assert first[1][2]["WIDE_PASS"] is False and first[2][2]["WIDE_PASS"] is True  # int64 labels: two passes
    # Fewer rows: another size bucket, tuned again.
    mine(x[:200])
    assert recorder.autotuner_runs == 2


def test_the_config_returned_is_this_calls_even_if_another_thread_launched_meanwhile(monkeypatch):
    """The launcher read ``best_config`` after the launch: one attribute of the shared autotuner,
    which another thread's first call at another size could replace in between (16 of 20 trials
    with two threads under the interpreter). The mining launcher sizes its wide pass of 64-bit
    labels by the returned BLOCK_M. The call's own entry of the autotuner's cache is returned."""
    recorder = _Launches(monkeypatch, type(_toy_kernel), timings={16: 1.0, 32: 2.0})
    tuned = _toy_tuned()
    x = torch.zeros(64)
    # The autotuner has answered both sizes (an earlier step), with different tiles.
    tuned.cache[(64, "torch.float32")] = tuned.configs[0]
    tuned.cache[(5000, "torch.float32")] = tuned.configs[1]
    recorded_run = type(_toy_kernel).run

    def run_while_another_thread_launches(fn, *args, **kwargs):
        recorded_run(fn, *args, **kwargs)
        tuned.best_config = tuned.configs[1]  # the other thread's launch at n = 5000, meanwhile

    monkeypatch.setattr(type(_toy_kernel), "run", run_while_another_thread_launches)
    launch = AutotunedLaunch(tuned)
    assert launch((1,), x, 64, 0.5, FLAG=False).kwargs["BLOCK"] == 16
    assert recorder.launches[-1][3]["BLOCK"] == 16
    assert launch((1,), x, 64, 0.5, FLAG=False).kwargs["BLOCK"] == 16  # and memoised as such


def test_the_memo_key_is_the_scalars_and_the_tensor_dtypes(monkeypatch):
    """The key is gathered per signature of argument types (tensor positions found once): other
    tensors of the same dtypes are the same call, and any change of a dtype, a scalar, a type, or a
    tensor's position is another call for the autotuner."""
    recorder = _Launches(monkeypatch, type(_toy_kernel), timings={16: 2.0, 32: 1.0})
    launch = AutotunedLaunch(_toy_tuned())
    x = torch.zeros(64)
    key = launch._args_key((x, 64, 0.5))
    assert key == launch._args_key((torch.ones(5), 64, 0.5))
    others = [(x.double(), 64, 0.5), (x, 65, 0.5), (x, 64, 0.25), (x, 64.0, 0.5), (64, x, 0.5), (x, 64, x),
              (x, 64), (x, 64, 0.5, x)]
    keys = [launch._args_key(args) for args in others]
    assert key not in keys and len(set(keys)) == len(keys)
    assert launch._args_key(()) == ((), (), ())
    assert launch._args_key((x,)) == ((torch.Tensor,), (), (torch.float32,))
    assert launch._args_key((3,)) == ((int,), (3,), ())

    grid = (4,)
    launch(grid, x, 64, 0.5, FLAG=True)
    launch(grid, torch.ones(64), 64, 0.5, FLAG=True)  # another tensor, same dtype: memoised
    assert recorder.autotuner_runs == 1
    launch(grid, x.half(), 64, 0.5, FLAG=True)
    assert recorder.autotuner_runs == 2
