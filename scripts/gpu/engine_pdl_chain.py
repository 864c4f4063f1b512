"""Issue 6, session 8: do the skinny GEMMs of a decode step overlap across kernel boundaries with programmatic
dependent launch (PDL) once every launch fits in one wave?

A GDN layer of the AR step at C = 8 (Qwen3.5-2B shape, M = 8) runs four projections back to back: the fused norm
in-projection (``norm_gemv``, + residual), out_proj (``gemv``), the fused norm gate|up (+ residual, SwiGLU) and down
(``gemv``). Each launch pays a ramp (first loads in flight) and a tail (split-K finish); with PDL the next launch's
programs can start, stream their first weight tile and wait (``gdc_wait``) while the previous launch finishes — if
both fit on the SMs at once. Timed in CUDA graphs on 24 distinct weights per shape (every weight from HBM):

1. per shape, a chain of 24 launches of that shape for each configuration, PDL off and on (per-launch us);
2. the mixed chain of 24 layers x 4 projections: the engine's current choice (tuned L2-cold, cuBLAS allowed), the
   best chain configuration per shape without PDL, and with PDL; outputs compared bitwise between PDL on and off.

    python3 scripts/gpu/engine_pdl_chain.py --out $OUT [--shapes in_proj,out_proj,gate_up,down]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from flarectl.engine import gemv, norm_gemv  # noqa: E402

LAYERS = 24
BW = 2.97e12  # measured copy bandwidth of the H100 (docs/perf/engine.md), bytes/s
SHAPES = {  # name: (N, K, kind) at M = 8
    "in_proj": (8224, 2048, "norm"),
    "out_proj": (2048, 2048, "plain"),
    "gate_up": (12288, 2048, "norm_glu"),
    "down": (2048, 6144, "plain"),
}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def graph_ms(fn, replays=30) -> float:
    from engine_session5 import graph_ms as g

    return g(fn, calls=1, replays=replays)


class Shape:
    def __init__(self, name, dev):
        self.name = name
        self.N, self.K, self.kind = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(hash(name) % 1000)
        self.ws = [torch.randn(self.N, self.K, device=dev, dtype=torch.bfloat16, generator=g) / self.K ** 0.5
                   for _ in range(LAYERS)]
        self.x = torch.randn(8, self.K, device=dev, dtype=torch.bfloat16, generator=g)
        self.r = torch.randn(8, self.K, device=dev, dtype=torch.bfloat16, generator=g)
        self.bytes = self.N * self.K * 2

    def call(self, i, cfg, pdl):
        """One launch on weight i with ``cfg`` (None: the engine's op, tuned) -> output tensor."""
        w = self.ws[i]
        if self.kind == "plain":
            if cfg is None:
                return gemv.skinny_linear(self.x, w)
            return gemv.launch_fused(self.x, w, None, False, cfg, pdl)
        glu = self.kind == "norm_glu"
        if cfg is None:
            return norm_gemv.norm_linear(self.x, self.r, w, 1e-6, glu)[0]
        return norm_gemv.launch(self.x, self.r, w, 1e-6, glu, cfg, pdl)[0]

    def configs(self):
        out = []
        for bn, bk, split, warps in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (4, 8)):
            programs = -(-self.N // bn) * split
            if not 33 <= programs <= 264 or self.K // split < bk:
                continue
            out.append(gemv.Config(bn, bk, split, warps, 3))
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="in_proj,out_proj,gate_up,down")
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = {"per_shape": {}, "chain": {}}
    shapes = {n: Shape(n, dev) for n in a.shapes.split(",")}
    best = {}
    for name, sh in shapes.items():
        rows = []
        for cfg in sh.configs():
            t = {}
            for pdl in (False, True):
                try:
                    t[pdl] = graph_ms(lambda: [sh.call(i, cfg, pdl) for i in range(LAYERS)]) / LAYERS * 1e3  # noqa: B023
                except Exception as e:  # noqa: BLE001 - resources: skip
                    log(f"{name} {cfg} pdl={pdl}: {type(e).__name__}: {str(e)[:120]}")
                    t[pdl] = float("inf")
            rows.append((cfg, t[False], t[True]))
            log(f"{name:8s} {cfg}  off {t[False]:6.2f} us  pdl {t[True]:6.2f} us")
        t_op = graph_ms(lambda: [sh.call(i, None, None) for i in range(LAYERS)]) / LAYERS * 1e3  # noqa: B023
        off = min(rows, key=lambda r: r[1])
        on = min(rows, key=lambda r: r[2])
        best[name] = (off[0], on[0])
        ideal = sh.bytes / BW * 1e6
        res["per_shape"][name] = dict(
            mb=sh.bytes / 1e6, roofline_us=ideal, engine_op_us=t_op,
            configs=[dict(config=str(c), off_us=o, pdl_us=p) for c, o, p in rows],
            best_off=dict(config=str(off[0]), us=off[1]), best_pdl=dict(config=str(on[0]), us=on[2]))
        log(f"{name}: roofline {ideal:.2f} us, engine op {t_op:.2f}, best off {off[1]:.2f} ({off[0]}), "
            f"best pdl {on[2]:.2f} ({on[0]})")

    order = [n for n in ("in_proj", "out_proj", "gate_up", "down") if n in shapes]
    total_bytes = sum(shapes[n].bytes for n in order) * LAYERS

    def chain(kind):
        outs = []
        for i in range(LAYERS):
            for n in order:
                if kind == "engine":
                    outs.append(shapes[n].call(i, None, None))
                elif kind == "off":
                    outs.append(shapes[n].call(i, best[n][0], False))
                elif kind == "pdl_best_off_cfg":
                    outs.append(shapes[n].call(i, best[n][0], True))
                else:
                    outs.append(shapes[n].call(i, best[n][1], True))
        return outs

    for kind in ("engine", "off", "pdl", "pdl_best_off_cfg", "engine", "off", "pdl"):
        ms = graph_ms(lambda: chain(kind))  # noqa: B023
        res["chain"].setdefault(kind, []).append(ms)
        log(f"chain {kind:18s} {ms:.3f} ms = {ms / (total_bytes / BW * 1e3):.3f}x its roofline "
            f"({total_bytes / 1e9:.2f} GB)")
    with torch.no_grad():
        same = all(torch.equal(p, q) for p, q in zip(
            [shapes[n].call(i, best[n][1], False) for i in range(LAYERS) for n in order],
            [shapes[n].call(i, best[n][1], True) for i in range(LAYERS) for n in order]))
    res["pdl_bitwise_equal"] = same
    res["roofline_ms"] = total_bytes / BW * 1e3
    log(f"PDL outputs bitwise equal to PDL off: {same}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "pdl_chain.json").write_text(json.dumps(res, indent=1))
    print("\n| shape | MB | roofline us | engine op us | best off us (config) | best PDL us (config) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in res["per_shape"].items():
        print(f"| {n} | {r['mb']:.1f} | {r['roofline_us']:.2f} | {r['engine_op_us']:.2f} | "
              f"{r['best_off']['us']:.2f} ({r['best_off']['config']}) | {r['best_pdl']['us']:.2f} "
              f"({r['best_pdl']['config']}) |")
    print(f"\nchain of {LAYERS} layers x {len(order)} (ms, runs in order): "
          + ", ".join(f"{k} {', '.join(f'{v:.3f}' for v in vs)}" for k, vs in res["chain"].items())
          + f"; roofline {res['roofline_ms']:.3f} ms")


if __name__ == "__main__":
    main()
