#!/bin/bash
# Issue 6, session 16 (device tool, carry [".whl", ".engine_carry"]), most telling first:
# 1. the CLI step cost (AR / trust / window, C=8, Qwen3.5-2B shape, random weights) per STEP_VARIANTS, one process
#    each, same machine (~110 s for the first, ~35 s after: Triton's cache is warm):
#      off      the defaults (since session 18 the attention core is on);
#      nocore   the defaults with the attention core off (FLARECTL_ENGINE_ATTN_CORE=0: the step before session 18);
#      nofuse   the norms unfused from their projections (FLARECTL_ENGINE_FUSE_NORM=0): with off, the JSON's
#               gemv_tuned gives the plain and the fused-norm kernel's read rate at the same shapes;
#      inline   FLARECTL_GEMV_INLINE_SPLIT=1 (the tuner also times split-K finished in the kernel, Config.inline);
#      pre32    PDL with up to 32 KB of weights loaded before each wait (session 13's knob, never run);
#      l2       pre32 plus 64 KB per program prefetched into L2 before the wait;
#      late     pre32 with the next launch triggered after the loop;
#      chain    the layer chain as measured in session 16 (FLARECTL_ENGINE_LAYER_CHAIN=1: AR 2.252 ms vs off 2.137);
#      chain_pre    the chain with each phase's first weight block loaded before its barrier (PRELOAD);
#      chain_pre_nl chain_pre with the norms' sums of squares inside the K loop (NORM_LOOP);
#      (session 17) the GDN states pulled into L2 on the side stream (FLARECTL_ENGINE_PREFETCH_STATE):
#      st_ll0   'line_last' (prefetch.global.L2::evict_last) beside the layer's input projection;
#      st_ll2   the same, two GEMMs earlier (beside the previous layer's gate|up);
#      st_bulk0 'bulk' (cp.async.bulk.prefetch.L2) beside the input projection;
#      st_line1 'line' one GEMM earlier (beside the previous layer's down projection);
#      core     attention layers' q/k norms, RoPE, cache write and gate around the attention kernel in two launches
#               (FLARECTL_ENGINE_ATTN_CORE=1, attention_core.py);
#      core_st  core with st_ll0;
#      (session 18) core_bulk: core with st_bulk0; core_st1: core with line_last one GEMM earlier; core_pre32: core
#      with pre32;
# 2. the GPU tests (TEST_FILES, TEST_K): by default the skinny-kernel test (every candidate, inline split included ==
#    fp64; same bits on a repeat), the PDL-depth test (graphed chain == eager == twins) and the layer chain's tests
#    (real grid with its barriers, every knob, graphed; the chained engine step == unchained).
# STEP_VARIANTS=none skips the step costs. MIXER_SWEEP="--steps ar,trust --configs 1:32:4,..." then times the GDN
# mixer's launch choices alone (scripts/gpu/engine_mixer_sweep.py, with the state-copy floor); MIXER_ABLATION=1 times
# the mixer with parts taken out (scripts/gpu/engine_mixer_ablation.py). Both run after the tests, before BREAKDOWN.
# BREAKDOWN=1 then runs scripts/gpu/engine_step_breakdown.py (the defaults' step time per kernel class, torch.profiler).
# TEST_ENV="VAR=value ..." sets the tests' environment (e.g. an opt-in knob the tests should run with).
# TESTS_AFTER=<variant> runs the tests right after that variant (TEST_K picks them).
# Logs and bench JSON go to $OUT/session16.tgz, packed again after every variant; the GPU tests' log is written
# straight to $OUT/gpu_tests.log (so a call cut during the tests still brings it back); $OUT/summary.log. At most 8
# files come back from $OUT, so the per-variant files travel packed.
# KEEP_CACHE=1 also packs the Triton and inductor caches into $OUT/compile_cache.tgz after every variant and at the
# end (when under 16 MiB): put it at
# .engine_carry/compile_cache.tgz and the next call (engine_setup.sh) starts warm instead of ~100 s of compiling.
source scripts/gpu/engine_setup.sh
L=/tmp/s16; mkdir -p $L
pack() { tar czf "$OUT/session16.tgz" -C /tmp s16; }
gpu_tests() {
  local s=$(date +%s)
  env ${TEST_ENV:-} timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -v -p no:cacheprovider -m gpu \
    ${TEST_FILES:-tests/test_engine_kernels.py tests/test_layer_chain.py} \
    -k "${TEST_K:-test_kernel_on_cuda_matches_twin or pdl_depth_on_cuda or layer_chain or prefetch_on_cuda or attention_core_on_cuda}" > "$OUT/gpu_tests.log" 2>&1
  echo "== GPU tests rc $? $(( $(date +%s) - s )) s"; tail -3 "$OUT/gpu_tests.log"; cp "$OUT/gpu_tests.log" $L/; pack
}
{
for v in ${STEP_VARIANTS:-off chain chain_pre chain_pre_nl inline pre32}; do
  case $v in
    none) continue ;;
    off) envs="FLARECTL_ENGINE_PDL=0" ;;
    nocore) envs="FLARECTL_ENGINE_PDL=0 FLARECTL_ENGINE_ATTN_CORE=0" ;;
    nofuse) envs="FLARECTL_ENGINE_PDL=0 FLARECTL_ENGINE_FUSE_NORM=0" ;;
    inline) envs="FLARECTL_GEMV_INLINE_SPLIT=1" ;;
    pre32) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32" ;;
    l2) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32 FLARECTL_ENGINE_PDL_L2_KB=64" ;;
    late) envs="FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32 FLARECTL_ENGINE_PDL_TRIGGER_LATE=1" ;;
    chain) envs="FLARECTL_ENGINE_LAYER_CHAIN=1" ;;
    chain_pre) envs="FLARECTL_ENGINE_LAYER_CHAIN=1 FLARECTL_ENGINE_LAYER_CHAIN_PRELOAD=1" ;;
    chain_pre_nl) envs="FLARECTL_ENGINE_LAYER_CHAIN=1 FLARECTL_ENGINE_LAYER_CHAIN_PRELOAD=1 FLARECTL_ENGINE_LAYER_CHAIN_NORM_LOOP=1" ;;
    core) envs="FLARECTL_ENGINE_ATTN_CORE=1" ;;
    core_st) envs="FLARECTL_ENGINE_ATTN_CORE=1 FLARECTL_ENGINE_PREFETCH_STATE=line_last FLARECTL_ENGINE_PREFETCH_STATE_LEAD=0" ;;
    core_bulk) envs="FLARECTL_ENGINE_ATTN_CORE=1 FLARECTL_ENGINE_PREFETCH_STATE=bulk FLARECTL_ENGINE_PREFETCH_STATE_LEAD=0" ;;
    core_st1) envs="FLARECTL_ENGINE_ATTN_CORE=1 FLARECTL_ENGINE_PREFETCH_STATE=line_last FLARECTL_ENGINE_PREFETCH_STATE_LEAD=1" ;;
    core_pre32) envs="FLARECTL_ENGINE_ATTN_CORE=1 FLARECTL_ENGINE_PDL=1 FLARECTL_ENGINE_PDL_PRELOAD_KB=32" ;;
    st_ll0) envs="FLARECTL_ENGINE_PREFETCH_STATE=line_last FLARECTL_ENGINE_PREFETCH_STATE_LEAD=0" ;;
    st_ll2) envs="FLARECTL_ENGINE_PREFETCH_STATE=line_last FLARECTL_ENGINE_PREFETCH_STATE_LEAD=2" ;;
    st_bulk0) envs="FLARECTL_ENGINE_PREFETCH_STATE=bulk FLARECTL_ENGINE_PREFETCH_STATE_LEAD=0" ;;
    st_line1) envs="FLARECTL_ENGINE_PREFETCH_STATE=line FLARECTL_ENGINE_PREFETCH_STATE_LEAD=1" ;;
  esac
  s=$(date +%s)
  env $envs timeout "${STEP_TIMEOUT:-130}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
    --concurrency 8 --gdn-kernel mixer --out /tmp/step_$v 2>&1 | grep -v "^USDT" > "$L/step_cost_$v.log"
  for f in /tmp/step_$v/*.json; do cp "$f" "$L/${v}_$(basename "$f")"; done 2>/dev/null
  echo "== $v ($envs) $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) |rror" "$L/step_cost_$v.log" | head -5
  pack
  [ "${KEEP_CACHE:-0}" = 1 ] && save_compile_cache  # after every variant: a call cut later still brings it back
  [ "$v" = "${TESTS_AFTER:-none}" ] && gpu_tests
done
[ "${TESTS_AFTER:-none}" = none ] && gpu_tests
if [ "${MIXER_ABLATION:-0}" = 1 ]; then  # where the mixer's time goes: parts of the kernel taken out (~60 s)
  s=$(date +%s)
  timeout 150 python3 scripts/gpu/engine_mixer_ablation.py --out $L/mixer 2>&1 | grep -v "^USDT" > "$L/mixer_ablation.log"
  echo "== mixer ablation $(( $(date +%s) - s )) s"; sed -n '/^ablation/,$p' "$L/mixer_ablation.log"; pack
fi
if [ -n "${MIXER_SWEEP:-}" ]; then  # the GDN mixer alone: MIXER_SWEEP holds engine_mixer_sweep.py's arguments
  s=$(date +%s)
  timeout "${MIXER_TIMEOUT:-240}" python3 scripts/gpu/engine_mixer_sweep.py --out $L/mixer $MIXER_SWEEP 2>&1 \
    | grep -v "^USDT" > "$L/mixer_sweep.log"
  echo "== mixer sweep $(( $(date +%s) - s )) s"; sed -n '/^all/,$p' "$L/mixer_sweep.log"; pack
fi
if [ "${BREAKDOWN:-0}" = 1 ]; then  # where the defaults' step time goes, per kernel class (~100 s warm)
  run_breakdown $L; pack
fi
} 2>&1 | tee "$OUT/summary.log"
cp "$OUT/engine_env.log" $L/ 2>/dev/null; pack
[ "${KEEP_CACHE:-0}" = 1 ] && save_compile_cache
