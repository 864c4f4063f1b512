"""The skinny GEMM at trust-step widths (32 and 64 rows) on one GPU: a wider configuration grid than ``gemv.candidates``
against cuBLAS, per Qwen3.5-2B projection, timed as the tuner times them (``gemv.chain_ms``: back to back in one CUDA
graph over copies of the weight, so each launch reads it from HBM). Every configuration's output is checked against
the fp32 twin. Writes ``gemv_wide_sweep.json``; prints a table last (best kernel config vs cuBLAS, us and TB/s).

    python3 scripts/gpu/engine_gemv_wide_sweep.py --out $OUT [--rows 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from flarectl.engine import gemv

SHAPES = {"gate_up": (12288, 2048), "in_proj": (8224, 2048), "attn_qkv": (5120, 2048), "out_proj": (2048, 2048),
          "down": (2048, 6144)}


def grid(M: int, N: int, K: int):
    seen = set(gemv.candidates(M, N, K, torch.device("cuda")))
    out = list(seen)
    for bn, bk, warps, stages in itertools.product((32, 64, 128, 256), (64, 128, 256), (4, 8), (3, 4)):
        if bn * bk > 128 * 256 or (bn == 256 and warps == 4):
            continue
        for split in (1, 2, 4):
            if K // split < 2 * bk:
                continue
            c = gemv.Config(bn, bk, split, warps, stages)
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--rows", default="64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for M in (int(r) for r in args.rows.split(",")):
        for name in args.shapes.split(","):
            N, K = SHAPES[name]
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
            w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
            want = gemv.skinny_linear_reference(x.float(), w.float())
            mb = N * K * 2 / 1e6
            cub = gemv.chain_ms(lambda wi: F.linear(x, wi), w)  # noqa: B023
            rows = []
            for c in grid(M, N, K):
                try:
                    got = gemv.launch(x, w, c).float()
                    err = (got - want).abs().max().item()
                    ms = gemv.chain_ms(lambda wi: gemv.launch(x, wi, c), w)  # noqa: B023
                except Exception:  # noqa: BLE001 - does not fit (shared memory, registers): skip
                    continue
                rows.append(dict(cfg=c.__dict__, us=1000 * ms, max_err=err))
            rows.sort(key=lambda r: r["us"])
            tuned = {gemv.Config(**r["cfg"]) for r in rows} & set(gemv.candidates(M, N, K, torch.device("cuda")))
            best_tuned = min((r for r in rows if gemv.Config(**r["cfg"]) in tuned), key=lambda r: r["us"], default=None)
            results.append(dict(rows=M, shape=name, N=N, K=K, mb=mb, cublas_us=1000 * cub, best=rows[:5],
                                best_of_candidates=best_tuned, configs=len(rows)))
            b = rows[0]
            print(f"M={M} {name}: cuBLAS {1000 * cub:.2f} us, best {b['us']:.2f} us {b['cfg']} err {b['max_err']:.1e}, "
                  f"best of today's candidates {best_tuned['us'] if best_tuned else float('nan'):.2f}", flush=True)
    (args.out / "gemv_wide_sweep.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'rows':>4s} {'shape':9s} {'MB':>6s} {'cuBLAS us':>10s} {'TB/s':>5s} {'today us':>9s} {'best us':>8s} "
          f"{'TB/s':>5s}  best config")
    for r in results:
        b = r["best"][0]
        t = r["best_of_candidates"]["us"] if r["best_of_candidates"] else float("nan")
        print(f"{r['rows']:4d} {r['shape']:9s} {r['mb']:6.1f} {r['cublas_us']:10.2f} {r['mb'] / r['cublas_us']:5.2f} "
              f"{t:9.2f} {b['us']:8.2f} {r['mb'] / b['us']:5.2f}  {b['cfg']}")


if __name__ == "__main__":
    main()
