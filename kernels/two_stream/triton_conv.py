"""Two-stream depthwise causal conv1d: Triton forward + backward (clean stream and noisy windows).

Each output token gathers its W inputs directly: a clean token from its own document (then the document's
``initial_state`` columns, then zeros); a noisy token from its own window, then — to the left of the window —
the clean inputs before the window's prefix, then the document's initial state. Nothing is materialised.

Backward: ``dpre = dy * act'(pre)`` (pre-activation recomputed), weight/bias gradients as per-block partial
sums, in-stream input gradients by a gather (deterministic), and the cross-stream ones (noisy -> clean left
context, and -> initial state) with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gdn import _alloc


@triton.jit
def _conv_src(x, xn, init, i_d, m_d, pos_in_seg, seg_base, d, p, is_noisy_tok, m_tok,
              cu, D: tl.constexpr, WM1: tl.constexpr, IS_NOISY: tl.constexpr, HAS_INIT: tl.constexpr):
    """Value of the input ``pos_in_seg`` (may be negative) of the token's own segment, following left context.
    Returns (value [BT, BD] f32) using three masked loads."""
    if IS_NOISY:
        in_win = pos_in_seg >= 0
        cpos = p + pos_in_seg  # position in the clean document when left of the window
        v = tl.load(xn + (seg_base + pos_in_seg)[:, None] * D + i_d[None, :],
                    mask=(m_tok & in_win)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    else:
        in_win = pos_in_seg < -(1 << 30)  # never
        cpos = pos_in_seg
    doc0 = tl.load(cu + d, mask=m_tok, other=0).to(tl.int64)
    in_doc = (~in_win) & (cpos >= 0)
    vc = tl.load(x + (doc0 + cpos)[:, None] * D + i_d[None, :],
                 mask=(m_tok & in_doc)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    if IS_NOISY:
        v += vc
    else:
        v = vc
    if HAS_INIT:
        in_init = (~in_win) & (cpos < 0)
        vi = tl.load(init + (d.to(tl.int64)[:, None] * D + i_d[None, :]) * WM1 + (WM1 + cpos)[:, None],
                     mask=(m_tok & in_init)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        v += vi
    return v


@triton.jit
def _conv_tok_meta(tok_seg, seg_doc, seg_pre, seg_off, cu, n, m_tok, IS_NOISY: tl.constexpr):
    s = tl.load(tok_seg + n, mask=m_tok, other=0)
    if IS_NOISY:
        base = tl.load(seg_off + s, mask=m_tok, other=0).to(tl.int64)
        d = tl.load(seg_doc + s, mask=m_tok, other=0)
        p = tl.load(seg_pre + s, mask=m_tok, other=0).to(tl.int64)
    else:
        d = s
        base = tl.load(cu + s, mask=m_tok, other=0).to(tl.int64)
        p = base * 0
    return s, d, p, base


@triton.jit
def _conv_fwd_kernel(x, xn, init, weight, bias, y, tok_seg, seg_doc, seg_pre, seg_off, cu, NTOK,
                     D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     IS_NOISY: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    i_t, i_dblk = tl.program_id(0), tl.program_id(1)
    n = i_t * BT + tl.arange(0, BT).to(tl.int64)
    m_tok = n < NTOK
    i_d = i_dblk * BD + tl.arange(0, BD)
    m_d = i_d < D
    s, d, p, base = _conv_tok_meta(tok_seg, seg_doc, seg_pre, seg_off, cu, n, m_tok, IS_NOISY)
    pos = n - base
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + i_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        wj = tl.load(weight + i_d * W + j, mask=m_d, other=0.0).to(tl.float32)
        v = _conv_src(x, xn, init, i_d, m_d, pos - (W - 1 - j), base, d, p, IS_NOISY, m_tok, cu, D, W - 1,
                      IS_NOISY, HAS_INIT)
        acc += v * wj[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + n[:, None] * D + i_d[None, :], acc.to(y.dtype.element_ty), mask=m_tok[:, None] & m_d[None, :])


@triton.jit
def _conv_bwd_kernel(x, xn, init, weight, bias, dy, dpre, dw_p, db_p, dx_ctx, dinit,
                     tok_seg, seg_doc, seg_pre, seg_off, cu, NTOK,
                     D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     IS_NOISY: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """dpre (stored), weight/bias partial sums per token block, and atomics into the cross-segment sources
    (noisy -> clean context ``dx_ctx``; any -> ``dinit``)."""
    i_t, i_dblk = tl.program_id(0), tl.program_id(1)
    n = i_t * BT + tl.arange(0, BT).to(tl.int64)
    m_tok = n < NTOK
    i_d = i_dblk * BD + tl.arange(0, BD)
    m_d = i_d < D
    m2 = m_tok[:, None] & m_d[None, :]
    s, d, p, base = _conv_tok_meta(tok_seg, seg_doc, seg_pre, seg_off, cu, n, m_tok, IS_NOISY)
    pos = n - base
    b_dy = tl.load(dy + n[:, None] * D + i_d[None, :], mask=m2, other=0.0).to(tl.float32)
    if SILU:
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias + i_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(W):
            wj = tl.load(weight + i_d * W + j, mask=m_d, other=0.0).to(tl.float32)
            v = _conv_src(x, xn, init, i_d, m_d, pos - (W - 1 - j), base, d, p, IS_NOISY, m_tok, cu, D, W - 1,
                          IS_NOISY, HAS_INIT)
            acc += v * wj[None, :]
        sg = tl.sigmoid(acc)
        b_dp = b_dy * sg * (1.0 + acc * (1.0 - sg))
    else:
        b_dp = b_dy
    b_dp = tl.where(m2, b_dp, 0.0)
    tl.store(dpre + n[:, None] * D + i_d[None, :], b_dp, mask=m2)
    if HAS_BIAS:
        tl.store(db_p + i_t * D + i_d, tl.sum(b_dp, axis=0), mask=m_d)
    doc0 = tl.load(cu + d, mask=m_tok, other=0).to(tl.int64)
    for j in tl.static_range(W):
        wj = tl.load(weight + i_d * W + j, mask=m_d, other=0.0).to(tl.float32)
        sp = pos - (W - 1 - j)
        v = _conv_src(x, xn, init, i_d, m_d, sp, base, d, p, IS_NOISY, m_tok, cu, D, W - 1, IS_NOISY, HAS_INIT)
        tl.store(dw_p + (i_t * W + j) * D + i_d, tl.sum(v * b_dp, axis=0), mask=m_d)
        g = b_dp * wj[None, :]
        if IS_NOISY:
            cpos = p + sp
            m_ctx = (sp < 0) & (cpos >= 0) & m_tok
            tl.atomic_add(dx_ctx + (doc0 + cpos)[:, None] * D + i_d[None, :], g,
                          mask=m_ctx[:, None] & m_d[None, :])
        else:
            cpos = sp
        if HAS_INIT:
            m_i = (cpos < 0) & m_tok
            if IS_NOISY:
                m_i = m_i & (sp < 0)
            tl.atomic_add(dinit + (d.to(tl.int64)[:, None] * D + i_d[None, :]) * (W - 1) + (W - 1 + cpos)[:, None],
                          g, mask=m_i[:, None] & m_d[None, :])


@triton.jit
def _conv_gather_kernel(dpre, weight, tok_seg, dx, NTOK, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr):
    """In-segment input gradient: dx[i] = sum_j w[:, j] * dpre[i + W-1-j] where that token is in i's segment."""
    i_t, i_dblk = tl.program_id(0), tl.program_id(1)
    n = i_t * BT + tl.arange(0, BT).to(tl.int64)
    m_tok = n < NTOK
    i_d = i_dblk * BD + tl.arange(0, BD)
    m_d = i_d < D
    s = tl.load(tok_seg + n, mask=m_tok, other=-1)
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(weight + i_d * W + j, mask=m_d, other=0.0).to(tl.float32)
        c = n + (W - 1 - j)
        m_c = m_tok & (c < NTOK)
        sc = tl.load(tok_seg + c, mask=m_c, other=-2)
        m_c = m_c & (sc == s)
        acc += tl.load(dpre + c[:, None] * D + i_d[None, :], mask=m_c[:, None] & m_d[None, :], other=0.0) * wj[None, :]
    tl.store(dx + n[:, None] * D + i_d[None, :], acc.to(dx.dtype.element_ty), mask=m_tok[:, None] & m_d[None, :])


# ----------------------------------------------------------------------------------------------------------------


def _conv_meta(T, Tn, cu_seqlens, window_doc, window_prefix, window_offsets, device):
    cu = (torch.tensor([0, T], device=device) if cu_seqlens is None else cu_seqlens.to(device)).to(torch.int64)
    n_docs = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    tok_doc = torch.repeat_interleave(torch.arange(n_docs, device=device, dtype=torch.int32), lens, output_size=T)
    off = window_offsets.to(device=device, dtype=torch.int64)
    W = off.numel() - 1
    tok_win = torch.repeat_interleave(torch.arange(W, device=device, dtype=torch.int32), off[1:] - off[:-1],
                                      output_size=Tn)
    return dict(cu=cu.contiguous(), tok_doc=tok_doc.contiguous(), tok_win=tok_win.contiguous(),
                win_doc=window_doc.to(device=device, dtype=torch.int32).contiguous(),
                win_pre=window_prefix.to(device=device, dtype=torch.int32).contiguous(), off=off.contiguous())


_BT, _BD = 32, 64


class TwoStreamConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xn, weight, bias, init, m, silu):
        T, D = x.shape
        Tn = xn.shape[0]
        W = weight.shape[1]
        y = _alloc(*x.shape, dtype=x.dtype, device=x.device)
        yn = _alloc(*xn.shape, dtype=xn.dtype, device=xn.device)
        dummy = x
        common = dict(D=D, W=W, BT=_BT, BD=_BD, HAS_INIT=init is not None, HAS_BIAS=bias is not None, SILU=silu)
        for is_noisy, out, ntok, seg in ((False, y, T, m["tok_doc"]), (True, yn, Tn, m["tok_win"])):
            if ntok == 0:
                continue
            grid = (triton.cdiv(ntok, _BT), triton.cdiv(D, _BD))
            _conv_fwd_kernel[grid](x, xn, init if init is not None else dummy, weight,
                                   bias if bias is not None else dummy, out, seg, m["win_doc"], m["win_pre"],
                                   m["off"], m["cu"], ntok, IS_NOISY=is_noisy, **common)
        ctx.save_for_backward(x, xn, weight, bias, init)
        ctx.m, ctx.silu = m, silu
        return y, yn

    @staticmethod
    def backward(ctx, dy, dyn):
        x, xn, weight, bias, init = ctx.saved_tensors
        m, silu = ctx.m, ctx.silu
        T, D = x.shape
        Tn = xn.shape[0]
        W = weight.shape[1]
        dev = x.device
        dx_ctx = torch.zeros(T, D, dtype=torch.float32, device=dev)
        dinit = torch.zeros(init.shape, dtype=torch.float32, device=dev) if init is not None else None
        dweight = torch.zeros(D, W, dtype=torch.float32, device=dev)
        dbias = torch.zeros(D, dtype=torch.float32, device=dev) if bias is not None else None
        common = dict(D=D, W=W, BT=_BT, BD=_BD, HAS_INIT=init is not None, HAS_BIAS=bias is not None, SILU=silu)
        dx = _alloc(*x.shape, dtype=x.dtype, device=dev)
        dxn = _alloc(*xn.shape, dtype=xn.dtype, device=dev)
        for is_noisy, g_out, ntok, seg, dgrad in ((False, dy, T, m["tok_doc"], dx), (True, dyn, Tn, m["tok_win"], dxn)):
            if ntok == 0:
                continue
            nb = triton.cdiv(ntok, _BT)
            grid = (nb, triton.cdiv(D, _BD))
            dpre = _alloc(ntok, D, dtype=torch.float32, device=dev)
            dw_p = _alloc(nb, W, D, dtype=torch.float32, device=dev)
            db_p = _alloc(nb, D, dtype=torch.float32, device=dev) if bias is not None else dw_p
            _conv_bwd_kernel[grid](x, xn, init if init is not None else x, weight, bias if bias is not None else x,
                                   g_out.contiguous(), dpre, dw_p, db_p, dx_ctx, dinit if dinit is not None else dx_ctx,
                                   seg, m["win_doc"], m["win_pre"], m["off"], m["cu"], ntok, IS_NOISY=is_noisy,
                                   **common)
            dweight += dw_p.sum(0).t()
            if bias is not None:
                dbias += db_p.sum(0)
            _conv_gather_kernel[grid](dpre, weight, seg, dgrad, ntok, D=D, W=W, BT=_BT, BD=_BD)
        dx = (dx.float() + dx_ctx).to(x.dtype)
        return (dx, dxn, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
                dinit.to(init.dtype) if init is not None else None, None, None)


def triton_two_stream_causal_conv1d(x, xn, weight, window_doc, window_prefix, window_offsets, bias=None,
                                    cu_seqlens=None, initial_state=None, output_final_state=False,
                                    activation="silu"):
    """Same signature and semantics as ``naive_two_stream_causal_conv1d`` (Triton; CUDA or the interpreter)."""
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    T, Tn = x.shape[1], xn.shape[1]
    m = _conv_meta(T, Tn, cu_seqlens, window_doc, window_prefix, window_offsets, x.device)
    init = initial_state.contiguous() if initial_state is not None else None
    y, yn = TwoStreamConvFunction.apply(x[0].contiguous(), xn[0].contiguous(), weight.contiguous(), bias, init, m,
                                        activation == "silu")
    final = _final_conv_state(x, initial_state, m["cu"], weight.shape[1]) if output_final_state else None
    return y[None], yn[None], final


def _final_conv_state(x, initial_state, cu, width):
    """Last W-1 inputs of [initial_state, document] per document, [N, D, W-1] (torch ops: differentiable)."""
    N = cu.numel() - 1
    D = x.shape[2]
    left = x.new_zeros(N, D, width - 1) if initial_state is None else initial_state.to(x.dtype)
    # position j (0..W-2) of document d's final state is its input at doc position len-(W-1)+j, or the initial
    # state's column len+j when that is negative
    lens = cu[1:] - cu[:-1]
    j = torch.arange(width - 1, device=x.device)
    posd = lens[:, None] - (width - 1) + j[None, :]  # [N, W-1]
    from_x = x[0][(cu[:-1, None] + posd.clamp_min(0)).clamp_max(max(x.shape[1] - 1, 0))]  # [N, W-1, D]
    from_i = left.gather(2, (width - 1 + posd).clamp(0, width - 2)[:, None, :].expand(N, D, width - 1))
    return torch.where((posd >= 0)[:, None, :], from_x.transpose(1, 2), from_i)
