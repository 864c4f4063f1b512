#!/bin/bash
# Session 10, device call 1 of 2 (issue 6): the skinny GEMM for up to 64 rows (trust steps), Qwen3.5-2B shape,
# RANDOM weights. carry [".whl", ".engine_carry", ".xfer/p1"]:
#   OUT=$OUT bash scripts/gpu/session10_scale.sh
# 0. leaves the GGUF's first part in /tmp/gcache for call 2 (session10_convert.sh, same warm machine);
# 1. GPU tests: the skinny kernels vs their twins (now with 40- and 64-row inputs), the mixer with anchored rows,
#    the graphed step with the mixer and the whole engine vs the adapter reference;
# 2. where each step's time goes (scripts/gpu/engine_step_breakdown.py), cuBLAS for > 16 rows (as sessions 5-9)
#    and then the skinny kernel up to 64 rows, in separate processes;
# 3. the CLI step cost with the projection from a converted checkpoint's tokens/forward (TPF).
mkdir -p /tmp/gcache && cp .xfer/p1/* /tmp/gcache/ 2>/dev/null
source scripts/gpu/engine_setup.sh
TPF=${TPF:-docs/perf/engine_session9/bench_conv_cpu_quickstart480.json}
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine_kernels.py tests/test_engine.py \
    -k "kernel_on_cuda_matches_twin or (graphed_step_equals_eager_on_cuda and mixer) or engine_on_cuda_equals" \
    2>&1 | grep -v "^USDT" | tail -30 | tee "$OUT/gpu_tests.log"
fi
for ROWS in 16 64; do
  FLARECTL_GEMV_MAX_ROWS=$ROWS timeout "${BREAKDOWN_TIMEOUT:-130}" python3 scripts/gpu/engine_step_breakdown.py \
    --out "$OUT" 2>&1 | grep -v "^USDT" | tee "$OUT/step_breakdown_$ROWS.log"
done
timeout "${STEP_TIMEOUT:-120}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
  --concurrency 8 --gdn-kernel mixer --tpf-from "$TPF" --out "$OUT" 2>&1 | grep -v "^USDT" | tee "$OUT/engine_step_cost.log"
for ROWS in 16 64; do tail -8 "$OUT/step_breakdown_$ROWS.log"; done
