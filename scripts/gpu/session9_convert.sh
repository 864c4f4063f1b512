#!/bin/bash
# Session 9, device call 2 of 3 (issue 6: trust-mode throughput with tokens/forward of a converted checkpoint).
# After call 1 left the GGUF's first part in /tmp/gcache (see smollm2_conversion.sh), on the same warm machine,
# carry [".xfer/p2", ".xfer/wheels", ".whl", ".xfer/pkgs"]:
#   OUT=$OUT bash scripts/gpu/session9_convert.sh
# 1. convert SmolLM2-135M-Instruct on its self-distilled set (STEPS, LR);
# 2. decode quality of every mode on 16 HumanEval + 16 chat prompts, AR-Trust in both schemes (anchored, fused);
# 3. the serving benchmark of the converted checkpoint at C=8 (all modes + HF generate; engine step not compiled:
#    each trust shape would compile ~10 s) -> $OUT/bench_conv.json, the --tpf-from input of call 3;
# 4. the GPU tests of what this session changed (anchored windows in the mixer kernel and the graphed step).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATASETS=distilled STEPS_DISTILLED=${STEPS:-300} CONVERT_TIMEOUT=${CONVERT_TIMEOUT:-280} DECODE_TIMEOUT=150 \
  CONVERT_ARGS="--set train.lr=${LR:-1e-4}" DECODE_ARGS="--schemes anchored,fused" \
  bash scripts/gpu/smollm2_conversion.sh || echo "CONVERSION SCRIPT FAILED ($?)"
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 FLARECTL_CACHE=/tmp/fcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== serving bench of the converted checkpoint" | tee -a "$OUT/run.log"
timeout "${BENCH_TIMEOUT:-130}" python3 -m flarectl.cli bench --model /tmp/conv_distilled/final \
  --mode ar,ar-trust,diffusion-trust --concurrency 8 --num-requests 16 --max-new-tokens 128 --prompts humaneval \
  --no-compile --out /tmp/bench_conv 2>&1 | grep -v "^USDT" | tee -a "$OUT/run.log"
cp /tmp/bench_conv/bench.json "$OUT/bench_conv.json" 2>/dev/null
echo "== GPU tests (anchored windows)" | tee -a "$OUT/run.log"
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider -rA tests/test_engine_kernels.py tests/test_engine.py \
  -k "mixer_kernel_on_cuda or (graphed_step_equals_eager_on_cuda and mixer) or engine_on_cuda_equals" \
  2>&1 | tail -25 | tee -a "$OUT/run.log"
