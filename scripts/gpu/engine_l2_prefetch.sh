#!/bin/bash
# Issue 6, session 6: L2 weight prefetch on a side stream — microbenchmark, chain, engine step and serving, one
# process (scripts/gpu/engine_l2_prefetch.py). From the repository root with OUT set; device tool carry
# [".whl", ".engine_carry"].   BENCH_TIMEOUT (400) SKIP (--skip) CHAIN_SET (1) ENGINE (--engine variants)
#   ETEST_TIMEOUT (0: skip)
source scripts/gpu/engine_setup.sh
set -o pipefail
timeout "${BENCH_TIMEOUT:-400}" python3 scripts/gpu/engine_l2_prefetch.py --out "$OUT" --skip "${SKIP:-}" \
  --chain-set "${CHAIN_SET:-1}" \
  ${ENGINE:+--engine "$ENGINE"} 2>&1 | grep -v "^USDT" | tee "$OUT/engine_l2_prefetch.log"
if [ "${ETEST_TIMEOUT:-0}" != 0 ]; then
  timeout "$ETEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_kernels.py \
    -k "cuda or gpu" 2>&1 | tail -30 | tee "$OUT/engine_gpu_pytest.log"
fi
