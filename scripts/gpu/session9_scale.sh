#!/bin/bash
# Session 9, device call 3 of 3 (issue 6): the Qwen3.5-2B shape with RANDOM weights, current defaults.
# carry [".whl", ".engine_carry"]; TPF = a converted checkpoint's serving bench.json (call 2's bench_conv.json,
# committed under docs/perf/):
#   OUT=$OUT TPF=docs/perf/engine_session9/bench_conv.json bash scripts/gpu/session9_scale.sh
# 0. (TESTS=1) the GPU tests of what this session changed (anchored windows in the mixer kernel, the graphed step
#    and the engine on CUDA);
# 1. step cost at C=8 (AR, trust = B clean + B window anchored, window only) and, with --tpf-from, the projected
#    throughput of each mode (step time of random 2B weights x tokens/forward measured on the converted checkpoint);
# 2. serving at C=8 through the engine (AR, AR-Trust) with the HF generate baseline in the same run: real step
#    times including the engine's host work (random weights: AR-Trust drafts are noise, 1 token per forward).
source scripts/gpu/engine_setup.sh
B="python3 -m flarectl.cli bench --model qwen3.5-2b --random-init"
if [ -n "$TESTS" ]; then
  timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine_kernels.py tests/test_engine.py \
    -k "mixer_kernel_on_cuda or (graphed_step_equals_eager_on_cuda and mixer) or engine_on_cuda_equals" \
    2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
fi
timeout "${STEP_TIMEOUT:-200}" $B --step-cost --concurrency 8 --gdn-kernel mixer ${TPF:+--tpf-from $TPF} \
  --out "$OUT" 2>&1 | grep -v "^USDT" | tee "$OUT/engine_step_cost.log"
timeout "${SERVE_TIMEOUT:-330}" $B --mode ${MODES:-ar,ar-trust} --concurrency 8 --num-requests 16 \
  --max-new-tokens 128 --out "$OUT" 2>&1 | grep -v "^USDT" | tee "$OUT/engine_bench.log"
