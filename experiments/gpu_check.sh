#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (see DEVELOPERS.md "The GPU"):
#   1. the kernel tests, compiled by Triton (on a GPU the tests run the kernels non-interpreted),
#   2. the kernel benchmark with a launch-parameter sweep,
#   3. the model benchmark (OPT-125m shape, pallas vs xla attention),
# then a short summary. Result files are copied to $OUT so they come back with the call.
# The GPU machines have jax, pytest and transformers preinstalled and no network: no installs.
# Usage (device tool): bash experiments/gpu_check.sh      (about 6 minutes on an H100; at most 9.5)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
status=0

python - <<'PY'
import jax; print("jax", jax.__version__, "on", jax.devices()[0].device_kind)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

echo "== compiled kernel tests"
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_paged_attention.py tests/test_cache_ops.py \
    2>&1 | tee "$OUT/kernel_tests.log" | tail -25 || status=1

echo "== kernel benchmark"
timeout 240 python -m experiments.kernel_bench --tune 2>&1 | grep -v "it/s\]" | tee "$OUT/kernel_bench.log" || status=1

echo "== model benchmark"
timeout 120 python -m experiments.model_bench 2>&1 | grep -v "it/s\]" | tee "$OUT/model_bench.log" || status=1
cp experiments/results/kernel_bench_* experiments/results/model_bench_* "$OUT/" 2>/dev/null || true
exit $status
