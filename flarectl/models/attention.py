"""Softmax-attention mixer over a StreamLayout, for Llama/Qwen2/Qwen3 attention and Qwen3.5 gated attention.

It reuses the HF module's projections and norms and replaces only the attention call, so that any visibility
(two-stream training masks, decoding windows, cached prefixes) can be expressed. Backends: ``sdpa`` with an
explicit boolean mask (any device) and ``flex`` (flex_attention with a block mask built from the layout; CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flarectl.models.cache import AttentionCache, HybridCache
from flarectl.models.layout import StreamLayout, add_self_for_padding, cache_visibility, visibility


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; cos/sin [B, L, R] with R <= D (partial rotary: the first R dims rotate)."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def _project(module: nn.Module, hidden: torch.Tensor, gated: bool):
    """Return q [B,H,L,D], k, v [B,Hkv,L,D] and the output gate [B,L,H*D] (or None)."""
    bsz, length, _ = hidden.shape
    head_dim = module.head_dim
    q = module.q_proj(hidden)
    gate = None
    if gated:
        q, gate = torch.chunk(q.view(bsz, length, -1, head_dim * 2), 2, dim=-1)
        gate = gate.reshape(bsz, length, -1)
    q = q.reshape(bsz, length, -1, head_dim)
    k = module.k_proj(hidden).view(bsz, length, -1, head_dim)
    v = module.v_proj(hidden).view(bsz, length, -1, head_dim)
    if getattr(module, "q_norm", None) is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate


def _write_cache(cache: AttentionCache, k: torch.Tensor, v: torch.Tensor, layout: StreamLayout) -> None:
    """Write the clean tokens' k/v [B,Hkv,L,D] into their position slots."""
    clean = layout.is_clean
    rows, cols = clean.nonzero(as_tuple=True)
    slots = layout.position_ids[rows, cols]
    cache.key[rows, :, slots] = k[rows, :, cols]
    cache.value[rows, :, slots] = v[rows, :, cols]


def _sdpa(q, k, v, mask, scale):
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


def _flex(q, k, v, layout: StreamLayout, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pos, doc, win = layout.position_ids, layout.doc_ids, layout.window_ids
    limit = layout.clean_limit

    def mask_mod(b, h, qi, ki):
        same_doc = (doc[b, qi] == doc[b, ki]) & (doc[b, ki] >= 0)
        clean_ok = same_doc & (win[b, ki] < 0) & (pos[b, ki] < limit[b, qi])
        noisy_ok = (win[b, qi] >= 0) & (win[b, qi] == win[b, ki]) & (doc[b, qi] == doc[b, ki])
        return clean_ok | noisy_ok | ((doc[b, qi] < 0) & (qi == ki))

    bsz, length = pos.shape
    block_mask = create_block_mask(mask_mod, bsz, None, length, length, device=q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def attention_mixer(
    module: nn.Module,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    layout: StreamLayout,
    layer_idx: int,
    *,
    gated: bool,
    cache: HybridCache | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """One attention sub-layer: hidden [B, L, hidden] -> [B, L, hidden].

    ``mask`` [B, L, L] is the precomputed ``visibility(layout, layout)`` (shared by all layers of a forward).
    With a cache, the clean tokens' k/v are written at their positions and cached keys are attended under
    ``cache_visibility``.
    """
    bsz, length, _ = hidden.shape
    q, k, v, gate = _project(module, hidden, gated)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scale = module.scaling

    if cache is None and backend == "flex":
        out = _flex(q, k, v, layout, scale)
    else:
        if mask is None:
            mask = add_self_for_padding(visibility(layout, layout), layout)
        if cache is not None:
            kv = cache.attention[layer_idx]
            span = int(cache.lengths.max())
            if span > 0:
                cached_mask = cache_visibility(layout, cache.lengths, span)
                past_k, past_v = kv.key[:, :, :span].to(k.dtype), kv.value[:, :, :span].to(v.dtype)
                _write_cache(kv, k, v, layout)
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                mask = torch.cat([cached_mask, mask], dim=2)
            else:
                _write_cache(kv, k, v, layout)
        out = _sdpa(q, k, v, mask, scale)

    out = out.transpose(1, 2).reshape(bsz, length, -1)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return module.o_proj(out)
