"""StreamLayout: what every token of a forward pass is, and therefore what it may see.

One forward pass of flarectl's model runner carries any mix of

* **clean tokens** — the ordinary token-causal stream, several packed documents per row; and
* **noisy windows** — short runs of tokens (a diffusion block, shifted one position left: the window that predicts
  block tokens ``[s, s+B)`` holds inputs at positions ``[s-1, s+B-1)``; see ``flarectl.objectives``).

Visibility (softmax layers) for a query token q and key token k of the same row:

* padding (``doc_ids == -1``) sees only itself and is seen by nobody;
* a clean key is visible iff it is in q's document and ``position[k] < clean_limit[q]``, where
  ``clean_limit = position + 1`` for a clean query (causal) and ``window_start`` for a noisy query (a noisy window
  sees the clean prefix strictly before its first position);
* a noisy key is visible iff it is in q's own window (block-bidirectional); clean queries never see noisy keys.

Keys held in a decoding cache are clean tokens of the row's only document at positions ``< cache length``.

In Gated DeltaNet layers the same facts become a state schedule: the clean tokens of each document run causally;
a window starts from the clean state after the tokens before ``window_start`` (and its convolution sees the clean
inputs just before it), runs causally over its own tokens, and writes nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamLayout:
    """Per-token metadata of one forward pass; every tensor is [B, L] long on the model's device."""

    position_ids: torch.Tensor
    """Position of each token in its document (RoPE position); a window token has its clean twin's position."""
    doc_ids: torch.Tensor
    """Document index within the row (0, 1, ...); -1 marks padding."""
    window_ids: torch.Tensor
    """-1 for clean tokens; otherwise an id unique to the token's noisy window within the row."""
    window_start: torch.Tensor
    """For noisy tokens, the position of their window's first token; for clean tokens, their own position."""
    limit: torch.Tensor | None = None
    """Optional explicit ``clean_limit`` (e.g. block-causal clean context for the block-diffusion ablation)."""

    @property
    def is_noisy(self) -> torch.Tensor:
        return self.window_ids >= 0

    @property
    def is_clean(self) -> torch.Tensor:
        return (self.window_ids < 0) & (self.doc_ids >= 0)

    @property
    def clean_limit(self) -> torch.Tensor:
        """Clean keys of the same document at positions below this are visible to each token; [B, L]."""
        if self.limit is not None:
            return self.limit
        return torch.where(self.is_noisy, self.window_start, self.position_ids + 1)

    def _map(self, fn) -> "StreamLayout":
        return StreamLayout(fn(self.position_ids), fn(self.doc_ids), fn(self.window_ids), fn(self.window_start),
                            None if self.limit is None else fn(self.limit))

    def to(self, device: torch.device | str) -> "StreamLayout":
        return self._map(lambda t: t.to(device))

    def select_rows(self, rows: torch.Tensor) -> "StreamLayout":
        return self._map(lambda t: t[rows])

    @staticmethod
    def causal(batch: int, length: int, start: torch.Tensor | int = 0, device=None) -> "StreamLayout":
        """Plain clean tokens, one document per row, positions start..start+length-1 (start: int or [B])."""
        start_t = torch.as_tensor(start, device=device).reshape(-1, 1)
        pos = start_t + torch.arange(length, device=device)[None]
        pos = pos.expand(batch, length).contiguous()
        zeros = torch.zeros_like(pos)
        return StreamLayout(pos, zeros, torch.full_like(pos, -1), pos.clone())

    @staticmethod
    def concat(parts: list["StreamLayout"]) -> "StreamLayout":
        """Concatenate layouts along the sequence dimension (window ids must already be distinct)."""
        fields = [torch.cat([getattr(p, f) for p in parts], dim=1)
                  for f in ("position_ids", "doc_ids", "window_ids", "window_start")]
        if all(p.limit is None for p in parts):
            return StreamLayout(*fields)
        return StreamLayout(*fields, torch.cat([p.clean_limit for p in parts], dim=1))


def visibility(query: StreamLayout, key: StreamLayout) -> torch.Tensor:
    """Boolean attention mask [B, Lq, Lk]: True where query token may attend to key token (same row)."""
    qd, kd = query.doc_ids[:, :, None], key.doc_ids[:, None, :]
    same_doc = (qd == kd) & (kd >= 0)
    k_clean = (key.window_ids < 0)[:, None, :]
    clean_ok = same_doc & k_clean & (key.position_ids[:, None, :] < query.clean_limit[:, :, None])
    qw, kw = query.window_ids[:, :, None], key.window_ids[:, None, :]
    noisy_ok = (qw >= 0) & (qw == kw) & (qd == kd)
    return clean_ok | noisy_ok


def cache_visibility(query: StreamLayout, cache_lengths: torch.Tensor, capacity: int) -> torch.Tensor:
    """Boolean mask [B, Lq, capacity] over cached keys: slot p visible iff p < cache length and p < clean_limit."""
    slots = torch.arange(capacity, device=cache_lengths.device)[None, None, :]
    ok = (slots < cache_lengths[:, None, None]) & (slots < query.clean_limit[:, :, None])
    return ok & (query.doc_ids >= 0)[:, :, None]


def add_self_for_padding(mask: torch.Tensor, layout: StreamLayout) -> torch.Tensor:
    """Let padding queries see themselves so that softmax rows are never empty (their outputs are ignored)."""
    pad = layout.doc_ids < 0
    if not bool(pad.any()):
        return mask
    eye = torch.eye(mask.shape[1], mask.shape[2], dtype=torch.bool, device=mask.device)[None]
    return mask | (pad[:, :, None] & eye)
