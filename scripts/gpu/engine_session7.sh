#!/bin/bash
# Issue 6, session 7: the fused norm projections (flarectl/engine/norm_gemv.py) on one GPU. From the repository root
# with OUT set; device tool carry [".whl", ".engine_carry"]. Each part has its own timeout (0: skip):
#   KTEST_TIMEOUT (100)  the kernel's GPU tests against its twin
#   ACC_TIMEOUT (170)    bf16 accuracy of the served step with and without it against an fp32 reference
#   STEP_TIMEOUT (260)   graphed AR step variants in one process + profile (engine_session5.py)
#   VARIANTS (nonorm,norm,nonorm2,norm2), PROFILE (norm), PROFILE_TOP (40)
source scripts/gpu/engine_setup.sh
set -o pipefail
if [ "${KTEST_TIMEOUT:-100}" != 0 ]; then
  timeout "${KTEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider tests/test_engine_kernels.py \
    -k "${KTEST_K:-norm_kernel_on_cuda}" -rA 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|error|assert" \
    | tail -25 | tee "$OUT/engine_kernels_gpu_pytest.log"
fi
if [ "${ACC_TIMEOUT:-170}" != 0 ]; then
  timeout "${ACC_TIMEOUT:-170}" python3 scripts/gpu/engine_mixer_accuracy.py --variants "${ACC_VARIANTS:-nonorm,norm}" \
    --out "$OUT/norm_accuracy.json" 2>&1 | grep -v "^USDT" | tee "$OUT/norm_accuracy.log"
fi
if [ "${STEP_TIMEOUT:-260}" != 0 ]; then
  PROFILE_TOP=${PROFILE_TOP:-40} timeout "${STEP_TIMEOUT:-260}" python3 scripts/gpu/engine_session5.py --out "$OUT" \
    --skip "${SKIP:-gemm,serving}" --variants "${VARIANTS:-nonorm,norm,nonorm2,norm2}" --profile "${PROFILE:-norm}" \
    2>&1 | grep -v "^USDT" | tee "$OUT/engine_session5.log" | grep -v "^    "
fi
