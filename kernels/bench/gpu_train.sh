#!/bin/bash
# One device run (device tool, carry [".whl", ".gpucache"]): optional kernel GPU tests, optional `flarectl bench kernels`,
# then `flarectl bench train` with the given options.
#   [GPU_TESTS=1] [KERNEL_BENCH="--T 8192 --repeats 10"] bash kernels/bench/gpu_train.sh [bench-train options]
#   (SKIP_TRAIN=1 skips the training benchmark.) On a fresh machine (cold Triton cache) the Hopper gradient
#   self-check autotunes fla's kernels first: ~3 minutes before the first benchmark line; allow for it.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
[ -e flarectl/recipes ] || ln -s ../recipes flarectl/recipes  # the package-dir mapping of pyproject.toml
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/triton_cache
# fla's autotune results from an earlier run (carry ".gpucache" too): saves minutes of autotuning on a fresh machine
[ -f .gpucache/triton_autotune.tgz ] && tar -xzf .gpucache/triton_autotune.tgz -C /tmp/triton_cache && echo "restored autotune cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, accelerate, typer, rich, safetensors, yaml, matplotlib, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'accelerate', accelerate.__version__, 'transformers', t.__version__)" 2>&1 | tee -a "$OUT/device.txt"
if [ -n "$GPU_TESTS" ]; then
  mkdir -p "$OUT/g"
  FLARE_KERNEL_TEST_LOG="$OUT/g/test_errors.jsonl" timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q --tb=short -m gpu \
    ${TEST_K:+-k "$TEST_K"} tests/test_kernels.py 2>&1 | tee "$OUT/g/pytest_gpu.log" | tail -30
fi
if [ -n "$KERNEL_BENCH" ]; then
  mkdir -p "$OUT/k"
  timeout ${KERNEL_TIMEOUT:-300} python3 -m flarectl.cli bench kernels --out "$OUT/k" $KERNEL_BENCH 2>&1 | tee "$OUT/k/kernels_bench.log"
fi
if [ -z "$SKIP_TRAIN" ]; then
  mkdir -p "$OUT/t"
  timeout ${TRAIN_TIMEOUT:-540} python3 -m flarectl.cli bench train --out "$OUT/t" "$@" 2>&1 | tee "$OUT/t/train_bench.log"
  [ -n "$NO_TRAIN_PNG" ] && rm -f "$OUT/t/training.png"
fi
(cd /tmp/triton_cache && find . -name "*.autotune.json" | tar -czf "$OUT/triton_autotune.tgz" -T -)
true
