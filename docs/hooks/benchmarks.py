"""MkDocs hook: publish benchmarks/results/ (CSVs, PNGs) and render its tables into benchmarks.md.

The recorded results live next to the benchmark scripts, outside ``docs/``; this hook adds them
to the site at build time and replaces the ``<!-- benchmark-results -->`` marker of the
benchmarks page with one section per CSV (its PNG, a download link and the tables) and one per
lone PNG, so the page never goes stale. Uses ``torchfg/bench/tables.py`` by path: the docs build does not import torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- benchmark-results -->"
PAGE = "benchmarks.md"


def _tables_module():
    spec = importlib.util.spec_from_file_location("_torchfg_bench_tables", ROOT / "torchfg" / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result_files() -> list[Path]:
    if not RESULTS.is_dir():
        return []
    return sorted(p for p in RESULTS.iterdir() if p.suffix in (".csv", ".png") and p.is_file())


def on_files(files, config):
    for path in _result_files():
        files.append(File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE or MARKER not in markdown:
        return markdown
    section = _tables_module().results_section(_result_files(), link_prefix="benchmarks/results/")
    return markdown.replace(MARKER, section)
