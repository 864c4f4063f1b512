#!/bin/bash
# Session 13, device call 1 (issue 6), carry [".whl", ".engine_carry"]: PDL with deeper loads before gdc_wait.
# 1. scripts/gpu/engine_pdl_depth.py: per-shape sweeps and the mixed chain of 24 GDN layers' projections;
# 2. the CLI step cost (AR / trust / window, C=8, Qwen3.5-2B shape, random weights) per STEP_VARIANTS (default: the
#    defaults, then the register look-ahead), one process each, same machine.
source scripts/gpu/engine_setup.sh
export TRITON_CACHE_DIR=/tmp/tcache_depth
timeout "${DEPTH_TIMEOUT:-270}" python3 scripts/gpu/engine_pdl_depth.py --out "$OUT" > "$OUT/pdl_depth.log" 2>&1
tail -30 "$OUT/pdl_depth.log"
python3 scripts/gpu/triton_cache_report.py /tmp/tcache_depth gemv > "$OUT/triton_cache_depth.md" 2>&1; head -40 "$OUT/triton_cache_depth.md"
unset TRITON_CACHE_DIR
for v in ${STEP_VARIANTS:-off ahead}; do
  case $v in
    off) envs="FLARECTL_ENGINE_PDL=0" ;;
    pre32) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32" ;;
    pre64) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=64" ;;
    tile) envs="FLARECTL_ENGINE_PDL=1" ;;
    ahead) envs="FLARECTL_ENGINE_PDL=0 FLARECTL_GEMV_LOAD_AHEAD=1" ;;
    pre32ahead) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32 FLARECTL_GEMV_LOAD_AHEAD=1" ;;
    l2) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32 FLARECTL_ENGINE_PDL_L2_KB=64" ;;
  esac
  env $envs timeout "${STEP_TIMEOUT:-130}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
    --concurrency 8 --gdn-kernel mixer --out /tmp/step_$v 2>&1 | grep -v "^USDT" > "$OUT/step_cost_$v.log"
  cp /tmp/step_$v/bench.json "$OUT/step_cost_$v.json" 2>/dev/null
  echo "== $v ($envs)"; grep -E "^│ (ar|trust|window) " "$OUT/step_cost_$v.log"
done
