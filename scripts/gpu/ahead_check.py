"""Issue 6, session 13: the skinny kernels with the register look-ahead (``gemv.LOAD_AHEAD = 1``) on CUDA against
their twins — the plain and one-launch split-K GEMM, the fused one (SwiGLU prologue + residual), the fused norm
projection (+ residual, + SwiGLU) — at the Qwen3.5-2B AR-step shapes and odd ones, bf16 and fp32, NaN-filled
outputs, the same bits on a repeat. A quick stand-in for the engine kernels' GPU tests when a device call is short.

    python3 scripts/gpu/ahead_check.py   # prints one line per case and PASS / FAIL last; exit 1 on a failure
"""

from __future__ import annotations

import sys

import torch

from flarectl.engine import gemv, norm_gemv

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only under TRITON_INTERPRET=1 (a smoke run)


def close(y, ref, tol):
    y, ref = y.double(), ref.double()
    return (not y.isnan().any()) and float((y - ref).norm() / ref.norm().clamp_min(1e-30)) < tol


def main() -> int:
    gemv.LOAD_AHEAD, gemv.NAN_FILL = 1, True
    g = torch.Generator(device=DEV).manual_seed(0)
    fails = 0
    shapes = [(8, 8224, 2048), (8, 2048, 2048), (8, 12288, 2048), (8, 2048, 6144), (3, 513, 777), (24, 130, 300)]
    if DEV == "cpu":
        shapes = [(3, 66, 300), (8, 130, 257)]
    configs = [gemv.Config(64, 128, 1), gemv.Config(64, 256, 4, 4, 3)]  # one pass; split-K finished in-kernel
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        for M, N, K in shapes:
            x = torch.randn(M, 2 * K, device=DEV, generator=g).to(dtype)
            r = torch.randn(M, max(N, K), device=DEV, generator=g).to(dtype)
            w = (torch.randn(N, K, device=DEV, generator=g) / K ** 0.5).to(dtype)
            xk = x[:, :K].contiguous()
            for cfg in configs:
                cases = {
                    "gemv": (lambda: gemv.launch(xk, w, cfg), gemv.skinny_linear_reference(xk, w)),  # noqa: B023
                    "fused+swiglu+res": (lambda: gemv.launch_fused(x, w, r[:, :N].contiguous(), True, cfg),  # noqa: B023
                                         gemv.skinny_linear_fused_reference(x, w, r[:, :N].contiguous(), True)),
                    "norm+res": (lambda: norm_gemv.launch(xk, r[:, :K].contiguous(), w, 1e-6, False, cfg)[0],  # noqa: B023
                                 norm_gemv.norm_linear_reference(xk, r[:, :K].contiguous(), w, 1e-6, False)[0]),
                }
                if N % 2 == 0:
                    cases["norm+res+glu"] = (
                        lambda: norm_gemv.launch(xk, r[:, :K].contiguous(), w, 1e-6, True, cfg)[0],  # noqa: B023
                        norm_gemv.norm_linear_reference(xk, r[:, :K].contiguous(), w, 1e-6, True)[0])
                for name, (run, ref) in cases.items():
                    try:
                        y1, y2 = run(), run()
                        ok = close(y1, ref, tol) and torch.equal(y1, y2)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        ok = False
                        name += f" {type(e).__name__}: {str(e)[:80]}"
                    fails += not ok
                    if not ok:
                        print(f"FAIL {dtype} M{M} N{N} K{K} {cfg} {name}", flush=True)
    print(f"look-ahead kernels vs twins: {'PASS' if not fails else f'FAIL ({fails} cases)'}", flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
