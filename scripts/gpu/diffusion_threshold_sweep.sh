#!/bin/bash
# Diffusion-Trust tokens/forward vs confidence threshold and conversion length (issue 6; prepared in session 11, not
# run yet). Two calls on one warm machine, as scripts/gpu/smollm2_conversion.sh:
#   1) carry [".whl", ".engine_carry", ".xfer/p1"]: mkdir -p /tmp/gcache && cp .xfer/p1/* /tmp/gcache/  (or any call
#      that stages it, e.g. session11_check.sh preceded by that line)
#   2) carry [".xfer/p2", ".xfer/wheels", ".whl", ".xfer/pkgs"]: OUT=$OUT STEPS=1000 bash scripts/gpu/diffusion_threshold_sweep.sh
# Converts SmolLM2-135M on the code + poetry + math self-distilled sets for $STEPS steps (~0.32 s a step on an H100),
# then, on gsm8k-style prompts (C=8, 16 requests x 128 tokens, bf16): AR-Trust once and Diffusion-Trust at each
# threshold in $THRESHOLDS, plain and anchored schemes (tokens/forward: bench_gsm8k_t*.json), and the decode-quality
# comparison with AR at the same thresholds and schemes (what each costs: decode_quality.json).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DISTILLED_SOURCES="smollm2-selfdistill, smollm2-selfdistill-math" DQ_TIMEOUT=1 BENCH_TIMEOUT=1
STEPS=${STEPS:-1000} CONVERT_TIMEOUT=${CONVERT_TIMEOUT:-420} OUT=$OUT bash scripts/gpu/session10_convert.sh > "$OUT/convert.log" 2>&1
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 FLARECTL_CACHE=/tmp/fcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
THRESHOLDS=${THRESHOLDS:-0.9 0.8 0.7}
MODES=ar-trust,diffusion-trust
for T in $THRESHOLDS; do
  for S in plain anchored; do
    timeout "${BENCH_T_TIMEOUT:-60}" python3 -m flarectl.cli bench --model /tmp/conv_distilled/final --mode $MODES \
      --concurrency 8 --num-requests 16 --max-new-tokens 128 --prompts gsm8k --threshold "$T" --diffusion-scheme $S \
      --no-baseline --no-compile --out "/tmp/bench_t${T}_$S" 2>&1 | grep -E "^│ (ar|diffu)" | sed "s/^/t=$T $S /"
    cp "/tmp/bench_t${T}_$S/bench.json" "$OUT/bench_gsm8k_t${T}_$S.json" 2>/dev/null
    MODES=diffusion-trust
  done
done
timeout "${DQ_SWEEP_TIMEOUT:-150}" python3 scripts/decode_quality.py --model /tmp/conv_distilled/final \
  --out "$OUT/decode_quality.json" --max-new-tokens 96 --code 8 --chat 8 --thresholds "${THRESHOLDS// /,}" \
  --diffusion-schemes plain,anchored 2>&1 | tail -12
