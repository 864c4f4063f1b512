#!/bin/bash
# Session 13, device call (issue 6), carry [".whl", ".engine_carry"]: the CLI step cost (AR / trust / window, C=8,
# Qwen3.5-2B shape, random weights) per STEP_VARIANTS (default: the defaults, then the register look-ahead
# FLARECTL_GEMV_LOAD_AHEAD=1; also pre32, pre32ahead: PDL preloading 32 KB before each wait), one process each, same
# machine, after scripts/gpu/ahead_check.py (look-ahead kernels vs twins on CUDA). Then what the device's Triton built
# (software pipelining or not: scripts/gpu/triton_cache_report.py), then, with DEPTH_TIMEOUT > 0, the PDL-depth chain
# probe (engine_pdl_depth.py --fixed; its log only).
source scripts/gpu/engine_setup.sh
export TRITON_CACHE_DIR=/tmp/tcache_s13
timeout "${CHECK_TIMEOUT:-90}" python3 scripts/gpu/ahead_check.py > "$OUT/ahead_check.log" 2>&1; tail -4 "$OUT/ahead_check.log"
for v in ${STEP_VARIANTS:-off ahead}; do
  case $v in
    off) envs="FLARECTL_ENGINE_PDL=0" ;;
    ahead) envs="FLARECTL_ENGINE_PDL=0 FLARECTL_GEMV_LOAD_AHEAD=1" ;;
    pre32) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32" ;;
    pre32ahead) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32 FLARECTL_GEMV_LOAD_AHEAD=1" ;;
  esac
  s=$(date +%s)
  env $envs timeout "${STEP_TIMEOUT:-130}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
    --concurrency 8 --gdn-kernel mixer --out /tmp/step_$v 2>&1 | grep -v "^USDT" > "$OUT/step_cost_$v.log"
  [ "$v" = pre32ahead ] || cp /tmp/step_$v/bench.json "$OUT/step_cost_$v.json" 2>/dev/null
  echo "== $v ($envs) $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) " "$OUT/step_cost_$v.log"
done
python3 scripts/gpu/triton_cache_report.py /tmp/tcache_s13 gemv > "$OUT/triton_cache.md" 2>&1; cat "$OUT/triton_cache.md"
[ "${DEPTH_TIMEOUT:-0}" -gt 0 ] && timeout "$DEPTH_TIMEOUT" python3 scripts/gpu/engine_pdl_depth.py --fixed --out /tmp/depth > "$OUT/pdl_depth.log" 2>&1
tail -25 "$OUT/pdl_depth.log"
