#!/bin/bash
# Issue 6, session 25 (device tool, carry [".whl", ".engine_carry"]): the one-pass greedy read-out
# (flarectl/engine/argmax.py, modes.GREEDY_READ) and the overlapped AR loop (Engine(overlap=True)) — their GPU tests,
# then the serving loop's cost beyond the graphed forward per mode with each change off and on
# (scripts/gpu/engine_loop_changes.py). Logs in $OUT/session25.tgz.
#   TEST_TIMEOUT (150), READ_TIMEOUT (380), READ_ARGS (extra arguments of engine_loop_changes.py)
source scripts/gpu/engine_setup.sh
L=/tmp/s25; mkdir -p $L
pack() { tar czf "$OUT/session25.tgz" -C /tmp s25; }
{
s=$(date +%s)
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_argmax.py tests/test_engine.py -k "argmax or greedy_read or overlap" > "$L/gpu_tests.log" 2>&1
echo "== GPU tests rc $? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$L/gpu_tests.log" | tail -8
pack
s=$(date +%s)
timeout "${READ_TIMEOUT:-380}" python3 scripts/gpu/engine_loop_changes.py --out $L/loop ${READ_ARGS:-} 2>&1 \
  | grep -v "^USDT" > "$L/loop_changes.log"
echo "== loop changes $(( $(date +%s) - s )) s"; tail -12 "$L/loop_changes.log"
save_compile_cache
} 2>&1 | tee "$OUT/summary.log"
cp "$OUT/engine_env.log" $L/ 2>/dev/null; pack
