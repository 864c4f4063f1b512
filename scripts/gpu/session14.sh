#!/bin/bash
# Issue 6, session 14 (device tool, carry [".whl", ".engine_carry"]): first the persistent-chain probe
# (scripts/gpu/engine_persistent_chain.py: one launch per layer with grid barriers + L2 prefetch, against the
# engine's launch chain; PROBE_TIMEOUT s), then session 13's PDL-depth step costs (scripts/gpu/session13_one.sh,
# STEP_VARIANTS default here "off pre32").
source scripts/gpu/engine_setup.sh
timeout "${PROBE_TIMEOUT:-240}" python3 scripts/gpu/engine_persistent_chain.py --out "$OUT" > "$OUT/persistent_chain.log" 2>&1
echo "probe rc $?"; grep -v "^\[" "$OUT/persistent_chain.log" | tail -30; grep -E "launch chain|plain chain|Error|copy" "$OUT/persistent_chain.log" | head
[ "${PROBE_ONLY:-0}" = 1 ] && exit 0
STEP_VARIANTS=${STEP_VARIANTS:-off pre32} DEPTH_TIMEOUT=0 bash scripts/gpu/session13_one.sh
