"""Issue 6, session 5: the skinny-GEMM kernel and the in-place-commit GDN recurrence on one GPU, one process.

1. GEMMs at M=8 (the Qwen3.5-2B step's projection shapes): cuBLAS ``F.linear`` vs the best ``gemv`` kernel config,
   each timed L2-cold (``gemv.cold_ms``: a 512 MB memset before each launch), ms and weight-read TB/s; the tuner's
   table (the op uses cuBLAS for shapes where cuBLAS timed faster).
2. Graphed AR step at C=8, context 512, four variants in the same process: before (fla recurrence + where commit,
   cuBLAS), +gemv, +triton recurrence, both (this tree's CUDA default) — commit=False (as earlier sessions
   measured: perf_counter around inputs + replay + sync) and commit=True (every row commits, as in AR serving;
   CUDA events around the replay only); logits vs 'before' (rel diff, argmax agreement).
3. torch.profiler of one ungraphed compiled AR step, before vs both: kernel count, summed time, top kernels.
4. AR serving at C=8 before/after (bench.engine_point, 16 prompts x 128 tokens, second run quoted).
Random weights: only times mean anything. Writes engine_session5.json and prints a table last.

    python3 scripts/gpu/engine_session5.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from flarectl.engine import mixer as mixer_defaults

VARIANTS = {"before": dict(gdn_kernel="fla", gemv=False), "gemv": dict(gdn_kernel="fla", gemv=True),
            "triton-rec": dict(gdn_kernel="triton", gemv=False), "both": dict(gdn_kernel="triton", gemv=True),
            # session 7: the whole GDN mixer (conv, gates, recurrence, gated norm) in one Triton kernel
            "mixer": dict(gdn_kernel="mixer", gemv=True, fuse_down=False, v_block=None),
            "both2": dict(gdn_kernel="triton", gemv=True),
            "mixer2": dict(gdn_kernel="mixer", gemv=True, fuse_down=False, v_block=None),
            # session 6 (2026-11-23): mixer without the fused down projection (the session-5 mixer), with it, and
            # the mixer's state split into v-blocks of 64 / 32 / 16 columns ("default": the defaults of the tree)
            "mixer-nofuse": dict(gdn_kernel="mixer", gemv=True, fuse_down=False, v_block=None),
            "down": dict(gdn_kernel="mixer", gemv=True, fuse_down=True, v_block=None),
            "vb64": dict(gdn_kernel="mixer", gemv=True, fuse_down=True, v_block=64),
            "vb32": dict(gdn_kernel="mixer", gemv=True, fuse_down=True, v_block=32),
            "vb16": dict(gdn_kernel="mixer", gemv=True, fuse_down=True, v_block=16),
            "vb32-nofuse": dict(gdn_kernel="mixer", gemv=True, fuse_down=False, v_block=32),
            # programmatic dependent launch: of the engine's kernels only (gemv, mixer), and of inductor's too
            "default": dict(), "default2": dict(),
            "pdl-ours": dict(gemv_pdl=True, pdl=False), "pdl-all": dict(gemv_pdl=True, pdl=True),
            # the decode-attention kernel (each row's visible slots) instead of SDPA over the masked capacity
            "attn": dict(attn_kernel=True), "attn2": dict(attn_kernel=True), "sdpa": dict(attn_kernel=False),
            # session 7: residual add + RMSNorm inside the projections, SwiGLU inside gate|up (norm_gemv)
            "norm": dict(fuse_norm=True), "norm2": dict(fuse_norm=True), "nonorm": dict(fuse_norm=False),
            "nonorm2": dict(fuse_norm=False),
            # session 8: skinny-GEMM configurations tuned in a graphed chain (gemv.chain_ms) or L2-cold one at a time
            "chain": dict(fuse_norm=True, tune="chain"), "cold": dict(fuse_norm=True, tune="cold"),
            "chain2": dict(fuse_norm=True, tune="chain"), "cold2": dict(fuse_norm=True, tune="cold")}


DEFAULT_V_BLOCK = mixer_defaults.V_BLOCK


def backend(model, c, capacity, **kw):
    """A SlotBackend of the variant ``kw``; ``v_block`` (mixer.V_BLOCK) is a module setting, read at launch (and so
    at graph capture)."""
    from flarectl.engine import mixer
    from flarectl.engine.backends import SlotBackend

    from flarectl.engine import gemv

    kw = dict(kw)
    mixer.V_BLOCK = kw.pop("v_block", DEFAULT_V_BLOCK)
    gemv.PDL = kw.pop("gemv_pdl", None)
    if "tune" in kw:  # tune again, this way
        from flarectl.engine import norm_gemv

        gemv.TUNE_MODE = kw.pop("tune")
        gemv._CHOSEN.clear()
        norm_gemv._CHOSEN.clear()
    return SlotBackend(model, c, capacity, **kw)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def graph_ms(fn, calls=20, replays=20):
    """Per-call ms of ``fn`` captured ``calls`` times in one CUDA graph (median over replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def gemm_table(model, step):
    import torch.nn.functional as F

    from flarectl.engine import gemv
    from flarectl.models.adapter import ATTENTION

    shapes = {}
    for i, kind in enumerate(model.layer_kinds):
        f, layer = step.fused.get(i, {}), model.layers[i]
        mlp = layer.mlp
        if kind == ATTENTION:
            shapes.setdefault("attn qkv", f["w_qkv"])
            shapes.setdefault("attn o_proj", layer.self_attn.o_proj.weight)
        else:
            shapes.setdefault("gdn in (qkv|z|b|a)", f["w_in"])
            shapes.setdefault("gdn out_proj", layer.linear_attn.out_proj.weight)
        shapes.setdefault("mlp gate|up", f["w_gate_up"])
        shapes.setdefault("mlp down", mlp.down_proj.weight)
    shapes["lm head"] = model.hf.lm_head.weight
    rows = []
    x_all = torch.randn(8, 8192, device=model.device, dtype=torch.bfloat16)
    for name, w in shapes.items():
        x = x_all[:, :w.shape[1]].contiguous()
        with torch.no_grad():
            ref = F.linear(x, w).float()
            out = gemv.launch(x, w, gemv.tune(x, w)).float() if gemv.tune(x, w) != gemv.CUBLAS else ref
            gemv._CHOSEN[gemv._key(x, w)] = gemv.tune(x, w)
            err = float((out - ref).norm() / ref.norm())
            best = min((r for r in gemv.TIMINGS[gemv._key(x, w)] if r[0] != gemv.CUBLAS), key=lambda r: r[1])
            t_cublas = gemv.cold_ms(lambda: F.linear(x, w), x.device, 20)  # L2-cold, one launch
            t_gemv = gemv.cold_ms(lambda: gemv.launch(x, w, best[0]), x.device, 20)
        gb = w.numel() * w.element_size() / 1e9
        cfg = f"best kernel {best[0]}, chosen {gemv._CHOSEN.get(gemv._key(x, w))}"
        rows.append(dict(name=name, N=w.shape[0], K=w.shape[1], cublas_ms=t_cublas, gemv_ms=t_gemv,
                         cublas_tbs=gb / t_cublas, gemv_tbs=gb / t_gemv, rel_err_vs_cublas=err,
                         config=str(cfg), tuned=[(str(c), t) for c, t in gemv.TIMINGS.get(gemv._key(x, w), [])]))
        log(f"gemm {name:20s} N={w.shape[0]:6d} K={w.shape[1]:5d} cublas {t_cublas * 1e3:7.1f} us "
            f"({gb / t_cublas:.2f} TB/s)  gemv {t_gemv * 1e3:7.1f} us ({gb / t_gemv:.2f} TB/s) {cfg} err {err:.1e}")
    return rows


def step_times(model, commit: bool, c=8, context=512, repeats=50, **kw):
    """(median ms with perf_counter around inputs+replay+sync, median replay-only ms by CUDA events, logits, be)."""
    be = backend(model, c, context + 12, **kw)
    dev = model.device
    ids = torch.zeros(c, 1, dtype=torch.long, device=dev)
    counts = torch.ones(c, dtype=torch.long, device=dev)
    zeros = torch.zeros(c, dtype=torch.long, device=dev)
    com = torch.full((c,), commit, dtype=torch.bool, device=dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            be.cache.lengths.fill_(context)
            out = be.step(ids, counts, zeros, com, 1)
        torch.cuda.synchronize()
        setup = time.perf_counter() - t0
        wall, replay = [], []
        graph = be._step.graphs[(1, 0)][0]
        for _ in range(repeats):
            be.cache.lengths.fill_(context)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            be.step(ids, counts, zeros, com, 1)
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
        for _ in range(repeats):
            be.cache.lengths.fill_(context)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            replay.append(a.elapsed_time(b))
    return 1000 * statistics.median(wall), statistics.median(replay), setup, out.float().clone(), be


def profile_step(model, c=8, context=512, **kw):
    from torch.profiler import ProfilerActivity, profile


    be = backend(model, c, context + 12, cuda_graphs=False, **kw)
    be.cache.lengths.fill_(context)
    dev = model.device
    ids = torch.zeros(c, 1, dtype=torch.long, device=dev)
    ones = torch.ones(c, dtype=torch.long, device=dev)
    com = torch.ones(c, dtype=torch.bool, device=dev)
    with torch.no_grad():
        for _ in range(3):
            be.cache.lengths.fill_(context)
            be.step(ids, ones, ones * 0, com, 1)
        torch.cuda.synchronize()
        be.cache.lengths.fill_(context)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            be.step(ids, ones, ones * 0, com, 1)
            torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in evs) / 1000
    count = sum(e.count for e in evs)
    top = sorted(evs, key=lambda e: -e.device_time_total)[:int(os.environ.get("PROFILE_TOP", "12"))]
    return dict(kernels=count, kernel_ms=total,
                top=[(e.key[:110], e.count, e.device_time_total / 1000) for e in top])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", default="", help="comma list of: gemm,steps,profile,serving")
    ap.add_argument("--variants", default="before,gemv,triton-rec,both", help="step variants, in this order "
                    "(logits compared with the first)")
    ap.add_argument("--profile", default="before,both", help="variants profiled (ungraphed, compiled)")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    from flarectl.engine import bench
    from flarectl.engine.static_step import StaticStep
    from flarectl.models.loading import load_model

    out = Path(a.out)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, random_weights=True)
    save = lambda: (out / "engine_session5.json").write_text(json.dumps(res, indent=1, default=str))  # noqa
    with torch.device("cuda"):
        model = load_model("qwen3.5-2b", random_init=True, device="cuda")
    wbytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    res["weight_gb"] = wbytes / 1e9
    log(f"model loaded, {wbytes / 1e9:.2f} GB of weights")

    if "gemm" not in skip:
        step = StaticStep(model, model.new_cache(1, 16), compile=False, fuse=True)
        res["gemm"] = gemm_table(model, step)
        del step
        save()

    base = None
    res["steps"] = {}
    if "steps" not in skip:
        for name in a.variants.split(","):
            kw = VARIANTS[name]
            r = {}
            for commit in (False, True):
                wall, rep, setup, logits, be = step_times(model, commit, **kw)
                r[f"commit={commit}"] = dict(wall_ms=wall, replay_ms=rep, setup_s=setup, compiled=be.compiled,
                                             gemv=be.eager.gemv, kernel=be.gdn_kernel,
                                             fuse_down=be.eager.fuse_down, v_block=kw.get("v_block"),
                                             pdl=be.eager.pdl, gemv_pdl=kw.get("gemv_pdl"),
                                             attn_kernel=be.eager.attn_kernel,
                                             compile_error=be.eager.compile_error)
                if commit and "tune" in kw:
                    from flarectl.engine import gemv, norm_gemv

                    chosen = {"x".join(map(str, k[:3])) + "".join(f"/{v}" for v in k[5:]): str(c)
                              for k, c in list(gemv._CHOSEN.items()) + list(norm_gemv._CHOSEN.items())}
                    r["chosen"] = chosen
                    log(f"chosen ({kw['tune']}): {chosen}")
                if commit:
                    if base is None:
                        base = logits
                    r["logits_rel_diff_vs_before"] = float((logits - base).norm() / base.norm())
                    r["argmax_agree_vs_before"] = float((logits.argmax(-1) == base.argmax(-1)).float().mean())
                log(f"step {name:10s} commit={commit!s:5s}: wall {wall:.3f} ms, replay {rep:.3f} ms "
                    f"(setup {setup:.1f} s, compiled {be.compiled}, gemv {be.eager.gemv}, {be.gdn_kernel})")
                del be
                torch.cuda.empty_cache()
            res["steps"][name] = r
            save()

    if "profile" not in skip:
        res["profile"] = {}
        for name in a.profile.split(","):
            p = profile_step(model, **VARIANTS[name])
            res["profile"][name] = p
            log(f"profile {name}: {p['kernels']} kernels, {p['kernel_ms']:.3f} ms summed")
            for k, n, ms in p["top"]:
                log(f"    {ms:7.3f} ms  x{n:4d}  {k}")
            save()

    if "serving" not in skip:
        prompts = bench.encode_prompts(model.tokenizer, bench.load_prompt_texts("gsm8k"), 16)
        res["serving"] = {}
        for name, gk, gm in (("before", "fla", "0"), ("after", "auto", "1")):
            os.environ["FLARECTL_ENGINE_GEMV"] = gm
            runs = []
            for i in range(2):
                point, info = bench.engine_point(model, prompts, "ar", 8, max_new_tokens=128, block_size=None,
                                                 threshold=0.9, gdn_kernel=gk)
                runs.append(point.__dict__ | info)
                log(f"serving {name} run {i}: {point.tokens_per_second:.0f} tok/s, step {point.step_ms:.2f} ms, "
                    f"TPOT p50 {point.tpot_p50_ms:.2f} ms, TTFT p50 {point.ttft_p50_ms:.1f} ms")
            res["serving"][name] = runs
            save()
        os.environ.pop("FLARECTL_ENGINE_GEMV", None)

    roof = res["weight_gb"] / 2.97  # ms at the copy bandwidth measured earlier on the H100 (2.97 TB/s)
    print("\n| variant | commit=False wall ms | commit=True wall ms | replay ms (commit=True) | x roofline |"
          " logits rel diff | argmax agree |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in res["steps"].items():
        f, t = r["commit=False"], r["commit=True"]
        print(f"| {name} | {f['wall_ms']:.3f} | {t['wall_ms']:.3f} | {t['replay_ms']:.3f} | "
              f"{t['wall_ms'] / roof:.2f} | {r['logits_rel_diff_vs_before']:.2e} | {r['argmax_agree_vs_before']:.3f} |")
    print(f"roofline {roof:.3f} ms ({res['weight_gb']:.2f} GB / 2.97 TB/s)")
    for name, runs in res.get("serving", {}).items():
        p = runs[-1]
        print(f"serving {name}: {p['tokens_per_second']:.0f} tok/s, step {p['step_ms']:.2f} ms, "
              f"TPOT p50 {p['tpot_p50_ms']:.2f} ms")
    save()


if __name__ == "__main__":
    main()
