#!/usr/bin/env bash
# One device run that always comes back with numbers (issue 13), on a fresh H100/H200 box
# (python3, torch + triton, pytest/hypothesis/matplotlib; no internet). Everything lands in $OUT:
#
#   info.txt        GPU, driver, torch/triton versions, torchfg's backend table
#   compile.txt     every Triton kernel compiled for sm_90a with this box's triton (+ sm90_compile.csv)
#   tests.txt       the kernel tests on CUDA (pytest summary even when a step times out)
#   bench.csv       benchmarks, bf16, fp32, DINO, cross-batch memory; one row appended and flushed per measurement
#   bench_*.txt     the benchmark tables; session.txt: each step's exit status and seconds
#
# Each step has its own time budget and is stopped with SIGINT (pytest then prints its summary; the
# benchmark keeps the rows it wrote); the budgets add up to less than 8 minutes, so a rerun still
# fits the 15-minute device budget:
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
#
# Baselines: pytorch-metric-learning and faiss are not on the box. Carry their wheels:
#
#   pip download --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       pytorch-metric-learning faiss-cpu -d wheels/
#   run(command="bash benchmarks/gpu_session.sh", carry=["wheels"], timeout_s=540)
#
# (installed with pip install --no-index --no-deps --find-links wheels; their own dependencies,
# numpy/torch/tqdm/scikit-learn, are expected on the box; a missing one only drops that baseline).
#
#   bash benchmarks/gpu_session.sh --dry-run    # the same steps on the CPU, tiny sizes (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CI=1                 # the derandomised hypothesis profile
export PYTHONUNBUFFERED=1
PY=python3
TOTAL=470                   # seconds for everything, kill grace included (< 480)
GRACE=5                     # after SIGINT, SIGKILL this much later
START=$SECONDS
: > "$OUT/session.txt"

# step NAME BUDGET LOG CMD...: run CMD under `timeout -s INT`, at most BUDGET seconds and never
# past the session's end; its output goes to LOG (and the tail to the console).
step() {
  local name=$1 budget=$2 log=$3
  shift 3
  local left=$(( TOTAL - (SECONDS - START) - GRACE ))
  if [ "$budget" -gt "$left" ]; then budget=$left; fi
  if [ "$budget" -le 0 ]; then
    echo "$name: skipped (no time left)" | tee -a "$OUT/session.txt"
    return 0
  fi
  local t0=$SECONDS
  echo "== $name (budget ${budget}s): $*" | tee -a "$OUT/session.txt"
  timeout -s INT -k "$GRACE" "$budget" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  echo "$name: exit $rc in $(( SECONDS - t0 ))s$( [ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$OUT/session.txt"
  if [ $rc -ne 0 ]; then FAILED="$FAILED $name"; fi
  return 0  # the next steps still run
}
FAILED=""

# The plan: budgets (seconds) that add up, with the kill grace of each step, to TOTAL at most.
B_INFO=25 B_WHEELS=30 B_COMPILE=70 B_TESTS=120 B_BF16=90 B_FP32=35 B_DINO=35 B_XBM=20
planned=$(( B_INFO + B_WHEELS + B_COMPILE + B_TESTS + B_BF16 + B_FP32 + B_DINO + B_XBM + 8 * GRACE ))
if [ "$planned" -gt "$TOTAL" ]; then
  echo "gpu_session.sh: step budgets ($planned s) exceed the session ($TOTAL s)" >&2
  exit 2
fi
echo "plan: $planned s of $TOTAL s; dry run: $DRY; out: $OUT" | tee -a "$OUT/session.txt"

# Kernel tests that exist today (a missing path is an error here, not a silent skip).
TESTS=(tests/ops/test_pairwise_distance.py tests/ops/test_knn.py tests/ops/test_triplet_mining.py
       tests/ops/test_pair_distances.py tests/ops/test_precision.py tests/ops/test_opcheck.py
       tests/ops/test_knn_cuda_selfcheck.py tests/ops/test_hardest_triplet_loss.py tests/test_step_budget.py
       tests/test_dino.py tests/functional/test_triplet_loss.py)
for t in "${TESTS[@]}"; do
  [ -f "$t" ] || { echo "gpu_session.sh: test file $t does not exist" >&2; exit 2; }
done

if [ "$DRY" = 1 ]; then
  # The same steps, sized for a CPU: tracing only, collection only, tiny benchmarks.
  COMPILE=(--level smoke --ops dino --trace-only --specs-out "$OUT/sm90_specs.json")
  PYTEST_ARGS=(--collect-only)
  BENCH=(--device cpu --sizes 64 --dim 16 --repeat 1 --warmup 0 --max-seconds 1 --no-isolate
         --cases 'torchfg[torch]')
  BENCH_BF16=(--ops pairwise "${BENCH[@]}")
  BENCH_FP32=(--ops pairwise "${BENCH[@]}")
  BENCH_DINO=(--ops dino "${BENCH[@]}")
  BENCH_XBM=(--ops xbm "${BENCH[@]}")
else
  COMPILE=(--level smoke --jobs 8 --out "$OUT/sm90_compile.csv")
  PYTEST_ARGS=(--maxfail=25)
  BENCH_BF16=(--ops pairwise,triplet,atl,knn --sizes 8192,32768 --dim 512)
  BENCH_FP32=(--ops pairwise,triplet,knn --sizes 8192 --dim 512)
  BENCH_DINO=(--ops dino)
  # Issue 14: a batch of 4096 mined against 65,536 and 1,048,576 rows (target: under 20 ms at 1M),
  # the fused step's launches counted; PML's B x M matrices would not fit the budget.
  BENCH_XBM=(--ops xbm --sizes 65536,1048576 --dim 512 --cases 'torchfg[triton]' --launches)
fi

step info "$B_INFO" "$OUT/info.txt" bash -c \
  "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo 'no nvidia-smi';
   $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.cuda.is_available())';
   $PY -m torchfg.cli info"

if [ -d wheels ]; then
  step wheels "$B_WHEELS" "$OUT/wheels.txt" \
    $PY -m pip install --no-index --no-deps --find-links wheels pytorch-metric-learning faiss-cpu
else
  echo "wheels: no wheels/ carried: the pytorch-metric-learning and faiss baselines are skipped" | tee -a "$OUT/session.txt"
fi

step compile "$B_COMPILE" "$OUT/compile.txt" $PY benchmarks/compile_sm90.py "${COMPILE[@]}"

step tests "$B_TESTS" "$OUT/tests.txt" \
  $PY -m pytest -q -p no:cacheprovider -rfE "${PYTEST_ARGS[@]}" "${TESTS[@]}"

# bench appends and flushes one row per measurement: a timeout keeps what was measured.
step bench_bf16 "$B_BF16" "$OUT/bench_bf16.txt" \
  $PY -m torchfg.cli bench "${BENCH_BF16[@]}" --dtype bf16 --csv "$OUT/bench.csv" --no-progress
step bench_fp32 "$B_FP32" "$OUT/bench_fp32.txt" \
  $PY -m torchfg.cli bench "${BENCH_FP32[@]}" --dtype fp32 --csv "$OUT/bench.csv" --no-progress
step bench_dino "$B_DINO" "$OUT/bench_dino.txt" \
  $PY -m torchfg.cli bench "${BENCH_DINO[@]}" --dtype bf16 --csv "$OUT/bench.csv" --no-progress
step bench_xbm "$B_XBM" "$OUT/bench_xbm.txt" \
  $PY -m torchfg.cli bench "${BENCH_XBM[@]}" --dtype bf16 --csv "$OUT/bench.csv" --no-progress

echo "total: $(( SECONDS - START ))s; failed steps:${FAILED:- none}" | tee -a "$OUT/session.txt"
[ -z "$FAILED" ]
