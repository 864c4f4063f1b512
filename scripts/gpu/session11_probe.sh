#!/bin/bash
# Session 11, device call 1 (issue 6), carry [".whl", ".engine_carry", ".xfer/p1"]: stage the GGUF's first half for the
# conversion call that follows on the same machine; the attention kernel's launch choices (tokens per program, slots
# per step, warps, splits) at the three step shapes; the CLI step cost with the fastest trust-step attention setting
# (and the session-10 converted checkpoint's tokens/forward); the skinny GEMM's wider grid at 64 rows vs cuBLAS.
source scripts/gpu/engine_setup.sh
mkdir -p /tmp/gcache && cp .xfer/p1/* /tmp/gcache/ 2>/dev/null
timeout "${ATTN_TIMEOUT:-130}" python3 scripts/gpu/engine_attention_sweep.py --out "$OUT" 2>&1 | grep -v "^USDT" \
  > "$OUT/attention_sweep.log"; tail -24 "$OUT/attention_sweep.log"
eval "$(python3 - "$OUT/attention_sweep.json" <<'PY'
import json, sys
try:
    rows = [r for r in json.load(open(sys.argv[1])) if r["step"] == "trust" and "us" in r and r["splits"] is None]
    b = min(rows, key=lambda r: r["us"])
    print(f"export FLARECTL_ATTN_TOKENS={b['tokens_per_program']} FLARECTL_ATTN_BLOCK_N={b['block_n']} "
          f"FLARECTL_ATTN_WARPS={b['num_warps']}")
except Exception as e:
    print(f"echo no attention pick: {e}")
PY
)"
env | grep FLARECTL_ATTN | tee "$OUT/attention_pick.env"
timeout "${STEP_TIMEOUT:-170}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init --step-cost \
  --concurrency 8 --gdn-kernel mixer --tpf-from docs/perf/engine_session10/gpu/convert/bench_conv.json --out "$OUT/step" \
  2>&1 | grep -v "^USDT" | tee "$OUT/engine_step_cost.log" | tail -30
unset FLARECTL_ATTN_TOKENS FLARECTL_ATTN_BLOCK_N FLARECTL_ATTN_WARPS
timeout "${GEMV_TIMEOUT:-200}" python3 scripts/gpu/engine_gemv_wide_sweep.py --out "$OUT" 2>&1 | grep -v "^USDT" \
  > "$OUT/gemv_wide_sweep.log"; tail -8 "$OUT/gemv_wide_sweep.log"
