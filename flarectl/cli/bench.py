"""``flarectl bench``: benchmarks that write JSON (and a PNG): the serving engine and the two-stream kernels.

Subcommands register on ``bench_app`` from their own modules (``bench_kernels.py``, ...).
"""

from __future__ import annotations

import typer

from flarectl.cli import app

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Benchmarks: results as a table, JSON and a PNG chart.")
app.add_typer(bench_app, name="bench")
