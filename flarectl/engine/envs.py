"""Integer knobs of the engine's kernels read from the environment, checked: a bad value is a user error (one line
from the CLI, ``FlareError``), never a traceback from deep inside a kernel launch."""

from __future__ import annotations

import os

from flarectl.errors import FlareError


def env_int(name: str, default: int | None, *, low: int = 1, high: int = 1 << 16,
            power_of_two: bool = False) -> int | None:
    """``int(os.environ[name])`` if set and non-empty, else ``default``; it must lie in [low, high] (and be a power
    of two when asked), else ``FlareError`` naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "a power of two" if power_of_two else "an integer"
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high or (power_of_two and value & (value - 1)):
        raise FlareError(f"{name} must be {kind} in [{low}, {high}], got {raw!r}")
    return value
