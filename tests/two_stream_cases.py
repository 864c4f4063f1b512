"""Shared two-stream GDN test cases: random packed problems with windows in arbitrary order, the clean chunk
quantities from the pure-torch chunk forward, and a per-window torch map of the noisy outputs (the reference the
window kernels' backward contracts are checked against)."""

from __future__ import annotations

import numpy as np
import torch

from flare_kernels.two_stream._meta import build_meta
from flare_kernels.two_stream._torch_chunk import chunk_fwd_torch
from flare_kernels.two_stream.naive import _recurrent


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def problem(seed, lens=(70, 5, 130), H=1, HV=2, K=32, V=16, max_win=4, with_h0=True):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *np.cumsum(lens).tolist()])
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = r(1, T, H, K)
    k = torch.nn.functional.normalize(r(1, T, H, K), dim=-1)
    v = r(1, T, HV, V)
    g = torch.nn.functional.logsigmoid(r(1, T, HV)) * 0.3
    beta = torch.rand(1, T, HV, generator=gen)
    docs, pres, wl = [], [], []
    for d, n in enumerate(lens):
        cand = sorted({0, n, min(64, n), min(63, n), min(65, n), *torch.randint(0, n + 1, (2,), generator=gen).tolist()})
        for p in cand:
            docs.append(d)
            pres.append(p)
            wl.append(int(torch.randint(1, max_win + 1, (1,), generator=gen)))
    perm = torch.randperm(len(docs), generator=gen)  # windows in arbitrary order
    docs = torch.tensor(docs)[perm]
    pres = torch.tensor(pres)[perm]
    wl = torch.tensor(wl)[perm]
    off = torch.nn.functional.pad(wl.cumsum(0), (1, 0))
    Tn = int(off[-1])
    qn = r(1, Tn, H, K)
    kn = torch.nn.functional.normalize(r(1, Tn, H, K), dim=-1)
    vn = r(1, Tn, HV, V)
    gn = torch.nn.functional.logsigmoid(r(1, Tn, HV)) * 0.3
    bn = torch.rand(1, Tn, HV, generator=gen)
    h0 = r(len(lens), HV, K, V) * 0.3 if with_h0 else None
    return dict(q=q, k=k, v=v, g=g, beta=beta, qn=qn, kn=kn, vn=vn, gn=gn, betan=bn, window_doc=docs,
                window_prefix=pres, window_offsets=off, cu_seqlens=cu, initial_state=h0)


def clean_chunks(P, scale):
    T = P["q"].shape[1]
    meta = build_meta(T, P["cu_seqlens"], P["window_doc"], P["window_prefix"], P["window_offsets"], "cpu")
    ch = chunk_fwd_torch(P["q"][0], P["k"][0], P["v"][0], P["g"][0], P["beta"][0], scale, P["initial_state"],
                         meta)
    return meta, ch


def torch_window_map(P, ch, meta, scale, leaves):
    """Noisy outputs and boundary states as a function of (h, k, v_new, G natural, noisy inputs)."""
    h, k, vnew, G, qn, kn, vn, gn, bn = leaves
    HV = vn.shape[1]
    r_ = HV // k.shape[1]
    ke = k.repeat_interleave(r_, 1)
    ons, states = [], []
    off = P["window_offsets"].tolist()
    for w in range(len(off) - 1):
        c = int(meta.win_chunk[w])
        t0 = int(meta.win_tok0[w])
        r = int(meta.win_r[w])
        Gc = G[t0:t0 + r]  # [r, HV]
        gr = Gc[-1] if r > 0 else torch.zeros(HV, dtype=G.dtype)
        S = torch.exp(gr)[:, None, None] * h[c]
        if r > 0:
            S = S + torch.einsum("jhk,jhv->hkv", ke[t0:t0 + r] * torch.exp(gr[None] - Gc)[..., None],
                                 vnew[t0:t0 + r])
        states.append(S)
        a, b = off[w], off[w + 1]
        qe = qn[a:b].repeat_interleave(r_, 1) * scale
        kne = kn[a:b].repeat_interleave(r_, 1)
        o, _ = _recurrent(qe, kne, vn[a:b], gn[a:b], bn[a:b], S)
        ons.append(o)
    return torch.cat(ons), torch.stack(states)
