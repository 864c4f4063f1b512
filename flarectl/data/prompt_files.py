"""Prompt files for ``flarectl decode --prompts-file`` and ``flarectl bench --prompts FILE``: one prompt per line,
or JSONL objects with a ``prompt`` field (the two may mix; blank lines are skipped)."""

from __future__ import annotations

import json
from pathlib import Path

from flarectl.errors import FlareError


def read_prompt_file(path: Path, option: str) -> list[str]:
    """The prompts of ``path`` (each stripped of surrounding whitespace). ``option``: the flag that named it, for
    the one-line errors: missing, a directory, not UTF-8 text, a bad JSON line, no prompt at all."""
    path = Path(path)
    if path.is_dir():
        raise FlareError(f"{option} {path} is a directory, not a file of prompts")
    if not path.is_file():
        raise FlareError(f"{option} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FlareError(f"{option} {path} is not UTF-8 text (one prompt per line, or JSONL with 'prompt')") from None
    except OSError as exc:
        raise FlareError(f"{option} {path} cannot be read ({exc.strerror})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise FlareError(f"{path}, line {n}: not valid JSON") from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise FlareError(f"{path}, line {n}: a JSON object needs a 'prompt' field")
            line = str(obj["prompt"])
        prompts.append(line)
    if not prompts:
        raise FlareError(f"{option} {path} has no prompts")
    return prompts
