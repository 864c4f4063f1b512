"""Gated DeltaNet mixer over a StreamLayout (Qwen3.5 ``linear_attn`` layers).

How a noisy window is processed inside a GDN layer (the paper leaves it open; this is flarectl's choice, and the
decoders use exactly the same rule): the window starts from the clean stream's recurrent state after the clean
tokens before its first position, its short causal convolution sees the clean inputs just before it as left
context, and it runs *causally* over its own tokens (a recurrence has no bidirectional form; bidirectionality
inside a block comes from the softmax layers). Nothing a window computes is written into any other state.

Two paths share the HF module's weights:

* ``packed`` — any layout, no cache or a cache whose rows' clean tokens are all committed by this forward
  (training, prefill): rows' documents are packed into one varlen clean stream plus a list of windows and handed
  to ``flare_kernels.two_stream`` (fused Triton on CUDA, pure-torch reference on CPU).
* ``pending`` — decoding steps whose clean tokens are committed later, to any accepted length: a batched
  recurrence that keeps the state after every prefix of the clean tokens (rollback without recomputation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flare_kernels.two_stream import two_stream_causal_conv1d, two_stream_gated_delta_rule
from flarectl.models.cache import GDNCache, HybridCache
from flarectl.models.layout import StreamLayout


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _split_heads(module: nn.Module, mixed: torch.Tensor):
    """mixed [..., key_dim*2 + value_dim] -> q,k [..., H, K], v [..., HV, V]."""
    q, k, v = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    lead = mixed.shape[:-1]
    h, hv = module.num_k_heads, module.num_v_heads
    return (q.reshape(*lead, h, module.head_k_dim), k.reshape(*lead, h, module.head_k_dim),
            v.reshape(*lead, hv, module.head_v_dim))


def _gates(module: nn.Module, hidden: torch.Tensor):
    """hidden [..., hidden] -> g (log decay, fp32) [..., HV], beta [..., HV]."""
    beta = module.in_proj_b(hidden).sigmoid()
    g = -module.A_log.float().exp() * F.softplus(module.in_proj_a(hidden).float() + module.dt_bias)
    return g, beta


def _output(module: nn.Module, core: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """core [B, L, HV, V] -> gated RMSNorm with z -> out_proj -> [B, L, hidden]."""
    bsz, length = hidden.shape[:2]
    z = module.in_proj_z(hidden).reshape(bsz, length, -1, module.head_v_dim)
    out = module.norm(core.reshape(-1, module.head_v_dim).to(hidden.dtype), z.reshape(-1, module.head_v_dim))
    return module.out_proj(out.reshape(bsz, length, -1))


# ------------------------------------------------------------------------------------------------------------
# packed path


# The plan depends only on the layout, which every GDN layer of one forward (and its gradient-checkpoint
# recomputation) shares: build it once, not once per layer (each build syncs with the device several times).
_LAST_PLAN: list = []  # [(layout, plan)] for the most recent cache-free layout


def _pack(layout: StreamLayout, cache_lengths: torch.Tensor | None):
    """Index plan for the packed two-stream op (memoised for the last layout seen without a cache).

    Returns (clean_idx [Tc,2], cu_seqlens [N+1], doc_rows [N], noisy_idx [Tn,2], window_offsets [W+1],
    window_doc [W], window_prefix [W]) — ``*_idx`` are (row, col) pairs into the [B, L] layout.
    """
    if cache_lengths is None and _LAST_PLAN and _LAST_PLAN[0][0] is layout:
        return _LAST_PLAN[0][1]
    plan = _build_plan(layout, cache_lengths)
    if cache_lengths is None:
        _LAST_PLAN[:] = [(layout, plan)]
    return plan


def _build_plan(layout: StreamLayout, cache_lengths: torch.Tensor | None):
    device = layout.doc_ids.device
    clean = layout.is_clean
    rows, cols = clean.nonzero(as_tuple=True)
    docs = layout.doc_ids[rows, cols]
    key = rows * (int(layout.doc_ids.max()) + 2) + docs
    new_doc = torch.ones_like(key, dtype=torch.bool)
    new_doc[1:] = key[1:] != key[:-1]
    starts = new_doc.nonzero(as_tuple=True)[0]
    cu = torch.cat([starts, torch.tensor([key.numel()], device=device)])
    doc_keys = key[starts]
    doc_rows = rows[starts]
    doc_first_pos = layout.position_ids[rows[starts], cols[starts]]

    nrows, ncols = layout.is_noisy.nonzero(as_tuple=True)
    wid = layout.window_ids[nrows, ncols]
    wkey = nrows * (int(layout.window_ids.max()) + 2) + wid
    new_win = torch.ones_like(wkey, dtype=torch.bool)
    new_win[1:] = wkey[1:] != wkey[:-1]
    wstarts = new_win.nonzero(as_tuple=True)[0]
    offsets = torch.cat([wstarts, torch.tensor([wkey.numel()], device=device)])
    w_rows, w_cols = nrows[wstarts], ncols[wstarts]
    w_doc_key = w_rows * (int(layout.doc_ids.max()) + 2) + layout.doc_ids[w_rows, w_cols]
    window_doc = torch.searchsorted(doc_keys, w_doc_key)
    if window_doc.numel() and (window_doc >= doc_keys.numel()).any() or (
        window_doc.numel() and (doc_keys[window_doc.clamp(max=doc_keys.numel() - 1)] != w_doc_key).any()
    ):
        raise ValueError("every noisy window needs clean tokens of its document in the same forward (packed path)")
    first_pos = doc_first_pos[window_doc]
    if cache_lengths is not None:
        first_pos = cache_lengths[w_rows]
    window_prefix = layout.window_start[w_rows, w_cols] - first_pos
    return (rows, cols), cu, doc_rows, (nrows, ncols), offsets, window_doc, window_prefix


def _packed(module, hidden, layout, layer_idx, cache: HybridCache | None, backend: str):
    bsz, length, _ = hidden.shape
    (cr, cc), cu, doc_rows, (nr, nc), offsets, wdoc, wprefix = _pack(layout, cache.lengths if cache else None)
    mixed = module.in_proj_qkv(hidden)  # [B, L, Dc]
    g, beta = _gates(module, hidden)
    conv_init = state_init = None
    if cache is not None:
        c = cache.gdn[layer_idx]
        conv_init, state_init = c.conv[doc_rows], c.state[doc_rows]
    weight = module.conv1d.weight.squeeze(1)
    y, yn, conv_final = two_stream_causal_conv1d(
        mixed[cr, cc][None], mixed[nr, nc][None], weight, wdoc, wprefix, offsets,
        bias=module.conv1d.bias, cu_seqlens=cu, initial_state=conv_init, output_final_state=cache is not None,
        activation="silu", backend=backend)
    q, k, v = _split_heads(module, y)
    qn, kn, vn = _split_heads(module, yn)
    o, on, final = two_stream_gated_delta_rule(
        q, k, v, g[cr, cc][None], beta[cr, cc][None], qn, kn, vn, g[nr, nc][None], beta[nr, nc][None],
        wdoc, wprefix, offsets, cu_seqlens=cu, initial_state=state_init, output_final_state=cache is not None,
        use_qk_l2norm_in_kernel=True, backend=backend)
    core = hidden.new_zeros(bsz, length, module.num_v_heads, module.head_v_dim, dtype=o.dtype)
    core = core.index_put((cr, cc), o[0]).index_put((nr, nc), on[0])
    if cache is not None:
        c = cache.gdn[layer_idx]
        c.state[doc_rows] = final.to(c.state.dtype)
        c.conv[doc_rows] = conv_final.to(c.conv.dtype)
    return _output(module, core, hidden)


# ------------------------------------------------------------------------------------------------------------
# pending path (decoding with rollback)


def _step(state, q, k, v, g, beta):
    """One gated-delta step for a batch. state [B,HV,K,V]; q,k [B,HV,K]; v [B,HV,V]; g,beta [B,HV]."""
    state = state * g.exp()[..., None, None]
    kv_mem = torch.einsum("bhk,bhkv->bhv", k, state)
    state = state + k[..., None] * (beta[..., None] * (v - kv_mem))[..., None, :]
    return state, torch.einsum("bhk,bhkv->bhv", q, state)


def _prepare_qk(module, q, k, dt):
    r = module.num_v_heads // module.num_k_heads
    q, k = _l2norm(q.to(dt)), _l2norm(k.to(dt))
    q = q * module.head_k_dim**-0.5
    return q.repeat_interleave(r, dim=-2), k.repeat_interleave(r, dim=-2)


def _conv(inputs: torch.Tensor, weight: torch.Tensor, bias, n_out: int, dt: torch.dtype) -> torch.Tensor:
    """inputs [B, W-1+n, D] (left context first) -> silu(conv) [B, n, D] in ``dt`` (fp32 or fp64)."""
    if n_out == 0:
        return inputs.new_zeros(inputs.shape[0], 0, inputs.shape[-1], dtype=dt)
    out = F.conv1d(inputs.to(dt).transpose(1, 2), weight.to(dt)[:, None, :], None if bias is None else bias.to(dt),
                   groups=inputs.shape[-1])
    return F.silu(out.transpose(1, 2)[:, -n_out:]) if n_out else out.transpose(1, 2)[:, :0]


def _pending(module, hidden, layout, layer_idx, cache: HybridCache):
    """Layout per row: a clean section (first ``count[row]`` valid, the rest padding) then at most one window."""
    bsz, length, _ = hidden.shape
    c: GDNCache = cache.gdn[layer_idx]
    width = c.conv.shape[-1] + 1
    noisy = layout.is_noisy
    n_clean_section = int((~noisy).sum(1).max()) if length else 0
    if bool(noisy[:, :n_clean_section].any()):
        raise ValueError("pending GDN path expects clean tokens before the window in every row")
    count = layout.is_clean[:, :n_clean_section].sum(1)
    mixed = module.in_proj_qkv(hidden)
    g, beta = _gates(module, hidden)
    weight = module.conv1d.weight.squeeze(1)
    dt = torch.promote_types(hidden.dtype, torch.float32)

    ctx = torch.cat([c.conv.transpose(1, 2).to(mixed.dtype), mixed[:, :n_clean_section]], dim=1)
    y = _conv(ctx, weight, module.conv1d.bias, n_clean_section, dt)
    q, k, v = _split_heads(module, y)
    q, k = _prepare_qk(module, q, k, dt)
    state = c.state.to(dt)
    states, outs = [state], []
    for t in range(n_clean_section):
        new, o_t = _step(state, q[:, t], k[:, t], v[:, t].to(dt), g[:, t].to(dt), beta[:, t].to(dt))
        valid = (t < count)[:, None, None, None]
        state = torch.where(valid, new, state)
        states.append(state)
        outs.append(o_t)
    pending_states = torch.stack(states, dim=1)
    core = [torch.stack(outs, 1)] if outs else []

    n_window = length - n_clean_section
    if n_window:
        rows = torch.arange(bsz, device=hidden.device)
        prefix = (layout.window_start[:, n_clean_section] - cache.lengths).clamp(min=0)
        prefix = torch.minimum(prefix, count)
        idx = prefix[:, None] + torch.arange(width - 1, device=hidden.device)[None]
        left = ctx.gather(1, idx[:, :, None].expand(-1, -1, ctx.shape[-1]))
        yn = _conv(torch.cat([left, mixed[:, n_clean_section:]], 1), weight, module.conv1d.bias, n_window, dt)
        qn, kn, vn = _split_heads(module, yn)
        qn, kn = _prepare_qk(module, qn, kn, dt)
        wstate = pending_states[rows, prefix]
        off = n_clean_section
        for t in range(n_window):
            wstate, o_t = _step(wstate, qn[:, t], kn[:, t], vn[:, t].to(dt), g[:, off + t].to(dt),
                                beta[:, off + t].to(dt))
            core.append(o_t[:, None])
    core = torch.cat(core, dim=1)

    c.pending_states = pending_states
    c.pending_conv = ctx
    return _output(module, core, hidden)


def gdn_mixer(
    module: nn.Module,
    hidden: torch.Tensor,
    layout: StreamLayout,
    layer_idx: int,
    *,
    cache: HybridCache | None = None,
    commit_all: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """One Gated DeltaNet sub-layer: hidden [B, L, hidden] -> [B, L, hidden].

    With a cache and ``commit_all=False`` the pending path keeps per-prefix states for ``cache.commit``.
    """
    if cache is not None and not commit_all:
        return _pending(module, hidden, layout, layer_idx, cache)
    return _packed(module, hidden, layout, layer_idx, cache, backend)
