"""Issue 6, session 13: does programmatic dependent launch (PDL) pay once each launch streams more than one weight
tile before it waits for the previous kernel?

Session 8 (``engine_pdl_chain.py``) found PDL worth nothing on a chain of 24 GDN layers' four projections at M = 8,
with one weight tile loaded before ``gdc_wait``. Here the depth before the wait is the variable:

* ``pre``: weight bytes per program loaded into registers before ``gdc_wait`` (``gemv.PDL_PRELOAD_KB``);
* ``trigger``: the next kernel may launch as a program starts (0) or once its main loop is done (1);
* ``l2``: weight bytes per program prefetched into L2 before the wait (``gemv.PDL_L2_KB``).

Per shape, each configuration of a small one-wave grid is timed in a chain of 24 launches on distinct weights (CUDA
graph, every weight from HBM) without PDL and with PDL at each depth; the mixed chain (24 layers x in_proj, out_proj,
gate|up, down) then runs with each variant's best configurations per shape, against the engine's own op (tuned,
cuBLAS allowed). Outputs of every PDL variant are compared bitwise with PDL off at the same configurations.

    python3 scripts/gpu/engine_pdl_depth.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from engine_pdl_chain import BW, LAYERS, Shape, graph_ms  # noqa: E402

from flarectl.engine import gemv  # noqa: E402

VARIANTS = {  # name: (pdl, preload KB, trigger late, L2 KB)
    "off": (False, 0, 0, 0),
    "pdl_tile": (True, 0, 0, 0),
    "pdl_pre32": (True, 32, 0, 0),
    "pdl_pre64": (True, 64, 0, 0),
    "pdl_pre32_late": (True, 32, 1, 0),
    "pdl_l2_64": (True, 0, 0, 64),
    "pdl_pre32_l2_64": (True, 32, 0, 64),
}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def set_variant(name):
    pdl, pre, late, l2 = VARIANTS[name]
    gemv.PDL_PRELOAD_KB, gemv.PDL_TRIGGER_LATE, gemv.PDL_L2_KB = pre, late, l2
    return pdl


def configs(sh):
    out = []
    for bn in (64, 128):
        for split in (1, 2, 4, 8):
            programs = -(-sh.N // bn) * split
            if 96 <= programs <= 264 and sh.K // split >= 256:
                out.append(gemv.Config(bn, 128, split, 4, 4))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep-variants", default="off,pdl_tile,pdl_pre32",
                    help="variants swept over every configuration per shape")
    ap.add_argument("--fixed", action="store_true",
                    help="no per-shape sweep: every variant with session 8's best chain configurations (PDL off)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    names = ("in_proj", "out_proj", "gate_up", "down")
    shapes = {n: Shape(n, dev) for n in names}
    res = {"per_shape": {}, "chain": {}, "variants": VARIANTS}
    best = {v: {} for v in VARIANTS}
    sweep = a.sweep_variants.split(",")
    if a.fixed:
        fixed = {"in_proj": gemv.Config(64, 256, 1, 4, 3), "out_proj": gemv.Config(32, 256, 1, 4, 3),
                 "gate_up": gemv.Config(128, 128, 1, 4, 3), "down": gemv.Config(64, 256, 4, 4, 3)}
        best = {v: dict(fixed) for v in VARIANTS}
    for n, sh in ({} if a.fixed else shapes).items():
        rows = []
        for cfg in configs(sh):
            row = {"config": str(cfg)}
            for v in sweep:
                pdl = set_variant(v)
                try:
                    row[v] = graph_ms(lambda: [sh.call(i, cfg, pdl) for i in range(LAYERS)]) / LAYERS * 1e3  # noqa: B023
                except Exception as e:  # noqa: BLE001 - resources: skip
                    log(f"{n} {cfg} {v}: {type(e).__name__}: {str(e)[:100]}")
                    row[v] = float("inf")
            rows.append((cfg, row))
            log(f"{n:8s} {cfg}  " + "  ".join(f"{v} {row[v]:6.2f}" for v in sweep))
        for v in VARIANTS:
            key = v if v in sweep else ("pdl_pre32" if "pdl_pre32" in sweep else sweep[-1])
            best[v][n] = min(rows, key=lambda r: r[1][key])[0]  # noqa: B023
        t_op = graph_ms(lambda: [sh.call(i, None, None) for i in range(LAYERS)]) / LAYERS * 1e3  # noqa: B023
        res["per_shape"][n] = dict(mb=sh.bytes / 1e6, roofline_us=sh.bytes / BW * 1e6, engine_op_us=t_op,
                                   rows=[r for _, r in rows],
                                   best={v: str(best[v][n]) for v in VARIANTS})
        log(f"{n}: roofline {sh.bytes / BW * 1e6:.2f} us, engine op {t_op:.2f} us; best " +
            ", ".join(f"{v} {min(r[v] for _, r in rows):.2f}" for v in sweep))

    total = sum(sh.bytes for sh in shapes.values()) * LAYERS
    roof = total / BW * 1e3

    def chain(v, cfgs):
        pdl = set_variant(v) if v != "engine" else None
        return [shapes[n].call(i, None if v == "engine" else cfgs[n], pdl) for i in range(LAYERS) for n in names]

    order = ["engine", "off"] + [v for v in VARIANTS if v != "off"] + ["engine", "off", "pdl_pre32"]
    if a.fixed:  # the engine's op tunes every shape first: last
        order = list(VARIANTS) + ["off", "pdl_pre32", "engine"]
    for v in order:
        ms = graph_ms(lambda: chain(v, best.get(v, {})))  # noqa: B023
        res["chain"].setdefault(v, []).append(ms)
        log(f"chain {v:18s} {ms:.3f} ms = {ms / roof:.3f}x roofline")
    # the same configurations (the off variant's) with each PDL variant: isolates the depth from the tile choice
    for v in ([] if a.fixed else VARIANTS):
        if v == "off":
            continue
        ms = graph_ms(lambda: chain(v, best["off"]))  # noqa: B023
        res["chain"].setdefault(v + "@off_cfg", []).append(ms)
        log(f"chain {v + '@off_cfg':26s} {ms:.3f} ms = {ms / roof:.3f}x roofline")
    equal = {}
    with torch.no_grad():
        ref = chain("off", best["pdl_pre32"])
        for v in VARIANTS:
            if v != "off":
                equal[v] = all(torch.equal(p, q) for p, q in zip(ref, chain(v, best["pdl_pre32"])))
    res["bitwise_equal_to_off"] = equal
    res["roofline_ms"] = roof
    log(f"bitwise equal to PDL off (same configurations): {equal}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "pdl_depth.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"\nchain of {LAYERS} x 4 projections, roofline {roof:.3f} ms ({total / 1e9:.2f} GB):")
    print("| variant | ms (runs) | x roofline |\n| --- | --- | --- |")
    for v, ms in res["chain"].items():
        print(f"| {v} | {', '.join(f'{m:.3f}' for m in ms)} | {min(ms) / roof:.3f} |")


if __name__ == "__main__":
    main()
