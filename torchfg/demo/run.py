"""``run_demo``: the three experiments in a row, one results table, ``results.json`` and ``demo.png``."""

from __future__ import annotations

import copy
import inspect
import json
import platform
import textwrap
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

import torchfg
from torchfg.demo._common import (
    Stopwatch,
    check_bool,
    check_int,
    clear_render_cache,
    default_threads,
    render_products,
    resolve_device,
    torch_threads,
)
from torchfg._validation import check_choice
from torchfg.datasets.synthetic_products import MAP_QUALITIES
from torchfg.demo.fewshot import few_shot_experiment
from torchfg.demo.report import MATPLOTLIB_MISSING, format_table, matplotlib_available, plot_results
from torchfg.demo.retrieval import atl_vs_triplet_experiment
from torchfg.demo.semantic import semantic_attention_experiment

__all__ = ["FULL_CONFIG", "QUICK_CONFIG", "run_demo"]

FULL_CONFIG: dict[str, dict[str, Any]] = {
    "semantic_attention": {"num_products": 100, "views_per_domain": 8, "test_views": 2, "epochs": 12},
    "atl_vs_triplet": {"num_products": 100, "views_per_domain": 8, "epochs": 12},
    "few_shot": {
        "methods": ("dino", "supervised"),
        "num_products": 100,
        "views_per_domain": 8,
        "dino_epochs": 10,
        "supervised_epochs": 6,
    },
}
"""Keyword arguments of each experiment in the full run (about 2 CPU-minutes on one core)."""

QUICK_CONFIG: dict[str, dict[str, Any]] = {
    "semantic_attention": {"num_products": 60, "views_per_domain": 5, "test_views": 1, "epochs": 5},
    "atl_vs_triplet": {"num_products": 60, "views_per_domain": 5, "epochs": 6},
    "few_shot": {
        "methods": ("dino", "supervised"),
        "num_products": 60,
        "views_per_domain": 5,
        "dino_epochs": 4,
        "supervised_epochs": 5,
    },
}
"""Keyword arguments of each experiment with ``quick=True`` (well under a minute): every method of the
full run, with fewer products, views and epochs (DINO: 4 epochs instead of 10)."""

# Each takes its configuration's keywords and seed, device and progress, and returns its results.
_EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "semantic_attention": semantic_attention_experiment,
    "atl_vs_triplet": atl_vs_triplet_experiment,
    "few_shot": few_shot_experiment,
}

_SAMPLES = 4  # street photos shown in the figure


# Set by run_demo's own arguments for every experiment: an override of one would be a second value.
_RUN_KEYWORDS = ("seed", "device", "progress")


def _check_override_keywords(name: str, extra: Mapping[str, Any]) -> None:
    """Refuses an override that the experiment does not take before any experiment runs: the call
    would otherwise raise only when its turn comes, after the earlier experiments' minutes of work."""
    if not isinstance(extra, Mapping):
        raise TypeError(f"overrides[{name!r}] must be a mapping of keyword arguments, got {type(extra).__name__}")
    accepted = [parameter for parameter in inspect.signature(_EXPERIMENTS[name]).parameters
                if parameter not in _RUN_KEYWORDS]
    for keyword in extra:
        if keyword in _RUN_KEYWORDS:
            raise ValueError(f"overrides[{name!r}] cannot set {keyword!r}: pass run_demo's own {keyword}= argument")
        if keyword not in accepted:
            raise ValueError(f"overrides[{name!r}] has an unknown keyword {keyword!r}; "
                             f"{name} takes {', '.join(accepted)}")


def _sample_street_photos(config: Mapping[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """First-view street photos of a few products, the semantic maps the attribute experiment used
    (the first of its map qualities) and wrapped descriptions."""
    dataset, batch = render_products(config["num_products"], config["views_per_domain"], seed)
    street = dataset.domain_names.index("street")
    rows = ((batch.domain == street) & (batch.view == 0)).nonzero().squeeze(1)[:_SAMPLES]
    titles = ["\n".join(textwrap.wrap(batch.description[i], 18)) for i in rows.tolist()]
    quality = config.get("map_quality", "predicted")
    quality = quality if isinstance(quality, str) else tuple(quality)[0]
    maps = batch.semantic_map[rows]
    if quality == "predicted":
        maps = dataset.predicted_maps(maps, rows)
    return batch.image[rows], maps, titles


def _quick_note(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """What the quick run shortens, read from the configurations actually run."""
    epochs = []
    for name, key, label in (
        ("semantic_attention", "epochs", "attributes"),
        ("atl_vs_triplet", "epochs", "retrieval"),
        ("few_shot", "dino_epochs", "DINO"),
        ("few_shot", "supervised_epochs", "supervised"),
    ):
        if name == "few_shot" and label.lower() not in configs[name].get("methods", ()):
            continue
        epochs.append(f"{label} {configs[name][key]} (full: {FULL_CONFIG[name][key]})")
    return (
        "(quick run: every method of the full run, with fewer steps on a smaller catalogue, "
        f"{configs['semantic_attention']['num_products']} products instead of "
        f"{FULL_CONFIG['semantic_attention']['num_products']}; epochs: {', '.join(epochs)}. It checks that "
        "everything works; the comparisons are only meaningful in the full run, `torchfg demo`)"
    )


def run_demo(
    quick: bool = False,
    out_dir: str | Path = "torchfg_demo",
    device: torch.device | str | None = "auto",
    seed: int = 0,
    *,
    threads: int | None = None,
    progress: bool = True,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    figure: bool = True,
    experiments: Sequence[str] | None = None,
    map_quality: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the three demo experiments, print one results table, write ``results.json`` and ``demo.png``.

    1. :func:`~torchfg.demo.semantic_attention_experiment`: attribute AUC in cluttered street photos,
       plain CNN vs :class:`~torchfg.layers.SemanticChannelAttention` vs three simpler fusions.
    2. :func:`~torchfg.demo.atl_vs_triplet_experiment`: street-to-studio Recall@K on novel products,
       batch-hard triplet loss vs adaptive triplet loss with description embeddings.
    3. :func:`~torchfg.demo.few_shot_experiment`: 5-way 1-/5-shot accuracy on novel products with a
       prototypical head, after DINO (self-supervised) and supervised training on base products.

    Everything is computed by the training that runs here; nothing is stored. One ``seed`` fixes the
    dataset, every initial weight, the batch order and the few-shot episodes: on the same machine,
    device and thread count the numbers repeat exactly (on CUDA, up to non-deterministic kernels).

    Args:
        quick: the small configuration :data:`QUICK_CONFIG` (under a minute on a CPU core) instead of
            :data:`FULL_CONFIG` (a few minutes).
        out_dir: directory for ``results.json`` and ``demo.png`` (created if needed).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        seed: the seed (int >= 0).
        threads: ``torch.set_num_threads`` for the run (restored afterwards); default
            :func:`~torchfg.demo._common.default_threads` (1).
        progress: tqdm progress bars and the printed table; False runs silently.
        overrides: per-experiment keyword arguments replacing the preset's, keyed by
            ``"semantic_attention"``, ``"atl_vs_triplet"`` and ``"few_shot"``.
        figure: write ``demo.png`` (skipped, with a message, when matplotlib is missing).
        experiments: run only these of ``"semantic_attention"``, ``"atl_vs_triplet"``, ``"few_shot"``
            (default: all three).
        map_quality: the semantic maps of the attribute experiment: ``"predicted"`` (the default, what a
            parsing model gives), ``"exact"`` (the rendered ground truth) or ``"both"`` (every map-using
            method trained on each; the table shows both).

    Returns:
        The dict written to ``results.json``: one entry per experiment (see each function), plus
        ``mode``, ``seed``, ``device``, ``threads``, versions, ``table`` (the printed table), ``figure``
        (path or None) and ``timing``.

    Example:
        >>> results = run_demo(quick=True, out_dir="demo_out")  # doctest: +SKIP
        >>> results["atl_vs_triplet"]["methods"]["atl"]["recall_at_1"]  # doctest: +SKIP
    """
    quick = check_bool(quick, "quick")
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    threads = default_threads() if threads is None else check_int(threads, "threads", 1)
    target = resolve_device(device)
    configs = copy.deepcopy(QUICK_CONFIG if quick else FULL_CONFIG)
    for name, extra in (overrides or {}).items():
        if name not in configs:
            raise ValueError(f"overrides keys must be among {tuple(configs)}, got {name!r}")
        _check_override_keywords(name, extra)
        configs[name].update(extra)
    if experiments is None:
        chosen = list(_EXPERIMENTS)
    else:
        if isinstance(experiments, str) or not experiments:
            raise TypeError(f"experiments must be a non-empty sequence of names from {tuple(_EXPERIMENTS)}, "
                            f"got {experiments!r}")
        for name in experiments:
            check_choice(name, "experiments", tuple(_EXPERIMENTS))
        chosen = [name for name in _EXPERIMENTS if name in experiments]
    if map_quality is not None:
        qualities = MAP_QUALITIES if map_quality == "both" else map_quality
        if isinstance(qualities, str):
            check_choice(qualities, "map_quality", MAP_QUALITIES + ("both",))
        configs["semantic_attention"]["map_quality"] = qualities
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    mode = "quick" if quick else "full"

    def say(text: str = "") -> None:
        if progress:
            print(text, flush=True)

    count = {1: "one experiment", 2: "two experiments", 3: "three experiments"}[len(chosen)]
    say(f"torchfg demo ({mode}): {count} on SyntheticProducts, rendered on the fly (nothing downloaded)")
    say(
        f"seed {seed} (dataset, initial weights, batch order and few-shot episodes); device {target}; "
        f"torch threads {threads}"
    )
    clock = Stopwatch()
    results: dict[str, Any] = {
        "mode": mode,
        "seed": seed,
        "device": str(target),
        "threads": threads,
        "command": f"torchfg demo{' --quick' if quick else ''} --seed {seed} --device {target.type}"
        + (f" --threads {threads}" if threads != default_threads() else "")
        + "".join(f" --only {name}" for name in chosen if len(chosen) < len(_EXPERIMENTS))
        + (f" --map-quality {map_quality}" if isinstance(map_quality, str) else ""),
        "versions": {
            "torchfg": torchfg.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    with torch_threads(threads):
        for number, (name, experiment) in enumerate(_EXPERIMENTS.items(), start=1):
            if name not in chosen:
                continue
            result = experiment(seed=seed, device=target, progress=progress, **configs[name])
            results[name] = result
            timing = result["timing"]
            say(f"[{number}/3] {name} done in {timing['wall_s']:.0f} s (CPU {timing['cpu_s']:.0f} s)")

        table = format_table(results)
        results["table"] = table
        results["table_markdown"] = format_table(results, markdown=True)
        say()
        say(table)
        if quick:
            say(_quick_note(configs))
        say()

        results["figure"] = None
        if figure:
            if matplotlib_available():
                images, maps, titles = _sample_street_photos(configs["semantic_attention"], seed)
                png = plot_results(
                    results, out_path / "demo.png", sample_images=images, sample_maps=maps, sample_titles=titles
                )
                results["figure"] = str(png)
            else:
                say(f"PNG skipped: {MATPLOTLIB_MISSING}")
    clear_render_cache()  # the experiments share one rendering; nothing needs it after the run
    results["timing"] = clock.seconds()
    json_path = out_path / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    say(f"wrote {json_path}" + (f" and {results['figure']}" if results["figure"] else ""))
    say(
        f"total: {results['timing']['wall_s']:.0f} s wall, {results['timing']['cpu_s']:.0f} s CPU; "
        f"rerun with: {results['command']}"
    )
    return results


def _jsonable(value: object) -> object:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
