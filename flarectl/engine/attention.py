"""Decode attention for the static step: one Triton kernel over each row's *visible* cache slots (issue 6).

The step's attention (``static_step.attention_block``) used to run SDPA over the whole slot capacity with a boolean
mask built for every step (cuDNN on the H100: the attention kernel, its reduction kernel and a mask conversion per
layer), reading every slot of the capacity whatever each row's length. Here the visibility rules of
``attention_mask`` are computed in the kernel from ``lengths``, ``counts`` and ``wlen``:

* clean query i of a row (its key already written at slot L + i) sees cache slots < L + i + 1;
* a window query sees cache slots < L + counts, the row's real window keys (j < wlen) when it is real itself, and
  always its own key (padding window queries attend to themselves: no empty row);
* slots are capped at ``cap`` (the attended prefix of the cache).

Split-KV (flash-decoding): program (row, kv head, block of ``TOKENS_PER_PROGRAM`` query tokens, split) holds the
G = Hq / Hkv query heads of its kv head, for each of its tokens, as the rows of one dot tile (each row with its own
visible slots) and streams its split's slots with an online softmax; each split stores (m, l, acc) in fp32, and the last split to arrive at the group's counter (``gemv.arrival_counters``) combines them in
split order (deterministic) and writes the output. Slots past a row's visible length are never read.

``decode_attention`` (op ``flarectl::decode_attention``) is the fast path; ``decode_attention_reference`` its twin
with the same signature (the mask and ``F.scaled_dot_product_attention``, as the step did).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from flarectl.engine.envs import env_int

NAN_FILL = False
"""Tests: the output NaN-filled first, so unwritten elements fail."""

SPLITS: int | None = None
"""KV splits per (row, kv head, token); None: enough for ~2 programs per SM (``default_splits``)."""

BLOCK_N = env_int("FLARECTL_ATTN_BLOCK_N", 64, low=16, high=128, power_of_two=True)
"""Cache slots per inner step (halved for rows wider than 512 bytes, e.g. fp32 at D=256). Env
``FLARECTL_ATTN_BLOCK_N`` (read at import)."""

BLOCK_N_AUTO = "FLARECTL_ATTN_BLOCK_N" not in os.environ
"""Without ``FLARECTL_ATTN_BLOCK_N``: the slots per step halve (to 32) while a split holds fewer than two blocks (the
AR step at C=8: 10.1 vs 11.7 us a launch, H100, session 11)."""

NUM_WARPS = env_int("FLARECTL_ATTN_WARPS", 4, low=1, high=16, power_of_two=True)
"""Warps per program. Env ``FLARECTL_ATTN_WARPS`` (read at import)."""

TOKENS_PER_PROGRAM = env_int("FLARECTL_ATTN_TOKENS", 0, low=0, high=64, power_of_two=True)
"""Query tokens of a row whose G query heads share one program (one pass over the row's cache slots); 0 (default):
as many as fill the smallest dot tile, 16 // G (4 at Qwen3.5-2B's 4 query heads per KV head), at most the step's
width. Env ``FLARECTL_ATTN_TOKENS`` (read at import). One token per program read each row's cache once per query
token: in the trust step (8 tokens a row) 24.7 us a launch against 13.7 us for 4 tokens at 4 splits (H100,
Qwen3.5-2B shape, C=8, 480-512 cached slots; ``scripts/gpu/engine_attention_sweep.py``, session 11)."""

DEFAULT = True
"""Whether the CUDA step uses the kernel by default (env ``FLARECTL_ENGINE_ATTN=1`` / ``0`` overrides). On since
session 6: on the H100 (Qwen3.5-2B shape, C=8, 524 slots) the 6 attention layers took 57 us against 98 us for cuDNN
SDPA with its reduction and mask kernels (run 6), the AR step 2.215 vs 2.249 ms (replay, same process), verify
2.81 vs 2.92 ms and draft 3.10 vs 3.23 ms through the CLI; the engine's CUDA tests pass with it."""


def resolve(flag: bool | None, device: torch.device) -> bool:
    """None -> ``DEFAULT`` on CUDA (env ``FLARECTL_ENGINE_ATTN`` overrides), off elsewhere; True / False as given
    (off CUDA the op runs its twin unless Triton's interpreter is on)."""
    if flag is None:
        import os

        env = os.environ.get("FLARECTL_ENGINE_ATTN")
        on = DEFAULT if env is None else env.strip().lower() not in ("0", "false", "no", "off", "")
        return on and device.type == "cuda"
    return bool(flag)


def attention_mask(lengths, counts, wlen, wc: int, ww: int, cap: int) -> torch.Tensor:
    """[C, Wc+Ww, cap+Ww] bool over the first ``cap`` slots: clean query i sees slots <= L+i; a window query
    sees slots < L+counts and the real window tokens; padding window queries see themselves (no empty row)."""
    dev = lengths.device
    slots = torch.arange(cap, device=dev)
    cols = torch.arange(wc + ww, device=dev)
    in_win = cols >= wc
    limit = torch.where(in_win[None], (lengths + counts)[:, None], lengths[:, None] + cols[None] + 1)
    cached = slots[None, None] < limit[:, :, None]  # [C, W, cap]
    if not ww:
        return cached
    j = torch.arange(ww, device=dev)
    real = j[None] < wlen[:, None]  # [C, Ww]
    win = (real[:, :, None] & real[:, None, :]) | torch.eye(ww, dtype=torch.bool, device=dev)[None]
    win = torch.cat([torch.zeros(lengths.shape[0], wc, ww, dtype=torch.bool, device=dev),
                     win.expand(lengths.shape[0], -1, -1)], 1)
    return torch.cat([cached, win], 2)


def write_clean_slots(key: torch.Tensor, value: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lengths: torch.Tensor, wc: int) -> None:
    """Write the step's clean tokens' keys / values (k, v [C, Hkv, W, D], the first ``wc`` tokens) into the cache
    (key, value [C, Hkv, S, D]) at ``length + i``, capped at the last slot. Tokens capped to the last slot all write
    the last clean token's k / v (what in-order writes leave there), so the result does not depend on the order in
    which a device applies duplicate indices."""
    last = key.shape[2] - 1
    steps = torch.arange(wc, device=k.device)
    pos = (lengths[:, None] + steps).clamp(max=last)  # [C, Wc]
    src = torch.where(pos == last, wc - 1, steps)
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    key[rows, :, pos] = k[rows, :, src].to(key.dtype)  # [C, Wc, Hkv, D] at (row, :, pos)
    value[rows, :, pos] = v[rows, :, src].to(value.dtype)


def decode_attention_reference(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_win: torch.Tensor,
                               v_win: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor,
                               wlen: torch.Tensor, wc: int, cap: int, scale: float,
                               mask: torch.Tensor | None = None) -> torch.Tensor:
    """The twin: q [C, Hq, W, D]; key / value [C, Hkv, >= cap, D] (the cache, this step's clean keys already
    written at each row's length); k_win / v_win [C, Hkv, Ww, D] (the window's keys, W = wc + Ww); lengths,
    counts, wlen [C] -> [C, Hq, W, D] in q's dtype (``mask``: ``attention_mask(...)`` if already built)."""
    ww = k_win.shape[2]
    if mask is None:
        mask = attention_mask(lengths, counts, wlen, wc, ww, cap)
    keys, values = key[:, :, :cap].to(q.dtype), value[:, :, :cap].to(q.dtype)
    if ww:
        keys, values = torch.cat([keys, k_win.to(q.dtype)], 2), torch.cat([values, v_win.to(q.dtype)], 2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's bf16 dot is wrong: exact fp32 products of the same values instead
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _update(qt, k, v, ok, m_i, l_i, acc, scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # one block of keys [BN, BD] (``ok`` [BM, BN]: which query row sees which key) into the online softmax of
        # the BM query rows
        s = _dot(qt, tl.trans(k), IEEE, UPCAST) * scale
        s = tl.where(ok, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
        return m_new, l_i, acc

    globals().update(_dot=_dot, _update=_update)

    @triton.jit
    def _finish(o_ptr, o_mask, o, gate, g_off, GATE: tl.constexpr):
        # the output rounded to its dtype; GATE: times sigmoid(gate), each rounded as eager torch rounds them
        o = o.to(o_ptr.dtype.element_ty)
        if GATE:
            gv = tl.load(gate + g_off, mask=o_mask, other=0.0).to(tl.float32)
            sg = (1.0 / (1.0 + tl.exp(-gv))).to(o_ptr.dtype.element_ty)
            o = (o.to(tl.float32) * sg.to(tl.float32)).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr, o, mask=o_mask)

    globals().update(_finish=_finish)

    @triton.jit
    def decode_attention_kernel(q, kc, vc, kw, vw, out, gate, ws_acc, ws_ml, counter, lengths, counts, wlen,
                                s_qc, s_qh, s_qt, s_kc, s_kh, s_ks, s_vc, s_vh, s_vs, s_wc, s_wh, s_wt,
                                s_uc, s_uh, s_ut, s_oc, s_oh, s_ot, s_gc, s_gh, s_gt,
                                W, wc, cap, ww, chunk, scale,
                                HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLITS: tl.constexpr,
                                TQ: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
                                GATE: tl.constexpr):
        # program (row c, kv head g, block of TQ query tokens, split sp): its tile's rows are the G query heads of
        # each of its tokens (row r: token t0 + r // G, head g * G + r % G), so the block's tokens read each cache
        # slot once
        if PDL:  # programmatic dependent launch (gemv.use_pdl): every input may come from the previous kernel
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        NT = (W + TQ - 1) // TQ
        c = pid // (HKV * NT)
        g = (pid // NT) % HKV
        t0 = (pid % NT) * TQ
        L = tl.load(lengths + c).to(tl.int32)
        cnt = tl.load(counts + c).to(tl.int32)
        wl = tl.load(wlen + c).to(tl.int32)
        rm = tl.arange(0, BM)
        rd = tl.arange(0, BD)
        t = t0 + rm // G  # [BM] each row's token
        m_ok = (rm < TQ * G) & (t < W)
        d_ok = rd < D
        head = g * G + rm % G
        limit = tl.minimum(tl.where(t >= wc, L + cnt, L + t + 1), cap)  # [BM] cache slots each row sees
        limit = tl.where(m_ok, limit, 0)
        qt = tl.load(q + c.to(tl.int64) * s_qc + head[:, None] * s_qh + t[:, None] * s_qt + rd[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, tl.max(limit, 0))
        k_row = kc + c.to(tl.int64) * s_kc + g * s_kh
        v_row = vc + c.to(tl.int64) * s_vc + g * s_vh
        for start in range(lo, hi, BN):
            rn = start + tl.arange(0, BN)
            n_ok = rn < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + rn[:, None] * s_ks + rd[None, :], mask=kv_mask, other=0.0).to(qt.dtype)
            v = tl.load(v_row + rn[:, None] * s_vs + rd[None, :], mask=kv_mask, other=0.0).to(qt.dtype)
            m_i, l_i, acc = _update(qt, k, v, rn[None, :] < limit[:, None], m_i, l_i, acc, scale, IEEE, UPCAST)
        if (t0 + TQ > wc) & (W > wc) & (sp == SPLITS - 1):  # window queries: the window's keys (the last split)
            j = tl.arange(0, BW)
            tw = t - wc  # [BM]
            ok = ((((j[None, :] < wl) & (tw[:, None] < wl)) | (j[None, :] == tw[:, None])) & (j[None, :] < ww)
                  & (t[:, None] >= wc) & m_ok[:, None])
            w_mask = (j < ww)[:, None] & d_ok[None, :]
            k = tl.load(kw + c.to(tl.int64) * s_wc + g * s_wh + j[:, None] * s_wt + rd[None, :], mask=w_mask,
                        other=0.0)
            v = tl.load(vw + c.to(tl.int64) * s_uc + g * s_uh + j[:, None] * s_ut + rd[None, :], mask=w_mask,
                        other=0.0)
            m_i, l_i, acc = _update(qt, k.to(qt.dtype), v.to(qt.dtype), ok, m_i, l_i, acc, scale, IEEE, UPCAST)
        o_ptr = out + c.to(tl.int64) * s_oc + head[:, None] * s_oh + t[:, None] * s_ot + rd[None, :]
        o_mask = m_ok[:, None] & d_ok[None, :]
        g_off = c.to(tl.int64) * s_gc + head[:, None] * s_gh + t[:, None] * s_gt + rd[None, :]
        if SPLITS == 1:
            _finish(o_ptr, o_mask, acc / l_i[:, None], gate, g_off, GATE)
        else:
            base = (pid * SPLITS + sp).to(tl.int64)
            tl.store(ws_acc + base * BM * BD + rm[:, None] * BD + rd[None, :], acc)
            tl.store(ws_ml + base * 2 * BM + rm, m_i)
            tl.store(ws_ml + base * 2 * BM + BM + rm, l_i)
            tl.debug_barrier()  # every thread's partial stored before the (release) arrival
            arrived = tl.atomic_add(counter + pid, 1, sem="acq_rel")
            if arrived == SPLITS - 1:  # the last split: combine all of them in split order
                first = (pid * SPLITS).to(tl.int64)
                m_all = tl.full([BM], -1.0e30, dtype=tl.float32)
                for s in tl.static_range(SPLITS):
                    m_s = tl.load(ws_ml + (first + s) * 2 * BM + rm, cache_modifier=".cg")
                    m_all = tl.maximum(m_all, m_s)
                l_all = tl.zeros([BM], dtype=tl.float32)
                acc = tl.zeros([BM, BD], dtype=tl.float32)
                for s in tl.static_range(SPLITS):
                    m_s = tl.load(ws_ml + (first + s) * 2 * BM + rm, cache_modifier=".cg")
                    l_s = tl.load(ws_ml + (first + s) * 2 * BM + BM + rm, cache_modifier=".cg")
                    a_s = tl.load(ws_acc + (first + s) * BM * BD + rm[:, None] * BD + rd[None, :],
                                  cache_modifier=".cg")
                    f = tl.exp(m_s - m_all)
                    l_all += l_s * f
                    acc += a_s * f[:, None]
                _finish(o_ptr, o_mask, acc / l_all[:, None], gate, g_off, GATE)
                tl.atomic_xchg(counter + pid, 0)  # ready for the next launch

    return decode_attention_kernel


def default_splits(programs: int, visible: int, device: torch.device, block_n: int | None = None) -> int:
    """KV splits: a power of two giving ~1 program per SM (the session-11 sweep's fastest setting at every step
    shape; 2 per SM before), no more than there are ``block_n`` (``BLOCK_N``) blocks to read."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, -(-sms // max(programs, 1)))
    blocks = max(1, -(-visible // (block_n or BLOCK_N)))
    split = 1
    while split * 2 <= min(want, blocks):
        split *= 2
    return split


def launch(q, key, value, k_win, v_win, lengths, counts, wlen, wc: int, cap: int, scale: float,
           splits: int | None = None, tokens_per_program: int | None = None, block_n: int | None = None,
           num_warps: int | None = None, gate: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel; arguments as ``decode_attention_reference`` (D contiguous in every tensor). ``tokens_per_program``:
    query tokens that share one pass over the cache (None: ``TOKENS_PER_PROGRAM``); ``block_n``, ``num_warps``: cache
    slots per inner step and warps per program (None: ``BLOCK_N``, ``NUM_WARPS``). ``gate`` [C, Hq, W, D] (any
    strides, D contiguous): the output times sigmoid(gate), rounded as eager torch rounds them (Qwen3.5's gated
    attention). ``out`` [C, Hq, W, D] (any strides, D contiguous, e.g. a permuted [C, W, Hq, D] buffer, so the output
    projection reads it without a copy): where the output goes (None: a new tensor like q)."""
    import triton

    from flarectl.engine.gemv import _interpreting, arrival_counters, use_pdl

    C, HQ, W, D = q.shape
    HKV = key.shape[1]
    G = HQ // HKV
    ww = k_win.shape[2]
    assert W == wc + ww and HQ % HKV == 0
    out = torch.empty_like(q) if out is None else out
    if NAN_FILL:
        out.fill_(float("nan"))
    tq = min(triton.next_power_of_2(max(W, 1)), tokens_per_program or TOKENS_PER_PROGRAM or max(1, 16 // G))
    programs = C * HKV * -(-W // tq)
    BM = max(16, triton.next_power_of_2(tq * G))
    BD = max(16, triton.next_power_of_2(D))
    wide = q.element_size() * BD > 512  # fp32 rows of 256: half the slots per step, two stages (shared memory)
    block_n = block_n or BLOCK_N
    bn = max(16, block_n // 2) if wide else block_n
    split = splits or SPLITS or default_splits(programs, cap, q.device, bn)
    per_split = -(-cap // split)
    if block_n is None and BLOCK_N_AUTO:
        while bn > 32 and per_split < 2 * bn:  # short splits (AR steps): finer blocks waste fewer slots
            bn //= 2
    chunk = -(-per_split // bn) * bn  # slots per split, whole blocks
    if split > 1:
        ws_acc = torch.empty(programs * split * BM * BD, dtype=torch.float32, device=q.device)
        ws_ml = torch.empty(programs * split * 2 * BM, dtype=torch.float32, device=q.device)
        counter = arrival_counters(q.device, programs)
    else:
        ws_acc = ws_ml = counter = out
    kw = k_win if ww else q  # any valid pointer: never read without window keys
    vw = v_win if ww else q
    f32 = q.dtype == torch.float32
    pdl = use_pdl(q.device)
    g = out if gate is None else gate  # any valid pointer: never read without GATE
    _kernel()[(programs, split)](
        q, key, value, kw, vw, out, g, ws_acc, ws_ml, counter, lengths, counts, wlen,
        q.stride(0), q.stride(1), q.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), kw.stride(0), kw.stride(1), kw.stride(2),
        vw.stride(0), vw.stride(1), vw.stride(2), out.stride(0), out.stride(1), out.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        W, wc, cap, ww, chunk, scale,
        HKV=HKV, G=G, D=D, BD=BD, BM=BM, BN=bn, BW=max(16, triton.next_power_of_2(max(ww, 1))), SPLITS=split,
        TQ=tq, IEEE=f32, UPCAST=_interpreting() and not f32, PDL=int(pdl), GATE=gate is not None,
        num_warps=num_warps or NUM_WARPS,
        **({"num_stages": 2} if wide else {}), **({"launch_pdl": True} if pdl else {}))
    return out


def kernel_applies(q: torch.Tensor, key: torch.Tensor) -> bool:
    """CUDA (or Triton's interpreter), matching float dtypes, D contiguous, whole GQA groups."""
    from flarectl.engine.gemv import _interpreting

    return ((q.is_cuda or _interpreting()) and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and key.dtype == q.dtype and q.shape[1] % key.shape[1] == 0 and q.stride(-1) == 1
            and key.stride(-1) == 1)


@torch.library.custom_op("flarectl::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_win: torch.Tensor,
                     v_win: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor, wlen: torch.Tensor,
                     wc: int, cap: int, scale: float) -> torch.Tensor:
    """Attention of the step's queries over each row's visible cache slots and window keys (see the module
    docstring): the Triton kernel where ``kernel_applies``, else the twin ``decode_attention_reference``."""
    if kernel_applies(q, key):
        return launch(q, key, value, k_win, v_win, lengths, counts, wlen, wc, cap, scale)
    return decode_attention_reference(q, key, value, k_win, v_win, lengths, counts, wlen, wc, cap, scale)


@decode_attention.register_fake
def _(q, key, value, k_win, v_win, lengths, counts, wlen, wc, cap, scale):
    return torch.empty_like(q)
