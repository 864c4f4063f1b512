"""Output directories of the commands that write results (``flarectl bench``, ``flarectl eval``), checked before any
work starts, so a bad ``--out`` costs nothing and finished results always have somewhere to go."""

from __future__ import annotations

from pathlib import Path

from flarectl.errors import FlareError


def prepare_output_dir(path: Path, files: list[str] = (), dirs: list[str] = (), option: str = "--out") -> list[str]:
    """Create ``path`` if needed and check that ``files`` and ``dirs`` (names inside it) can be written there.
    Returns the names that already exist (earlier results the run will replace). One-line ``FlareError``s: the path
    is a file, cannot be created or written, or a name is taken by the wrong kind of entry."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FlareError(f"{option} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlareError(f"{option} {path} cannot be created ({exc.strerror or exc})") from None
    for name in files:
        if (path / name).is_dir():
            raise FlareError(f"{option} {path}: {name} is a directory, so the results could not be written there")
    for name in dirs:
        if (path / name).exists() and not (path / name).is_dir():
            raise FlareError(f"{option} {path}: {name} is a file, so the results could not be written there")
    probe = path / ".flarectl-write-check"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FlareError(f"{option} {path} is not writable ({exc.strerror or exc})") from None
    return [name for name in (*files, *dirs) if (path / name).exists()]
