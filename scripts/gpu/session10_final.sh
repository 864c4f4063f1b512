#!/bin/bash
# Session 10, device call 4 (issue 6), carry [".whl", ".engine_carry"]: the CUDA engine tests (graphed compiled step
# with the mixer incl. anchored windows; the whole engine vs the adapter reference, not compiled), the skinny GEMM vs
# its twin for every candidate (8-warp configurations at 40 and 64 rows), then the CLI step cost.
source scripts/gpu/engine_setup.sh
FLARECTL_ENGINE_COMPILE=0 timeout "${ENGINE_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine.py \
  tests/test_engine_kernels.py -k "engine_on_cuda_equals or (graphed_step_equals_eager_on_cuda and mixer) or (kernel_on_cuda_matches_twin and not mixer and not fused and not norm)" \
  2>&1 | grep -v "^USDT" | grep -v -i warn | tail -12 | tee "$OUT/gpu_tests_engine.log"
timeout "${STEP_TIMEOUT:-120}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
  --concurrency 8 --gdn-kernel mixer --tpf-from docs/perf/engine_session10/gpu/convert/bench_conv.json --out "$OUT" \
  2>&1 | grep -v "^USDT" | tee "$OUT/engine_step_cost.log"
