"""`torchfg bench` at tiny sizes: the CLI, the CSV, the plot, and that every case computes the same thing."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec as importlib_find_spec
from pathlib import Path

import pytest
import torch

import torchfg
from torchfg.bench import CSV_COLUMNS, OP_NAMES, format_table, load_op, run_benchmarks
from torchfg.bench import presets as bench_presets
from torchfg.bench import report as bench_report
from torchfg.bench import worker as bench_worker
from torchfg.bench.core import Problem, _find_case, _measure_isolated
from torchfg.bench.measure import append_csv
from torchfg.cli import main

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_pairwise_table_csv_and_plot(tmp_path, capsys):
    csv_path, png_path = tmp_path / "bench.csv", tmp_path / "bench.png"
    args = ["bench", "--ops", "pairwise", "--sizes", "64,96", "--dim", "16", "--repeat", "2",
            "--device", "cpu", "--no-progress", "--csv", str(csv_path)]
    plotting = bench_report.matplotlib_available()
    if plotting:
        args += ["--plot", str(png_path)]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "== pairwise" in out.out and "torch.cdist" in out.out
    assert "GPU kernels skipped" in out.out and "pairwise:torchfg[triton]" in out.out
    assert "GPU kernels are skipped" in out.err

    rows = _read_csv(csv_path)
    assert set(CSV_COLUMNS) <= set(rows[0]), set(CSV_COLUMNS) - set(rows[0])
    measured = {(r["case"], int(r["n"])) for r in rows if r["status"] == "ok"}
    assert {("torchfg[torch]", 64), ("torchfg[torch]", 96), ("torch.cdist", 64), ("torch.cdist", 96)} <= measured
    # Skipped cases (the GPU kernel here) are not measurements: no CSV row.
    assert not any(r["case"] == "torchfg[triton]" for r in rows)
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["device"].startswith("CPU") and r["torch"] == torch.__version__ and r["commit"]
        assert r["torchfg"] == torchfg.__version__
        assert r["dtype"] == "float32" and int(r["d"]) == 16 and r["shape"] == f"x ({r['n']}, 16)"
        p20, median, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80
        n, d = int(r["n"]), int(r["d"])
        assert float(r["flops"]) == pytest.approx(6 * n * n * d, rel=1e-5)
        assert float(r["tflops"]) == pytest.approx(6 * n * n * d / (median * 1e-3) / 1e12, rel=1e-2)
        assert float(r["floor_ratio"]) == pytest.approx(median / float(r["floor_ms"]), rel=1e-2)
        assert float(r["peak_extra_mib"]) >= 0 and r["memory_method"].startswith("rss")
    if plotting:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run appends under the same header.
    assert main(["bench", "--ops", "pairwise", "--sizes", "8", "--dim", "4", "--repeat", "1", "--device", "cpu",
                 "--no-progress", "--csv", str(csv_path)]) == 0
    again = _read_csv(csv_path)
    assert again[: len(rows)] == rows and {r["n"] for r in again[len(rows):]} == {"8"}


def test_table_and_plot_keep_each_dtype_apart(tmp_path, monkeypatch):
    # `--dtype fp64,fp32` runs each dtype in turn: neither the table nor the chart may put the
    # rows of both under one dtype's heading.
    results = []
    for dtype in (torch.float64, torch.float32):
        results += run_benchmarks(["pairwise"], sizes=[16, 24], dim=4, device="cpu", dtype=dtype, repeat=1, warmup=0,
                                  cases=["torch.cdist"])
    sections = format_table(results).split("== pairwise")[1:]
    assert len(sections) == 2, format_table(results)
    for section, dtype in zip(sections, ("float64", "float32")):
        assert f"dtype {dtype};" in section and section.count(" torch.cdist ") == 2, section
    if not bench_report.matplotlib_available():
        return
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    bench_report.plot_results(results, tmp_path / "p.png")
    time_axes = figures[0].axes[:2] if len(figures[0].axes) == 4 else figures[0].axes
    titles = sorted(ax.get_title() for ax in figures[0].axes if "peak" not in ax.get_title())
    assert titles == ["pairwise (float32, D=4)", "pairwise (float64, D=4)"], titles
    for ax in time_axes:
        cdist = [line for line in ax.get_lines() if line.get_label() == "torch.cdist"]
        assert [list(line.get_xdata()) for line in cdist] == [[16, 24]], ax.get_title()
    plt.close(figures[0])


def test_plot_without_matplotlib_fails_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_report, "matplotlib_available", lambda: False)
    called = []
    monkeypatch.setattr("torchfg.bench.core.run_benchmarks", lambda *a, **k: called.append(1) or [])
    assert main(["bench", "--ops", "pairwise", "--plot", str(tmp_path / "x.png"), "--no-progress"]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not called and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--ops", "pairwise,nope"],
        ["bench", "--sizes", "1"],
        ["bench", "--sizes", "a,b"],
        ["bench", "--repeat", "0"],
        ["bench", "--warmup", "-1"],
        ["bench", "--max-seconds", "0"],
        # inf reached int() and the subprocess timeout: a traceback, not a usage error.
        ["bench", "--isolate", "--memory-limit-gib", "inf"],
        ["bench", "--isolate", "--case-timeout", "inf"],
        ["bench", "--max-seconds", "nan"],
        # past torch.Generator.manual_seed's range: every case failed with an overflow naming nothing
        ["bench", "--seed", "99999999999999999999999"],
        ["bench", "--seed", "-1"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--" in capsys.readouterr().err


def test_bad_dtype_and_device(capsys):
    assert main(["bench", "--ops", "pairwise", "--dtype", "int8", "--no-progress"]) == 2
    assert "dtype must be one of" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--ops", "pairwise", "--device", "cuda", "--no-progress"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def _two_fake_cuda_devices(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_cuda_device_index_past_the_last_device_is_refused(monkeypatch, capsys):
    from torchfg.bench.core import resolve_device

    _two_fake_cuda_devices(monkeypatch)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    for name in ("cuda:2", torch.device("cuda", 7)):
        with pytest.raises(ValueError, match=r"cuda:(2|7).*2 CUDA device"):
            resolve_device(name)
    with pytest.raises(ValueError, match="does not exist"):
        run_benchmarks(["pairwise"], device="cuda:2")
    assert main(["bench", "--ops", "pairwise", "--device", "cuda:2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "cuda:2" in err


def test_cuda_events_are_recorded_on_the_measured_devices_stream(monkeypatch):
    # No GPU here: the CUDA calls measure() makes are stood in for, and the stream each event was
    # recorded on is kept. A run on cuda:1 must time cuda:1's stream, not the current device's.
    from torchfg.bench.measure import measure

    recorded = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self, stream=None) -> None:
            recorded.append(stream)

        def elapsed_time(self, end) -> float:
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {torch.device(device)}")
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    m = measure(lambda: None, device="cuda:1", warmup=0, repeat=3)
    assert m.repeats == 3 and recorded == ["stream of cuda:1"] * 6


def test_a_cuda_run_makes_its_device_current(monkeypatch):
    import torchfg.bench.core as core

    _two_fake_cuda_devices(monkeypatch)
    current = []

    class FakeDevice:  # torch.cuda.device(...) as a context manager, without a GPU
        def __init__(self, device) -> None:
            self.device = torch.device(device)

        def __enter__(self) -> None:
            current.append(self.device)

        def __exit__(self, *exc) -> None:
            current.pop()

    seen = []
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(core, "environment_fields", lambda device: {})
    monkeypatch.setattr(core, "_run_one", lambda op, problem, case, *a, **kw: seen.append(list(current)) or
                        core.Result(op.name, case.name, case.kind, problem.n, problem.m, problem.d, "", "", "ok"))
    run_benchmarks(["pairwise"], sizes=[8], dim=4, device="cuda:1", cases=["torch.cdist"])
    assert seen == [[torch.device("cuda:1")]] and current == []
    # The worker of an isolated run too.
    monkeypatch.setattr(bench_worker, "measure_case_and_floor", lambda *a, **kw: seen.append(list(current)) or 1 / 0)
    bench_worker.main([json.dumps({"op": "pairwise", "case": "torch.cdist", "n": 8, "d": 4, "dtype": "float32",
                                   "device": "cuda:1", "seed": 0, "warmup": 0, "repeat": 1, "max_seconds": None})])
    assert seen[-1] == [torch.device("cuda:1")]


def test_every_op_runs_or_says_not_available():
    """Each op's cases run at a tiny size (a changed public API shows up here as an error row)."""
    results = run_benchmarks(list(OP_NAMES), sizes=[12], dim=8, device="cpu", repeat=1, warmup=0, progress=False)
    for r in results:
        assert r.status == "ok" or r.status.startswith("skipped"), (r.op, r.case, r.status)
        if r.status == "ok":
            assert r.floor_ms and r.floor_ms > 0 and r.measurement.median_ms > 0
    table = format_table(results)
    for op in OP_NAMES:
        assert f"== {op}" in table


def _outputs(op_name: str, case_name: str, problem: Problem):
    out = _find_case(load_op(op_name), case_name).setup(problem)()
    return out if isinstance(out, tuple) else (out,)


# (op, baseline that must agree with torchfg[torch] in value and gradient)
AGREEING_BASELINES = [
    ("pairwise", "torch.cdist", {}),
    ("pairwise", "pml.LpDistance", {}),
    ("triplet", "torch.cdist+masks", {}),
    ("triplet", "pml.BatchHard", {}),
    ("atl", "torch.cdist+masks", {}),
    ("dino", "dino_official", {}),
    ("dino", "dino_official", {"n_crops": 5}),
    ("xbm", "pml.CrossBatchMemory", {}),
    ("knn", "torch.cdist+topk", {}),
    ("knn", "torchfg[torch] gallery=x", {}),
    *[("knn", "faiss.IndexFlat", {"metric": metric, "k": 4}) for metric in ("euclidean", "sqeuclidean", "cosine", "dot")],
]

# (rtol, atol) per baseline where the baseline cannot match fp64 to the last bits: faiss computes in
# fp32; torch.cdist's GEMM path leaves rounding noise on d(i, i), which torchfg sets to exactly 0.
TOLERANCES = {"faiss.IndexFlat": (1e-4, 1e-4), "torch.cdist+topk": (1e-6, 1e-6)}


@pytest.mark.parametrize("op_name,baseline,params", AGREEING_BASELINES)
def test_baselines_compute_what_torchfg_computes(op_name, baseline, params):
    op = load_op(op_name)
    ok, why = op.requires()
    if not ok:
        pytest.skip(f"{op_name} not available: {why}")
    case = _find_case(op, baseline)
    # fp64 so that no near-tie flips a hardest pair between the two routes; a baseline that runs in
    # fp32 only (faiss) is compared in fp32, at its own tolerance.
    dtype = torch.float64 if case.available(CPU, torch.float64)[0] else torch.float32
    ok, why = case.available(CPU, dtype)
    if not ok:
        pytest.skip(why)
    # Odd sizes.
    problem = op.make_problem(37, 11, dtype, CPU, seed=3, **params)
    assert case.supports(problem)[0]
    expected = _outputs(op_name, "torchfg[torch]", problem)
    got = _outputs(op_name, baseline, problem)
    assert len(expected) == len(got)
    rtol, atol = TOLERANCES.get(baseline, (1e-6, 1e-8))
    for e, g in zip(expected, got):
        if not e.is_floating_point():
            # Indices (k-NN): fp64 random data has no ties, so they must be identical.
            assert torch.equal(g.to(e.device, e.dtype), e)
            continue
        assert torch.isfinite(e).all()
        torch.testing.assert_close(g.double(), e.double(), rtol=rtol, atol=atol)


def test_faiss_runs_in_float32_only():
    # faiss searches float32 copies of the data: a row of another dtype would carry a label it never ran in.
    pytest.importorskip("faiss")
    results = run_benchmarks(["knn"], sizes=[24], dim=8, device="cpu", dtype=torch.float64, repeat=1, warmup=0,
                             params={"k": 3}, cases=["faiss.IndexFlat"])
    assert [r.status for r in results] == ["skipped: faiss-cpu searches float32 only, not float64"]
    assert not [r for r in results if bench_report.is_csv_row(r)]
    ok, why = _find_case(load_op("knn"), "faiss.IndexFlat").available(CPU, torch.float32)
    assert ok, why


def test_a_k_or_batch_larger_than_the_size_is_refused_not_cut(capsys):
    # The CSV's params column records the k and batch asked for: a search of fewer than k rows, or a
    # smaller batch than asked, would be recorded as what it is not.
    with pytest.raises(ValueError, match=r"k must be <= N .* k=20 for N=16"):
        run_benchmarks(["knn"], sizes=[64, 16], dim=4, device="cpu", params={"k": 20})
    with pytest.raises(ValueError, match=r"batch must be <= N .* batch=32 for N=16"):
        run_benchmarks(["xbm"], sizes=[16], dim=4, device="cpu", params={"batch": 32})
    assert main(["bench", "--ops", "knn", "--sizes", "16", "--param", "k=20", "--device", "cpu", "--no-progress"]) == 2
    assert "k must be <= N" in capsys.readouterr().err
    # At the limit, and with the warm-up problem sized so that it too is allowed (32 rows by default).
    results = run_benchmarks(["knn", "xbm"], sizes=[40], dim=4, device="cpu", repeat=1, warmup=0,
                             params={"k": 40, "batch": 40}, cases=["torchfg[torch]"])
    assert [(r.op, r.status, r.n, r.params) for r in results] == [
        ("knn", "ok", 40, "k=40;metric=euclidean"), ("xbm", "ok", 40, "batch=40;per_class=4")]
    # The default batch (0: the device type's) still fits itself to a small memory, and says so in n.
    (small,) = run_benchmarks(["xbm"], sizes=[12], dim=4, device="cpu", repeat=1, warmup=0, cases=["torchfg[torch]"])
    assert (small.status, small.n, small.m, small.params) == ("ok", 12, 12, "batch=0;per_class=4")


def test_worker_and_isolated_run():
    """The worker rebuilds the problem from its parameters (k here: a wrong k fails the shape check)."""
    op = load_op("knn")
    problem = op.make_problem(24, 8, torch.float32, CPU, k=3)
    run = _measure_isolated(op, _find_case(op, "torch.cdist+topk"), problem, warmup=0, repeat=3, max_seconds=None)
    m = run.measurement
    assert m.repeats == 3 and m.p20_ms <= m.median_ms <= m.p80_ms and m.memory_method.startswith("rss")
    assert run.floor_ms is not None and run.floor_ms > 0 and run.launches is None


def test_isolated_run_rebuilds_a_problem_whose_n_is_not_its_size():
    """xbm's size N is the memory (m), its n the batch: the worker must rebuild that problem, not an N-row batch."""
    (result,) = run_benchmarks(["xbm"], sizes=[40], dim=4, device="cpu", repeat=1, warmup=0, params={"batch": 8},
                               cases=["torchfg[torch]"], isolate=True)
    assert result.status == "ok", result.status
    assert (result.n, result.m, result.size) == (8, 40, 40) and result.floor == "x @ y.T (8x4 @ 4x40)"
    assert "\n     40 torchfg[torch]" in format_table([result])


def test_a_case_with_its_own_thread_pool_runs_in_its_own_process(monkeypatch):
    """faiss brings a second OpenMP runtime: on a CPU it is measured in a fresh process even when the
    run is not isolated, and the other cases of that run stay in-process."""
    pytest.importorskip("faiss")
    import torchfg.bench.core as core

    isolated_cases = []
    real = core._measure_isolated
    monkeypatch.setattr(core, "_measure_isolated", lambda op, case, *a, **kw: isolated_cases.append(case.name) or real(op, case, *a, **kw))
    results = run_benchmarks(["knn"], sizes=[24], dim=8, device="cpu", repeat=1, warmup=0, params={"k": 3},
                             cases=["torchfg[torch]", "faiss.IndexFlat"], isolate=False)
    assert [r.status for r in results] == ["ok", "ok"]
    assert isolated_cases == ["faiss.IndexFlat"]
    assert [r.csv_row()["isolated"] for r in results] == [0, 1]


def test_launches_are_counted_per_step():
    (result,) = run_benchmarks(["knn"], sizes=[24], dim=8, device="cpu", repeat=1, warmup=0, params={"k": 3},
                               cases=["torch.cdist+topk"], launches=True)
    # cdist (its kernels) + topk: at least two launches, and the same count in the CSV row.
    assert result.launches is not None and result.launches >= 2
    assert result.csv_row()["launches"] == result.launches
    # The profiled step's tensors: at least the 24 x 24 fp32 cdist matrix was alive at once.
    assert result.tensor_peak_bytes is not None and result.tensor_peak_bytes >= 24 * 24 * 4
    assert float(result.csv_row()["tensor_peak_mib"]) == pytest.approx(result.tensor_peak_bytes / 2**20, abs=0.01)


def test_commit_column_can_be_given(monkeypatch):
    from torchfg.bench.measure import environment_fields

    monkeypatch.setenv("TORCHFG_BENCH_COMMIT", "abc1234")
    assert environment_fields("cpu")["commit"] == "abc1234"
    monkeypatch.setenv("TORCHFG_BENCH_COMMIT", "")
    assert environment_fields("cpu")["commit"] not in ("", "abc1234")


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_commit_of_an_install_inside_another_repository_is_unknown(tmp_path, monkeypatch):
    """torchfg installed in a project's .venv sits inside the project's git work tree: its commit
    is not torchfg's, so the column says unknown (the torchfg column still has the version)."""
    import importlib.util

    monkeypatch.delenv("TORCHFG_BENCH_COMMIT", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    _git("init", "-q", cwd=project)
    _git("commit", "-q", "--allow-empty", "-m", "the project's commit", cwd=project)
    site = project / ".venv" / "lib" / "site-packages"
    (site / "torchfg" / "bench").mkdir(parents=True)
    installed = site / "torchfg" / "bench" / "measure.py"
    shutil.copy2(ROOT / "torchfg" / "bench" / "measure.py", installed)
    spec = importlib.util.spec_from_file_location("installed_measure", installed)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    assert module.git_commit() == "unknown"
    fields = module.environment_fields("cpu")
    assert fields["commit"] == "unknown" and fields["torchfg"] == torchfg.__version__


@pytest.mark.skipif(not shutil.which("git") or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_commit_of_the_checkout_is_its_head(monkeypatch):
    from torchfg.bench.measure import environment_fields

    monkeypatch.delenv("TORCHFG_BENCH_COMMIT", raising=False)
    head = _git("rev-parse", "--short", "HEAD", cwd=ROOT)
    assert environment_fields("cpu")["commit"].split("+")[0] == head


def test_kernel_times_break_a_step_down_by_kernel(tmp_path, capsys):
    from torchfg.bench.profile import kernel_times

    # The profile of a known step: 3 matrix products per step (forward, two backward), the
    # largest cost of a 96 x 512 @ 512 x 96 product and its backward.
    x = torch.randn(96, 512, requires_grad=True)
    kernels = kernel_times(lambda: (x @ x.T).sum().backward(), torch.device("cpu"), steps=4)
    by_name = {k.name: k for k in kernels}
    assert by_name["aten::mm"].calls == 3 and by_name["aten::mm"].ms > 0
    assert [k.ms for k in kernels] == sorted((k.ms for k in kernels), reverse=True)

    # Through the CLI: one CSV row per kernel of each profiled case, next to the usual CSV.
    path = tmp_path / "kernels.csv"
    argv = ["bench", "--ops", "triplet", "--sizes", "24", "--dim", "8", "--repeat", "1", "--warmup", "0",
            "--device", "cpu", "--cases", "torchfg[torch],torch.cdist+masks", "--no-progress"]
    assert main(argv + ["--kernel-times", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert {r["case"] for r in rows} == {"torchfg[torch]", "torch.cdist+masks"}
    for case in ("torchfg[torch]", "torch.cdist+masks"):
        mine = [r for r in rows if r["case"] == case]
        assert 0 < len(mine) <= 12 and all(r["kernel"].startswith("aten::") for r in mine)
        assert all(float(r["ms_per_step"]) >= 0 and float(r["calls_per_step"]) > 0 for r in mine)
        assert sum(float(r["share"]) for r in mine) == pytest.approx(1.0, abs=0.01)
        assert float(mine[0]["step_ms"]) > 0 and mine[0]["n"] == "24" and mine[0]["op"] == "triplet"
    # A fresh process per measurement cannot hand its profile back: said, not silently empty.
    capsys.readouterr()
    assert main(argv + ["--isolate", "--kernel-times", str(tmp_path / "none.csv")]) == 0
    assert "--kernel-times" in capsys.readouterr().err and not (tmp_path / "none.csv").exists()


def test_isolated_limits_become_error_rows():
    """Over the time or memory limit, a case is a row whose status says why (the run goes on)."""
    results = run_benchmarks(["pairwise"], sizes=[12000], dim=4, device="cpu", repeat=1, warmup=0,
                             cases=["torch.cdist"], isolate=True, memory_limit_bytes=2**29)
    # The (N, N) upstream gradient alone is 549 MiB over a 512 MiB limit.
    (result,) = results
    assert result.status.startswith("error: MemoryError: over the memory limit of 0.5 GiB"), result.status
    assert bench_report.is_csv_row(result) and result.csv_row()["median_ms"] == ""
    (result,) = run_benchmarks(["pairwise"], sizes=[16], dim=4, device="cpu", repeat=1, warmup=0,
                               cases=["torch.cdist"], isolate=True, case_timeout=0.05)
    assert result.status.startswith("error: RuntimeError: timeout: not done after 0.05 s"), result.status


class _CompilerFailure(Exception):
    """Stands for Triton's OutOfResources / CompilationError: an Exception, none of the builtin kinds."""


@pytest.mark.parametrize("error", [_CompilerFailure("out of resource: shared memory, Required: 232448"),
                                   ImportError("cannot import name 'spatial' from 'scipy'")])
def test_any_failing_case_becomes_an_error_row_and_the_run_goes_on(error, monkeypatch, tmp_path):
    import dataclasses

    import torchfg.bench.pairwise as pairwise

    def failing(problem):
        def run():
            raise error

        return run

    cases = pairwise.BENCH.cases
    monkeypatch.setattr(pairwise, "BENCH", dataclasses.replace(
        pairwise.BENCH, cases=lambda: [dataclasses.replace(cases()[0], setup=failing), *cases()[1:]]))
    results = run_benchmarks(["pairwise"], sizes=[8], dim=4, device="cpu", repeat=1, warmup=0,
                             cases=["torchfg[torch]", "torch.cdist"])
    assert [r.status.split(":")[0] for r in results] == ["error", "ok"]
    assert results[0].status.startswith(f"error: {type(error).__name__}: "), results[0].status


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_still_stops_the_run(stop, monkeypatch):
    import dataclasses

    import torchfg.bench.pairwise as pairwise

    def interrupted(problem):
        def run():
            raise stop()

        return run

    cases = pairwise.BENCH.cases
    monkeypatch.setattr(pairwise, "BENCH", dataclasses.replace(
        pairwise.BENCH, cases=lambda: [dataclasses.replace(case, setup=interrupted) for case in cases()]))
    with pytest.raises(stop):
        run_benchmarks(["pairwise"], sizes=[8], dim=4, device="cpu", repeat=1, warmup=0, cases=["torch.cdist"])


def test_worker_reports_errors_as_json(capsys):
    request = {"op": "pairwise", "case": "no such case", "n": 8, "d": 4, "dtype": "float32", "device": "cpu",
               "seed": 0, "warmup": 0, "repeat": 1, "max_seconds": None}
    assert bench_worker.main([json.dumps(request)]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "no case" in reply["error"]


def test_cases_and_params_select_and_reach_the_problem():
    results = run_benchmarks(["knn"], sizes=[20], dim=6, device="cpu", repeat=1, warmup=0,
                             cases=["torch.cdist+topk", "torchfg[torch]"], params={"k": 3, "metric": "cosine"})
    assert {r.case: r.status.split(":")[0] for r in results} == {"torchfg[torch]": "ok", "torch.cdist+topk": "skipped"}
    assert all(r.params == "k=3;metric=cosine" and "k = 3, cosine" in r.shape for r in results)
    with pytest.raises(ValueError, match="params"):
        run_benchmarks(["knn"], sizes=[20], device="cpu", params={"n_crops": 3})
    with pytest.raises(ValueError, match="cases"):
        run_benchmarks(["knn"], sizes=[20], device="cpu", cases=["pml.BatchHard"])
    with pytest.raises(ValueError, match="metric"):
        run_benchmarks(["knn"], sizes=[20], device="cpu", params={"metric": "manhattan"})


def test_exit_status_says_whether_the_requested_cases_were_measured(tmp_path, capsys, monkeypatch):
    tiny = ["bench", "--ops", "pairwise", "--sizes", "8", "--dim", "4", "--repeat", "1", "--warmup", "0",
            "--device", "cpu", "--no-progress"]
    assert main(tiny + ["--cases", "torch.cdist"]) == 0
    # A GPU kernel on a CPU is skipped: fine when not asked for by name, a failure when it was.
    assert main(tiny) == 0
    capsys.readouterr()
    assert main(tiny + ["--cases", "torch.cdist,torchfg[triton]"]) == 1
    err = capsys.readouterr().err
    assert "--cases torchfg[triton] (pairwise N=8, float32): skipped" in err
    # Every requested case failed (here: over the memory limit of its process): nothing was measured.
    import torchfg.bench.core as core

    def over_the_limit(*args, **kwargs):
        raise MemoryError("over the memory limit of 0.01 GiB")

    monkeypatch.setattr(core, "_measure_isolated", over_the_limit)
    assert main(tiny + ["--isolate", "--cases", "torchfg[torch]"]) == 1
    err = capsys.readouterr().err
    assert "no case was measured" in err and "--cases torchfg[torch] (pairwise N=8, float32): error: MemoryError" in err
    # Requested cases that are all skipped (baselines not installed): no rows, and not a success.
    monkeypatch.setattr(core.importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else
                        importlib_find_spec(name, *a))
    assert main(["bench", "--ops", "knn", "--sizes", "16", "--dim", "4", "--repeat", "1", "--device", "cpu",
                 "--no-progress", "--cases", "faiss.IndexFlat", "--csv", str(tmp_path / "none.csv")]) == 1
    assert "faiss is not installed" in capsys.readouterr().err and not (tmp_path / "none.csv").exists()


def test_cli_rejects_bad_params_and_foreign_csv(tmp_path, capsys):
    assert main(["bench", "--ops", "knn", "--param", "k=0", "--no-progress", "--device", "cpu"]) == 2
    assert "k must be >= 1" in capsys.readouterr().err
    foreign = tmp_path / "old.csv"
    foreign.write_text("method,loss,n,median_ms\nfloor,-,4096,385.9\n")
    assert main(["bench", "--ops", "pairwise", "--sizes", "8", "--csv", str(foreign), "--no-progress"]) == 2
    assert "not written by torchfg bench" in capsys.readouterr().err
    assert foreign.read_text() == "method,loss,n,median_ms\nfloor,-,4096,385.9\n"


def _unwritable_paths(tmp_path: Path) -> list[Path]:
    """Paths no one can write: one under a regular file (even root cannot), and, when not root
    (root ignores permissions), one in a read-only folder."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    paths = [blocker / "out.csv"]
    if os.geteuid() != 0:
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        paths.append(read_only / "out.csv")
    return paths


@pytest.mark.parametrize("option", ["--csv", "--kernel-times"])
def test_unwritable_output_fails_before_measuring(tmp_path, capsys, monkeypatch, option):
    """An output that cannot be written is one line naming the option, before anything is
    measured (not a traceback once the first row is due)."""
    from torchfg.bench import core

    measured = []
    original = core.measure_case_and_floor
    monkeypatch.setattr(core, "measure_case_and_floor", lambda *a, **k: measured.append(1) or original(*a, **k))
    try:
        for path in _unwritable_paths(tmp_path):
            assert main(["bench", "--ops", "pairwise", "--sizes", "8", "--dim", "4", "--repeat", "1", "--warmup", "0",
                         "--cases", "torch.cdist", "--device", "cpu", "--no-progress", option, str(path)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"torchfg bench: {option}: cannot write {path}"), err
            assert not measured and not path.exists()
    finally:
        if (tmp_path / "read-only").exists():
            (tmp_path / "read-only").chmod(0o755)  # so that pytest can remove it


def test_writable_check_leaves_no_file_behind(tmp_path):
    from torchfg.bench.cli import check_writable

    new = tmp_path / "sub" / "new.csv"
    assert check_writable(new) is None and not new.exists()
    old = tmp_path / "old.csv"
    old.write_text("op,case,status,n,median_ms\n")
    assert check_writable(old) is None and old.read_text() == "op,case,status,n,median_ms\n"
    assert "cannot write" in check_writable(tmp_path)  # a folder


def test_csv_rows_are_on_disk_as_each_case_finishes(tmp_path, monkeypatch):
    """Row i is in the file (complete, parseable) before case i + 1 starts."""
    from torchfg.bench import core

    path = tmp_path / "stream.csv"
    seen: list[int] = []
    original = core.measure_case_and_floor

    def spy(*args, **kwargs):
        seen.append(len(_read_csv(path)) if path.exists() else 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(core, "measure_case_and_floor", spy)
    assert main(["bench", "--ops", "pairwise", "--sizes", "8,9", "--dim", "4", "--repeat", "1", "--warmup", "0",
                 "--cases", "torch.cdist,torchfg[torch]", "--device", "cpu", "--no-progress",
                 "--csv", str(path)]) == 0
    assert seen == [0, 1, 2, 3] and len(_read_csv(path)) == 4


def test_killed_run_keeps_the_rows_it_finished(tmp_path):
    """``timeout`` (SIGTERM) or SIGKILL in the middle of a run: the finished rows are in the CSV."""
    path = tmp_path / "killed.csv"
    script = textwrap.dedent(f"""
        import time
        from torchfg.bench import core
        original = core.measure_case_and_floor
        def slow_after_two(*args, **kwargs):
            slow_after_two.calls += 1
            if slow_after_two.calls > 2:
                time.sleep(600)  # the third case never ends: the parent kills the run
            return original(*args, **kwargs)
        slow_after_two.calls = 0
        core.measure_case_and_floor = slow_after_two
        from torchfg.cli import main
        main(["bench", "--ops", "pairwise", "--sizes", "8,9", "--dim", "4", "--repeat", "1", "--warmup", "0",
              "--cases", "torch.cdist,torchfg[torch]", "--device", "cpu", "--no-progress", "--csv", {str(path)!r}])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and len(_read_csv(path)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    rows = _read_csv(path)
    assert [(r["case"], r["n"], r["status"]) for r in rows] == [("torchfg[torch]", "8", "ok"), ("torch.cdist", "8", "ok")]
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_append_csv_appends_and_widens_the_header(tmp_path):
    path = tmp_path / "a.csv"
    append_csv(path, [{"op": "knn", "median_ms": 1.0}])
    before = path.read_bytes()
    append_csv(path, [{"op": "dino", "median_ms": 2.0}])
    assert path.read_bytes().startswith(before)  # appended, not rewritten
    append_csv(path, [{"op": "xbm", "median_ms": 3.0, "launches": 7}])
    assert _read_csv(path) == [
        {"op": "knn", "median_ms": "1.0", "launches": ""},
        {"op": "dino", "median_ms": "2.0", "launches": ""},
        {"op": "xbm", "median_ms": "3.0", "launches": "7"},
    ]
    assert not list(tmp_path.glob("*.tmp"))
    # A file whose last line lost its newline (an old writer killed mid-row) does not swallow the next row.
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))
    append_csv(path, [{"op": "pairwise", "median_ms": 4.0, "launches": 1}])
    assert [r["op"] for r in _read_csv(path)] == ["knn", "dino", "xbm", "pairwise"]


@pytest.mark.parametrize("widen", [False, True])
def test_append_csv_holds_the_files_lock_while_it_reads_and_writes(widen, tmp_path, monkeypatch):
    """Two benchmark processes writing one CSV lost rows: one appended while the other rewrote
    the file under a wider header. The whole read-and-write now holds an exclusive lock on
    <csv>.lock, checked from a second open file (flock locks are per open file, so the same
    process conflicts with itself); the rewrite keeps the file's mode."""
    import fcntl
    import importlib
    import os

    measure = importlib.import_module("torchfg.bench.measure")  # the package exports a measure()

    path = tmp_path / "a.csv"
    append_csv(path, [{"op": "knn", "median_ms": 1.0}])
    os.chmod(path, 0o640)
    held, real_fsync = [], os.fsync

    def fsync_checking_the_lock(fd):
        with open(tmp_path / "a.csv.lock", "a") as other:
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(other.fileno(), fcntl.LOCK_UN)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return real_fsync(fd)

    monkeypatch.setattr(measure.os, "fsync", fsync_checking_the_lock)
    append_csv(path, [{"op": "dino", "median_ms": 2.0, **({"launches": 3} if widen else {})}])
    assert held == [True]
    assert [r["op"] for r in _read_csv(path)] == ["knn", "dino"]
    assert path.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", sorted(bench_presets.PRESETS))
def test_preset_runs_through_the_engine(name, tmp_path, capsys):
    """Each preset (benchmarks/bench_<name>.py) at a tiny size: every run's op, parameters and cases reach the CSV."""
    path = tmp_path / f"{name}.csv"
    # The knn preset also runs k = 100 and the xbm preset a batch of 4096: N must hold them.
    size = {"knn": "100", "xbm": "4096"}.get(name, "12")
    tiny = ["--device", "cpu", "--sizes", size, "--dim", "8", "--repeat", "1", "--warmup", "0", "--no-isolate",
            "--no-progress", "--csv", str(path)]
    if name == "dino":
        tiny += ["--dtype", "fp32"]  # the CPU preset also runs bf16; one dtype is enough here
    assert bench_presets.main(name, tiny) == 0
    rows = _read_csv(path)
    assert rows and all(r["status"] == "ok" for r in rows), [(r["case"], r["status"]) for r in rows]
    runs = bench_presets.preset_runs(name, "cpu")
    ops = {op for run in runs for op in run[run.index("--ops") + 1].split(",")}
    assert {r["op"] for r in rows} == ops
    baselines = {r["case"] for r in rows if r["kind"] == "baseline"}
    expected = {"triplet": {"pml.BatchHard", "torch.cdist+masks"}, "knn": {"faiss.IndexFlat", "torch.cdist+topk"},
                "dino": {"dino_official"}, "xbm": {"pml.CrossBatchMemory", "pml.BatchHard"}}[name]
    assert expected <= baselines, baselines
    if name == "knn":
        assert {r["params"] for r in rows} == {"k=10;metric=euclidean", "k=100;metric=euclidean"}
        assert {r["shape"] for r in rows} == {f"query = gallery (100, 8), k = {k}, euclidean" for k in (10, 100)}
    if name == "xbm":
        assert all(r["launches"] for r in rows if r["case"] != "faiss.IndexFlat")
        assert {(r["n"], r["m"]) for r in rows if r["op"] == "xbm"} == {("4096", "4096")}
    out = capsys.readouterr().out
    assert f"== {sorted(ops)[0]}" in out


def test_preset_scripts_are_thin_and_show_their_commands():
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        assert name in bench_presets.PRESETS, script
        assert len(script.read_text().splitlines()) < 40, f"{script} should only call the preset"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_knn.py"), "--device", "cpu", "--show",
                          "--sizes", "64"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["torchfg bench " + " ".join(run + ["--device", "cpu", "--sizes", "64"])
                   for run in bench_presets.preset_runs("knn", "cpu")]


def test_markdown_tables_from_csv(tmp_path):
    from torchfg.bench.tables import csv_to_markdown

    results = run_benchmarks(["pairwise"], sizes=[16], dim=4, device="cpu", repeat=1, warmup=0, progress=False)
    path = tmp_path / "r.csv"
    bench_report.write_csv(path, results)
    text = csv_to_markdown(path)
    assert "**pairwise** on CPU" in text and "| 16 | 4 | torch.cdist |" in text
    # A batch against a memory: the table shows M; a failed case is a row that says why.
    xbm = run_benchmarks(["xbm"], sizes=[40], dim=4, device="cpu", repeat=1, warmup=0, params={"batch": 8},
                         cases=["torchfg[torch]"], launches=True)
    xbm[0].status, xbm[0].measurement = "error: MemoryError: over the memory limit", None
    bench_report.write_csv(path, results + xbm)
    text = csv_to_markdown(path)
    assert "| N | M | D | case |" in text and "launches / step" in text
    assert "| 8 | 40 | 4 | torchfg[torch] | error: MemoryError: over the memory limit |" in text


def test_markdown_tables_keep_commits_and_thread_counts_apart():
    from torchfg.bench.tables import rows_to_markdown

    def row(commit: str, threads: str, median: str) -> dict[str, str]:
        return {"device": "cpu", "dtype": "float32", "op": "knn", "params": "k=10", "case": "faiss.IndexFlat",
                "status": "ok", "n": "64", "d": "8", "median_ms": median, "p20_ms": median, "p80_ms": median,
                "commit": commit, "threads": threads}

    text = rows_to_markdown([row("aaa1111", "1", "1.5"), row("bbb2222", "1", "2.5"), row("aaa1111", "2", "3.5")])
    captions = [line for line in text.splitlines() if line.startswith("**knn**")]
    assert len(captions) == 3, text
    assert [("commit aaa1111" in c, "1 thread(s)" in c) for c in captions] == [(True, True), (False, True), (True, False)]
    # Each table holds only its own commit's and thread count's row.
    tables = text.split("**knn**")[1:]
    assert ["| 1.5 (" in t for t in tables] == [True, False, False] and "| 2.5 (" in tables[1] and "| 3.5 (" in tables[2]


def test_benchmarks_readme_tables_are_up_to_date():
    # benchmarks/README.md holds the tables of benchmarks/results/ as `python -m torchfg.bench.tables
    # --update` writes them: a change to the tables' code or to a CSV must come with the regenerated page.
    from torchfg.bench import tables

    text = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    recorded = text.split(tables.START, 1)[1].split(tables.END, 1)[0].strip("\n")
    results = ROOT / "benchmarks" / "results"
    assert recorded == tables.results_section(sorted([*results.glob("*.csv"), *results.glob("*.png")])), (
        "regenerate: python -m torchfg.bench.tables --update benchmarks/README.md "
        "benchmarks/results/*.csv benchmarks/results/*.png")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"ops": ["nope"]}, "ops"),
        ({"sizes": [1]}, "sizes"),
        ({"repeat": 0}, "repeat"),
        ({"warmup": -1}, "warmup"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"dim": 0}, "dim"),
        ({"device": "tpu"}, "device"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
    ],
)
def test_run_benchmarks_rejects_bad_arguments(kwargs, name):
    args = {"ops": ["pairwise"], "device": "cpu", "progress": False, **kwargs}
    with pytest.raises(ValueError, match=name):
        run_benchmarks(**args)


def test_cpu_peak_memory_sees_an_allocation_after_warmup():
    """The CPU memory window covers the warm-up: freed pages kept by the allocator must not hide it."""
    from torchfg.bench.measure import measure

    size = 64 * 2**20

    def allocate() -> None:
        buffer = torch.ones(size // 4)  # 64 MiB of fp32, touched
        del buffer

    m = measure(allocate, device="cpu", warmup=2, repeat=3)
    assert m.memory_method in ("rss_reset_peak", "rss_peak_growth")
    if m.memory_method == "rss_reset_peak":
        assert m.peak_extra_bytes >= 0.9 * size, m
    nothing = measure(lambda: None, device="cpu", warmup=1, repeat=3)
    assert nothing.peak_extra_bytes < 0.1 * size


def test_step_host_script_times_the_gpu_path_with_launches_stubbed(tmp_path):
    # benchmarks/step_host.py: the fused step's host time on the GPU code path, any machine. It
    # must take the autotuned GPU branch (5 JIT launches per step: row statistics, two mining
    # passes for int64 labels, loss forward, loss backward) and write one row per case.
    pytest.importorskip("triton")
    out = tmp_path / "host.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_host.py"), "--n", "96", "--d", "32",
                    "--warmup", "1", "--chunks", "1", "--steps", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True, env=env, timeout=300)
    rows = list(csv.DictReader(out.open()))
    assert [r["case"] for r in rows] == ["batch_hard", "atl"]
    assert all(r["jit_launches"] == "5" and float(r["host_us_median"]) > 0 for r in rows)


def test_step_host_script_records_the_bench_commit_and_writes_each_case_when_done(tmp_path):
    # The device machines name the commit in TORCHFG_BENCH_COMMIT (their git history is not the
    # code's); a case that fails or runs out of time must not take the finished cases' rows with it.
    pytest.importorskip("triton")
    out = tmp_path / "host.csv"
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        import step_host

        made = step_host._cases

        def cases(*args):
            def broken():
                raise RuntimeError("the second case broke")

            return {{**made(*args), "atl": broken}}

        step_host._cases = cases
        step_host.main(["--n", "64", "--d", "16", "--warmup", "1", "--chunks", "1", "--steps", "1",
                        "--out", {str(out)!r}])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TORCHFG_BENCH_COMMIT"] = "abc1234 (named)"
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "the second case broke" in done.stderr, done.stderr[-2000:]
    rows = _read_csv(out)
    assert [(r["case"], r["commit"]) for r in rows] == [("batch_hard", "abc1234 (named)")]


def test_profile_counts_host_reads_and_host_copies() -> None:
    # What keeps a step capturable in a CUDA graph: no device-to-host read, no host data copied in.
    from torchfg.bench.profile import profile_step

    x = torch.randn(8, 4, requires_grad=True)
    clean = profile_step(lambda: (x * 2.0).sum().backward())
    assert clean.host_syncs == 0 and clean.host_copies == 0
    literal = profile_step(lambda: (x * torch.tensor([2.0])).sum().backward())  # a torch.tensor literal
    assert literal.host_copies == 1 and literal.host_syncs == 0
    moved = profile_step(lambda: x.detach().to("meta"))  # a CPU tensor copied to another device
    assert moved.host_copies == 1
    read = profile_step(lambda: float(x.detach().sum()))
    assert read.host_syncs == 1 and read.host_copies == 0


def test_cuda_graph_case_is_a_gpu_case() -> None:
    from torchfg.bench.core import cuda_graph_available, in_cuda_graph, load_op

    names = {case.name: case for case in load_op("triplet").cases()} | {
        f"atl {case.name}": case for case in load_op("atl").cases()}
    for name in ("torchfg[triton] cudagraph", "atl torchfg[triton] cudagraph"):
        assert names[name].gpu_kernel and names[name].available is cuda_graph_available
    assert cuda_graph_available(torch.device("cpu"), torch.float32)[0] is False
    problem = load_op("triplet").make_problem(8, 4, torch.float32, torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="CUDA device"):
        in_cuda_graph(lambda p: (lambda: None))(problem)
    results = run_benchmarks(["triplet"], sizes=[8], dim=4, device="cpu", repeat=1, cases=["torchfg[triton] cudagraph"])
    assert [r.status.split(":")[0] for r in results] == ["skipped"], [r.status for r in results]


def test_a_case_whose_memory_is_not_measured_records_no_peak(tmp_path, monkeypatch):
    # The CUDA-graph cases allocate their graph's pool at capture, before the measured runs: their
    # rows must say the peak was not measured, and the table, the chart and the CSV leave it blank.
    import dataclasses

    import torchfg.bench.pairwise as pairwise
    from torchfg.bench.core import CUDA_GRAPH_MEMORY
    from torchfg.bench.tables import csv_to_markdown

    for op_name, case_name in (("triplet", "torchfg[triton] cudagraph"), ("atl", "torchfg[triton] cudagraph")):
        assert _find_case(load_op(op_name), case_name).memory_unmeasured == CUDA_GRAPH_MEMORY
    cases = pairwise.BENCH.cases
    monkeypatch.setattr(pairwise, "BENCH", dataclasses.replace(pairwise.BENCH, cases=lambda: [
        dataclasses.replace(case, memory_unmeasured=CUDA_GRAPH_MEMORY) if case.name == "torch.cdist" else case
        for case in cases()]))
    results = run_benchmarks(["pairwise"], sizes=[8, 12], dim=4, device="cpu", repeat=1, warmup=0,
                             cases=["torchfg[torch]", "torch.cdist"])
    unmeasured = [r for r in results if r.case == "torch.cdist"]
    assert [r.status for r in results] == ["ok"] * 4
    for r in unmeasured:
        assert r.measurement.peak_extra_bytes is None
        row = r.csv_row()
        assert row["peak_extra_mib"] == "" and row["memory_method"] == f"not measured: {CUDA_GRAPH_MEMORY}"
    line = next(line for line in format_table(results).splitlines() if " torch.cdist " in line)
    assert line.split()[-5:-3] == ["-", "ok"], line  # the peak MiB column, then "ok (floor ... ms)"
    path = tmp_path / "r.csv"
    bench_report.write_csv(path, results)
    assert "| 8 | 4 | torch.cdist |" in csv_to_markdown(path)
    cdist_row = next(line for line in csv_to_markdown(path).splitlines() if "| torch.cdist |" in line)
    assert cdist_row.endswith("| - |"), cdist_row
    if bench_report.matplotlib_available():
        import matplotlib.pyplot as plt

        figures = []
        monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
        bench_report.plot_results(results, tmp_path / "r.png")
        memory_axis = next(ax for ax in figures[0].axes if "peak" in ax.get_title())
        assert [line.get_label() for line in memory_axis.get_lines()] == ["torchfg[torch]"]
        plt.close(figures[0])

