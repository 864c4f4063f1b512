"""The fused norm projection (``norm_gemv``) against the plain skinny GEMM (``gemv``) it replaces, one GEMM at a
time, L2-cold (``gemv.cold_ms``), at the Qwen3.5-2B shapes of the AR step at C=8 (issue 6, session 7). For each
shape and config: plain gemv, norm without residual, norm with residual (+ glu where the shape is gate|up).

    python3 scripts/gpu/engine_norm_gemv_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json

import torch

from flarectl.engine import gemv, norm_gemv

SHAPES = {"gdn_in": (8, 8256, 2048, False), "attn_qkv": (8, 5120, 2048, False), "gate_up": (8, 12288, 2048, True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows, res = [], {}
    for name, (M, N, K, glu) in SHAPES.items():
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        r = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
        mb = w.numel() * 2 / 1e6
        cub = gemv.cold_ms(lambda: torch.nn.functional.linear(x, w), dev, a.repeats)
        for cfg in gemv.candidates(M, N, K, dev):
            t_plain = gemv.cold_ms(lambda: gemv.launch(x, w, cfg), dev, a.repeats)  # noqa: B023
            t_norm = gemv.cold_ms(lambda: norm_gemv.launch(x, None, w, 1e-6, False, cfg), dev, a.repeats)  # noqa: B023
            t_add = gemv.cold_ms(lambda: norm_gemv.launch(x, r, w, 1e-6, glu, cfg), dev, a.repeats)  # noqa: B023
            rows.append((name, mb, cfg, cub, t_plain, t_norm, t_add))
            res.setdefault(name, []).append(dict(config=str(cfg), cublas_us=cub * 1e3, plain_us=t_plain * 1e3,
                                                 norm_us=t_norm * 1e3, norm_add_glu_us=t_add * 1e3))
    print("\n| shape | MB | config | cuBLAS us | gemv us | norm us | norm+add(+glu) us |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, mb, cfg, cub, p, n, ad in rows:
        print(f"| {name} | {mb:.1f} | {cfg.bn}/{cfg.bk}/{cfg.split} w{cfg.warps} s{cfg.stages} | {cub*1e3:.1f} | "
              f"{p*1e3:.1f} | {n*1e3:.1f} | {ad*1e3:.1f} |")
    if a.out:
        open(a.out, "w").write(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
