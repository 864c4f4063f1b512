#!/bin/bash
# Issue 6 acceptance numbers through the CLI only (one H100, current defaults): step cost vs the weight-bandwidth
# roofline for each GDN decode path in GDN_KERNELS (default mixer,triton: the one-kernel mixer, the CUDA default since
# session 6, and our recurrence kernel; session 5 ran triton,fla), then AR serving at C=8 with the HF generate baseline in the same
# run. RANDOM weights (Qwen3.5-2B shape). From the repository root with OUT set; device tool carry
# [".whl", ".engine_carry"]. Logs and JSON land in $OUT.
source scripts/gpu/engine_setup.sh
B="python3 -m flarectl.cli bench --model qwen3.5-2b --random-init"
timeout "${STEP_TIMEOUT:-200}" $B --step-cost --concurrency 8 --gdn-kernel "${GDN_KERNELS:-mixer,triton}" --out "$OUT" 2>&1 \
  | grep -v "^USDT" | tee "$OUT/engine_step_cost.log"
timeout "${SERVE_TIMEOUT:-300}" $B --mode ar --concurrency 8 --num-requests 16 --max-new-tokens 128 --out "$OUT" 2>&1 \
  | grep -v "^USDT" | tee "$OUT/engine_bench.log"
