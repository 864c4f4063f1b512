#!/bin/bash
# One device run for the Triton chunk-window kernels: sweep (accuracy at T=8192 + launch configs), then the GPU
# tests of the window variants. Carry [".whl"] (and ".gpucache" if present: Triton's cache with fla's autotune
# results from an earlier run, which saves minutes of autotuning).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/triton_cache
[ -f .gpucache/triton_autotune.tgz ] && tar -xzf .gpucache/triton_autotune.tgz -C /tmp/triton_cache && echo "restored autotune cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout ${SWEEP_TIMEOUT:-300} python3 -m flare_kernels.bench.chunk_triton_sweep --out "$OUT" ${SWEEP_ARGS} 2>&1 | tee "$OUT/sweep.log"
FLARE_KERNEL_TEST_LOG="$OUT/test_errors.jsonl" timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q --tb=short -m gpu \
  -k "${TEST_K:-variants and triton}" tests/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30
# keep fla's autotune results (small json files) for the next run
(cd /tmp/triton_cache && find . -name "*.autotune.json" | tar -czf "$OUT/triton_autotune.tgz" -T -) && ls -la "$OUT/triton_autotune.tgz"
