"""``flarectl`` command line: a thin typer shell over functions that return data; only ``flarectl.cli`` renders.

This module holds the app, the shared helpers and the core commands (models, decode, train, convert); larger
command groups live beside it (``bench.py``, ...) and are imported at the bottom to register.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from flarectl.errors import FlareError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert hybrid-attention AR LLMs into block-diffusion LLMs and decode them (AR, AR-Trust, "
                       "Diffusion-Trust).")
out = Console()
err = Console(stderr=True)

MODES = ("ar", "ar-trust", "diffusion-trust")
DECODE_DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_HELP = "Preset (see `flarectl models`), local checkpoint directory, or hub id (ORG/NAME)."


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _apply_overrides(recipe_name: Optional[str], overrides: List[str]):
    from flarectl.config import load_recipe

    return load_recipe(recipe_name, overrides)


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def models(
    name: Optional[str] = typer.Argument(None, help="Also resolve this name: " + MODEL_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List built-in presets and show what a name resolves to (family, layer kinds, parameter count)."""
    from rich.table import Table

    from flarectl.models.loading import EMBEDDED, PRESETS, describe

    names = [name] if name else [EMBEDDED, *PRESETS]
    infos = [describe(n) for n in names]
    if json_out:
        for i in infos:
            print(json.dumps({**i.__dict__, "flare": i.flare.__dict__ if i.flare else None}))
        return
    table = Table(title="flarectl models")
    for col in ("name", "source", "family", "model type", "layers (gdn/attn)", "parameters", "flare"):
        table.add_column(col)
    for i in infos:
        n_gdn = i.layer_kinds.count("gdn")
        flare = f"mask={i.flare.mask_token_id} B={i.flare.block_size}" if i.flare else "-"
        table.add_row(i.name, i.source, i.family, i.model_type, f"{n_gdn}/{len(i.layer_kinds) - n_gdn}",
                      f"{i.num_parameters / 1e6:,.1f}M", flare)
    out.print(table)


# ---------------------------------------------------------------------------------------------------------------
def _read_prompts(prompt: Optional[str], prompts_file: Optional[Path]) -> list[str]:
    if prompts_file is not None:
        if prompt is not None:
            _fail("pass --prompt TEXT or --prompts-file FILE, not both")
        from flarectl.data.prompt_files import read_prompt_file

        try:
            return read_prompt_file(prompts_file, "--prompts-file")
        except FlareError as exc:
            _fail(str(exc))
    if prompt is None:
        _fail("pass --prompt TEXT or --prompts-file FILE")
    if not prompt.strip():
        _fail("--prompt is empty")
    return [prompt]


def _encode(tokenizer, texts: list[str], raw: bool) -> list[list[int]]:
    ids = []
    for t in texts:
        if raw or not getattr(tokenizer, "chat_template", None):
            ids.append(tokenizer(t, add_special_tokens=True)["input_ids"])
        else:
            text = tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                 add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


@app.command()
def decode(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (chat template applied)."),
    prompts_file: Optional[Path] = typer.Option(None, help="File with one prompt per line (or JSONL with 'prompt'); "
                                                           "instead of --prompt."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    mode: str = typer.Option("ar", help="ar | ar-trust (exact self-speculative) | diffusion-trust (parallel)."),
    max_new_tokens: int = typer.Option(128, help="Maximum new tokens per prompt."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass in (0, 1]."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    block_size: Optional[int] = typer.Option(None, help="Block size for trust modes (default: the checkpoint's)."),
    threshold: float = typer.Option(0.9, help="Diffusion-Trust confidence threshold in (0, 1]."),
    diffusion_scheme: str = typer.Option("anchored", "--diffusion-scheme",
                                         help="Diffusion-Trust scheme: anchored (default: each block's commit step "
                                              "also emits the exact AR token) | plain."),
    stop: List[str] = typer.Option([], help="Stop string (repeatable)."),
    raw: bool = typer.Option(False, help="Do not apply the chat template."),
    random_init: bool = typer.Option(False, help="Random weights for presets of real shapes."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per prompt instead of streamed text."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16. "
                                           "AR-Trust is bit-exact against AR in float32."),
) -> None:
    """Generate from a model in any decoding mode."""
    if dtype not in DECODE_DTYPES:
        _fail(f"--dtype must be one of {', '.join(DECODE_DTYPES)}, got '{dtype}'")
    if mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    if max_new_tokens < 1:
        _fail(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        _fail(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        _fail(f"--top-p must be in (0, 1], got {top_p}")
    if not 0 < threshold <= 1:
        _fail(f"--threshold must be in (0, 1], got {threshold}")
    if diffusion_scheme not in ("plain", "anchored"):
        _fail(f"--diffusion-scheme must be plain or anchored, got '{diffusion_scheme}'")
    if block_size is not None and not 1 <= block_size <= 64:
        _fail(f"--block-size must be between 1 and 64, got {block_size}")
    texts = _read_prompts(prompt, prompts_file)

    from flarectl.decoding import generate
    from flarectl.models.loading import load_model

    m = load_model(model, random_init=random_init, device=device, dtype=dtype)
    meta = m.flare_meta
    if mode != "ar" and meta is None and m.tokenizer.mask_token_id is None:
        _fail(f"{model} has no mask token: trust modes need a FLARE checkpoint (flarectl convert) or a model with one")
    if mode != "ar" and meta is None and block_size is None:
        _fail(f"--mode {mode} needs --block-size: {model} has no FLARE metadata (a plain AR checkpoint)")
    ids = _encode(m.tokenizer, texts, raw)
    stream = not json_out and len(texts) == 1

    def on_token(row: int, new: list[int]) -> None:
        out.print(m.tokenizer.decode(new, skip_special_tokens=True), end="", highlight=False, soft_wrap=True)

    try:
        results = generate(m, ids, mode, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=seed, block_size=block_size, threshold=threshold, stop_strings=list(stop),
                           tokenizer=m.tokenizer, on_token=on_token if stream else None,
                           diffusion_trust_scheme=diffusion_scheme)
    except ValueError as exc:
        _fail(str(exc))
    for text, r in zip(texts, results):
        if json_out:
            print(json.dumps({"prompt": text, "text": r.text, "token_ids": r.token_ids, "forwards": r.forwards,
                              "tokens_per_forward": r.tokens_per_forward, "seconds": r.seconds,
                              "acceptance_histogram": r.acceptance_histogram, "finish_reason": r.finish_reason}))
        elif stream:
            out.print()
            err.print(f"[dim]{len(r.token_ids)} tokens, {r.forwards} forwards, "
                      f"{r.tokens_per_forward:.2f} tokens/forward, {r.seconds:.2f}s[/]")
        else:
            out.print(f"[bold]> {text}[/]", highlight=False)
            out.print(r.text, highlight=False)


# ---------------------------------------------------------------------------------------------------------------
def _run_training(recipe, output_dir: Optional[Path], resume: bool, convert: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from flarectl.training.trainer import train

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err)
    task = None

    def on_start(info: dict) -> None:
        nonlocal task
        data = info["data"]
        err.print(f"[dim]{info['parameters'] / 1e6:.1f}M parameters on {info['device']}; {info['sequences']} packed "
                  f"sequences; data: {json.dumps(data.get('skipped', data))}[/]", highlight=False)
        task = progress.add_task(recipe.name, total=recipe.train.max_steps, completed=info["start_step"], info="")

    def on_step(m) -> None:
        parts = [f"loss {m.loss:.4f}"]
        if m.ar_loss is not None:
            parts.append(f"ar {m.ar_loss:.4f}")
        if m.diffusion_loss is not None:
            parts.append(f"diff {m.diffusion_loss:.4f}")
        parts.append(f"{m.tokens_per_second:,.0f} tok/s")
        if m.mfu is not None:
            parts.append(f"MFU {100 * m.mfu:.1f}%")
        progress.update(task, completed=m.step, info="  ".join(parts))

    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel worker (torchrun / accelerate launch): rank 0 renders
        train(recipe, output_dir=output_dir, resume=resume)
        return
    with progress:
        result = train(recipe, output_dir=output_dir, resume=resume, on_step=on_step, on_start=on_start)
    what = "FLARE checkpoint" if convert else "checkpoint"
    out.print(f"{what}: {result.final_checkpoint}  (metrics: {result.output_dir / 'metrics.jsonl'})")


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Shipped recipe name (debug, quickstart, smollm2-135m, qwen3.5-2b) or a "
                                           "YAML path."),
    overrides: List[str] = typer.Argument(None, help="key.path=value overrides, e.g. train.max_steps=10."),
    output_dir: Optional[Path] = typer.Option(None, help="Output directory (default: the recipe's train.output_dir)."),
    resume: bool = typer.Option(False, help="Continue exactly from the latest checkpoint in the output directory."),
) -> None:
    """Train with any objective (flare, block-diffusion, ar) from a recipe."""
    _run_training(_apply_overrides(recipe, overrides or []), output_dir, resume, convert=False)


@app.command()
def convert(
    model: Optional[str] = typer.Argument(None, help="AR model to convert (default: the recipe's). " + MODEL_HELP),
    recipe: str = typer.Option("quickstart", help="Recipe name or YAML path."),
    overrides: List[str] = typer.Option([], "--set", help="key.path=value override (repeatable)."),
    output_dir: Optional[Path] = typer.Option(None, help="Output directory (default: the recipe's)."),
    resume: bool = typer.Option(False, help="Continue exactly from the latest checkpoint."),
) -> None:
    """Convert an AR model into a FLARE block-diffusion checkpoint (mask token + flare objective training)."""
    extra = [f"model.name={model}"] if model else []
    r = _apply_overrides(recipe, [*overrides, *extra, "objective.kind=flare"])
    _run_training(r, output_dir, resume, convert=True)


# Commands that live in their own modules register themselves on ``app`` when imported (one line each).
from flarectl.cli import bench as _bench  # noqa: E402,F401  (flarectl bench ...)
from flarectl.cli import evaluate as _evaluate  # noqa: E402,F401  (flarectl eval)
from flarectl.cli import bench_kernels as _bench_kernels  # noqa: E402,F401  (flarectl bench kernels)
from flarectl.cli import bench_train as _bench_train  # noqa: E402,F401  (flarectl bench train)


def _quiet_libraries() -> None:
    """Keep the terminal for flarectl's own output: no per-shard loading bars from transformers, and no fla notice
    that Triton has no GPU here (flarectl already runs pure torch on CPU)."""
    import warnings

    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency; this only guards odd installs
        pass


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        code = app(standalone_mode=False)
        sys.exit(code or 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # bad option name/type, missing argument (click-style usage errors)
        err.print(f"[bold red]error:[/] {exc.format_message()} (see --help)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except FlareError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)

