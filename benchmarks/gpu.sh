#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one go, sized to fit a short lease of a GPU machine:
# train-step throughput of every setup, float32 and bfloat16, ours against the PyTorch peer, then
# K = 1, 2, 4, 8 vectorised trials against one by one.
#
#     bash benchmarks/gpu.sh [LOG_DIR]        (default: results/gpu-<UTC date and time>)
#
# Each part writes its full output to LOG_DIR/<part>.log, runs under a time limit of its own (so a
# part that hangs does not take the others' time) and prints its exit status; the last lines of
# each log follow. Windows are shorter than the CPU defaults (3 of at least 2 s per side): a GPU
# step takes milliseconds, so a 2 s window holds hundreds of steps. Needs the data
# ($ROTTEN_TOMATOES_DIR) for the vectorised part only.
set -u
cd "$(dirname "$0")/.."
LOG=${1:-results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-gpu}       # DEVICE=cpu QUICK=--quick: a dry run of this script on a machine without one
QUICK=${QUICK:-}

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a limit, output to $LOG/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name ($(date -u +%H:%M:%S) UTC, limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
    return $rc
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)"
    $PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)"
} >"$LOG/machine.log" 2>&1
cat "$LOG/machine.log"

THROUGHPUT=(-m benchmarks.throughput --device "$DEVICE" --min-seconds 2 --repeats 3 $QUICK)
# On one H200 (2026-11-30) each throughput part ended at its limit while smollm2_lora's workers
# were still starting (not ready after 85 s in a run of their own); the other three setups and
# the peaks fitted in 195-200 s.
part throughput_float32 230 $PY "${THROUGHPUT[@]}" --dtype float32
part throughput_bfloat16 230 $PY "${THROUGHPUT[@]}" --dtype bfloat16
part vectorized 120 $PY -m benchmarks.vectorized --ks 1 2 4 8 $QUICK

nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv >>"$LOG/machine.log" 2>&1
for name in throughput_float32 throughput_bfloat16 vectorized; do
    echo
    echo "---- $name (the end of $LOG/$name.log)"
    grep -v -E "Warning|warnings.warn|^\s*$" "$LOG/$name.log" | tail -n 60
done
