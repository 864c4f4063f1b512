"""``flarectl bench``: benchmarks that write JSON (and a PNG): the serving engine and the two-stream kernels.

``flarectl bench [OPTIONS]`` (the group's callback) is the serving benchmark — engine tokens/s per mode and
concurrency beside HF ``generate`` — or, with ``--step-cost``, the engine step time against the weight-bandwidth
roofline. Subcommands register on ``bench_app`` from their own modules (``bench_kernels.py``, ...).
The numbers come from ``flarectl.engine.bench``; this module only checks options and renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flarectl.cli import MODEL_HELP, MODES, app, err, out
from flarectl.errors import FlareError

GDN_KERNELS = ("auto", "triton", "mixer", "fla", "torch")  # flarectl.engine.gdn_ops.resolve_gdn_kernel

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, subcommand_metavar="[COMMAND [ARGS]...]",
                        help="Benchmarks that write JSON (and a PNG). Without a subcommand: the serving benchmark "
                             "(engine tokens/s per mode and concurrency beside HF generate), or with --step-cost "
                             "the engine step time against the weight-bandwidth roofline (JSON only).")
app.add_typer(bench_app, name="bench")


def _int_list(text: str, what: str) -> list[int]:
    parts = [v.strip() for v in text.split(",")]
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise FlareError(f"{what} must be comma-separated integers, e.g. 1,8,32; got {text!r}") from None
    if any(v < 1 for v in values):
        raise FlareError(f"{what} must be positive integers; got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise FlareError(f"--mode must be one or more of {', '.join(MODES)} (comma-separated); got {text!r}")
    return modes


def _trust_settings(model, modes: list[str], block_size: Optional[int], mask_token_id: Optional[int],
                    random_init: bool) -> tuple[Optional[int], Optional[int], str]:
    """Block size and mask id for trust modes; a note on where they came from."""
    meta = model.flare_meta
    if not any(m != "ar" for m in modes):
        return None, None, ""
    block = block_size if block_size is not None else (meta.block_size if meta else 4)
    vocab = int(model.hf.get_input_embeddings().weight.shape[0])
    mask = mask_token_id if mask_token_id is not None else (
        meta.mask_token_id if meta else model.tokenizer.mask_token_id)
    note = ""
    if mask is None:
        if not random_init:
            raise FlareError("trust modes need a FLARE checkpoint (flarectl convert) or --mask-token-id")
        mask, note = vocab - 1, f"random weights: mask id {vocab - 1} (last vocabulary id), drafts are noise"
    if not 0 <= mask < vocab:
        raise FlareError(f"--mask-token-id must be in [0, {vocab}), got {mask}")
    return block, mask, note


@bench_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    model: str = typer.Option("qwen3.5-2b", "--model", "-m", help=MODEL_HELP),
    mode: str = typer.Option("ar,ar-trust,diffusion-trust", help="Decoding modes, comma-separated."),
    concurrency: str = typer.Option("1,8", help="Concurrency levels (requests in flight), e.g. 1,2,4,8,16,32."),
    prompts: str = typer.Option("gsm8k", help="gsm8k (shipped grade-school math prompts) | humaneval | FILE."),
    num_requests: Optional[int] = typer.Option(None, help="Requests per point, at least the largest concurrency "
                                                          "(default: 2 x concurrency)."),
    max_new_tokens: int = typer.Option(128, help="New tokens per request (EOS ignored: fixed-length outputs)."),
    block_size: Optional[int] = typer.Option(None, help="Trust-mode block size, 1 to 64 (default: checkpoint's, "
                                                        "else 4)."),
    threshold: float = typer.Option(0.9, help="Diffusion-Trust confidence threshold in (0, 1]."),
    diffusion_scheme: str = typer.Option("anchored", "--diffusion-scheme",
                                         help="Diffusion-Trust scheme: anchored (default: each block's commit step "
                                              "also emits the exact AR token) | plain."),
    mask_token_id: Optional[int] = typer.Option(None, help="Mask id for trust modes (default: checkpoint's)."),
    random_init: bool = typer.Option(False, help="Random weights for presets of real shapes (labelled as such)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    baseline: bool = typer.Option(True, help="Also time HF generate (AR) on the same prompts."),
    step_cost: bool = typer.Option(False, "--step-cost", help="Time engine steps vs the weight-bandwidth roofline "
                                                              "instead (C x 1 AR, C x (B + B) trust, C x B "
                                                              "window)."),
    tpf_from: Optional[list[Path]] = typer.Option(None, "--tpf-from",
                                                  help="--step-cost: a bench.json of a converted checkpoint; its "
                                                       "measured tokens/forward per mode and C turn these step times "
                                                       "into a projected throughput (labelled as such). Repeat it "
                                                       "for several prompt sets: one projection each."),
    loop_from: Optional[Path] = typer.Option(None, "--loop-from",
                                             help="--step-cost --tpf-from: a serving bench.json of the same model "
                                                  "on CUDA (random weights will do); its host time per step "
                                                  "(step ms - GPU ms) per mode is added to the step times: a second, "
                                                  "serving-loop projection."),
    context: int = typer.Option(512, help="--step-cost: committed tokens per slot."),
    gdn_kernel: str = typer.Option("auto", help="Engine GDN path: auto (mixer on CUDA) | mixer (the whole GDN mixer "
                                                "in one kernel) | triton (our recurrence: commits the state in "
                                                "place; CUDA only) | fla (CUDA only) | torch (--step-cost: a comma "
                                                "list, e.g. mixer,triton)."),
    overlap: Optional[bool] = typer.Option(None, "--overlap/--no-overlap",
                                           help="Queue steps ahead of the host's work on the previous one: AR, "
                                                "and greedy trust modes with their decisions on the device "
                                                "(default: env FLARECTL_ENGINE_OVERLAP, else on for CUDA)."),
    greedy_read: Optional[bool] = typer.Option(None, "--greedy-read/--no-greedy-read",
                                               help="Greedy trust-mode steps read their logits in one pass (argmax "
                                                    "and confidence; one Triton launch on CUDA; default: env "
                                                    "FLARECTL_GREEDY_READ, else on for CUDA)."),
    row_copy: Optional[bool] = typer.Option(None, "--row-copy-kernel/--no-row-copy-kernel",
                                            help="Trust modes: the late commit's masked row copy as one Triton "
                                                 "launch on CUDA (default: env FLARECTL_ENGINE_ROW_COPY, else on; "
                                                 "off: torch.where in place)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the engine step (default: on for CUDA)."),
    gemv_tune: Optional[str] = typer.Option(None, "--gemv-tune",
                                            help="How skinny-GEMM launch configurations are chosen on CUDA: chain "
                                                 "(timed back to back in a CUDA graph; default) | cold (one L2-cold "
                                                 "launch) | off (heuristic). Default: env FLARECTL_GEMV_TUNE, else "
                                                 "chain."),
    out_dir: Path = typer.Option(Path("bench-out"), "--out", help="Directory for JSON and PNG (earlier results "
                                                                  "of the same name are replaced)."),
) -> None:
    """Serving benchmark of the engine (default) or, with --step-cost, step time vs roofline."""
    if ctx.invoked_subcommand is not None:
        return
    modes = _modes(mode)
    levels = _int_list(concurrency, "--concurrency")
    if max_new_tokens < 1:
        raise FlareError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if num_requests is not None and num_requests < 1:
        raise FlareError(f"--num-requests must be >= 1, got {num_requests}")
    if not 0 < threshold <= 1:
        raise FlareError(f"--threshold must be in (0, 1], got {threshold}")
    if diffusion_scheme not in ("plain", "anchored"):
        raise FlareError(f"--diffusion-scheme must be plain or anchored, got {diffusion_scheme!r}")
    kernels = [k.strip() for k in gdn_kernel.split(",") if k.strip()]
    if not kernels or any(k not in GDN_KERNELS for k in kernels) or (len(kernels) > 1 and not step_cost):
        raise FlareError(f"--gdn-kernel must be one of {', '.join(GDN_KERNELS)} (a comma list with --step-cost); "
                         f"got {gdn_kernel!r}")
    if context < 1:
        raise FlareError(f"--context must be >= 1, got {context}")
    if block_size is not None and not 1 <= block_size <= 64:
        raise FlareError(f"--block-size must be between 1 and 64, got {block_size}")
    if tpf_from and not step_cost:
        raise FlareError("--tpf-from needs --step-cost (it turns step times into a projected throughput)")
    if loop_from is not None and not (step_cost and tpf_from):
        raise FlareError("--loop-from needs --step-cost and --tpf-from (it adds host time to their projection)")
    if step_cost:
        serving_only = {"--overlap": overlap is not None, "--greedy-read": greedy_read is not None,
                        "--row-copy-kernel": row_copy is not None, "--num-requests": num_requests is not None,
                        "--prompts": prompts != "gsm8k"}
        given = [flag for flag, on in serving_only.items() if on]
        if given:
            raise FlareError(f"{', '.join(given)}: serving-benchmark options; --step-cost times single engine steps")
    elif num_requests is not None and num_requests < max(levels):
        raise FlareError(f"--num-requests {num_requests} is below --concurrency {max(levels)}: that point would "
                         f"never have {max(levels)} requests in flight")

    import torch

    from flarectl.engine import bench, gemv

    if gemv_tune is not None:
        if gemv_tune not in ("chain", "cold", "off"):
            raise FlareError(f"--gemv-tune must be chain, cold or off, got {gemv_tune!r}")
        gemv.TUNE_MODE = gemv_tune
    try:
        gemv.tune_mode()
    except ValueError as exc:
        raise FlareError(str(exc)) from None
    from flarectl.models.loading import PRESETS, load_model, resolve_device
    from flarectl.outputs import prepare_output_dir

    texts = None if step_cost else bench.load_prompt_texts(prompts)
    tpf = [bench.load_tokens_per_forward(path) for path in tpf_from or ()]
    loop = bench.load_loop_overhead(loop_from, model) if loop_from else None
    dev = resolve_device(device)
    needs_cuda = [k for k in kernels if k in ("triton", "fla")]
    if needs_cuda and dev.type != "cuda":
        raise FlareError(f"--gdn-kernel {needs_cuda[0]} needs a CUDA device; on {dev.type} use auto, mixer or torch")
    files = [f"step_cost_{k}.json" for k in kernels if k != "auto"] if step_cost else ["bench.json", "bench.png"]
    replaced = prepare_output_dir(out_dir, files)  # before the model loads: a bad --out costs nothing
    if replaced:
        err.print(f"[dim]--out {out_dir}: replacing {', '.join(replaced)}[/]", highlight=False)
    with torch.device(dev):  # random init directly on the device (a 2B model takes minutes on the CPU)
        m = load_model(model, random_init=random_init, device=dev)
    random_init = random_init or model in PRESETS  # presets are random models of a real shape
    weights = "RANDOM weights" if random_init else "trained weights"
    if step_cost:
        _render_step_cost(m, model, weights, levels, block_size or (m.flare_meta.block_size if m.flare_meta else 4),
                          context, out_dir, kernels, compile, tpf, loop)
        return
    block, mask, note = _trust_settings(m, modes, block_size, mask_token_id, random_init)
    ids = bench.encode_prompts(m.tokenizer, texts, max(num_requests or 0, 2 * max(levels)))
    meta = dict(model=model, device=str(m.device) + (f" ({_gpu_name()})" if m.device.type == "cuda" else ""),
                dtype=str(m.dtype).replace("torch.", ""), random_init=random_init, prompts=prompts)
    err.print(f"[dim]{model} ({weights}) on {meta['device']}, {meta['dtype']}; {note}[/]", highlight=False)

    def progress(point) -> None:
        err.print(f"[dim]  {json.dumps(point.__dict__)}[/]", highlight=False, soft_wrap=True)

    def run():
        return bench.serving_benchmark(m, ids, modes=modes, concurrency=levels, num_requests=num_requests,
                                       max_new_tokens=max_new_tokens, block_size=block, threshold=threshold,
                                       baseline=baseline, meta=meta, on_point=progress, gdn_kernel=gdn_kernel,
                                       compile=compile, diffusion_trust_scheme=diffusion_scheme, overlap=overlap)

    from flarectl.engine import modes as engine_modes
    from flarectl.engine import row_copy as engine_row_copy

    default_read, default_copy = engine_modes.GREEDY_READ, engine_row_copy.KERNEL
    engine_modes.GREEDY_READ = default_read if greedy_read is None else greedy_read
    engine_row_copy.KERNEL = default_copy if row_copy is None else row_copy
    try:
        report = _with_mask(m, mask, block, run)
    finally:
        engine_modes.GREEDY_READ, engine_row_copy.KERNEL = default_read, default_copy
    data = report.to_json() | {"weights": weights, "note": note}
    (out_dir / "bench.json").write_text(json.dumps(data, indent=2))
    _render_serving(report, weights)
    try:
        bench.plot_serving(report, out_dir / "bench.png")
    except ImportError:
        err.print("[yellow]matplotlib is not installed: no PNG written[/]")
        out.print(f"wrote {out_dir / 'bench.json'}")
        return
    out.print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")


def _with_mask(model, mask, block, fn):
    """Run ``fn`` with the model's FLARE metadata set to (mask, block) when it has none (random-init benches)."""
    if mask is None or model.flare_meta is not None:
        return fn()
    config = model.hf.config
    config.flare = {"mask_token_id": int(mask), "block_size": int(block)}
    try:
        return fn()
    finally:
        del config.flare


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _render_serving(report, weights: str) -> None:
    from rich.table import Table

    base = {b.concurrency: b.tokens_per_second for b in report.baseline}
    table = Table(title=f"flarectl bench: {report.model} ({weights}), {report.device}, {report.dtype}, "
                        f"{report.max_new_tokens} new tokens, prompts {report.prompts}")
    for col in ("mode", "C", "req", "tok/s", "vs HF", "tok/fwd", "accept", "step ms", "GPU ms", "TTFT p50/p99 ms",
                "TPOT p50/p99 ms"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for p in report.points:
        vs = f"{p.tokens_per_second / base[p.concurrency]:.1f}x" if p.concurrency in base else "-"
        table.add_row(p.mode, str(p.concurrency), str(p.requests), f"{p.tokens_per_second:,.0f}", vs,
                      f"{p.tokens_per_forward:.2f}", "-" if p.acceptance is None else f"{p.acceptance:.2f}",
                      f"{p.step_ms:.2f}", "-" if p.gpu_step_ms is None else f"{p.gpu_step_ms:.2f}",
                      f"{p.ttft_p50_ms:.0f} / {p.ttft_p99_ms:.0f}",
                      f"{p.tpot_p50_ms:.2f} / {p.tpot_p99_ms:.2f}")
    for b in report.baseline:
        table.add_row("HF generate", str(b.concurrency), str(b.concurrency), f"{b.tokens_per_second:,.0f}", "1.0x",
                      "1.00", "-", "-", "-", "-", "-")
    out.print(table)
    out.print(f"[dim]engine: {json.dumps(report.engine)}[/]", highlight=False)


def _render_step_cost(model, name: str, weights: str, levels: list[int], block: int, context: int,
                      out_dir: Path, kernels: list[str], compile: bool | None, tpf: list[dict] = (),
                      loop: dict | None = None) -> None:
    from flarectl.engine import bench

    for kernel in kernels:
        data = bench.step_cost(model, concurrency=levels, block_size=block, context=context, gdn_kernel=kernel,
                               compile=compile)
        data |= {"model": name, "weights": weights, "dtype": str(model.dtype).replace("torch.", ""),
                 "device": str(model.device) + (f" ({_gpu_name()})" if model.device.type == "cuda" else "")}
        if tpf:
            data["projected"] = [bench.project_throughput(data, t, loop) for t in tpf]
        path = out_dir / f"step_cost_{data['gdn_kernel']}.json"
        path.write_text(json.dumps(data, indent=2))
        _step_cost_table(data, name, weights, context)
        if data.get("gemv_tuned"):
            _tuned_projections_table(data)
        for projection in data.get("projected", ()):
            _projection_table(data, projection)
        out.print(f"wrote {path}")


def _projection_table(data: dict, p: dict) -> None:
    from rich.table import Table

    table = Table(title=f"projected throughput: {data['model']} step times ({data['weights']}) x tokens/forward "
                        f"measured on {p['source_model']}, prompts {p['prompts']} ({p['source']}): a projection, "
                        f"not a measurement")
    loop = p.get("loop_source") is not None
    cols = ["mode", "C", "tok/fwd (measured)", "step", "step ms", "projected tok/s"]
    cols += ["+ host ms", "with the loop tok/s"] if loop else []
    for col in cols:
        table.add_column(col, justify="right" if col != "mode" else "left")
    for r in p["rows"]:
        cells = [r["mode"], str(r["concurrency"]), f"{r['tokens_per_forward']:.2f}", r["step"], f"{r['step_ms']:.3f}",
                 f"{r['tokens_per_second']:,.0f}"]
        if loop:
            with_loop = "host_ms" in r
            cells += [f"{r['host_ms']:.3f}" if with_loop else "-",
                      f"{r['tokens_per_second_with_loop']:,.0f}" if with_loop else "-"]
        table.add_row(*cells)
    out.print(table)
    if loop:
        out.print(f"[dim]host ms per step: the serving loop's time beyond its GPU floor, from {p['loop_source']}[/]",
                  highlight=False)


def _tuned_projections_table(data: dict) -> None:
    """The skinny-GEMM tuner's record per projection shape (``bench.tuned_projections``): the fastest launch's
    weight read rate against the measured copy bandwidth."""
    from rich.table import Table

    bw = data["copy_bandwidth_bytes_per_s"]
    table = Table(title="projection kernels as tuned (one launch in a chain of launches; weight bytes / time)")
    for col in ("M x N x K", "kind", "dtype", "choice", "ms", "GB/s", "% of copy"):
        table.add_column(col, justify="left" if col in ("kind", "choice") else "right")
    for key, r in data["gemv_tuned"].items():
        parts = [p.strip(" '") for p in key.strip("()").split(",")]
        kind = parts[5] if len(parts) > 5 else "plain"
        rate = r["weight_gb_per_s"]
        table.add_row(" x ".join(parts[:3]), kind, parts[3].replace("torch.", ""), r.get("label", r["choice"]),
                      f"{r['ms']:.4f}",
                      f"{rate:,.0f}" if rate else "-", f"{100 * rate * 1e9 / bw:.0f}" if rate and bw else "-")
    out.print(table)


def _step_cost_table(data: dict, name: str, weights: str, context: int) -> None:
    from rich.table import Table

    bw = data["copy_bandwidth_bytes_per_s"]
    table = Table(title=f"engine step cost: {name} ({weights}), {data['device']}, {data['dtype']}, "
                        f"{data['weight_bytes'] / 2**30:.2f} GiB weights, copy {bw / 1e12 if bw else 0:.2f} TB/s, "
                        f"context {context}, GDN kernel {data['gdn_kernel']}, CUDA graphs {data['cuda_graphs']}")
    for col in ("step", "C", "tokens (clean+window)", "ms", "roofline ms", "x roofline", "tokens/s at 1 tok/fwd"):
        table.add_column(col, justify="right" if col != "step" else "left")
    for s in data["steps"]:
        table.add_row(s["kind"], str(s["concurrency"]), f"{s['width_clean']}+{s['width_window']}", f"{s['ms']:.3f}",
                      f"{s['roofline_ms']:.3f}", f"{s['ratio_to_roofline']:.2f}",
                      f"{1000 * s['concurrency'] / s['ms']:,.0f}")
    out.print(table)
