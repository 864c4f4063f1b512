"""Triton kernels of the two-stream gated delta rule (the parts fla does not have).

Conventions (same as fla's chunked gated delta rule, chunk size BT = 64):

* clean tensors are packed ``[T, ...]`` (batch 1 folded): ``k [T, H, K]``, ``v_new [T, HV, V]`` (fla's "new value"
  ``u - w h``), ``gc [T, HV]`` fp32 *chunk-local* cumulative log decay in log2 units (fla's ``g * RCP_LN2``
  cumsum), ``h [NT, HV, K, V]`` the state entering every chunk (fla's ``h``);
* noisy tensors are packed ``[Tn, ...]`` with natural-log per-token decay ``gn``.

The state after the first ``r`` tokens of chunk ``c`` (0 <= r <= 64) is rebuilt on chip from the chunk's UT/WY
representation as one small matrix product::

    S_r = 2^{G_{r-1}} h_c + sum_{j<r} 2^{G_{r-1}-G_j} k_j (v_new_j)^T          (G = chunk-local cumsum, log2)

so no per-window state ever goes to HBM (unless ``STORE_STATE`` asks for it: the "simple" baseline).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Tests set this to fill every buffer our launchers allocate with NaN, so an element a kernel forgets to write
# shows up (the launchers otherwise use torch.empty).
NAN_FILL = False


def _alloc(*shape, dtype, device):
    import torch

    if NAN_FILL:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _rebuild_state(b_h, b_k, b_vn, b_g, r, o_t):
    """S_r from the checkpoint b_h [BK, BV] f32, the chunk's keys b_k [BT, BK], new values b_vn [BT, BV] and
    chunk-local log2 cumsum b_g [BT] (f32). Returns (S_r f32, coef [BT] = [j<r] 2^{G_{r-1}-G_j}, G_{r-1})."""
    g_r = tl.sum(tl.where(o_t == r - 1, b_g, 0.0), axis=0)
    coef = tl.where(o_t < r, tl.exp2(g_r - b_g), 0.0)
    b_vs = (b_vn.to(tl.float32) * coef[:, None]).to(b_k.dtype)
    b_s = b_h * tl.exp2(g_r) + tl.dot(tl.trans(b_k), b_vs)
    return b_s, coef, g_r


@triton.jit
def _window_fwd_kernel(
    qn, kn, vn, gn, bn, on,  # noisy stream
    k, vnew, gc, h,  # clean stream: keys, new values, log2 chunk cumsum, chunk states
    s_out,  # [W, HV, K, V] f32 boundary states (STORE_STATE only)
    win_chunk, win_tok0, win_r, win_off,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STORE_STATE: tl.constexpr, RUN_WINDOW: tl.constexpr,
):
    i_w, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    c = tl.load(win_chunk + i_w).to(tl.int64)
    tok0 = tl.load(win_tok0 + i_w).to(tl.int64)
    r = tl.load(win_r + i_w)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_r = o_t < r

    b_h = tl.load(h + ((c * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_g = tl.load(gc + (tok0 + o_t) * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    b_k = tl.load(k + ((tok0 + o_t[:, None]) * H + i_h) * K + o_k[None, :],
                  mask=m_r[:, None] & m_k[None, :], other=0.0)
    b_vn = tl.load(vnew + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :],
                   mask=m_r[:, None] & m_v[None, :], other=0.0)
    b_s, coef, g_r = _rebuild_state(b_h, b_k, b_vn, b_g, r, o_t)

    if STORE_STATE:
        tl.store(s_out + ((i_w.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :], b_s,
                 mask=m_k[:, None] & m_v[None, :])
    if RUN_WINDOW:
        a = tl.load(win_off + i_w).to(tl.int64)
        L = (tl.load(win_off + i_w + 1) - tl.load(win_off + i_w)).to(tl.int32)
        for t in range(0, L):
            n = a + t
            b_q = tl.load(qn + (n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
            b_kk = tl.load(kn + (n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_vv = tl.load(vn + (n * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
            b_gg = tl.load(gn + n * HV + i_hv).to(tl.float32)
            b_bb = tl.load(bn + n * HV + i_hv).to(tl.float32)
            b_s = b_s * tl.exp(b_gg)
            b_kv = tl.sum(b_s * b_kk[:, None], axis=0)
            b_d = b_bb * (b_vv - b_kv)
            b_s = b_s + b_kk[:, None] * b_d[None, :]
            b_o = tl.sum(b_s * b_q[:, None], axis=0)
            tl.store(on + (n * HV + i_hv) * V + o_v, b_o.to(on.dtype.element_ty), mask=m_v)


@triton.jit
def _step(b_s, qn, kn, vn, gn, bn, n, i_h, i_hv, o_k, o_v, m_k, m_v,
          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    b_kk = tl.load(kn + (n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_vv = tl.load(vn + (n * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_gg = tl.load(gn + n * HV + i_hv).to(tl.float32)
    b_bb = tl.load(bn + n * HV + i_hv).to(tl.float32)
    b_s = b_s * tl.exp(b_gg)
    b_kv = tl.sum(b_s * b_kk[:, None], axis=0)
    return b_s + b_kk[:, None] * (b_bb * (b_vv - b_kv))[None, :]


@triton.jit
def _window_bwd_kernel(
    qn, kn, vn, gn, bn, don,  # noisy stream inputs and output gradient
    dqn_p, dkn_p, dvn, dgn_p, dbn_p,  # noisy grads: dq/dk/dg/dbeta partial per V block [NV, Tn, HV, (K)]
    k, vnew, gc, h,  # clean stream (recomputed forward quantities)
    ds_in,  # [W, HV, K, V] f32 boundary-state gradients (FUSED=False: the simple baseline)
    dv_clean,  # [T, HV, V] gradient w.r.t. v_new, updated in place (+= injection)
    dk_p, dg_p,  # [NV, T, HV, K] / [NV, T, HV] f32: injection gradients w.r.t. clean k and log2-cumsum g
    x_inj,  # [NT, HV, K, V] f32: injection into the gradient of the state entering each chunk
    chunk_tok0, chunk_len, chunk_wstart, chunk_wcount, win_order, win_r, win_off,
    scale, T, Tn,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FUSED: tl.constexpr,
):
    """One program per (clean chunk, V block, value head): every window whose checkpoint is this chunk.

    For each window: rebuild its boundary state S_w, (FUSED) run the window backward on chip to get its
    tokens' gradients and dS_w, then push dS_w into the clean chunk: through S_w = 2^Γ h_c + K^T diag(coef) V'
    it contributes dh_c += 2^Γ dS_w (-> x_inj), dV'_j += coef_j dS_w^T k_j, dk_j += coef_j dS_w v'_j and the
    gate terms dG_{r-1} += <S_w, dS_w>, dG_j -= coef_j k_j^T dS_w v'_j.
    """
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    tok0 = tl.load(chunk_tok0 + i_c).to(tl.int64)
    clen = tl.load(chunk_len + i_c)
    ws = tl.load(chunk_wstart + i_c)
    wc = tl.load(chunk_wcount + i_c)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_c = o_t < clen

    b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_g = tl.load(gc + (tok0 + o_t) * HV + i_hv, mask=m_c, other=0.0).to(tl.float32)
    b_k = tl.load(k + ((tok0 + o_t[:, None]) * H + i_h) * K + o_k[None, :],
                  mask=m_c[:, None] & m_k[None, :], other=0.0)
    b_vn = tl.load(vnew + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :],
                   mask=m_c[:, None] & m_v[None, :], other=0.0)

    b_x = tl.zeros([BK, BV], dtype=tl.float32)
    b_dvn = tl.zeros([BT, BV], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dg = tl.zeros([BT], dtype=tl.float32)

    for i in range(0, wc):
        w = tl.load(win_order + ws + i).to(tl.int64)
        r = tl.load(win_r + w)
        b_sw, coef, g_r = _rebuild_state(b_h, b_k, b_vn, b_g, r, o_t)
        if FUSED:
            a = tl.load(win_off + w).to(tl.int64)
            L = (tl.load(win_off + w + 1) - tl.load(win_off + w)).to(tl.int32)
            b_ds = tl.zeros([BK, BV], dtype=tl.float32)
            for tt in range(0, L):
                t = L - 1 - tt
                # recompute the state entering token t of the window (O(L^2) steps, L <= 8: cheap, on chip)
                b_s = b_sw
                for s in range(0, t):
                    b_s = _step(b_s, qn, kn, vn, gn, bn, a + s, i_h, i_hv, o_k, o_v, m_k, m_v, H, HV, K, V)
                n = a + t
                b_q = tl.load(qn + (n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                b_kk = tl.load(kn + (n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                b_vv = tl.load(vn + (n * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
                b_do = tl.load(don + (n * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
                b_gg = tl.load(gn + n * HV + i_hv).to(tl.float32)
                b_bb = tl.load(bn + n * HV + i_hv).to(tl.float32)
                b_a = tl.exp(b_gg)
                b_sp = b_s * b_a
                b_u = b_vv - tl.sum(b_sp * b_kk[:, None], axis=0)
                b_d = b_bb * b_u
                b_ds += (b_q * scale)[:, None] * b_do[None, :]
                # dq = scale * S_{t+1} do with S_{t+1} = S' + k d^T
                b_dq = (tl.sum(b_sp * b_do[None, :], axis=1) + b_kk * tl.sum(b_d * b_do, axis=0)) * scale
                b_dd = tl.sum(b_ds * b_kk[:, None], axis=0)
                b_dkk = tl.sum(b_ds * b_d[None, :], axis=1)
                b_db = tl.sum(b_dd * b_u, axis=0)
                b_dv = b_bb * b_dd
                b_dkv = -b_dv
                b_dsp = b_ds + b_kk[:, None] * b_dkv[None, :]
                b_dkk += tl.sum(b_sp * b_dkv[None, :], axis=1)
                b_dgg = tl.sum(tl.sum(b_dsp * b_sp, axis=1), axis=0)
                b_ds = b_dsp * b_a
                p = (i_v * Tn + n) * HV + i_hv  # partial sums per V block, reduced by the launcher
                tl.store(dqn_p + p * K + o_k, b_dq, mask=m_k)
                tl.store(dkn_p + p * K + o_k, b_dkk, mask=m_k)
                tl.store(dgn_p + p, b_dgg)
                tl.store(dbn_p + p, b_db)
                tl.store(dvn + (n * HV + i_hv) * V + o_v, b_dv.to(dvn.dtype.element_ty), mask=m_v)
        else:
            b_ds = tl.load(ds_in + ((w * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                           mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_x += tl.exp2(g_r) * b_ds
        b_dsc = b_ds.to(b_k.dtype)
        b_p = tl.dot(b_k, b_dsc)  # [BT, BV]: k_j^T dS_w
        b_dvn += coef[:, None] * b_p
        b_dg += tl.where(o_t == r - 1, tl.sum(tl.sum(b_sw * b_ds, axis=1), axis=0), 0.0) \
            - coef * tl.sum(b_p * b_vn.to(tl.float32), axis=1)
        b_dk += coef[:, None] * tl.dot(b_vn, tl.trans(b_dsc))  # [BT, BK]: dS_w v'_j

    tl.store(x_inj + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :], b_x,
             mask=m_k[:, None] & m_v[None, :])
    p_dv = dv_clean + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
    m_dv = m_c[:, None] & m_v[None, :]
    b_dv0 = tl.load(p_dv, mask=m_dv, other=0.0).to(tl.float32)
    tl.store(p_dv, (b_dv0 + b_dvn).to(dv_clean.dtype.element_ty), mask=m_dv)
    tl.store(dk_p + (((i_v * T + tok0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]), b_dk,
             mask=m_c[:, None] & m_k[None, :])
    tl.store(dg_p + (i_v * T + tok0 + o_t) * HV + i_hv, b_dg, mask=m_c)


@triton.jit
def _bwd_dhu_inj_kernel(
    q, k, w, gc, dht, dh0, do, dh, dv, dv2, x_inj,
    cu_seqlens, chunk_offsets,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, USE_INJ: tl.constexpr,
):
    """fla's chunk_gated_delta_rule_bwd_dhu (K-first state, K <= 128) plus an additive state-gradient injection:
    after chunk c is processed (the running gradient now refers to the state entering chunk c), x_inj[c] is
    added. dh[c] stored is the gradient w.r.t. the state *leaving* chunk c (fla's convention), and dv2 the
    full gradient w.r.t. v_new."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    T = (eos - bos).to(tl.int32)
    NT = tl.cdiv(T, BT)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)

    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_k1 = tl.arange(0, 64)
    m_k1 = o_k1 < K
    o_k2 = 64 + o_k1
    m_k2 = o_k2 < K
    b_dh1 = tl.zeros([64, BV], dtype=tl.float32)
    b_dh2 = tl.zeros([64, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh1 += tl.load(dht + (i_nh * K + o_k1[:, None]) * V + o_v[None, :], mask=m_k1[:, None] & m_v[None, :],
                         other=0.0).to(tl.float32)
        if K > 64:
            b_dh2 += tl.load(dht + (i_nh * K + o_k2[:, None]) * V + o_v[None, :],
                             mask=m_k2[:, None] & m_v[None, :], other=0.0).to(tl.float32)

    for i_t in range(NT - 1, -1, -1):
        i_tg = boh + i_t
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_dh = dh + ((i_tg * HV + i_hv) * K + o_k1[:, None]) * V + o_v[None, :]
        tl.store(p_dh, b_dh1.to(dh.dtype.element_ty), mask=m_k1[:, None] & m_v[None, :])
        if K > 64:
            p_dh = dh + ((i_tg * HV + i_hv) * K + o_k2[:, None]) * V + o_v[None, :]
            tl.store(p_dh, b_dh2.to(dh.dtype.element_ty), mask=m_k2[:, None] & m_v[None, :])

        last_idx = tl.minimum((i_t + 1) * BT, T) - 1
        bg_last = tl.load(gc + (bos + last_idx) * HV + i_hv).to(tl.float32)
        b_g = tl.load(gc + (bos + o_t) * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)

        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0.0)
        b_k = tl.load(k + ((bos + o_t[:, None]) * H + i_h) * K + o_k1[None, :],
                      mask=m_t[:, None] & m_k1[None, :], other=0.0)
        b_dv = tl.dot(b_k, b_dh1.to(b_k.dtype))
        if K > 64:
            b_k = tl.load(k + ((bos + o_t[:, None]) * H + i_h) * K + o_k2[None, :],
                          mask=m_t[:, None] & m_k2[None, :], other=0.0)
            b_dv = tl.dot(b_k, b_dh2.to(b_k.dtype), b_dv)
        b_dv *= tl.where(m_t, tl.exp2(bg_last - b_g), 0.0)[:, None]
        p_dv = ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        b_dv += tl.load(dv + p_dv, mask=m_tv, other=0.0).to(tl.float32)
        tl.store(dv2 + p_dv, b_dv.to(dv2.dtype.element_ty), mask=m_tv)

        b_w = tl.load(w + ((bos + o_t[None, :]) * HV + i_hv) * K + o_k1[:, None],
                      mask=m_k1[:, None] & m_t[None, :], other=0.0)
        b_q = tl.load(q + ((bos + o_t[None, :]) * H + i_h) * K + o_k1[:, None],
                      mask=m_k1[:, None] & m_t[None, :], other=0.0)
        b_q = (b_q.to(tl.float32) * tl.exp2(b_g)[None, :]).to(b_w.dtype)
        b_dh1 = b_dh1 * tl.exp2(bg_last) + tl.dot(b_q, b_do.to(b_w.dtype)) * scale \
            - tl.dot(b_w, b_dv.to(b_w.dtype))
        if USE_INJ:
            b_dh1 += tl.load(x_inj + ((i_tg * HV + i_hv) * K + o_k1[:, None]) * V + o_v[None, :],
                             mask=m_k1[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        if K > 64:
            b_w = tl.load(w + ((bos + o_t[None, :]) * HV + i_hv) * K + o_k2[:, None],
                          mask=m_k2[:, None] & m_t[None, :], other=0.0)
            b_q = tl.load(q + ((bos + o_t[None, :]) * H + i_h) * K + o_k2[:, None],
                          mask=m_k2[:, None] & m_t[None, :], other=0.0)
            b_q = (b_q.to(tl.float32) * tl.exp2(b_g)[None, :]).to(b_w.dtype)
            b_dh2 = b_dh2 * tl.exp2(bg_last) + tl.dot(b_q, b_do.to(b_w.dtype)) * scale \
                - tl.dot(b_w, b_dv.to(b_w.dtype))
            if USE_INJ:
                b_dh2 += tl.load(x_inj + ((i_tg * HV + i_hv) * K + o_k2[:, None]) * V + o_v[None, :],
                                 mask=m_k2[:, None] & m_v[None, :], other=0.0).to(tl.float32)

    if USE_INITIAL_STATE:
        tl.store(dh0 + (i_nh * K + o_k1[:, None]) * V + o_v[None, :], b_dh1, mask=m_k1[:, None] & m_v[None, :])
        if K > 64:
            tl.store(dh0 + (i_nh * K + o_k2[:, None]) * V + o_v[None, :], b_dh2,
                     mask=m_k2[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------------------------
# launchers (tensors without the batch dimension; all contiguous)
# ----------------------------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def window_forward(qn, kn, vn, gn, bn, k, v_new, gc, h, meta, scale, *, store_state=False, run_window=True,
                   BV=32, num_warps=4):
    """Noisy windows from the clean checkpoints. Returns (on [Tn,HV,V] or None, S [W,HV,K,V] f32 or None)."""
    import torch

    T, H, K = k.shape
    HV, V = v_new.shape[1], v_new.shape[2]
    W = meta.win_r.shape[0]
    on = _alloc(*vn.shape, dtype=vn.dtype, device=vn.device) if run_window else None
    s_out = _alloc(W, HV, K, V, dtype=torch.float32, device=k.device) if store_state else None
    if W == 0:
        return on, s_out
    BV = min(BV, _pow2(V))
    grid = (W, triton.cdiv(V, BV), HV)
    dummy = k
    _window_fwd_kernel[grid](
        qn if run_window else dummy, kn if run_window else dummy, vn if run_window else dummy,
        gn if run_window else dummy, bn if run_window else dummy, on if run_window else dummy,
        k, v_new, gc, h, s_out if store_state else dummy,
        meta.win_chunk, meta.win_tok0, meta.win_r, meta.win_off, scale,
        H=H, HV=HV, K=K, V=V, BT=64, BK=_pow2(K), BV=BV,
        STORE_STATE=store_state, RUN_WINDOW=run_window, num_warps=num_warps,
    )
    return on, s_out


def window_backward(noisy, don, ds_in, k, v_new, gc, h, dv_clean, meta, scale, *, BV=32, num_warps=8):
    """Backward of the windows + injection of their boundary-state gradients into the clean chunks.

    noisy = (qn, kn, vn, gn, bn) (FUSED: the window backward runs on chip from ``don``) or None with ``ds_in``
    [W, HV, K, V] (the simple baseline: boundary-state gradients from HBM). ``dv_clean`` (gradient w.r.t. v_new)
    is updated in place. Returns dict with x_inj [NT,HV,K,V] f32, dk [T,HV,K] f32, dg [T,HV] f32 (w.r.t. the
    chunk-local cumsum, natural units) and, if fused, dqn/dkn [Tn,HV,K] f32, dvn [Tn,HV,V], dgn/dbn [Tn,HV] f32.
    Deterministic: sums over V blocks go through [NV, ...] partial buffers reduced here (no atomics; a variant
    that split each chunk's windows over several programs with fp32 atomics measured slower on the H100).
    """
    import torch

    T, H, K = k.shape
    HV, V = v_new.shape[1], v_new.shape[2]
    NT = meta.n_chunks
    BV = min(BV, _pow2(V))
    NV = triton.cdiv(V, BV)
    dev = k.device
    fused = noisy is not None
    x_inj = _alloc(NT, HV, K, V, dtype=torch.float32, device=dev)
    dk_p = _alloc(NV, T, HV, K, dtype=torch.float32, device=dev)
    dg_p = _alloc(NV, T, HV, dtype=torch.float32, device=dev)
    out = {}
    if fused:
        qn, kn, vn, gn, bn = noisy
        Tn = qn.shape[0]
        dqn_p = _alloc(NV, Tn, HV, K, dtype=torch.float32, device=dev)
        dkn_p = _alloc(NV, Tn, HV, K, dtype=torch.float32, device=dev)
        dgn_p = _alloc(NV, Tn, HV, dtype=torch.float32, device=dev)
        dbn_p = _alloc(NV, Tn, HV, dtype=torch.float32, device=dev)
        dvn = _alloc(*vn.shape, dtype=vn.dtype, device=dev)
        don = don.contiguous()
    else:
        Tn = 0
        qn = kn = vn = gn = bn = don = dqn_p = dkn_p = dgn_p = dbn_p = dvn = k
    grid = (NT, NV, HV)
    _window_bwd_kernel[grid](
        qn, kn, vn, gn, bn, don, dqn_p, dkn_p, dvn, dgn_p, dbn_p,
        k, v_new, gc, h, ds_in if ds_in is not None else k, dv_clean, dk_p, dg_p, x_inj,
        meta.chunk_tok0, meta.chunk_len, meta.chunk_wstart, meta.chunk_wcount, meta.win_order, meta.win_r,
        meta.win_off, scale, T, Tn,
        H=H, HV=HV, K=K, V=V, BT=64, BK=_pow2(K), BV=BV, FUSED=fused, num_warps=num_warps,
    )
    out["x_inj"] = x_inj
    out["dk"] = dk_p.sum(0)
    out["dg"] = dg_p.sum(0)
    if fused:
        out.update(dqn=dqn_p.sum(0), dkn=dkn_p.sum(0), dvn=dvn, dgn=dgn_p.sum(0), dbn=dbn_p.sum(0))
    return out


def bwd_dhu_inj(q, k, w, gc, h0, dht, do, dv, x_inj, scale, meta, *, BV=32, num_warps=8):
    """fla-compatible chunk_gated_delta_rule_bwd_dhu with an additive per-chunk state-gradient injection.

    q, k [T,H,K]; w [T,HV,K]; gc [T,HV]; do, dv [T,HV,V]; x_inj [NT,HV,K,V] (any float dtype, added in fp32) or
    None. Returns dh [NT,HV,K,V] (dtype of q), dh0 [N,HV,K,V]
    f32 or None, dv2 [T,HV,V]."""
    import torch

    T, H, K = k.shape
    HV, V = do.shape[1], do.shape[2]
    assert K <= 128, "bwd_dhu_inj supports K <= 128"
    N = meta.n_docs
    chunk_offsets = torch.nn.functional.pad(
        ((meta.cu_seqlens[1:] - meta.cu_seqlens[:-1] + 63) // 64).cumsum(0), (1, 0)).contiguous()
    dh = _alloc(meta.n_chunks, HV, K, V, dtype=q.dtype, device=q.device)
    dh0 = _alloc(N, HV, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
    dv2 = _alloc(*dv.shape, dtype=dv.dtype, device=dv.device)
    BV = min(BV, _pow2(V))
    grid = (triton.cdiv(V, BV), N * HV)
    _bwd_dhu_inj_kernel[grid](
        q, k, w, gc, dht if dht is not None else q, dh0 if dh0 is not None else q, do, dh, dv, dv2,
        x_inj if x_inj is not None else q, meta.cu_seqlens, chunk_offsets, scale,
        H=H, HV=HV, K=K, V=V, BT=64, BV=BV,
        USE_INITIAL_STATE=h0 is not None, USE_FINAL_STATE_GRADIENT=dht is not None, USE_INJ=x_inj is not None,
        num_warps=num_warps,
    )
    return dh, dh0, dv2
