"""Engine step profile and step cost on one GPU (issue 6): before (an earlier step, ``--before FILE``) vs after
(this tree's step: eager, torch.compiled, compiled + fused projections = the CUDA default), all CUDA-graphed, on a
random-init model (docs/perf/engine.md).

    python3 scripts/gpu/engine_profile.py --model qwen3.5-2b --out $OUT \
        [--before .engine_carry/before/static_step_head.py]

1. torch.profiler over one *ungraphed* AR step at C=8 per variant: kernels launched per step, summed kernel time,
   top kernels by CUDA time.
2. Step cost (median of 30 graph replays, each with its input copies, as ``flarectl bench --step-cost``) for AR at
   C=1,8,32 and verify / draft-denoise at C=8,32, against weight bytes / measured copy bandwidth.
3. Serving: engine AR at C=8 (2 x C requests, 128 new tokens, gsm8k prompts) before/after and HF generate.
Everything lands in ``engine_profile.json`` (kernel tables in ``engine_profile_kernels.txt``); a short table is
printed last. ``--model debug-hybrid`` runs the same on CPU (a smoke test of the script; no device activity).
Random weights: only times mean anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections import Counter
from pathlib import Path

import torch

from flarectl.engine import backends as backends_mod
from flarectl.engine import bench
from flarectl.engine.graphs import GraphedStep
from flarectl.engine.static_step import StaticStep
from flarectl.models.loading import load_model

RESULTS: dict = {}
CUDA = torch.cuda.is_available()
KERNEL = "fla" if CUDA else "torch"
# variant -> (compile, fuse); "before" is the committed step (--before); "fused" is this tree's CUDA default
VARIANTS = {"eager": (False, False), "compiled": (True, False), "fused": (True, True)}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def save(out: Path):
    (out / "engine_profile.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def load_before(path: str):
    spec = importlib.util.spec_from_file_location("static_step_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.StaticStep


def make_step(variant: str, model, cache, before_cls):
    if variant == "before":
        step = before_cls(model, cache, gdn_kernel=KERNEL)
        step.compiled = False
        return step
    compile, fuse = VARIANTS[variant]
    return StaticStep(model, cache, gdn_kernel=KERNEL, compile=compile, fuse=fuse)


def step_inputs(c: int, wc: int, ww: int, dev):
    return (torch.zeros(c, wc + ww, dtype=torch.long, device=dev), torch.full((c,), wc, dtype=torch.long, device=dev),
            torch.full((c,), ww, dtype=torch.long, device=dev), torch.zeros(c, dtype=torch.bool, device=dev))


def kernel_events(prof):
    """(name, microseconds) of every device activity in the profile."""
    out = []
    try:
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == torch.autograd.DeviceType.CUDA:
                out.append((e.name(), e.duration_ns() / 1000))
    except Exception:  # noqa: BLE001 - older/newer profiler API
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, e.device_time))
    return out


def profile_variant(variant, model, before_cls, out: Path, c=8, context=512):
    cache = model.new_cache(c, context + 12)
    cache.lengths.fill_(context)
    step = make_step(variant, model, cache, before_cls)
    args = step_inputs(c, 1, 0, model.device)
    with torch.no_grad():
        t0 = time.perf_counter()
        step(*args, 1)
        sync()
        first = time.perf_counter() - t0
        for _ in range(3):
            step(*args, 1)
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            step(*args, 1)
        sync()
        eager_ms = (time.perf_counter() - t0) * 100
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
        with torch.profiler.profile(activities=acts) as prof:
            step(*args, 1)
            sync()
    ev = kernel_events(prof)
    by = Counter()
    n = Counter()
    for name, us in ev:
        by[name] += us
        n[name] += 1
    lines = [f"{variant}: AR step C={c} context={context}: {len(ev)} device activities, {sum(by.values()):.0f} us "
             f"summed, ungraphed wall {eager_ms:.2f} ms/step, first call {first:.1f} s",
             f"{'us':>9} {'count':>6}  kernel"]
    for name, us in by.most_common(25):
        lines.append(f"{us:9.1f} {n[name]:6d}  {name[:150]}")
    text = "\n".join(lines)
    with open(out / "engine_profile_kernels.txt", "a") as f:
        f.write(text + "\n\n")
    print(text, flush=True)
    RESULTS.setdefault("profile", {})[variant] = dict(kernels=len(ev), kernel_us=sum(by.values()),
                                                      ungraphed_ms=eager_ms, first_call_s=first,
                                                      compiled=getattr(step, "compiled", False),
                                                      fused=bool(getattr(step, "fused", None)),
                                                      compile_error=getattr(step, "compile_error", None),
                                                      top=[(k, v, n[k]) for k, v in by.most_common(25)])
    del step, cache
    torch.cuda.empty_cache()


def time_steps(variant, model, before_cls, shapes, context=512, repeats=30, roof_ms=1.0):
    """{(kind, C): ms} for graph replays of this variant."""
    rows = []
    for c, kinds in shapes:
        cache = model.new_cache(c, context + 12)
        cache.lengths.fill_(context)
        step = make_step(variant, model, cache, before_cls)
        graphed = GraphedStep(step) if CUDA else step
        for kind, (wc, ww) in kinds:
            args = step_inputs(c, wc, ww, model.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(3):
                    graphed(*args, wc)
                sync()
                setup = time.perf_counter() - t0
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    graphed(*args, wc)
                    sync()
                    times.append(time.perf_counter() - t0)
            ms = 1000 * bench.percentile(times, 50)
            row = dict(variant=variant, kind=kind, concurrency=c, width_clean=wc, width_window=ww, ms=ms,
                       ratio_to_roofline=ms / roof_ms, setup_s=setup, compiled=getattr(step, "compiled", False))
            rows.append(row)
            log(f"{variant:9s} {kind:7s} C={c:2d} {ms:7.3f} ms  x{ms / roof_ms:4.2f}  (setup {setup:.1f}s, "
                f"compiled {row['compiled']})")
        del graphed, step, cache
        torch.cuda.empty_cache()
    return rows


def serving(model, variant, before_cls, prompts, c=8, max_new=128):
    if variant == "before":
        orig = backends_mod.StaticStep
        backends_mod.StaticStep = lambda m, cache, **kw: make_step("before", m, cache, before_cls)
    try:
        point, info = bench.engine_point(model, prompts, "ar", c, max_new_tokens=max_new, block_size=None,
                                         threshold=0.9, gdn_kernel=KERNEL, compile=variant != "before")
    finally:
        if variant == "before":
            backends_mod.StaticStep = orig
    log(f"serving {variant}: {point.tokens_per_second:.0f} tok/s, step {point.step_ms:.2f} ms, "
        f"TPOT p50 {point.tpot_p50_ms:.2f} ms {info}")
    return dict(variant=variant, **point.__dict__, **info)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3.5-2b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--before", default=".engine_carry/before/static_step_head.py")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--context", type=int, default=512)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    before_cls = load_before(a.before) if a.before and Path(a.before).is_file() else None
    variants = (["before"] if before_cls else []) + ["eager", "compiled", "fused"]
    log("loading", a.model)
    dev = "cuda" if CUDA else "cpu"
    with torch.device(dev):  # random init on the device, as `flarectl bench` does
        model = load_model(a.model, random_init=a.model != "debug-hybrid", device=dev)
    bw = bench.copy_bandwidth(model.device) if CUDA else 1e11
    wbytes = bench.weight_bytes(model)
    roof = 1000 * wbytes / bw
    RESULTS.update(model=a.model, device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(model.dtype),
                   torch=torch.__version__, weight_bytes=wbytes,
                   copy_bandwidth=bw, roofline_ms=roof, random_weights=True)
    log(f"weights {wbytes / 1e9:.2f} GB, copy {bw / 1e12:.2f} TB/s, roofline {roof:.3f} ms")
    save(out)

    for v in variants:
        profile_variant(v, model, before_cls, out, context=a.context)
        save(out)

    b = 4
    shapes = [(1, [("ar", (1, 0))]), (8, [("ar", (1, 0)), ("verify", (b + 1, 0)), ("draft", (b + 1, b))]),
              (32, [("ar", (1, 0)), ("verify", (b + 1, 0)), ("draft", (b + 1, b))])]
    RESULTS["steps"] = []
    for v in variants:  # unfused compiled: AR rows only (each shape is a compile)
        RESULTS["steps"] += time_steps(v, model, before_cls, shapes if v != "compiled" else
                                       [(c, k[:1]) for c, k in shapes], context=a.context, roof_ms=roof)
        save(out)

    if not a.skip_serving:
        tok = model.tokenizer
        prompts = bench.encode_prompts(tok, bench.load_prompt_texts("gsm8k"), 16)
        RESULTS["serving"] = []
        for v in (["before"] if before_cls else []) + ["fused"]:
            RESULTS["serving"].append(serving(model, v, before_cls, prompts, max_new=a.max_new))
            save(out)
        hf = bench.hf_baseline(model, prompts, 8, max_new_tokens=a.max_new)
        RESULTS["hf_generate"] = hf.__dict__
        log(f"HF generate C=8: {hf.tokens_per_second:.1f} tok/s")
        save(out)

    print("\n== summary (random weights; roofline %.3f ms) ==" % roof)
    for v, p in RESULTS["profile"].items():
        print(f"profile {v:9s}: {p['kernels']:5d} kernels/AR step (C=8), {p['kernel_us'] / 1000:.2f} ms kernel time, "
              f"compiled={p['compiled']} fused={p['fused']} {p['compile_error'] or ''}")
    print(f"{'kind':7s} {'C':>3s} " + " ".join(f"{v:>16s}" for v in variants))
    for c, kinds in shapes:
        for kind, _ in kinds:
            cells = []
            for v in variants:
                r = next((r for r in RESULTS["steps"] if r["variant"] == v and r["kind"] == kind
                          and r["concurrency"] == c), None)
                cells.append(f"{r['ms']:7.3f} (x{r['ratio_to_roofline']:4.2f})" if r else "-")
            print(f"{kind:7s} {c:3d} " + " ".join(f"{x:>16s}" for x in cells))
    if "serving" in RESULTS:
        hf = RESULTS["hf_generate"]["tokens_per_second"]
        for s in RESULTS["serving"]:
            tps = s["tokens_per_second"]
            print(f"serving AR C=8 {s['variant']:9s}: {tps:7.0f} tok/s = {tps / hf:5.1f}x "
                  f"HF ({hf:.1f} tok/s), step {s['step_ms']:.2f} ms, TPOT p50 {s['tpot_p50_ms']:.2f} ms")


if __name__ == "__main__":
    main()
