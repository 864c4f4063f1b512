#!/bin/bash
# Issue 6, session 20 (device tool, carry [".whl", ".engine_carry"]; .engine_carry/mixer_before.py = the mixer before
# the change, e.g. `git show 0c8a02c:flarectl/engine/mixer.py`; .engine_carry/compile_cache.tgz from an earlier call):
# the GDN mixer with its tail's loads issued together, against the one before, most telling first:
# 1. the mixer alone, before vs after, and after with the tail taken out (engine_mixer_ablation.py, ~30 s);
# 2. after == the torch chain at the AR, window and trust shapes (engine_mixer_sweep.py prints max err, ~20 s);
# 3. the CLI step cost with the defaults (~60-100 s with a warm compile cache);
# 4. the mixer's CUDA test (RUN_TESTS=1).
source scripts/gpu/engine_setup.sh
{
s=$(date +%s)
timeout 90 python3 scripts/gpu/engine_mixer_ablation.py --out $OUT --variants full,no_tail \
  --baseline .engine_carry/mixer_before.py 2>&1 | grep -v "^USDT" > $OUT/mixer_ablation.log
echo "== ablation $(( $(date +%s) - s )) s"; sed -n '/^ablation/,$p' $OUT/mixer_ablation.log
timeout 60 python3 scripts/gpu/engine_mixer_sweep.py --out /tmp/sweep --steps ar,window,trust --configs 1:32:4,2:32:4 \
  2>&1 | grep -E "max err|floor|FAILED"
echo "== sweep $(( $(date +%s) - s )) s"
FLARECTL_ENGINE_PDL=0 timeout "${STEP_TIMEOUT:-150}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init \
  --step-cost --concurrency 8 --gdn-kernel mixer --out /tmp/step 2>&1 | grep -v "^USDT" > $OUT/step_cost.log
cp /tmp/step/*.json $OUT/ 2>/dev/null
echo "== step cost $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) |rror" $OUT/step_cost.log
if [ "${RUN_TESTS:-0}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_kernels.py \
    -k mixer_kernel_on_cuda > $OUT/gpu_tests.log 2>&1
  echo "== tests rc $? $(( $(date +%s) - s )) s"; tail -3 $OUT/gpu_tests.log
fi
} 2>&1 | tee $OUT/summary.log
