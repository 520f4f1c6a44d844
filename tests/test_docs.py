"""The documentation cannot rot: its code runs.

(a) every ```python block of README.md and docs/**/*.md runs in a fresh namespace (a block right
    below an ``<!-- skip-test -->`` line is skipped: GPU-only, big downloads, multi-process);
(b) the doctests of every torchfg module pass (one test per module, so a module being written
    elsewhere fails alone; a module whose optional third-party dependency is missing is skipped);
(c) ``mkdocs build --strict`` succeeds when mkdocs is installed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARKER = "<!-- skip-test -->"
FENCE_OPEN = re.compile(r"^(?P<indent>\s*)```+\s*python\b.*$")


def markdown_files() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    return [ROOT / "README.md", *docs]


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(first line number, dedented code, skipped) of each ```python fence in a markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        match = FENCE_OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        indent = match.group("indent")
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed ```python fence")
        blocks.append((i + 1, textwrap.dedent("\n".join(body)), previous == SKIP_MARKER))
        i = j + 1
    return blocks


SNIPPETS = [
    pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}",
                 marks=[pytest.mark.skip(reason=f"marked {SKIP_MARKER}")] if skipped else [])
    for path in markdown_files()
    for line, code, skipped in python_blocks(path)
]


def test_snippets_are_found():
    names = {p.values[0].name for p in SNIPPETS}
    assert "README.md" in names and len(SNIPPETS) >= 10, names


def test_fence_parser_respects_skip_marker(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n<!-- skip-test -->\n```python\nraise SystemExit\n```\n"
                    "* item\n\n    ```python\n    b = 2\n    ```\n")
    assert python_blocks(page) == [(3, "a = 1", False), (8, "raise SystemExit", True), (13, "b = 2", False)]


@pytest.mark.parametrize("path,line,code", SNIPPETS)
def test_markdown_snippet_runs(path: Path, line: int, code: str):
    torch.manual_seed(0)
    namespace = {"__name__": "__docs_snippet__"}
    exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)


# ----------------------------------------------------------------------------- doctests


def torchfg_modules() -> list[str]:
    """Every public module of the torchfg package, found on disk (importing is left to the tests).

    Found from the files rather than by importing the package, so that one module that does not
    import fails its own test instead of the collection.
    """
    names = []
    for path in sorted((ROOT / "torchfg").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return names


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        # A missing optional third-party package (triton, a compiled extension's toolchain) is a
        # skip; a torchfg module that does not import is a failure.
        if missing and not missing.startswith("torchfg"):
            pytest.skip(f"{name} needs {missing}: {exc}")
        raise


@pytest.mark.parametrize("module_name", torchfg_modules())
def test_module_doctests(module_name: str):
    module = _import_or_skip(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, module_name) if t.examples]
    if not tests:
        pytest.skip("no doctest examples")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        torch.manual_seed(0)
        result = runner.run(test, out=report.append)
        del result
    summary = runner.summarize(verbose=False)
    assert summary.failed == 0, "".join(report)


# ----------------------------------------------------------------------------- mkdocs


def test_mkdocs_build_strict(tmp_path):
    for needed in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(needed) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{needed} is not installed (pip install '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()
