"""Benchmark: two-stream gated delta rule — simple vs fused vs clean-stream-only (fla, the floor).

FLARE layout: one clean document of T tokens; a noisy window of B tokens after every multiple of B (T/B windows,
Tn = T noisy tokens). Measures, per variant: forward latency (no grad), forward+backward latency (median of
``repeats`` runs, CUDA events, after warm-up) and the peak memory of one forward+backward above the inputs
(torch.cuda.max_memory_allocated).

    python -m flare_kernels.bench.bench_kernels --out docs/perf      # table, kernels.json, kernels.png

``run_kernel_benchmark`` is the entry point ``flarectl bench kernels`` imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("clean", "fused", "simple")
# Optional rows: the fused path with the window map in torch (bf16 / fp32 operands), and with the first window
# design (one Triton program per window / per chunk walking its windows). "fused" itself is the Triton map.
EXTRA_VARIANTS = {"fused-torch-map": "chunk", "fused-f32": "chunk-f32", "fused-loop": "loop",
                  "fused-chunk-triton": "chunk-triton"}


def _inputs(T, B, heads, dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    H = HV = heads
    K = V = dim
    W = T // B
    P = dict(
        q=r(1, T, H, K), k=F.normalize(r(1, T, H, K), dim=-1), v=r(1, T, HV, V),
        g=F.logsigmoid(r(1, T, HV)) * 0.2, beta=torch.rand(1, T, HV, generator=gen),
        qn=r(1, W * B, H, K), kn=F.normalize(r(1, W * B, H, K), dim=-1), vn=r(1, W * B, HV, V),
        gn=F.logsigmoid(r(1, W * B, HV)) * 0.2, betan=torch.rand(1, W * B, HV, generator=gen),
    )
    P = {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in P.items()}
    P.update(window_doc=torch.zeros(W, dtype=torch.long, device=device),
             window_prefix=torch.arange(W, device=device) * B,
             window_offsets=torch.arange(W + 1, device=device) * B,
             cu_seqlens=torch.tensor([0, T], dtype=torch.long, device=device))
    return P


def _call(variant, P):
    if variant == "clean":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        from flare_kernels.two_stream.fused import enable_fla_hopper_bypass

        enable_fla_hopper_bypass(P["q"].device)  # fla's public op raises on Hopper/Triton<3.7.1 otherwise

        o, _ = chunk_gated_delta_rule(P["q"], P["k"], P["v"], P["g"], P["beta"], cu_seqlens=P["cu_seqlens"])
        return (o,)
    if variant in EXTRA_VARIANTS:  # alternative window implementations of the fused path, for comparison
        from flare_kernels.two_stream.fused import fused_two_stream_gated_delta_rule

        o, on, _ = fused_two_stream_gated_delta_rule(**P, _window=EXTRA_VARIANTS[variant])
        return (o, on)
    from flare_kernels.two_stream import two_stream_gated_delta_rule

    o, on, _ = two_stream_gated_delta_rule(**P, backend=variant)
    return (o, on)


def _time(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), min(times), max(times)


def bench_one(variant, T, B, heads=16, dim=128, dtype=torch.bfloat16, repeats=20, log=print):
    dev = torch.device("cuda")
    t0 = time.time()
    P = _inputs(T, B, heads, dim, dtype, dev)
    outs = _call(variant, P)  # compile / autotune
    torch.cuda.synchronize()
    log(f"    {variant} T={T} B={B}: first forward {time.time() - t0:.1f}s")
    grads = [torch.randn_like(o) for o in outs]

    def fwd():
        with torch.no_grad():
            _call(variant, P)

    def fwd_bwd():
        os_ = _call(variant, P)
        torch.autograd.backward(os_, grads)
        for t in P.values():
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None

    fwd_bwd()
    torch.cuda.synchronize()
    log(f"    {variant} T={T} B={B}: first backward done at {time.time() - t0:.1f}s")
    f_med, f_min, f_max = _time(fwd, repeats)
    fb_med, fb_min, fb_max = _time(fwd_bwd, repeats)
    log(f"    {variant} T={T} B={B}: timed at {time.time() - t0:.1f}s")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    base_f = torch.cuda.memory_allocated()
    fwd()
    torch.cuda.synchronize()
    peak_f = torch.cuda.max_memory_allocated() - base_f
    del P, outs, grads
    torch.cuda.empty_cache()
    return dict(variant=variant, T=T, B=B, heads=heads, dim=dim, dtype=str(dtype).replace("torch.", ""),
                fwd_ms=f_med, fwd_ms_min=f_min, fwd_ms_max=f_max, fwd_bwd_ms=fb_med, fwd_bwd_ms_min=fb_min,
                fwd_bwd_ms_max=fb_max, peak_fwd_bwd_gib=peak / 2**30, peak_fwd_gib=peak_f / 2**30,
                repeats=repeats)


def run_kernel_benchmark(T_list=(4096, 8192), block_sizes=(1, 4), heads=16, dim=128, dtype=torch.bfloat16,
                         repeats=20, variants=VARIANTS, log=print) -> list[dict]:
    """Rows of {variant, T, B, fwd_ms, fwd_bwd_ms, peak_fwd_bwd_gib, peak_fwd_gib, ...}; "clean" rows are the
    clean stream alone (fla's chunk_gated_delta_rule), measured once per T and repeated for each B."""
    rows = []
    for T in T_list:
        clean = None
        for B in block_sizes:
            for v in variants:
                if v == "clean" and clean is not None:
                    rows.append({**clean, "B": B})
                    continue
                t0 = time.time()
                try:
                    row = bench_one(v, T, B, heads, dim, dtype, repeats, log=log)
                except torch.cuda.OutOfMemoryError as e:
                    row = dict(variant=v, T=T, B=B, heads=heads, dim=dim, error=f"OOM: {e}"[:200])
                    torch.cuda.empty_cache()
                if v == "clean":
                    clean = row
                rows.append(row)
                log(f"  {v:6s} T={T} B={B}: {row.get('fwd_ms', float('nan')):.2f} ms fwd, "
                    f"{row.get('fwd_bwd_ms', float('nan')):.2f} ms fwd+bwd, "
                    f"{row.get('peak_fwd_bwd_gib', float('nan')):.2f} GiB ({time.time() - t0:.0f}s)")
                with open(os.environ.get("FLARE_BENCH_PARTIAL", os.devnull), "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def summarize(rows):
    """Per (T, B): speed-up and memory ratio of fused over simple, noisy-stream cost relative to the clean one."""
    out = []
    by = {(r["T"], r["B"], r["variant"]): r for r in rows if "error" not in r}
    for T, B in sorted({(r["T"], r["B"]) for r in rows}):
        c, f, s = by.get((T, B, "clean")), by.get((T, B, "fused")), by.get((T, B, "simple"))
        d = dict(T=T, B=B)
        if f and s:
            d["speedup_fwd_bwd"] = s["fwd_bwd_ms"] / f["fwd_bwd_ms"]
            d["speedup_fwd"] = s["fwd_ms"] / f["fwd_ms"]
            d["mem_ratio_fwd_bwd"] = s["peak_fwd_bwd_gib"] / max(f["peak_fwd_bwd_gib"], 1e-9)
        if f and c:
            d["noisy_over_clean_fwd_bwd"] = (f["fwd_bwd_ms"] - c["fwd_bwd_ms"]) / c["fwd_bwd_ms"]
            d["noisy_over_clean_fwd"] = (f["fwd_ms"] - c["fwd_ms"]) / c["fwd_ms"]
        out.append(d)
    return out


def table(rows, summary):
    lines = ["| variant | T | B | fwd ms | fwd+bwd ms | peak fwd GiB | peak fwd+bwd GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['T']} | {r['B']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['T']} | {r['B']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                     f"{r['peak_fwd_gib']:.3f} | {r['peak_fwd_bwd_gib']:.3f} |")
    lines += ["", "| T | B | simple/fused fwd+bwd | simple/fused fwd | simple/fused peak mem | noisy/clean fwd+bwd |"
              " noisy/clean fwd |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        g = lambda k: f"{s[k]:.2f}" if k in s else "-"  # noqa: E731
        lines.append(f"| {s['T']} | {s['B']} | {g('speedup_fwd_bwd')} | {g('speedup_fwd')} | "
                     f"{g('mem_ratio_fwd_bwd')} | {g('noisy_over_clean_fwd_bwd')} | {g('noisy_over_clean_fwd')} |")
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    keys = sorted({(r["T"], r["B"]) for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    present = [v for v in (*VARIANTS, *EXTRA_VARIANTS) if any(r["variant"] == v for r in ok)]
    width = 0.8 / max(len(present), 1)
    for i, v in enumerate(present):
        xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(keys))]
        lat = [next((r["fwd_bwd_ms"] for r in ok if (r["T"], r["B"], r["variant"]) == (*k, v)), 0) for k in keys]
        mem = [next((r["peak_fwd_bwd_gib"] for r in ok if (r["T"], r["B"], r["variant"]) == (*k, v)), 0)
               for k in keys]
        axes[0].bar(xs, lat, width, label=v)
        axes[1].bar(xs, mem, width, label=v)
    for ax, title in zip(axes, ("forward+backward latency (ms, median)", "peak memory fwd+bwd (GiB)")):
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"T={T}\nB={B}" for T, B in keys])
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("two-stream gated delta rule: simple vs fused vs clean stream only")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--B", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", default="docs/perf", help="folder for kernels.json and kernels.png")
    a = ap.parse_args(argv)

    os.makedirs(a.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}", flush=True)
    from flare_kernels.two_stream.fused import dqkwg_mode

    dqkwg_mode("cuda")  # Hopper self-check before timing anything
    rows = run_kernel_benchmark(a.T, a.B, a.heads, a.dim, getattr(torch, a.dtype), a.repeats, a.variants)
    summ = summarize(rows)

    meta = dict(device=dev, torch=torch.__version__, command="python -m flare_kernels.bench.bench_kernels "
                + " ".join(argv if argv is not None else sys.argv[1:]), dqkwg_mode=dqkwg_mode("cuda"))
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(os.path.join(a.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=summ), f, indent=1)
    chart(rows, os.path.join(a.out, "kernels.png"))
    print(table(rows, summ))
    return rows


if __name__ == "__main__":
    main()
