#!/bin/bash
# Issue 6, session 5 (skinny-GEMM kernel, in-place-commit GDN recurrence): GPU tests of the engine's kernels, then
# scripts/gpu/engine_session5.py (GEMMs, graphed AR step variants, profile, serving), then optionally the CUDA
# engine tests. From the repository root with OUT set; device tool carry [".whl", ".engine_carry"].
#   KTEST_TIMEOUT (90) BENCH_TIMEOUT (270) ETEST_TIMEOUT (0: skip) SKIP (engine_session5.py --skip)
#   VARIANTS, PROFILE (engine_session5.py --variants / --profile; session 7: VARIANTS=both,mixer,both2,mixer2
#   PROFILE=both,mixer)
source scripts/gpu/engine_setup.sh
set -o pipefail
if [ "${KTEST_TIMEOUT:-90}" != 0 ]; then
  timeout "${KTEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_engine_kernels.py -k cuda 2>&1 \
    | tail -25 | tee "$OUT/engine_kernels_gpu_pytest.log"
fi
if [ "${BENCH_TIMEOUT:-270}" != 0 ]; then
  timeout "${BENCH_TIMEOUT:-270}" python3 scripts/gpu/engine_session5.py --out "$OUT" --skip "${SKIP:-}" \
    --variants "${VARIANTS:-before,gemv,triton-rec,both}" --profile "${PROFILE:-before,both}" 2>&1 \
    | grep -v "^USDT" | tee "$OUT/engine_session5.log" | grep -v "^    "
fi
if [ "${ETEST_TIMEOUT:-0}" != 0 ]; then
  timeout "$ETEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py ${ETEST_FILES:-} -k cuda 2>&1 \
    | tail -30 | tee "$OUT/engine_gpu_pytest.log"
fi
