"""A softmax-attention layer's core for the static step in two launches (issue 6): q/k norms, RoPE, the cache write
and the output gate around ``attention.decode_attention``.

Between the fused q|k|v projection and the output projection, the step ran (compiled by inductor) the per-head q
and k RMSNorms, partial RoPE, the clean keys/values scattered into the cache, the attention kernel, a copy of its
output into the output projection's layout and Qwen3.5's sigmoid output gate: ~8 kernels per attention layer (on
the H100, Qwen3.5-2B shape, C = 8: 70 us of inductor kernels in the 6 attention layers of a 2.12 ms AR step, plus a
launch gap each; docs/perf/engine.md, session 16). Here:

* **prologue kernel**, one program per token: loads the token's q heads (Qwen3.5: each head's q half of its
  [q | gate] pair), k and v heads straight from the projection's output, takes the q and k RMSNorms (gain folded as
  ``norm_gemv.norm_gain`` reads it, computed in fp32 and rounded as the module rounds), rotates the first R dims
  (``x * cos + rotate_half(x) * sin``, each product and the sum rounded as eager torch rounds them), writes q
  [C, Hq, W, D], the clean tokens' k/v at their slots of the cache (slot ``length + i``, capped at the capacity as
  the step's torch code caps it) and the window's k/v [C, Hkv, Ww, D];
* **the attention kernel** (``attention.launch``) reads the gate straight from the projection's output and writes
  ``o * sigmoid(gate)`` into a [C, W, Hq, D] buffer: the output projection's input, no copy.

``attention_core`` (op ``flarectl::attention_core``, mutates the cache) is the fast path; ``attention_core_reference``
its twin with the same signature (the step's torch code: norms, ``apply_rope``, the scatter, the attention twin,
the gate). ``applies`` says where the op is used.
"""

from __future__ import annotations

import functools

import torch

from flarectl.engine.attention import decode_attention_reference, write_clean_slots
from flarectl.models.attention import apply_rope

NAN_FILL = False
"""Tests: outputs NaN-filled first, so unwritten elements fail."""

DEFAULT = True
"""Whether the CUDA step (with the attention kernel and fused q|k|v weights) runs attention layers through
``attention_core`` by default (env ``FLARECTL_ENGINE_ATTN_CORE=1`` / ``0`` overrides). On since session 18: on the
H100 (Qwen3.5-2B shape, random weights, C = 8) AR step 2.080 vs 2.131 ms, trust 2.733 vs 2.767, window 2.322 vs
2.380 (2.075 vs 2.132 in session 17); the CUDA engine tests passed with it on (8/8: graphed == eager for every GDN
kernel, engine == the adapter-path reference backend); docs/perf/engine.md, session 18."""


def resolve(flag: bool | None, attn_kernel: bool) -> bool:
    """None -> ``DEFAULT`` (env ``FLARECTL_ENGINE_ATTN_CORE`` overrides) where the attention kernel is on; True /
    False as given (it needs the attention kernel either way)."""
    if flag is None:
        import os

        env = os.environ.get("FLARECTL_ENGINE_ATTN_CORE")
        flag = DEFAULT if env is None else env.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(flag) and attn_kernel


def plan(module) -> tuple | None:
    """(q-norm gain [D] fp32, k-norm gain, eps) of an attention module whose q/k norms are RMSNorms of a known form
    (``norm_gemv.norm_gain``) with one eps, (None, None, 0.0) for a module without q/k norms, else None (the op
    does not apply)."""
    from flarectl.engine.norm_gemv import norm_gain

    qn, kn = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if qn is None and kn is None:
        return None, None, 0.0
    gq = norm_gain(qn) if qn is not None else None
    gk = norm_gain(kn) if kn is not None else None
    if gq is None or gk is None or gq[1] != gk[1]:
        return None
    return gq[0].contiguous(), gk[0].contiguous(), gq[1]


def _norm(x: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim as Qwen3.5's module computes it: fp32, times the gain, rounded to x's dtype
    (``gain`` None: no norm)."""
    if gain is None:
        return x
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gain.to(xf.dtype)).to(x.dtype)


def split_heads(qkv: torch.Tensor, hq: int, hkv: int, d: int, gated: bool):
    """qkv [C, W, F] -> q [C, W, Hq, D], gate [C, W, Hq, D] or None, k, v [C, W, Hkv, D] (views)."""
    C, W, _ = qkv.shape
    fq = hq * d * (2 if gated else 1)
    q = qkv[..., :fq].view(C, W, hq, -1)
    gate = q[..., d:] if gated else None
    q = q[..., :d]
    k = qkv[..., fq:fq + hkv * d].view(C, W, hkv, d)
    v = qkv[..., fq + hkv * d:fq + 2 * hkv * d].view(C, W, hkv, d)
    return q, gate, k, v


def attention_core_reference(qkv: torch.Tensor, gain_q: torch.Tensor | None, gain_k: torch.Tensor | None,
                             eps: float, cos: torch.Tensor, sin: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor, wlen: torch.Tensor,
                             wc: int, cap: int, scale: float, hq: int, hkv: int, gated: bool) -> torch.Tensor:
    """The twin. qkv [C, W, Hq * D (x2 gated: per head [q | gate]) + 2 Hkv * D]; gain_q / gain_k [D] fp32 (None: no
    q/k norm); cos / sin [C, W, R]; key / value [C, Hkv, S, D] (the clean tokens' k/v written at ``length + i``,
    capped at S - 1); lengths, counts, wlen [C] -> o [C, W, Hq * D] (times sigmoid(gate) when ``gated``)."""
    C, W, _ = qkv.shape
    d = key.shape[-1]
    q, gate, k, v = split_heads(qkv, hq, hkv, d, gated)
    q = apply_rope(_norm(q, gain_q, eps).transpose(1, 2), cos, sin)
    k = apply_rope(_norm(k, gain_k, eps).transpose(1, 2), cos, sin)
    v = v.transpose(1, 2)
    if wc:
        write_clean_slots(key, value, k, v, lengths, wc)
    out = decode_attention_reference(q, key, value, k[:, :, wc:], v[:, :, wc:], lengths, counts, wlen, wc, cap,
                                     scale)
    out = out.transpose(1, 2).reshape(C, W, -1)
    if gated:
        out = out * torch.sigmoid(gate.reshape(C, W, -1))
    return out


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _heads(row, gain, cos, sin, eps, H, D, R: tl.constexpr, HEAD_STRIDE, BH: tl.constexpr,
               BD: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr, OUT_TY: tl.constexpr):
        """[BH, BD] of one token's heads (head h at row + h * HEAD_STRIDE), normed (NORM) and rotated (ROPE) as the
        twin rounds them, in fp32 holding OUT_TY values."""
        rh = tl.arange(0, BH)
        rd = tl.arange(0, BD)
        ok = (rh < H)[:, None] & (rd < D)[None, :]
        x = tl.load(row + rh[:, None] * HEAD_STRIDE + rd[None, :], mask=ok, other=0.0).to(tl.float32)
        if ROPE:
            HALF: tl.constexpr = R // 2
            rot = rd < R
            partner = tl.where(rd < HALF, rd + HALF, rd - HALF)
            xp = tl.load(row + rh[:, None] * HEAD_STRIDE + partner[None, :], mask=ok & rot[None, :],
                         other=0.0).to(tl.float32)
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
            g = tl.load(gain + rd, mask=rd < D, other=0.0)
            x = (x * rstd[:, None] * g[None, :]).to(OUT_TY).to(tl.float32)
            if ROPE:
                gp = tl.load(gain + partner, mask=rot, other=0.0)
                xp = (xp * rstd[:, None] * gp[None, :]).to(OUT_TY).to(tl.float32)
        else:
            x = x.to(OUT_TY).to(tl.float32)
            if ROPE:
                xp = xp.to(OUT_TY).to(tl.float32)
        if ROPE:
            cs = tl.load(cos + rd, mask=rot, other=0.0).to(tl.float32)
            sn = tl.load(sin + rd, mask=rot, other=0.0).to(tl.float32)
            sign = tl.where(rd < HALF, -1.0, 1.0)
            a = (x * cs[None, :]).to(OUT_TY).to(tl.float32)
            b = ((xp * sign[None, :]).to(OUT_TY).to(tl.float32) * sn[None, :]).to(OUT_TY).to(tl.float32)
            x = tl.where(rot[None, :], (a + b).to(OUT_TY).to(tl.float32), x)
        return x, rh, rd, ok

    globals().update(_heads=_heads)

    @triton.jit
    def attention_prologue_kernel(qkv, s_xc, s_xt, gain_q, gain_k, cos, sin, s_rc, s_rt, key, value,
                                  s_kc, s_kh, s_ks, s_vc, s_vh, s_vs, q_out, k_win, v_win, lengths,
                                  W, wc, ww, S, eps, HQ, HKV, D, R: tl.constexpr,
                                  BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr, GATED: tl.constexpr,
                                  NORM: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # programmatic dependent launch (gemv.use_pdl): q|k|v comes from the previous kernel
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        c = pid // W
        t = pid % W
        row = qkv + c.to(tl.int64) * s_xc + t * s_xt
        cs = cos + c.to(tl.int64) * s_rc + t * s_rt
        sn = sin + c.to(tl.int64) * s_rc + t * s_rt
        OUT_TY: tl.constexpr = q_out.dtype.element_ty
        q_stride = 2 * D if GATED else D
        q, rh, rd, ok = _heads(row, gain_q, cs, sn, eps, HQ, D, R, q_stride, BHQ, BD, NORM, ROPE, OUT_TY)
        tl.store(q_out + ((c.to(tl.int64) * HQ + rh[:, None]) * W + t) * D + rd[None, :], q.to(OUT_TY), mask=ok)
        k_row = row + HQ * q_stride
        k, rh, rd, ok = _heads(k_row, gain_k, cs, sn, eps, HKV, D, R, D, BHK, BD, NORM, ROPE, OUT_TY)
        v = tl.load(k_row + HKV * D + rh[:, None] * D + rd[None, :], mask=ok, other=0.0)
        # a clean token's slot of the cache, capped at the capacity as the step's torch code caps it; tokens capped
        # to the last slot share it: only the last clean token writes it (as the twin's in-order writes leave it),
        # so programs do not race for it
        slot = tl.minimum(tl.load(lengths + c).to(tl.int32) + t, S - 1)
        if (t < wc) & ((slot < S - 1) | (t == wc - 1)):
            tl.store(key + c.to(tl.int64) * s_kc + rh[:, None] * s_kh + slot * s_ks + rd[None, :],
                     k.to(key.dtype.element_ty), mask=ok)
            tl.store(value + c.to(tl.int64) * s_vc + rh[:, None] * s_vh + slot * s_vs + rd[None, :],
                     v.to(value.dtype.element_ty), mask=ok)
        if t >= wc:  # a window token: the window's keys [C, Hkv, Ww, D]
            w_off = ((c.to(tl.int64) * HKV + rh[:, None]) * ww + (t - wc)) * D + rd[None, :]
            tl.store(k_win + w_off, k.to(OUT_TY), mask=ok)
            tl.store(v_win + w_off, v.to(OUT_TY), mask=ok)

    return attention_prologue_kernel


def prologue(qkv, gain_q, gain_k, eps, cos, sin, key, value, lengths, wc: int, hq: int, hkv: int, gated: bool,
             programs: int | None = None):
    """The prologue kernel -> (q [C, Hq, W, D], k_win, v_win [C, Hkv, Ww, D]); writes the clean tokens' k/v into
    ``key`` / ``value``. One program per (row, token), row-major; ``programs``: launch only the first ones (tests:
    what a program writes when the GPU runs it last; None: all C x W)."""
    import triton

    C, W, _ = qkv.shape
    d = key.shape[-1]
    ww = W - wc
    rot = cos.shape[-1]
    q = qkv.new_empty(C, hq, W, d)
    k_win, v_win = qkv.new_empty(C, hkv, ww, d), qkv.new_empty(C, hkv, ww, d)
    if NAN_FILL:
        for t in (q, k_win, v_win):
            t.fill_(float("nan"))
    from flarectl.engine.gemv import use_pdl

    pdl = use_pdl(qkv.device)
    norm = gain_q is not None
    g_q = gain_q if norm else cos  # any valid pointer: never read without NORM
    g_k = gain_k if norm else cos
    kw = k_win if ww else q
    vw = v_win if ww else q
    _kernel()[(C * W if programs is None else programs,)](
        qkv, qkv.stride(0), qkv.stride(1), g_q, g_k, cos, sin, cos.stride(0), cos.stride(1), key, value,
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        q, kw, vw, lengths, W, wc, ww, key.shape[2], float(eps), hq, hkv, d, R=rot,
        BHQ=triton.next_power_of_2(hq), BHK=triton.next_power_of_2(hkv), BD=triton.next_power_of_2(d),
        GATED=gated, NORM=norm, ROPE=rot > 0, PDL=int(pdl), num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return q, k_win, v_win


def applies(qkv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, gain_q, gain_k,
            hq: int) -> bool:
    """CUDA (or Triton's interpreter); q|k|v, cache and rotary tables of one float dtype, D contiguous everywhere;
    whole GQA groups; both norms known (``norm_gemv.norm_gain``) or neither; an even rotary width no wider than D."""
    from flarectl.engine.gemv import _interpreting

    d, hkv = key.shape[-1], key.shape[1]
    rot = cos.shape[-1]
    return ((qkv.is_cuda or _interpreting()) and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and key.dtype == qkv.dtype and value.dtype == qkv.dtype and cos.dtype == qkv.dtype
            and qkv.stride(-1) == 1 and cos.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
            and hq % hkv == 0 and rot % 2 == 0 and rot <= d and (gain_q is None) == (gain_k is None)
            and qkv.device == key.device)


@torch.library.custom_op("flarectl::attention_core", mutates_args=("key", "value"))
def attention_core(qkv: torch.Tensor, gain_q: torch.Tensor | None, gain_k: torch.Tensor | None, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   lengths: torch.Tensor, counts: torch.Tensor, wlen: torch.Tensor, wc: int, cap: int, scale: float,
                   hq: int, hkv: int, gated: bool) -> torch.Tensor:
    """``attention_core_reference`` in two launches (module docstring) where ``applies``, else the twin."""
    if not applies(qkv, key, value, cos, gain_q, gain_k, hq):
        return attention_core_reference(qkv, gain_q, gain_k, eps, cos, sin, key, value, lengths, counts, wlen, wc,
                                        cap, scale, hq, hkv, gated)
    from flarectl.engine import attention

    C, W, _ = qkv.shape
    d = key.shape[-1]
    q, k_win, v_win = prologue(qkv, gain_q, gain_k, eps, cos, sin, key, value, lengths, wc, hq, hkv, gated)
    out = qkv.new_empty(C, W, hq, d)  # the output projection's layout
    gate = split_heads(qkv, hq, hkv, d, gated)[1]
    attention.launch(q, key, value, k_win, v_win, lengths, counts, wlen, wc, cap, scale,
                     gate=None if gate is None else gate.permute(0, 2, 1, 3), out=out.permute(0, 2, 1, 3))
    return out.view(C, W, hq * d)


@attention_core.register_fake
def _(qkv, gain_q, gain_k, eps, cos, sin, key, value, lengths, counts, wlen, wc, cap, scale, hq, hkv, gated):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], hq * key.shape[-1])
