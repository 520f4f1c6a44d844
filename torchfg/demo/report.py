"""The demo's results table (text and Markdown) and its figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

__all__ = ["MATPLOTLIB_MISSING", "matplotlib_available", "result_rows", "format_table", "plot_results"]

MATPLOTLIB_MISSING = "matplotlib is not installed, so no PNG was written (pip install 'torchfg[bench]' adds it)"

_METHOD_LABELS = {
    "baseline": "plain CNN (baseline)",
    "attention": "SemanticChannelAttention",
    "input_concat": "map as input channels",
    "feature_concat": "map concatenated to features",
    "mask": "features masked by map",
    "untrained": "untrained (initial weights)",
    "triplet": "TripletMarginLoss (batch-hard)",
    "atl": "AdaptiveTripletLoss (text margins)",
    "dino": "DINO (self-supervised)",
    "supervised": "supervised (cross-entropy)",
}


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}%" if signed else f"{100 * value:.1f}"


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(experiment, method, metric, value) rows of everything :func:`torchfg.demo.run_demo` measured."""
    rows: list[tuple[str, str, str, str]] = []
    semantic = results.get("semantic_attention")
    if semantic:
        by_quality = semantic.get("by_map_quality") or {semantic.get("map_quality", "exact"): semantic["methods"]}
        for quality, methods in by_quality.items():
            experiment = f"1. attributes, street photos, {quality} maps"
            for name, m in methods.items():
                value = _num(m["mean_auc"])
                if name != "baseline":
                    value += f" ({_pct(m['relative_improvement'], signed=True)})"
                rows.append((experiment, _METHOD_LABELS[name], "mean AUC (rel. to baseline)", value))
    retrieval = results.get("atl_vs_triplet")
    if retrieval:
        for name, m in retrieval["methods"].items():
            value = f"{_num(m['recall_at_1'])} +- {_num(m['recall_at_1_stderr'])} / {_num(m['recall_at_10'])}"
            rows.append(("2. street -> studio retrieval", _METHOD_LABELS[name], "R@1 +- s.e. / R@10", value))
    few_shot = results.get("few_shot")
    if few_shot:
        shots = few_shot["config"]["shots"]
        n_way = few_shot["config"]["n_way"]
        metric = " / ".join(f"{n_way}-way {s}-shot" for s in shots) + " (%, 95% CI)"
        for name, m in few_shot["methods"].items():
            value = " / ".join(f"{_pct(m['accuracy'][str(s)])} +- {_pct(m['ci95'][str(s)])}" for s in shots)
            rows.append(("3. few-shot, novel products", _METHOD_LABELS[name], metric, value))
    return rows


def format_table(results: dict[str, Any], *, markdown: bool = False) -> str:
    """The results as one table: aligned plain text, or GitHub Markdown with ``markdown=True``."""
    header = ("Experiment", "Method", "Metric", "Value")
    rows = result_rows(results)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        previous = None
        for experiment, method, metric, value in rows:
            shown = experiment if experiment != previous else ""
            previous = experiment
            lines.append(f"| {shown} | {method} | {metric.replace('+-', '±')} | {value.replace('+-', '±')} |")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), rule]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append(rule)
        cells = (row[0] if row[0] != previous else "",) + row[1:]
        previous = row[0]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def _semantic_rgb(semantic: torch.Tensor) -> torch.Tensor:
    """(3, H, W) map (background, body, trim) -> (H, W, 3) colours: dark background, blue body, gold trim."""
    palette = torch.tensor([[0.12, 0.12, 0.14], [0.25, 0.55, 0.95], [1.0, 0.78, 0.15]])
    return torch.einsum("khw,kc->hwc", semantic.float().cpu(), palette).clamp(0, 1)


def plot_results(
    results: dict[str, Any],
    path: str | Path,
    *,
    sample_images: torch.Tensor | None = None,
    sample_maps: torch.Tensor | None = None,
    sample_titles: list[str] | None = None,
) -> Path:
    """Write the demo figure to ``path`` (PNG) and return it. Needs matplotlib.

    Panels: sample images with their semantic maps (if given: images (S, 3, H, W), maps (S, 3, H, W)),
    mean attribute AUC per method, Recall@1..K curves per loss, few-shot accuracy with 95% CI.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subfigures(2, 2, squeeze=False)
    fig.suptitle(f"torchfg demo ({results.get('mode', '?')} run, seed {results.get('seed')})", fontsize=13)

    if sample_images is not None and sample_maps is not None and sample_images.shape[0] > 0:
        count = sample_images.shape[0]
        axes = panels[0][0].subplots(2, count, squeeze=False)
        for i in range(count):
            axes[0][i].imshow(sample_images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            axes[1][i].imshow(_semantic_rgb(sample_maps[i]).numpy())
            axes[0][i].set_axis_off()
            axes[1][i].set_axis_off()
            if sample_titles:
                axes[0][i].set_title(sample_titles[i], fontsize=7)
        quality = (results.get("semantic_attention") or {}).get("map_quality", "")
        panels[0][0].suptitle(f"street photos and their {quality} semantic maps (blue: body, gold: trim)".replace(
            "  ", " "), fontsize=10)

    semantic = results.get("semantic_attention")
    if semantic:
        ax = panels[0][1].add_subplot()
        names = list(semantic["methods"])
        values = [semantic["methods"][n]["mean_auc"] or 0.0 for n in names]
        colours = ["0.6" if n == "baseline" else ("tab:blue" if n == "attention" else "tab:orange") for n in names]
        bars = ax.bar(range(len(names)), values, color=colours)
        for bar, name in zip(bars, names):
            rel = semantic["methods"][name]["relative_improvement"]
            label = f"{bar.get_height():.3f}" + ("" if name == "baseline" else f"\n{_pct(rel, signed=True)}")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        low = min(values) if values else 0.5
        ax.set_ylim(max(0.0, low - 0.1), 1.02)
        ax.set_ylabel("mean per-label AUC (held-out street views)")
        ax.set_title(f"1. attributes in clutter: semantic map usage ({semantic.get('map_quality', 'exact')} maps)",
                     fontsize=10)

    retrieval = results.get("atl_vs_triplet")
    if retrieval:
        ax = panels[1][0].add_subplot()
        styles = {"untrained": ("0.6", ":"), "triplet": ("tab:orange", "-"), "atl": ("tab:blue", "-")}
        for name, m in retrieval["methods"].items():
            curve = [r or 0.0 for r in m["recall"]]
            colour, line = styles.get(name, ("k", "-"))
            ax.plot(range(1, len(curve) + 1), curve, line, marker="o", ms=3, color=colour, label=_METHOD_LABELS[name])
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        cfg = retrieval["config"]
        ax.set_title(
            f"2. street queries vs studio gallery, {cfg['novel_products']} novel products", fontsize=10
        )

    few_shot = results.get("few_shot")
    if few_shot:
        ax = panels[1][1].add_subplot()
        shots = few_shot["config"]["shots"]
        names = list(few_shot["methods"])
        width = 0.8 / max(len(names), 1)
        palette = {"untrained": "0.6", "dino": "tab:blue", "supervised": "tab:green"}
        for j, name in enumerate(names):
            m = few_shot["methods"][name]
            means = [100 * (m["accuracy"][str(s)] or 0.0) for s in shots]
            errors = [100 * (m["ci95"][str(s)] or 0.0) for s in shots]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(shots))]
            ax.bar(xs, means, width, yerr=errors, capsize=3, color=palette.get(name, "k"), label=_METHOD_LABELS[name])
        ax.axhline(100 / few_shot["config"]["n_way"], color="k", lw=0.8, ls="--", label="chance")
        ax.set_xticks(range(len(shots)), [f"{few_shot['config']['n_way']}-way {s}-shot" for s in shots])
        ax.set_ylabel("accuracy (%), 95% CI")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, loc="upper left")
        ax.set_title("3. few-shot on novel products (prototypical head)", fontsize=10)

    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
