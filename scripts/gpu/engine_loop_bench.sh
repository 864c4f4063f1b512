#!/bin/bash
# Serving loop before/after on one GPU (issue 6): scripts/gpu/engine_loop_bench.py for the 'before' tree
# (.engine_carry/before/tree: `git archive <rev> flarectl | tar -x -C .engine_carry/before/tree`) and this tree,
# then max-autotune of the AR step and the CUDA engine tests, each under its own timeout. From the repository root
# with OUT set; device tool carry [".whl", ".engine_carry"] (as scripts/gpu/engine_profile.sh). Logs land in $OUT.
source scripts/gpu/engine_setup.sh
B=scripts/gpu/engine_loop_bench.py
timeout "${BEFORE_TIMEOUT:-130}" python3 $B --label before --tree .engine_carry/before/tree --out "$OUT" 2>&1 \
  | grep -v "^USDT" | tee "$OUT/engine_loop_before.log"
timeout "${AFTER_TIMEOUT:-150}" python3 $B --label after --out "$OUT" --check-prefill 2>&1 \
  | grep -v "^USDT" | tee "$OUT/engine_loop_after.log"
timeout "${AUTOTUNE_TIMEOUT:-125}" python3 $B --label autotune --out "$OUT" --serving-repeats 0 --autotune 2>&1 \
  | grep -v "^USDT" | tail -30 | tee "$OUT/engine_loop_autotune.log"
if [ "${TEST_TIMEOUT:-0}" != 0 ]; then
  timeout "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k "cuda" 2>&1 \
    | tail -30 | tee "$OUT/engine_gpu_pytest.log"
fi
