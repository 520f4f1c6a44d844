#!/usr/bin/env python3
"""Compile evidence for the k-NN CUDA kernel: every template instantiation, for one architecture.

Builds torchfg/csrc/knn/knn_kernel.cu once (with the half-precision macros torch's JIT build
passes) into a host executable whose main() prints the kernel's own configuration table (host code
only: it needs no GPU), then reads

* registers, spills and stack per kernel from ``ptxas -v``,
* the SASS of each kernel from ``cuobjdump -sass``: whether it uses tensor cores (HMMA), 16-byte
  async copies (LDGSTS, cp.async) and ldmatrix (LDSM), and how many FFMA it has,

and writes one CSV row per instantiation, with the range of k the table sends to it, its dynamic
shared memory at both ends of that range and the blocks per SM that allows (sm_90: 228 KB of
shared memory per SM, 1 KB reserved per block, 64 K registers, 2048 threads).

    python torchfg/csrc/knn_ptxas_report.py              # -> benchmarks/results/knn_cuda_ptxas_sm90.csv
    python torchfg/csrc/knn_ptxas_report.py --arch sm_90 --out /tmp/report.csv

nvcc comes from $NVCC, PATH or /usr/local/cuda; cuobjdump from $CUOBJDUMP, next to nvcc, PATH, or
the copy bundled with triton.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # torchfg/csrc -> the checkout
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "knn_cuda_ptxas_sm90.csv"

# The flags torch.utils.cpp_extension gives nvcc, so that the report sees the JIT build's code.
TORCH_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
# sm_90 limits (CUDA occupancy calculator): shared memory per SM and reserved per block, register
# file, register allocation unit per warp, resident threads per SM.
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_OPTIN_PER_BLOCK = 227 * 1024
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256
THREADS_PER_SM = 2048
THREADS_PER_BLOCK = 256
MAX_K = 1024
DTYPES = {0: "float32", 1: "float16", 2: "bfloat16"}
C_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
MANGLED_DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}

# Host-only driver: the configuration the kernel's own table picks for every (dtype, k).
_MAIN = r"""
#include <cstdio>
#include "knn_kernel.h"
int main() {
    for (int dtype = 0; dtype < 3; ++dtype)
        for (int k = 1; k <= TORCHFG_KNN_MAX_K; ++k) {
            TorchfgKnnConfig c = torchfg_knn_config(dtype, k, %d);
            std::printf("%%d,%%d,%%d,%%d,%%d,%%d,%%d,%%d,%%d\n", dtype, k, c.index, c.block_q, c.block_g, c.block_d,
                        c.stages, c.candidates, c.smem_bytes);
        }
    return 0;
}
"""

FIELDS = [
    "kernel", "dtype", "config", "block_q", "block_g", "block_d", "stages", "min_blocks", "k_min", "k_max",
    "registers", "spill_stores", "spill_loads", "stack_bytes", "static_smem", "dyn_smem_k_min", "dyn_smem_k_max",
    "blocks_per_sm_k_min", "blocks_per_sm_k_max", "hmma", "ldgsts", "ldsm", "ffma",
]


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_cuobjdump(nvcc: str | None) -> str | None:
    candidates = [os.environ.get("CUOBJDUMP")]
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent / "cuobjdump"))
    candidates += [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:  # triton wheels bundle one
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except Exception:
        pass
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def blocks_per_sm(registers: int, dyn_smem: int, static_smem: int) -> int:
    """Resident blocks of 256 threads per sm_90 SM for this footprint (0: does not fit)."""
    smem = dyn_smem + static_smem
    if smem > SMEM_OPTIN_PER_BLOCK:
        return 0
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)
    warps = THREADS_PER_BLOCK // 32
    per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // warps if per_warp else THREADS_PER_SM // THREADS_PER_BLOCK
    by_threads = THREADS_PER_SM // THREADS_PER_BLOCK
    return min(by_smem, by_regs, by_threads)


def _ptxas_info(text: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, spills, stack and static shared memory from ptxas -v."""
    info: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            info[current] = {"registers": -1, "spill_stores": -1, "spill_loads": -1, "stack_bytes": -1, "static_smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[current].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[current]["registers"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            if m2:
                info[current]["static_smem"] = int(m2.group(1))
    return info


def _sass_counts(text: str) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            current = m.group(1)
            counts[current] = {"hmma": 0, "ldgsts": 0, "ldsm": 0, "ffma": 0}
            continue
        if current is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            op = m.group(1)
            for key, name in (("hmma", "HMMA"), ("ldgsts", "LDGSTS"), ("ldsm", "LDSM"), ("ffma", "FFMA")):
                if op == name:
                    counts[current][key] += 1
    return counts


def build_report(arch: str = "sm_90", nvcc: str | None = None, cuobjdump: str | None = None) -> list[dict[str, object]]:
    """Compile and inspect every instantiation; returns the CSV rows."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set NVCC or put it on PATH)")
    cuobjdump = cuobjdump or find_cuobjdump(nvcc)
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (set CUOBJDUMP)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        main = tmp_path / "config_main.cpp"
        main.write_text(_MAIN % SMEM_OPTIN_PER_BLOCK)
        exe = tmp_path / "knn_config"
        cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", *TORCH_FLAGS, "-Xptxas", "-v", "-I", str(HERE / "knn"),
               str(HERE / "knn" / "knn_kernel.cu"), str(main), "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{done.stdout}\n{done.stderr}")
        ptxas = _ptxas_info(done.stdout + done.stderr)
        sass = subprocess.run([cuobjdump, "-sass", str(exe)], capture_output=True, text=True, check=True).stdout
        counts = _sass_counts(sass)
        table = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    # (dtype, config index) -> k values and their footprints
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for line in table.split():
        dtype_code, k, index, _bq, _bg, _bd, _st, _cand, smem = map(int, line.split(","))
        ranges.setdefault((DTYPES[dtype_code], index), []).append((k, smem))
    rows: list[dict[str, object]] = []
    for name, regs in ptxas.items():
        m = re.search(r"knn_kernelI(\w+?)Li(\d+)ELi(\d+)ELi(\d+)E", name)
        if not m:
            continue
        dtype = MANGLED_DTYPES.get(m.group(1), m.group(1))
        block_q, stages, min_blocks = int(m.group(2)), int(m.group(3)), int(m.group(4))
        index = next((i for (d, i), ks in ranges.items() if d == dtype and i >= 0 and _matches(table, dtype, i, block_q, stages)), -1)
        ks = sorted(ranges.get((dtype, index), []))
        k_min, smem_min = ks[0] if ks else (0, 0)
        k_max, smem_max = ks[-1] if ks else (0, 0)
        c = counts.get(name, {"hmma": 0, "ldgsts": 0, "ldsm": 0, "ffma": 0})
        rows.append({
            # the mangled name carries a hash of the source path: print the template instead
            "kernel": f"knn_kernel<{C_TYPES[dtype]}, {block_q}, {stages}, {min_blocks}>", "dtype": dtype, "config": index, "block_q": block_q, "block_g": 64,
            "block_d": 64 // (4 if dtype == "float32" else 2), "stages": stages, "min_blocks": min_blocks,
            "k_min": k_min, "k_max": k_max, **regs,
            "dyn_smem_k_min": smem_min, "dyn_smem_k_max": smem_max,
            "blocks_per_sm_k_min": blocks_per_sm(regs["registers"], smem_min, regs["static_smem"]) if ks else 0,
            "blocks_per_sm_k_max": blocks_per_sm(regs["registers"], smem_max, regs["static_smem"]) if ks else 0,
            **c,
        })
    # k values the table sends nowhere (none fits the opt-in limit)
    missing = sorted({k for (d, i), ks in ranges.items() if i < 0 for k, _ in ks})
    if missing:
        raise RuntimeError(f"no configuration fits k in {missing[0]}..{missing[-1]} on {arch}")
    order = {"float32": 0, "float16": 1, "bfloat16": 2}
    # "config" holds the int index set above.
    return sorted(rows, key=lambda r: (order[str(r["dtype"])], cast(int, r["config"])))


def _matches(table: str, dtype: str, index: int, block_q: int, stages: int) -> bool:
    code = {v: c for c, v in DTYPES.items()}[dtype]
    for line in table.split():
        f = list(map(int, line.split(",")))
        if f[0] == code and f[2] == index:
            return f[3] == block_q and f[6] == stages
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = build_report(args.arch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"{r['dtype']:>8} BQ={r['block_q']:>2} stages={r['stages']} k={r['k_min']}..{r['k_max']}: "
              f"{r['registers']} regs, {r['spill_stores']}+{r['spill_loads']} B spills, "
              f"smem {r['dyn_smem_k_min']}..{r['dyn_smem_k_max']} B, blocks/SM {r['blocks_per_sm_k_min']}.."
              f"{r['blocks_per_sm_k_max']}, HMMA {r['hmma']} LDGSTS {r['ldgsts']} LDSM {r['ldsm']} FFMA {r['ffma']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
