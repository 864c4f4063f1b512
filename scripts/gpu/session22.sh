#!/bin/bash
# Issue 6, session 22 (device tool, carry [".whl", ".engine_carry"]): the CLI step cost (AR / trust / window, C=8,
# Qwen3.5-2B shape, random weights) per variant, each in its own process on the same machine, ROUNDS times with the
# variants alternating; then a table of medians per variant (step_cost_table.py).
#   VARIANTS="base cap=FLARECTL_MIXER_MAXNREG=128 l2=FLARECTL_MIXER_L2_NEXT_KB=8192,FLARECTL_MIXER_L2_AT=end ..."
#     (label=ENV[,ENV...]; a bare label runs the defaults)
#   TEST_K: GPU tests of tests/test_engine_kernels.py to run after (TEST_TIMEOUT s; 1 skips them)
#   MIXER_SWEEP: engine_mixer_sweep.py's arguments (the mixer alone; token block 0 = chunk form)
#   BREAKDOWN=1: per kernel class and the top kernels of the AR step (engine_step_breakdown.py --steps ar)
# Logs and JSON in $OUT/session22.tgz (packed after every part), $OUT/summary.log.
source scripts/gpu/engine_setup.sh
L=/tmp/s22; mkdir -p $L
pack() { tar czf "$OUT/session22.tgz" -C /tmp s22; }
step() { run_step_cost "$1" "$L" "${@:2}"; pack; }  # $1: label, then env assignments for that run
{
for r in $(seq 1 "${ROUNDS:-1}"); do
  for v in ${VARIANTS:-base}; do
    label=${v%%=*}; envs=""; [ "$label" != "$v" ] && envs=${v#*=}
    step "$label$r" ${envs//,/ }
  done
done
python3 scripts/gpu/step_cost_table.py $L/*_step_cost_mixer.json | tee $L/step_cost_table.txt
if [ -n "${MIXER_SWEEP:-}" ]; then
  s=$(date +%s)
  timeout "${MIXER_TIMEOUT:-120}" python3 scripts/gpu/engine_mixer_sweep.py --out $L/mixer $MIXER_SWEEP 2>&1 \
    | grep -v "^USDT" > "$L/mixer_sweep.log"
  echo "== mixer sweep $(( $(date +%s) - s )) s"; sed -n '/^all/,$p' "$L/mixer_sweep.log"; pack
fi
if [ "${TEST_TIMEOUT:-200}" -gt 1 ]; then
  s=$(date +%s)
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_engine_kernels.py \
    -k "${TEST_K:-mixer_kernel_on_cuda}" > "$L/gpu_tests.log" 2>&1
  echo "== GPU tests rc $? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$L/gpu_tests.log" | tail -12
  pack
fi
if [ "${BREAKDOWN:-0}" = 1 ]; then
  s=$(date +%s)
  timeout "${BREAKDOWN_TIMEOUT:-150}" python3 scripts/gpu/engine_step_breakdown.py --model qwen3.5-2b --steps ar \
    --out $L 2>&1 | grep -v "^USDT" > "$L/step_breakdown.log"
  echo "== breakdown $(( $(date +%s) - s )) s"; tail -6 "$L/step_breakdown.log"; pack
fi
cat $L/step_cost_table.txt
} 2>&1 | tee "$OUT/summary.log"
cp "$OUT/engine_env.log" $L/ 2>/dev/null; pack
