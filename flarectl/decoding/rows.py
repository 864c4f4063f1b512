"""Per-row bookkeeping shared by the decoders: emitted tokens, stop conditions, forward counts, streaming."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from flarectl.decoding.stopping import StopChecker


@dataclass
class GenerationResult:
    """One prompt's generation.

    ``forwards``: model forwards this row took part in (prefill included). ``acceptance_histogram``: AR-Trust —
    steps by number of accepted drafts (index 0..B); Diffusion-Trust — denoise steps by tokens committed (0..B);
    AR — empty. ``finish_reason``: "eos" (a stop id, kept as the last token), "stop" (a stop string: the tokens end
    with the one completing it, the text ends before it) or "length".
    """

    token_ids: list[int]
    text: str | None
    forwards: int
    tokens_per_forward: float
    seconds: float
    acceptance_histogram: list[int] = field(default_factory=list)
    finish_reason: str = "length"


class RowTracker:
    """Tracks the active rows of a batch; batch position b maps to original prompt index ``active[b]``."""

    def __init__(self, n_rows: int, *, max_new_tokens: int, stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), tokenizer=None, on_token: Callable | None = None,
                 hist_size: int = 0):
        self.active = list(range(n_rows))
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.forwards = [0] * n_rows
        self.finish: list[str | None] = [None] * n_rows
        self.hist = [[0] * hist_size for _ in range(n_rows)]
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(int(t) for t in stop_ids)
        self.tokenizer = tokenizer
        self.on_token = on_token
        decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None
        self.checkers = [StopChecker(stop_strings, decode) for _ in range(n_rows)] if stop_strings else None
        self.t0 = time.perf_counter()
        self.seconds = [0.0] * n_rows

    def count_forward(self) -> None:
        for r in self.active:
            self.forwards[r] += 1

    def record(self, b: int, value: int) -> None:
        self.hist[self.active[b]][value] += 1

    def emit(self, b: int, new: Sequence[int]) -> bool:
        """Append final tokens to batch row b, applying stop ids, max_new_tokens and stop strings; True if done."""
        r = self.active[b]
        toks, reason = [int(t) for t in new], None
        for i, t in enumerate(toks):
            if t in self.stop_ids:
                toks, reason = toks[:i + 1], "eos"
                break
        room = self.max_new_tokens - len(self.tokens[r])
        if len(toks) > room or (len(toks) == room and reason is None):
            toks, reason = toks[:room], "length"
        if self.checkers is not None:
            keep = self.checkers[r].extend(toks)
            if keep is not None:
                toks, reason = toks[:keep - len(self.tokens[r])], "stop"
        self.tokens[r].extend(toks)
        if toks and self.on_token is not None:
            self.on_token(r, toks)
        if reason is not None:
            self.finish[r] = reason
            self.seconds[r] = time.perf_counter() - self.t0
        return reason is not None

    def compact(self) -> torch.Tensor | None:
        """Drop finished rows; return the kept batch positions (or None if none finished)."""
        keep = [b for b, r in enumerate(self.active) if self.finish[r] is None]
        if len(keep) == len(self.active):
            return None
        self.active = [self.active[b] for b in keep]
        return torch.tensor(keep, dtype=torch.long)

    def results(self) -> list[GenerationResult]:
        out = []
        for r, toks in enumerate(self.tokens):
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                if self.finish[r] == "stop":
                    text = text[:self.checkers[r].text_cut]
            out.append(GenerationResult(toks, text, self.forwards[r], len(toks) / max(self.forwards[r], 1),
                                        self.seconds[r], self.hist[r], self.finish[r] or "length"))
        return out
