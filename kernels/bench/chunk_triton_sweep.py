"""GPU check and launch-config sweep of the Triton chunk-window kernels (``_window="chunk-triton"``) at the
benchmark size, against the torch chunk map in the same process.

1. Accuracy at T=8192: outputs and every gradient of ``fused-chunk-triton`` and ``fused`` (bf16 torch map) vs
   ``fused-f32`` (the torch map with fp32 operands), relative RMS.
2. Latency / peak memory (``bench_one``) of clean, fused and fused-chunk-triton under several (BV, warps) configs.

    python -m flare_kernels.bench.chunk_triton_sweep --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from flare_kernels.bench.bench_kernels import _call, _inputs, bench_one
from flare_kernels.two_stream import triton_chunk_windows as tcw
from flare_kernels.two_stream import triton_chunk_windows_bwd as tcwb

GRADS = ("q", "k", "v", "g", "beta", "qn", "kn", "vn", "gn", "betan")


def _outputs_and_grads(variant, P, seed=1):
    for t in P.values():
        if isinstance(t, torch.Tensor) and t.grad is not None:
            t.grad = None
    outs = _call(variant, P)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    gs = [torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=gen) for o in outs]
    torch.autograd.backward(outs, gs)
    res = {"o": outs[0].detach().float(), "on": outs[1].detach().float()}
    res.update({f"d{n}": P[n].grad.detach().float().clone() for n in GRADS})
    return res


def _rel(a, b):
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def accuracy(T, B):
    P = _inputs(T, B, 16, 128, torch.bfloat16, torch.device("cuda"))
    ref = _outputs_and_grads("fused-f32", P)
    rows = {}
    for v in ("fused", "fused-chunk-triton"):
        got = _outputs_and_grads(v, P)
        rows[v] = {n: _rel(got[n], ref[n]) for n in ref}
        rows[v]["nan"] = any(not torch.isfinite(x).all() for x in got.values())
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--B", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--fwd-configs", default="64/8,32/8,64/4", help="BV/warps,... of the forward kernel")
    ap.add_argument("--bwd-configs", default="s64/8:64/8,s128/8:64/8,s64/8:32/8,128/8",
                    help="backward configs: BV/warps (one kernel) or sBV/warps:BK/warps (two kernels: values, keys)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one fwd+bwd per B (first "
                    "configs)")
    a = ap.parse_args()
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:5.0f}s] {s}", flush=True)  # noqa: E731
    result = dict(accuracy={}, timing=[])
    for B in [] if a.skip_accuracy else a.B:
        try:
            acc = accuracy(a.T, B)
        except Exception as e:  # noqa: BLE001
            log(f"accuracy B={B} FAILED {e!r}"[:400])
            continue
        result["accuracy"][B] = acc
        for v, errs in acc.items():
            log(f"accuracy T={a.T} B={B} {v:20s} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    json.dump(result, open(f"{a.out}/chunk_triton_sweep.json", "w"), indent=1)
    parse = lambda spec: [tuple(int(x) for x in c.split("/")) for c in spec.split(",")]  # noqa: E731
    fwd_cfgs, bwd_cfgs = parse(a.fwd_configs), a.bwd_configs.split(",")
    for B in a.B:
        for v in ("clean", "fused"):
            r = bench_one(v, a.T, B, repeats=a.repeats, log=lambda s: None)
            result["timing"].append(r)
            log(f"{v:28s} B={B}: fwd {r['fwd_ms']:.2f} fwd+bwd {r['fwd_bwd_ms']:.2f} ms peak "
                f"{r['peak_fwd_bwd_gib']:.2f} GiB")
        cfgs = [(f, bwd_cfgs[0]) for f in fwd_cfgs] + [(fwd_cfgs[0], b) for b in bwd_cfgs[1:]]
        for fc, bc in cfgs:
            tcw.FWD_CONFIG.update(BV=fc[0], num_warps=fc[1])
            set_bwd_config(bc)
            name = f"chunk-triton f{fc[0]}/{fc[1]} b{bc}"
            try:
                r = bench_one("fused-chunk-triton", a.T, B, repeats=a.repeats, log=lambda s: None)
            except Exception as e:  # noqa: BLE001
                log(f"{name} B={B}: FAILED {e!r}"[:300])
                continue
            r.update(fwd_config=fc, bwd_config=bc)
            result["timing"].append(r)
            log(f"{name:28s} B={B}: fwd {r['fwd_ms']:.2f} fwd+bwd {r['fwd_bwd_ms']:.2f} ms peak "
                f"{r['peak_fwd_bwd_gib']:.2f} GiB")
            json.dump(result, open(f"{a.out}/chunk_triton_sweep.json", "w"), indent=1)
    if a.profile:
        tcw.FWD_CONFIG.update(BV=fwd_cfgs[0][0], num_warps=fwd_cfgs[0][1])
        set_bwd_config(bwd_cfgs[0])
        for B in a.B:
            table = profile_fwd_bwd("fused-chunk-triton", a.T, B)
            open(f"{a.out}/profile_chunk_triton_B{B}.txt", "w").write(table)
            print(table[-5000:], flush=True)


def set_bwd_config(spec):
    """"BV/warps": the one-kernel backward; "sBV/warps:BK/warps": the two-kernel one (values, keys)."""
    if spec.startswith("s"):
        (bv, vw), (bk, kw) = [tuple(int(x) for x in p.split("/")) for p in spec[1:].split(":")]
        tcw.BWD_SPLIT = True
        tcwb.VALUES_CONFIG.update(BV=bv, num_warps=vw)
        tcwb.KEYS_CONFIG.update(BK=bk, num_warps=kw)
    else:
        bv, w = (int(x) for x in spec.split("/"))
        tcw.BWD_SPLIT = False
        tcw.BWD_CONFIG.update(BV=bv, num_warps=w)


def profile_fwd_bwd(variant, T, B):
    """torch.profiler table (CUDA time) of one forward+backward after two warm-ups."""
    P = _inputs(T, B, 16, 128, torch.bfloat16, torch.device("cuda"))
    for i in range(3):
        if i == 2:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        outs = _call(variant, P)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)


if __name__ == "__main__":
    main()
