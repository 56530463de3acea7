#!/usr/bin/env bash
# GPU benchmarks at Stable Diffusion 1.5 size on one GPU (random weights, nothing downloaded):
#   1. generation: stock diffusers vs spin-ray's sampler, plain / fast path / torch.compile'd;
#   2. SPIN training step: opponent errors precomputed vs the online reference (time, peak memory);
#   3. a summary against the targets, and the scaling table from the measured per-GPU rates.
# About 5 minutes on an H100/H200; each bench is cut off after BENCH_TIMEOUT seconds.
#
#   bench/gpu.sh                          # python from the environment (.venv/bin/python if present)
#   PYTHON=/path/to/python bench/gpu.sh
#   GEN_BATCH=16 TRAIN_BATCH=4 STEPS=50 bench/gpu.sh
#
# Results: each bench's log and its last line (JSON) in $OUT if set, else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi  # the Makefile's venv
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="${OUT:-bench/results}"
GEN_BATCH="${GEN_BATCH:-8}"
TRAIN_BATCH="${TRAIN_BATCH:-8}"
STEPS="${STEPS:-50}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
mkdir -p "$RESULTS"

"$PYTHON" - <<'EOF' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: torch sees no CUDA device")
import diffusers, spin_ray.fast_path  # noqa: E401,F401  (fail early if the project is not importable)
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true

run_bench() {  # run_bench NAME ARGS...: log to $RESULTS/NAME.log, last line to $RESULTS/NAME.json
  local name=$1
  shift
  echo "=== bench.$name $*"
  timeout "$BENCH_TIMEOUT" "$PYTHON" -m "bench.$name" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local status=${PIPESTATUS[0]}
  if [[ $status -ne 0 ]]; then
    echo "bench.$name FAILED (exit $status; 124 = timed out after ${BENCH_TIMEOUT}s)"
    return 0
  fi
  tail -n 1 "$RESULTS/$name.log" > "$RESULTS/$name.json"
}

run_bench generation --device cuda --size sd15 --batch-size "$GEN_BATCH" --steps "$STEPS" \
  --guidance-scale 7.5 --warmup 1 --repeats 3 --compile
run_bench train_step --device cuda --size sd15 --batch-size "$TRAIN_BATCH" --warmup 2 --repeats 5
echo "=== summary"
"$PYTHON" -m bench.summary "$RESULTS"
