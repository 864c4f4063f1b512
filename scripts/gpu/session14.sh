#!/bin/bash
# Issue 6, session 14 (device tool, carry [".whl", ".engine_carry"]), most telling first:
# 1. the layer-chain GPU tests (tests/test_layer_chain.py -m gpu: the real grid with its barriers at the 2B shapes,
#    graphed; the chained engine step == unchained);
# 2. the CLI step cost (AR / trust / window, C=8, Qwen3.5-2B shape, random weights) per STEP_VARIANTS (default
#    "off chain": the defaults; FLARECTL_ENGINE_LAYER_CHAIN=1; also chain16 / chain64 = the chain with 16 / 64 KB of
#    weights per pipeline stage,
#    chain_nopf = the chain without its L2 prefetch, chain_bal = the chain with 'balance' tiling (fewest columns on the
#    busiest program), pre32 = PDL with 32 KB preloaded), one process each, same machine, ~110 s each;
# 3. the persistent-chain probe (scripts/gpu/engine_persistent_chain.py, PROBE_TIMEOUT s, one layer per launch).
source scripts/gpu/engine_setup.sh
export TRITON_CACHE_DIR=/tmp/tcache_s14
s=$(date +%s)
timeout "${TEST_TIMEOUT:-130}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_chain.py \
  > "$OUT/gpu_test_layer_chain.log" 2>&1
echo "== layer-chain GPU tests rc $? $(( $(date +%s) - s )) s"; tail -4 "$OUT/gpu_test_layer_chain.log"
for v in ${STEP_VARIANTS:-off chain}; do
  case $v in
    off) envs="FLARECTL_ENGINE_LAYER_CHAIN=0" ;;
    chain) envs="FLARECTL_ENGINE_LAYER_CHAIN=1" ;;
    chain16) envs="FLARECTL_ENGINE_LAYER_CHAIN=1 FLARECTL_ENGINE_LAYER_CHAIN_TILE_KB=16" ;;
    chain64) envs="FLARECTL_ENGINE_LAYER_CHAIN=1 FLARECTL_ENGINE_LAYER_CHAIN_TILE_KB=64" ;;
    chain_nopf) envs="FLARECTL_ENGINE_LAYER_CHAIN=1 FLARECTL_ENGINE_LAYER_CHAIN_PF=0" ;;
    chain_bal) envs="FLARECTL_ENGINE_LAYER_CHAIN=1 FLARECTL_ENGINE_LAYER_CHAIN_TILING=balance" ;;
    pre32) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32" ;;
  esac
  s=$(date +%s)
  env $envs timeout "${STEP_TIMEOUT:-130}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
    --concurrency 8 --gdn-kernel mixer --out /tmp/step_$v 2>&1 | grep -v "^USDT" > "$OUT/step_cost_$v.log"
  cp /tmp/step_$v/bench.json "$OUT/step_cost_$v.json" 2>/dev/null
  echo "== $v ($envs) $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) " "$OUT/step_cost_$v.log"
done
[ "${PROBE_TIMEOUT:-100}" -gt 0 ] || exit 0
timeout "${PROBE_TIMEOUT:-100}" python3 scripts/gpu/engine_persistent_chain.py --out "$OUT" --per-launch 1 \
  > "$OUT/persistent_chain.log" 2>&1
echo "== probe rc $?"; grep -v "^\[" "$OUT/persistent_chain.log" | tail -16; grep -E "chain \(|copy|Error" "$OUT/persistent_chain.log" | head -6
