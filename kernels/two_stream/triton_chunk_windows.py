"""Triton forward of the chunk-parallel noisy-window map (``chunk_windows.chunk_windows_map``), one program per
(clean chunk, V block, value head): the same maths, with the gathers, exponentials, masks and the products fused
on chip, nothing per slot or per window written to HBM but the outputs.

Per program (chunk c with checkpoint h_c; its NC noisy slots; log2 chunk-local cumsum G of the clean decay)::

    Gr_i = G_{r_i-1} (0 if r_i = 0);   coef_ij = [j < r_i] 2^{Gr_i - G_j}
    XS   = 2^{Gr} ∘ (X h_c) + ((X K_c^T) ∘ coef) V'_c                  for X in {Q, K_n}
    Γ_i  = sum_{j <= i, same window} g_j;   dec_ij = [same window, j <= i] e^{Γ_i - Γ_j}
    d    = (I + L)^{-1} β ∘ (V_n - e^Γ ∘ K_nS),  L_ij = [same window, j < i] β_i dec_ij (k_i . k_j)
    o    = scale * (e^Γ ∘ QS + ((Q K_n^T) ∘ dec) d)

``(I + L)^{-1}`` by ``MAXW - 1`` substitution steps (exact: L is nilpotent within a window). The backward stays the
torch map's (``chunk_windows.window_backward_chunked``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gdn import _alloc, _pow2


@triton.jit
def _chunk_windows_fwd_kernel(
    qn, kn, vn, gn, bn, on,  # noisy stream [Tn, H|HV, K|V], gates [Tn, HV]
    k, vnew, gc, h,  # clean stream: keys [T,H,K], new values [T,HV,V], log2 chunk cumsum [T,HV], h [NT,HV,K,V]
    slot_tok, slot_win, slot_r, chunk_tok0, chunk_len,
    scale, Tn, NC,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAXW: tl.constexpr,
):
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    o_s = tl.arange(0, BC)
    m_s = o_s < NC
    st = tl.load(slot_tok + i_c * NC + o_s, mask=m_s, other=Tn).to(tl.int64)
    valid = st < Tn
    sw = tl.load(slot_win + i_c * NC + o_s, mask=m_s, other=-1)
    sr = tl.load(slot_r + i_c * NC + o_s, mask=m_s, other=0)
    tok0 = tl.load(chunk_tok0 + i_c).to(tl.int64)
    clen = tl.load(chunk_len + i_c)
    o_t = tl.arange(0, BT)
    m_t = o_t < clen
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    b_q = tl.load(qn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=valid[:, None] & m_k[None, :], other=0.0)
    b_kn = tl.load(kn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=valid[:, None] & m_k[None, :], other=0.0)
    b_vn = tl.load(vn + (st[:, None] * HV + i_hv) * V + o_v[None, :], mask=valid[:, None] & m_v[None, :],
                   other=0.0).to(tl.float32)
    b_gn = tl.load(gn + st * HV + i_hv, mask=valid, other=0.0).to(tl.float32)
    b_bn = tl.load(bn + st * HV + i_hv, mask=valid, other=0.0).to(tl.float32)
    b_kc = tl.load(k + ((tok0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                   other=0.0)
    b_vc = tl.load(vnew + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                   other=0.0)
    b_gc = tl.load(gc + (tok0 + o_t) * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    dt = b_kc.dtype

    # products with the boundary states S_i (never formed)
    g_r = tl.sum(tl.where(o_t[None, :] == sr[:, None] - 1, b_gc[None, :], 0.0), axis=1)  # [BC]
    before = o_t[None, :] < sr[:, None]
    coef = tl.where(before, tl.exp2(tl.where(before, g_r[:, None] - b_gc[None, :], 0.0)), 0.0)  # [BC, BT]
    e_r = tl.exp2(g_r)
    b_hd = b_h.to(dt)
    qs = e_r[:, None] * tl.dot(b_q.to(dt), b_hd) + tl.dot((tl.dot(b_q.to(dt), tl.trans(b_kc)) * coef).to(dt), b_vc)
    ks = e_r[:, None] * tl.dot(b_kn.to(dt), b_hd) + tl.dot((tl.dot(b_kn.to(dt), tl.trans(b_kc)) * coef).to(dt), b_vc)

    # each window's delta rule from its boundary state (block-diagonal WY form)
    same = (sw[:, None] == sw[None, :]) & (sw[:, None] >= 0)
    incl = same & (o_s[:, None] >= o_s[None, :])
    gam = tl.sum(tl.where(incl, b_gn[None, :], 0.0), axis=1)
    dec = tl.where(incl, tl.exp(tl.where(incl, gam[:, None] - gam[None, :], 0.0)), 0.0)
    eg = tl.exp(gam)
    rhs = b_bn[:, None] * (b_vn - eg[:, None] * ks)
    d = rhs
    if MAXW > 1:
        strict = same & (o_s[:, None] > o_s[None, :])
        b_l = tl.where(strict, b_bn[:, None] * dec * tl.dot(b_kn, tl.trans(b_kn)).to(tl.float32), 0.0)
        for _ in tl.static_range(MAXW - 1):
            d = rhs - tl.dot(b_l, d)
    o = eg[:, None] * qs + tl.dot(tl.dot(b_q, tl.trans(b_kn)).to(tl.float32) * dec, d)
    tl.store(on + (st[:, None] * HV + i_hv) * V + o_v[None, :], (o * scale).to(on.dtype.element_ty),
             mask=valid[:, None] & m_v[None, :])


def chunk_windows_forward_triton(qn, kn, vn, gn, bn, k, v_new, gc, h, meta, scale, slots, *, BV=64, num_warps=4):
    """Same contract as ``chunk_windows.window_forward_chunked``: on [Tn,HV,V] (dtype of vn). ``slots``: the
    ``WindowSlots`` of this layout."""
    T, H, K = k.shape
    HV, V = v_new.shape[1], v_new.shape[2]
    Tn = qn.shape[0]
    on = _alloc(Tn, HV, V, dtype=vn.dtype, device=vn.device)
    if Tn == 0:
        return on
    NC = slots.n_slots
    BV = min(BV, _pow2(V))
    grid = (meta.n_chunks, triton.cdiv(V, BV), HV)
    _chunk_windows_fwd_kernel[grid](
        qn, kn, vn, gn, bn, on, k, v_new, gc, h,
        slots.slot_tok.contiguous(), slots.slot_win.contiguous(), slots.slot_r.contiguous(),
        meta.chunk_tok0, meta.chunk_len, scale, Tn, NC,
        H=H, HV=HV, K=K, V=V, BT=64, BC=_pow2(NC), BK=_pow2(K), BV=BV, MAXW=max(int(slots.max_window), 1),
        num_warps=num_warps,
    )
    return on
