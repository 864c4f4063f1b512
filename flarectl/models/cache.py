"""HybridCache: attention KV plus Gated DeltaNet recurrent and convolution states, with commit / rollback.

Each row holds one sequence whose first ``lengths[row]`` tokens are committed. A forward that extends the cache
writes its clean tokens' attention keys/values at their positions right away (slots at or beyond the committed
length are invisible, so uncommitted writes are harmless) and leaves *pending* Gated DeltaNet states for every
prefix of its clean tokens. ``commit(n)`` then advances each row by ``n[row]`` of those tokens — any accepted length,
chosen after the forward (speculative verification) — without recomputing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionCache:
    key: torch.Tensor  # [B, Hkv, capacity, D]
    value: torch.Tensor  # [B, Hkv, capacity, D]


@dataclass
class GDNCache:
    state: torch.Tensor  # [B, HV, K, V] fp32, after the committed tokens
    conv: torch.Tensor  # [B, conv_dim, W-1] conv inputs preceding the next token
    pending_states: torch.Tensor | None = None  # [B, Lc+1, HV, K, V]: state after 0..Lc pending clean tokens
    pending_conv: torch.Tensor | None = None  # [B, W-1+Lc, conv_dim]: conv context followed by pending inputs


@dataclass
class HybridCache:
    """Per-layer caches for a batch of sequences."""

    lengths: torch.Tensor  # [B] committed tokens per row
    capacity: int
    attention: dict[int, AttentionCache] = field(default_factory=dict)
    gdn: dict[int, GDNCache] = field(default_factory=dict)
    pending: int = 0  # clean tokens written by the last extending forward and not yet committed

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def commit(self, n: torch.Tensor | int) -> None:
        """Commit the first ``n[row]`` pending clean tokens of each row (0 <= n <= pending)."""
        n = torch.as_tensor(n, device=self.lengths.device).expand(self.batch_size).long()
        if int(n.max()) > self.pending or int(n.min()) < 0:
            raise ValueError(f"cannot commit {n.tolist()} tokens: {self.pending} pending")
        rows = torch.arange(self.batch_size, device=n.device)
        for c in self.gdn.values():
            if c.pending_states is None:
                continue
            c.state = c.pending_states[rows, n].contiguous()
            width = c.conv.shape[-1]
            idx = n[:, None] + torch.arange(width, device=n.device)[None]  # [B, W-1]
            ctx = c.pending_conv.gather(1, idx[:, :, None].expand(-1, -1, c.pending_conv.shape[-1]))
            c.conv = ctx.transpose(1, 2).contiguous()
            c.pending_states = c.pending_conv = None
        self.lengths = self.lengths + n
        self.pending = 0

    def discard_pending(self) -> None:
        """Forget the last forward's pending tokens (nothing committed)."""
        self.commit(0)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty the given rows (for a new sequence in that slot)."""
        self.lengths[rows] = 0
        for c in self.gdn.values():
            c.state[rows] = 0
            c.conv[rows] = 0

    def select_rows(self, rows: torch.Tensor) -> "HybridCache":
        """A new cache holding copies of the given rows."""
        if self.pending:
            raise ValueError("commit or discard pending tokens before selecting rows")
        return HybridCache(
            lengths=self.lengths[rows].clone(),
            capacity=self.capacity,
            attention={i: AttentionCache(c.key[rows].clone(), c.value[rows].clone()) for i, c in self.attention.items()},
            gdn={i: GDNCache(c.state[rows].clone(), c.conv[rows].clone()) for i, c in self.gdn.items()},
        )
