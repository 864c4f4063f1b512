"""Turn raw records into tokenized training documents: ``Document(input_ids, prompt_len, source)``.

Record formats (``DataConfig.format``; "auto" picks the first that matches):

- **messages**: a list of ``{"role", "content"}`` turns under ``messages`` (aliases ``conversations``,
  ``conversation``; ShareGPT ``{"from": "human"/"gpt", "value"}`` turns are accepted too). The *response* is
  the trailing run of assistant turns (normally the last assistant turn, i.e. everything after the last
  user turn); everything before it -- system, user and earlier assistant turns -- is context without loss.
  This keeps one loss region per document (`prompt_len`) at the price of not training earlier assistant turns.
- **prompt_response**: two string fields. Prompt aliases, in order: ``prompt, instruction, question, query,
  input``; response aliases: ``response, output, answer, completion``. Alpaca records (``instruction`` +
  non-empty ``input`` + ``output``) use ``instruction + "\\n\\n" + input`` as the prompt. An optional
  ``system`` field (alias ``system_prompt``; blank = none) becomes a system turn. Set ``prompt_field`` /
  ``response_field`` to override.

Tokenization:

- With a chat template: prompt = template(context turns, ``add_generation_prompt=True``); full =
  template(all turns). ``prompt_len`` = number of prompt tokens, and the full tokens must start with the prompt
  tokens (else the record fails with reason ``template_mismatch``). The document ends right after the last
  end-of-turn token of the response (``<|im_end|>``, ``<|eot_id|>``, ... or EOS), so whatever the template puts
  after it (e.g. a newline) is dropped; if the template emits none, EOS is appended. Templates are tokenized
  with ``add_special_tokens=False`` (the template itself carries BOS where the model wants one).
- Without a chat template (plain fallback): each context turn is rendered ``"### {Role}:\\n{content}\\n\\n"``,
  the prompt ends with ``"### Assistant:\\n"``, response turns are joined by ``"\\n\\n### Assistant:\\n"``,
  and EOS is appended. No BOS is added.

Bad records (reasons: missing_field, wrong_type, empty_prompt, empty_response, unknown_format, invalid_json,
no_response, bad_role, template_mismatch, template_error) follow ``on_bad_record``: "skip" (default; counted
in the `DataReport` with examples) or "error" (raise `DataError` naming the record). Documents longer than
``max_seq_len`` follow ``overlong``: "skip" (default, counted under ``overlong``), "truncate" (cut the
response tail, counted in ``report.truncated``; skipped if not one response token remains) or "error".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from flarectl.data.sources import (
    BadRecordPolicy,
    DataError,
    DataReport,
    Record,
    SourceSpec,
    load_records,
)

MESSAGES_ALIASES = ("messages", "conversations", "conversation")
PROMPT_ALIASES = ("prompt", "instruction", "question", "query", "input")
RESPONSE_ALIASES = ("response", "output", "answer", "completion")
SYSTEM_ALIASES = ("system", "system_prompt")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool"}
KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool"})

Message = dict[str, str]


@dataclass(frozen=True)
class Document:
    """One tokenized example: tokens ``[0, prompt_len)`` are context (no loss), ``[prompt_len, len)`` the
    response (loss), ending with the end-of-turn / EOS token unless truncated. `source` names the record."""

    input_ids: list[int]
    prompt_len: int
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_len(self) -> int:
        """Number of loss-bearing tokens."""
        return len(self.input_ids) - self.prompt_len


@dataclass
class DataConfig:
    """How records become documents and packed sequences (YAML recipe ``data:`` section).

    max_seq_len: longest document and packed sequence, in tokens (a multiple of pad_to_multiple_of).
    format: "auto" | "messages" | "prompt_response". *_field: override the field names (None = aliases).
    on_bad_record: "skip" (counted, reported) or "error" (raise at the first bad record).
    overlong: "skip" (counted) | "truncate" | "error" for documents longer than max_seq_len.
    pad_to_multiple_of: packed sequences are padded to a multiple of this. seed: packing + epoch order.
    """

    max_seq_len: int = 2048
    format: Literal["auto", "messages", "prompt_response"] = "auto"
    messages_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    system_field: str | None = None
    on_bad_record: BadRecordPolicy = "skip"
    overlong: Literal["skip", "truncate", "error"] = "skip"
    pad_to_multiple_of: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.on_bad_record not in ("error", "skip"):
            raise DataError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")
        if self.overlong not in ("skip", "truncate", "error"):
            raise DataError(f"overlong must be 'skip', 'truncate' or 'error', got {self.overlong!r}")
        if self.format not in ("auto", "messages", "prompt_response"):
            raise DataError(f"format must be 'auto', 'messages' or 'prompt_response', got {self.format!r}")
        if self.pad_to_multiple_of < 1 or self.max_seq_len < 1 or self.max_seq_len % self.pad_to_multiple_of:
            raise DataError(
                f"max_seq_len ({self.max_seq_len}) must be a positive multiple of "
                f"pad_to_multiple_of ({self.pad_to_multiple_of})"
            )


# ----------------------------------------------------------------------------------------------- formats


def _bad(record: Record, reason: str, message: str) -> DataError:
    """A `DataError` naming `record`."""
    return DataError(message, origin=record.origin, reason=reason)


def _pick_field(data: Mapping[str, Any], explicit: str | None, aliases: Sequence[str]) -> str | None:
    """The explicit field name if given, else the first alias present in `data`."""
    if explicit is not None:
        return explicit
    return next((name for name in aliases if name in data), None)


def _string_field(record: Record, key: str, what: str) -> str:
    """`record.data[key]` as a non-blank string, else a `DataError` (missing / wrong type / empty)."""
    if key not in record.data or record.data[key] is None:
        raise _bad(record, "missing_field", f"missing field '{key}'")
    value = record.data[key]
    if not isinstance(value, str):
        raise _bad(record, "wrong_type", f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(record, f"empty_{what}", f"empty {what} in field '{key}'")
    return value


def detect_format(data: Mapping[str, Any], cfg: DataConfig) -> str | None:
    """'messages' or 'prompt_response' for a record dict under `cfg`, or None when neither matches."""
    if cfg.format != "auto":
        return cfg.format
    if _pick_field(data, cfg.messages_field, MESSAGES_ALIASES) in data:
        return "messages"
    prompt_key = _pick_field(data, cfg.prompt_field, PROMPT_ALIASES)
    response_key = _pick_field(data, cfg.response_field, RESPONSE_ALIASES)
    if prompt_key in data or response_key in data:
        return "prompt_response"
    return None


def _normalise_turn(record: Record, turn: Any, position: int) -> Message:
    """One turn as ``{"role", "content"}``; accepts role/content or ShareGPT from/value."""
    if not isinstance(turn, Mapping):
        raise _bad(record, "wrong_type", f"turn {position} must be an object, got {type(turn).__name__}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role is None or content is None:
        raise _bad(record, "missing_field", f"turn {position} needs 'role' and 'content'")
    if not isinstance(role, str) or not isinstance(content, str):
        raise _bad(record, "wrong_type", f"turn {position}: 'role' and 'content' must be strings")
    role = SHAREGPT_ROLES.get(role.lower(), role.lower())
    if role not in KNOWN_ROLES:
        raise _bad(record, "bad_role", f"turn {position} has unknown role '{role}'")
    return {"role": role, "content": content}


def split_messages(record: Record, turns: list[Message]) -> tuple[list[Message], list[Message]]:
    """Split turns into (context, response): the response is the trailing run of assistant turns."""
    start = len(turns)
    while start > 0 and turns[start - 1]["role"] == "assistant":
        start -= 1
    context, response = turns[:start], turns[start:]
    if not response:
        raise _bad(record, "no_response", "conversation does not end with an assistant turn")
    if not context:
        raise _bad(record, "empty_prompt", "conversation has no turn before the assistant response")
    if any(not turn["content"].strip() for turn in response):
        raise _bad(record, "empty_response", "empty assistant response")
    return context, response


def _messages_turns(record: Record, cfg: DataConfig) -> list[Message]:
    """The normalised turn list of a messages-format record."""
    key = _pick_field(record.data, cfg.messages_field, MESSAGES_ALIASES) or MESSAGES_ALIASES[0]
    turns = record.data.get(key)
    if turns is None:
        raise _bad(record, "missing_field", f"missing field '{key}'")
    if not isinstance(turns, list):
        raise _bad(record, "wrong_type", f"field '{key}' must be a list of turns, got {type(turns).__name__}")
    return [_normalise_turn(record, turn, i) for i, turn in enumerate(turns)]


def _prompt_response_turns(record: Record, cfg: DataConfig) -> list[Message]:
    """The turn list (optional system, user, assistant) of a prompt/response record."""
    prompt_key = _pick_field(record.data, cfg.prompt_field, PROMPT_ALIASES) or PROMPT_ALIASES[0]
    response_key = _pick_field(record.data, cfg.response_field, RESPONSE_ALIASES) or RESPONSE_ALIASES[0]
    prompt = _string_field(record, prompt_key, "prompt")
    response = _string_field(record, response_key, "response")
    extra = record.data.get("input") if prompt_key == "instruction" else None
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    system_key = _pick_field(record.data, cfg.system_field, SYSTEM_ALIASES)
    system = record.data.get(system_key) if system_key is not None else None
    if system is not None and not (isinstance(system, str) and not system.strip()):
        turns.insert(0, {"role": "system", "content": _string_field(record, system_key, "system")})
    return turns


def record_turns(record: Record, cfg: DataConfig) -> tuple[list[Message], list[Message]]:
    """(context turns, response turns) of one record, or a `DataError` with the reason it is unusable."""
    if record.error is not None:
        raise _bad(record, "invalid_json", record.error)
    if not isinstance(record.data, Mapping):
        raise _bad(record, "wrong_type", f"record must be an object, got {type(record.data).__name__}")
    fmt = detect_format(record.data, cfg)
    if fmt is None:
        raise _bad(
            record, "unknown_format",
            f"unknown record format (fields {sorted(record.data)[:8]}); expected 'messages' or prompt/response fields",
        )
    turns = _messages_turns(record, cfg) if fmt == "messages" else _prompt_response_turns(record, cfg)
    return split_messages(record, turns)


# -------------------------------------------------------------------------------------------- tokenizing


class ChatEncoder:
    """Tokenizes (context, response) turns into (input_ids, prompt_len) with one tokenizer.

    Uses the tokenizer's chat template when it has one, else the plain fallback format (module docstring).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos_id = self._eos_id(tokenizer)
        self.end_ids = self._end_of_turn_ids(tokenizer, self.eos_id)

    @staticmethod
    def _eos_id(tokenizer: Any) -> int:
        """The tokenizer's EOS id (required: the model must learn to stop)."""
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no eos_token_id; cannot mark the end of responses")
        return int(tokenizer.eos_token_id)

    @staticmethod
    def _end_of_turn_ids(tokenizer: Any, eos_id: int) -> frozenset[int]:
        """Ids of EOS and of the known end-of-turn tokens present in the vocabulary."""
        vocab = tokenizer.get_vocab()
        return frozenset({eos_id} | {vocab[token] for token in END_OF_TURN_TOKENS if token in vocab})

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` without added special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def apply_template(self, record: Record, turns: list[Message], generation_prompt: bool) -> str:
        """The chat template rendered as text; template failures (e.g. "roles must alternate") become a
        `DataError` with reason template_error."""
        try:
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2 raises its own types, transformers ValueError/TypeError
            raise _bad(record, "template_error", f"chat template failed: {type(exc).__name__}: {exc}") from None

    def render(self, record: Record, context: list[Message], response: list[Message]) -> tuple[str, str]:
        """(prompt text, full text) for the two turn lists."""
        if self.has_template:
            prompt = self.apply_template(record, context, generation_prompt=True)
            return prompt, self.apply_template(record, context + response, generation_prompt=False)
        prompt = "".join(f"### {turn['role'].capitalize()}:\n{turn['content']}\n\n" for turn in context)
        prompt += "### Assistant:\n"
        return prompt, prompt + "\n\n### Assistant:\n".join(turn["content"] for turn in response)

    def end_response(self, ids: list[int], prompt_len: int) -> list[int]:
        """Cut `ids` right after the last end-of-turn token of the response, or append EOS if there is none."""
        for position in range(len(ids) - 1, prompt_len - 1, -1):
            if ids[position] in self.end_ids:
                return ids[: position + 1]
        return ids + [self.eos_id]

    def encode(self, record: Record, context: list[Message], response: list[Message]) -> tuple[list[int], int]:
        """(input_ids, prompt_len) for one example; `DataError` (template_mismatch) if the prompt tokens are
        not a prefix of the full conversation's tokens."""
        prompt_text, full_text = self.render(record, context, response)
        prompt_ids, full_ids = self.encode_text(prompt_text), self.encode_text(full_text)
        prompt_len = len(prompt_ids)
        if full_ids[:prompt_len] != prompt_ids or len(full_ids) == prompt_len:
            raise _bad(
                record, "template_mismatch",
                "tokens of the templated prompt (add_generation_prompt=True) are not a prefix of the "
                "templated conversation's tokens (often: a response starting with whitespace)",
            )
        return self.end_response(full_ids, prompt_len), prompt_len


def fit_length(record: Record, ids: list[int], prompt_len: int, cfg: DataConfig, report: DataReport) -> list[int]:
    """Apply the over-long policy: return `ids` (possibly truncated) or raise `DataError` (reason overlong)."""
    if len(ids) <= cfg.max_seq_len:
        return ids
    message = f"document has {len(ids)} tokens > max_seq_len {cfg.max_seq_len}"
    if cfg.overlong == "truncate" and prompt_len < cfg.max_seq_len:
        report.truncated += 1
        return ids[: cfg.max_seq_len]
    if cfg.overlong == "truncate":
        message += f" and its prompt alone has {prompt_len} tokens"
    raise _bad(record, "overlong", message)


def record_to_document(record: Record, encoder: ChatEncoder, cfg: DataConfig, report: DataReport) -> Document:
    """One record -> one `Document`; raises `DataError` for any bad record (the caller applies the policy)."""
    context, response = record_turns(record, cfg)
    ids, prompt_len = encoder.encode(record, context, response)
    ids = fit_length(record, ids, prompt_len, cfg, report)
    return Document(input_ids=ids, prompt_len=prompt_len, source=record.origin)


def _policy_for(error: DataError, cfg: DataConfig) -> BadRecordPolicy:
    """Which policy handles `error`: the overlong policy for over-long documents, else on_bad_record."""
    if error.reason == "overlong":
        return "error" if cfg.overlong == "error" else "skip"
    return cfg.on_bad_record


def iter_documents(
    records: Iterable[Record], tokenizer: Any, cfg: DataConfig, report: DataReport | None = None
) -> Iterator[Document]:
    """Tokenize records into documents, applying the bad-record and over-long policies; counts go to
    `report` (a fresh one if None)."""
    report = report if report is not None else DataReport()
    encoder = ChatEncoder(tokenizer)
    for record in records:
        report.records_seen += 1
        try:
            document = record_to_document(record, encoder, cfg, report)
        except DataError as error:
            report.handle(error, _policy_for(error, cfg))
            continue
        report.documents += 1
        report.tokens += len(document)
        report.response_tokens += document.response_len
        yield document


def load_documents(
    sources: Sequence[str | os.PathLike | Mapping[str, Any] | SourceSpec] | str | os.PathLike | SourceSpec,
    tokenizer: Any,
    cfg: DataConfig | None = None,
) -> tuple[list[Document], DataReport]:
    """Read every source in order and tokenize it. Returns (documents, report). Raises `DataError` for an
    unreadable source, or for the first bad record when ``on_bad_record="error"``."""
    cfg = cfg or DataConfig()
    if isinstance(sources, (str, os.PathLike, SourceSpec, Mapping)):
        sources = [sources]
    report = DataReport()
    documents: list[Document] = []
    for source in sources:
        documents.extend(iter_documents(load_records(source), tokenizer, cfg, report))
    if not documents:
        raise DataError(f"no usable documents in {[str(s) for s in sources]}; {report.summary().splitlines()[0]}")
    return documents, report
