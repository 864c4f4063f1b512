"""Triton forward of the chunk-parallel noisy-window map (``chunk_windows.chunk_windows_map``), one program per
(clean chunk, V block, value head): the same maths, with the gathers, exponentials, masks and the products fused
on chip, nothing per slot or per window written to HBM but the outputs.

Per program (chunk c with checkpoint h_c; its NC noisy slots; log2 chunk-local cumsum G of the clean decay)::

    Gr_i = G_{r_i-1} (0 if r_i = 0);   coef_ij = [j < r_i] 2^{Gr_i - G_j}
    XS   = 2^{Gr} ∘ (X h_c) + ((X K_c^T) ∘ coef) V'_c                  for X in {Q, K_n}
    Γ_i  = sum_{j <= i, same window} g_j;   dec_ij = [same window, j <= i] e^{Γ_i - Γ_j}
    d    = (I + L)^{-1} β ∘ (V_n - e^Γ ∘ K_nS),  L_ij = [same window, j < i] β_i dec_ij (k_i . k_j)
    o    = scale * (e^Γ ∘ QS + ((Q K_n^T) ∘ dec) d)

``(I + L)^{-1}`` by ``MAXW - 1`` substitution steps (exact: L is nilpotent within a window). The backward kernel
recomputes these pieces on chip and runs the torch map's autograd written out; sums over V go through [NV, ...]
partial buffers (no atomics). The default window path of the fused op (``_window="chunk-triton"``); for V <= 128
the backward runs as two smaller kernels instead (``triton_chunk_windows_bwd``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gdn import _alloc, _pow2

# Launch configurations (value-block width, warps). The backward recomputes the forward on chip, so it holds many
# [slots x 128] tiles at once: BV=32 with 8 warps keeps its shared memory under the H100's 227 KiB (checked by
# compiling for sm_90 offline; BV=64 / 4 warps needs 304 KiB with f32 tiles). Benchmarks may overwrite these.
FWD_CONFIG = dict(BV=64, num_warps=8)
BWD_CONFIG = dict(BV=128, num_warps=8)
# V <= 128: the backward runs as two kernels (triton_chunk_windows_bwd.py: fewer live tiles, no spills); False
# forces the one-kernel backward below (kept for V > 128 and as its twin in the tests).
BWD_SPLIT = True


def dot_precision(dtype) -> str:
    """Products of f32 inputs run as 3-pass TF32 (about fp32 accuracy on tensor cores); half inputs are exact
    operands already, and the f32 x f32 substitution products next to them stay single-pass TF32."""
    import torch

    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def _dot(PREC: tl.constexpr, a, b):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _program_layout(slot_tok, slot_win, slot_r, chunk_tok0, chunk_len, i_c, i_v, Tn, NC,
                    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr):
    """A program's slots (token, validity, window, boundary r), its chunk's token range and its K/V index masks."""
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
    return o_s, st, valid, sw, sr, tok0, o_t, m_t, o_k, m_k, o_v, m_v


@triton.jit
def _chunk_windows_fwd_kernel(
    qn, kn, vn, gn, bn, on,  # noisy stream [Tn, H|HV, K|V], gates [Tn, HV]
    k, vnew, gc, h,  # clean stream: keys [T,H,K], new values [T,HV,V], log2 chunk cumsum [T,HV], h [NT,HV,K,V]
    slot_tok, slot_win, slot_r, chunk_tok0, chunk_len,
    scale, Tn, NC,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAXW: tl.constexpr,
    PREC: tl.constexpr,
):
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    o_s, st, valid, sw, sr, tok0, o_t, m_t, o_k, m_k, o_v, m_v = _program_layout(
        slot_tok, slot_win, slot_r, chunk_tok0, chunk_len, i_c, i_v, Tn, NC, K, V, BT, BC, BK, BV)

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
    qkc_c = (_dot(PREC, b_q.to(dt), tl.trans(b_kc)) * coef).to(dt)
    kkc_c = (_dot(PREC, b_kn.to(dt), tl.trans(b_kc)) * coef).to(dt)
    qs = e_r[:, None] * _dot(PREC, b_q.to(dt), b_hd) + _dot(PREC, qkc_c, b_vc)
    ks = e_r[:, None] * _dot(PREC, b_kn.to(dt), b_hd) + _dot(PREC, kkc_c, b_vc)

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
        b_l = tl.where(strict, b_bn[:, None] * dec * _dot(PREC, b_kn, tl.trans(b_kn)).to(tl.float32), 0.0)
        for _ in tl.static_range(MAXW - 1):
            d = rhs - _dot(PREC, b_l, d)
    o = eg[:, None] * qs + _dot(PREC, _dot(PREC, b_q, tl.trans(b_kn)).to(tl.float32) * dec, d)
    tl.store(on + (st[:, None] * HV + i_hv) * V + o_v[None, :], (o * scale).to(on.dtype.element_ty),
             mask=valid[:, None] & m_v[None, :])


def chunk_windows_forward_triton(qn, kn, vn, gn, bn, k, v_new, gc, h, meta, scale, slots, *, BV=None, num_warps=None):
    """Same contract as ``chunk_windows.window_forward_chunked``: on [Tn,HV,V] (dtype of vn). ``slots``: the
    ``WindowSlots`` of this layout."""
    T, H, K = k.shape
    HV, V = v_new.shape[1], v_new.shape[2]
    Tn = qn.shape[0]
    on = _alloc(Tn, HV, V, dtype=vn.dtype, device=vn.device)
    if Tn == 0:
        return on
    NC = slots.n_slots
    BV = min(BV or FWD_CONFIG["BV"], _pow2(V))
    num_warps = num_warps or FWD_CONFIG["num_warps"]
    grid = (meta.n_chunks, triton.cdiv(V, BV), HV)
    _chunk_windows_fwd_kernel[grid](
        qn, kn, vn, gn, bn, on, k, v_new, gc, h,
        slots.slot_tok.contiguous(), slots.slot_win.contiguous(), slots.slot_r.contiguous(),
        meta.chunk_tok0, meta.chunk_len, scale, Tn, NC,
        H=H, HV=HV, K=K, V=V, BT=64, BC=_pow2(NC), BK=_pow2(K), BV=BV, MAXW=max(int(slots.max_window), 1),
        PREC=dot_precision(k.dtype),
        num_warps=num_warps,
    )
    return on


@triton.jit
def _chunk_windows_bwd_kernel(
    qn, kn, vn, gn, bn, don,  # noisy stream and the gradient of its outputs [Tn, HV, V]
    k, vnew, gc, h,  # clean stream (as in the forward)
    dqn_p, dkn_p, dgn_p, dbn_p,  # [NV, Tn, HV, (K)] f32 partial sums over V blocks
    dvn,  # [Tn, HV, V] (dtype of vn)
    dk_p, dg_p,  # [NV, T, HV, (K)] f32 partials: clean keys, natural-unit chunk cumsum
    dv_clean,  # [T, HV, V]: gradient w.r.t. the clean new values, increased in place (each element by one program)
    x_inj,  # [NT, HV, K, V] f32: gradient w.r.t. the state entering each chunk
    slot_tok, slot_win, slot_r, chunk_tok0, chunk_len,
    scale, T, Tn, NC,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAXW: tl.constexpr,
    PREC: tl.constexpr,
):
    """Backward of the map for one (chunk, V block, value head): recompute the forward pieces on chip, then the
    reverse pass (the torch map's autograd, written out). Quantities that sum over V are written per V block."""
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    o_s, st, valid, sw, sr, tok0, o_t, m_t, o_k, m_k, o_v, m_v = _program_layout(
        slot_tok, slot_win, slot_r, chunk_tok0, chunk_len, i_c, i_v, Tn, NC, K, V, BT, BC, BK, BV)
    m_sk = valid[:, None] & m_k[None, :]
    m_sv = valid[:, None] & m_v[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]

    # tiles stay in the input dtype for the tensor-core products (bf16 on GPU); accumulation and the elementwise
    # algebra are f32. ``dt`` casts f32 factors for those products.
    b_q = tl.load(qn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)
    b_kn = tl.load(kn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)
    b_vn = tl.load(vn + (st[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_sv, other=0.0).to(tl.float32)
    b_do = tl.load(don + (st[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_sv, other=0.0).to(tl.float32) * scale
    b_gn = tl.load(gn + st * HV + i_hv, mask=valid, other=0.0).to(tl.float32)
    b_bn = tl.load(bn + st * HV + i_hv, mask=valid, other=0.0).to(tl.float32)
    b_kc = tl.load(k + ((tok0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
    b_vc = tl.load(vnew + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0.0)
    b_gc = tl.load(gc + (tok0 + o_t) * HV + i_hv, mask=m_t, other=0.0).to(tl.float32) * 0.6931471805599453
    dt = b_kc.dtype
    b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0).to(dt)

    # ---- forward pieces (natural units) ----
    g_r = tl.sum(tl.where(o_t[None, :] == sr[:, None] - 1, b_gc[None, :], 0.0), axis=1)
    before = o_t[None, :] < sr[:, None]
    coef = tl.where(before, tl.exp(tl.where(before, g_r[:, None] - b_gc[None, :], 0.0)), 0.0)  # [BC, BT]
    e_r = tl.exp(g_r)
    qkc_c = _dot(PREC, b_q, tl.trans(b_kc)) * coef  # [BC, BT]
    kkc_c = _dot(PREC, b_kn, tl.trans(b_kc)) * coef
    qh = _dot(PREC, b_q, b_h)  # [BC, BV]
    kh = _dot(PREC, b_kn, b_h)
    qs = e_r[:, None] * qh + _dot(PREC, qkc_c.to(dt), b_vc)
    ks = e_r[:, None] * kh + _dot(PREC, kkc_c.to(dt), b_vc)
    same = (sw[:, None] == sw[None, :]) & (sw[:, None] >= 0)
    incl = same & (o_s[:, None] >= o_s[None, :])
    strict = same & (o_s[:, None] > o_s[None, :])
    gam = tl.sum(tl.where(incl, b_gn[None, :], 0.0), axis=1)
    dec = tl.where(incl, tl.exp(tl.where(incl, gam[:, None] - gam[None, :], 0.0)), 0.0)
    eg = tl.exp(gam)
    knkn = _dot(PREC, b_kn, tl.trans(b_kn))
    b_l = tl.where(strict, b_bn[:, None] * dec * knkn, 0.0)
    vres = b_vn - eg[:, None] * ks  # V_n - e^Γ K_nS
    rhs = b_bn[:, None] * vres
    d = rhs
    for _ in tl.static_range(MAXW - 1):
        d = rhs - _dot(PREC, b_l, d)
    qkn = _dot(PREC, b_q, tl.trans(b_kn))

    # ---- reverse ----
    d_qs = eg[:, None] * b_do
    d_eg = tl.sum(b_do * qs, axis=1)
    d_p = _dot(PREC, b_do, tl.trans(d))  # [BC, BC]
    d_d = _dot(PREC, tl.trans(qkn * dec), b_do)  # [BC, BV]
    d_rhs = d_d  # (I + L)^T x = d_d by substitution (L^T is nilpotent too)
    for _ in tl.static_range(MAXW - 1):
        d_rhs = d_d - _dot(PREC, tl.trans(b_l), d_rhs)
    d_l = tl.where(strict, -_dot(PREC, d_rhs, tl.trans(d)), 0.0)
    dvn_blk = b_bn[:, None] * d_rhs
    d_bn = tl.sum(d_rhs * vres, axis=1) + tl.sum(d_l * dec * knkn, axis=1)
    d_ks = -(b_bn * eg)[:, None] * d_rhs
    d_eg += tl.sum(-b_bn[:, None] * d_rhs * ks, axis=1)
    d_knkn = d_l * b_bn[:, None] * dec
    d_qkn = d_p * dec
    w = (d_l * b_bn[:, None] * knkn + d_p * qkn) * dec
    d_gam = tl.sum(w, axis=1) - tl.sum(w, axis=0) + eg * d_eg
    d_gn = tl.sum(tl.where(incl, d_gam[:, None], 0.0), axis=0)
    d_q = _dot(PREC, d_qkn.to(dt), b_kn)
    d_kn = _dot(PREC, (d_knkn + tl.trans(d_knkn)).to(dt), b_kn) + _dot(PREC, tl.trans(d_qkn).to(dt), b_q)

    # products with the boundary states, for X = Q (d_qs) and X = K_n (d_ks)
    aq = (e_r[:, None] * d_qs).to(dt)
    ak = (e_r[:, None] * d_ks).to(dt)
    d_h = _dot(PREC, tl.trans(b_q), aq) + _dot(PREC, tl.trans(b_kn), ak)  # [BK, BV]
    d_q += _dot(PREC, aq, tl.trans(b_h))
    d_kn += _dot(PREC, ak, tl.trans(b_h))
    d_gr = e_r * (tl.sum(d_qs * qh, axis=1) + tl.sum(d_ks * kh, axis=1))
    d_qs_t = d_qs.to(dt)
    d_ks_t = d_ks.to(dt)
    dm_q = _dot(PREC, d_qs_t, tl.trans(b_vc))  # [BC, BT]
    dm_k = _dot(PREC, d_ks_t, tl.trans(b_vc))
    d_vc = _dot(PREC, tl.trans(qkc_c).to(dt), d_qs_t) + _dot(PREC, tl.trans(kkc_c).to(dt), d_ks_t)  # [BT, BV]
    w2 = dm_q * qkc_c + dm_k * kkc_c
    dx_q = dm_q * coef
    dx_k = dm_k * coef
    d_gr += tl.sum(w2, axis=1)
    d_gc = -tl.sum(w2, axis=0) + tl.sum(tl.where(o_t[None, :] == sr[:, None] - 1, d_gr[:, None], 0.0), axis=0)
    d_q += _dot(PREC, dx_q.to(dt), b_kc)
    d_kn += _dot(PREC, dx_k.to(dt), b_kc)
    d_kc = _dot(PREC, tl.trans(dx_q).to(dt), b_q) + _dot(PREC, tl.trans(dx_k).to(dt), b_kn)  # [BT, BK]

    # ---- stores ----
    i_v64 = i_v.to(tl.int64)
    tl.store(dqn_p + ((i_v64 * Tn + st[:, None]) * HV + i_hv) * K + o_k[None, :], d_q, mask=m_sk)
    tl.store(dkn_p + ((i_v64 * Tn + st[:, None]) * HV + i_hv) * K + o_k[None, :], d_kn, mask=m_sk)
    tl.store(dgn_p + (i_v64 * Tn + st) * HV + i_hv, d_gn, mask=valid)
    tl.store(dbn_p + (i_v64 * Tn + st) * HV + i_hv, d_bn, mask=valid)
    tl.store(dvn + (st[:, None] * HV + i_hv) * V + o_v[None, :], dvn_blk.to(dvn.dtype.element_ty), mask=m_sv)
    tl.store(dk_p + ((i_v64 * T + tok0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], d_kc, mask=m_tk)
    tl.store(dg_p + (i_v64 * T + tok0 + o_t) * HV + i_hv, d_gc, mask=m_t)
    p_dvc = dv_clean + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
    tl.store(p_dvc, (tl.load(p_dvc, mask=m_tv, other=0.0).to(tl.float32) + d_vc).to(p_dvc.dtype.element_ty),
             mask=m_tv)
    tl.store(x_inj + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :], d_h,
             mask=m_k[:, None] & m_v[None, :])


def chunk_windows_backward_triton(noisy, don, k, v_new, gc, h, dv_clean, meta, scale, slots, *, BV=None,
                                  num_warps=None):
    """Same contract as ``chunk_windows.window_backward_chunked``: dict(x_inj, dk, dg, dqn, dkn, dvn, dgn, dbn),
    ``dv_clean`` increased in place."""
    import torch

    qn, kn, vn, gn, bn = noisy
    assert dv_clean.is_contiguous(), "dv_clean is updated in place through raw pointers"
    T, H, K = k.shape
    HV, V = v_new.shape[1], v_new.shape[2]
    if BWD_SPLIT and BV is None and _pow2(V) <= 128:
        from .triton_chunk_windows_bwd import chunk_windows_backward_split

        return chunk_windows_backward_split(noisy, don, k, v_new, gc, h, dv_clean, meta, scale, slots)
    Tn = qn.shape[0]
    dev = k.device
    BV = min(BV or BWD_CONFIG["BV"], _pow2(V))
    num_warps = num_warps or BWD_CONFIG["num_warps"]
    NV = triton.cdiv(V, BV)
    f32 = torch.float32
    NT = meta.n_chunks
    # every clean token lies in one chunk and every noisy token in one slot: each element below is written exactly
    # once (clean tokens of chunks without any window are written zeros by their own program)
    x_inj = _alloc(NT, HV, K, V, dtype=f32, device=dev)
    dk_p, dg_p = _alloc(NV, T, HV, K, dtype=f32, device=dev), _alloc(NV, T, HV, dtype=f32, device=dev)
    dqn_p, dkn_p = _alloc(NV, Tn, HV, K, dtype=f32, device=dev), _alloc(NV, Tn, HV, K, dtype=f32, device=dev)
    dgn_p, dbn_p = _alloc(NV, Tn, HV, dtype=f32, device=dev), _alloc(NV, Tn, HV, dtype=f32, device=dev)
    dvn = _alloc(Tn, HV, V, dtype=vn.dtype, device=dev)
    NC = slots.n_slots
    grid = (NT, NV, HV)
    _chunk_windows_bwd_kernel[grid](
        qn, kn, vn, gn, bn, don.contiguous(), k, v_new, gc, h, dqn_p, dkn_p, dgn_p, dbn_p, dvn, dk_p, dg_p,
        dv_clean, x_inj, slots.slot_tok.contiguous(), slots.slot_win.contiguous(), slots.slot_r.contiguous(),
        meta.chunk_tok0, meta.chunk_len, scale, T, Tn, NC,
        H=H, HV=HV, K=K, V=V, BT=64, BC=_pow2(NC), BK=_pow2(K), BV=BV, MAXW=max(int(slots.max_window), 1),
        PREC=dot_precision(k.dtype),
        num_warps=num_warps,
    )
    red = (lambda x: x[0]) if NV == 1 else (lambda x: x.sum(0))  # noqa: E731  (one V block: nothing to sum)
    return dict(x_inj=x_inj, dk=red(dk_p), dg=red(dg_p), dqn=red(dqn_p), dkn=red(dkn_p), dvn=dvn, dgn=red(dgn_p),
                dbn=red(dbn_p))
