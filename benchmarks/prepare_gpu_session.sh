#!/usr/bin/env bash
# Everything a session with a GPU machine must build here first, in one command, on the CPU machine
# (about 9 minutes; start it in the background as soon as `status` says a machine is lent):
#
#   1. a venv with the GPU machines' Triton (3.6) and the CPU torch wheel (default /work/venv36);
#   2. gpu-cache/triton-sm90.tgz: the session plan's Triton kernels compiled for sm_90 by that
#      Triton (benchmarks/triton_cache_sm90.py build; 113 kernels, about 6.5 minutes here);
#   3. wheels/: pytorch-metric-learning and faiss-cpu for CPython 3.12 (the GPU machines' Python),
#      which the device run installs with --no-index.
#
# gpu-cache/ and wheels/ are git-ignored, so each fresh machine builds them again; a kernel edit
# (even one that only moves a kernel's first line: Triton's cache key includes it) needs step 2
# again. Then, per benchmarks/gpu_session.sh:
#
#   run(command="TORCHFG_BENCH_COMMIT=<git rev-parse --short HEAD> bash benchmarks/gpu_session.sh",
#       carry=["wheels", "gpu-cache/triton-sm90.tgz"], timeout_s=590)
#
# Environment: VENV36 (the venv's path), TC_BUILD (the build's Triton cache directory).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV36="${VENV36:-/work/venv36}"
TC_BUILD="${TC_BUILD:-/work/tc-build36}"

if ! "$VENV36/bin/python" -c "import torch, triton, numpy
assert triton.__version__.startswith('3.6') and torch.__version__.startswith('2.13') and not torch.version.cuda" 2>/dev/null; then
  echo "+ venv $VENV36 (torch 2.13.0 CPU, triton 3.6)"
  python3 -m venv "$VENV36"
  "$VENV36/bin/pip" install -q --upgrade pip
  # The CPU wheel first: a bare torch requirement would pull a CUDA build of several GB.
  "$VENV36/bin/pip" install -q torch==2.13.0
  "$VENV36/bin/pip" install -q "triton==3.6.*" numpy
fi

echo "+ sm_90 bundle (triton $("$VENV36/bin/python" -c 'import triton; print(triton.__version__)'))"
TRITON_CACHE_DIR="$TC_BUILD" PYTHONPATH="$PWD" "$VENV36/bin/python" benchmarks/triton_cache_sm90.py build

echo "+ wheels/ (CPython 3.12 baselines)"
mkdir -p wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 pytorch-metric-learning faiss-cpu -d wheels/
ls -l gpu-cache/triton-sm90.tgz wheels/
