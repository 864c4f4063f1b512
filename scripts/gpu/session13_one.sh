#!/bin/bash
# Issue 6 (written in session 13, not yet run: that session's device time went to failed starts), carry
# [".whl", ".engine_carry"]: the CLI step cost (AR / trust / window, C=8, Qwen3.5-2B shape, random weights) per
# STEP_VARIANTS (default "off pre32 l2": the defaults; PDL with up to 32 KB of weights loaded before each wait; the
# same plus 64 KB per program prefetched into L2; also pre64, late = pre32 with the late trigger), one process each,
# same machine. Then what the device's Triton built
# (scripts/gpu/triton_cache_report.py: shared memory, stages, cp.async, griddepcontrol per skinny-kernel build) and
# the PDL-depth GPU test (graphed chain == eager == twins), then,
# with DEPTH_TIMEOUT > 0, the PDL-depth chain probe (engine_pdl_depth.py --fixed; its log only). ~110 s per variant.
source scripts/gpu/engine_setup.sh
export TRITON_CACHE_DIR=/tmp/tcache_s13
for v in ${STEP_VARIANTS:-off pre32 l2}; do
  case $v in
    off) envs="FLARECTL_ENGINE_PDL=0" ;;
    pre32) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32" ;;
    pre64) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=64" ;;
    l2) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32 FLARECTL_ENGINE_PDL_L2_KB=64" ;;
    late) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32 FLARECTL_ENGINE_PDL_TRIGGER_LATE=1" ;;
  esac
  s=$(date +%s)
  env $envs timeout "${STEP_TIMEOUT:-130}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
    --concurrency 8 --gdn-kernel mixer --out /tmp/step_$v 2>&1 | grep -v "^USDT" > "$OUT/step_cost_$v.log"
  cp /tmp/step_$v/bench.json "$OUT/step_cost_$v.json" 2>/dev/null
  echo "== $v ($envs) $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) " "$OUT/step_cost_$v.log"
done
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_kernels.py \
  -k pdl_depth_on_cuda > "$OUT/gpu_test_pdl.log" 2>&1; tail -3 "$OUT/gpu_test_pdl.log"
python3 scripts/gpu/triton_cache_report.py /tmp/tcache_s13 gemv > "$OUT/triton_cache.md" 2>&1; cat "$OUT/triton_cache.md"
[ "${DEPTH_TIMEOUT:-0}" -gt 0 ] && timeout "$DEPTH_TIMEOUT" python3 scripts/gpu/engine_pdl_depth.py --fixed --out /tmp/depth > "$OUT/pdl_depth.log" 2>&1
tail -25 "$OUT/pdl_depth.log"
