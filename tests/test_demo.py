"""torchfg.demo: each experiment end to end at a tiny size, the report, run_demo and the CLI."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from torchfg.cli import build_parser, main
from torchfg.demo import (
    QUICK_CONFIG,
    AttributeClassifier,
    EmbeddingNet,
    SmallCNN,
    atl_vs_triplet_experiment,
    few_shot_experiment,
    recall_curve,
    run_demo,
    semantic_attention_experiment,
)
from torchfg.demo import run as demo_run
from torchfg.demo.report import format_table, matplotlib_available

# Tiny sizes: every experiment runs end to end in a second or two on one CPU core.
TINY_SEMANTIC = dict(num_products=12, views_per_domain=3, test_views=1, epochs=1, batch_size=16)
TINY_RETRIEVAL = dict(num_products=12, views_per_domain=2, epochs=1, classes_per_batch=4, items_per_class=2, max_k=5)
TINY_FEW_SHOT = dict(
    num_products=16,
    views_per_domain=2,
    dino_epochs=1,
    dino_batch_size=8,
    supervised_epochs=1,
    supervised_batch_size=16,
    shots=(1, 2),
    n_episodes=10,
)
COMMON = dict(device="cpu", progress=False, threads=1)


def _drop_timings(value: object) -> object:
    """The result without wall / CPU seconds, which differ between runs."""
    if isinstance(value, dict):
        return {k: _drop_timings(v) for k, v in value.items() if k not in ("wall_s", "cpu_s", "timing")}
    if isinstance(value, list):
        return [_drop_timings(v) for v in value]
    return value


def _in_unit_interval(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def semantic_result() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined AUCs are reported in the result, not warned about
        return semantic_attention_experiment(seed=1, **TINY_SEMANTIC, **COMMON)


@pytest.fixture(scope="module")
def retrieval_result() -> dict:
    return atl_vs_triplet_experiment(seed=1, **TINY_RETRIEVAL, **COMMON)


@pytest.fixture(scope="module")
def few_shot_result() -> dict:
    return few_shot_experiment(methods=("dino", "supervised"), seed=1, **TINY_FEW_SHOT, **COMMON)


# ----------------------------------------------------------------------------- building blocks


def test_small_cnn_and_embedding_shapes():
    torch.manual_seed(0)
    assert SmallCNN()(torch.rand(2, 3, 64, 64)).shape == (2, 128, 8, 8)
    assert SmallCNN(widths=(8, 8, 16, 24))(torch.rand(1, 3, 40, 40)).shape == (1, 24, 5, 5)
    out = EmbeddingNet(16)(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(widths=(8, 8, 8))


@pytest.mark.parametrize("method", ["baseline", "attention", "input_concat", "feature_concat", "mask"])
def test_attribute_classifier_methods_share_initial_backbone(method):
    torch.manual_seed(3)
    reference = AttributeClassifier("baseline", 23)
    torch.manual_seed(3)
    model = AttributeClassifier(method, 23)
    assert model(torch.rand(2, 3, 64, 64), torch.rand(2, 2, 64, 64)).shape == (2, 23)
    # Same seed, same backbone and head weights (the first conv of input_concat is widened with zeros).
    ref_conv = reference.net.stage2[0].weight
    conv = (model.net if method == "baseline" else model.net.backbone).stage2[0].weight
    torch.testing.assert_close(conv, ref_conv)
    torch.testing.assert_close(model.head.classifier.weight, reference.head.classifier.weight)


def test_attribute_classifier_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        AttributeClassifier("magic", 23)


def test_recall_curve_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(17, 5, generator=generator), torch.randn(23, 5, generator=generator)
    query_labels = torch.randint(0, 6, (17,), generator=generator)
    gallery_labels = torch.randint(0, 6, (23,), generator=generator)
    query_labels[0] = 99  # no such item in the gallery: left out of the recall, as in recall_at_k
    curve = recall_curve(query, query_labels, gallery, gallery_labels, max_k=7)
    distances = torch.cdist(query.double(), gallery.double())
    answerable = [i for i in range(query.shape[0]) if bool((gallery_labels == query_labels[i]).any())]
    assert 0 not in answerable and len(answerable) > 10
    for k in range(1, 8):
        hits = [bool((gallery_labels[distances[i].argsort()[:k]] == query_labels[i]).any()) for i in answerable]
        assert curve[k - 1].item() == pytest.approx(sum(hits) / len(hits))
    assert bool((curve[1:] >= curve[:-1]).all())


def test_recall_curve_rejects_max_k_above_gallery():
    with pytest.raises(ValueError, match="max_k"):
        recall_curve(torch.randn(2, 3), torch.arange(2), torch.randn(4, 3), torch.arange(4), max_k=5)


# ----------------------------------------------------------------------------- experiments, tiny


def test_semantic_attention_experiment_tiny(semantic_result):
    methods = semantic_result["methods"]
    assert list(methods) == ["baseline", "attention", "input_concat", "feature_concat", "mask"]
    n_labels = len(semantic_result["label_names"])
    for name, m in methods.items():
        assert _in_unit_interval(m["mean_auc"]), (name, m["mean_auc"])
        assert len(m["per_label_auc"]) == n_labels
        assert all(a is None or _in_unit_interval(a) for a in m["per_label_auc"])
        assert isinstance(m["relative_improvement"], float) and math.isfinite(m["relative_improvement"])
        assert math.isfinite(m["final_train_loss"]) and m["final_train_loss"] > 0
    assert methods["baseline"]["relative_improvement"] == 0.0
    # 12 test images: some attribute values are absent, so their AUC is undefined (None) and listed.
    undefined = semantic_result["undefined_auc_labels"]
    names = semantic_result["label_names"]
    assert undefined == [n for n, a in zip(names, methods["baseline"]["per_label_auc"]) if a is None]
    # Methods differ (they are trained, not copied from one another).
    assert len({m["mean_auc"] for m in methods.values()}) > 1
    assert semantic_result["config"]["test_images"] == 12 and semantic_result["config"]["train_images"] == 24


def test_semantic_experiment_trains_on_predicted_maps_by_default_and_on_both(semantic_result):
    assert semantic_result["map_quality"] == "predicted" and list(semantic_result["by_map_quality"]) == ["predicted"]
    assert semantic_result["by_map_quality"]["predicted"] == semantic_result["methods"]
    tiny = dict(TINY_SEMANTIC, methods=("baseline", "mask"))
    both = semantic_attention_experiment(seed=1, map_quality=("exact", "predicted"), **tiny, **COMMON)
    assert both["map_quality"] == "exact" and list(both["by_map_quality"]) == ["exact", "predicted"]
    exact, predicted = both["by_map_quality"]["exact"], both["by_map_quality"]["predicted"]
    # The baseline never sees the map: trained once, the same in both.
    assert exact["baseline"] == predicted["baseline"]
    assert _drop_timings(predicted["baseline"]) == _drop_timings(semantic_result["methods"]["baseline"])
    # Each quality's run is the run of that quality alone (same seed, same batches); the maps differ.
    assert _drop_timings(predicted["mask"]) == _drop_timings(semantic_result["methods"]["mask"])
    alone = semantic_attention_experiment(seed=1, map_quality="exact", **tiny, **COMMON)
    assert _drop_timings(alone["methods"]) == _drop_timings(exact)
    assert exact["mask"]["per_label_auc"] != predicted["mask"]["per_label_auc"]
    text = format_table({"semantic_attention": both})
    assert "street photos, exact maps" in text and "street photos, predicted maps" in text
    assert len(format_table({"semantic_attention": both}, markdown=True).splitlines()) == 2 + 2 + 2


def test_atl_vs_triplet_experiment_tiny(retrieval_result):
    methods = retrieval_result["methods"]
    assert list(methods) == ["untrained", "triplet", "atl"]
    for name, m in methods.items():
        curve = m["recall"]
        assert len(curve) == 5
        assert all(_in_unit_interval(r) for r in curve), (name, curve)
        assert all(a <= b for a, b in zip(curve, curve[1:]))
        assert m["recall_at_1"] == curve[0]
        assert m["recall_at_10"] is None  # max_k = 5
        assert _in_unit_interval(m["recall_at_1_stderr"])
    assert retrieval_result["triplet_margin"] > 0.1  # base margin plus the mean text distance term
    assert retrieval_result["config"]["queries"] == retrieval_result["config"]["gallery"] == 3 * 2


def test_few_shot_experiment_tiny(few_shot_result):
    methods = few_shot_result["methods"]
    assert list(methods) == ["untrained", "dino", "supervised"]
    for name, m in methods.items():
        assert set(m["accuracy"]) == set(m["ci95"]) == {"1", "2"}
        for shot in ("1", "2"):
            assert _in_unit_interval(m["accuracy"][shot]), (name, m)
            assert isinstance(m["ci95"][shot], float) and m["ci95"][shot] >= 0.0
    config = few_shot_result["config"]
    assert config["n_way"] == 4  # capped at the 4 novel products
    assert config["n_query"] == 2  # capped: 4 images per product, 2-shot
    assert config["dino"]["images"] == 12 * 2  # base products' studio photos only


def test_experiments_are_reproducible_for_a_seed_and_depend_on_it(retrieval_result):
    again = atl_vs_triplet_experiment(seed=1, **TINY_RETRIEVAL, **COMMON)
    assert _drop_timings(again) == _drop_timings(retrieval_result)
    other = atl_vs_triplet_experiment(seed=2, **TINY_RETRIEVAL, **COMMON)
    assert [other["methods"][m]["recall"] for m in ("triplet", "atl")] != [
        retrieval_result["methods"][m]["recall"] for m in ("triplet", "atl")
    ]


def test_dino_few_shot_is_reproducible(few_shot_result):
    again = few_shot_experiment(methods=("dino", "supervised"), seed=1, **TINY_FEW_SHOT, **COMMON)
    assert _drop_timings(again) == _drop_timings(few_shot_result)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: semantic_attention_experiment(test_views=3, views_per_domain=3, **COMMON), "test_views"),
        (lambda: semantic_attention_experiment(methods=("attention",), **COMMON), "baseline"),
        (lambda: semantic_attention_experiment(epochs=0, **COMMON), "epochs"),
        (lambda: atl_vs_triplet_experiment(num_products=12, views_per_domain=1, max_k=10, **COMMON), "max_k"),
        (lambda: few_shot_experiment(methods=("magic",), **COMMON), "methods"),
        (lambda: few_shot_experiment(num_products=8, views_per_domain=2, shots=(4,), **COMMON), "shots"),
        (lambda: few_shot_experiment(dino_domains=("moon",), **COMMON), "dino_domains"),
        (lambda: semantic_attention_experiment(device="tpu", progress=False), "device"),
        (lambda: semantic_attention_experiment(map_quality="perfect", **COMMON), "map_quality"),
        (lambda: semantic_attention_experiment(map_quality=("exact", "exact"), **COMMON), "map_quality"),
        (lambda: run_demo(experiments=["semantic"], progress=False), "experiments"),
        (lambda: run_demo(map_quality="perfect", progress=False), "map_quality"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_argument_types_raise_type_error():
    with pytest.raises(TypeError, match="seed"):
        atl_vs_triplet_experiment(seed=1.5, **COMMON)
    with pytest.raises(TypeError, match="progress"):
        few_shot_experiment(progress="yes", device="cpu")


# ----------------------------------------------------------------------------- report, run_demo, CLI


def test_format_table_lists_every_method(semantic_result, retrieval_result, few_shot_result):
    results = {
        "semantic_attention": semantic_result,
        "atl_vs_triplet": retrieval_result,
        "few_shot": few_shot_result,
    }
    text = format_table(results)
    for label in ("SemanticChannelAttention", "AdaptiveTripletLoss", "TripletMarginLoss", "DINO", "untrained"):
        assert label in text
    auc = semantic_result["methods"]["attention"]["mean_auc"]
    assert f"{auc:.3f}" in text
    markdown = format_table(results, markdown=True)
    assert markdown.startswith("| Experiment | Method | Metric | Value |")
    assert len(markdown.splitlines()) == 2 + 5 + 3 + 3


TINY_OVERRIDES = {
    "semantic_attention": TINY_SEMANTIC,
    "atl_vs_triplet": TINY_RETRIEVAL,
    "few_shot": {**TINY_FEW_SHOT, "methods": ("supervised",)},
}


def test_run_demo_tiny_writes_json_and_png(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = run_demo(quick=True, out_dir=tmp_path / "out", device="cpu", seed=4, overrides=TINY_OVERRIDES)
    printed = capsys.readouterr().out
    assert "seed 4" in printed and results["table"] in printed
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["seed"] == 4 and saved["mode"] == "quick" and saved["threads"] == 1
    assert saved["command"] == "torchfg demo --quick --seed 4 --device cpu"
    assert saved["semantic_attention"]["methods"]["mask"]["mean_auc"] == results["semantic_attention"]["methods"][
        "mask"
    ]["mean_auc"]
    assert set(saved["few_shot"]["methods"]) == {"untrained", "supervised"}
    png = tmp_path / "out" / "demo.png"
    if matplotlib_available():
        assert saved["figure"] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert saved["figure"] is None and "PNG skipped" in printed


def test_run_demo_without_matplotlib_skips_the_png(tmp_path, capsys, monkeypatch):
    import torchfg.demo.run as demo_run

    monkeypatch.setattr(demo_run, "matplotlib_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = run_demo(quick=True, out_dir=tmp_path, device="cpu", seed=4, overrides=TINY_OVERRIDES)
    assert results["figure"] is None and not (tmp_path / "demo.png").exists()
    assert "PNG skipped: matplotlib is not installed" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["figure"] is None


def test_run_demo_one_experiment_on_both_map_qualities(tmp_path, capsys):
    results = run_demo(quick=True, out_dir=tmp_path, device="cpu", seed=4, overrides=TINY_OVERRIDES, figure=False,
                       experiments=["semantic_attention"], map_quality="both")
    assert "atl_vs_triplet" not in results and "few_shot" not in results
    assert list(results["semantic_attention"]["by_map_quality"]) == ["exact", "predicted"]
    assert results["command"].endswith("--only semantic_attention --map-quality both")
    printed = capsys.readouterr().out
    assert "one experiment" in printed and "exact maps" in printed and "predicted maps" in printed


def test_run_demo_rejects_unknown_override(tmp_path):
    with pytest.raises(ValueError, match="overrides"):
        run_demo(quick=True, out_dir=tmp_path, device="cpu", overrides={"semantic": {}}, progress=False)


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"few_shot": {"n_shots": 5}}, ValueError, r"overrides\['few_shot'\] has an unknown keyword 'n_shots'.*shots"),
    ({"atl_vs_triplet": {"seed": 3}}, ValueError, r"overrides\['atl_vs_triplet'\] cannot set 'seed'.*seed="),
    ({"few_shot": 5}, TypeError, r"overrides\['few_shot'\] must be a mapping"),
])
def test_run_demo_checks_override_keywords_before_any_experiment(tmp_path, monkeypatch, overrides, error, match):
    # A keyword the last experiment does not take used to raise a TypeError only when that experiment
    # was called, after the earlier ones had trained for minutes: it is refused before any runs.
    ran = []

    def recording(experiment):
        @functools.wraps(experiment)  # inspect.signature follows __wrapped__: the real keywords
        def run(**kwargs):
            ran.append(experiment.__name__)
            raise AssertionError("an experiment ran before the overrides were checked")
        return run

    monkeypatch.setattr(demo_run, "_EXPERIMENTS", {name: recording(f) for name, f in demo_run._EXPERIMENTS.items()})
    with pytest.raises(error, match=match):
        run_demo(quick=True, out_dir=tmp_path, device="cpu", overrides=overrides, progress=False, figure=False)
    assert ran == []


def test_cli_parses_demo_options():
    args = build_parser().parse_args(["demo", "--quick", "--out", "x", "--seed", "7", "--device", "cpu"])
    assert (args.quick, args.out, args.seed, args.device, args.threads) == (True, "x", 7, "cpu", None)
    args = build_parser().parse_args(["demo"])
    assert (args.quick, args.out, args.seed, args.device) == (False, "torchfg_demo", 0, "auto")
    assert (args.only, args.map_quality) == (None, None)
    args = build_parser().parse_args(["demo", "--only", "semantic_attention", "--only", "few_shot", "--map-quality",
                                      "both"])
    assert (args.only, args.map_quality) == (["semantic_attention", "few_shot"], "both")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--only", "semantic"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--seed", "-1"])


def test_cli_demo_bad_device_exits_2(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "device" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_cli_demo_unwritable_out_fails_before_running(tmp_path, capsys, monkeypatch):
    """An --out that cannot be written (here under a regular file, which even root cannot) is
    one line naming --out, before any experiment runs."""
    monkeypatch.setattr("torchfg.demo.run.run_demo", lambda **kwargs: pytest.fail("the demo ran"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo", "--quick", "--device", "cpu", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"torchfg demo: --out: cannot write to {blocker / 'out'}"), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_cli_demo_in_a_read_only_folder_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torchfg.demo.run.run_demo", lambda **kwargs: pytest.fail("the demo ran"))
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    for out in (read_only, None):  # an existing read-only --out, and the default ./torchfg_demo in one
        read_only.chmod(0o555)
        monkeypatch.chdir(read_only)
        try:
            assert main(["demo", "--quick", "--device", "cpu", *(["--out", str(out)] if out else [])]) == 2
        finally:
            read_only.chmod(0o755)
        assert "torchfg demo: --out: cannot write to" in capsys.readouterr().err
    assert not list(read_only.iterdir())


def test_cli_demo_quick_runs_end_to_end_at_tiny_size(tmp_path, monkeypatch, capsys):
    # The real --quick sizes take ~25 CPU-seconds (see the slow test below); shrink them here so the
    # CLI path itself (parser -> run -> run_demo -> files) is exercised within the test budget.
    for name, tiny in TINY_OVERRIDES.items():
        monkeypatch.setitem(QUICK_CONFIG, name, dict(tiny))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        status = main(["demo", "--quick", "--out", str(tmp_path), "--seed", "5", "--device", "cpu", "--no-figure"])
    assert status == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seed"] == 5 and saved["figure"] is None
    assert not (tmp_path / "demo.png").exists()
    assert "AdaptiveTripletLoss" in capsys.readouterr().out


@pytest.fixture(scope="module")
def quick_demo_through_pipes(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``torchfg demo --quick`` at its real sizes, stdout and stderr piped (as under CI or ``| cat``).

    The one run of the real quick demo in the suite (~25 CPU-seconds): every test that needs it shares it.
    The installed ``torchfg`` console script, with a module fallback in a bare checkout.
    """
    import shutil

    out = tmp_path_factory.mktemp("quick_demo")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = shutil.which("torchfg")
    command = [script] if script else [sys.executable, "-m", "torchfg.cli"]
    completed = subprocess.run(
        [*command, "demo", "--quick", "--out", str(out), "--device", "cpu", "--no-figure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed, out


def test_torchfg_demo_quick_subprocess(quick_demo_through_pipes):
    """The README's main job: the quick demo runs, shows every method of the full table and beats chance."""
    completed, out = quick_demo_through_pipes
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "quick"
    assert set(saved["few_shot"]["methods"]) == {"untrained", "dino", "supervised"}
    for label in ("SemanticChannelAttention", "features masked by map", "AdaptiveTripletLoss",
                  "TripletMarginLoss", "DINO (self-supervised)", "supervised (cross-entropy)"):
        assert label in completed.stdout, label
    assert "DINO 4 (full: 10)" in completed.stdout  # the shortened schedules are stated


def test_quick_demo_log_stays_short_through_a_pipe(quick_demo_through_pipes):
    """Under a pipe (CI logs, ``| tee``, ``| cat``) progress is one plain line per stage, never redrawn bars."""
    completed, _ = quick_demo_through_pipes
    assert "\r" not in completed.stdout and "\r" not in completed.stderr
    lines = completed.stdout.splitlines() + completed.stderr.splitlines()
    assert len(lines) < 100, len(lines)
    # One line per training stage: 5 attribute methods, 2 retrieval losses, DINO and supervised.
    stages = [line for line in completed.stderr.splitlines() if " steps in " in line]
    assert len(stages) == 9, completed.stderr
    assert stages[0].startswith("[1/3] attributes: baseline: 20/20 steps in ")
    import re

    for line in stages:  # every stage ran the steps its line announces
        done, total = re.search(r": (\d+)/(\d+) steps in ", line).groups()
        assert done == total, line
    assert "it/s" not in completed.stderr  # no tqdm bar leaked into the log


def test_progress_bar_is_a_live_tqdm_on_a_terminal_and_one_line_elsewhere(monkeypatch):
    import io

    from tqdm import tqdm

    from torchfg.demo._common import StageLine, progress_bar

    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = FakeTerminal()
    with progress_bar(3, "stage", True, stream=terminal) as bar:
        assert isinstance(bar, tqdm)
        for _ in range(3):
            bar.update(1)
    assert "\r" in terminal.getvalue()  # a live bar redraws in place

    log = io.StringIO()
    with progress_bar(3, "stage", True, stream=log) as bar:
        assert isinstance(bar, StageLine)
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(loss="0.5")
        assert log.getvalue() == ""  # nothing until the stage ends
    assert log.getvalue().startswith("stage: 3/3 steps in ") and log.getvalue().endswith(" s (loss=0.5)\n")
    assert log.getvalue().count("\n") == 1

    silent = io.StringIO()
    with progress_bar(3, "stage", False, stream=silent) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def test_library_progress_is_off_by_default_and_tqdm_lazy():
    """torchfg.fewshot and torchfg.metrics show no bar unless asked, and importing them loads no tqdm."""
    import inspect

    import torchfg.fewshot
    import torchfg.metrics.retrieval as retrieval

    for fn in (torchfg.fewshot.evaluate, torchfg.fewshot.embed_dataset, retrieval.retrieval_metrics,
               retrieval.recall_at_k, retrieval.precision_at_1, retrieval.r_precision, retrieval.map_at_r):
        assert inspect.signature(fn).parameters["progress"].default is False, fn.__name__
    # `import torch` itself loads tqdm (torch.hub), so sys.modules cannot tell; read the sources instead:
    # no torchfg module imports tqdm at module level.
    import ast

    root = Path(__file__).resolve().parents[1] / "torchfg"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name == "tqdm" or name.startswith("tqdm.") for name in names):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert not offenders, offenders


def test_fewshot_progress_on_a_pipe_redraws_rarely():
    import io

    from torchfg.fewshot import _NON_TTY_INTERVAL_S, _progress_bar

    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _progress_bar([1, 2], enabled=False) == [1, 2]
    log = io.StringIO()
    with _progress_bar(range(3), enabled=True, file=log) as bar:
        assert bar.mininterval == _NON_TTY_INTERVAL_S >= 10  # a pipe or log: rare redraws
        assert list(bar) == [0, 1, 2]
    with _progress_bar(range(3), enabled=True, file=FakeTerminal()) as bar:
        assert bar.mininterval < 1  # a terminal: tqdm's live default
