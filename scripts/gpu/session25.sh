#!/bin/bash
# Issue 6, session 25 (device tool, carry [".whl", ".engine_carry"]): the one-pass greedy read-out
# (flarectl/engine/argmax.py, modes.GREEDY_READ), the overlapped AR loop and (session 26) the overlapped trust loop
# (Engine(overlap=True), flarectl/engine/trust_overlap.py) — their GPU tests,
# then the serving loop's cost beyond the graphed forward per mode with each change off and on
# (scripts/gpu/engine_loop_changes.py). Logs in $OUT/session25.tgz.
#   TEST_TIMEOUT (200: the trust overlap test compiles its decisions too), READ_TIMEOUT (330), READ_ARGS (extra
#   arguments of engine_loop_changes.py; default --rounds 1: four variants per trust mode since session 26)
#   PROJECTION=1: instead, the serving-loop projection of the trust modes: a CUDA serving bench of the 2B shape
#     (random weights; SERVE_ENV, e.g. "FLARECTL_GREEDY_READ=1") gives each mode's host time per step, then the step
#     cost with --tpf-from session 12's converted-model benches and --loop-from that serving bench (~2 x 200 s cold).
source scripts/gpu/engine_setup.sh
L=/tmp/s25; mkdir -p $L
pack() { tar czf "$OUT/session25.tgz" -C /tmp s25; }
if [ "${PROJECTION:-0}" = 1 ]; then
  C12=docs/perf/engine_session12/gpu/convert
  { s=$(date +%s)
    env ${SERVE_ENV:-} timeout "${SERVE_TIMEOUT:-260}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init \
      --mode ar-trust,diffusion-trust --concurrency 8 --num-requests 16 --max-new-tokens 128 --no-baseline \
      --out $L/serve 2>&1 | grep -v "^USDT" > $L/serve.log
    echo "== serving $(( $(date +%s) - s )) s"; grep -E "^│ (ar|diff)|rror" $L/serve.log | head -4; pack
    s=$(date +%s)
    env FLARECTL_ENGINE_PDL=0 timeout "${STEP_TIMEOUT:-240}" python3 -m flarectl.cli bench --model qwen3.5-2b \
      --random-init --step-cost --concurrency 8 --gdn-kernel mixer --tpf-from $C12/bench_gsm8k_t0.9_plain.json \
      --tpf-from $C12/bench_gsm8k_t0.9_anchored.json --tpf-from $C12/bench_humaneval_t0.9_anchored.json \
      --loop-from $L/serve/bench.json --out $L/projection 2>&1 | grep -v "^USDT" > $L/projection.log
    echo "== projection $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window|diff)|rror" $L/projection.log | head -16
  } 2>&1 | tee "$OUT/summary.log"
  cp "$OUT/engine_env.log" $L/ 2>/dev/null; pack
  exit 0
fi
{
s=$(date +%s)
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_argmax.py tests/test_engine.py tests/test_trust_overlap.py tests/test_row_copy.py -k "argmax or greedy_read or overlap or row_copy" > "$L/gpu_tests.log" 2>&1
echo "== GPU tests rc $? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$L/gpu_tests.log" | tail -8
pack
s=$(date +%s)
timeout "${READ_TIMEOUT:-330}" python3 scripts/gpu/engine_loop_changes.py --out $L/loop ${READ_ARGS:---rounds 1} 2>&1 \
  | grep -v "^USDT" > "$L/loop_changes.log"
echo "== loop changes $(( $(date +%s) - s )) s"; tail -12 "$L/loop_changes.log"
save_compile_cache
} 2>&1 | tee "$OUT/summary.log"
cp "$OUT/engine_env.log" $L/ 2>/dev/null; pack
