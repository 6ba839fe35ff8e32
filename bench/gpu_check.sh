#!/usr/bin/env bash
# One-shot GPU check, start to finish in a bounded time (default budget 440 s):
#   build -> test suite on CUDA -> compute-sanitizer memcheck + racecheck -> benchmark grid
#   against nn.LSTM (cuDNN) -> report (bench/results/gpu-<date>-<card>.{json,md}).
#
#   bench/gpu_check.sh [LOGDIR]
#
# LOGDIR: first argument, else $OUT (set on a lent GPU machine: what is written there comes
# back), else bench/results/logs. It receives at most 8 files: gpu_check.log (progress,
# environment, benchmark table), build.log, tests.log, sanitizer.log, bench.json and copies
# of the report (.json, .md).
#
# Every stage runs under `timeout`; its limit is the smaller of its cap and what the budget
# leaves after reserving the later stages' minimum, so the script always reaches the report,
# whatever fails or hangs.
#
# Environment:
#   PYTHON                 interpreter with torch (default python3)
#   TORCH_CUDA_ARCH_LIST   default 9.0 (H100/H200)
#   GPU_CHECK_BUDGET_S     total seconds (default 440)
#   GPU_CHECK_SKIP_BUILD=1 use the build that is already there
#   MAX_JOBS               parallel compile jobs (default: number of CPUs)
set -u

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
LOGDIR=${1:-${OUT:-$ROOT/bench/results/logs}}
mkdir -p "$LOGDIR"
LOGDIR=$(cd "$LOGDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-440}
START=$(date +%s)
MAIN_LOG=$LOGDIR/gpu_check.log
: > "$MAIN_LOG"
: > "$WORK/stages.tsv"

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$MAIN_LOG"; }

# budget CAP RESERVE: seconds for a stage = min(CAP, left - RESERVE); 0 when under 10 s.
budget() {
  local left=$(( BUDGET - $(elapsed) - $2 ))
  (( left > $1 )) && left=$1
  (( left < 10 )) && left=0
  echo "$left"
}

# run_stage NAME TIMEOUT LOGFILE CMD...: appends "name rc seconds note" to stages.tsv.
run_stage() {
  local name=$1 limit=$2 logf=$3
  shift 3
  if (( limit <= 0 )); then
    printf '%s\t-1\t0\tskipped: no time left\n' "$name" >> "$WORK/stages.tsv"
    log "$name: skipped (no time left)"
    return 255
  fi
  log "$name: start (limit ${limit}s)"
  local t0 rc dt note=""
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$logf" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  (( rc == 124 || rc == 137 )) && note="timed out"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$note" >> "$WORK/stages.tsv"
  log "$name: rc=$rc in ${dt}s${note:+ ($note)}"
  return $rc
}

# Minimum seconds kept for the later stages.
MIN_TESTS=60 MIN_SAN=30 MIN_BENCH=90 MIN_REPORT=15

# --- environment and sources ----------------------------------------------------------------
{
  echo "== environment"
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi -L 2>&1 | head -8
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -4
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(), "| gpus", torch.cuda.device_count())' 2>&1
  nvcc --version 2>&1 | tail -1
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS budget=${BUDGET}s"
} >> "$MAIN_LOG" 2>&1
{
  echo "csrc_tree=$(git rev-parse HEAD:csrc 2>/dev/null || echo unavailable)"
  echo "csrc_status=$(git status --porcelain csrc 2>/dev/null | tr '\n' ';')"
  echo "csrc_sha256=$(find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) -print0 \
        | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
} > "$WORK/source.txt" 2>/dev/null
cat "$WORK/source.txt" >> "$MAIN_LOG"

# --- 1. build -------------------------------------------------------------------------------
BUILD_LOG=$LOGDIR/build.log
: > "$BUILD_LOG"
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
  log "build: skipped (GPU_CHECK_SKIP_BUILD=1)"
  printf 'build\t0\t0\tskipped by request\n' >> "$WORK/stages.tsv"
else
  # pip as asked for; if pip itself cannot (e.g. an externally managed environment), build
  # in place (PYTHONPATH has the repository root).
  run_stage build "$(budget 210 $(( MIN_TESTS + 2 * MIN_SAN + MIN_BENCH + MIN_REPORT )))" \
    "$BUILD_LOG" bash -c '
      "$0" -m pip install --no-build-isolation --no-deps -v -e . && exit 0
      echo "### pip install failed; falling back to setup.py build_ext --inplace"
      "$0" setup.py build_ext --inplace' "$PY"
fi
timeout 120 "$PY" - >> "$BUILD_LOG" 2>&1 <<'EOF'
import torch
try:
    from lstm_fused import _ops  # noqa: F401 - loads the library
    has = torch._C._dispatch_has_kernel_for_dispatch_key("lstm_fused::layer_forward", "CUDA")
    print(f"### lstm_fused loaded; CUDA kernels registered: {has}")
except Exception as e:  # noqa: BLE001
    print(f"### lstm_fused does not load: {type(e).__name__}: {e}")
EOF
tail -1 "$BUILD_LOG" | tee -a "$MAIN_LOG"

# --- 2. tests -------------------------------------------------------------------------------
TEST_LOG=$LOGDIR/tests.log
: > "$TEST_LOG"
PYTEST_ARGS=(-v -rfE -p no:cacheprovider --durations=15)
"$PY" -c "import pytest" 2>/dev/null || log "WARNING: pytest is not importable by $PY; the test stages will fail"
echo "=== pytest cuda ===" >> "$TEST_LOG"
run_stage tests-cuda "$(budget 100 $(( 30 + 2 * MIN_SAN + MIN_BENCH + MIN_REPORT )))" "$TEST_LOG" \
  "$PY" -m pytest tests/test_cuda.py "${PYTEST_ARGS[@]}" --junitxml="$WORK/junit-cuda.xml"
echo "=== pytest rest ===" >> "$TEST_LOG"
run_stage tests-rest "$(budget 90 $(( 2 * MIN_SAN + MIN_BENCH + MIN_REPORT )))" "$TEST_LOG" \
  "$PY" -m pytest tests --ignore=tests/test_cuda.py "${PYTEST_ARGS[@]}" \
  --junitxml="$WORK/junit-rest.xml"
grep -E "^=+ .*(passed|failed|error|skipped).* in [0-9.]+s" "$TEST_LOG" | tee -a "$MAIN_LOG"

# --- 3. compute-sanitizer -------------------------------------------------------------------
SAN=$(command -v compute-sanitizer 2>/dev/null \
      || ls -1 /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
sanitize() {  # TOOL CAP RESERVE
  local tool=$1 f=$WORK/$1.log limit
  limit=$(budget "$2" "$3")
  if [[ -z "$SAN" ]]; then
    echo "compute-sanitizer not found" > "$f"
    printf '%s\t-1\t0\tcompute-sanitizer not found\n' "$tool" >> "$WORK/stages.tsv"
    return
  fi
  # Only our kernels are instrumented (cuBLAS runs natively: fast, and no third-party noise).
  # No caching allocator, so every tensor is its own allocation and overruns are caught.
  echo "# filter: --kernel-name kns=lstm_fused" > "$f"
  run_stage "$tool" "$limit" "$f" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool "$tool" --kernel-name kns=lstm_fused --print-limit 100 \
    "$PY" bench/sanitize_case.py
  local rc=$?
  if ! grep -q "SUMMARY" "$f" && (( rc != 124 && rc != 137 && rc != 255 )); then
    # the filter syntax may differ between sanitizer versions: once more without it
    echo "# filter: none (retry: no summary with the filter, rc=$rc)" >> "$f"
    run_stage "$tool-nofilter" "$(budget "$2" "$3")" "$f" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool "$tool" --print-limit 100 "$PY" bench/sanitize_case.py
  fi
}
sanitize memcheck 50 $(( MIN_SAN + MIN_BENCH + MIN_REPORT ))
sanitize racecheck 50 $(( MIN_BENCH + MIN_REPORT ))
{
  for tool in memcheck racecheck; do
    echo "################ compute-sanitizer --tool $tool"
    cat "$WORK/$tool.log" 2>/dev/null
  done
} > "$LOGDIR/sanitizer.log"
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGDIR/sanitizer.log" | tee -a "$MAIN_LOG"

# --- 4. benchmark ---------------------------------------------------------------------------
LIMIT=$(budget 240 "$MIN_REPORT")
if (( LIMIT > 30 )); then
  run_stage bench "$LIMIT" "$MAIN_LOG" "$PY" bench/bench_gpu.py --out "$LOGDIR/bench.json" \
    --time-budget $(( LIMIT - 25 )) --row-cap 3
else
  run_stage bench 0 "$MAIN_LOG" true
fi

# --- 5. report ------------------------------------------------------------------------------
timeout -k 5 30 "$PY" bench/gpu_report.py --logs "$LOGDIR" --work "$WORK" >> "$MAIN_LOG" 2>&1 \
  || log "report failed (rc=$?)"
log "done in $(elapsed)s; logs in $LOGDIR"
REPORT=$(ls -t "$LOGDIR"/gpu-*.md 2>/dev/null | head -1)
[[ -n "$REPORT" ]] && cat "$REPORT"
# exit status: 0 only when every stage succeeded (the report is written either way)
STATUS=$(awk -F'\t' '$2 != 0 { bad = 1 } END { print bad + 0 }' "$WORK/stages.tsv")
rm -rf "$WORK"
exit "$STATUS"
