"""The engine's static-shape model step over a slot cache (a ``HybridCache`` of C rows updated in place).

One step feeds every slot ``ids [C, Wc + Ww]``: a clean section of width Wc (the first ``counts[c]`` tokens are
real, the rest padding) followed by a noisy window of width Ww (the first ``wlen[c]`` real). Slot c's clean tokens
sit at positions ``L + i`` (L = ``cache.lengths[c]``), its window at ``L + counts[c] + j`` and sees the committed
prefix plus the step's real clean tokens (window_start = L + counts[c]) and its own real window tokens
(block-bidirectional). Rows with ``commit[c]`` commit their clean tokens in the same step; the others leave the
cache as it was (their clean keys/values are written at positions past the committed length, where nobody sees
them). This is exactly the visibility of ``StreamLayout`` and the rules of ``gdn._pending`` — the adapter path
(``FlareModel.forward`` with a ``HybridCache``) is the reference twin the tests compare against.

No host sync, no data-dependent shape: attention runs over the whole capacity with a length mask (SDPA), keys and
values are scattered at each slot's length, the Gated DeltaNet layers run a W-token recurrence (padding tokens
are identity updates: decay 1, beta 0) and the convolution state is gathered at ``counts``. So on CUDA each
(C, Wc, Ww) shape is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flarectl.models.adapter import ATTENTION
from flarectl.models.attention import _project, apply_rope
from flarectl.models.cache import HybridCache
from flarectl.models.gdn import _conv, _gates, _output, _prepare_qk, _split_heads, _step


def torch_recurrence(state, q, k, v, g, beta):
    """Gated delta rule over T tokens (pure torch). state [C,HV,K,V]; q,k [C,T,HV,K]; v [C,T,HV,V];
    g, beta [C,T,HV] -> (outputs [C,T,HV,V], final state)."""
    outs = []
    for t in range(q.shape[1]):
        state, o = _step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outs.append(o)
    if not outs:
        return v.new_zeros(v.shape), state
    return torch.stack(outs, 1), state


def fla_recurrence(state, q, k, v, g, beta):
    """Same contract as ``torch_recurrence`` through fla's fused recurrent kernel (CUDA)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    if q.shape[1] == 0:
        return v.new_zeros(v.shape), state
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, scale=1.0, initial_state=state.contiguous(),
                                                output_final_state=True, use_qk_l2norm_in_kernel=False)
    return o, final


def resolve_gdn_kernel(kernel: str, device: torch.device) -> str:
    """'auto' -> 'fla' on CUDA when fla imports, else 'torch'."""
    if kernel != "auto":
        if kernel not in ("torch", "fla"):
            raise ValueError(f"gdn kernel must be auto, torch or fla; got {kernel!r}")
        return kernel
    if device.type != "cuda":
        return "torch"
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:  # noqa: BLE001 - fla missing or broken: the torch recurrence is always there
        return "torch"
    return "fla"


class StaticStep:
    """``step(ids, counts, wlen, commit, width_clean)`` -> logits [C, W, V] on a fixed slot cache."""

    def __init__(self, model, cache: HybridCache, *, gdn_kernel: str = "auto"):
        self.model, self.cache = model, cache
        self.kernel = resolve_gdn_kernel(gdn_kernel, cache.lengths.device)
        self.recurrence = fla_recurrence if self.kernel == "fla" else torch_recurrence
        # Speculative commit: every step also keeps, per row, the GDN state and conv context after its whole clean
        # section, so a row that did not commit in the step can commit it afterwards (``commit_last``) once the
        # caller knows it wants to (AR-Trust after a fully accepted verify) — no recomputation, no rollback.
        self.last_state = {i: torch.empty_like(c.state) for i, c in cache.gdn.items()}
        self.last_conv = {i: torch.empty_like(c.conv) for i, c in cache.gdn.items()}
        self.last_counts = torch.zeros_like(cache.lengths)
        self.last_commit = torch.zeros_like(cache.lengths, dtype=torch.bool)

    @torch.no_grad()
    def commit_last(self, rows: torch.Tensor) -> None:
        """Commit the last step's clean tokens for ``rows`` [C] bool (rows that step left uncommitted)."""
        rows = rows & ~self.last_commit
        for i, c in self.cache.gdn.items():
            c.state.copy_(torch.where(rows[:, None, None, None], self.last_state[i], c.state))
            c.conv.copy_(torch.where(rows[:, None, None], self.last_conv[i], c.conv))
        self.cache.lengths.add_(torch.where(rows, self.last_counts, 0))

    # -- masks ------------------------------------------------------------------------------------------------
    def _attended_slots(self, wc: int) -> int:
        """How many cache slots attention reads: the whole capacity on CUDA (static shapes for graph capture); on
        other devices (eager) only up to the longest slot plus this step's clean tokens, rounded up to 64 — every
        slot past that is masked anyway, and reading the whole capacity made CPU decoding slow down with the
        ``max_new_tokens`` budget."""
        cache = self.cache
        if cache.lengths.device.type == "cuda":
            return cache.capacity
        used = int(cache.lengths.max()) + wc
        return min(cache.capacity, -(-max(used, 1) // 64) * 64)

    def _attention_mask(self, counts, wlen, wc: int, ww: int, cap: int) -> torch.Tensor:
        """[C, Wc+Ww, cap+Ww] bool over the first ``cap`` slots: clean query i sees slots <= L+i; a window query
        sees slots < L+counts and the real window tokens; padding window queries see themselves (no empty row)."""
        lengths = self.cache.lengths
        dev = lengths.device
        slots = torch.arange(cap, device=dev)
        cols = torch.arange(wc + ww, device=dev)
        in_win = cols >= wc
        limit = torch.where(in_win[None], (lengths + counts)[:, None], lengths[:, None] + cols[None] + 1)
        cached = slots[None, None] < limit[:, :, None]  # [C, W, cap]
        j = torch.arange(ww, device=dev)
        real = j[None] < wlen[:, None]  # [C, Ww]
        win = (real[:, :, None] & real[:, None, :]) | torch.eye(ww, dtype=torch.bool, device=dev)[None]
        win = torch.cat([torch.zeros(lengths.shape[0], wc, ww, dtype=torch.bool, device=dev),
                         win.expand(lengths.shape[0], -1, -1)], 1)
        return torch.cat([cached, win], 2)

    # -- layers -----------------------------------------------------------------------------------------------
    def _attention(self, layer_idx, module, x, rope, mask, wc: int, cap: int):
        cache = self.cache
        kv = cache.attention[layer_idx]
        bsz, width, _ = x.shape
        q, k, v, gate = _project(module, x, self.model.family == "qwen3_5")
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if wc:
            idx = (cache.lengths[:, None] + torch.arange(wc, device=x.device)).clamp(max=cache.capacity - 1)
            idx = idx[:, None, :, None].expand(-1, kv.key.shape[1], -1, kv.key.shape[-1])
            kv.key.scatter_(2, idx, k[:, :, :wc].to(kv.key.dtype))
            kv.value.scatter_(2, idx, v[:, :, :wc].to(kv.value.dtype))
        keys = torch.cat([kv.key[:, :, :cap].to(k.dtype), k[:, :, wc:]], 2)
        values = torch.cat([kv.value[:, :, :cap].to(v.dtype), v[:, :, wc:]], 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=module.scaling,
                                             enable_gqa=q.shape[1] != keys.shape[1])
        out = out.transpose(1, 2).reshape(bsz, width, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return module.o_proj(out)

    def _gdn(self, layer_idx, module, x, counts, commit, wc: int):
        c = self.cache.gdn[layer_idx]
        bsz, width, _ = x.shape
        ww = width - wc
        dt = torch.promote_types(x.dtype, torch.float32)
        mixed = module.in_proj_qkv(x)
        g, beta = _gates(module, x)
        g, beta = g.to(dt), beta.to(dt)
        weight = module.conv1d.weight.squeeze(1)
        span = c.conv.shape[-1]
        ctx = torch.cat([c.conv.transpose(1, 2).to(mixed.dtype), mixed[:, :wc]], 1)  # [C, k-1+Wc, D]
        idx = counts[:, None] + torch.arange(span, device=x.device)[None]
        left = ctx.gather(1, idx[:, :, None].expand(-1, -1, ctx.shape[-1]))  # conv context after the clean tokens

        y = _conv(ctx, weight, module.conv1d.bias, wc, dt)
        q, k, v = _split_heads(module, y)
        q, k = _prepare_qk(module, q, k, dt)
        real = (torch.arange(wc, device=x.device)[None] < counts[:, None])[..., None]  # [C, Wc, 1]
        gc, bc = g[:, :wc] * real, beta[:, :wc] * real  # padding: decay 1, no write
        state0 = c.state.to(dt)
        o_clean, state_clean = self.recurrence(state0, q, k, v, gc, bc)
        core = [o_clean]
        if ww:
            yn = _conv(torch.cat([left, mixed[:, wc:]], 1), weight, module.conv1d.bias, ww, dt)
            qn, kn, vn = _split_heads(module, yn)
            qn, kn = _prepare_qk(module, qn, kn, dt)
            o_win, _ = self.recurrence(state_clean, qn, kn, vn, g[:, wc:], beta[:, wc:])
            core.append(o_win)
        keep = commit[:, None, None, None]
        self.last_state[layer_idx].copy_(state_clean.to(c.state.dtype))
        self.last_conv[layer_idx].copy_(left.transpose(1, 2).to(c.conv.dtype))
        c.state.copy_(torch.where(keep, self.last_state[layer_idx], c.state))
        c.conv.copy_(torch.where(commit[:, None, None], self.last_conv[layer_idx], c.conv))
        return _output(module, torch.cat(core, 1), x)

    # -- the step ---------------------------------------------------------------------------------------------
    def __call__(self, ids, counts, wlen, commit, width_clean: int) -> torch.Tensor:
        """ids [C, Wc+Ww] long; counts, wlen [C] long; commit [C] bool -> logits [C, Wc+Ww, V]."""
        model, cache, wc = self.model, self.cache, width_clean
        ww = ids.shape[1] - wc
        lengths = cache.lengths
        cols = torch.arange(ids.shape[1], device=ids.device)[None]
        pos = torch.where(cols >= wc, (lengths + counts)[:, None] + cols - wc, lengths[:, None] + cols)
        hidden = model.hf.model.embed_tokens(ids)
        rope = model._rope(hidden, pos)
        cap = self._attended_slots(wc)
        mask = self._attention_mask(counts, wlen, wc, ww, cap) if ATTENTION in model.layer_kinds else None
        for i, (kind, layer) in enumerate(zip(model.layer_kinds, model.layers)):
            x = layer.input_layernorm(hidden)
            if kind == ATTENTION:
                x = self._attention(i, layer.self_attn, x, rope, mask, wc, cap)
            else:
                x = self._gdn(i, layer.linear_attn, x, counts, commit, wc)
            hidden = hidden + x
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.last_counts.copy_(counts)
        self.last_commit.copy_(commit)
        lengths.add_(torch.where(commit, counts, 0))
        return model.hf.lm_head(model.hf.model.norm(hidden))
