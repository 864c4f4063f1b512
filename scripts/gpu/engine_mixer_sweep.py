"""The one-kernel GDN mixer's launch choices at the Qwen3.5-2B shape, per step shape, on one GPU (issue 6).

    python3 scripts/gpu/engine_mixer_sweep.py --out $OUT [--steps ar,trust] [--configs 1:32:4,1:8:1,...]

For the AR (W 1), window (W 4, no clean token) and anchored trust (W 8 = 4 clean + 4 window) steps at C=8: every
(token block, state columns per program, warps) is checked against the torch chain (``gdn_mixer_chain``) and timed
as a step runs it: 18 launches (one per GDN layer, each on its own state, conv state and projection) captured in a
CUDA graph, median of 20 replays, us per launch. ``--configs`` takes token block:state columns:warps triples
(default: session 10's grid; token block 0: the chunk form, ``mixer.CHUNK``). Beside them, the floor: the same 18 states copied state -> last state (16 MB read and
written per layer, as the mixer moves them) in one graph, us per copy. Writes ``mixer_sweep.json`` and ``mixer_best.env`` (the fastest
configuration for steps of more than one token, as env lines for the engine), prints a table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from flarectl.engine import mixer
from flarectl.engine.gdn_ops import gdn_mixer_chain

H = HV = 16
K = V = 128
S = 3
C = 8
LAYERS = 18
D = 2 * H * K + HV * V


def problem(W: int, wc: int, anchored: bool, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    counts = torch.full((C,), wc, dtype=torch.long, device="cuda")
    return dict(proj=r(C, W, D + HV * V + 2 * HV).bfloat16(), conv_w=(r(D, S + 1) * 0.5).bfloat16(),
                A_log=r(HV) * 0.3, dt_bias=(r(HV) * 0.3).bfloat16(), norm_w=(1 + 0.1 * r(V)).bfloat16(),
                state=r(C, HV, K, V) * 0.3, conv=r(C, D, S).bfloat16(), counts=counts,
                commit=torch.zeros(C, dtype=torch.bool, device="cuda"),
                seen=(counts - 1) if anchored else None)


def run(fn, p, wc, **kw):
    st, cv = p["state"].clone(), p["conv"].clone()
    ls, lc = torch.empty_like(st), torch.empty_like(cv)
    extra = {"seen": p["seen"]} if p["seen"] is not None else {}
    out = fn(p["proj"], p["conv_w"], None, p["A_log"], p["dt_bias"], p["norm_w"], st, cv, ls, lc, p["counts"],
             p["commit"], wc, H, HV, K, V, 1e-6, **extra, **kw)
    return out, ls


def graph_us(step) -> float:
    """``step`` (LAYERS launches) warmed on a side stream, captured in a CUDA graph: median of 20 replays, us per
    launch."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(1000 * a.elapsed_time(b) / LAYERS)
    return sorted(times)[len(times) // 2]


def block_kw(tb: int) -> dict:
    """``mixer.launch``'s keywords for a token block; 0 is the chunk form (``mixer.CHUNK``)."""
    return {"chunk": True} if tb == 0 else {"token_block": tb}


def time_us(W, wc, anchored, tb, bv, warps, module=mixer) -> float:
    """us per launch of ``module.launch`` (``flarectl.engine.mixer`` or a variant of it) at this step shape."""
    probs = [problem(W, wc, anchored, i) for i in range(LAYERS)]
    bufs = [(p["state"].clone(), p["conv"].clone(), torch.empty_like(p["state"]), torch.empty_like(p["conv"]))
            for p in probs]
    module.NUM_WARPS = warps

    def step():
        for p, (st, cv, ls, lc) in zip(probs, bufs):
            module.launch(p["proj"], p["conv_w"], None, p["A_log"], p["dt_bias"], p["norm_w"], st, cv, ls, lc,
                         p["counts"], p["commit"], wc, H, HV, K, V, 1e-6, v_block=bv, seen=p["seen"],
                         **block_kw(tb))

    return graph_us(step)


def state_copy_us() -> float:
    """The mixer's state traffic alone: 18 states [C, HV, K, V] fp32 copied to 18 others in one graph, us per copy."""
    src = [torch.randn(C, HV, K, V, device="cuda") for _ in range(LAYERS)]
    dst = [torch.empty_like(x) for x in src]

    def step():
        for a, b in zip(src, dst):
            b.copy_(a)

    return graph_us(step)


def parse_configs(text: str | None) -> list[tuple[int, int, int]]:
    if not text:
        return [(tb, bv, w) for tb, (bv, w) in itertools.product((1, 2, 4, 8), ((32, 4), (64, 4), (64, 8)))]
    return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--steps", default="ar,window,trust", help="comma list of ar, window, trust")
    ap.add_argument("--configs", default=None, help="token_block:v_block:warps,... (default: session 10's grid)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_shapes = {"ar": (1, 1, False), "window": (4, 0, False), "trust": (8, 4, True)}
    shapes = {k: all_shapes[k] for k in args.steps.split(",")}
    configs = parse_configs(args.configs)
    copy_us = state_copy_us()
    print(f"floor: state copy (16 MB read + written) {copy_us:.2f} us per layer", flush=True)
    rows = [dict(step="state_copy", us=copy_us)]
    for name, (W, wc, anchored) in shapes.items():
        p = problem(W, wc, anchored, 123)
        ref, ref_last = run(gdn_mixer_chain, p, wc)
        for tb, bv, warps in configs:
            if tb > W or (tb == 0 and W == 1):  # token block 0: the chunk form, for steps of 2+ tokens
                continue
            mixer.NUM_WARPS = warps
            try:
                got, last = run(mixer.launch, p, wc, v_block=bv, **block_kw(tb))
                err = max(float((got.float() - ref.float()).abs().max()), float((last - ref_last).abs().max()))
                us = time_us(W, wc, anchored, tb, bv, warps)
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or run: recorded
                rows.append(dict(step=name, W=W, token_block=tb, v_block=bv, warps=warps, error=repr(exc)[:200]))
                print(name, tb, bv, warps, "FAILED", repr(exc)[:200], flush=True)
                continue
            rows.append(dict(step=name, W=W, token_block=tb, v_block=bv, warps=warps, us=us, max_err=err))
            print(f"{name:7} W={W} tb={tb} bv={bv:3d} warps={warps}: {us:7.2f} us/launch  max err {err:.2e}",
                  flush=True)
    mixer.NUM_WARPS = None
    (out / "mixer_sweep.json").write_text(json.dumps(rows, indent=1))
    # the engine's warps follow mixer.launch's rule (4 for [128, 32] state blocks, 8 above): only those are chosen
    ok = [r for r in rows if "max_err" in r and r["max_err"] < 5e-2 and r["warps"] == (4 if K * r["v_block"] <= 4096 else 8)]
    best = {}
    for name in shapes:
        cand = [r for r in ok if r["step"] == name]
        if cand:
            best[name] = min(cand, key=lambda r: r["us"])
    if "trust" in best:
        b = best["trust"]
        block = ("export FLARECTL_MIXER_CHUNK=1\n" if b["token_block"] == 0 else
                 f"export FLARECTL_MIXER_TOKEN_BLOCK={b['token_block']}\n")
        (out / "mixer_best.env").write_text(block + f"export FLARECTL_MIXER_V_BLOCK_MULTI={b['v_block']}\n")
    print("\nall (us per launch):")
    for r in rows:
        if "max_err" in r:
            print(f"{r['step']:7} tb={r['token_block']} bv={r['v_block']:3d} warps={r['warps']}: {r['us']:7.2f}")
    print(f"state copy floor: {copy_us:.2f}")
    print("\nbest per step (us per launch; x18 layers per step):")
    for name, r in best.items():
        base = [x for x in ok if x["step"] == name and x["token_block"] == 1 and x["v_block"] == 32 and x["warps"] == 4]
        ref_us = base[0]["us"] if base else float("nan")
        print(f"{name:7} tb={r['token_block']} bv={r['v_block']} warps={r['warps']}: {r['us']:.2f} us "
              f"(one token at a time, 32 columns, 4 warps: {ref_us:.2f} us)")


if __name__ == "__main__":
    main()
