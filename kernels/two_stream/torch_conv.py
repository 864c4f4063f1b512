"""Vectorised pure-torch two-stream causal conv1d (any device, autograd): one gather of every tap's input."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_two_stream_causal_conv1d(x, xn, weight, window_doc, window_prefix, window_offsets, bias=None,
                                   cu_seqlens=None, initial_state=None, output_final_state=False,
                                   activation="silu"):
    """Same signature and semantics as ``naive_two_stream_causal_conv1d``; no Python loop over documents."""
    T, Tn, D = x.shape[1], xn.shape[1], x.shape[2]
    Wd = weight.shape[1]
    dev = x.device
    cu = (torch.tensor([0, T], device=dev) if cu_seqlens is None else cu_seqlens.to(dev)).long()
    N = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    off = window_offsets.to(dev).long()
    wl = off[1:] - off[:-1]
    nW = wl.numel()
    wd, wp = window_doc.to(dev).long(), window_prefix.to(dev).long()
    ft = torch.promote_types(x.dtype, torch.float32)
    init = (torch.zeros(N, D, Wd - 1, device=dev, dtype=ft) if initial_state is None else initial_state.to(ft))
    src = torch.cat([x.new_zeros(1, D, dtype=ft), init.permute(0, 2, 1).reshape(N * (Wd - 1), D),
                     x[0].to(ft), xn[0].to(ft)])
    base_x, base_n = 1 + N * (Wd - 1), 1 + N * (Wd - 1) + T
    taps = torch.arange(Wd, device=dev) - (Wd - 1)  # offsets -(W-1)..0

    def clean_rows(doc, pos):  # pos relative to doc start, may be negative (initial state)
        return torch.where(pos >= 0, base_x + cu[doc] + pos, 1 + doc * (Wd - 1) + (Wd - 1 + pos).clamp_min(0))

    tok_doc = torch.repeat_interleave(torch.arange(N, device=dev), lens, output_size=T)
    qpos = torch.arange(T, device=dev) - cu[tok_doc]
    pc = qpos[:, None] + taps[None, :]
    idx_c = clean_rows(tok_doc[:, None].expand_as(pc), pc)
    tok_win = torch.repeat_interleave(torch.arange(nW, device=dev), wl, output_size=Tn)
    t = torch.arange(Tn, device=dev) - off[tok_win]
    tp = t[:, None] + taps[None, :]
    idx_n = torch.where(tp >= 0, base_n + off[tok_win][:, None] + tp,
                        clean_rows(wd[tok_win][:, None].expand_as(tp), wp[tok_win][:, None] + tp))
    w32 = weight.to(ft)

    def conv(idx):
        out = (src[idx] * w32.t()[None]).sum(1)
        if bias is not None:
            out = out + bias.to(ft)
        return F.silu(out) if activation == "silu" else out

    y, yn = conv(idx_c), conv(idx_n)
    final = None
    if output_final_state:
        j = torch.arange(Wd - 1, device=dev)
        final = src[clean_rows(torch.arange(N, device=dev)[:, None].expand(N, Wd - 1),
                               lens[:, None] - (Wd - 1) + j[None, :])].permute(0, 2, 1)
    return y[None].to(x.dtype), yn[None].to(xn.dtype), final
