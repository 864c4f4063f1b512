"""Issue 6, session 8 probe: does a grid barrier inside one persistent launch cost less than a kernel boundary?

Every projection of the AR step loses ~4-6 us to its ramp and tail (docs/perf/engine.md, session 8), and PDL does
not recover it. The structural alternative is one launch for two dependent projections: a persistent grid of P
programs runs the first GEMM's tiles (split-K finished by the last split of each column block), arrives at a
grid-wide counter, loads its first tiles of the second GEMM's weight — which do not depend on the first GEMM — and
only then waits for every program to arrive before it reads the first GEMM's output.

Measured here on the step's out_proj -> gate|up shapes (y1 = x @ W1^T, [8, 2048] x [2048, 2048]; y2 = y1 @ W2^T,
[12288, 2048]) over 24 weight pairs in one CUDA graph: the pair kernel in a few configurations (PRE tiles preloaded
before the wait; WAIT=0: no wait, a racy timing bound, never used for values) against the two projections as the
engine launches them (``gemv.skinny_linear``, tuned back to back in a graph). A probe, not engine code: it runs only
on a GPU (the spin-wait needs every program resident; Triton's interpreter runs programs one after another).

    python3 scripts/gpu/engine_pair_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))

from flarectl.engine import gemv  # noqa: E402

M, K1, N1, N2 = 8, 2048, 2048, 12288
PAIRS = 24
BW = 2.97e12


@triton.jit
def _tile(x, w, ws, y, cnt, t, M, N, K, per, NB, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          SPLIT: tl.constexpr, b0, HAS_B0: tl.constexpr):
    """One (column block, K split) tile of y = x @ w^T, split-K finished by the last split to arrive."""
    j = t % NB
    s = t // NB
    rm = tl.arange(0, BM)
    rn = j * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k0 = s * per
    p_x = x + rm[:, None] * K + (k0 + rk)[None, :]
    p_w = w + rn[None, :].to(tl.int64) * K + (k0 + rk)[:, None]
    m_ok = (rm < M)[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    start = 0
    if HAS_B0:
        acc += tl.dot(tl.load(p_x, mask=m_ok, other=0.0), b0)
        p_x += BK
        p_w += BK
        start = BK
    for _ in range(start, per, BK):
        acc += tl.dot(tl.load(p_x, mask=m_ok, other=0.0), tl.load(p_w))
        p_x += BK
        p_w += BK
    offs = rm[:, None] * N + rn[None, :]
    if SPLIT == 1:
        tl.store(y + offs, acc.to(y.dtype.element_ty), mask=m_ok)
    else:
        tl.store(ws + s * M * N + offs, acc, mask=m_ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt + j, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            acc = tl.load(ws + offs, mask=m_ok, other=0.0, cache_modifier=".cg")
            for q in tl.static_range(1, SPLIT):
                acc += tl.load(ws + q * M * N + offs, mask=m_ok, other=0.0, cache_modifier=".cg")
            tl.store(y + offs, acc.to(y.dtype.element_ty), mask=m_ok)
            tl.atomic_xchg(cnt + j, 0)


@triton.jit
def pair_kernel(x, w1, w2, y1, y2, ws1, ws2, cnt1, cnt2, sync, M, N1, K1, N2, per1, per2, NB1, NB2, T1, T2,
                BM: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, S1: tl.constexpr,
                BN2: tl.constexpr, BK2: tl.constexpr, S2: tl.constexpr, PRE: tl.constexpr, WAIT: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    for t in range(pid, T1, P):
        _tile(x, w1, ws1, y1, cnt1, t, M, N1, K1, per1, NB1, BM, BN1, BK1, S1, 0.0, False)
    tl.debug_barrier()
    tl.atomic_add(sync, 1, sem="release")  # this program's share of y1 is written
    # the first tile of the second GEMM: its weight does not depend on y1, so it streams in before the wait
    j = pid % NB2
    s = pid // NB2
    rn = j * BN2 + tl.arange(0, BN2)
    rk = tl.arange(0, BK2)
    b0 = tl.load(w2 + rn[None, :].to(tl.int64) * N1 + (s * per2 + rk)[:, None])
    if WAIT:
        arrived = tl.atomic_add(sync, 0, sem="acquire")
        while arrived < P:
            arrived = tl.atomic_add(sync, 0, sem="acquire")
    if PRE:
        _tile(y1, w2, ws2, y2, cnt2, pid, M, N2, N1, per2, NB2, BM, BN2, BK2, S2, b0, True)
    else:
        _tile(y1, w2, ws2, y2, cnt2, pid, M, N2, N1, per2, NB2, BM, BN2, BK2, S2, b0, False)
    for t in range(pid + P, T2, P):
        _tile(y1, w2, ws2, y2, cnt2, t, M, N2, N1, per2, NB2, BM, BN2, BK2, S2, 0.0, False)
    # the last program out resets the grid counter for the next launch (every program has passed the wait)
    if tl.atomic_add(sync + 1, 1, sem="acq_rel") == P - 1:
        tl.atomic_xchg(sync, 0)
        tl.atomic_xchg(sync + 1, 0)


def pair(x, w1, w2, cfg, sync):
    P, (bn1, bk1, s1), (bn2, bk2, s2), warps, pre, wait = cfg
    nb1, nb2 = N1 // bn1, N2 // bn2
    t1, t2 = nb1 * s1, nb2 * s2
    assert t2 >= P, "every program needs a first tile of the second GEMM"
    y1 = torch.empty(M, N1, device=x.device, dtype=x.dtype)
    y2 = torch.empty(M, N2, device=x.device, dtype=x.dtype)
    ws1 = torch.empty(s1, M, N1, device=x.device, dtype=torch.float32)
    ws2 = torch.empty(s2, M, N2, device=x.device, dtype=torch.float32)
    cnt = gemv.arrival_counters(x.device, nb1 + nb2)
    pair_kernel[(P,)](x, w1, w2, y1, y2, ws1, ws2, cnt, cnt[nb1:], sync, M, N1, K1, N2, K1 // s1, N1 // s2, nb1, nb2,
                      t1, t2, BM=16, BN1=bn1, BK1=bk1, S1=s1, BN2=bn2, BK2=bk2, S2=s2, PRE=pre, WAIT=wait,
                      num_warps=warps, num_stages=3)
    return y2


CONFIGS = {  # name: (programs, (BN, BK, split) of GEMM 1, of GEMM 2, warps, PRE, WAIT)
    "p128_a": (128, (64, 256, 4), (32, 256, 1), 4, 1, 1),
    "p128_a_w8": (128, (64, 256, 4), (32, 256, 1), 8, 1, 1),
    "p128_a_nopre": (128, (64, 256, 4), (32, 256, 1), 4, 0, 1),
    "p128_b": (128, (32, 128, 2), (64, 128, 2), 4, 1, 1),
    "p128_c": (128, (32, 256, 2), (64, 256, 2), 4, 1, 1),
    "p132_a": (132, (64, 256, 4), (32, 256, 1), 4, 1, 1),
    "p128_a_nowait(racy bound)": (128, (64, 256, 4), (32, 256, 1), 4, 1, 0),
}


def main():
    from engine_session5 import graph_ms

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    xs = torch.randn(M, K1, device=dev, dtype=torch.bfloat16, generator=g)
    w1s = [torch.randn(N1, K1, device=dev, dtype=torch.bfloat16, generator=g) / K1 ** 0.5 for _ in range(PAIRS)]
    w2s = [torch.randn(N2, N1, device=dev, dtype=torch.bfloat16, generator=g) / N1 ** 0.5 for _ in range(PAIRS)]
    sync = torch.zeros(2, device=dev, dtype=torch.int32)
    roof = PAIRS * 2 * (N1 * K1 + N2 * N1) / BW * 1e3
    res = {"roofline_ms": roof, "pairs": PAIRS, "variants": {}}

    def two_launches():
        return [gemv.skinny_linear(gemv.skinny_linear(xs, w1s[i]), w2s[i]) for i in range(PAIRS)]

    ref = [gemv.skinny_linear_reference(gemv.skinny_linear_reference(xs, w1s[i]), w2s[i]) for i in range(2)]
    for name, fn in [("two launches (engine ops)", two_launches)] + [
            (n, (lambda c=c: [pair(xs, w1s[i], w2s[i], c, sync) for i in range(PAIRS)])) for n, c in CONFIGS.items()]:
        try:
            outs = fn()
            torch.cuda.synchronize()
            err = max(float((o.float() - r.float()).norm() / r.float().norm()) for o, r in zip(outs, ref))
            times = [graph_ms(fn, calls=1, replays=30) for _ in range(2)]
            reps = [torch.equal(o, p) for o, p in zip(fn(), fn())]
        except Exception as e:  # noqa: BLE001 - a config that does not fit: report it
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        res["variants"][name] = dict(ms=times, per_pair_us=[t / PAIRS * 1e3 for t in times], rel_err_vs_fp32=err,
                                     deterministic=all(reps))
        print(f"{name:28s} {times[0]:.3f} / {times[1]:.3f} ms ({times[0] / PAIRS * 1e3:.2f} us a pair, "
              f"{times[0] / roof:.2f}x roofline), rel err {err:.1e}, same bits twice {all(reps)}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "pair_probe.json").write_text(json.dumps(res, indent=1))
    print(f"\n| variant | ms (two runs) | us a pair | x roofline | rel err vs fp32 |\n| --- | --- | --- | --- | --- |")
    for n, r in res["variants"].items():
        print(f"| {n} | {r['ms'][0]:.3f} / {r['ms'][1]:.3f} | {r['per_pair_us'][0]:.2f} | {r['ms'][0] / roof:.2f} | "
              f"{r['rel_err_vs_fp32']:.1e} |")
    print(f"roofline {roof:.3f} ms ({PAIRS} x {2 * (N1 * K1 + N2 * N1) / 1e6:.1f} MB at 2.97 TB/s)")


if __name__ == "__main__":
    main()
