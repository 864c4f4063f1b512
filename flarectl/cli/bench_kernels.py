"""``flarectl bench kernels``: the two-stream Gated DeltaNet kernels — simple vs fused vs clean stream only.

A thin shell over ``flare_kernels.bench.bench_kernels.run_kernel_benchmark`` (which returns rows of data): this
module checks the device, renders a rich table and writes ``kernels.json`` + ``kernels.png`` to ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List

import typer

from flarectl.cli import err, out
from flarectl.cli.bench import bench_app
from flarectl.errors import FlareError

DTYPES = ("bfloat16", "float16", "float32")


def _require_cuda_kernels() -> None:
    """One-line FlareError unless CUDA, Triton and fla are usable."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise FlareError("`flarectl bench kernels` needs a CUDA GPU (none is available here); "
                         "run it on a GPU machine with triton and flash-linear-attention installed")
    missing = [m for m in ("triton", "fla") if importlib.util.find_spec(m) is None]
    if missing:
        raise FlareError(f"`flarectl bench kernels` needs {' and '.join(missing)} installed "
                         f"(pip install 'flarectl[gpu]')")


@bench_app.command("kernels")
def kernels(
    seq_lens: List[int] = typer.Option([4096, 8192], "--T", help="Sequence length T (repeatable)."),
    block_sizes: List[int] = typer.Option([1, 4], "--B", help="Block size B of the noisy windows (repeatable)."),
    heads: int = typer.Option(16, help="Heads (H = HV)."),
    dim: int = typer.Option(128, help="Head dimension (K = V)."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32."),
    repeats: int = typer.Option(20, help="Timed runs per measurement (median reported)."),
    variants: List[str] = typer.Option(["clean", "fused", "simple"], "--variant",
                                       help="clean (fla chunk, clean stream only) | fused | simple | fused-torch-map | "
                                            "fused-f32 | fused-loop (repeatable)."),
    out_dir: Path = typer.Option(Path("docs/perf"), "--out", help="Folder for kernels.json and kernels.png."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON document instead of the table."),
) -> None:
    """Latency (fwd, fwd+bwd; median, CUDA events) and peak memory of the two-stream gated delta rule."""
    if dtype not in DTYPES:
        raise FlareError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    known = ("clean", "fused", "simple", "fused-torch-map", "fused-f32", "fused-loop", "fused-chunk-triton")
    bad = [v for v in variants if v not in known]
    if bad:
        raise FlareError(f"--variant must be one of {', '.join(known)}, got '{bad[0]}'")
    if repeats < 1:
        raise FlareError(f"--repeats must be >= 1, got {repeats}")
    if any(b < 1 or b > 64 for b in block_sizes):
        raise FlareError("--B must be between 1 and 64")
    if any(t < 1 for t in seq_lens) or any(t % b for t in seq_lens for b in block_sizes):
        raise FlareError("every --T must be a positive multiple of every --B")
    _require_cuda_kernels()

    import torch
    from rich.table import Table

    from flare_kernels.bench.bench_kernels import EXTRA_VARIANTS, VARIANTS, chart, run_kernel_benchmark, summarize
    from flare_kernels.two_stream.fused import dqkwg_mode

    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    err.print(f"[dim]device: {device}; torch {torch.__version__}[/]", highlight=False)
    err.print("[dim]gradient self-check of fla's kernels on this GPU (with a cold Triton cache this compiles and "
              "autotunes them first: a few minutes)[/]", highlight=False)
    mode = dqkwg_mode("cuda")  # Hopper gradient self-check before timing anything
    t0 = time.time()
    order = [v for v in (*VARIANTS, *EXTRA_VARIANTS) if v in variants]
    rows = run_kernel_benchmark(tuple(seq_lens), tuple(block_sizes), heads, dim, getattr(torch, dtype), repeats,
                                tuple(order), log=lambda s: err.print(f"[dim]{s}[/]", highlight=False))
    summary = summarize(rows)
    meta = dict(device=device, torch=torch.__version__, dqkwg_mode=mode, seconds=round(time.time() - t0, 1),
                command="flarectl bench kernels " + " ".join(sys.argv[3:]))
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    doc = dict(meta=meta, rows=rows, summary=summary)
    (out_dir / "kernels.json").write_text(json.dumps(doc, indent=1))
    png = out_dir / "kernels.png"
    try:
        chart(rows, png)
    except ImportError:
        png = None
    if json_out:
        print(json.dumps(doc))
        return
    t = Table(title=f"two-stream gated delta rule — {device}, {heads} heads, K=V={dim}, {dtype}")
    for col in ("variant", "T", "B", "fwd ms", "fwd+bwd ms", "peak fwd GiB", "peak fwd+bwd GiB"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["variant"], str(r["T"]), str(r["B"]), r["error"][:40], "", "", "")
            continue
        t.add_row(r["variant"], str(r["T"]), str(r["B"]), f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}",
                  f"{r['peak_fwd_gib']:.3f}", f"{r['peak_fwd_bwd_gib']:.3f}")
    out.print(t)
    s = Table(title="ratios (targets: B=1 simple/fused >= 4x time, >= 40x memory; B=4 noisy/clean <= 1.5)")
    for col in ("T", "B", "simple/fused fwd+bwd", "simple/fused mem", "noisy/clean fwd+bwd"):
        s.add_column(col, justify="right")
    f = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
    for d in summary:
        s.add_row(str(d["T"]), str(d["B"]), f(d, "speedup_fwd_bwd"), f(d, "mem_ratio_fwd_bwd"),
                  f(d, "noisy_over_clean_fwd_bwd"))
    out.print(s)
    out.print(f"wrote {out_dir / 'kernels.json'}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))
