"""The package's import graph follows the layers of DESIGN.md: no upward import, no circle.

Every ``import torchfg...`` in the source is read from the AST, lazy imports inside functions
included (a lazy import still makes the lower layer depend on the upper one).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchfg"

# Lower number = lower layer. A module may import its own layer or below, never above.
LAYER = {
    "torchfg.errors": 0,
    "torchfg._version": 0,
    "torchfg._validation": 0,
    "torchfg.backends": 1,
    "torchfg.ops": 2,
    "torchfg.metrics": 3,
    "torchfg.data": 3,
    "torchfg.distributed": 3,
    "torchfg.datasets": 3,
    "torchfg.utils": 3,
    "torchfg.functional": 4,
    "torchfg.losses": 5,
    "torchfg.layers": 5,
    "torchfg.heads": 5,
    "torchfg.miners": 5,
    "torchfg.fewshot": 6,
    "torchfg.bench": 6,
    # The package root re-exports the public API for users; only entry points import it.
    "torchfg": 6,
    "torchfg.demo": 7,
    "torchfg.cli": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the torchfg modules it imports (absolute imports; relative ones resolved)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("torchfg"):
                    edges[module].add(target)
            elif isinstance(node, ast.Import):
                edges[module].update(alias.name for alias in node.names if alias.name.startswith("torchfg"))
    return edges


def _unit(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth])


def _layer(module: str) -> int:
    unit = _unit(module, 2)
    if unit not in LAYER:
        raise AssertionError(f"{unit} has no layer in tests/test_layering.py: add it where DESIGN.md puts it")
    return LAYER[unit]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_upward_import():
    upward = sorted(
        f"{source} imports {target}"
        for source, targets in _imports().items()
        for target in targets
        if _unit(source, 2) != _unit(target, 2) and _layer(target) > _layer(source)
    )
    assert not upward, "imports against the layers of DESIGN.md:\n" + "\n".join(upward)


@pytest.mark.parametrize("depth", [2, 3], ids=["packages", "subpackages"])
def test_no_import_circle(depth):
    # depth 2: torchfg.ops vs torchfg.backends ...; depth 3: one op folder vs another, one loss file vs another.
    graph: dict[str, set[str]] = defaultdict(set)
    for source, targets in _imports().items():
        for target in targets:
            a, b = _unit(source, depth), _unit(target, depth)
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                graph[a].add(b)
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_op_folder_holds_one_op_with_a_reference():
    ops = PACKAGE / "ops"
    for folder in sorted(p for p in ops.iterdir() if p.is_dir() and not p.name.startswith("_")):
        assert (folder / "__init__.py").is_file(), f"ops/{folder.name} has no __init__.py"
        assert (folder / "reference.py").is_file(), f"ops/{folder.name} has no reference.py (the ground truth)"
        extra = sorted(
            p.name
            for p in folder.glob("*.py")
            if p.name not in ("__init__.py", "reference.py", "triton.py", "cuda.py", "cpu.py")
        )
        assert not extra, f"ops/{folder.name} has files beyond reference/triton/cuda/cpu: {extra}"


def test_every_functional_module_name_is_importable_from_torchfg_functional():
    """docs/api/functional.md says each function is also importable from torchfg.functional:
    memory_triplet_loss and mine_triplets_and_candidates were not."""
    import importlib

    import torchfg.functional as functional

    for path in sorted((PACKAGE / "functional").glob("[!_]*.py")):
        module = importlib.import_module(f"torchfg.functional.{path.stem}")
        for name in getattr(module, "__all__", []):
            if callable(getattr(module, name)):
                assert getattr(functional, name, None) is getattr(module, name), f"torchfg.functional.{name}"
