"""``flarectl bench train``: training tokens/s and MFU of ``flare`` (fused / simple GDN state schedule) vs ``ar``.

A thin shell over ``flarectl.training.bench.run_training_benchmark`` (which returns data): renders a rich table and
writes ``training.json`` + ``training.png`` to ``--out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from flarectl.cli import err, out
from flarectl.cli.bench import bench_app
from flarectl.errors import FlareError


def _chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in rows]
    axes[0].bar(names, [100 * (r["mfu"] or 0) for r in rows])
    axes[0].set_title("MFU (%), 6N x model tokens/s / peak")
    axes[1].bar(names, [r["clean_tokens_per_second"] for r in rows])
    axes[1].set_title("clean (data) tokens/s")
    fig.suptitle(f"training step, {rows[0]['model'] if rows else ''} — {result['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@bench_app.command("train")
def train_bench(
    model: str = typer.Option("qwen3.5-2b", "--model", "-m", help="Preset (random init) or checkpoint directory."),
    recipe: str = typer.Option("qwen3.5-2b", help="Base recipe (name or YAML path) for optimiser/precision settings."),
    variants: List[str] = typer.Option(["flare-fused", "flare-simple", "ar"], "--variant",
                                       help="flare-fused | flare-simple | flare-reference | ar (repeatable)."),
    seq_len: int = typer.Option(4096, help="Packed clean tokens per row."),
    micro_batch_size: int = typer.Option(2, help="Rows per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    block_size: Optional[int] = typer.Option(None, help="Diffusion block size (default: the recipe's)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Default: the recipe's."),
    steps: int = typer.Option(5, help="Timed optimizer steps per variant (median reported)."),
    warmup: int = typer.Option(2, help="Untimed steps first (compilation, autotuning)."),
    doc_len: int = typer.Option(1024, help="Synthetic document length inside each packed row."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per synthetic document (no loss on them)."),
    profile: bool = typer.Option(False, help="Profile one extra step per variant (training_profile_VARIANT.txt)."),
    allow_cpu: bool = typer.Option(False, hidden=True, help="Run on CPU (tests, tiny models only)."),
    out_dir: Path = typer.Option(Path("docs/perf"), "--out", help="Folder for training.json and training.png."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON document instead of the table."),
) -> None:
    """Training tokens/s and MFU per variant, one process, the trainer's own optimizer step."""
    import torch

    if not torch.cuda.is_available() and not allow_cpu:
        raise FlareError("`flarectl bench train` needs a CUDA GPU (none is available here)")
    for name, v in (("--seq-len", seq_len), ("--micro-batch-size", micro_batch_size), ("--grad-accum", grad_accum),
                    ("--steps", steps), ("--doc-len", doc_len)):
        if v < 1:
            raise FlareError(f"{name} must be >= 1, got {v}")
    from flarectl.training.bench import run_training_benchmark

    result = run_training_benchmark(
        model, recipe=recipe, variants=tuple(variants), seq_len=seq_len, micro_batch_size=micro_batch_size,
        grad_accum=grad_accum, block_size=block_size, gradient_checkpointing=gradient_checkpointing, steps=steps,
        warmup=warmup, doc_len=doc_len, prompt_len=prompt_len, profile=profile, log=lambda s: err.print(f"[dim]{s}[/]", highlight=False))
    result["meta"]["command"] = "flarectl bench train " + " ".join(sys.argv[3:])
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in result["rows"]:
        if "profile" in r:
            (out_dir / f"training_profile_{r['variant']}.txt").write_text(r.pop("profile"))
    (out_dir / "training.json").write_text(json.dumps(result, indent=1))
    png = out_dir / "training.png"
    try:
        _chart(result, png)
    except ImportError:
        png = None
    if json_out:
        print(json.dumps(result))
        return
    from rich.table import Table

    t = Table(title=f"training step — {model}, {result['meta']['device']}")
    for col in ("variant", "step s", "model tok/s", "clean tok/s", "MFU", "MFU / ar", "peak GiB", "loss"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    summ = {s["variant"]: s for s in result["summary"]}
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["variant"], r["error"][:60], "", "", "", "", "", "")
            continue
        s = summ.get(r["variant"], {})
        t.add_row(r["variant"], f"{r['step_seconds']:.3f}", f"{r['tokens_per_second']:,.0f}",
                  f"{r['clean_tokens_per_second']:,.0f}", f"{100 * r['mfu']:.2f}%" if r["mfu"] is not None else "-",
                  f"{s['mfu_vs_ar']:.3f}" if "mfu_vs_ar" in s else "-",
                  f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-", f"{r['loss']:.3f}")
    out.print(t)
    out.print(f"wrote {out_dir / 'training.json'}" + (f" and {png}" if png else ""))
