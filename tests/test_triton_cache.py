"""benchmarks/triton_cache_sm90.py: kernels compiled for sm_90 on this machine, installed into a fresh
Triton cache under keys recomputed there, serve the same launches without compiling (the GPU
session's warm start), and a bundle whose recorded specialisation is wrong is caught.

Run with the suite's Triton in subprocesses (compiled kernels, not the interpreter); the GPU session
runs the same install under triton 3.6 with the bundle that triton 3.6 built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_cache_sm90.py"
# A DINO step: a handful of kernels (the warm-up size and the step's size), a few seconds to compile.
BENCH = "--ops dino --sizes 8 --dim 64 --param n_crops=4"


# The script as another wheel of the same Triton release would run it (the GPU machines' cp312
# wheel against this machine's cp311 one): the hash of Triton's own files in every key differs.
OTHER_BUILD = f"""
import runpy, sys
import triton.runtime.cache as cache
key = cache.triton_key()
cache.triton_key = lambda: key + "-another-wheel"
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(cache: Path, *args: str, extra_env: dict[str, str] | None = None,
         other_build: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), **(extra_env or {}))
    command = ["-c", OTHER_BUILD] if other_build else [str(SCRIPT)]
    return subprocess.run([sys.executable, *command, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("triton_cache")
    out = _ok(_run(work / "build-cache", "build", "--out", str(work / "bundle"), "--bench", BENCH))
    assert " 0 cases failed" in out and "0 left out" in out, out
    return work / "bundle.tgz"


def test_installed_bundle_serves_the_same_launches(bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads(tarfile.open(bundle).extractfile("./manifest.json").read())
    names = {e["name"] for e in manifest["entries"]}
    assert names and all(e["module"].startswith("torchfg.ops.") for e in manifest["entries"]), manifest["entries"]

    machine = tmp_path / "machine-cache"  # a GPU machine's empty cache
    out = _ok(_run(machine, "install", str(bundle)))
    assert f"{len(manifest['entries'])} kernels installed" in out and "0 skipped, 0 failed" in out, out
    # The same launches again, through Triton's runtime: every kernel must come from the cache.
    out = _ok(_run(machine, "build", "--out", str(tmp_path / "again"), "--bench", BENCH, "--require-cached"))
    assert "(0 compiled," in out, out
    out = _ok(_run(machine, "report"))
    assert "compiled on this machine: 0" in out, out


def test_keys_are_recomputed_for_another_triton_build(bundle: Path, tmp_path: Path) -> None:
    machine = tmp_path / "machine-cache"
    _ok(_run(machine, "install", str(bundle), other_build=True))
    out = _ok(_run(machine, "build", "--out", str(tmp_path / "again"), "--bench", BENCH, "--require-cached",
                   other_build=True))
    assert "(0 compiled," in out, out
    # Control: the build's own cache entries, copied as they are, serve nothing there.
    copied = tmp_path / "copied-cache"
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    _ok(_run(copied, "install", str(tmp_path / "unpacked")))
    done = _run(copied, "build", "--out", str(tmp_path / "again2"), "--bench", BENCH, "--require-cached",
                other_build=True)
    assert done.returncode == 1 and "(0 compiled," not in done.stdout, done.stdout


def test_a_wrong_specialisation_is_caught(bundle: Path, tmp_path: Path) -> None:
    # One entry's 16-divisibility attributes dropped: installed under a key no launch asks for, so
    # the launch compiles, and the check that the bundle serves the plan fails, naming the kernel.
    unpacked = tmp_path / "bundle"
    with tarfile.open(bundle) as tar:
        tar.extractall(unpacked, filter="data")
    manifest = json.loads((unpacked / "manifest.json").read_text())
    entry = next(e for e in manifest["entries"] if any(v for _, v in e["attrs"]))
    entry["attrs"] = [[path, []] for path, _ in entry["attrs"]]
    (unpacked / "manifest.json").write_text(json.dumps(manifest))

    machine = tmp_path / "machine-cache"
    _ok(_run(machine, "install", str(unpacked)))
    done = _run(machine, "build", "--out", str(tmp_path / "again"), "--bench", BENCH, "--require-cached")
    assert done.returncode == 1 and "(1 compiled," in done.stdout and entry["name"] in done.stdout, done.stdout
    out = _ok(_run(machine, "report"))
    assert "compiled on this machine: 1" in out and entry["name"] in out, out


def test_a_kernel_changed_since_the_build_is_not_installed(bundle: Path, tmp_path: Path) -> None:
    # The key is recomputed from the machine's source: a cubin of an older source would be stored
    # under the new source's key and run. The recorded source hash stops it.
    unpacked = tmp_path / "bundle"
    with tarfile.open(bundle) as tar:
        tar.extractall(unpacked, filter="data")
    manifest = json.loads((unpacked / "manifest.json").read_text())
    entry = manifest["entries"][0]
    entry["source_key"] = "0" * 64
    (unpacked / "manifest.json").write_text(json.dumps(manifest))

    machine = tmp_path / "machine-cache"
    out = _ok(_run(machine, "install", str(unpacked)))
    assert "1 skipped" in out and f"{entry['name']}: its source" in out, out
    done = _run(machine, "build", "--out", str(tmp_path / "again"), "--bench", BENCH, "--require-cached")
    assert done.returncode == 1 and "(1 compiled," in done.stdout, done.stdout


def test_install_refuses_a_different_environment(bundle: Path, tmp_path: Path) -> None:
    # A cache-invalidating variable set on the machine (not at the build): the kernels would be
    # stored under keys of code compiled differently, so nothing is installed.
    done = _run(tmp_path / "machine-cache", "install", str(bundle), extra_env={"TRITON_DEFAULT_FP_FUSION": "0"})
    assert done.returncode == 0 and "not installed: cache-invalidating environment" in done.stdout, done.stdout
    assert not any((tmp_path / "machine-cache").glob("*/*.cubin"))


def test_cases_are_sized_as_on_a_gpu() -> None:
    # xbm's batch depends on the device type (4096 on CUDA, 256 on a CPU): the build must run the
    # GPU's sizes on CPU tensors, or its kernels specialise differently (a split count of 17 is not
    # a multiple of 16, 128 is).
    import importlib.util

    environment = dict(os.environ)
    spec = importlib.util.spec_from_file_location("triton_cache_sm90", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert dict(os.environ) == environment  # the suite's TRITON_INTERPRET stays set for the next tests
    runs = list(module._bench_runs(["--ops", "xbm", "--sizes", "65536", "--dim", "8"], None))
    assert [label.split(" N=")[0] for label, _, _ in runs] == ["xbm torchfg[triton]"] * 2
    (_, tiny, _), (_, problem, _) = runs
    assert (problem.n, problem.m, problem.device.type) == (4096, 65536, "cpu")
    assert (tiny.n, tiny.m, tiny.device.type) == (32, 32, "cpu")


def test_report_tells_what_compiled_after_a_saved_list(bundle: Path, tmp_path: Path) -> None:
    # The session saves the list after its tests, and at the end reports only what came later.
    build_cache = bundle.parent / "build-cache"  # everything there was compiled there
    manifest = json.loads(tarfile.open(bundle).extractfile("./manifest.json").read())
    saved = tmp_path / "after-tests.txt"
    out = _ok(_run(build_cache, "report", "--save", str(saved)))
    assert f"compiled on this machine: {len(manifest['entries'])}" in out, out
    assert len(saved.read_text().splitlines()) == len(manifest["entries"])
    out = _ok(_run(build_cache, "report", "--exclude", str(saved)))
    assert f"(after the {len(manifest['entries'])} of after-tests.txt): 0" in out, out
