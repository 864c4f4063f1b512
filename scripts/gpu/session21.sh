#!/bin/bash
# Issue 6, session 21 (device tool, carry [".whl", ".engine_carry"]; .engine_carry/mixer_before.py = the GDN mixer
# before the change under test, e.g. `git show <commit>:flarectl/engine/mixer.py`): most telling first,
# 1. the CLI step cost (AR / trust / window, C=8, Qwen3.5-2B shape, random weights) with the tree's mixer ("new") and
#    with mixer_before.py ("base"), each in its own process on the same machine, ROUNDS times alternating;
# 2. the GPU tests TEST_K (default: the mixer's and the attention core's kernel-vs-twin tests) with the tree's mixer;
# 3. BREAKDOWN=1: the step time per kernel class (engine_step_breakdown.py), the tree's mixer.
# Logs and JSON in $OUT/session21.tgz (packed after every part); $OUT/summary.log; KEEP_CACHE=1 brings the compile
# caches back as $OUT/compile_cache.tgz.
source scripts/gpu/engine_setup.sh
L=/tmp/s21; mkdir -p $L
pack() { tar czf "$OUT/session21.tgz" -C /tmp s21; }
cp flarectl/engine/mixer.py /tmp/mixer_new.py
trap 'cp /tmp/mixer_new.py flarectl/engine/mixer.py' EXIT
step() {  # $1: label
  local s=$(date +%s)
  FLARECTL_ENGINE_PDL=0 timeout "${STEP_TIMEOUT:-150}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init \
    --step-cost --concurrency 8 --gdn-kernel mixer --out /tmp/step_$1 2>&1 | grep -v "^USDT" > "$L/step_cost_$1.log"
  for f in /tmp/step_$1/*.json; do cp "$f" "$L/$1_$(basename "$f")"; done 2>/dev/null
  echo "== $1 $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) |rror" "$L/step_cost_$1.log" | head -5; pack
}
{
for r in $(seq 1 "${ROUNDS:-1}"); do
  step new$r
  cp .engine_carry/mixer_before.py flarectl/engine/mixer.py; step base$r; cp /tmp/mixer_new.py flarectl/engine/mixer.py
  [ "${KEEP_CACHE:-0}" = 1 ] && [ "$r" = 1 ] && save_compile_cache
done
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
