"""torchfg/csrc/knn_ptxas_report.py: the k-NN CUDA kernel's compile evidence for sm_90 (needs nvcc
and cuobjdump, no GPU): no spills, tensor cores + cp.async + ldmatrix in the 16-bit kernels,
cp.async and FMA in the fp32 ones, every k <= 1024 served, two blocks per SM for k <= 512."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "torchfg" / "csrc" / "knn_ptxas_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("knn_ptxas_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load()
_NVCC = report.find_nvcc()
_CUOBJDUMP = report.find_cuobjdump(_NVCC)


def test_blocks_per_sm_model():
    # 80 regs: 8 warps x 2560 regs per block -> 3 blocks by registers; smem decides below that.
    assert report.blocks_per_sm(80, 72 * 1024, 0) == 3
    assert report.blocks_per_sm(80, 110 * 1024, 0) == 2
    assert report.blocks_per_sm(128, 20 * 1024, 0) == 2  # 128 regs x 256 threads = half the file
    assert report.blocks_per_sm(80, 228 * 1024, 0) == 0  # past the opt-in limit


@pytest.mark.skipif(_NVCC is None or _CUOBJDUMP is None, reason="needs nvcc and cuobjdump")
def test_knn_kernels_compile_clean_for_sm90(tmp_path):
    out = tmp_path / "knn_cuda_ptxas_sm90.csv"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader(out.open()))
    assert {(r["dtype"], r["config"]) for r in rows} == {(d, str(c)) for d in ("float32", "float16", "bfloat16")
                                                           for c in range(3)}
    for r in rows:
        name = f"{r['dtype']} config {r['config']}"
        assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, name
        assert int(r["stack_bytes"]) == 0, name
        assert int(r["ldgsts"]) > 0, f"{name}: no cp.async (LDGSTS)"
        if r["dtype"] == "float32":
            assert int(r["ffma"]) >= 64 and int(r["hmma"]) == 0, name
        else:
            assert int(r["hmma"]) > 0 and int(r["ldsm"]) > 0, f"{name}: no HMMA/LDSM"
        assert int(r["blocks_per_sm_k_max"]) >= 1, name
        if int(r["k_max"]) <= 512:
            assert int(r["blocks_per_sm_k_max"]) >= 2, f"{name}: k <= {r['k_max']} should fit 2 blocks/SM"
    # The table covers 1..1024 without gaps for every dtype.
    for dtype in ("float32", "float16", "bfloat16"):
        spans = sorted((int(r["k_min"]), int(r["k_max"])) for r in rows if r["dtype"] == dtype)
        assert spans[0][0] == 1 and spans[-1][1] == 1024
        assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:])), spans


def test_committed_report_matches_the_properties():
    committed = ROOT / "benchmarks" / "results" / "knn_cuda_ptxas_sm90.csv"
    rows = list(csv.DictReader(committed.open()))
    assert len(rows) == 9
    assert all(int(r["spill_stores"]) == 0 for r in rows)
    assert all(int(r["hmma"]) > 0 and int(r["ldsm"]) > 0 for r in rows if r["dtype"] != "float32")
