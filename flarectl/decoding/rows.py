"""The result of one prompt's generation (``generate``); per-request bookkeeping: ``flarectl.engine.requests``."""

from __future__ import annotations

from dataclasses import dataclass, field


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
