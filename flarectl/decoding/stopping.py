"""Stop conditions: EOS / stop token ids and stop strings checked on decoded text."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopChecker:
    """Finds the first token at which the decoded text of a growing sequence contains a stop string.

    ``decode(token_ids) -> str`` decodes a whole token list (so multi-byte characters split across tokens are
    handled by the tokenizer). Feed the tokens with ``extend``; it returns the number of tokens to keep (the
    shortest prefix whose text contains a stop string) or ``None`` while no stop string has appeared. ``text_cut``
    is where the stop string begins in that prefix's text (the reported text ends there).
    """

    def __init__(self, stop_strings: Sequence[str], decode: Callable[[list[int]], str]):
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.stop_strings = list(stop_strings)
        self.decode = decode
        self.tokens: list[int] = []
        self.text_cut: int | None = None

    def _find(self, text: str, start: int) -> int | None:
        hits = [i for s in self.stop_strings if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def extend(self, new_tokens: Sequence[int]) -> int | None:
        """Append tokens; return how many tokens of the whole sequence to keep if a stop string completed."""
        if not self.stop_strings:
            self.tokens.extend(new_tokens)
            return None
        longest = max(len(s) for s in self.stop_strings)
        before = len(self.tokens)
        # a match must end in the new tokens; the margin covers characters completed across the boundary
        search_from = max(0, len(self.decode(self.tokens)) - longest - 4) if self.tokens else 0
        self.tokens.extend(new_tokens)
        if self._find(self.decode(self.tokens), search_from) is None:
            return None
        for keep in range(before + 1, len(self.tokens) + 1):  # shortest prefix that completes a stop string
            cut = self._find(self.decode(self.tokens[:keep]), search_from)
            if cut is not None:
                self.tokens = self.tokens[:keep]
                self.text_cut = cut
                return keep
        return None  # unreachable: the full sequence matched
