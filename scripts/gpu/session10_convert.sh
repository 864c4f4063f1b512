#!/bin/bash
# Session 10, device call 2 of 2 (issue 6: trust-mode tokens/forward of a longer GPU conversion). On the machine
# session10_scale.sh left warm (GGUF part 1 in /tmp/gcache), carry [".xfer/p2", ".xfer/wheels", ".whl", ".xfer/pkgs"]:
#   OUT=$OUT bash scripts/gpu/session10_convert.sh
# 1. convert SmolLM2-135M-Instruct on its self-distilled set (smollm2-135m recipe, STEPS steps, lr LR);
# 2. the serving benchmark of the converted checkpoint at C=8 (all modes + HF generate, 16 HumanEval prompts x 128
#    tokens; not compiled) -> $OUT/bench_conv.json, the --tpf-from input of the projection;
# 3. decode quality (exactness vs AR greedy, both AR-Trust schemes), as far as the time allows.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATASETS=distilled STEPS_DISTILLED=${STEPS:-500} CONVERT_TIMEOUT=${CONVERT_TIMEOUT:-330} DECODE_TIMEOUT=1 \
  CONVERT_ARGS="--set train.lr=${LR:-1e-4}" bash scripts/gpu/smollm2_conversion.sh || echo "CONVERSION SCRIPT FAILED ($?)"
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 FLARECTL_CACHE=/tmp/fcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== serving bench of the converted checkpoint" | tee -a "$OUT/run.log"
timeout "${BENCH_TIMEOUT:-140}" python3 -m flarectl.cli bench --model /tmp/conv_distilled/final \
  --mode ar,ar-trust,diffusion-trust --concurrency 8 --num-requests 16 --max-new-tokens 128 --prompts humaneval \
  --no-compile --out /tmp/bench_conv 2>&1 | grep -v "^USDT" | tee -a "$OUT/run.log"
cp /tmp/bench_conv/bench.json "$OUT/bench_conv.json" 2>/dev/null
cp /tmp/bench_conv/*.png "$OUT/" 2>/dev/null
echo "== decode quality" | tee -a "$OUT/run.log"
timeout "${DQ_TIMEOUT:-90}" python3 scripts/decode_quality.py --model /tmp/conv_distilled/final --out "$OUT/decode_distilled.json" \
  --max-new-tokens 96 --code 8 --chat 8 --thresholds 0.9,0.7 --schemes anchored,fused 2>&1 | tail -20 | tee -a "$OUT/run.log"
