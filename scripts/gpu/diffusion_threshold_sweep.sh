#!/bin/bash
# Diffusion-Trust tokens/forward vs confidence threshold, scheme and conversion length (issue 6). Calls on one warm
# machine, as scripts/gpu/smollm2_conversion.sh:
#   0) carry [".whl", ".engine_carry", ".xfer/p1"]: any call that stages the GGUF's first half
#      (mkdir -p /tmp/gcache && cp .xfer/p1/* /tmp/gcache/; scripts/gpu/session12_tests.sh does)
#   1) carry [".xfer/p2", ".xfer/wheels", ".whl", ".xfer/pkgs"]: OUT=$OUT PHASE=convert STEPS=1000 bash scripts/gpu/diffusion_threshold_sweep.sh
#      converts SmolLM2-135M on the code + poetry + math self-distilled sets for $STEPS steps (~0.32 s a step on an
#      H100) into /tmp/conv_distilled/final, then on gsm8k-style prompts (C=8, 16 requests x 128 tokens, bf16, not
#      compiled, no HF baseline) at threshold 0.9: AR-Trust and Diffusion-Trust plain, anchored (first pass unforced,
#      the default) and anchored with the first pass forced (FLARECTL_DT_ANCHORED_FORCE_FIRST=1, session 11's way)
#   2) same carry, PHASE=sweep: the thresholds in $THRESHOLDS (plain and anchored), HumanEval at 0.9 (both schemes),
#      and the decode-quality comparison with AR at 0.9 + $THRESHOLDS for both schemes (decode_quality.json)
# Each bench's JSON lands in $OUT as bench_<prompts>_t<threshold>_<scheme>.json.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 FLARECTL_CACHE=/tmp/fcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=/tmp/conv_distilled/final

bench() {  # prompts threshold scheme modes [env assignments...]
  local P=$1 T=$2 S=$3 M=$4; shift 4
  local SCHEME=${S%-forced}
  env "$@" timeout "${BENCH_T_TIMEOUT:-90}" python3 -m flarectl.cli bench --model $MODEL --mode "$M" \
    --concurrency 8 --num-requests 16 --max-new-tokens 128 --prompts "$P" --threshold "$T" --diffusion-scheme "$SCHEME" \
    --no-baseline --no-compile --out "/tmp/bench_${P}_t${T}_$S" 2>&1 | grep -E "^│ (ar|diffu)" | sed "s/^/$P t=$T $S /"
  cp "/tmp/bench_${P}_t${T}_$S/bench.json" "$OUT/bench_${P}_t${T}_$S.json" 2>/dev/null
}

if [ "${PHASE:-convert}" = convert ]; then
  export DISTILLED_SOURCES="smollm2-selfdistill, smollm2-selfdistill-math" DQ_TIMEOUT=1 BENCH_TIMEOUT=1
  STEPS=${STEPS:-1000} CONVERT_TIMEOUT=${CONVERT_TIMEOUT:-420} OUT=$OUT bash scripts/gpu/session10_convert.sh > "$OUT/convert.log" 2>&1
  grep -E "step|loss" "$OUT/convert.log" | tail -3
  [ -d $MODEL ] || { echo "NO CHECKPOINT"; exit 3; }
  bench gsm8k 0.9 plain ar-trust,diffusion-trust
  bench gsm8k 0.9 anchored diffusion-trust
  bench gsm8k 0.9 anchored-forced diffusion-trust FLARECTL_DT_ANCHORED_FORCE_FIRST=1
else
  THRESHOLDS=${THRESHOLDS:-0.8 0.7}
  for T in $THRESHOLDS; do for S in plain anchored; do bench gsm8k "$T" $S diffusion-trust; done; done
  bench humaneval 0.9 anchored ar-trust,diffusion-trust
  bench humaneval 0.9 plain diffusion-trust
  TS="0.9 $THRESHOLDS"
  timeout "${DQ_SWEEP_TIMEOUT:-200}" python3 scripts/decode_quality.py --model $MODEL \
    --out "$OUT/decode_quality.json" --max-new-tokens 96 --code 8 --chat 8 --thresholds "${TS// /,}" \
    --diffusion-schemes plain,anchored 2>&1 | tail -14
fi
