#!/bin/bash
# Issue 6, session 15: the shortest useful layer-chain measurement, for a device call with little time left
# (device tool, carry [".whl", ".engine_carry"]). Most telling first, so a cut run still answers something:
# 1. CLI step cost (C=8, Qwen3.5-2B shape, random weights) with the chain on, then off (same machine);
# 2. the chain's GPU tests at the 2B shapes ('fit' tiling, M = 8) and the chained engine step == unchained.
source scripts/gpu/engine_setup.sh
export TRITON_CACHE_DIR=/tmp/tcache_s15
for v in chain off; do
  [ $v = chain ] && flag=1 || flag=0
  s=$(date +%s)
  FLARECTL_ENGINE_LAYER_CHAIN=$flag timeout "${STEP_TIMEOUT:-115}" python3 -m flarectl.cli bench --model qwen3.5-2b \
    --random-init --step-cost --concurrency 8 --gdn-kernel mixer --out /tmp/step_$v 2>&1 | grep -v "^USDT" \
    > "$OUT/step_cost_$v.log"
  cp /tmp/step_$v/bench.json "$OUT/step_cost_$v.json" 2>/dev/null
  echo "== $v (FLARECTL_ENGINE_LAYER_CHAIN=$flag) $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) |rror" "$OUT/step_cost_$v.log" | head -5
done
s=$(date +%s)
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_chain.py \
  -k "static_step or (8-fit)" > "$OUT/gpu_test_layer_chain.log" 2>&1
echo "== layer-chain GPU tests rc $? $(( $(date +%s) - s )) s"; tail -4 "$OUT/gpu_test_layer_chain.log"
