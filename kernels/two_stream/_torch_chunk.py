"""Pure-torch chunked gated delta rule in fla's internal representation (chunk 64, K-first state).

Two uses:

* ``chunk_fwd_torch``: the chunk quantities fla's forward computes (log2 chunk-local cumsum ``gc``, WY ``w``/``u``,
  chunk states ``h``, new values ``v_new``, outputs, final states) — used by the CPU tests to drive our own Triton
  kernels under ``TRITON_INTERPRET=1`` without fla;
* ``chunk_bwd_dqkwg_torch``: a drop-in, slower but plainly correct replacement of fla's ``chunk_bwd_dqkwg``
  (the kernel fla refuses on Hopper with Triton 3.4..3.7.0), used when the on-device self-check fails.
"""

from __future__ import annotations

import math

import torch

from ._meta import CHUNK

RCP_LN2 = 1.0 / math.log(2.0)


def _chunk_index(meta, device):
    """[NT, 64] token index of every chunk slot (clamped) and its validity mask."""
    o = torch.arange(CHUNK, device=device)
    tok0 = meta.chunk_tok0.to(device=device, dtype=torch.long)
    ln = meta.chunk_len.to(device=device, dtype=torch.long)
    idx = tok0[:, None] + o[None, :]
    mask = o[None, :] < ln[:, None]
    return torch.where(mask, idx, tok0[:, None]), mask


def _gather(x, idx, mask):
    # x [T, ...] -> [NT, 64, ...] with zeros outside the chunk
    y = x[idx]
    return y * mask.view(*mask.shape, *([1] * (y.dim() - 2))).to(y.dtype)


def chunk_fwd_torch(q, k, v, g, beta, scale, h0, meta, dtype=torch.float64):
    """q,k [T,H,K]; v [T,HV,V]; g, beta [T,HV]; h0 [N,HV,K,V] or None. All math in ``dtype``.

    Returns dict(gc [T,HV] log2 chunk-local cumsum, w [T,HV,K], u [T,HV,V], h [NT,HV,K,V], v_new [T,HV,V],
    o [T,HV,V], ht [N,HV,K,V])."""
    T, H, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    r = HV // H
    dev = k.device
    qe = q.to(dtype).repeat_interleave(r, 1)
    ke = k.to(dtype).repeat_interleave(r, 1)
    v, g, beta = v.to(dtype), g.to(dtype), beta.to(dtype)
    idx, mask = _chunk_index(meta, dev)
    NT = idx.shape[0]
    G = torch.cumsum(_gather(g, idx, mask), 1)  # [NT, C, HV] natural
    Kc, Qc, Vc, Bc = _gather(ke, idx, mask), _gather(qe, idx, mask), _gather(v, idx, mask), _gather(beta, idx, mask)
    # WY: A = (I + strict_tril(beta_i k_i.k_j e^{G_i-G_j}))^{-1}
    kk = torch.einsum("nihk,njhk->nhij", Kc, Kc)
    Gh = G.permute(0, 2, 1)  # [NT, HV, C]
    dec = torch.exp(Gh[..., :, None] - Gh[..., None, :])
    tri = torch.tril(torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=dev), -1)
    Bh = Bc.permute(0, 2, 1)
    M = torch.where(tri, Bh[..., :, None] * kk * dec, 0.0) + torch.eye(CHUNK, dtype=dtype, device=dev)
    A = torch.linalg.inv(M)  # [NT, HV, C, C]
    w = torch.einsum("nhij,njhk->nihk", A, Kc * (Bc * torch.exp(G))[..., None])
    u = torch.einsum("nhij,njhv->nihv", A, Vc * Bc[..., None])
    # sequential over chunks, per document
    h = torch.empty(NT, HV, K, V, dtype=dtype, device=dev)
    vn = torch.empty(NT, CHUNK, HV, V, dtype=dtype, device=dev)
    o = torch.empty(NT, CHUNK, HV, V, dtype=dtype, device=dev)
    cu = meta.cu_seqlens.tolist()
    tok0 = meta.chunk_tok0.tolist()
    ln = meta.chunk_len.tolist()
    ht = torch.empty(len(cu) - 1, HV, K, V, dtype=dtype, device=dev)
    c = 0
    causal = torch.tril(torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=dev))
    for d in range(len(cu) - 1):
        S = torch.zeros(HV, K, V, dtype=dtype, device=dev) if h0 is None else h0[d].to(dtype)
        while c < NT and tok0[c] < cu[d + 1]:
            h[c] = S
            vnew = u[c] - torch.einsum("ihk,hkv->ihv", w[c], S)
            vn[c] = vnew
            Gc = G[c]  # [C, HV]
            att = torch.einsum("ihk,jhk->hij", Qc[c], Kc[c]) * torch.exp(Gc.t()[:, :, None] - Gc.t()[:, None, :])
            att = torch.where(causal, att, 0.0)
            o[c] = scale * (torch.einsum("ihk,hkv->ihv", Qc[c], S) * torch.exp(Gc)[..., None]
                            + torch.einsum("hij,jhv->ihv", att, vnew))
            gl = Gc[ln[c] - 1]  # [HV]
            S = torch.exp(gl)[:, None, None] * S + torch.einsum(
                "jhk,jhv->hkv", Kc[c] * torch.exp(gl[None] - Gc)[..., None] * mask[c, :, None, None], vnew)
            c += 1
        ht[d] = S

    def scatter(x):  # [NT, C, ...] -> [T, ...]
        out = x.new_zeros(T, *x.shape[2:])
        out[idx[mask]] = x[mask]
        return out

    return dict(gc=scatter(G) * RCP_LN2, w=scatter(w), u=scatter(u), h=h, v_new=scatter(vn), o=scatter(o), ht=ht)


def chunk_bwd_dqkwg_torch(q, k, v_new, w, gc, h, dv, do, dh, scale, meta):
    """fla's chunk_bwd_dqkwg in torch (fp32): gradients of the chunk outputs / end states w.r.t. q, k (direct
    paths), w (through v_new = u - w h) and the chunk-local cumulative gate (natural units, before fla's reverse
    cumsum). Shapes without batch dim: q,k [T,H,K]; v_new, dv, do [T,HV,V]; w [T,HV,K]; gc [T,HV] (log2);
    h, dh [NT,HV,K,V]. Returns dq, dk [T,H,K] (dtype of q), dw [T,HV,K] (dtype of w), dg [T,HV] f32."""
    T, H, K = k.shape
    HV = v_new.shape[1]
    r = HV // H
    f = torch.float32
    dev = k.device
    idx, mask = _chunk_index(meta, dev)
    Qc = _gather(q.to(f).repeat_interleave(r, 1), idx, mask)
    Kc = _gather(k.to(f).repeat_interleave(r, 1), idx, mask)
    Vc, dVc, dOc = _gather(v_new.to(f), idx, mask), _gather(dv.to(f), idx, mask), _gather(do.to(f), idx, mask)
    G = _gather(gc.to(f), idx, mask) / RCP_LN2  # natural, [NT, C, HV]
    hf, dhf = h.to(f), dh.to(f)
    ln = meta.chunk_len.to(device=dev, dtype=torch.long)
    gl = G.gather(1, (ln - 1)[:, None, None].expand(-1, 1, HV))[:, 0]  # [NT, HV]
    eG = torch.exp(G) * mask[..., None]
    causal = torch.tril(torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=dev))
    Gh = G.permute(0, 2, 1)
    dec = torch.where(causal & mask[:, None, :, None] & mask[:, None, None, :],
                      torch.exp(Gh[..., :, None] - Gh[..., None, :]), 0.0)  # [NT,HV,i,j]
    ds = torch.einsum("nihv,njhv->nhij", dOc, Vc) * dec * scale  # d(score_ij)
    dq = torch.einsum("nihv,nhkv->nihk", dOc, hf) * eG[..., None] * scale + torch.einsum("nhij,njhk->nihk", ds, Kc)
    kdec = torch.exp(gl[:, None, :] - G) * mask[..., None]
    dk_state = torch.einsum("njhv,nhkv->njhk", Vc, dhf) * kdec[..., None]
    dk = dk_state + torch.einsum("nhij,nihk->njhk", ds, Qc)
    dw = -torch.einsum("njhv,nhkv->njhk", dVc, hf)
    dg = (dq * Qc).sum(-1) - (dk * Kc).sum(-1)
    dg_last = (hf * dhf).sum((-1, -2)) * torch.exp(gl) + (dk_state * Kc).sum((1, 3))
    dg = dg + torch.nn.functional.one_hot(ln - 1, CHUNK).to(f)[:, :, None] * dg_last[:, None, :]

    def scatter(x):
        out = x.new_zeros(T, *x.shape[2:])
        out[idx[mask]] = x[mask]
        return out

    dq, dk = scatter(dq), scatter(dk)
    dq = dq.view(T, H, r, K).sum(2)
    dk = dk.view(T, H, r, K).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), scatter(dw).to(w.dtype), scatter(dg)
