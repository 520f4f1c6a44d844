#!/usr/bin/env bash
# One device run for a session that has a GPU (see the device tool's README): correctness of every
# kernel against its reference on CUDA first, then the benchmarks; everything lands in $OUT.
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
#
# The device machine has torch and triton but maybe not pytest/hypothesis: carry their wheels
# (pip download pytest hypothesis ... -d wheels/) and install them with --no-index if missing.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d wheels ]; then pip install -q --no-index --find-links wheels pytest hypothesis 2>&1 | tail -1; fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -m torchfg.cli info
} 2>&1 | tee "$OUT/info.txt"
# 1) correctness on CUDA (conftest leaves TRITON_INTERPRET unset when CUDA is present)
timeout 240 python -m pytest -q -x -p no:cacheprovider \
  tests/test_pairwise_distance.py tests/test_triplet_kernel.py tests/test_dino.py tests/test_knn.py \
  2>&1 | tail -25 | tee "$OUT/correctness.txt"
# 2) benchmarks: the issue sizes, bf16 then fp32, with the x @ x.T floor in the same run
timeout 200 python -m torchfg.cli bench --ops triplet,atl,knn,pairwise --sizes 8192,32768 --dim 512 \
  --dtype bf16 --csv "$OUT/bench_gpu.csv" --no-progress 2>&1 | tail -40 | tee "$OUT/bench_bf16.txt"
timeout 120 python -m torchfg.cli bench --ops dino --dtype bf16 --csv "$OUT/bench_gpu.csv" \
  --plot "$OUT/bench_gpu.png" --no-progress 2>&1 | tail -20 | tee "$OUT/bench_dino.txt"
