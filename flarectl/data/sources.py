"""Where training records come from: local JSON / JSONL / Parquet files, a Hugging Face hub dataset, or the
built-in default transfer set.

Every record carries its origin (file or dataset name + 0-based record index) so that any later error can name
it. Bad records are never dropped silently: either a one-line `DataError` is raised (policy "error") or the
record is counted in a `DataReport` with its reason and a few examples (policy "skip").

Source specs (see `SourceSpec` / `parse_source`):

- ``"path/to/file.jsonl"`` (also ``.json``, ``.parquet``, ``.json.gz``, ``.jsonl.gz``): read offline with plain
  readers. JSONL: one JSON object per line; the record index is the 0-based line number (blank lines are not
  records). JSON: a list of objects, or an object holding one list of objects (name it with ``field`` when
  there are several). Parquet: rows in file order.
- ``"default"``: the shipped offline transfer set (`flarectl.data.transfer_set`); other shipped names in
  ``SHIPPED_SOURCES`` (``"smollm2-selfdistill"``).
- anything else: a hub dataset id, optionally ``"org/name:config@split"``, loaded with
  ``datasets.load_dataset`` (needs the network).
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from flarectl.errors import FlareError

BadRecordPolicy = Literal["error", "skip"]

LOCAL_SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
DEFAULT_SOURCE = "default"
SHIPPED_SOURCES = {
    DEFAULT_SOURCE: ("default_transfer_set.jsonl", "default transfer set"),
    "smollm2-selfdistill": ("smollm2_selfdistill.jsonl", "smollm2-selfdistill set"),
    "smollm2-selfdistill-math": ("smollm2_selfdistill_math.jsonl", "smollm2-selfdistill-math set"),
}
"""Named offline sources shipped as package data of flarectl.data: name -> (file, display name). ``default`` is the
transfer set built from PyPI packages (default_transfer_set.md); ``smollm2-selfdistill`` holds the embedded
model's own greedy answers to the same prompts (flarectl.data.self_distill; smollm2_selfdistill.md);
``smollm2-selfdistill-math`` its answers to synthetic grade-school math word problems (smollm2_selfdistill_math.md),
which the default set lacks."""


def _one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (newlines included) and cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class DataError(FlareError):
    """A data problem, reported to the user as one line: ``<origin>: <message>``.

    `origin` names the file/dataset and record index (None for a whole-source problem); `reason` is a short
    machine-readable key (e.g. ``missing_field``) used to count skips in a `DataReport`.
    """

    def __init__(self, message: str, *, origin: str | None = None, reason: str = "error") -> None:
        self.message = _one_line(message)
        self.origin = origin
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.origin}: {self.message}" if self.origin else self.message


@dataclass
class DataReport:
    """Counts of what happened to the records: kept documents, tokens, truncations, and skips per reason.

    `examples[reason]` holds the first `max_examples` one-line messages of each skip reason.
    """

    max_examples: int = 3
    records_seen: int = 0
    documents: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        """Total records skipped, all reasons together."""
        return sum(self.skipped.values())

    def skip(self, error: DataError) -> None:
        """Count one skipped record under `error.reason`, keeping the first few messages."""
        self.skipped[error.reason] += 1
        shown = self.examples.setdefault(error.reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(error))

    def handle(self, error: DataError, policy: BadRecordPolicy) -> None:
        """Apply the bad-record policy: raise `error` ("error") or count it as a skip ("skip")."""
        if policy == "error":
            raise error
        self.skip(error)

    def summary(self) -> str:
        """Human-readable multi-line summary (for the CLI and logs)."""
        lines = [
            f"records: {self.records_seen}, documents: {self.documents}, tokens: {self.tokens} "
            f"(response {self.response_tokens}), truncated: {self.truncated}, skipped: {self.num_skipped}"
        ]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} x {reason}, e.g.:")
            lines.extend(f"    {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (saved beside checkpoints)."""
        return {
            "records_seen": self.records_seen,
            "documents": self.documents,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


@dataclass(frozen=True)
class Record:
    """One raw record. `data` is normally a dict; `error` is set when the record could not even be parsed
    (e.g. an invalid JSON line), and then `data` is None."""

    data: Any
    source: str
    index: int
    error: str | None = None

    @property
    def origin(self) -> str:
        """Where this record came from, for messages: ``<source>, record <index>``."""
        return f"{self.source}, record {self.index}"


@dataclass(frozen=True)
class SourceSpec:
    """One data source.

    path: a local .json/.jsonl/.parquet file (optionally .gz for JSON), "default", or a hub dataset id.
    config: hub config name. split: hub split. field: for a .json file holding an object, the key of the
    record list. streaming: stream a hub dataset instead of downloading it first.
    """

    path: str
    config: str | None = None
    split: str = "train"
    field: str | None = None
    streaming: bool = False

    @property
    def kind(self) -> str:
        """'shipped', 'jsonl', 'json', 'parquet' or 'hub'."""
        if self.path in SHIPPED_SOURCES:
            return "shipped"
        return local_format(self.path) or ("local" if Path(self.path).exists() else "hub")


def local_format(path: str) -> str | None:
    """The reader for a local file name ('jsonl' / 'json' / 'parquet'), or None for other names."""
    lowered = path.lower()
    for suffix, kind in LOCAL_SUFFIXES.items():
        if lowered.endswith(suffix):
            return kind
    return None


def parse_source(spec: str | os.PathLike | Mapping[str, Any] | SourceSpec) -> SourceSpec:
    """Normalise a spec: a `SourceSpec`, a dict of its fields, a file path, "default", or
    ``"org/name[:config][@split]"`` for a hub dataset."""
    if isinstance(spec, SourceSpec):
        return spec
    if isinstance(spec, os.PathLike):
        return SourceSpec(path=os.fspath(spec))
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "config", "split", "field", "streaming"}
        if unknown or "path" not in spec:
            raise DataError(f"bad data source spec {dict(spec)!r}: needs 'path', allows config/split/field/streaming")
        return SourceSpec(**dict(spec))
    if not isinstance(spec, str) or not spec:
        raise DataError(f"bad data source spec {spec!r}: expected a path or dataset id")
    if spec in SHIPPED_SOURCES or local_format(spec) or Path(spec).exists():
        return SourceSpec(path=spec)
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return SourceSpec(path=name, config=config or None, split=split or "train")


def load_records(spec: str | os.PathLike | Mapping[str, Any] | SourceSpec) -> Iterator[Record]:
    """Yield the records of one source in order, each with its origin. Raises `DataError` for a source that
    cannot be read at all (missing file, unsupported type, unreadable file, hub failure)."""
    source = parse_source(spec)
    kind = source.kind
    if kind == "shipped":
        file, display = SHIPPED_SOURCES[source.path]
        path = Path(__file__).with_name(file)
        if not path.is_file():
            raise DataError(f"the shipped data file {file} is missing from this install; reinstall flarectl")
        return _read_jsonl(path, display=display)
    if kind == "local":
        raise DataError(f"unsupported data file type: {source.path} (use .json, .jsonl or .parquet)")
    if kind == "hub":
        return _read_hub(source)
    path = Path(source.path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        return _read_json(path, source.field)
    return _read_parquet(path)


def _open_text(path: Path):
    """Open a (possibly gzipped) UTF-8 text file."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path, display: str | None = None) -> Iterator[Record]:
    """Records of a JSONL file; a line that is not valid JSON becomes a `Record` with `error` set."""
    name = display or str(path)
    try:
        with _open_text(path) as handle:
            for index, line in enumerate(handle):
                if not line.strip():
                    continue
                try:
                    yield Record(json.loads(line), name, index)
                except json.JSONDecodeError as exc:
                    yield Record(None, name, index, error=f"invalid JSON ({exc.msg}, column {exc.colno})")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {name}: {_one_line(exc)}") from None


def _read_json(path: Path, list_field: str | None) -> Iterator[Record]:
    """Records of a JSON file holding a list (or an object with one list); JSON Lines named .json also work."""
    try:
        with _open_text(path) as handle:
            payload = json.load(handle)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}") from None
    for index, item in enumerate(_json_record_list(payload, path, list_field)):
        yield Record(item, str(path), index)


def _json_record_list(payload: Any, path: Path, list_field: str | None) -> list:
    """The record list inside a parsed JSON document."""
    if isinstance(payload, list):
        return payload
    if not isinstance(payload, dict):
        raise DataError(f"{path}: expected a list of records, got {type(payload).__name__}")
    if list_field is not None:
        if not isinstance(payload.get(list_field), list):
            raise DataError(f"{path}: no list of records under key '{list_field}'")
        return payload[list_field]
    lists = [key for key, value in payload.items() if isinstance(value, list)]
    if len(lists) != 1:
        raise DataError(f"{path}: expected a list of records or an object with one list (found {lists}); set 'field'")
    return payload[lists[0]]


def _read_parquet(path: Path, batch_size: int = 1024) -> Iterator[Record]:
    """Rows of a Parquet file, in order, as dicts."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"cannot read parquet file {path}: {_one_line(exc)}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield Record(row, str(path), index)
            index += 1


def _read_hub(source: SourceSpec) -> Iterator[Record]:
    """Rows of a hub dataset split via `datasets.load_dataset` (online)."""
    import datasets

    name = source.path + (f":{source.config}" if source.config else "") + f"@{source.split}"
    try:
        dataset = datasets.load_dataset(source.path, source.config, split=source.split, streaming=source.streaming)
    except Exception as exc:  # network, missing dataset, bad config: all become one line
        raise DataError(f"cannot load hub dataset {name}: {type(exc).__name__}: {_one_line(exc)}") from None
    for index, row in enumerate(dataset):
        yield Record(row, name, index)
