"""Training throughput benchmark: tokens/s and MFU of the ``flare`` objective (fused or simple/reference GDN state
schedule) against the ``ar`` objective, through the trainer's own step (``trainer.optimizer_step``).

Each variant builds the recipe's model once (same seed, so the same weights), an AdamW optimizer and the LR
schedule exactly as ``train`` does, then runs ``warmup`` untimed optimizer steps (compilation, autotuning) and
``steps`` timed ones on synthetic packed rows (random token ids; a fixed document layout, so every step has the
same shape). Presets (e.g. ``qwen3.5-2b``) are built from their config without a tokenizer (the mask token is the
last vocabulary id), so no hub, tokenizer package or dataset is needed.

MFU follows the trainer: 6 x parameters x (tokens through the model per second) / the GPU's dense bf16 peak, where
tokens through the model = clean + noisy rows, padding excluded (the ``flare`` row is ~3x the clean tokens: the
clean stream plus two complementary views). ``clean_tokens_per_second`` counts the data tokens only.

    from flarectl.training.bench import run_training_benchmark
    result = run_training_benchmark("qwen3.5-2b", steps=5)   # {"meta": ..., "rows": [...], "summary": ...}
"""

from __future__ import annotations

import gc
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import torch

from flarectl.errors import FlareError

# variant -> (objective.kind, model.gdn_backend)
VARIANTS: dict[str, tuple[str, str]] = {
    "flare-fused": ("flare", "fused"),
    "flare-simple": ("flare", "simple"),
    "flare-reference": ("flare", "reference"),
    "ar": ("ar", "auto"),
}
DEFAULT_VARIANTS = ("flare-fused", "flare-simple", "ar")


def _recipe(recipe_name: str, model: str | None, variant: str, seq_len: int, micro_batch_size: int,
            grad_accum: int, block_size: int | None, gradient_checkpointing: bool | None, extra: list[str]):
    from flarectl.config import load_recipe

    kind, backend = VARIANTS[variant]
    ov = [f"objective.kind={kind}", f"model.gdn_backend={backend}", f"data.max_seq_len={seq_len}",
          f"train.micro_batch_size={micro_batch_size}", f"train.grad_accum={grad_accum}", "train.warmup_steps=0",
          "train.max_steps=1000000"]
    if model:
        ov.append(f"model.name={model}")
    if block_size:
        ov.append(f"flare.block_size={block_size}")
    if gradient_checkpointing is not None:
        ov.append(f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}")
    return load_recipe(recipe_name, [*ov, *extra])


def _build_model(recipe, device: torch.device):
    """The recipe's model in fp32 master weights with FLARE metadata, as ``trainer.prepare_model`` builds it;
    presets are built straight on the device with no tokenizer (mask token = last vocabulary id)."""
    from flarectl.models.adapter import FlareModel
    from flarectl.models.loading import PRESETS, _config_from_preset
    from flarectl.models.hf_compat import use_torch_fallbacks_on_cpu
    from flarectl.training.trainer import prepare_model

    m = recipe.model
    if m.name not in PRESETS:
        return prepare_model(recipe, device=str(device))
    use_torch_fallbacks_on_cpu()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.train.seed)
    with device:
        hf = AutoModelForCausalLM.from_config(_config_from_preset(PRESETS[m.name]), dtype=torch.float32)
    hf = hf.to(device)
    model = FlareModel(hf, None, attn_backend=m.attn_backend, gdn_backend=m.gdn_backend)
    mask_id = hf.config.vocab_size - 1
    hf.config.flare = {"mask_token_id": int(mask_id), "block_size": int(recipe.flare.block_size)}
    return model


def _rows(recipe, vocab: int, doc_len: int, prompt_len: int, seed: int):
    """One synthetic packed batch: ``micro_batch_size`` rows of ``max_seq_len`` tokens, documents of ``doc_len``
    (the last one shorter) with ``prompt_len`` prompt tokens each."""
    T = recipe.data.max_seq_len
    gen = torch.Generator().manual_seed(seed)
    lens = [doc_len] * (T // doc_len) + ([T % doc_len] if T % doc_len else [])
    n = recipe.train.micro_batch_size
    return SimpleNamespace(input_ids=[torch.randint(0, vocab - 2, (T,), generator=gen) for _ in range(n)],
                           doc_lens=[list(lens) for _ in range(n)],
                           prompt_lens=[[min(prompt_len, max(1, x - 2)) for x in lens] for _ in range(n)])


def bench_variant(recipe, *, steps: int, warmup: int, doc_len: int, prompt_len: int, log: Callable = print,
                  profile: bool = False) -> dict:
    """Time ``steps`` optimizer steps (after ``warmup``) of ``recipe`` through ``trainer.optimizer_step``; with
    ``profile``, one more step runs under ``torch.profiler`` and its top kernels land in the row's ``profile``."""
    from accelerate import Accelerator

    from flarectl.training.trainer import _micro_batch, lr_lambda, optimizer_step, peak_flops

    t = recipe.train
    cuda = torch.cuda.is_available()
    use_bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and cuda)
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not cuda)
    dev = accelerator.device
    t0 = time.time()
    model = _build_model(recipe, dev)
    model.gradient_checkpointing = t.gradient_checkpointing
    mask_id = model.flare_meta.mask_token_id
    vocab = model.hf.config.vocab_size
    optimizer = torch.optim.AdamW(model.hf.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe), last_epoch=-1)
    n_params = core.num_parameters()
    peak = peak_flops(dev)
    log(f"  {recipe.objective.kind}/{recipe.model.gdn_backend}: {n_params / 1e6:,.1f}M parameters on {dev} "
        f"(built in {time.time() - t0:.1f}s)")
    model.train()
    times, tokens_l, clean_l, losses = [], [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prof_table = None
    for step in range(warmup + steps + int(profile)):
        prof = None
        if step == warmup + steps:  # the extra profiled step
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            prof = torch_profile(activities=acts)
            prof.__enter__()
        batches = [_rows(recipe, vocab, doc_len, prompt_len, seed=recipe.train.seed * 7919 + step * 31 + i)
                   for i in range(t.grad_accum)]
        micro = [_micro_batch(recipe, b, mask_id, step, i, 0).to(dev) for i, b in enumerate(batches)]
        clean = sum(int(b.layout.is_clean.sum()) for b in micro)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        ar_sum, diff_sum, ar_n, diff_n, tokens, norm, _ = optimizer_step(recipe, model, accelerator, optimizer,
                                                                         scheduler, micro)
        if cuda:
            torch.cuda.synchronize()
        sec = time.perf_counter() - started
        if prof is not None:
            prof.__exit__(None, None, None)
            key = "cuda_time_total" if cuda else "cpu_time_total"
            prof_table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
            log(f"    profiled step: {sec:.3f}s")
            break
        loss = (ar_sum + diff_sum) / max(1, norm)
        log(f"    step {step + 1}/{warmup + steps}{' (warm-up)' if step < warmup else ''}: {sec:.3f}s, "
            f"{tokens} tokens, loss {loss:.3f}")
        if step >= warmup:
            times.append(sec)
            tokens_l.append(tokens)
            clean_l.append(clean)
            losses.append(loss)
    med = statistics.median(times)
    tokens = statistics.median(tokens_l)
    clean = statistics.median(clean_l)
    row = dict(objective=recipe.objective.kind, gdn_backend=recipe.model.gdn_backend, parameters=n_params,
               seq_len=recipe.data.max_seq_len, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
               block_size=recipe.flare.block_size, gradient_checkpointing=t.gradient_checkpointing,
               mixed_precision="bf16" if use_bf16 else "no", steps=steps, warmup=warmup,
               step_seconds=med, step_seconds_min=min(times), step_seconds_max=max(times),
               tokens_per_step=tokens, clean_tokens_per_step=clean, tokens_per_second=tokens / med,
               clean_tokens_per_second=clean / med, mfu=(6 * n_params * tokens / med / peak) if peak else None,
               loss=losses[-1], peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30) if cuda else None)
    if prof_table is not None:
        row["profile"] = prof_table
    accelerator.free_memory()
    del model, core, optimizer, scheduler
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_training_benchmark(
    model: str | None = "qwen3.5-2b",
    *,
    recipe: str = "qwen3.5-2b",
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
    seq_len: int = 4096,
    micro_batch_size: int = 2,
    grad_accum: int = 1,
    block_size: int | None = None,
    gradient_checkpointing: bool | None = None,
    steps: int = 5,
    warmup: int = 2,
    doc_len: int = 1024,
    prompt_len: int = 128,
    overrides: list[str] | tuple[str, ...] = (),
    profile: bool = False,
    log: Callable = print,
) -> dict:
    """Benchmark each variant (see ``VARIANTS``) in this process; returns {"meta", "rows", "summary"}.

    ``summary`` gives each variant's MFU and tokens/s relative to the ``ar`` row (when it ran)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FlareError(f"unknown training benchmark variant '{unknown[0]}'; choose from {', '.join(VARIANTS)}")
    if steps < 1 or warmup < 0:
        raise FlareError("steps must be >= 1 and warmup >= 0")
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("fla") is not None:
            from flare_kernels.two_stream.fused import dqkwg_mode

            log("gradient self-check of fla's kernels (a cold Triton cache compiles them first: minutes)")
            t0 = time.time()
            log(f"  dqkwg mode: {dqkwg_mode('cuda')} ({time.time() - t0:.0f}s)")  # before any checkpointed step
    rows = []
    for v in variants:
        r = _recipe(recipe, model, v, seq_len, micro_batch_size, grad_accum, block_size, gradient_checkpointing,
                    list(overrides))
        log(f"variant {v}")
        t0 = time.time()
        try:
            row = bench_variant(r, steps=steps, warmup=warmup, doc_len=doc_len, prompt_len=prompt_len, log=log,
                                profile=profile)
        except torch.cuda.OutOfMemoryError as exc:
            gc.collect()
            torch.cuda.empty_cache()
            row = dict(error=f"OOM: {exc}"[:300])
        rows.append(dict(variant=v, model=r.model.name, **row, wall_seconds=round(time.time() - t0, 1)))
    ar = next((x for x in rows if x["variant"] == "ar" and "error" not in x), None)
    summary = []
    for x in rows:
        if "error" in x:
            continue
        d = dict(variant=x["variant"], tokens_per_second=x["tokens_per_second"],
                 clean_tokens_per_second=x["clean_tokens_per_second"], mfu=x["mfu"])
        if ar is not None:
            d["tokens_per_second_vs_ar"] = x["tokens_per_second"] / ar["tokens_per_second"]
            d["clean_tokens_per_second_vs_ar"] = x["clean_tokens_per_second"] / ar["clean_tokens_per_second"]
            if x["mfu"] is not None and ar["mfu"]:
                d["mfu_vs_ar"] = x["mfu"] / ar["mfu"]
        summary.append(d)
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, peak_flops=None)
    if torch.cuda.is_available():
        from flarectl.training.trainer import peak_flops

        meta["peak_flops"] = peak_flops(torch.device("cuda"))
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return dict(meta=meta, rows=rows, summary=summary)
