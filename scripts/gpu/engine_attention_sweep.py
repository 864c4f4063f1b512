"""The decode-attention kernel's launch choices at the Qwen3.5-2B shape, per step shape, on one GPU (issue 6).

    python3 scripts/gpu/engine_attention_sweep.py --out $OUT

For the AR (W 1), window (W 4, no clean token) and anchored trust (W 8 = 4 clean + 4 window) steps at C=8 (8 query
heads, 2 KV heads of 256, rows at 480-512 cached slots): every (query tokens per program, cache slots per inner
step, warps, splits) is checked against the twin (``decode_attention_reference``, fp32) and timed as a step runs it:
6 launches (one per attention layer, each on its own cache) captured in a CUDA graph, median of 20 replays, us per
launch. Writes ``attention_sweep.json``, prints a table last (fastest per step marked).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from flarectl.engine import attention

C, HQ, HKV, D = 8, 8, 2, 256
CAP = 544
LAYERS = 6
DEV = "cuda"
STEPS = {"ar": (1, 1), "window": (4, 0), "trust": (8, 4)}  # name: (W, wc)


def problem(W: int, wc: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g, dtype=torch.bfloat16)  # noqa: E731
    ww = W - wc
    lengths = torch.randint(480, 512, (C,), device=DEV, generator=g)
    counts = torch.full((C,), wc, dtype=torch.long, device=DEV)
    wlen = torch.full((C,), ww, dtype=torch.long, device=DEV)
    wlen[::3] = max(ww - 1, 0)
    return dict(q=r(C, HQ, W, D), key=r(C, HKV, CAP + 16, D), value=r(C, HKV, CAP + 16, D),
                k_win=r(C, HKV, ww, D), v_win=r(C, HKV, ww, D), lengths=lengths, counts=counts, wlen=wlen, wc=wc,
                cap=CAP, scale=D ** -0.5)


def reference(p):
    f = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}
    return attention.decode_attention_reference(**f)


def time_us(probs, **kw) -> float:
    """us per launch: one launch per layer's problem, captured in one CUDA graph (median of 20 replays)."""
    from engine_session5 import graph_ms  # scripts/gpu is on sys.path when this script runs

    def step():
        for p in probs:
            attention.launch(**p, **kw)

    return 1000 * graph_ms(step, calls=1, replays=20) / len(probs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (W, wc) in STEPS.items():
        probs = [problem(W, wc, i) for i in range(LAYERS)]
        want = reference(probs[0])
        for tq, bn, warps, splits in itertools.product((1, 2, 4, 8), (32, 64), (4, 8), (None, 2, 4, 8)):
            if tq > W and tq > 1:
                continue
            kw = dict(tokens_per_program=tq, block_n=bn, num_warps=warps, splits=splits)
            try:
                got = attention.launch(**probs[0], **kw)
                err = (got.float() - want).abs().max().item()
                us = time_us(probs, **kw)
            except Exception as e:  # noqa: BLE001 - a launch that does not fit: record and go on
                rows.append(dict(step=name, **kw, error=f"{type(e).__name__}: {str(e)[:120]}"))
                continue
            rows.append(dict(step=name, **kw, us=us, max_err=err))
            print(f"{name:7s} tq={tq} bn={bn} warps={warps} splits={splits}: {us:7.2f} us  err {err:.2e}", flush=True)
    (args.out / "attention_sweep.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'step':7s} {'tokens':>6s} {'bn':>4s} {'warps':>5s} {'splits':>6s} {'us/launch':>10s} {'max err':>9s}")
    for name in STEPS:
        ok = [r for r in rows if r["step"] == name and "us" in r]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["us"])
        base = [r for r in ok if r["tokens_per_program"] == 1 and r["block_n"] == 64 and r["num_warps"] == 4
                and r["splits"] is None]
        for r in sorted(ok, key=lambda r: r["us"])[:6] + base:
            mark = " <- default today" if r in base else (" <- fastest" if r is best else "")
            print(f"{name:7s} {r['tokens_per_program']:6d} {r['block_n']:4d} {r['num_warps']:5d} {str(r['splits']):>6s} "
                  f"{r['us']:10.2f} {r['max_err']:9.2e}{mark}")


if __name__ == "__main__":
    main()
