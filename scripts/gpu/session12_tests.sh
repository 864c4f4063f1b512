#!/bin/bash
# Session 12, device call 1 (issue 6), carry [".whl", ".engine_carry", ".xfer/p1"]: stage the GGUF's first half for
# the conversion call that follows on the same warm machine (scripts/gpu/diffusion_threshold_sweep.sh), then every
# GPU test of the engine, three pytest processes side by side (Triton compiles in parallel on the host's cores):
#   1. tests/test_engine_kernels.py -m gpu: skinny GEMM (tuning included), norm projection at AR and trust-step rows,
#      recurrence, mixer, attention, L2 prefetch, each against its twin;
#   2. tests/test_engine.py -m gpu: graphed step == eager for every GDN kernel (compiled and not), engine == adapter;
#   3. the graphed step test again with the fused norm projection up to 32 rows (FLARECTL_NORM_GEMV_MAX_ROWS=32).
mkdir -p /tmp/gcache && cp .xfer/p1/* /tmp/gcache/
source scripts/gpu/engine_setup.sh
T=${TEST_TIMEOUT:-480}
P="python3 -m pytest -q -p no:cacheprovider -rA --durations=12 -m gpu"
timeout "$T" $P tests/test_engine_kernels.py > "$OUT/gpu_tests_kernels.log" 2>&1 &
timeout "$T" $P tests/test_engine.py > "$OUT/gpu_tests_engine.log" 2>&1 &
FLARECTL_NORM_GEMV_MAX_ROWS=32 timeout "$T" $P tests/test_engine.py -k "graphed_step_equals_eager_on_cuda" \
  > "$OUT/gpu_tests_engine_norm32.log" 2>&1 &
wait
for f in "$OUT"/gpu_tests_*.log; do
  echo "== $(basename "$f")"; grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error" "$f" | grep -v -i warn | tail -30
done
