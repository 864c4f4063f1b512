"""Requests, their results, and the per-request bookkeeping of a request in flight (tokens, stops, timing)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flarectl.decoding import MAX_BLOCK_SIZE, MODES  # noqa: F401  (re-exported for the engine)
from flarectl.decoding.sampling import Sampler
from flarectl.decoding.stopping import StopChecker


@dataclass
class Request:
    """One generation request. ``block_size``/``mask_token_id`` default to the engine's (trust modes);
    ``stop_ids`` defaults to the tokenizer's EOS. ``on_token(index, new_ids)`` streams final tokens. ``sampler``
    (optional) shares one seeded generator among requests (``generate`` does so for a batch)."""

    prompt: Sequence[int]
    mode: str = "ar"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    block_size: int | None = None
    threshold: float = 0.9
    stop_ids: Sequence[int] | None = None
    stop_strings: Sequence[str] = ()
    on_token: Callable[[int, list[int]], None] | None = None
    sampler: Sampler | None = None
    index: int = -1  # set by the engine: submission order


@dataclass
class RequestResult:
    """``finish_reason``: eos | stop | length | error (then ``error`` says why). Times in seconds: ``queue`` from
    submission to admission, ``ttft`` from admission to the first token, ``seconds`` from admission to the end;
    ``tpot`` = time per output token after the first. ``acceptance_histogram`` as in ``GenerationResult``."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str
    forwards: int = 0
    acceptance_histogram: list[int] = field(default_factory=list)
    queue: float = 0.0
    ttft: float = 0.0
    seconds: float = 0.0
    tpot: float = 0.0
    error: str | None = None

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.forwards, 1)


class Row:
    """A request in a slot: its decoding state (``pending`` token, mode fields) and bookkeeping."""

    def __init__(self, req: Request, slot: int, *, stop_ids, tokenizer, mask_id: int | None, block: int,
                 submitted: float):
        self.req, self.slot, self.index = req, slot, req.index
        self.mode, self.block, self.mask_id = req.mode, block, mask_id
        self.sampler: Sampler | None = req.sampler  # the engine fills in a greedy or per-request sampler
        self.tokens: list[int] = []
        self.forwards = 0
        self.hist = [0] * (0 if req.mode == "ar" else block + 1)
        self.finish: str | None = None
        self.stop_ids = set(int(t) for t in stop_ids)
        self.tokenizer = tokenizer
        decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None
        self.checker = StopChecker(req.stop_strings, decode) if req.stop_strings else None
        self.submitted, self.admitted = submitted, time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at = 0.0
        # decoding state: the last final token not yet in the cache, and tokens to commit with the next step
        self.pending = int(req.prompt[-1])
        self.commit_tokens: list[int] = []
        self.phase = "draft"  # ar-trust: draft | verify
        self.scheme = "anchored"  # ar-trust: anchored | fused; diffusion-trust: plain | anchored (``modes.configure``)
        self.anchor = 0  # ar-trust anchored draft step: the clean column of ``pending``
        self.commit_late = False  # commit this step's (uncommitted) clean tokens after the update
        self.drafts: list[int] = []
        self.q = None  # ar-trust draft distributions [B, V] (sampling)
        self.x = [mask_id] * block if mask_id is not None else []  # diffusion-trust block tokens
        self.decided = [False] * block
        self.emitted = 0

    def emit(self, new: Sequence[int]) -> bool:
        """Append final tokens, applying stop ids, max_new_tokens and stop strings; stream them; True if done."""
        toks, reason = [int(t) for t in new], None
        for i, t in enumerate(toks):
            if t in self.stop_ids:
                toks, reason = toks[:i + 1], "eos"
                break
        room = self.req.max_new_tokens - len(self.tokens)
        if len(toks) > room or (len(toks) == room and reason is None):
            toks, reason = toks[:room], "length"
        if self.checker is not None:
            keep = self.checker.extend(toks)
            if keep is not None:
                toks, reason = toks[:keep - len(self.tokens)], "stop"
        if toks and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.extend(toks)
        if toks and self.req.on_token is not None:
            self.req.on_token(self.index, toks)
        if reason is not None:
            self.finish = reason
            self.finished_at = time.perf_counter()
        return reason is not None

    def result(self) -> RequestResult:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if self.finish == "stop":
                text = text[:self.checker.text_cut]
        first = self.first_token_at or self.finished_at
        n = len(self.tokens)
        return RequestResult(self.index, self.tokens, text, self.finish or "length", self.forwards, self.hist,
                             queue=self.admitted - self.submitted, ttft=first - self.admitted,
                             seconds=self.finished_at - self.admitted,
                             tpot=(self.finished_at - first) / (n - 1) if n > 1 else 0.0)


def failed(req: Request, message: str) -> RequestResult:
    return RequestResult(req.index, [], None, "error", error=message)
