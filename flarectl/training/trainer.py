"""Conversion training: recipe -> model + packed data -> two-stream objective -> AdamW -> checkpoints.

Exact resume: the data stream is a pure function of (seed, position), and every micro-batch's noisy-view masks
come from a generator seeded by (seed, step, micro-step), so a resumed run sees the same batches and masks as an
uninterrupted one; optimizer and RNG states are restored from the checkpoint.

Loss normalisation: each optimizer step's loss is (ar_weight * sum of AR terms + diffusion_weight * sum of diffusion
terms) / (number of response tokens in the step), i.e. unit weight per token, independent of how the step is split
into micro-batches or devices.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flarectl.config import Recipe, save_recipe
from flarectl.errors import FlareError
from flarectl.models.adapter import FlareModel
from flarectl.models.loading import ensure_mask_token, load_model, save_checkpoint
from flarectl.objectives import PackedRow, build_two_stream_batch, two_stream_loss_terms
from flarectl.training.checkpointing import latest_checkpoint, load_training_state, save_training_state

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "H800": 989e12, "B200": 2250e12}


@dataclass
class StepMetrics:
    step: int
    loss: float
    ar_loss: float | None
    diffusion_loss: float | None
    lr: float
    grad_norm: float
    tokens: int  # tokens through the model this step (clean + noisy rows, padding excluded)
    response_tokens: int
    seconds: float
    tokens_per_second: float
    mfu: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    steps: int
    history: list[StepMetrics] = field(default_factory=list)
    data_report: dict = field(default_factory=dict)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or an unknown GPU)."""
    import os

    if os.environ.get("FLARECTL_PEAK_FLOPS"):
        return float(os.environ["FLARECTL_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    t = recipe.train

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1.0 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return factor


def prepare_model(recipe: Recipe, device: str | None = None) -> FlareModel:
    """Load the recipe's model in fp32 (master weights) and give it a mask token + FLARE metadata."""
    m = recipe.model
    model = load_model(m.name, random_init=m.random_init, dtype="float32", device=device,
                       attn_backend=m.attn_backend, gdn_backend=m.gdn_backend, seed=recipe.train.seed)
    ensure_mask_token(model, recipe.flare.mask_token, recipe.flare.block_size)
    return model


def build_dataset(recipe: Recipe, tokenizer):
    from flarectl.data import DataConfig, build_packed_dataset

    d = recipe.data
    cfg = DataConfig(max_seq_len=d.max_seq_len, on_bad_record=d.on_bad_record, overlong=d.overlong,
                     seed=recipe.train.seed)
    sources = list(d.sources)
    dataset, report = build_packed_dataset(sources, tokenizer, cfg)
    if len(dataset) == 0:
        raise FlareError(f"no usable training documents in {', '.join(sources)} ({report.summary()})")
    return dataset, report


def _micro_batch(recipe: Recipe, batch, mask_id: int, step: int, micro: int, pad_id: int):
    rows = [PackedRow(batch.input_ids[i], batch.doc_lens[i], batch.prompt_lens[i]) for i in range(len(batch.doc_lens))]
    gen = torch.Generator().manual_seed(recipe.train.seed * 1_000_003 + step * 1009 + micro)
    o = recipe.objective
    return build_two_stream_batch(rows, block_size=recipe.flare.block_size, mask_token_id=mask_id, objective=o.kind,
                                  mask_schedule=o.mask_schedule, min_mask_ratio=o.min_mask_ratio, generator=gen,
                                  pad_token_id=pad_id)


def optimizer_step(recipe: Recipe, model, accelerator, optimizer, scheduler, micro: list):
    """One optimizer step over the micro-batches ``micro`` (already on the device): forward + backward of each,
    gradient clipping, optimizer and scheduler step. Returns (ar_sum, diff_sum, ar_n, diff_n, tokens, norm,
    grad_norm), each summed over data-parallel ranks. ``model``: the prepared module (DDP/FSDP wrapper, or the
    FlareModel itself); the loss runs inside its ``__call__`` so that the wrapper's hooks fire. ``train`` and
    ``flarectl.training.bench`` both run steps through here."""
    core = accelerator.unwrap_model(model)
    t = recipe.train
    norm = sum(b.num_ar_terms if recipe.objective.kind == "ar" else b.num_diffusion_terms for b in micro)
    norm_t = accelerator.reduce(torch.tensor(float(norm), device=accelerator.device), reduction="sum")
    ar_sum = diff_sum = 0.0
    ar_n = diff_n = tokens = 0
    for b in micro:
        with accelerator.autocast():
            terms = model(loss_fn=lambda m, b=b: two_stream_loss_terms(m, b))
        o = recipe.objective
        loss = (o.ar_weight * terms.ar_sum + o.diffusion_weight * terms.diffusion_sum) / norm_t.clamp(min=1)
        accelerator.backward(loss * accelerator.num_processes)
        ar_sum += float(terms.ar_sum.detach())
        diff_sum += float(terms.diffusion_sum.detach())
        ar_n += terms.ar_count
        diff_n += terms.diffusion_count
        tokens += int((b.layout.doc_ids >= 0).sum())
    grad_norm = accelerator.clip_grad_norm_(core.hf.parameters(), t.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(torch.tensor([ar_sum, diff_sum, ar_n, diff_n, tokens], dtype=torch.float64,
                                                 device=accelerator.device), reduction="sum").tolist()
        ar_sum, diff_sum = totals[0], totals[1]
        ar_n, diff_n, tokens, norm = int(totals[2]), int(totals[3]), int(totals[4]), int(norm_t.item())
    return ar_sum, diff_sum, ar_n, diff_n, tokens, norm, grad_norm


def train(
    recipe: Recipe,
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[StepMetrics], None] | None = None,
    on_start: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Run the recipe's training. ``stop_after`` ends the run early after that many steps (for tests)."""
    from accelerate import Accelerator

    out = Path(output_dir or recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = recipe.train
    use_bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not torch.cuda.is_available())
    torch.manual_seed(t.seed)

    model = prepare_model(recipe, device=str(accelerator.device))
    model.gradient_checkpointing = t.gradient_checkpointing
    meta = model.flare_meta
    dataset, report = build_dataset(recipe, model.tokenizer)
    optimizer = torch.optim.AdamW(model.hf.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    sharded = accelerator.distributed_type.name == "FSDP"
    if sharded and (t.save_every or resume):
        raise FlareError("periodic checkpoints and --resume are not supported under FSDP yet; set train.save_every=0 "
                         "(the final checkpoint is saved)")
    model, optimizer = accelerator.prepare(model, optimizer)
    core: FlareModel = accelerator.unwrap_model(model)

    from flarectl.data import DataPosition

    step, position = 0, DataPosition()
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FlareError(f"--resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
        state = load_training_state(ckpt, core, optimizer)
        step, position = state["step"], DataPosition.from_dict(state["data_position"])
        if state.get("data_fingerprint") not in (None, dataset.fingerprint()):
            raise FlareError(f"--resume: the training data changed since {ckpt}; resume with the same data")
    save_recipe(recipe, out / "recipe.yaml")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe), last_epoch=-1)
    for _ in range(step):
        scheduler.step()

    n_params = core.num_parameters()
    peak = peak_flops(accelerator.device)
    if on_start:
        on_start({"parameters": n_params, "sequences": len(dataset), "data": report.to_dict(), "start_step": step,
                  "device": str(accelerator.device)})
    metrics_file = (out / "metrics.jsonl").open("a")
    # Data parallel: every rank draws the same global micro-batch of micro_batch_size x world rows (so its masks
    # equal a one-process run's on that global batch) and keeps its own slice of rows.
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = dataset.batches(t.micro_batch_size * world, start=position, drop_last=world > 1)
    history = []
    pad_id = core.tokenizer.pad_token_id or 0
    model.train()
    end = t.max_steps if stop_after is None else min(t.max_steps, step + stop_after)
    while step < end:
        started = time.perf_counter()
        micro = []
        for i in range(t.grad_accum):
            position, batch = next(stream)
            b = _micro_batch(recipe, batch, meta.mask_token_id, step, i, pad_id)
            if world > 1:
                b = b.select_rows(rank * t.micro_batch_size, (rank + 1) * t.micro_batch_size)
            micro.append(b.to(accelerator.device))
        ar_sum, diff_sum, ar_n, diff_n, tokens, norm, grad_norm = optimizer_step(
            recipe, model, accelerator, optimizer, scheduler, micro)
        step += 1
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tps = tokens / seconds
        m = StepMetrics(step=step, loss=(ar_sum + diff_sum) / max(1, norm), ar_loss=ar_sum / ar_n if ar_n else None,
                        diffusion_loss=diff_sum / diff_n if diff_n else None, lr=scheduler.get_last_lr()[0],
                        grad_norm=float(grad_norm), tokens=tokens, response_tokens=int(norm), seconds=seconds,
                        tokens_per_second=tps, mfu=(6 * n_params * tps / (peak * world)) if peak else None)
        history.append(m)
        if accelerator.is_main_process:
            metrics_file.write(json.dumps(m.to_dict()) + "\n")
            metrics_file.flush()
        if on_step:
            on_step(m)
        if t.save_every and step % t.save_every == 0 and step < t.max_steps and accelerator.is_main_process:
            save_training_state(out / "checkpoints" / f"step-{step}", core, optimizer, step=step,
                                data_position=position.to_dict(), recipe=recipe,
                                extra={"data_fingerprint": dataset.fingerprint()})
    metrics_file.close()
    model.eval()
    final = out / "final"
    full = None
    if sharded:  # gather the full weights (a collective: every rank takes part), keys of the HF model
        full = {k.removeprefix("hf."): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        save_checkpoint(core, final, recipe=recipe, extra={"steps": step, "objective": recipe.objective.kind},
                        state_dict=full)
    accelerator.wait_for_everyone()
    return TrainResult(out, final, step, history, report.to_dict())
