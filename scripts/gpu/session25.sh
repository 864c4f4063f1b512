#!/bin/bash
# Issue 6, session 25 (device tool, carry [".whl", ".engine_carry"]): the one-pass greedy read-out
# (flarectl/engine/argmax.py, modes.GREEDY_READ) — its GPU tests, then the serving loop's cost beyond the graphed
# forward per mode with the read-out off and on (scripts/gpu/engine_greedy_read.py). Logs in $OUT/session25.tgz.
#   TEST_TIMEOUT (150), READ_TIMEOUT (380), READ_ARGS (extra arguments of engine_greedy_read.py)
source scripts/gpu/engine_setup.sh
L=/tmp/s25; mkdir -p $L
pack() { tar czf "$OUT/session25.tgz" -C /tmp s25; }
{
s=$(date +%s)
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_argmax.py > "$L/gpu_tests.log" 2>&1
echo "== GPU tests rc $? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$L/gpu_tests.log" | tail -8
pack
s=$(date +%s)
timeout "${READ_TIMEOUT:-380}" python3 scripts/gpu/engine_greedy_read.py --out $L/greedy ${READ_ARGS:-} 2>&1 \
  | grep -v "^USDT" > "$L/greedy_read.log"
echo "== greedy read $(( $(date +%s) - s )) s"; tail -12 "$L/greedy_read.log"
save_compile_cache
} 2>&1 | tee "$OUT/summary.log"
cp "$OUT/engine_env.log" $L/ 2>/dev/null; pack
