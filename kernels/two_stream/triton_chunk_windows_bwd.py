"""Two-kernel backward of the chunk-parallel noisy-window map (``triton_chunk_windows``), for V <= 128.

The one-kernel backward (``_chunk_windows_bwd_kernel``) keeps the forward recompute, the [slots x slots] algebra
and three [slots x K] gradient accumulators live in one program and spills heavily on an H100 (255 registers,
~9 KB of spills per thread at K=V=128). Here the work is cut where the data shrinks:

1. ``_bwd_values_kernel``, one program per (chunk, V block, value head): recompute the forward pieces, run the
   reverse pass over everything of width V (noisy values, clean new values), and the gate and beta gradients
   (per V block, summed after). It leaves, in the product dtype, the value-side gradients against the chunk
   state ``Aq = e^{Gr} ∘ dQS``, ``Ak = e^{Gr} ∘ dKS`` ([slots x V]) and four small matrices per V block:
   ``G = dP ∘ dec``, ``D = L̄ + L̄ᵀ`` ([slots x slots]; L̄ = dL ∘ β ∘ dec), ``Xq = dMq ∘ coef``,
   ``Xk = dMk ∘ coef`` ([slots x chunk]).
2. ``_bwd_keys_kernel``, one program per (chunk, K block, value head), the matrices summed over V blocks:
   ``dq = G kn + Xq kc + Aq hᵀ``, ``dkn = D kn + Gᵀ q + Xk kc + Ak hᵀ``, ``dkc = Xqᵀ q + Xkᵀ kn`` and the
   gradient of the state entering the chunk ``qᵀ Aq + knᵀ Ak``.

Same maths as the one-kernel backward (the interpreter tests compare both with the torch map). Scratch: Aq, Ak
(2 x slots x V per chunk and head) and the matrices (NV x 2 x (slots² + slots x 64) per chunk and head), in the
product dtype, for one range of chunks at a time (``SCRATCH_BUDGET``): the launches walk the chunks in ranges.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_chunk_windows import _dot, _program_layout, dot_precision
from .triton_gdn import _alloc, _pow2

VALUES_CONFIG = dict(BV=64, num_warps=8)
KEYS_CONFIG = dict(BK=64, num_warps=8)
# Scratch per launch (Aq, Ak, matrices). At T=8192, K=V=128, 16 heads, block size 1 the whole map's scratch is
# 192 MiB (1.5 MiB per chunk): within 64 MiB it runs as 4 launches of 32 chunks (each still 1024+ programs).
SCRATCH_BUDGET = 64 << 20


@triton.jit
def _bwd_values_kernel(
    qn, kn, vn, gn, bn, don,  # noisy stream [Tn, H|HV, K|V] and the gradient of its outputs [Tn, HV, V]
    k, vnew, gc, h,  # clean stream: keys [T,H,K], new values [T,HV,V], log2 chunk cumsum [T,HV], h [NT,HV,K,V]
    aq_out, ak_out,  # [NL, HV, BC, V] (product dtype): per chunk of this launch, head and slot
    dgn_p, dbn_p,  # [NV, Tn, HV] f32 partials
    dvn,  # [Tn, HV, V] (dtype of vn)
    dg_p,  # [NV, T, HV] f32 partials: natural-unit chunk cumsum
    dv_clean,  # [T, HV, V]: increased in place (each element by one program)
    mat_ss, mat_st,  # [NV, NL, HV, 2, BC, BC] / [NV, NL, HV, 2, BC, BT] (product dtype): (G, D) / (Xq, Xk)
    slot_tok, slot_win, slot_r, chunk_tok0, chunk_len,
    scale, T, Tn, NC, c0, NL,  # this launch covers chunks c0 .. c0 + NL - 1
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAXW: tl.constexpr,
    PREC: tl.constexpr,
):
    i_l, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c = c0 + i_l
    i_h = i_hv // (HV // H)
    o_s, st, valid, sw, sr, tok0, o_t, m_t, o_k, m_k, o_v, m_v = _program_layout(
        slot_tok, slot_win, slot_r, chunk_tok0, chunk_len, i_c, i_v, Tn, NC, K, V, BT, BC, BK, BV)
    m_sk = valid[:, None] & m_k[None, :]
    m_sv = valid[:, None] & m_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]

    b_q = tl.load(qn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)
    b_kn = tl.load(kn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)
    b_kc = tl.load(k + ((tok0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                   other=0.0)
    dt = b_kc.dtype
    b_gn = tl.load(gn + st * HV + i_hv, mask=valid, other=0.0).to(tl.float32)
    b_bn = tl.load(bn + st * HV + i_hv, mask=valid, other=0.0).to(tl.float32)
    b_gc = tl.load(gc + (tok0 + o_t) * HV + i_hv, mask=m_t, other=0.0).to(tl.float32) * 0.6931471805599453

    # ---- [slots x slots] / [slots x chunk] forward pieces (natural units) ----
    g_r = tl.sum(tl.where(o_t[None, :] == sr[:, None] - 1, b_gc[None, :], 0.0), axis=1)
    before = o_t[None, :] < sr[:, None]
    coef = tl.where(before, tl.exp(tl.where(before, g_r[:, None] - b_gc[None, :], 0.0)), 0.0)  # [BC, BT]
    e_r = tl.exp(g_r)
    qkc_c = _dot(PREC, b_q, tl.trans(b_kc)) * coef
    kkc_c = _dot(PREC, b_kn, tl.trans(b_kc)) * coef
    same = (sw[:, None] == sw[None, :]) & (sw[:, None] >= 0)
    incl = same & (o_s[:, None] >= o_s[None, :])
    strict = same & (o_s[:, None] > o_s[None, :])
    gam = tl.sum(tl.where(incl, b_gn[None, :], 0.0), axis=1)
    dec = tl.where(incl, tl.exp(tl.where(incl, gam[:, None] - gam[None, :], 0.0)), 0.0)
    eg = tl.exp(gam)
    knkn = _dot(PREC, b_kn, tl.trans(b_kn))
    qkn = _dot(PREC, b_q, tl.trans(b_kn))
    b_l = tl.where(strict, b_bn[:, None] * dec * knkn, 0.0)

    # ---- width-V forward pieces; terms of d(eg) and d(Gr) that need qs / qh are taken as soon as do is known ----
    b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0).to(dt)
    b_vc = tl.load(vnew + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0.0)
    b_do = tl.load(don + (st[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_sv, other=0.0).to(tl.float32) * scale
    qh = _dot(PREC, b_q, b_h)  # [BC, BV]
    qs = e_r[:, None] * qh + _dot(PREC, qkc_c.to(dt), b_vc)
    d_eg = tl.sum(b_do * qs, axis=1)
    d_gr = e_r * eg * tl.sum(b_do * qh, axis=1)
    kh = _dot(PREC, b_kn, b_h)
    ks = e_r[:, None] * kh + _dot(PREC, kkc_c.to(dt), b_vc)
    vres = tl.load(vn + (st[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_sv, other=0.0).to(tl.float32) \
        - eg[:, None] * ks  # V_n - e^Γ K_nS
    rhs = b_bn[:, None] * vres
    d = rhs
    for _ in tl.static_range(MAXW - 1):
        d = rhs - _dot(PREC, b_l, d)

    # ---- reverse, width V ----
    d_p = _dot(PREC, b_do, tl.trans(d))  # [BC, BC]
    d_d = _dot(PREC, tl.trans(qkn * dec), b_do)
    d_rhs = d_d
    for _ in tl.static_range(MAXW - 1):
        d_rhs = d_d - _dot(PREC, tl.trans(b_l), d_rhs)
    d_l = tl.where(strict, -_dot(PREC, d_rhs, tl.trans(d)), 0.0)
    tl.store(dvn + (st[:, None] * HV + i_hv) * V + o_v[None, :], (b_bn[:, None] * d_rhs).to(dvn.dtype.element_ty),
             mask=m_sv)
    d_bn = tl.sum(d_rhs * vres, axis=1) + tl.sum(d_l * dec * knkn, axis=1)
    d_ks = -(b_bn * eg)[:, None] * d_rhs
    d_eg += tl.sum(-b_bn[:, None] * d_rhs * ks, axis=1)
    d_gr += e_r * tl.sum(d_ks * kh, axis=1)

    # value-side gradients against the chunk state (the keys kernel takes their products with q, kn and h)
    d_qs_t = (eg[:, None] * b_do).to(dt)
    d_ks_t = d_ks.to(dt)
    o_a = ((i_l.to(tl.int64) * HV + i_hv) * BC + o_s[:, None]) * V + o_v[None, :]
    tl.store(aq_out + o_a, (e_r[:, None] * eg[:, None] * b_do).to(dt), mask=m_sv)
    tl.store(ak_out + o_a, (e_r[:, None] * d_ks).to(dt), mask=m_sv)

    # clean new values and the chunk-side matrices
    p_dvc = dv_clean + ((tok0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
    d_vc = _dot(PREC, tl.trans(qkc_c).to(dt), d_qs_t) + _dot(PREC, tl.trans(kkc_c).to(dt), d_ks_t)  # [BT, BV]
    tl.store(p_dvc, (tl.load(p_dvc, mask=m_tv, other=0.0).to(tl.float32) + d_vc).to(p_dvc.dtype.element_ty),
             mask=m_tv)
    dm_q = _dot(PREC, d_qs_t, tl.trans(b_vc))  # [BC, BT]
    dm_k = _dot(PREC, d_ks_t, tl.trans(b_vc))

    # ---- gate / beta gradients (scalars per token; partial over this V block) ----
    i_v64 = i_v.to(tl.int64)
    w = (d_l * b_bn[:, None] * knkn + d_p * qkn) * dec
    d_gam = tl.sum(w, axis=1) - tl.sum(w, axis=0) + eg * d_eg
    tl.store(dgn_p + (i_v64 * Tn + st) * HV + i_hv, tl.sum(tl.where(incl, d_gam[:, None], 0.0), axis=0), mask=valid)
    tl.store(dbn_p + (i_v64 * Tn + st) * HV + i_hv, d_bn, mask=valid)
    w2 = dm_q * qkc_c + dm_k * kkc_c
    d_gr += tl.sum(w2, axis=1)
    d_gc = -tl.sum(w2, axis=0) + tl.sum(tl.where(o_t[None, :] == sr[:, None] - 1, d_gr[:, None], 0.0), axis=0)
    tl.store(dg_p + (i_v64 * T + tok0 + o_t) * HV + i_hv, d_gc, mask=m_t)

    # ---- matrices for the key-side products ----
    d_lb = d_l * b_bn[:, None] * dec
    base = ((i_v64 * NL + i_l) * HV + i_hv) * 2
    o_ss = o_s[:, None] * BC + o_s[None, :]
    o_st = o_s[:, None] * BT + o_t[None, :]
    mdt = mat_ss.dtype.element_ty
    tl.store(mat_ss + base * BC * BC + o_ss, (d_p * dec).to(mdt))
    tl.store(mat_ss + (base + 1) * BC * BC + o_ss, (d_lb + tl.trans(d_lb)).to(mdt))
    tl.store(mat_st + base * BC * BT + o_st, (dm_q * coef).to(mdt))
    tl.store(mat_st + (base + 1) * BC * BT + o_st, (dm_k * coef).to(mdt))


@triton.jit
def _bwd_keys_kernel(
    qn, kn, k, h, aq_in, ak_in, mat_ss, mat_st,
    dqn, dkn,  # [Tn, HV, K] (f32, or the noisy dtype when nothing is summed after)
    dk,  # [T, HV, K] f32
    x_inj,  # [NT, HV, K, V] (f32 or the states' dtype): gradient w.r.t. the state entering each chunk
    slot_tok, chunk_tok0, chunk_len,
    Tn, NC, c0, NL,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, NV: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr, PREC: tl.constexpr,
):
    i_l, i_k, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c = c0 + i_l
    i_h = i_hv // (HV // H)
    o_s = tl.arange(0, BC)
    st = tl.load(slot_tok + i_c * NC + o_s, mask=o_s < NC, other=Tn).to(tl.int64)
    valid = st < Tn
    tok0 = tl.load(chunk_tok0 + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    m_t = o_t < tl.load(chunk_len + i_c)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = tl.arange(0, BVF)
    m_v = o_v < V
    m_sk = valid[:, None] & m_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    m_sv = valid[:, None] & m_v[None, :]

    b_q = tl.load(qn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)
    b_kn = tl.load(kn + (st[:, None] * H + i_h) * K + o_k[None, :], mask=m_sk, other=0.0)
    b_kc = tl.load(k + ((tok0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
    dt = b_kc.dtype
    o_ss = o_s[:, None] * BC + o_s[None, :]
    o_st = o_s[:, None] * BT + o_t[None, :]
    g = tl.zeros([BC, BC], dtype=tl.float32)
    dd = tl.zeros([BC, BC], dtype=tl.float32)
    xq = tl.zeros([BC, BT], dtype=tl.float32)
    xk = tl.zeros([BC, BT], dtype=tl.float32)
    for i_v in tl.static_range(NV):  # sum the V-block partials
        base = (((i_v * NL + i_l).to(tl.int64)) * HV + i_hv) * 2
        g += tl.load(mat_ss + base * BC * BC + o_ss).to(tl.float32)
        dd += tl.load(mat_ss + (base + 1) * BC * BC + o_ss).to(tl.float32)
        xq += tl.load(mat_st + base * BC * BT + o_st).to(tl.float32)
        xk += tl.load(mat_st + (base + 1) * BC * BT + o_st).to(tl.float32)
    g, dd, xq, xk = g.to(dt), dd.to(dt), xq.to(dt), xk.to(dt)

    b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0).to(dt)  # [BK, BVF]
    o_a = ((i_l.to(tl.int64) * HV + i_hv) * BC + o_s[:, None]) * V + o_v[None, :]
    aq = tl.load(aq_in + o_a, mask=m_sv, other=0.0)  # [BC, BVF]
    ak = tl.load(ak_in + o_a, mask=m_sv, other=0.0)
    d_q = _dot(PREC, g, b_kn) + _dot(PREC, xq, b_kc) + _dot(PREC, aq, tl.trans(b_h))
    tl.store(dqn + (st[:, None] * HV + i_hv) * K + o_k[None, :], d_q.to(dqn.dtype.element_ty), mask=m_sk)
    d_kn = _dot(PREC, dd, b_kn) + _dot(PREC, tl.trans(g), b_q) + _dot(PREC, xk, b_kc) + _dot(PREC, ak, tl.trans(b_h))
    tl.store(dkn + (st[:, None] * HV + i_hv) * K + o_k[None, :], d_kn.to(dkn.dtype.element_ty), mask=m_sk)
    tl.store(dk + ((tok0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :],
             _dot(PREC, tl.trans(xq), b_q) + _dot(PREC, tl.trans(xk), b_kn), mask=m_tk)
    tl.store(x_inj + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
             (_dot(PREC, tl.trans(b_q), aq) + _dot(PREC, tl.trans(b_kn), ak)).to(x_inj.dtype.element_ty),
             mask=m_k[:, None] & m_v[None, :])


def scratch_chunks(n_chunks: int, bytes_per_chunk: int, budget: int) -> int:
    """Chunks per launch so that the scratch stays within ``budget`` bytes: the fewest launches that fit, with
    the chunks spread evenly over them (at least one chunk per launch)."""
    per_launch = max(1, budget // max(bytes_per_chunk, 1))
    launches = -(-n_chunks // per_launch)
    return -(-n_chunks // launches)


def chunk_windows_backward_split(noisy, don, k, v_new, gc, h, dv_clean, meta, scale, slots, *,
                                 scratch_budget=None, inj_dtype=None):
    """Same contract as ``triton_chunk_windows.chunk_windows_backward_triton`` (V <= 128), except the dtypes:
    ``dqn``/``dkn`` come in the noisy inputs' dtype when HV == H (nothing is summed after, the kernel casts its
    fp32 result) and ``x_inj`` in ``inj_dtype`` (default: the dtype of ``h``, as fla keeps states and their
    gradients; the dh recurrence adds it in fp32).

    Memory: the scratch (Aq, Ak and the matrices) is per launch; launches cover consecutive chunk ranges so that
    it stays within ``scratch_budget`` bytes (default ``SCRATCH_BUDGET``)."""
    import torch

    qn, kn, vn, gn, bn = noisy
    assert dv_clean.is_contiguous(), "dv_clean is updated in place through raw pointers"
    T, H, K = k.shape
    HV, V = v_new.shape[1], v_new.shape[2]
    Tn = qn.shape[0]
    dev = k.device
    f32 = torch.float32
    NT, NC = meta.n_chunks, slots.n_slots
    BC, BT, BVF = _pow2(NC), 64, _pow2(V)
    assert BVF <= 128, "the keys kernel holds all of V in one program"
    BV = min(VALUES_CONFIG["BV"], BVF)
    NV = triton.cdiv(V, BV)
    mdt = k.dtype if k.dtype in (torch.bfloat16, torch.float16) else f32  # the dtype of the products' operands
    esz = torch.empty((), dtype=mdt).element_size()
    per_chunk = HV * esz * (2 * BC * V + NV * 2 * (BC * BC + BC * BT))
    NL = scratch_chunks(NT, per_chunk, SCRATCH_BUDGET if scratch_budget is None else scratch_budget)
    aq, ak = torch.empty(NL, HV, BC, V, dtype=mdt, device=dev), torch.empty(NL, HV, BC, V, dtype=mdt, device=dev)
    mat_ss = torch.empty(NV, NL, HV, 2, BC, BC, dtype=mdt, device=dev)
    mat_st = torch.empty(NV, NL, HV, 2, BC, BT, dtype=mdt, device=dev)
    dgn_p, dbn_p = _alloc(NV, Tn, HV, dtype=f32, device=dev), _alloc(NV, Tn, HV, dtype=f32, device=dev)
    dg_p = _alloc(NV, T, HV, dtype=f32, device=dev)
    dvn = _alloc(Tn, HV, V, dtype=vn.dtype, device=dev)
    x_inj = _alloc(NT, HV, K, V, dtype=inj_dtype or h.dtype, device=dev)
    dk = _alloc(T, HV, K, dtype=f32, device=dev)
    dn_dtype = qn.dtype if HV == H else f32
    dqn, dkn = _alloc(Tn, HV, K, dtype=dn_dtype, device=dev), _alloc(Tn, HV, K, dtype=dn_dtype, device=dev)
    sl = (slots.slot_tok.contiguous(), slots.slot_win.contiguous(), slots.slot_r.contiguous(), meta.chunk_tok0,
          meta.chunk_len)
    don = don.contiguous()
    BK = min(KEYS_CONFIG["BK"], _pow2(K))
    for c0 in range(0, NT, NL):
        n = min(NL, NT - c0)
        _bwd_values_kernel[(n, NV, HV)](
            qn, kn, vn, gn, bn, don, k, v_new, gc, h, aq, ak, dgn_p, dbn_p, dvn, dg_p, dv_clean,
            mat_ss, mat_st, *sl, scale, T, Tn, NC, c0, NL,
            H=H, HV=HV, K=K, V=V, BT=BT, BC=BC, BK=_pow2(K), BV=BV, MAXW=max(int(slots.max_window), 1),
            PREC=dot_precision(k.dtype), num_warps=VALUES_CONFIG["num_warps"],
        )
        _bwd_keys_kernel[(n, triton.cdiv(K, BK), HV)](
            qn, kn, k, h, aq, ak, mat_ss, mat_st, dqn, dkn, dk, x_inj, sl[0], sl[3], sl[4], Tn, NC, c0, NL,
            H=H, HV=HV, K=K, V=V, NV=NV, BT=BT, BC=BC, BK=BK, BVF=BVF, PREC=dot_precision(k.dtype),
            num_warps=KEYS_CONFIG["num_warps"],
        )
    red = (lambda x: x[0]) if NV == 1 else (lambda x: x.sum(0))  # noqa: E731
    return dict(x_inj=x_inj, dk=dk, dg=red(dg_p), dqn=dqn, dkn=dkn, dvn=dvn, dgn=red(dgn_p), dbn=red(dbn_p))
