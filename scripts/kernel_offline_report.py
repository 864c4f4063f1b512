"""What the device builds for the engine's skinny kernels, without a GPU (issue 6, session 13): each configuration is
compiled for sm_90 on the CPU box with the arguments marked 16-divisible as the JIT marks them at a real launch (an
unmarked offline compile cannot vectorise the loads and leaves the K loop unpipelined, which misreports the device),
then ptxas reports registers and spills. Per build: shared memory, registers, spills, whether the K loop is
software-pipelined (``cp.async``), the tensor-core warp layout (``warpsPerCTA``: [1, W] splits a 16-row tile's columns
over the warps; [W, 1] on 16 rows has every warp compute the whole tile), the griddepcontrol instructions, and how many programs fit on one SM (shared memory
228 KB, 64K registers, at most 32 blocks) — alone, and beside one program of the previous projection, which is what
programmatic dependent launch needs to overlap two launches.

    python3 scripts/kernel_offline_report.py [--pdl-preload-kb 0,32,64] [--no-cap]
    # the device's Triton: pip install --no-deps --target /tmp/t36 triton==3.6.0; PYTHONPATH=/tmp/t36 python3 ...
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flare_kernels.bench.offline_compile import ptxas_report  # noqa: E402
from flarectl.engine import gemv, l2_next, norm_gemv  # noqa: E402

SM_SHARED = 228 * 1024
SM_REGS = 65536
DIV16 = [["tt.divisibility", 16]]

# (name, kind, N, K, config): the AR step at C = 8 of the Qwen3.5-2B shape; the configurations are those the chain
# tuner chose on an H100 (session 10, docs/perf/engine_session10/gpu/breakdown/step_breakdown_64.json) where it chose
# the kernel, and session 8's best chain configurations for out_proj and the fused norm projections (not recorded by
# the tuner).
SHAPES = [
    ("in_proj (norm + add)", "norm", 8224, 2048, gemv.Config(64, 256, 1, 4, 3)),
    ("out_proj", "plain", 2048, 2048, gemv.Config(32, 256, 1, 4, 3)),
    ("gate|up (norm + add + glu)", "norm_glu", 12288, 2048, gemv.Config(128, 128, 1, 4, 3)),
    ("down", "plain", 2048, 6144, gemv.Config(32, 128, 4, 4, 4)),
    ("lm_head", "plain", 248320, 2048, gemv.Config(64, 256, 1, 4, 3)),
]


def build(kind: str, N: int, K: int, cfg: gemv.Config, pdl: int, pre: int):
    split, per = gemv.split_plan(K, cfg.bk, cfg.split)
    bm = gemv.row_block(16 if kind != "plain" else 8)  # the norm kernels' add: x's rows over the residual's
    stages = gemv.fit_stages(cfg.stages, bm, cfg.bn, cfg.bk, 2, 232448)
    common = dict(BM=bm, BN=cfg.bn, BK=cfg.bk, EVEN_K=split * per == K, EVEN_N=N % cfg.bn == 0, IEEE=False,
                  UPCAST=False, PDL=pdl, PRE=pre, TRIGGER=0, L2_LINES=0, LINE=64, SPLIT=split,
                  **l2_next.offline_consts(warps=cfg.warps))
    if kind == "plain":
        fn = gemv._kernels()[0]
        consts = dict(common, PARTIAL=False, SWIGLU=False, RESIDUAL=False)
        types = dict(x="*bf16", w="*bf16", y="*bf16", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
                     k_per_split="i32", res="*bf16", ws="*fp32", counter="*i32", up_off="i32")
        aligned = ["x", "w", "y", "res", "ws", "counter", "K", "stride_xm", "stride_wn", "k_per_split"]
    else:
        fn = norm_gemv._kernel()
        consts = dict(common, ADD=True, GLU=kind == "norm_glu")
        types = dict(x="*bf16", res="*bf16", w="*bf16", y="*bf16", h="*bf16", ws="*fp32", counter="*i32", M="i32",
                     N="i32", K="i32", stride_wn="i32", k_per_split="i32", eps="fp32")
        aligned = ["x", "res", "w", "y", "h", "ws", "counter", "K", "stride_wn", "k_per_split"]
    types.update(l2_next.OFFLINE_TYPES)
    if N % 16 == 0:
        aligned.append("N")
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(n),): DIV16 for n in aligned})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=cfg.warps, num_stages=stages))
    report = ptxas_report(c.asm["ptx"], 90)
    regs, spills = report["registers"], report["spill_stores"]
    programs = -(-N // cfg.bn) * split
    warps = sorted(set(re.findall(r"nvidia_mma<\{[^}]*warpsPerCTA = \[([^\]]*)\]", c.asm["ttgir"])))
    return dict(shared=c.metadata.shared, regs=regs, spills=spills, threads=32 * cfg.warps, programs=programs,
                pipelined="cp.async" in c.asm["ptx"], stages=stages, gdc="griddepcontrol.wait" in c.asm["ptx"],
                warps=" / ".join(f"[{w}]" for w in warps))


def per_sm(b: dict, other: dict | None = None) -> int:
    """Programs of ``b`` that fit on one SM (beside one program of ``other``)."""
    shared = SM_SHARED - (other["shared"] + 1024 if other else 0)
    regs = SM_REGS - ((other["regs"] or 255) * other["threads"] if other else 0)
    return max(0, min(shared // (b["shared"] + 1024), regs // ((b["regs"] or 255) * b["threads"]), 32 - bool(other)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pdl-preload-kb", default="0,32,64")
    ap.add_argument("--no-cap", action="store_true", help="ignore gemv.PDL_PRELOAD_MAX_BYTES_PER_THREAD")
    a = ap.parse_args()
    if a.no_cap:
        gemv.PDL_PRELOAD_MAX_BYTES_PER_THREAD = 1 << 30
    print(f"triton {triton.__version__}, sm_90, bf16, M = 8 (the norm kernels: a 16-row tile, x over the residual)\n")
    print("| projection | config | PDL preload | programs | stages | shared KB | registers | spills B | pipelined | "
          "MMA warps (M, N) | programs / SM alone | beside the previous projection |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    prev = None
    for name, kind, N, K, cfg in SHAPES:
        for kb in [int(v) for v in a.pdl_preload_kb.split(",")]:
            gemv.PDL_PRELOAD_KB = kb
            pre = gemv.pdl_plan(cfg, 2)[0] if kb else 0
            b = build(kind, N, K, cfg, 1 if kb else 0, pre)
            beside = per_sm(b, prev) if prev else "-"
            print(f"| {name} | {cfg.bn}x{cfg.bk} split {cfg.split}, {cfg.warps} warps | "
                  f"{'off' if not kb else f'{kb} KB ({pre} tiles)'} | {b['programs']} | {b['stages']} | "
                  f"{b['shared'] / 1024:.0f} | {b['regs']} | {b['spills']} | {'yes' if b['pipelined'] else 'NO'} | "
                  f"{b['warps']} | {per_sm(b)} | {beside} |", flush=True)
            if not kb:
                base = b
        prev = base


if __name__ == "__main__":
    main()
