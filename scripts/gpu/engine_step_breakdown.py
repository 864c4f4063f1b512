"""Where an engine step's GPU time goes, per kernel class, for the AR, trust and window step shapes (issue 6).

    python3 scripts/gpu/engine_step_breakdown.py --model qwen3.5-2b --out $OUT [--concurrency 8] [--block-size 4]
        [--steps ar,trust,window]

Builds the engine's static backend the way ``flarectl bench --step-cost`` does (random weights, current defaults:
compiled, skinny kernels, fused norm, mixer and attention kernels), times each shape graphed (median of 30 replays
with their input copies, as the bench) and, ungraphed, sums the device time of every kernel of 5 steps under
torch.profiler into classes: ``norm_gemv`` (the fused norm projections), ``skinny`` (the plain GEMM kernels and their
split-K reduce), ``cublas`` (GEMMs through cuBLAS/CUTLASS), ``mixer`` (the GDN mixer kernel), ``attention`` (the
decode-attention kernel and the attention core's prologue), ``inductor`` (compiled elementwise / reduction kernels)
and ``other``. Which rows reach the skinny kernels is ``gemv.MAX_ROWS`` (env ``FLARECTL_GEMV_MAX_ROWS``, read at
import: run the script once per value to compare). Writes ``step_breakdown_<max_rows>.json`` and prints a table
last. Random weights: only times mean anything.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from flarectl.engine import bench, gemv, norm_gemv
from flarectl.engine.backends import SlotBackend
from flarectl.models.loading import load_model

CLASSES = [("cublas", ("gemm", "cutlass", "xmma", "splitk", "sm90_", "cublas", "gemv2", "gemvx")),
           ("norm_gemv", ("norm_gemv_kernel",)), ("skinny", ("gemv_kernel", "reduce_kernel")),
           ("mixer", ("mixer",)), ("attention", ("attn", "attention")),
           ("inductor", ("triton_",))]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_step(be, ids, counts, wlen, commit, wc, seen, steps: int = 5) -> dict:
    """Summed device us per kernel class (and kernel count) per step of the ungraphed (compiled) step."""
    from torch.profiler import ProfilerActivity, profile

    step = be.eager
    with torch.no_grad():
        for _ in range(2):
            step(ids, counts, wlen, commit, wc, seen=seen)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(ids, counts, wlen, commit, wc, seen=seen)
            torch.cuda.synchronize()
    us, n, top = defaultdict(float), defaultdict(int), defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            cls = kernel_class(ev.name)
            us[cls] += ev.device_time / steps
            n[cls] += 1
            top[ev.name[:90]] += ev.device_time / steps
    return {"us": dict(us), "kernels": {k: v // steps for k, v in n.items()},
            "top": sorted(top.items(), key=lambda kv: -kv[1])[:25]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3.5-2b")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", default="ar,trust,window", help="step shapes to time, comma-separated")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    model = load_model(args.model, random_init=True, device=dev)
    bw = bench.copy_bandwidth(dev)
    roof = 1000 * bench.weight_bytes(model) / bw
    c, b = args.concurrency, args.block_size
    be = SlotBackend(model, c, args.context + 2 * b + 4)
    be.cache.lengths.fill_(args.context)
    result = {"model": args.model, "max_rows": gemv.MAX_ROWS, "concurrency": c, "block_size": b,
              "roofline_ms": roof, "device": torch.cuda.get_device_name(dev), "steps": {}}
    shapes = {"ar": (1, 0), "trust": (b, b), "window": (0, b)}
    for kind in args.steps.split(","):
        wc, ww = shapes[kind]
        t0 = time.time()
        ids = torch.zeros(c, wc + ww, dtype=torch.long, device=dev)
        counts = torch.full((c,), wc, dtype=torch.long, device=dev)
        wlen = torch.full((c,), ww, dtype=torch.long, device=dev)
        commit = torch.zeros(c, dtype=torch.bool, device=dev)
        seen = counts - 1 if kind == "trust" else None
        with torch.no_grad():
            for _ in range(3):
                be.step(ids, counts, wlen, commit, wc, seen)
            torch.cuda.synchronize()
            times = []
            for _ in range(30):
                t = time.perf_counter()
                be.step(ids, counts, wlen, commit, wc, seen)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        ms = 1000 * sorted(times)[len(times) // 2]
        prof = profile_step(be, ids, counts, wlen, commit, wc, seen)
        result["steps"][kind] = {"rows": c * (wc + ww), "graphed_ms": ms, "x_roofline": ms / roof, **prof}
        print(f"[{time.strftime('%H:%M:%S')}] {kind}: {ms:.3f} ms ({time.time() - t0:.0f} s incl. warm-up)",
              flush=True)
    result["gemv_choices"] = {str(k): str(v) for k, v in gemv._CHOSEN.items()}
    result["norm_gemv_choices"] = {str(k): str(v) for k, v in norm_gemv._CHOSEN.items()}
    result["tuning_ms"] = {str(k): [(str(c), ms) for c, ms in v] for k, v in gemv.TIMINGS.items()}
    (out / f"step_breakdown_{gemv.MAX_ROWS}.json").write_text(json.dumps(result, indent=1, default=str))
    classes = ["norm_gemv", "skinny", "cublas", "mixer", "attention", "inductor", "other"]
    print(f"\nmax_rows={gemv.MAX_ROWS}  roofline {roof:.3f} ms  ({result['device']})")
    print(f"{'step':8} {'rows':>4} {'graphed ms':>10} {'x roof':>6} " + " ".join(f"{k:>9}" for k in classes)
          + "  (us of kernel time per step, ungraphed; kernel counts below)")
    for kind, s in result["steps"].items():
        print(f"{kind:8} {s['rows']:4d} {s['graphed_ms']:10.3f} {s['x_roofline']:6.2f} "
              + " ".join(f"{s['us'].get(k, 0):9.1f}" for k in classes))
        print(f"{'':8} {'':4} {'':10} {'':6} " + " ".join(f"{s['kernels'].get(k, 0):9d}" for k in classes))
    for kind, s in result["steps"].items():
        print(f"\n{kind}: top kernels (us per step, ungraphed)")
        for name, us in s["top"][:12]:
            print(f"  {us:8.1f}  {name}")


if __name__ == "__main__":
    main()
