"""Serving loop before/after on one GPU (issue 6): the graphed AR step alone and the AR serving point at C=8
(tok/s, step ms, TTFT, TPOT) for the flarectl found first on ``sys.path`` or in ``--tree`` (an older checkout: the
'before'); ``--check-prefill`` compares the static prefill with ``prefill_into`` on this model; ``--autotune``
times the graphed AR step compiled with inductor's max-autotune (no CUDA graphs of its own; its logits are compared
with the uncompiled step's).
Random weights (Qwen3.5-2B shape): only times mean anything. Writes ``engine_loop_<label>.json`` to ``--out``.

    python3 scripts/gpu/engine_loop_bench.py --label before --tree .engine_carry/before/tree --out $OUT
    python3 scripts/gpu/engine_loop_bench.py --label after --out $OUT --check-prefill [--hf]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def graphed_ar_ms(model, c=8, context=512, repeats=50, **backend_kw):
    """Median time of one graphed AR step (C x 1 token, every slot holding ``context`` tokens), inputs included."""
    import torch

    from flarectl.engine.backends import SlotBackend

    be = SlotBackend(model, c, context + 12, **backend_kw)
    be.cache.lengths.fill_(context)
    dev = model.device
    ids = torch.zeros(c, 1, dtype=torch.long, device=dev)
    counts = torch.ones(c, dtype=torch.long, device=dev)
    zeros = torch.zeros(c, dtype=torch.long, device=dev)
    commit = torch.zeros(c, dtype=torch.bool, device=dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            out = be.step(ids, counts, zeros, commit, 1)
        sync()
        setup = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            be.step(ids, counts, zeros, commit, 1)
            sync()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), setup, out.float().clone(), be


def check_prefill(model, prompts, capacity):
    """Static prefill vs ``prefill_into`` on this model: relative error of the GDN states and of the next AR step's
    logits (bf16: rounding differs between the two paths)."""
    import torch

    from flarectl.engine.backends import SlotBackend

    outs = []
    for path in ("static", "adapter"):
        be = SlotBackend(model, len(prompts), capacity, prefill=path)
        be.prefill(list(range(len(prompts))), [p[:-1] for p in prompts])
        ids = torch.tensor([[p[-1]] for p in prompts], device=model.device)
        ones = torch.ones(len(prompts), dtype=torch.long, device=model.device)
        with torch.no_grad():
            logits = be.step(ids, ones, ones * 0, ones.bool(), 1).float().clone()
        states = torch.stack([c.state.float() for c in be.cache.gdn.values()])
        outs.append((be.cache.lengths.clone(), states, logits))
        del be
    (la, sa, ga), (lb, sb, gb) = outs
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    agree = float((ga.argmax(-1) == gb.argmax(-1)).float().mean())
    return dict(lengths_equal=bool(torch.equal(la, lb)), state_rel_err=rel(sa, sb), logits_rel_err=rel(ga, gb),
                argmax_agreement=agree)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tree", default=None)
    ap.add_argument("--model", default="qwen3.5-2b")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--serving-repeats", type=int, default=2)
    ap.add_argument("--check-prefill", action="store_true")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--autotune", action="store_true")
    a = ap.parse_args()
    if a.tree:
        sys.path.insert(0, str(Path(a.tree).resolve()))
    import torch

    import flarectl
    from flarectl.engine import bench
    from flarectl.models.loading import load_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of the script (--model debug-hybrid)
    res = dict(label=a.label, flarectl=flarectl.__file__,
               device=torch.cuda.get_device_name() if dev == "cuda" else dev,
               torch=torch.__version__, model=a.model, random_weights=True)
    save = lambda: (out / f"engine_loop_{a.label}.json").write_text(json.dumps(res, indent=1, default=str))  # noqa
    log(a.label, flarectl.__file__)
    with torch.device(dev):
        model = load_model(a.model, random_init=not a.model.startswith("debug"), device=dev)
    if model.tokenizer is not None:
        prompts = bench.encode_prompts(model.tokenizer, bench.load_prompt_texts("gsm8k"), 16)
    else:
        prompts = [[(7 * i + j) % 200 for j in range(30 + i % 14)] for i in range(16)]

    if not a.autotune:
        ms, setup, _, be = graphed_ar_ms(model)
        res["graphed_ar_c8_ms"], res["graphed_ar_setup_s"] = ms, setup
        log(f"{a.label}: graphed AR step C=8: {ms:.3f} ms (setup {setup:.1f} s, compiled {be.compiled})")
        del be
        save()

    res["serving"] = []
    for i in range(a.serving_repeats):
        point, info = bench.engine_point(model, prompts, "ar", 8, max_new_tokens=a.max_new, block_size=None,
                                         threshold=0.9)
        res["serving"].append(point.__dict__ | info)
        log(f"{a.label}: serving AR C=8 run {i}: {point.tokens_per_second:.0f} tok/s, step {point.step_ms:.2f} ms, "
            f"TPOT p50/p99 {point.tpot_p50_ms:.2f}/{point.tpot_p99_ms:.2f} ms, TTFT p50/p99 "
            f"{point.ttft_p50_ms:.1f}/{point.ttft_p99_ms:.1f} ms {info}")
        save()

    if a.check_prefill:
        capacity = max(map(len, prompts)) + a.max_new + 4  # engine_point's: its compiled shapes serve again
        res["prefill_check"] = check_prefill(model, prompts[:8], capacity)
        log(f"{a.label}: static vs adapter prefill: {res['prefill_check']}")
        save()

    if a.hf:
        hf = bench.hf_baseline(model, prompts, 8, max_new_tokens=a.max_new)
        res["hf_generate"] = hf.__dict__
        log(f"HF generate C=8: {hf.tokens_per_second:.1f} tok/s")
        save()

    if a.autotune:  # against the uncompiled graphed step of this process (no compile to wait for)
        ms_at, setup_at, logits_at, be = graphed_ar_ms(model, compile_mode="max-autotune-no-cudagraphs")
        res["autotune"] = dict(graphed_ar_c8_ms=ms_at, setup_s=setup_at, compiled=be.compiled,
                               compile_error=be.eager.compile_error)
        log(f"{a.label}: max-autotune graphed AR step C=8: {ms_at:.3f} ms, setup {setup_at:.1f} s, "
            f"compiled {be.compiled}")
        save()
        del be
        ms_eager, _, logits_eager, _ = graphed_ar_ms(model, compile=False)
        diff = float((logits_at - logits_eager).norm() / logits_eager.norm())
        res["autotune"] |= dict(uncompiled_graphed_ar_c8_ms=ms_eager, logits_rel_diff_vs_uncompiled=diff)
        log(f"{a.label}: uncompiled graphed AR step C=8: {ms_eager:.3f} ms; max-autotune logits rel diff {diff:.2e}")
        save()


if __name__ == "__main__":
    main()
