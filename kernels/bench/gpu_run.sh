#!/bin/bash
# One device run: install fla wheels, Hopper self-check, GPU tests (errors logged), benchmark.
# Usage (device tool, carry [".whl", ".gpucache"]): bash kernels/bench/gpu_run.sh [tests|bench|sweep|all]
# sweep: fused fwd+bwd latency and peak memory vs the chunk-group size of the window map (FLARE_WINDOW_GROUP_MB).
set -o pipefail
WHAT=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/triton_cache
# fla's autotune results from an earlier run (carry ".gpucache"): saves minutes of autotuning on a fresh machine
[ -f .gpucache/triton_autotune.tgz ] && tar -xzf .gpucache/triton_autotune.tgz -C /tmp/triton_cache && echo "restored autotune cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
[ -z "$SKIP_SELFCHECK" ] && python3 -c "
import torch, flare_kernels.two_stream.fused as f
print('guard active:', f._guard_active('cuda'))
print(f.hopper_self_check('cuda', verbose=True)[0])
print('mode', f.dqkwg_mode('cuda'))" 2>&1 | tee "$OUT/selfcheck.log"
if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
  FLARE_KERNEL_TEST_LOG="$OUT/test_errors.jsonl" timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q --tb=short -m gpu \
    ${TEST_K:+-k "$TEST_K"} tests/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -60
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
  FLARE_BENCH_PARTIAL="$OUT/bench_partial.jsonl" timeout ${BENCH_TIMEOUT:-240} python3 -m flare_kernels.bench.bench_kernels --out "$OUT" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log"
fi
if [ "$WHAT" = sweep ] || [ "$WHAT" = all ]; then
  timeout ${SWEEP_TIMEOUT:-300} python3 - <<'PY' 2>&1 | tee "$OUT/group_sweep.log"
import json, os, time
import flare_kernels.two_stream.chunk_windows as cw
from flare_kernels.bench.bench_kernels import bench_one
from flare_kernels.two_stream.fused import dqkwg_mode
t0 = time.time()
print("dqkwg mode", dqkwg_mode("cuda"), f"({time.time() - t0:.0f}s)", flush=True)
rows = []
cases = [("fused-loop", 64, "0"), ("fused", 64, "0"), ("fused", 256, "0"), ("fused", 16, "0"), ("fused", 64, "1")]
for variant, mb, comp in cases:
    cw.GROUP_BYTES = mb << 20
    os.environ["FLARE_WINDOW_COMPILE"] = comp
    for B in (1, 4):
        try:
            r = bench_one(variant, 8192, B, repeats=10, log=lambda s: None)
        except Exception as e:  # noqa: BLE001
            print(f"{variant} group {mb} compile={comp} B={B}: FAILED {e!r}"[:300], flush=True)
            continue
        r.update(group_mb=mb, compiled=comp == "1")
        rows.append(r)
        print(f"{variant:10s} group {mb:4d} MiB compile={comp} T=8192 B={B}: fwd {r['fwd_ms']:.2f} ms  fwd+bwd "
              f"{r['fwd_bwd_ms']:.2f} ms  peak fwd {r['peak_fwd_gib']:.3f} fwd+bwd {r['peak_fwd_bwd_gib']:.3f} GiB "
              f"({time.time() - t0:.0f}s)", flush=True)
json.dump(rows, open(os.environ.get("OUT", "/tmp/out") + "/group_sweep.json", "w"), indent=1)
# where the time goes: one fused fwd+bwd at T=8192, B=4 under torch.profiler
import torch
from flare_kernels.bench.bench_kernels import _call, _inputs
cw.GROUP_BYTES, os.environ["FLARE_WINDOW_COMPILE"] = 64 << 20, "0"
P = _inputs(8192, 4, 16, 128, torch.bfloat16, torch.device("cuda"))
for _ in range(2):
    outs = _call("fused", P)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    outs = _call("fused", P)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.cuda.synchronize()
tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
open(os.environ.get("OUT", "/tmp/out") + "/profile_fused_b4.txt", "w").write(tab)
print(tab[-6000:])
PY
fi
(cd /tmp/triton_cache && find . -name "*.autotune.json" | tar -czf "$OUT/triton_autotune.tgz" -T -)
