#!/usr/bin/env bash
# One device run that always comes back with numbers (issues 14 and 15), on a fresh H100/H200 box
# (python3, torch + triton, pytest/hypothesis/xdist; no internet). Everything lands in $OUT:
#
#   info.txt        GPU, driver, torch/triton versions, torchfg's backend table (a failure here
#                   ends the run at once, so that a broken box costs seconds, not the budget)
#   build.txt       the torchfg/csrc/ CUDA extension JIT-built once, before the tests and benchmarks load it
#   tests.txt       the kernel tests on CUDA, 8 pytest-xdist workers (summary even on a timeout)
#   kernels.csv     batch-hard, ATL, cross-batch memory, k-NN and pairwise: each GPU kernel's time per step
#   bench.csv       one row appended and flushed per measurement, in the order of the issues'
#                   targets: batch-hard and ATL (bf16), cross-batch memory, k-NN (k = 10, 100),
#                   pairwise, DINO, then fp32; bench_*.txt: the tables; session.txt: each step's
#                   exit status and seconds
#
# Each step has its own time budget and is stopped with SIGINT (pytest then prints its summary; the
# benchmark keeps the rows it wrote). Each budget is a cap, and every step is also cut at TOTAL
# (9 minutes): the steps up to the batch-hard/ATL benchmark are guaranteed their caps, the later ones
# share what the earlier ones left (on the first H200 run, info took 12 s of 45, the CUDA build
# 14 s, the cross-batch memory benchmark 21 s of 30). With a start of a
# minute or two this is one call of the 15-minute device budget, so the run is planned as the
# only one and ordered by what the open issues need most. The compile-only check for sm_90 is not
# repeated here: benchmarks/compile_sm90.py runs it without a GPU.
#
#   run(command="TORCHFG_BENCH_COMMIT=<git rev-parse --short HEAD here> bash benchmarks/gpu_session.sh",
#       carry=["wheels", "gpu-cache/triton-sm90.tgz"], timeout_s=590)
#
# `bash benchmarks/prepare_gpu_session.sh` builds both carried paths (the steps below) in one command.
#
# gpu-cache/triton-sm90.tgz: the benchmarks' Triton kernels compiled for sm_90 beforehand, on the CPU
# machine, by the GPU machines' Triton (3.6), about 4 minutes (rebuild it after any kernel change:
# install skips the kernels whose source changed since the build):
#
#   python3 -m venv /work/venv36 && /work/venv36/bin/pip install torch==2.13.0 "triton==3.6.0" numpy
#   TRITON_CACHE_DIR=/work/tc-build36 /work/venv36/bin/python benchmarks/triton_cache_sm90.py build
#
# (the device copy's git history is the last landed commit's, not the tree's: name the commit)
#
# Baselines: pytorch-metric-learning is not on the box. Carry its wheel (faiss is timed on the
# CPU machine, where the issue's faiss target lives):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 pytorch-metric-learning faiss-cpu -d wheels/
#
# (installed with pip install --no-index --no-deps --find-links wheels; its own dependencies,
# numpy/torch/tqdm/scikit-learn, are on the box; a missing one drops that baseline, and a step
# that names it in --cases reports it: `torchfg bench` exits 1 when a requested case was skipped
# or failed, or nothing was measured, and the step is listed under "failed steps" at the end).
#
#   bash benchmarks/gpu_session.sh --dry-run    # the same steps on the CPU, tiny sizes (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
PRINT_PLAN=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
# --print-plan: the benchmark steps' `torchfg bench` arguments, one line each, and nothing else
# (benchmarks/triton_cache_sm90.py build compiles their Triton kernels ahead of the session).
if [ "${1:-}" = "--print-plan" ]; then PRINT_PLAN=1; fi
OUT="${OUT:-$PWD/gpu-out}"
if [ "$PRINT_PLAN" = 1 ]; then OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; fi
LOGS="$OUT/logs"            # packed into logs.tgz at the end: the device tool returns at most 8 files
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CI=1                 # the derandomised hypothesis profile
export PYTHONUNBUFFERED=1
PY=python3
TOTAL=540                   # seconds for everything, kill grace included (9 minutes)
GRACE=3                     # after SIGINT, SIGKILL this much later
if [ -n "${TOTAL_SET:-}" ]; then TOTAL=$TOTAL_SET; fi   # a shorter follow-up call
START=$SECONDS
: > "$OUT/session.txt"

# step NAME BUDGET LOG CMD...: run CMD under `timeout -s INT`, at most BUDGET seconds and never
# past the session's end; its output goes to LOG (and the tail to the console). STEP_GROUP is left
# holding the process group of the step that ran last (see stop_step_leftovers).
step() {
  local name=$1 budget=$2 log=$3
  shift 3
  STEP_GROUP=""
  if [ -n "$ONLY" ] && [ "$name" != info ] && [ "$name" != cache ] && [[ " $ONLY " != *" $name "* ]]; then
    echo "$name: not in ONLY" >> "$OUT/session.txt"
    return 0
  fi
  local left=$(( TOTAL - (SECONDS - START) - GRACE ))
  if [ "$budget" -gt "$left" ]; then budget=$left; fi
  if [ "$budget" -le 0 ]; then
    echo "$name: skipped (no time left)" | tee -a "$OUT/session.txt"
    return 0
  fi
  local t0=$SECONDS
  echo "== $name (budget ${budget}s): $*" | tee -a "$OUT/session.txt"
  # timeout leads a process group of its own, whose id is its PID: what the step started and left
  # behind can be stopped by that number, and nothing else on the machine is touched.
  timeout -s INT -k "$GRACE" "$budget" "$@" > "$log" 2>&1 &
  STEP_GROUP=$!
  wait "$STEP_GROUP"
  local rc=$?
  tail -n 25 "$log"
  echo "$name: exit $rc in $(( SECONDS - t0 ))s$( [ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$OUT/session.txt"
  if [ $rc -ne 0 ]; then FAILED="$FAILED $name"; fi
  return $rc
}
FAILED=""
STEP_GROUP=""

# Kill what the last step left running (pytest-xdist workers that outlived their parent), by the
# process group that step's timeout led; not by name, which would also hit other users' processes.
stop_step_leftovers() {
  if [ -n "$STEP_GROUP" ]; then kill -KILL -- "-$STEP_GROUP" 2>/dev/null; sleep 1; fi
  return 0
}

# The plan: caps (seconds) in priority order. The first five, with their kill grace, fit in TOTAL;
# the rest run in whatever time is left. Tests: 635 on 16 workers; the first H200 run compiled
# for about 0.4 s of worker time per test.
# The triplet step times the symmetric mining kernel ("torchfg[triton] symmetric", opt-in until
# measured) next to the default one: 30 s more for its cases and their autotuning.
B_INFO=45 B_CACHE=15 B_WHEELS=15 B_BUILD=40 B_TESTS=200 B_TRIPLET=110
B_XBM=30 B_KNN=110 B_PAIRWISE=50 B_DINO=40 B_FP32=30 B_MINING_1M=60 B_HOST=20
# A follow-up call inside the same device budget: ONLY="build tests" runs those steps alone (info
# always runs), and B_<STEP>_SET (seconds) replaces that step's budget; TOTAL_SET the total.
for b in B_INFO B_CACHE B_WHEELS B_BUILD B_TESTS B_TRIPLET B_XBM B_KNN B_PAIRWISE B_DINO B_FP32 B_MINING_1M B_HOST; do
  over="${b}_SET"
  if [ -n "${!over:-}" ]; then printf -v "$b" '%s' "${!over}"; fi
done
ONLY="${ONLY:-}"
planned=$(( B_INFO + B_CACHE + B_WHEELS + B_BUILD + B_TESTS + B_TRIPLET + 6 * GRACE ))
capped=$(( planned + B_XBM + B_KNN + B_PAIRWISE + B_DINO + B_FP32 + B_MINING_1M + B_HOST + 7 * GRACE ))
if [ "$planned" -gt "$TOTAL" ]; then
  echo "gpu_session.sh: the guaranteed steps' budgets ($planned s) exceed the session ($TOTAL s)" >&2
  exit 2
fi
[ "$PRINT_PLAN" = 1 ] || echo "plan: $planned s of $TOTAL s guaranteed, $capped s of caps; dry run: $DRY; out: $OUT" | tee -a "$OUT/session.txt"

# Kernel tests that exist today (a missing path is an error here, not a silent skip).
TESTS=(tests/ops/test_pairwise_distance.py tests/ops/test_knn.py tests/ops/test_triplet_mining.py
       tests/ops/test_pair_distances.py tests/ops/test_precision.py tests/ops/test_opcheck.py
       tests/ops/test_knn_cuda_selfcheck.py tests/ops/test_hardest_triplet_loss.py tests/test_step_budget.py
       tests/test_dino.py tests/functional/test_triplet_loss.py tests/test_xbm.py tests/test_fewshot.py)
for t in "${TESTS[@]}"; do
  [ -f "$t" ] || { echo "gpu_session.sh: test file $t does not exist" >&2; exit 2; }
done

if [ "$DRY" = 1 ]; then
  # The same steps, sized for a CPU: collection only, tiny benchmarks, no CUDA build.
  BUILD=(-c 'from torchfg.ops import _cuda_extension as ext; print(ext.status())')
  PYTEST_ARGS=(--collect-only)
  SMALL=(--device cpu --dim 16 --repeat 1 --warmup 0 --max-seconds 1 --no-isolate --cases 'torchfg[torch]')
  BENCH_TRIPLET=(--ops triplet,atl --sizes 64 "${SMALL[@]}" --launches --kernel-times "$OUT/kernels.csv")
  BENCH_XBM=(--ops xbm --sizes 64 "${SMALL[@]}" --launches --kernel-times "$OUT/kernels.csv")
  BENCH_KNN=(--ops knn --sizes 128 "${SMALL[@]}" --kernel-times "$OUT/kernels.csv")   # k = 100 needs N >= 100
  BENCH_PAIRWISE=(--ops pairwise --sizes 64 "${SMALL[@]}" --kernel-times "$OUT/kernels.csv")
  BENCH_DINO=(--ops dino --sizes 64 "${SMALL[@]}")
  BENCH_FP32=(--ops pairwise --sizes 64 "${SMALL[@]}")
  BENCH_MINING_1M=(--ops triplet --sizes 64 "${SMALL[@]}")
  HOST=(--n 64 --d 16 --warmup 1 --chunks 1 --steps 2)
else
  BUILD=(-c 'from torchfg.ops import _cuda_extension as ext; ext.load(verbose=True); print(ext.status())')
  PYTEST_ARGS=(--maxfail=60 -n "${TEST_WORKERS:-16}" --tb=short)
  # Issue 14: forward+backward against the x @ x.T floor and PML, launches and peak memory per step,
  # and each kernel's device time per step (kernels.csv: is it the mining or the loss kernels?).
  # Every case runs, the symmetric mining kernel's ("torchfg[triton] symmetric") included.
  BENCH_TRIPLET=(--ops triplet,atl --sizes 8192,32768 --dim 512 --launches --kernel-times "$OUT/kernels.csv")
  # Issue 14: a batch of 4096 mined against 65,536 and 1,048,576 rows (target: under 20 ms at 1M);
  # PML's B x M matrices would not fit the budget.
  BENCH_XBM=(--ops xbm --sizes 65536,1048576 --dim 512 --cases 'torchfg[triton]' --launches
             --kernel-times "$OUT/kernels.csv")
  # Issue 15: N = Q = G = 32768 against mm + top-k (faiss is timed on the CPU machine).
  # Each kernel's time per step too: the second H200 session found the pairwise backward's and
  # the k-NN recomputation's costs there (h200_kernels.csv).
  # "torchfg[triton] filter": the bound-and-filter search (TORCHFG_KNN_FILTER=1, opt-in until
  # measured; the self-search computes each pair once, "gallery=x" every tile in query chunks);
  # if it wins, make it the Triton default (knn/triton.py wants_filter).
  BENCH_KNN=(--ops knn --sizes 32768 --dim 512
             --cases 'torchfg[torch],torchfg[triton],torchfg[triton] filter,torchfg[triton] filter gallery=x,torchfg[cuda],torch.cdist+topk'
             --kernel-times "$OUT/kernels.csv")
  BENCH_PAIRWISE=(--ops pairwise --sizes 8192,32768 --dim 512 --kernel-times "$OUT/kernels.csv")
  BENCH_DINO=(--ops dino)
  BENCH_FP32=(--ops triplet,pairwise --sizes 8192 --dim 512 --cases 'torchfg[triton],torch.cdist,torch.cdist+masks,pml.BatchHard,pml.LpDistance')
  # Issue 14: batch-hard over N = 1,048,576 (target: mining under 2 s), a step that is all mining;
  # its x @ x.T floor (2 TB) cannot run and is left empty.
  BENCH_MINING_1M=(--ops triplet --sizes 1048576 --dim 512 --cases 'torchfg[triton] symmetric,torchfg[triton]'
                   --repeat 3 --warmup 1)
  # The host's share of a step (launches stubbed, benchmarks/step_host.py) on this box's CPU: next
  # to bench_triplet's N = 8192 step time, what is left is Triton's launcher and the GPU.
  HOST=(--n 8192)
fi

if [ "$PRINT_PLAN" = 1 ]; then
  for spec in "BENCH_TRIPLET bf16" "BENCH_XBM bf16" "BENCH_KNN bf16 k=10" "BENCH_KNN bf16 k=100" \
              "BENCH_PAIRWISE bf16" "BENCH_DINO bf16" "BENCH_FP32 fp32" "BENCH_MINING_1M bf16"; do
    read -r array dtype k <<< "$spec"
    declare -n plan_args="$array"
    echo "${plan_args[*]@Q} --dtype $dtype${k:+ --param $k}"
  done
  exit 0
fi

export MAX_JOBS=16          # the CUDA extension's ninja build
export TRITON_PRINT_AUTOTUNING=1   # each autotuned key's chosen config and tuning time, in the logs
step info "$B_INFO" "$LOGS/info.txt" bash -c \
  "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || echo 'no nvidia-smi';
   $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.cuda.is_available())' &&
   $PY -c 'import torch, torchfg; assert torch.cuda.is_available() or $DRY, \"no CUDA device\"' &&
   $PY -m torchfg.cli info" \
  || { echo "info failed: stopping here so that a broken box costs seconds" | tee -a "$OUT/session.txt"
       tar czf "$OUT/logs.tgz" -C "$OUT" logs; exit 3; }

# Kernels compiled ahead of the session on the CPU machine (benchmarks/triton_cache_sm90.py build,
# carried as gpu-cache/triton-sm90.tgz): stored under this machine's cache keys, so that the benchmarks' autotuning
# loads them instead of compiling (compilation ate the first H200 run's k-NN, pairwise and DINO
# steps). A session's first call starts from an empty cache, so that the report at the end can tell
# what compiled here; a follow-up call (ONLY=...) keeps what the first compiled, and installs again
# (entries already there are left alone). Not in the dry run: no GPU, and the CPU machine's Triton.
CACHE_BUNDLE=gpu-cache/triton-sm90.tgz
if [ "$DRY" = 0 ]; then
  export TRITON_CACHE_DIR="$PWD/.triton-cache"
  if [ -z "$ONLY" ]; then rm -rf "$TRITON_CACHE_DIR"; fi
  if [ -f "$CACHE_BUNDLE" ]; then
    step cache "$B_CACHE" "$LOGS/cache.txt" $PY benchmarks/triton_cache_sm90.py install "$CACHE_BUNDLE"
  else
    echo "cache: no $CACHE_BUNDLE carried: every kernel compiles here" | tee -a "$OUT/session.txt"
  fi
fi

if [ -d wheels ]; then
  step wheels "$B_WHEELS" "$LOGS/wheels.txt" \
    $PY -m pip install --no-index --no-deps --find-links wheels pytorch-metric-learning
else
  echo "wheels: no wheels/ carried: the pytorch-metric-learning baselines are skipped" | tee -a "$OUT/session.txt"
fi

step build "$B_BUILD" "$LOGS/build.txt" $PY "${BUILD[@]}"

step tests "$B_TESTS" "$LOGS/tests.txt" \
  $PY -m pytest -q -p no:cacheprovider -rfE "${PYTEST_ARGS[@]}" "${TESTS[@]}"
# No test worker may outlive its step and share the CPU with the timings (the host-side cost of a
# step is part of what is measured at N = 8192).
stop_step_leftovers
# The tests compile their own small kernels: listed here so that the report at the end shows what
# the benchmarks compiled.
if [ "$DRY" = 0 ]; then
  $PY benchmarks/triton_cache_sm90.py report --save "$LOGS/cache_tests.txt" > "$LOGS/cache_report_tests.txt" 2>&1
fi

# bench appends and flushes one row per measurement: a timeout keeps what was measured.
bench() {
  local name=$1 budget=$2 dtype=$3
  shift 3
  step "$name" "$budget" "$LOGS/$name.txt" \
    $PY -m torchfg.cli bench "$@" --dtype "$dtype" --csv "$OUT/bench.csv" --no-progress
}
bench bench_triplet "$B_TRIPLET" bf16 "${BENCH_TRIPLET[@]}"
bench bench_xbm "$B_XBM" bf16 "${BENCH_XBM[@]}"
# torchfg bench exits 1 when a case named in --cases was skipped or failed: k = 100 still runs after
# a k = 10 run that missed one, and the step fails if either did.
step bench_knn "$B_KNN" "$LOGS/bench_knn.txt" bash -c \
  "$PY -m torchfg.cli bench ${BENCH_KNN[*]@Q} --param k=10 --dtype bf16 --csv '$OUT/bench.csv' --no-progress; k10=\$?
   $PY -m torchfg.cli bench ${BENCH_KNN[*]@Q} --param k=100 --dtype bf16 --csv '$OUT/bench.csv' --no-progress; k100=\$?
   [ \$k10 -eq 0 ] && [ \$k100 -eq 0 ]"
bench bench_pairwise "$B_PAIRWISE" bf16 "${BENCH_PAIRWISE[@]}"
bench bench_dino "$B_DINO" bf16 "${BENCH_DINO[@]}"
bench bench_fp32 "$B_FP32" fp32 "${BENCH_FP32[@]}"
bench bench_mining_1m "$B_MINING_1M" bf16 "${BENCH_MINING_1M[@]}"
step host "$B_HOST" "$LOGS/host.txt" $PY benchmarks/step_host.py "${HOST[@]}" --out "$OUT/step_host.csv" \
  --note "GPU box's CPU, launches stubbed (gpu_session.sh)"

# What the benchmarks compiled here (missing from the bundle): the next build's to-do list.
if [ "$DRY" = 0 ]; then
  $PY benchmarks/triton_cache_sm90.py report --exclude "$LOGS/cache_tests.txt" > "$LOGS/cache_report.txt" 2>&1
  head -n 1 "$LOGS/cache_report.txt" | tee -a "$OUT/session.txt"
fi

# Last, so that the reply's tail holds them: the failed tests, one line each.
failed_tests=$(grep -E "^(FAILED|ERROR) " "$LOGS/tests.txt" 2>/dev/null | cut -c1-220 | head -80)
cp "$OUT/session.txt" "$LOGS/"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
[ -n "$failed_tests" ] && echo "$failed_tests"
echo "total: $(( SECONDS - START ))s; failed steps:${FAILED:- none}" | tee -a "$OUT/session.txt"
[ -z "$FAILED" ]
