"""Issue 6, session 6: does an L2 weight prefetch on a side stream (``flarectl/engine/prefetch.py``) speed up the
decode step? One process, one GPU, random weights (Qwen3.5-2B shapes, bf16, M=8):

1. kernels: each prefetch method compiles and runs (bulk ``cp.async.bulk.prefetch.L2``, line ``prefetch.global.L2``
   [``::evict_last``], plain loads).
2. one GEMM, L2-cold, alone vs after a prefetch of its first X MB (prefetch, ~50 us sleep, then the GEMM timed by
   CUDA events): does the prefetched part hit L2, how much faster is the GEMM.
3. the chain: a CUDA graph mimicking one step — 24 layers (3 GDN : 1 attention) of the real GEMM shapes, 4 small
   kernels before each GEMM (slice+cast, mean of squares, scale, cast), then the LM head — without and with the
   side-stream prefetch of the next GEMM's weight forked before each GEMM (several methods and MB budgets), for
   cuBLAS and for the engine's ``gemv.linear`` choice. Ratio vs no prefetch.
4. the engine's graphed AR step (C=8, context 512, commit=True) with ``prefetch_mb`` 0 vs on (methods/budgets),
   logits compared bitwise with the 'off' step; AR serving at C=8 off vs the best, if that step was >3% faster.
   (Variants name:MB:method[:fork]; fork 'after' needs the tree of run 5, df6af67: the engine no longer has it.)
Writes engine_l2_prefetch.json, prints a table last.

    python3 scripts/gpu/engine_l2_prefetch.py --out $OUT [--skip kernels,single,chain,engine,serving]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

MB = 2**20
H = 2048
SHAPES = {"gdn": [(8224, H), (2048, H), (12288, H), (2048, 6144)],
          "attn": [(5120, H), (2048, H), (12288, H), (2048, 6144)]}
GAPS = {"real": {"gdn": [3, 9, 3, 2], "attn": [3, 7, 3, 2]}}
"""Small kernels before each of a layer's 4 GEMMs, like the step (most of them, the mixer, before out_proj); 'uniform'
(the run-4 chain): 7 before every GEMM (cast, pow, mean, add, rsqrt, mul, cast: an RMS norm in eager ops)."""
CHAIN_SET = "1"
CHAIN2 = [("off", None, 0, "start", 0), ("bulk", "bulk", 24, "start", 0), ("bulk", "bulk", 24, "after", 0),
          ("load_wide", "load_wide", 24, "start", 66), ("load_wide", "load_wide", 24, "after", 66),
          ("load_wide", "load_wide", 24, "after", 132), ("load_wide", "load_wide", 24, "after", 33),
          ("load_wide", "load_wide", 48, "after", 66), ("load_wide", "load_wide", 16, "after", 66)]
CHAIN_VARIANTS = [("off", None, 0), ("bulk", "bulk", 8), ("bulk", "bulk", 16), ("bulk", "bulk", 24),
                  ("bulk", "bulk", 32), ("bulk", "bulk", 64), ("line", "line", 16), ("line_last", "line_last", 16),
                  ("load", "load", 16)]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def events_ms(fn, repeats=30, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def kernels_check(res):
    from flarectl.engine import prefetch

    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    tok = torch.zeros(1024, dtype=torch.int32, device="cuda")
    res["kernels"] = {}
    for m in prefetch.METHODS:
        for grid in ((33, 66, 132) if m == "load_wide" else (8, 32, 132)):
            try:
                v = prefetch.words(w, 24 * MB)
                ms = events_ms(lambda: prefetch.launch(v, m, grid, tok), 10)  # noqa: B023
                res["kernels"][f"{m}/{grid}"] = ms
                log(f"kernel {m:9s} grid {grid:3d}: 24 MB issued in {ms * 1e3:7.1f} us (the kernel, not the data)")
            except Exception as exc:  # noqa: BLE001
                res["kernels"][f"{m}/{grid}"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                log(f"kernel {m} grid {grid}: ERROR {type(exc).__name__}: {str(exc)[:300]}")


def single(res, gemv_mod):
    from flarectl.engine import prefetch

    flush = torch.empty(512 * MB, dtype=torch.uint8, device="cuda")
    tok = torch.zeros(1024, dtype=torch.int32, device="cuda")
    res["single"] = []
    for name, (n, k) in (("gate|up", (12288, H)), ("gdn in", (8224, H)), ("down", (2048, 6144)),
                         ("out", (2048, H))):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
        gemv_mod.linear(x, w, True)  # tune outside timing
        for impl in ("cublas", "gemv"):
            mm = (lambda: F.linear(x, w)) if impl == "cublas" else (lambda: gemv_mod.linear(x, w, True))
            for method, mbs in (("none", 0), ("bulk", 16), ("bulk", 24), ("bulk", 64), ("line", 64),
                                ("load", 64)):
                def run():
                    flush.zero_()
                    if method != "none":
                        prefetch.launch(prefetch.words(w, mbs * MB), method, 32, tok)  # noqa: B023
                    torch.cuda._sleep(100_000)  # ~50 us: let the prefetch land
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    mm()  # noqa: B023
                    b.record()
                    return a, b
                times = []
                for i in range(12):
                    a, b = run()
                    b.synchronize()
                    if i >= 2:
                        times.append(a.elapsed_time(b))
                t = statistics.median(times)
                gb = w.numel() * 2 / 1e9
                res["single"].append(dict(gemm=name, impl=impl, method=method, mb=mbs, us=t * 1e3, tbs=gb / t))
                log(f"single {name:8s} {impl:6s} {method:5s} {mbs:3d} MB: {t * 1e3:6.1f} us ({gb / t:.2f} TB/s eff)")


def chain(res, gemv_mod):
    from flarectl.engine import prefetch

    kinds = (["gdn"] * 3 + ["attn"]) * 6
    ws = [[torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in SHAPES[k]] for k in kinds]
    head = torch.randn(248320, H, device="cuda", dtype=torch.bfloat16) * 0.02
    seq = [w for layer in ws for w in layer] + [head]
    total = sum(w.numel() * 2 for w in seq) / 1e9
    roof = total / 2.97
    tok = torch.zeros(1024, dtype=torch.int32, device="cuda")
    x0 = torch.randn(8, H, device="cuda", dtype=torch.bfloat16)
    res["chain"] = dict(weight_gb=total, roofline_ms=roof, rows=[])

    def body(impl, method, mb, small=True, grid=None, fork="start", gaps="uniform"):
        mm = (lambda x, w: F.linear(x, w)) if impl == "cublas" else (lambda x, w: gemv_mod.linear(x, w, True))
        views = prefetch.plan(seq, int(mb * MB)) if method else None
        g = grid or {"bulk": 8, "line": 32, "line_last": 32, "load": 64}.get(method, 0)

        def fn():
            y = x0
            if views is not None:
                prefetch.l2_prefetch(x0, views[0], tok, method, g)
            for j, w in enumerate(seq):
                k = w.shape[1]
                if small and gaps in GAPS:
                    n_small = GAPS[gaps][kinds[j // 4]][j % 4] if j < 4 * len(kinds) else 3
                    t = y[:, :k].float()
                    for _ in range(n_small - 2):
                        t = t * 0.999
                    x = t.to(torch.bfloat16)
                elif small:
                    t = y[:, :k].float()
                    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
                    x = t.to(torch.bfloat16)
                else:
                    x = y[:, :k] if y.shape[1] >= k else y.repeat(1, -(-k // y.shape[1]))[:, :k]
                    x = x.contiguous()
                if views is not None and j + 1 < len(seq) and fork == "start":
                    prefetch.l2_prefetch(x, views[j + 1], tok, method, g)
                y = mm(x, w)
                if views is not None and j + 1 < len(seq) and fork == "after":
                    prefetch.l2_prefetch(y, views[j + 1], tok, method, g)
                if y.shape[1] < H:
                    y = y.repeat(1, -(-H // y.shape[1]))
            if views is not None:
                prefetch.join(x0.device)
            return y
        return fn

    def graphed(fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        return g, out

    runs = [(impl, "uniform", label, method, mb, "start", 0) for impl in ("gemv", "cublas")
            for label, method, mb in CHAIN_VARIANTS + ([("off, no small kernels", None, 0)] if impl == "gemv" else [])]
    if CHAIN_SET == "2":
        runs = [("gemv", gaps, label, method, mb, fork, grid) for gaps in ("real", "uniform")
                for label, method, mb, fork, grid in CHAIN2]
    base, last = None, None
    for impl, gaps, label, method, mb, fork, grid in runs:
        if (impl, gaps) != last:
            base, last = None, (impl, gaps)
        label = f"{gaps}/{label}/{fork}" + (f"/g{grid}" if grid else "")
        if True:  # noqa: SIM108
            try:
                g, out = graphed(body(impl, method, mb, small="no small" not in label, grid=grid or None, fork=fork,
                                      gaps=gaps))
                ms = events_ms(g.replay, 30)
                ref = out.float().clone()
            except Exception as exc:  # noqa: BLE001
                log(f"chain {impl} {label} {mb}: ERROR {type(exc).__name__}: {str(exc)[:300]}")
                res["chain"]["rows"].append(dict(impl=impl, variant=label, mb=mb, error=str(exc)[:300]))
                torch.cuda.synchronize()
                continue
            if base is None:
                base, base_out = ms, ref
            same = bool(torch.equal(ref, base_out)) if "no small" not in label else None
            res["chain"]["rows"].append(dict(impl=impl, variant=label, mb=mb, ms=ms, ratio=ms / base,
                                             x_roofline=ms / roof, same_output=same))
            log(f"chain {impl:6s} {label:34s} {mb:3d} MB: {ms:.3f} ms ({ms / roof:.2f}x roofline, "
                f"{ms / base:.3f} of off) same output {same}")
            del g
    log(f"chain weights {total:.2f} GB, roofline {roof:.3f} ms")


def engine(res, variants, serving):
    from engine_session5 import step_times

    from flarectl.engine import bench
    from flarectl.models.loading import load_model

    with torch.device("cuda"):
        model = load_model("qwen3.5-2b", random_init=True, device="cuda")
    wbytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    roof = wbytes / 1e9 / 2.97
    res["engine"] = dict(weight_gb=wbytes / 1e9, roofline_ms=roof, rows=[])
    base = None
    for label, mb, method, fork in variants:
        kw = dict(prefetch_mb=mb, prefetch_method=method) | ({} if fork == "start" else dict(prefetch_fork=fork))
        wall, rep, setup, logits, be = step_times(model, True, **kw)  # 'after': run 5's tree (df6af67) only
        if base is None:
            base = logits
        row = dict(variant=label, prefetch_mb=be.eager.prefetch_mb, method=method, fork=fork, wall_ms=wall,
                   replay_ms=rep,
                   setup_s=setup, compiled=be.compiled, compile_error=be.eager.compile_error,
                   x_roofline=wall / roof, logits_identical=bool(torch.equal(logits, base)),
                   logits_rel_diff=float((logits - base).norm() / base.norm()),
                   argmax_agree=float((logits.argmax(-1) == base.argmax(-1)).float().mean()))
        res["engine"]["rows"].append(row)
        log(f"engine {label:10s}: wall {wall:.3f} ms ({wall / roof:.2f}x), replay {rep:.3f} ms, setup {setup:.1f} s, "
            f"prefetch {be.eager.prefetch_mb} MB, identical {row['logits_identical']}, compiled {be.compiled}")
        del be
        torch.cuda.empty_cache()
    rows = [r for r in res["engine"]["rows"] if r["prefetch_mb"] > 0]
    best = min(rows, key=lambda r: r["wall_ms"]) if rows else None
    offs = [r["wall_ms"] for r in res["engine"]["rows"] if r["prefetch_mb"] == 0]
    if serving and best and best["wall_ms"] < 0.97 * min(offs):  # serving only for a step that got faster
        from flarectl.engine import static_step as st

        prompts = bench.encode_prompts(model.tokenizer, bench.load_prompt_texts("gsm8k"), 16)
        res["serving"] = {}
        for name, mb in (("off", 0.0), (best["variant"], best["prefetch_mb"])):
            st.DEFAULT_PREFETCH_MB, st.DEFAULT_PREFETCH_METHOD = mb, best["method"]
            runs = []
            for i in range(2):
                point, info = bench.engine_point(model, prompts, "ar", 8, max_new_tokens=128, block_size=None,
                                                 threshold=0.9)
                runs.append(point.__dict__ | info)
                log(f"serving {name} run {i}: {point.tokens_per_second:.0f} tok/s, step {point.step_ms:.2f} ms, "
                    f"TPOT p50 {point.tpot_p50_ms:.2f} ms")
            res["serving"][name] = runs
        st.DEFAULT_PREFETCH_MB = 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", default="")
    ap.add_argument("--chain-set", default="1",
                    help="1: run 4's chain variants; 2: fork start/after, wide loads")
    ap.add_argument("--engine", default="off:0:bulk,bulk16:16:bulk,bulk24:24:bulk,bulk8:8:bulk,line16:16:line,"
                                        "load16:16:load,off2:0:bulk")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    global CHAIN_SET
    CHAIN_SET = a.chain_set
    out = Path(a.out)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, random_weights=True)
    save = lambda: (out / "engine_l2_prefetch.json").write_text(json.dumps(res, indent=1, default=str))  # noqa
    from flarectl.engine import gemv

    for part, fn in (("kernels", lambda: kernels_check(res)), ("single", lambda: single(res, gemv)),
                     ("chain", lambda: chain(res, gemv))):
        if part not in skip:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                log(f"{part}: ERROR {type(exc).__name__}: {exc}")
                res[f"{part}_error"] = str(exc)
            save()
            torch.cuda.empty_cache()
    if "engine" not in skip:
        variants = [(f[0], float(f[1]), f[2], f[3] if len(f) > 3 else "start")
                    for f in (v.split(":") for v in a.engine.split(","))]
        engine(res, variants, "serving" not in skip)
        save()

    print("\n| chain (GEMM impl) | variant | MB | ms | x roofline | vs off | same output |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in res.get("chain", {}).get("rows", []):
        if "ms" in r:
            print(f"| {r['impl']} | {r['variant']} | {r['mb']} | {r['ms']:.3f} | {r['x_roofline']:.2f} | "
                  f"{r['ratio']:.3f} | {r['same_output']} |")
    if "engine" in res:
        print(f"\nengine AR step C=8 ctx 512 commit=True; roofline {res['engine']['roofline_ms']:.3f} ms")
        print("| variant | prefetch MB | wall ms | replay ms | x roofline | logits identical to 'off' | argmax |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in res["engine"]["rows"]:
            print(f"| {r['variant']} | {r['prefetch_mb']:g} | {r['wall_ms']:.3f} | {r['replay_ms']:.3f} | "
                  f"{r['x_roofline']:.2f} | {r['logits_identical']} | {r['argmax_agree']:.3f} |")
    for name, runs in res.get("serving", {}).items():
        p = runs[-1]
        print(f"serving {name}: {p['tokens_per_second']:.0f} tok/s, step {p['step_ms']:.2f} ms, "
              f"TPOT p50 {p['tpot_p50_ms']:.2f} ms")
    save()


if __name__ == "__main__":
    main()
