#!/bin/bash
# Session 12, device call 1 (issue 6), carry [".whl", ".engine_carry", ".xfer/p1"]: stage the GGUF's first half for
# the conversion call that follows on the same warm machine (scripts/gpu/diffusion_threshold_sweep.sh), then every
# GPU test of the engine (after a step-cost A/B, below), three pytest processes side by side (Triton compiles in parallel on the host's cores):
#   1. tests/test_engine_kernels.py -m gpu: skinny GEMM (tuning included), norm projection at AR and trust-step rows,
#      recurrence, mixer, attention, L2 prefetch, each against its twin;
#   2. tests/test_engine.py -m gpu: graphed step == eager for every GDN kernel (compiled and not), engine == adapter;
#   3. the graphed step test again with the fused norm projection up to 32 rows (FLARECTL_NORM_GEMV_MAX_ROWS=32).
mkdir -p /tmp/gcache && cp .xfer/p1/* /tmp/gcache/
source scripts/gpu/engine_setup.sh
# 0. the CLI step cost (Qwen3.5-2B shape, random weights, C=8) with the mixer's state read out in parallel (the
#    default) and serially (sessions 5-11), one process each, projected with session 11's tokens/forward
for R in ${READOUTS:-parallel serial}; do
  FLARECTL_MIXER_READOUT=$R timeout "${STEP_TIMEOUT:-130}" python3 -m flarectl.cli bench --model qwen3.5-2b \
    --random-init --step-cost --concurrency 8 --gdn-kernel mixer \
    --tpf-from docs/perf/engine_session11/gpu/convert/bench_conv_gsm8k.json \
    --tpf-from docs/perf/engine_session11/gpu/convert/bench_conv.json --out "/tmp/step_$R" 2>&1 \
    | grep -v "^USDT" > "$OUT/step_cost_$R.log"
  cp "/tmp/step_$R/bench.json" "$OUT/step_cost_$R.json" 2>/dev/null
  grep -E "^│ (ar|trust|window|ar-trust|diffusion-trust) " "$OUT/step_cost_$R.log" | sed "s/^/$R /"
done
T=${TEST_TIMEOUT:-300}
P="python3 -m pytest -q -p no:cacheprovider -rA --durations=12 -m gpu"
timeout "$T" $P tests/test_engine_kernels.py > "$OUT/gpu_tests_kernels.log" 2>&1 &
timeout "$T" $P tests/test_engine.py > "$OUT/gpu_tests_engine.log" 2>&1 &
FLARECTL_NORM_GEMV_MAX_ROWS=32 timeout "$T" $P tests/test_engine.py -k "graphed_step_equals_eager_on_cuda" \
  > "$OUT/gpu_tests_engine_norm32.log" 2>&1 &
wait
for f in "$OUT"/gpu_tests_*.log; do
  echo "== $(basename "$f")"; grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error" "$f" | grep -v -i warn | tail -30
done
