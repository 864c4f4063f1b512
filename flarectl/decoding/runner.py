"""Model forwards for decoding: a clean section and at most one noisy window per row.

Every decoding step is one forward of, per row, ``counts[row]`` clean tokens (a right-padded section of width C)
followed by an optional noisy window of W tokens that starts right after that row's clean tokens.
``CachedRunner`` extends a ``HybridCache`` (the engine prefills slots with it); ``commit=False`` leaves the clean
tokens pending so that the caller commits any per-row prefix with ``commit(n)``. The engine's backends
(``flarectl.engine.backends``) give the same logits from a static slot cache, or with no cache at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flarectl.models.layout import StreamLayout

PENDING_PATH_MAX_CLEAN = 16
"""Clean sections up to this width run through the batched pending GDN path (decode steps); wider ones (prefill)
through the packed path when it applies."""


def pad_rows(rows: Sequence[Sequence[int]], device, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [R, C] right-padded with ``fill``, counts [R])."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), fill, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long, device=device)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


def step_layout(start: torch.Tensor, counts: torch.Tensor, width: int, window: int,
                seen: torch.Tensor | None = None) -> StreamLayout:
    """Layout [R, width + window]: clean tokens at positions start + i (i < counts, the rest padding), then a
    window at positions start + seen + j with window_start = start + seen: the window sees the first ``seen[r]``
    clean tokens (default all ``counts[r]``; ``counts - 1``: the window is anchored on the last clean token, which
    it holds itself). start, counts, seen: [R]."""
    cols = torch.arange(width + window, device=start.device)[None].expand(start.shape[0], -1)
    in_window = cols >= width
    clean_valid = cols < counts[:, None]
    wstart = (start + (counts if seen is None else seen))[:, None]
    pos = torch.where(in_window, wstart + cols - width, start[:, None] + cols)
    doc = torch.where(in_window | clean_valid, 0, -1)
    win = torch.where(in_window, 0, -1)
    return StreamLayout(pos, doc, win, torch.where(in_window, wstart, pos))


class CachedRunner:
    """Decoding forwards that extend a ``HybridCache`` of ``batch`` rows."""

    def __init__(self, model, batch: int, capacity: int):
        self.model = model
        self.cache = model.new_cache(batch, capacity)

    @torch.no_grad()
    def forward(self, clean: torch.Tensor, counts: torch.Tensor, window: torch.Tensor | None, commit: bool):
        """clean [R, C] (first counts[r] valid), window [R, W] or None -> (clean logits [R, C, V], window logits
        [R, W, V] or None). ``commit``: commit every row's clean tokens now; else they stay pending for ``commit``."""
        given, wlen = clean.shape[1], 0 if window is None else window.shape[1]
        if wlen and given == 0:
            # gdn._pending cannot run an empty clean section (its conv gets W-1 < kernel inputs): give it one
            # padding slot, which commits nothing and leaves the window starting from the committed state.
            clean = clean.new_zeros(clean.shape[0], 1)
        width = clean.shape[1]
        layout = step_layout(self.cache.lengths, counts, width, wlen)
        ids = clean if window is None else torch.cat([clean, window], 1)
        packed_ok = width > PENDING_PATH_MAX_CLEAN and (window is None or bool((counts > 0).all()))
        if commit and packed_ok:
            logits = self.model(ids, layout, self.cache, commit_all=True)
        else:
            logits = self.model(ids, layout, self.cache, commit_all=False)
            if commit:
                self.cache.commit(counts)
            elif given == 0:
                self.cache.discard_pending()
        return logits[:, :given], (logits[:, width:] if wlen else None)

    def commit(self, n: torch.Tensor) -> None:
        """Commit the first n[r] clean tokens of the last ``forward(commit=False)``."""
        self.cache.commit(n)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in ``rows`` (batch positions, in order)."""
        self.cache = self.cache.select_rows(rows)
