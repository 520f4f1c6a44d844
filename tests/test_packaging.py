"""Packaging: what a source archive unpacks to, and what the sdist and the wheel built from it ship.

GitHub's "Download ZIP" (like any unpacker that does not restore symlinks: Python's zipfile,
Windows) turns a symlink into a small text file holding its target, so sources that sit behind
a symlink are missing from whatever is built there. The checkout is copied here as such an
unpacker leaves it, built into an sdist, and the sdist into a wheel (what pip does with an sdist),
and straight into a wheel (pip install .), with the setuptools of this environment and no network
(a few seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Sources the compiled kernels are built from, at the paths torchfg looks for them.
KERNEL_SOURCES = (
    "torchfg/csrc/knn_cpu/knn_select.c",
    "torchfg/csrc/knn/knn_kernel.cu",
    "torchfg/csrc/knn/knn_kernel.h",
    "torchfg/csrc/knn/knn_binding.cpp",
)
TYPED_MARKER = "torchfg/py.typed"


def _git_files() -> list[str] | None:
    """The checkout's files as an archive of it would hold them (tracked, and new files not
    ignored), or None outside a git checkout (an unpacked sdist)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None
    return sorted({name for name in out.stdout.split("\0") if name})


def _setuptools(code: str, cwd: Path, out: Path) -> str:
    """Run ``code`` (a setuptools.build_meta call writing to ``out``) in a fresh interpreter in ``cwd``."""
    run = subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; " + code, str(out)],
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def _wheel_files(wheel_dir: Path) -> tuple[set[str], str]:
    (wheel,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    return names, metadata


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The checkout copied as an unpacker that does not restore symlinks leaves it (with the
    bytecode a test run leaves in torchfg/csrc), then built: {"sdist": its files, "wheel": the
    files of the wheel built from the sdist (pip install of an sdist), "direct": those of the
    wheel built from the tree (pip install .)}, with "metadata" (the wheel's) and "log"."""
    pytest.importorskip("setuptools", minversion="77")  # PEP 639 license metadata
    files = _git_files()
    if files is None:
        pytest.skip("not a git checkout")
    base = tmp_path_factory.mktemp("packaging")
    tree = base / "unpacked"
    for name in files:
        source, target = ROOT / name, tree / name
        if source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(os.readlink(source))  # what the ZIP's unpacker makes of a symlink
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if (tree / "torchfg" / "csrc").is_dir():
        stray = tree / "torchfg" / "csrc" / "__pycache__" / "knn_ptxas_report.cpython-311.pyc"
        stray.parent.mkdir()
        stray.write_bytes(b"bytecode")
    log = _setuptools("print(b.build_sdist(sys.argv[1]))", tree, base / "sdist")
    (sdist,) = (base / "sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(base / "from_sdist", **extra)
    (unpacked,) = (base / "from_sdist").iterdir()
    log += _setuptools("print(b.build_wheel(sys.argv[1]))", unpacked, base / "wheel")
    log += _setuptools("print(b.build_wheel(sys.argv[1]))", tree, base / "direct")
    wheel, metadata = _wheel_files(base / "wheel")
    direct, _ = _wheel_files(base / "direct")
    return {"sdist": {name.split("/", 1)[1] for name in members if "/" in name}, "wheel": wheel,
            "direct": direct, "metadata": metadata, "log": log}


def test_no_symlinks_in_the_package():
    """A symlink in the package becomes a text file in a ZIP download (and is not followed on
    Windows): every file and folder under torchfg/ must be a real one."""
    links = [str(Path(d, name).relative_to(ROOT)) for d, dirs, names in os.walk(ROOT / "torchfg")
             for name in dirs + names if Path(d, name).is_symlink()]
    assert not links, links
    files = _git_files()
    if files is not None:
        staged = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-s", "--", "torchfg"],
                                capture_output=True, text=True, timeout=60).stdout
        assert not [line for line in staged.splitlines() if line.startswith("120000")], "symlinks in git's index"


@pytest.mark.parametrize("wheel", ["wheel", "direct"])
def test_wheel_from_an_unpacked_archive_ships_the_kernel_sources(built, wheel):
    files = built[wheel]
    missing = [name for name in KERNEL_SOURCES if name not in files]
    assert not missing, (missing, sorted(n for n in files if "csrc" in n))
    assert not [name for name in files if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.parametrize("archive", ["sdist", "wheel", "direct"])
def test_package_ships_its_py_typed_marker(built, archive):
    """PEP 561: without torchfg/py.typed in the installed package, mypy and pyright ignore its
    annotations (every torchfg name is Any to them); tests/test_typing.py checks what they see."""
    assert (ROOT / TYPED_MARKER).is_file()
    assert TYPED_MARKER in built[archive], sorted(n for n in built[archive] if n.startswith("torchfg/") and "/" not in n[8:])


def test_sdist_ships_the_complete_tests_tree(built):
    """The tests in the sdist run: conftest.py, the helpers and the subfolders come with the
    top-level test files, and so do the files they read (docs, benchmarks, README)."""
    sdist_files = built["sdist"]
    checkout = [name for name in _git_files() if name.startswith("tests/") and (ROOT / name).is_file()]
    missing = [name for name in checkout if name not in sdist_files]
    assert not missing, missing
    for needed in ("tests/conftest.py", "tests/ops/test_knn_cpu.py", "LICENSE", "README.md", "mkdocs.yml",
                   *KERNEL_SOURCES):
        assert needed in sdist_files, needed
    assert any(name.startswith("benchmarks/results/") for name in sdist_files)
    assert not [name for name in sdist_files if "__pycache__" in name or name.endswith(".pyc")]


def test_license_metadata_is_an_spdx_expression_with_its_file(built):
    wheel_files, metadata, log = built["wheel"], built["metadata"], built["log"]
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_files)
    assert "SetuptoolsDeprecationWarning" not in log, log[-3000:]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_sources_are_found_in_the_package_or_in_torchfg_csrc_dir(tmp_path, monkeypatch):
    """torchfg/csrc holds the sources; TORCHFG_CSRC_DIR, when it holds them, comes first."""
    from torchfg.ops import _cuda_extension
    from torchfg.ops.knn import cpu

    package = ROOT / "torchfg" / "csrc"
    monkeypatch.delenv("TORCHFG_CSRC_DIR", raising=False)
    assert _cuda_extension.csrc_dir() == package
    assert cpu._source_path() == package / "knn_cpu" / "knn_select.c"
    own = tmp_path / "csrc"
    shutil.copytree(package, own)
    monkeypatch.setenv("TORCHFG_CSRC_DIR", str(own))
    assert _cuda_extension.csrc_dir() == own
    assert cpu._source_path() == own / "knn_cpu" / "knn_select.c"
    monkeypatch.setenv("TORCHFG_CSRC_DIR", str(tmp_path / "empty"))  # without the sources: the package's
    assert _cuda_extension.csrc_dir() == package


def test_eager_training_never_imports_torch_dynamo():
    """torch._dynamo costs ~1.2 s and 140 MiB of resident memory once per process (torch 2.13):
    torchfg registers its ops without custom_op for that reason, and a class-level
    torch.compiler.disable (CrossBatchMemory's step, for one session) imported it at import time."""
    script = """
import sys
import torch
import torchfg, torchfg.data, torchfg.datasets, torchfg.distributed, torchfg.fewshot, torchfg.functional
import torchfg.heads, torchfg.layers, torchfg.losses, torchfg.metrics, torchfg.miners, torchfg.ops, torchfg.utils
from torchfg.losses import AdaptiveTripletLoss, CrossBatchMemory, DINOLoss, TripletMarginLoss
from torchfg.miners import TripletMarginMiner
from torchfg.heads import PrototypicalHead
from torchfg.metrics import retrieval_metrics
assert "torch._dynamo" not in sys.modules, "at import"
x, y, t = torch.randn(16, 8, requires_grad=True), torch.arange(16) // 4, torch.randn(16, 4)
TripletMarginLoss()(x, y).backward()
AdaptiveTripletLoss()(x, y, t).backward()
TripletMarginLoss(mining="all")(x, y, TripletMarginMiner()(x, y)).backward()
CrossBatchMemory(TripletMarginLoss(), 8, 32)(x, y).backward()
DINOLoss(5, n_crops=2, n_global_crops=2, n_epochs=3)(torch.randn(4, 5, requires_grad=True), torch.randn(4, 5), 0).backward()
PrototypicalHead()(x, y, x).sum().backward()
retrieval_metrics(x.detach(), y)
assert "torch._dynamo" not in sys.modules, "in a training step"
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
