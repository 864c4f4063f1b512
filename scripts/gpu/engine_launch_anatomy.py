"""Issue 6, session 8 probe: where a skinny GEMM's ~4-6 us over its bytes go, launch after launch in a CUDA graph.

A plain split-1 skinny GEMM (one [BN] column block per program, M = 8 rows, fp32 accumulation; the engine's
``gemv`` kernel without split-K) stamps %globaltimer in every program: at its start, after its first weight tile
has arrived (first dot done) and at its end. Run as a chain of 24 launches on distinct weights in one CUDA graph,
each launch's stamps give:

* gap: its first program's start minus the previous launch's last program's end (launch latency in a graph);
* start spread: last program start minus first (programs beyond one wave start as others finish);
* first tile: median time from a program's start to its first tile's arrival (DRAM latency + issue);
* body: median program duration; tail: last end minus the median end (imbalance);
* span: last end minus first start, against the weight bytes at 2.97 TB/s.

    python3 scripts/gpu/engine_launch_anatomy.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))

LAUNCHES = 24
BW = 2.97e12


@triton.jit
def _now(dep):
    """%globaltimer (ns), read once ``dep`` (an int32 scalar) is available."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def stamped_gemv(x, w, y, stamps, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    t0 = _now(pid)
    rm = tl.arange(0, BM)
    rn = pid * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    p_x = x + rm[:, None] * K + rk[None, :]
    p_w = w + rn[None, :].to(tl.int64) * K + rk[:, None]
    m_ok = (rm < M)[:, None]
    acc = tl.dot(tl.load(p_x, mask=m_ok, other=0.0), tl.load(p_w), out_dtype=tl.float32)
    t1 = _now(tl.sum(acc).to(tl.int32))  # after the first tile's dot
    for _ in range(BK, K, BK):
        p_x += BK
        p_w += BK
        acc += tl.dot(tl.load(p_x, mask=m_ok, other=0.0), tl.load(p_w))
    tl.store(y + rm[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=m_ok)
    tl.debug_barrier()
    t2 = _now(tl.sum(acc).to(tl.int32))
    tl.store(stamps + pid * 3, t0)
    tl.store(stamps + pid * 3 + 1, t1)
    tl.store(stamps + pid * 3 + 2, t2)


SHAPES = {"out_proj": (2048, 2048, 16, 256), "gate_up": (12288, 2048, 64, 256), "down": (2048, 6144, 16, 256),
          "in_proj": (8224 - 8224 % 64, 2048, 64, 256)}


def main():
    from engine_session5 import graph_ms

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = {}
    for name, (N, K, bn, bk) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(LAUNCHES)]
        x = torch.randn(8, K, device=dev, dtype=torch.bfloat16, generator=g)
        y = torch.empty(8, N, device=dev, dtype=torch.bfloat16)
        P = N // bn
        stamps = torch.zeros(LAUNCHES, P, 3, device=dev, dtype=torch.int64)

        def chain():
            for i in range(LAUNCHES):
                stamped_gemv[(P,)](x, ws[i], y, stamps[i], 8, N, K, BM=16, BN=bn, BK=bk, num_warps=4, num_stages=3)

        ms = graph_ms(chain, calls=1, replays=20)
        st = stamps.cpu().double() / 1e3  # us
        gaps, spreads, firsts, bodies, tails, spans = [], [], [], [], [], []
        for i in range(1, LAUNCHES):
            s, prev = st[i], st[i - 1]
            gaps.append(float(s[:, 0].min() - prev[:, 2].max()))
            spreads.append(float(s[:, 0].max() - s[:, 0].min()))
            firsts.append(float((s[:, 1] - s[:, 0]).median()))
            bodies.append(float((s[:, 2] - s[:, 0]).median()))
            tails.append(float(s[:, 2].max() - (s[:, 2]).median()))
            spans.append(float(s[:, 2].max() - s[:, 0].min()))
        med = statistics.median
        ideal = N * K * 2 / BW * 1e6
        res[name] = dict(N=N, K=K, bn=bn, bk=bk, programs=P, per_launch_us_graph=ms * 1e3 / LAUNCHES,
                         ideal_us=ideal, gap_us=med(gaps), start_spread_us=med(spreads), first_tile_us=med(firsts),
                         body_us=med(bodies), tail_us=med(tails), span_us=med(spans))
        r = res[name]
        print(f"{name:8s} P={P:4d}  per launch {r['per_launch_us_graph']:.2f} us (ideal {ideal:.2f}): gap "
              f"{r['gap_us']:.2f}, start spread {r['start_spread_us']:.2f}, first tile {r['first_tile_us']:.2f}, "
              f"body {r['body_us']:.2f}, tail {r['tail_us']:.2f}, span {r['span_us']:.2f}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "launch_anatomy.json").write_text(json.dumps(res, indent=1))
    print("\n| shape | programs | us a launch (graph) | ideal us | gap | start spread | first tile | body (median) |"
          " tail | span |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, r in res.items():
        print(f"| {n} | {r['programs']} | {r['per_launch_us_graph']:.2f} | {r['ideal_us']:.2f} | {r['gap_us']:.2f} | "
              f"{r['start_spread_us']:.2f} | {r['first_tile_us']:.2f} | {r['body_us']:.2f} | {r['tail_us']:.2f} | "
              f"{r['span_us']:.2f} |")


if __name__ == "__main__":
    main()
