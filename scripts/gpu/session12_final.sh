#!/bin/bash
# Session 12, device call 4 (issue 6), carry [".whl", ".engine_carry"]: the CLI step cost at the current defaults
# (mixer read-out serial) projected with the 1000-step conversion's tokens/forward (docs/perf/engine_session12/gpu/),
# then the engine kernels' GPU tests, verbose (call 1 ran them in parallel with the engine tests and hit its limit).
source scripts/gpu/engine_setup.sh
D=docs/perf/engine_session12/gpu/convert
FLARECTL_MIXER_READOUT=serial timeout "${STEP_TIMEOUT:-130}" python3 -m flarectl.cli bench --model qwen3.5-2b \
  --random-init --step-cost --concurrency 8 --gdn-kernel mixer \
  --tpf-from $D/bench_gsm8k_t0.9_plain.json --tpf-from $D/bench_gsm8k_t0.9_anchored.json \
  --tpf-from $D/bench_humaneval_t0.9_anchored.json --tpf-from $D/bench_humaneval_t0.9_plain.json \
  --out /tmp/step_final 2>&1 | grep -v "^USDT" > "$OUT/step_cost_final.log"
cp /tmp/step_final/bench.json "$OUT/step_cost_final.json" 2>/dev/null
grep -E "^│ (ar|trust|window|ar-trust|diffusion-trust) " "$OUT/step_cost_final.log"
FLARECTL_MIXER_READOUT=serial timeout "${KTEST_TIMEOUT:-280}" python3 -m pytest -v -p no:cacheprovider -rA --durations=12 -m gpu \
  tests/test_engine_kernels.py > "$OUT/gpu_tests_kernels.log" 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests_kernels.log" | grep -v -i warn | tail -20
