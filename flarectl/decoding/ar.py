"""Plain autoregressive decoding with the hybrid cache (the baseline every other mode is checked against).

Convention shared by all modes: the cache holds every committed token except the last sampled one ("pending"),
which is fed at the next forward. AR prefill commits the whole prompt and reads the first token's logits at each
row's last prompt position; each step then feeds the pending token (committing it) and samples the next.
"""

from __future__ import annotations

import torch

from flarectl.decoding.rows import RowTracker
from flarectl.decoding.runner import pad_rows
from flarectl.decoding.sampling import Sampler


def decode_ar(runner, prompts: list[list[int]], sampler: Sampler, tracker: RowTracker, device) -> None:
    """Decode every row until it stops; results land in ``tracker``."""
    ids, counts = pad_rows(prompts, device)
    logits, _ = runner.forward(ids, counts, None, commit=True)
    tracker.count_forward()
    logits = logits[torch.arange(len(prompts), device=device), counts - 1]  # [R, V]
    while True:
        tok = sampler.sample(sampler.probs(logits))  # [R]
        for b, t in enumerate(tok.tolist()):
            tracker.emit(b, [t])
        keep = tracker.compact()
        if keep is not None:
            if not tracker.active:
                return
            keep = keep.to(device)
            runner.keep(keep)
            tok = tok[keep]
        logits, _ = runner.forward(tok[:, None], torch.ones_like(tok), None, commit=True)
        tracker.count_forward()
        logits = logits[:, 0]
