#!/bin/bash
# The mixer kernel as the engine default? (issue 6) bf16 accuracy of the triton and mixer paths against an fp32
# reference on the same random Qwen3.5-2B weights, then the engine's CUDA tests with 'auto' resolving to the mixer.
# From the repository root with OUT set; device tool carry [".whl", ".engine_carry"].
source scripts/gpu/engine_setup.sh
timeout "${ACC_TIMEOUT:-170}" python3 scripts/gpu/engine_mixer_accuracy.py --variants triton,mixer \
  --out "$OUT/mixer_accuracy.json" 2>&1 | grep -v "^USDT" | tee "$OUT/mixer_accuracy.log"
FLARECTL_ENGINE_MIXER=1 timeout "${TEST_TIMEOUT:-250}" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
  -k cuda -rA 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|error" | tail -20 | tee "$OUT/engine_gpu_pytest_mixer.log"
