#!/bin/bash
# Issue 6, session 21 (device tool, carry [".whl", ".engine_carry"]; .engine_carry/mixer_before.py = the GDN mixer
# before the change under test, e.g. `git show <commit>:flarectl/engine/mixer.py`): most telling first,
# 1. the CLI step cost (AR / trust / window, C=8, Qwen3.5-2B shape, random weights) with the tree's mixer ("new") and
#    with mixer_before.py ("base"), each in its own process on the same machine, ROUNDS times alternating;
# 1b. MIXER_SWEEP="--steps ... --configs ...": the mixer alone (engine_mixer_sweep.py; token block 0 = the chunk
#    form); CHUNK_STEP=1: the CLI step cost with FLARECTL_MIXER_CHUNK=1 ("chunk"); MAXNREG=128: the mixer alone
#    and the CLI step cost without and with FLARECTL_MIXER_MAXNREG=128 (ROUNDS=0 skips part 1);
# 2. the GPU tests TEST_K (default: the mixer's and the attention core's kernel-vs-twin tests) with the tree's mixer;
# 3. BREAKDOWN=1: the step time per kernel class (engine_step_breakdown.py), the tree's mixer.
# Logs and JSON in $OUT/session21.tgz (packed after every part); $OUT/summary.log; KEEP_CACHE=1 brings the compile
# caches back as $OUT/compile_cache.tgz.
source scripts/gpu/engine_setup.sh
L=/tmp/s21; mkdir -p $L
pack() { tar czf "$OUT/session21.tgz" -C /tmp s21; }
cp flarectl/engine/mixer.py /tmp/mixer_new.py
trap 'cp /tmp/mixer_new.py flarectl/engine/mixer.py' EXIT
step() { run_step_cost "$1" "$L" "${@:2}"; pack; }  # $1: label, then env assignments for that run
{
for r in $(seq 1 "${ROUNDS:-1}"); do
  step new$r
  cp .engine_carry/mixer_before.py flarectl/engine/mixer.py; step base$r; cp /tmp/mixer_new.py flarectl/engine/mixer.py
  [ "${KEEP_CACHE:-0}" = 1 ] && [ "$r" = 1 ] && save_compile_cache
done
if [ -n "${MIXER_SWEEP:-}" ]; then  # the mixer alone (engine_mixer_sweep.py's arguments; token block 0 = chunk form)
  s=$(date +%s)
  timeout "${MIXER_TIMEOUT:-120}" python3 scripts/gpu/engine_mixer_sweep.py --out $L/mixer $MIXER_SWEEP 2>&1 \
    | grep -v "^USDT" > "$L/mixer_sweep.log"
  echo "== mixer sweep $(( $(date +%s) - s )) s"; sed -n '/^all/,$p' "$L/mixer_sweep.log"; pack
fi
[ "${CHUNK_STEP:-0}" = 1 ] && step chunk FLARECTL_MIXER_CHUNK=1  # the CLI step cost with the mixer's chunk form
if [ -n "${MAXNREG:-}" ]; then  # the mixer's register cap: the mixer alone without and with it, then the CLI step cost
  for cap in none "$MAXNREG"; do
    s=$(date +%s)
    env $([ "$cap" != none ] && echo FLARECTL_MIXER_MAXNREG=$cap) timeout 100 python3 scripts/gpu/engine_mixer_sweep.py \
      --out $L/mixer_cap_$cap --steps ar,window,trust --configs 1:32:4 2>&1 | grep -v "^USDT" > "$L/mixer_cap_$cap.log"
    echo "== mixer, cap $cap, $(( $(date +%s) - s )) s"; sed -n '/^all/,/^state/p' "$L/mixer_cap_$cap.log"; pack
  done
  step nocap; step cap$MAXNREG FLARECTL_MIXER_MAXNREG=$MAXNREG
fi
if [ "${TEST_TIMEOUT:-280}" -gt 1 ]; then
  s=$(date +%s)
  timeout "${TEST_TIMEOUT:-280}" python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_engine_kernels.py \
    -k "${TEST_K:-mixer_kernel_on_cuda or attention_core_on_cuda}" > "$OUT/gpu_tests.log" 2>&1
  echo "== GPU tests rc $? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -12
fi
if [ "${BREAKDOWN:-0}" = 1 ]; then
  run_breakdown $L; pack
fi
} 2>&1 | tee "$OUT/summary.log"
cp "$OUT/engine_env.log" $L/ 2>/dev/null; pack
