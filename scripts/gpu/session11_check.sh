#!/bin/bash
# Session 11, device call 3 (issue 6), carry [".whl", ".engine_carry"]: the CLI step cost with the attention
# kernel's new defaults, the fused norm projection up to 16 rows (as before) and up to 64 rows (trust steps), with the
# tokens/forward of the session-11 conversion on gsm8k-style prompts; then the kernels' CUDA tests (attention with
# its launch knobs, the norm projection at trust-step rows) and the engine's CUDA tests (graphed step with the mixer,
# anchored windows included; the whole engine vs the adapter reference; not compiled), both with the GEMM tuner off
# (FLARECTL_GEMV_TUNE=0: timing every new shape made them outlast their calls).
source scripts/gpu/engine_setup.sh
for R in ${NORM_ROWS:-16 64}; do
  FLARECTL_NORM_GEMV_MAX_ROWS=$R timeout "${STEP_TIMEOUT:-120}" python3 -m flarectl.cli bench --model qwen3.5-2b \
    --random-init --step-cost --concurrency 8 --gdn-kernel mixer \
    --tpf-from docs/perf/engine_session11/gpu/convert/bench_conv_gsm8k.json \
    --tpf-from docs/perf/engine_session11/gpu/convert/bench_conv.json --out "$OUT/step_norm$R" 2>&1 \
    | grep -v "^USDT" > "$OUT/engine_step_cost_norm$R.log"
  grep -E "^│ (ar|trust|window|ar-trust|diffusion-trust) " "$OUT/engine_step_cost_norm$R.log" | sed "s/^/norm<=$R /"
done
FLARECTL_GEMV_TUNE=0 timeout "${KTEST_TIMEOUT:-110}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine_kernels.py \
  -k "attention_on_cuda or norm_kernel_on_cuda" 2>&1 | grep -v "^USDT" | grep -v -i warn | tail -8 | tee "$OUT/gpu_tests_kernels.log"
FLARECTL_GEMV_TUNE=0 FLARECTL_ENGINE_COMPILE=0 timeout "${ETEST_TIMEOUT:-220}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine.py \
  -k "engine_on_cuda_equals or (graphed_step_equals_eager_on_cuda and mixer)" 2>&1 | grep -v "^USDT" | grep -v -i warn \
  | tail -8 | tee "$OUT/gpu_tests_engine.log"
