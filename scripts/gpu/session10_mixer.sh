#!/bin/bash
# Session 10, device call 3 (issue 6): the mixer with its tokens' inputs prepared in blocks, Qwen3.5-2B shape, RANDOM
# weights. carry [".whl", ".engine_carry"]:
#   OUT=$OUT bash scripts/gpu/session10_mixer.sh
# 1. the mixer vs the torch chain on CUDA for token blocks 1, 2, 4, 8 (AR, clean + window, anchored steps);
# 2. scripts/gpu/engine_mixer_sweep.py: every (token block, state columns, warps) checked and timed per step shape;
#    the fastest for the trust step goes to $OUT/mixer_best.env;
# 3. the CLI step cost with that choice and the projection from this session's GPU conversion (tokens/forward);
# 4. the graphed step with the mixer and the whole CUDA engine vs the adapter reference, as far as time allows.
source scripts/gpu/engine_setup.sh
TPF=${TPF:-docs/perf/engine_session10/gpu/convert/bench_conv.json}
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine_kernels.py -k "mixer_kernel_on_cuda" \
  2>&1 | grep -v "^USDT" | tail -8 | tee "$OUT/gpu_tests_mixer.log"
timeout "${SWEEP_TIMEOUT:-170}" python3 scripts/gpu/engine_mixer_sweep.py --out "$OUT" 2>&1 | grep -v "^USDT" | tee "$OUT/mixer_sweep.log"
[ -f "$OUT/mixer_best.env" ] && source "$OUT/mixer_best.env" && cat "$OUT/mixer_best.env"
timeout "${STEP_TIMEOUT:-180}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
  --concurrency 8 --gdn-kernel mixer --tpf-from "$TPF" --out "$OUT" 2>&1 | grep -v "^USDT" | tee "$OUT/engine_step_cost.log"
timeout "${ENGINE_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine.py \
  -k "(graphed_step_equals_eager_on_cuda and mixer) or engine_on_cuda_equals" 2>&1 | grep -v "^USDT" | tail -8 \
  | tee "$OUT/gpu_tests_engine.log"
tail -12 "$OUT/mixer_sweep.log"
