"""``flarectl eval TASKS``: lm-eval tasks x decoding modes; renders what `flarectl.evaluation.runner` returns."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from flarectl.cli import MODEL_HELP, app, err, out


def _table(rows):
    from rich.table import Table

    table = Table(title="flarectl eval")
    for col in ("task", "mode", "metric", "score ± stderr", "n", "tok/fwd", "tok/s", "time"):
        table.add_column(col, justify="left" if col in ("task", "mode", "metric") else "right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        metric = r.metric if r.filter in ("", "none") else f"{r.metric} ({r.filter})"
        table.add_row(r.task, r.mode, metric, f"{r.value:.4f} ± {fmt(r.stderr, '.4f')}", str(r.samples),
                      fmt(r.tokens_per_forward, ".2f"), fmt(r.tokens_per_second, ",.1f"), f"{r.seconds:.0f}s")
    return table


@app.command("eval")
def eval_(
    tasks: str = typer.Argument(..., help="Comma list of lm-eval task names: humaneval runs offline; "
                                          "gsm8k, mbpp, ... need the hub or --data NAME=PATH."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    mode: str = typer.Option("ar", help="Comma list of decoding modes: ar, ar-trust, diffusion-trust."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N documents of each task."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples (default: each task's own)."),
    batch_size: int = typer.Option(1, help="Requests decoded / scored together."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default runs/eval/TIMESTAMP)."),
    data: List[str] = typer.Option([], help="NAME=PATH.jsonl: run task NAME on a local file (NAME:train=PATH for "
                                            "few-shot examples). Repeatable."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Override every task's max_gen_toks."),
    block_size: Optional[int] = typer.Option(None, help="Block size for trust modes (default: the checkpoint's)."),
    threshold: float = typer.Option(0.9, help="Diffusion-Trust confidence threshold in (0, 1]."),
    diffusion_scheme: str = typer.Option("anchored", "--diffusion-scheme",
                                         help="Diffusion-Trust scheme: anchored (default: each block's commit step "
                                              "also emits the exact AR token) | plain."),
    seed: int = typer.Option(0, help="Seed for sampling (lm-eval keeps its own default seeds)."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Apply the model's chat template (lm-eval's "
                                                                      "--apply_chat_template)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
) -> None:
    """Evaluate a model on lm-eval tasks in one or more decoding modes: score ± stderr, tokens/forward, tokens/s."""
    from flarectl.evaluation.runner import EvalSettings, run_eval

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    settings = EvalSettings(tasks=[t.strip() for t in tasks.split(",") if t.strip()], model=model,
                            modes=[m.strip() for m in mode.split(",") if m.strip()], limit=limit,
                            num_fewshot=num_fewshot, batch_size=batch_size, data=list(data),
                            max_new_tokens=max_new_tokens, block_size=block_size, threshold=threshold,
                            diffusion_scheme=diffusion_scheme, seed=seed,
                            apply_chat_template=chat_template, device=device,
                            out=str(out_dir) if out_dir is not None else None)

    def on_done(rows) -> None:
        for r in rows:
            err.print(f"[dim]{r.task} [{r.mode}] {r.metric},{r.filter} = {r.value:.4f} ({r.seconds:.1f}s)[/]",
                      highlight=False)

    report = run_eval(settings, on_done=on_done)
    out.print(_table(report.rows))
    out.print(f"results: {report.results_path}  samples: {report.out_dir / 'samples'}", highlight=False)
    if report.replaced:
        err.print(f"[dim]--out {report.out_dir}: replaced the earlier {', '.join(report.replaced)}[/]", highlight=False)
