"""The serving loop's cost beyond the graphed forward, per mode, with the loop changes off and on (issue 6).
- AR: the overlapped steps (``Engine.overlap``, session 25).
- Trust modes: the one-pass greedy read-out (``modes.GREEDY_READ``, session 25); on top of it the late commit's row
  copy as one Triton launch one step at a time (``row_copy.KERNEL``, session 26); or the overlapped trust loop
  (``Engine.overlap``: decisions on the device, ``trust_overlap``, session 26; it always takes the row copy kernel).
Random weights (Qwen3.5-2B shape, bf16), C=8, gsm8k-style prompts, EOS ignored. With random weights drafts are rarely
accepted (the trust modes' tokens/forward is ~1), so what is compared is the loop's time per step.

Per mode one engine is built and warmed up; then serving runs of ``--requests`` x ``--max-new`` alternate the
variants (``--rounds`` each, after one discarded run each), same engine, same graphs. Per run: tok/s, the median
wall time of a steady engine step (no admission in it; it includes the device->host read of the step's tokens, so
the GPU work and the host work that does not overlap it), and the GPU floor of those steps: each step shape's graph
replayed alone (CUDA events, median of 20, nothing committed), averaged over the shapes the run stepped through.
Host = step - floor. Also times the read-out itself on a trust step's logits [64, V] against the generic path.

    source scripts/gpu/engine_setup.sh; python3 scripts/gpu/engine_loop_changes.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def read_out_us(vocab: int, rows: int = 64, repeats: int = 50) -> dict:
    """The greedy read-out of [rows, V] bf16 logits: the kernel + one copy to the host against the generic path the
    modes used (fp32 one-hot argmax for AR-Trust; softmax + gather for Diffusion-Trust, then the copy)."""
    import torch

    from flarectl.decoding import diffusion_trust
    from flarectl.decoding.sampling import Sampler, process_logits
    from flarectl.engine.argmax import greedy_read

    x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    greedy = Sampler.create(0.0, 1.0, 0, "cuda")

    def kernel():
        greedy_read(x)

    def ar_trust_generic():
        process_logits(x, 0.0).argmax(-1).tolist()

    def dt_generic():
        tok, conf = diffusion_trust.propose(x, greedy)
        torch.stack([tok.to(conf.dtype), conf]).cpu()

    out = {}
    for name, fn in [("kernel", kernel), ("ar_trust_generic", ar_trust_generic), ("dt_generic", dt_generic)]:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[name] = 1e6 * statistics.median(times)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3.5-2b")
    ap.add_argument("--modes", default="ar-trust,diffusion-trust,ar")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the loop (no graphs, no floors)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    from flarectl.engine import Engine, Request, bench, modes, row_copy
    from flarectl.models.loading import load_model

    a.out.mkdir(parents=True, exist_ok=True)
    cuda = a.device == "cuda"
    with torch.device(a.device):
        model = load_model(a.model, random_init=True, device=a.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vocab = int(model.hf.get_input_embeddings().weight.shape[0])
    log(f"{a.model}: random weights, {model.dtype}, vocab {vocab}")
    report = {"model": a.model, "weights": "random", "dtype": str(model.dtype), "vocab": vocab,
              "concurrency": a.concurrency, "requests": a.requests, "max_new_tokens": a.max_new, "block": a.block,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "read_out_us": read_out_us(vocab) if cuda else {}, "runs": []}
    log("read-out [64, V]:", json.dumps(report["read_out_us"]))
    prompts = bench.encode_prompts(model.tokenizer, bench.load_prompt_texts("gsm8k"), a.requests)
    capacity = max(map(len, prompts)) + a.max_new + 2 * a.block + 2
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        engine = Engine(model, concurrency=a.concurrency, capacity=capacity, mask_token_id=vocab - 1,
                        block_size=a.block if mode != "ar" else None)
        engine.warmup([mode], a.block)
        shapes = bench.count_step_shapes(engine)

        # (name, greedy read-out, overlap): AR overlaps or not; a trust mode takes the read-out, then the overlapped
        # trust loop on top of it (its decisions on the device: trust_overlap)
        # rowcopy: the late commit's masked row copy as one Triton launch (row_copy.KERNEL) one step at a time; the
        # overlapped trust loop always takes it (it commits after every step)
        variants = ([("base", False, False, False), ("overlap", False, True, False)] if mode == "ar" else
                    [("base", False, False, False), ("greedy_read", True, False, False),
                     ("read+rowcopy", True, False, True), ("read+overlap", True, True, False)])

        def serve(variant) -> dict:
            name, read, overlap, copy_kernel = variant
            modes.GREEDY_READ, engine.overlap, row_copy.KERNEL = read, overlap, copy_kernel
            shapes.clear()
            engine.done.clear()
            engine.submitted, engine.steps, engine.overlapped_steps = 0, 0, 0
            for p in prompts:
                engine.submit(Request(p, mode, max_new_tokens=a.max_new, stop_ids=[], threshold=0.9))
            walls = []
            sync()
            start = time.perf_counter()
            while engine.busy:
                admitting = bool(engine.waiting and engine.free)
                s = time.perf_counter()
                engine.step()
                if not admitting:
                    walls.append(time.perf_counter() - s)
            sync()
            total = time.perf_counter() - start
            tokens = sum(len(r.token_ids) for r in engine.done.values())
            forwards = sum(r.forwards for r in engine.done.values())
            return {"mode": mode, "variant": name, "tok_per_s": tokens / total, "steps": engine.steps,
                    "overlapped": engine.overlapped_steps, "tokens_per_forward": tokens / max(forwards, 1), "step_ms": 1000 * statistics.median(walls),
                    "step_ms_mean": 1000 * statistics.mean(walls), "shapes": dict(shapes)}

        for variant in variants:  # warm-up runs: any shape not captured (or compiled) yet is, here
            serve(variant)
        log(f"{mode}: engine built, warmed up in {time.perf_counter() - t0:.0f} s; "
            f"graphs {sorted(getattr(engine.backend._step, 'graphs', {}))}")
        runs = []
        for _ in range(a.rounds):
            for variant in variants:
                runs.append(serve(variant))
                log(json.dumps({k: v for k, v in runs[-1].items() if k != "shapes"}))
        graphs = getattr(engine.backend._step, "graphs", {})  # none on CPU
        floors = {key: bench.graph_replay_ms(engine.backend._step, key) for key in graphs}
        for r in runs:
            n = sum(r["shapes"].values())
            r["floor_ms"] = sum(floors[k] * c for k, c in r["shapes"].items()) / n if floors else float("nan")
            r["host_ms"] = r["step_ms_mean"] - r["floor_ms"]
            r["shapes"] = {f"{k[0]}+{k[1]}": c for k, c in r["shapes"].items()}
        report["runs"] += runs
        report.setdefault("replay_ms", {})[mode] = {f"{k[0]}+{k[1]}": v for k, v in floors.items()}
        (a.out / "loop_changes.json").write_text(json.dumps(report, indent=2))
        del engine
        if cuda:
            torch.cuda.empty_cache()
    print("\nmode             variant               tok/s   tok/fwd  step ms (median / mean)  GPU floor ms  host ms (mean - floor)")
    for r in report["runs"]:
        print(f"{r['mode']:<16} {r['variant']:<20}  {r['tok_per_s']:6.0f}  {r['tokens_per_forward']:6.2f}"
              f"  {r['step_ms']:7.3f} / {r['step_ms_mean']:7.3f}        {r['floor_ms']:7.3f}       {r['host_ms']:7.3f}")


if __name__ == "__main__":
    main()
