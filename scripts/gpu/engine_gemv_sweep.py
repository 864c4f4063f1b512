"""Issue 6, session 6: the skinny-GEMM kernel's launch configurations timed the way the step runs them — a CUDA graph
of 24 launches on 24 distinct weights (so every weight comes from HBM, as in a decode step), per-launch median —
against what the step does instead (cuBLAS; for the MLP down projection the compiled chain silu(gate) * up ->
cuBLAS -> residual add). Shapes: Qwen3.5-2B at C = 8 (M 8). Writes gemv_sweep.json under --out.

    python scripts/gpu/engine_gemv_sweep.py --out $OUT [--shapes down,gate_up,in_proj,out_proj]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"down": (2048, 6144, True), "gate_up": (12288, 2048, False), "in_proj": (8224, 2048, False),
          "out_proj": (2048, 2048, False)}
LAYERS = 24


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def chain_ms(fns, replays=20) -> float:
    """Per-launch ms of the callables ``fns`` run one after another in one CUDA graph (median over replays)."""
    from engine_session5 import graph_ms  # scripts/gpu is on sys.path when this script runs

    fns = list(fns)
    return graph_ms(lambda: [f() for f in fns], calls=1, replays=replays) / len(fns)


def main():
    from flarectl.engine import gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="down,gate_up,in_proj,out_proj")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    res = {}
    configs = [gemv.Config(bn, bk, sp, wp, st) for bn, bk, sp, wp, st in
               itertools.product((16, 32, 64, 128), (128, 256), (1, 2, 4, 8), (4, 8), (3,))]
    for name in a.shapes.split(","):
        N, K, swiglu = SHAPES[name]
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(LAYERS)]
        x = torch.randn(8, 2 * K if swiglu else K, device=dev, dtype=torch.bfloat16)
        r = torch.randn(8, N, device=dev, dtype=torch.bfloat16)
        gb = N * K * 2 / 1e9
        rows = []
        if swiglu:
            @torch.compile(dynamic=False)
            def chain(x, w, r):
                g, u = x.chunk(2, -1)
                return r + F.linear(F.silu(g) * u, w)

            for w in ws[:2]:
                chain(x, w, r)
            base = chain_ms([lambda w=w: chain(x, w, r) for w in ws])
            base_name = "compiled silu*up -> cuBLAS -> add"
        else:
            base = chain_ms([lambda w=w: F.linear(x, w) for w in ws])
            base_name = "cuBLAS"
        ref = gemv.skinny_linear_fused_reference(x, ws[0], r if swiglu else None, swiglu).float()
        for cfg in configs:
            if cfg.split > 1 and K // cfg.split < cfg.bk:
                continue
            try:
                if swiglu:
                    run = [lambda w=w: gemv.launch_fused(x, w, r, True, cfg) for w in ws]
                else:
                    run = [lambda w=w: gemv.launch_fused(x, w, None, False, cfg) for w in ws]
                y = run[0]().float()
                err = float((y - ref).norm() / ref.norm())
                ms = chain_ms(run)
            except Exception as exc:  # noqa: BLE001 - resources
                log(f"{name} {cfg}: {type(exc).__name__}")
                continue
            rows.append(dict(config=str(cfg), ms=ms, tbs=gb / ms, err=err))
        rows.sort(key=lambda r: r["ms"])
        res[name] = dict(N=N, K=K, baseline=base_name, baseline_ms=base, baseline_tbs=gb / base, best=rows[:8],
                         all=rows)
        log(f"{name}: N={N} K={K} {base_name} {base * 1e3:.1f} us ({gb / base:.2f} TB/s)")
        for row in rows[:6]:
            log(f"    {row['config']}: {row['ms'] * 1e3:.1f} us ({row['tbs']:.2f} TB/s) err {row['err']:.1e}")
        Path(a.out, "gemv_sweep.json").write_text(json.dumps(res, indent=1))
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
