"""Host cost of the engine's serving loop (issue 6): per engine step, wall time minus the time spent inside the
backend's step (the model forward / graph replay) and prefill. On CPU with a tiny model the forward is cheap, so
what is left is the loop's own work (plans, input upload, sampling, bookkeeping). Prints one JSON line per mode.

    OMP_NUM_THREADS=1 python scripts/gpu/engine_host_profile.py --model debug-hybrid --concurrency 8 \
        [--tree DIR]   # import flarectl from DIR (e.g. an older checkout: the 'before' numbers)

On CUDA the backend step only launches work (the device runs ahead until the loop reads tokens back), so there the
useful figures are ``step_ms`` (steady-state time per step) and ``tok_per_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="debug-hybrid")
    ap.add_argument("--modes", default="ar,ar-trust,diffusion-trust")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="serving runs per mode (the first is a warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tree", default=None, help="import flarectl from this directory")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    if a.tree:
        sys.path.insert(0, a.tree)
    import torch

    import flarectl
    from flarectl.engine import Engine, Request
    from flarectl.models.loading import load_model

    torch.set_num_threads(1)
    dev = torch.device(a.device)
    random_init = not a.model.startswith("debug")
    with torch.device(dev):
        model = load_model(a.model, dtype=a.dtype, device=a.device, seed=1, random_init=random_init)
    vocab = int(model.hf.get_input_embeddings().weight.shape[0])
    mask = vocab - 2
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def serve(mode):
        engine = Engine(model, concurrency=a.concurrency, capacity=64 + a.max_new + 2 * a.block + 2,
                        mask_token_id=mask, block_size=a.block)
        inside = {"step": [], "prefill": []}
        for name in inside:
            orig = getattr(engine.backend, name)

            def timed(*args, _orig=orig, _out=inside[name], **kw):
                t0 = time.perf_counter()
                out = _orig(*args, **kw)
                _out.append(time.perf_counter() - t0)
                return out

            setattr(engine.backend, name, timed)
        for i in range(a.requests):
            prompt = [(17 * i + j) % (vocab - 3) for j in range(5 + i % 30)]
            engine.submit(Request(prompt, mode, max_new_tokens=a.max_new, stop_ids=[], threshold=0.5))
        rows = []
        sync()
        start = time.perf_counter()
        while engine.busy:
            n_step, n_pre = len(inside["step"]), len(inside["prefill"])
            t0 = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - t0
            fwd = sum(inside["step"][n_step:])
            pre = sum(inside["prefill"][n_pre:])
            rows.append((wall, fwd, pre, len(inside["prefill"]) > n_pre))
        sync()
        total = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in engine.done.values())
        steady = [r for r in rows if not r[3]]  # steps without an admission
        ms = lambda xs: 1000 * statistics.median(xs) if xs else 0.0  # noqa: E731
        return dict(label=a.label, mode=mode, model=a.model, device=a.device, concurrency=a.concurrency,
                    steps=len(rows), tok_per_s=tokens / total, step_ms=ms([r[0] for r in steady]),
                    forward_ms=ms([r[1] for r in steady]), host_ms=ms([r[0] - r[1] for r in steady]),
                    admit_step_ms=ms([r[0] for r in rows if r[3]]), prefill_ms=ms([r[2] for r in rows if r[3]]),
                    flarectl=flarectl.__file__)

    for mode in a.modes.split(","):
        runs = [serve(mode) for _ in range(a.repeats)][1:] or [serve(mode)]
        best = min(runs, key=lambda r: r["host_ms"])
        best["host_ms_runs"] = [round(r["host_ms"], 4) for r in runs]
        print(json.dumps(best), flush=True)


if __name__ == "__main__":
    main()
