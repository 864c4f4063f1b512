#!/bin/bash
# Issue 6, session 8: the engine's CUDA tests with the fused norm projections on (three pytest processes side by
# side: inductor compiles on the CPU), then graphed AR step variants with the skinny-GEMM configurations tuned in a
# graphed chain vs L2-cold (scripts/gpu/engine_session5.py). From the repository root with OUT set; device tool
# carry [".whl", ".engine_carry"]. TEST_TIMEOUT (280), STEP_TIMEOUT (260), VARIANTS (cold,chain,chain2).
source scripts/gpu/engine_setup.sh
set -o pipefail
if [ "${TEST_TIMEOUT:-280}" != 0 ]; then
  t() { timeout "${TEST_TIMEOUT:-280}" python3 -m pytest -q -p no:cacheprovider "$@" -rA 2>&1 \
          | grep -E "PASSED|FAILED|ERROR|passed|failed|error|assert" | tail -25; }
  FLARECTL_ENGINE_FUSE_NORM=1 FLARECTL_GEMV_TUNE=0 t tests/test_engine.py -k "cuda and (torch or fla)" \
    > "$OUT/engine_gpu_pytest_fuse_norm_1.log" &
  FLARECTL_ENGINE_FUSE_NORM=1 FLARECTL_GEMV_TUNE=0 t tests/test_engine.py -k "cuda and not (torch or fla)" \
    > "$OUT/engine_gpu_pytest_fuse_norm_2.log" &
  t tests/test_engine_kernels.py -k "chain_tuning or kernel_on_cuda_matches_twin or norm_kernel_on_cuda" \
    > "$OUT/engine_kernels_gpu_pytest.log" &
  wait
  tail -n 4 "$OUT"/engine_gpu_pytest_fuse_norm_1.log "$OUT"/engine_gpu_pytest_fuse_norm_2.log \
    "$OUT"/engine_kernels_gpu_pytest.log
fi
if [ "${STEP_TIMEOUT:-260}" != 0 ]; then
  timeout "${STEP_TIMEOUT:-260}" python3 scripts/gpu/engine_session5.py --out "$OUT" \
    --skip "${SKIP:-gemm,serving,profile}" --variants "${VARIANTS:-cold,chain,chain2}" \
    2>&1 | grep -v "^USDT" | tee "$OUT/engine_session5.log" | grep -v "^    "
fi
