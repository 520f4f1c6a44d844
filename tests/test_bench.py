"""`torchfg bench` at tiny sizes: the CLI, the CSV, the plot, and that every case computes the same thing."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from torchfg.bench import CSV_COLUMNS, OP_NAMES, format_table, load_op, run_benchmarks
from torchfg.bench import report as bench_report
from torchfg.bench import worker as bench_worker
from torchfg.bench.core import Problem, _find_case, _measure_isolated
from torchfg.cli import main

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
    ("pairwise", "torch.cdist"),
    ("pairwise", "pml.LpDistance"),
    ("triplet", "torch.cdist+masks"),
    ("atl", "torch.cdist+masks"),
    ("dino", "plain PyTorch (DINO repo)"),
    ("knn", "torch.cdist+topk"),
    ("knn", "faiss.IndexFlatL2"),
]

# (rtol, atol) per baseline where the baseline cannot match fp64 to the last bits: faiss computes in
# fp32; torch.cdist's GEMM path leaves rounding noise on d(i, i), which torchfg sets to exactly 0.
TOLERANCES = {"faiss.IndexFlatL2": (1e-4, 1e-4), "torch.cdist+topk": (1e-6, 1e-6)}


@pytest.mark.parametrize("op_name,baseline", AGREEING_BASELINES)
def test_baselines_compute_what_torchfg_computes(op_name, baseline):
    op = load_op(op_name)
    ok, why = op.requires()
    if not ok:
        pytest.skip(f"{op_name} not available: {why}")
    case = _find_case(op, baseline)
    ok, why = case.available(CPU, torch.float64)
    if not ok:
        pytest.skip(why)
    # Odd sizes, fp64 so that no near-tie flips a hardest pair between the two routes.
    problem = op.make_problem(37, 11, torch.float64, CPU, seed=3)
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


def test_worker_and_isolated_run():
    op = load_op("pairwise")
    problem = op.make_problem(24, 8, torch.float32, CPU)
    m, floor_ms = _measure_isolated(op, _find_case(op, "torch.cdist"), problem, warmup=0, repeat=3, max_seconds=None)
    assert m.repeats == 3 and m.p20_ms <= m.median_ms <= m.p80_ms and m.memory_method.startswith("rss")
    assert floor_ms is not None and floor_ms > 0


def test_worker_reports_errors_as_json(capsys):
    request = {"op": "pairwise", "case": "no such case", "n": 8, "d": 4, "dtype": "float32", "device": "cpu",
               "seed": 0, "warmup": 0, "repeat": 1, "max_seconds": None}
    assert bench_worker.main([json.dumps(request)]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "no case" in reply["error"]


def test_markdown_tables_from_csv(tmp_path):
    from torchfg.bench.tables import csv_to_markdown

    results = run_benchmarks(["pairwise"], sizes=[16], dim=4, device="cpu", repeat=1, warmup=0, progress=False)
    path = tmp_path / "r.csv"
    bench_report.write_csv(path, results)
    text = csv_to_markdown(path)
    assert "**pairwise** on CPU" in text and "| 16 | 4 | torch.cdist |" in text


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
    ],
)
def test_run_benchmarks_rejects_bad_arguments(kwargs, name):
    args = {"ops": ["pairwise"], "device": "cpu", "progress": False, **kwargs}
    with pytest.raises(ValueError, match=name):
        run_benchmarks(**args)


def test_cpu_peak_memory_sees_an_allocation_after_warmup():
    """The CPU memory window covers the warm-up: freed pages kept by the allocator must not hide it."""
    from torchfg.utils.benchmark import measure

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
