#!/usr/bin/env bash
# The GPU path, checked and measured in one prepared call (about 8 minutes on one H100):
#   1. the GPU tests (pytest -m gpu): training steps in bf16 and fp16 and as CUDA graphs, mid-epoch resume, the
#      Predictor in bf16 agreeing with fp32 labels and halving its batches under a memory cap, the service answering,
#      and failing its health after a device-side assert;
#   2. training: our loop (eager, its steps replayed as CUDA graphs, and compiled through Accelerate) against
#      Trainer and Trainer with group_by_length (bench/gpu_train.py);
#   3. scoring: the Predictor against pipeline(batch_size=64); 4. serving at 64 clients against a
#      per-request pipeline server (both bench/gpu_score.py).
# It writes every figure to $OUT/gpu_check.json (outputs/gpu-check/ without $OUT) with a log,
# and prints the table for BENCHMARKS.md. Each step has a time limit on the GPU, 140, 260, 155 and
# 15 seconds (STEP_LIMITS="S1 S2 S3 S4" sets others), and writes its figures as it takes them: a step
# that hangs or runs slow costs its own unfinished figures, never the later steps' minutes.
#
#   bash bench/gpu_wheels.sh              # first, on a machine with the package registry
#   bash bench/gpu_rehearsal.sh           # then, there: this check at toy size in the GPU machine's software
#   bash bench/gpu_check.sh               # on the GPU machine, with .whl carried along
#   bash bench/gpu_check.sh --cpu-smoke   # anywhere: every step at toy size on the CPU (3 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
case "$*" in
  "") ;;
  --cpu-smoke) smoke=1 ;;
  -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
  *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke]   (--help says more)" >&2; exit 2 ;;
esac
if [ "$smoke" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" SENTIMENT_GPU_TESTS_ON_CPU=1
  train_size=(--small --rows 256 --steps 4 --batch-size 8 --compile-backend eager)
  score_size=(--rows 256 --requests 128 --workers 2) limits="900 900 900 300"
  test_workers=2
else
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one GPU, as the goals are stated
  train_size=() score_size=() limits="140 260 155 15"  # 570 s: within the device call's 600 s, with the install
  test_workers=4
fi
read -r -a limits <<< "${STEP_LIMITS:-$limits}"
if [ "${#limits[@]}" -ne 4 ] || printf '%s\n' "${limits[@]}" | grep -qvxE '[1-9][0-9]*'; then
  echo "STEP_LIMITS must be four whole numbers of seconds, one per step, got '${STEP_LIMITS:-}'" >&2
  exit 2
fi
out="${OUT:-outputs/gpu-check}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import polars, starlette, uvicorn" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl
  export PYTHONPATH="$work/site"
fi
# The tokenizers keep their threads, as in a user's runs: the training step tokenises the 25,000 reviews five
# times (to count their tokens, then in each run), 22 s each here on one thread, 13 s on two, all in one time limit.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# The GPU tests start each script in a fresh interpreter, as on the GPU (tests/prefork.py forks them on a CPU
# alone): the smoke runs them as the device will.
export SENTIMENT_TESTS_PREFORK=0
py="${PYTHON:-python3}"
# Each GPU test starts a training run or loads a model, mostly CPU-bound start-up: where pytest-xdist is
# installed (the GPU machine has it) they run side by side, well inside step 1's time limit.
test_flags=()
if "$py" -c "import xdist" 2>/dev/null; then
  test_flags=(-n "$test_workers")
fi
# Where pytest-timeout is installed (the GPU machine has it), a test that hangs is stopped with its stack printed,
# inside the step's own limit: twice a GPU test was left unfinished by that limit, with no word of where it stood.
if "$py" -c "import pytest_timeout" 2>/dev/null; then
  test_flags+=(--timeout "$((limits[0] * 2 / 3))")
fi
# Every step runs whatever the steps before it did: the GPU machine is lent for minutes, and a
# failing test must not cost the figures. The check fails at the end if any step failed.
failed=()
step() {  # step NAME SECONDS COMMAND…: SIGTERM to the step's processes after SECONDS, SIGKILL 10 s later
  echo "== $1"
  local status=0 start=$SECONDS
  timeout -k 10 "$2" "${@:3}" || status=$?
  echo "== $1: $((SECONDS - start)) s of its $2"
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "== step over its time limit of $2 s: $1"
  fi
  if [ "$status" != 0 ]; then
    echo "== step failed: $1"
    failed+=("$1")
  fi
}
{
  # Each test named as it ends, with its time: a step cut short by its limit still says which test was left.
  step "1. GPU tests" "${limits[0]}" "$py" -m pytest -m gpu -v --durations=0 -p no:cacheprovider -p no:benchmark --basetemp "$work/pytest" \
      "${test_flags[@]}" tests/test_gpu.py
  step "2. training" "${limits[1]}" "$py" -m bench.gpu_train "${train_size[@]}" --keep-model "$work/model" \
      --json "$out/train.json"
  step "3-4. scoring and serving" "${limits[2]}" "$py" -m bench.gpu_score --model "$work/model" "${score_size[@]}" \
      --json "$out/score.json"
  step "table" "${limits[3]}" "$py" -m bench.gpu_report "$out/train.json" "$out/score.json" \
      --json "$out/gpu_check.json"
  if [ "${#failed[@]}" -gt 0 ]; then
    echo "== failed steps: ${failed[*]}"
    exit 1
  fi
} 2>&1 | tee "$out/gpu_check.log"
