"""The static step's whole GDN mixer in one Triton kernel (issue 6, lever B: fewer kernels per layer).

Between the fused input projection GEMM (``proj`` = [qkv | z | b | a] per token) and the output projection GEMM, the
step used to run the conv-context gather and commit, the depthwise causal conv + SiLU, the gates, the recurrence
(``recurrence.py``) and the gated RMSNorm as several kernels per layer (inductor's fusions plus the recurrence). Here
one kernel does all of it for the step's tokens: the short causal conv over the conv state and the clean tokens
(window tokens over the conv context after the ``seen`` clean tokens their window sees), SiLU,
g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b) (padding clean tokens: decay 1, beta 0), q/k L2 norm
(eps 1e-6) and scale, the gated delta rule with the state after the clean tokens stored where it belongs (the cache
``state`` for rows that commit, ``last_state`` for the others — as ``recurrence.py``), the window continuing from
the state after its ``seen`` clean tokens (``seen`` = ``counts`` - 1 anchors the window on the last clean token:
that state goes through a scratch buffer, one store and load per step), and norm(o) * silu(z) with the RMSNormGated
weight; the conv context after the clean tokens goes to ``last_conv`` (all rows) and ``conv`` (rows that commit).

One program per (row, v-head, block of ``V_BLOCK`` state columns): it holds a [K, V_BLOCK] slice of the state, and
its v channels are its own, so it commits their conv context in place. The G = (HV/H) x (V / V_BLOCK) programs of
one (row, k-head) share the q/k channels, and the gated norm needs whole v-heads: each program stores o (rounded,
before the norm), then arrives at the group's counter (``gemv.arrival_counters``, acquire/release); the last to
arrive norms the group's heads in place and commits the q/k conv context (every other program's reads of it are
done), then resets the counter for the next launch. With G = 1 the program does all of it itself.
On steps of more than one token per row (``EARLY``) every program loads its conv context before the recurrence and
the tail issues all its loads (q/k conv context, o and z of ``NORM_TOKEN_BLOCK`` tokens) before its first store; the
AR step keeps load -> store per commit, which measured 1.1 us faster per launch there (session 20).

Same arithmetic and roundings as the torch chain (``gdn_ops.gdn_mixer_chain``, the reference twin: conv in fp32
from inputs in the projection's dtype, beta rounded to it, o rounded to it before the norm, as HF's RMSNormGated).
Launch: ``launch(...)``; op: ``gdn_ops.gdn_mixer``.
"""

from __future__ import annotations

import os

import torch

from flarectl.engine import l2_next
from flarectl.engine.envs import env_int

NAN_FILL = False
"""Tests: the output allocated NaN-filled, so unwritten elements fail."""

NUM_WARPS: int | None = env_int("FLARECTL_MIXER_WARPS", None, high=16, power_of_two=True)
"""None: 4 warps for state blocks up to 4096 elements, else 8 (env ``FLARECTL_MIXER_WARPS``, read at import)."""

V_BLOCK: int | None = 32
"""State columns (of V) per program (None: all V, one program per (row, v-head) holds its whole state). 32: on the
H100 (session 6, run 2) the Qwen3.5-2B mixer (V 128) went from 14.3 to 10.3 us per layer and the AR step at C=8
from 2.319 to 2.253 ms (CUDA-event replay): 512 programs of [128, 32] states hide their latencies, one [128, 128]
state per SM did not."""

TOKEN_BLOCK = env_int("FLARECTL_MIXER_TOKEN_BLOCK", 1, high=64, power_of_two=True)
"""Tokens per block (a power of two; env ``FLARECTL_MIXER_TOKEN_BLOCK``, read at import): each block's conv, SiLU,
q/k norms and gates are computed for all its tokens at once, their loads issued together, before the recurrence
walks through them from registers. 1 since session 20: once the group's tail loads o and z for all its tokens at once
(``NORM_TOKEN_BLOCK``) and each program's conv-context commit is loaded before the recurrence (steps of more than one
token per row), a block of one token is the fastest on the H100 (Qwen3.5-2B shape, C=8, 18 launches in a graph,
us per launch, one process): trust (8 tokens, anchored) 34.56 at 1 vs 51.69 at 2, window (4) 22.72 vs 32.33; the
kernel before the change took 37.18 at 2 (sessions 10-19's default) and 53.86 at 1 (docs/perf/engine.md, session
20). Through the CLI (session 21, one H100, 3 processes each, alternating, medians): trust step 2.674 ms against
2.702 before, window 2.303 against 2.379, AR 2.016 against 2.013 (its order is unchanged)."""

PARALLEL_READOUT = os.environ.get("FLARECTL_MIXER_READOUT", "serial").strip().lower() == "parallel"
"""How a token's output is read from the state. Serial (the default): decay the state, S^T k, update, then
o = S_new^T q — two reductions over K one after the other on every token's critical path. Parallel (opt-in, env
``FLARECTL_MIXER_READOUT=parallel``, read at import): S^T k and S^T q side by side from the state before the token,
then o = d (S^T q) + v' (k . q) with v' = beta (v - d S^T k), k . q taken for the token block at once — the same
function, one reduction on the chain, fp32 rounding different in the last bits. Measured slower on the H100
(Qwen3.5-2B shape, C=8, CLI step cost, one machine, session 12): AR 2.138 vs 2.142 ms serial, trust 2.820 vs 2.786,
window 2.485 vs 2.453: the reductions were not what bounds a token."""

NORM_TOKEN_BLOCK = 16
"""Tokens whose heads the group's last program norms at once (a [tokens, V] tile): a step of up to 16 tokens per
row in one pass, so the kernel's tail loads o and z once, with the q/k conv context, instead of once per
``TOKEN_BLOCK`` tokens and once per commit. The tail (what the last of a group's programs does after the others
arrive) cost 2.1 us of a 12.4 us AR launch and 5.1 of 37.3 at the trust step before (H100, session 20,
``scripts/gpu/engine_mixer_ablation.py``)."""

CHUNK = os.environ.get("FLARECTL_MIXER_CHUNK", "0").strip().lower() in ("1", "true", "yes", "on")
"""Steps of 2 to ``CHUNK_MAX_TOKENS`` tokens per row in chunk form (env ``FLARECTL_MIXER_CHUNK=1``, read at import;
off). The serial form walks the tokens one by one, two reductions over K per token on the chain (about 3 us a
token at the trust step on the H100). The chunk form computes the whole step from a few small fp32 products
instead: with G_t the log-decay summed along token t's path (its ancestors: the clean tokens before it; for a
window token the ``seen`` clean tokens and the window tokens before it),
u_t + beta_t sum_(i anc t) e^(G_t - G_i) (k_t . k_i) u_i = beta_t (v_t - e^(G_t) S_0^T k_t), solved as
U = (I + N^8)(I + N^4)(I + N^2)(I + N) rhs (N = -A is strictly lower triangular, so nilpotent);
o_t = e^(G_t) S_0^T q_t + sum_(i anc t or i = t) e^(G_t - G_i) (q_t . k_i) u_i; the state after the clean tokens
S = e^(G_c) S_0 + sum_(i < wc) e^(G_c - G_i) k_i u_i^T. Same arithmetic as the serial form up to fp32 rounding
order; the anchored window needs no scratch state.
The first build lost on the H100 (session 21, Qwen3.5-2B shape, C=8, us per launch, 18 in a graph): trust
(8 tokens) 51.4 against 34.5 for the serial form, window (4) 46.0 against 22.8; CLI trust step 3.306 ms against
2.661. It held q and k as [16, K] tiles and ran its products in 3 x TF32, so every warp held whole operands,
each split in two: 255 registers with spills. The present build takes q, k and the state in slices of ``KC`` = 32
channels / rows (the products over K accumulate slice by slice, the L2 norms apply after) and runs its products as
IEEE fp32 FMAs. That is 168 registers on the H100 image's Triton 3.6 (the serial form: 168 too). Untimed."""

CHUNK_MAX_TOKENS = 16
"""Most tokens per row a chunk-form step takes (its token tiles are [16, K]; more fall back to the serial form)."""

MAXNREG: int | None = env_int("FLARECTL_MIXER_MAXNREG", None, low=24, high=255)
"""Registers per thread the mixer's launches may use on CUDA (Triton's ``maxnreg``; env ``FLARECTL_MIXER_MAXNREG``,
read at import; None: ptxas chooses). With Triton 3.6 (the H100 image) the build takes 149 registers at the AR
step and 168 at a multi-token step: 3 programs of 4 warps per SM; 128 gives 4 (no spill at the AR step, 4 bytes at
a multi-token step; offline sm_90 builds, session 21). Timed in session 24 (H100): AR 2.036 ms against 2.028
without it (medians of 3 and 2 processes), so off."""

L2_NEXT_KB: int = env_int("FLARECTL_MIXER_L2_NEXT_KB", 0, low=0, high=1 << 20)
"""KB of the next GEMMs' weights each mixer launch pulls into L2 on CUDA (env ``FLARECTL_MIXER_L2_NEXT_KB``, read at
import; 0: off): the out_proj weight first, then a prefix of the MLP's gate|up weight (the op's ``l2_a`` / ``l2_b``).
The mixer moves its 16 MB of fp32 state at ~1.3 TB/s (12.4 us a layer at the AR step, H100, session 20), so the
memory has room beside it, and the out_proj GEMM after it (8 MB, 6.6 us on cuBLAS: 1.3 TB/s) pays its launch's
ramp and tail at every layer. Each program issues ``prefetch.global.L2::evict_last`` for its share of the 128-byte
lines, one line per thread and instruction: no registers held, no value changed. Timed in session 24 (H100, 16 MB
with 512 bytes of every gate|up row): AR 2.041 ms against 2.018, trust 3.044 against 2.683, so off."""

L2_AT_END = os.environ.get("FLARECTL_MIXER_L2_AT", "start").strip().lower() == "end"
"""Where a program issues its L2 prefetches (env ``FLARECTL_MIXER_L2_AT``: 'start', the default, right after its
state load; 'end': after its last store)."""

L2_ROW_BYTES: int = env_int("FLARECTL_MIXER_L2_ROW_BYTES", 0, low=0, high=1 << 20)
"""Of the gate|up weight, prefetch the first this many bytes of every row (env ``FLARECTL_MIXER_L2_ROW_BYTES``, read
at import; 0, the default: a contiguous prefix of the weight instead). A program of the gate|up GEMM streams its
rows from K = 0, so the rows' first bytes are what every program waits for first: at 512 (two K tiles of 128
bf16) that is 6 MB for the Qwen3.5-2B gate|up (12288 rows)."""

L2_LINE = l2_next.LINE
"""Bytes per prefetched line."""

ANCHOR_REUSE = os.environ.get("FLARECTL_MIXER_ANCHOR_REUSE", "0").strip().lower() in ("1", "true", "yes", "on")
"""Whether an anchored window (``seen`` = ``counts`` - 1) takes the state after the clean tokens as its state after
its first token, in the serial form (env ``FLARECTL_MIXER_ANCHOR_REUSE=1``, read at import; off). Every anchored
plan of the engine (``modes.plan``: AR-Trust's draft and verify steps, anchored Diffusion-Trust's commit step) puts the
last clean token first in its window, at the same position and seeing the same clean tokens before it: the window's
first update is the clean chain's last one, so the window goes on from where the clean tokens leave the state. That
saves one token of the serial chain (~3 us of a trust-step launch on the H100, session 20) and the start state's
round trip through ``wstart``. The same function when the window's first token is the last clean token (the twin
computes it in full; rounding differs); with any other first token the window's outputs are wrong, so it is a
contract of the step (``StaticStep``) while it is on. Built in session 25, not yet timed."""

V_BLOCK_MULTI: int | None = env_int("FLARECTL_MIXER_V_BLOCK_MULTI", None, high=1024, power_of_two=True)
"""State columns per program for steps of more than one token per row (None: ``V_BLOCK``); env
``FLARECTL_MIXER_V_BLOCK_MULTI``, read at import."""

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _conv_context(proj_row, conv_row, ch, mask, cnt, s_pt, S: tl.constexpr, BS: tl.constexpr):
        # the conv context after the clean tokens, ctx[cnt : cnt + S] of [conv state | tokens], for channels ch:
        # [BS, BC] in proj's dtype (loaded before any write of the new context: the caller puts a barrier between)
        o_s = tl.arange(0, BS)
        mb = cnt + o_s[:, None] + tl.zeros_like(ch)[None, :]
        m2 = (o_s < S)[:, None] & mask[None, :]
        xc = tl.load(conv_row + ch[None, :] * S + tl.minimum(mb, S - 1), mask=m2 & (mb < S), other=0.0)
        xp = tl.load(proj_row + tl.maximum(mb - S, 0) * s_pt + ch[None, :], mask=m2 & (mb >= S), other=0.0)
        return xc.to(proj_row.dtype.element_ty) + xp

    @triton.jit
    def _store_conv_context(conv_row, lconv_row, ch, mask, left, flag, S: tl.constexpr, BS: tl.constexpr):
        # ``_conv_context``'s tile -> last_conv (all rows), conv (committing rows)
        o_s = tl.arange(0, BS)
        m2 = (o_s < S)[:, None] & mask[None, :]
        dst = ch[None, :] * S + o_s[:, None]
        tl.store(lconv_row + dst, left.to(lconv_row.dtype.element_ty), mask=m2)
        flag2 = tl.zeros([BS, 1], dtype=tl.int32) + flag
        tl.store(conv_row + dst, left.to(conv_row.dtype.element_ty), mask=m2 & (flag2 != 0))

    @triton.jit
    def _gated_norm(o, z, nwv, eps, proj, V: tl.constexpr, ROUND_PROD: tl.constexpr):
        # HF RMSNormGated on one head: o (fp32 values already rounded to proj's dtype) normed, rounded, * weight,
        # (rounded if the product is in proj's dtype), * silu(z); fp32
        var = tl.sum(o * o) / V
        y = (o * tl.rsqrt(var + eps)).to(proj.dtype.element_ty).to(tl.float32)
        y = y * nwv
        if ROUND_PROD:
            y = y.to(proj.dtype.element_ty).to(tl.float32)
        return y * (z / (1.0 + tl.exp(-z)))

    @triton.jit
    def _conv_silu_tokens(proj_row, conv_row, cw, cb, ch, mask, tt, tok_ok, wc, cnt, s_pt,
                          S: tl.constexpr, HAS_BIAS: tl.constexpr):
        # The short causal conv + SiLU of a block of tokens for channels ch [BC]: tt [TB] token indices (``tok_ok``:
        # < W) -> [TB, BC] fp32. Clean token t's context starts at index t of [conv state | tokens]; a window token's
        # at the context after the ``cnt`` clean tokens its window sees. Inputs in proj's dtype, sums in fp32.
        mk = tok_ok[:, None] & mask[None, :]
        for p in tl.static_range(S + 1):
            i = tt - wc + p
            m = tl.where((tt >= wc) & (i < S), cnt + i, tt + p)  # [TB] context index of tap p
            mb = m[:, None] + tl.zeros_like(ch)[None, :]
            xc = tl.load(conv_row + ch[None, :] * S + tl.minimum(mb, S - 1), mask=mk & (mb < S), other=0.0)
            xp = tl.load(proj_row + tl.maximum(mb - S, 0) * s_pt + ch[None, :], mask=mk & (mb >= S), other=0.0)
            x = xc.to(proj_row.dtype.element_ty).to(tl.float32) + xp.to(tl.float32)
            w = tl.load(cw + ch * (S + 1) + p, mask=mask, other=0.0).to(tl.float32)
            if p == 0:
                acc = x * w[None, :]
            else:
                acc = acc + x * w[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(cb + ch, mask=mask, other=0.0).to(tl.float32)[None, :]
        return acc / (1.0 + tl.exp(-acc))

    @triton.jit
    def _conv_silu_rows(proj_row, conv_row, cw, cb, ch, mask, tt, tok_ok, wc, cnt, s_pt,
                        S: tl.constexpr, HAS_BIAS: tl.constexpr):
        # ``_conv_silu_tokens`` with its taps in a loop that is not unrolled: one tap's loads in flight at a time,
        # so a block of many tokens does not hold every tap's inputs in registers at once (the chunk form's 16)
        mk = tok_ok[:, None] & mask[None, :]
        acc = tl.zeros([tt.shape[0], ch.shape[0]], dtype=tl.float32)
        for p in range(S + 1):
            i = tt - wc + p
            m = tl.where((tt >= wc) & (i < S), cnt + i, tt + p)
            mb = m[:, None] + tl.zeros_like(ch)[None, :]
            xc = tl.load(conv_row + ch[None, :] * S + tl.minimum(mb, S - 1), mask=mk & (mb < S), other=0.0)
            xp = tl.load(proj_row + tl.maximum(mb - S, 0) * s_pt + ch[None, :], mask=mk & (mb >= S), other=0.0)
            x = xc.to(proj_row.dtype.element_ty).to(tl.float32) + xp.to(tl.float32)
            w = tl.load(cw + ch * (S + 1) + p, mask=mask, other=0.0).to(tl.float32)
            acc = acc + x * w[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(cb + ch, mask=mask, other=0.0).to(tl.float32)[None, :]
        return acc / (1.0 + tl.exp(-acc))

    @triton.jit
    def _token_inputs(proj_row, conv_row, cw, cb, ch_q, ch_k, ch_v, mask_k, mask_v, tt, tok_ok, wc, sn, s_pt, p_gate,
                      hv, dtb, neg_a, scale, proj, HV: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr,
                      TAP_LOOP: tl.constexpr):
        # a block of tokens' recurrence inputs: q (L2-normed, scaled), k (L2-normed), v after conv + SiLU
        # ([TB, BK], [TB, BK], [TB, BV]); beta rounded to proj's dtype, and log-decay g ([TB]); TAP_LOOP: the conv's
        # taps in a loop (``_conv_silu_rows``) rather than unrolled
        if TAP_LOOP:
            b_qs = _conv_silu_rows(proj_row, conv_row, cw, cb, ch_q, mask_k, tt, tok_ok, wc, sn, s_pt, S, HAS_BIAS)
            b_ks = _conv_silu_rows(proj_row, conv_row, cw, cb, ch_k, mask_k, tt, tok_ok, wc, sn, s_pt, S, HAS_BIAS)
            b_vs = _conv_silu_rows(proj_row, conv_row, cw, cb, ch_v, mask_v, tt, tok_ok, wc, sn, s_pt, S, HAS_BIAS)
        else:
            b_qs = _conv_silu_tokens(proj_row, conv_row, cw, cb, ch_q, mask_k, tt, tok_ok, wc, sn, s_pt, S, HAS_BIAS)
            b_ks = _conv_silu_tokens(proj_row, conv_row, cw, cb, ch_k, mask_k, tt, tok_ok, wc, sn, s_pt, S, HAS_BIAS)
            b_vs = _conv_silu_tokens(proj_row, conv_row, cw, cb, ch_v, mask_v, tt, tok_ok, wc, sn, s_pt, S, HAS_BIAS)
        b_qs = b_qs / tl.sqrt(tl.sum(b_qs * b_qs, 1) + 1e-6)[:, None] * scale
        b_ks = b_ks / tl.sqrt(tl.sum(b_ks * b_ks, 1) + 1e-6)[:, None]
        betas, gs = _token_gates(p_gate, tt, tok_ok, s_pt, hv, dtb, neg_a, proj, HV)
        return b_qs, b_ks, b_vs, betas, gs

    @triton.jit
    def _token_gates(p_gate, tt, tok_ok, s_pt, hv, dtb, neg_a, proj, HV: tl.constexpr):
        # beta = sigmoid(b) rounded to proj's dtype, and log-decay g = -exp(A_log) * softplus(a + dt_bias): [TB] each
        b_raw = tl.load(p_gate + tt * s_pt + hv, mask=tok_ok, other=0.0).to(tl.float32)
        betas = (1.0 / (1.0 + tl.exp(-b_raw))).to(proj.dtype.element_ty).to(tl.float32)
        xa = tl.load(p_gate + tt * s_pt + HV + hv, mask=tok_ok, other=0.0).to(tl.float32) + dtb
        gs = neg_a * tl.where(xa > 20.0, xa, tl.log(1.0 + tl.exp(xa)))
        return betas, gs

    @triton.jit
    def _gated_norm_rows(o, z, nwv, eps, proj, V: tl.constexpr, ROUND_PROD: tl.constexpr):
        # ``_gated_norm`` on each row of o, z [TB, BV] (one head per row)
        var = tl.sum(o * o, 1) / V
        y = (o * tl.rsqrt(var + eps)[:, None]).to(proj.dtype.element_ty).to(tl.float32)
        y = y * nwv[None, :]
        if ROUND_PROD:
            y = y.to(proj.dtype.element_ty).to(tl.float32)
        return y * (z / (1.0 + tl.exp(-z)))

    @triton.jit
    def _row(tile, sel):
        # row ``sel`` ([TB] one-hot) of a [TB, B] register tile, as [B] (exact: the other rows add zeros)
        return tl.sum(tl.where(sel[:, None], tile, 0.0), 0)

    # the helpers as module globals: a jitted function resolves the functions it calls through its globals
    globals().update(_conv_context=_conv_context, _store_conv_context=_store_conv_context,
                     _gated_norm=_gated_norm,
                     _conv_silu_tokens=_conv_silu_tokens, _conv_silu_rows=_conv_silu_rows, _token_inputs=_token_inputs,
                     _token_gates=_token_gates,
                     _gated_norm_rows=_gated_norm_rows, _row=_row, _l2_lines=l2_next.lines())

    @triton.jit
    def gdn_mixer_kernel(proj, cw, cb, A_log, dt_bias, nw, out, state, last, wstart, conv, lconv, counts, seen,
                         commit, counter, l2a, l2b, n_l2a, n_l2b, row_l2b, stride_l2b,
                         scale, eps, W, wc, s_pc, s_pt, s_oc, s_ot,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, S: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, BVF: tl.constexpr,
                         BS: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_PROD: tl.constexpr, PDL: tl.constexpr,
                         TB: tl.constexpr, TBN: tl.constexpr, EARLY: tl.constexpr, PARALLEL: tl.constexpr,
                         CHUNK: tl.constexpr, BVP: tl.constexpr, KC: tl.constexpr, L2: tl.constexpr,
                         L2_END: tl.constexpr, LINE: tl.constexpr, L2B: tl.constexpr, REUSE: tl.constexpr):
        # program (row n, k-head h, v-head r of the head's R, v-block vb of NV): G = R * NV programs share the
        # q/k channels of (n, h); the last of them to arrive (``counter``) commits their conv context and, with
        # NV > 1, applies the gated norm (it needs whole v-heads)
        pid = tl.program_id(0)
        R: tl.constexpr = HV // H
        G: tl.constexpr = R * NV
        i_nh = pid // G
        j = pid % G
        i_n, i_h = i_nh // H, i_nh % H
        hv = i_h * R + j // NV
        D: tl.constexpr = 2 * H * K + HV * V
        o_k = tl.arange(0, BK)
        o_vl = tl.arange(0, BVP)  # BVP = BV, or 16 for a chunk-form program of fewer columns (tl.dot's minimum)
        o_v = (j % NV) * BV + o_vl
        mask_k, mask_v = o_k < K, (o_vl < BV) & (o_v < V)
        mask_h = mask_k[:, None] & mask_v[None, :]
        off_h = (i_n * HV + hv).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        if not CHUNK:  # (the chunk form reads the state in KC-row slices, twice)
            h = tl.load(state + off_h, mask=mask_h, other=0.0).to(tl.float32)
        if L2 and not L2_END:  # the next GEMMs' weights into L2 while this launch runs (``L2_NEXT_KB``)
            _l2_lines(l2a, n_l2a, n_l2a, 0, 1, 0, LINE, L2B)
            _l2_lines(l2b, n_l2b, row_l2b, stride_l2b, 1, 0, LINE, L2B)
        if PDL:  # the state is no output of the previous kernel (the projection): loaded, now wait for that kernel
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        cnt = tl.load(counts + i_n).to(tl.int32)
        sn = tl.load(seen + i_n).to(tl.int32)  # clean tokens the window sees (cnt, or cnt - 1: anchored window)
        flag = tl.load(commit + i_n).to(tl.int32)
        flag_h = tl.zeros([BK, BVP], dtype=tl.int32) + flag
        c_h, nc_h = mask_h & (flag_h != 0), mask_h & (flag_h == 0)
        proj_row = proj + i_n.to(tl.int64) * s_pc
        conv_row = conv + i_n.to(tl.int64) * D * S
        lconv_row = lconv + i_n.to(tl.int64) * D * S
        ch_q = i_h * K + o_k
        ch_k = H * K + i_h * K + o_k
        nwv = tl.load(nw + o_v, mask=mask_v, other=0.0).to(tl.float32)
        ch_v = 2 * H * K + hv * V + o_v
        if EARLY:  # the conv context this program commits (its v channels), loaded now, stored at the end
            left_v = _conv_context(proj_row, conv_row, ch_v, mask_v, cnt, s_pt, S, BS)
        neg_a = -tl.exp(tl.load(A_log + hv).to(tl.float32))
        dtb = tl.load(dt_bias + hv).to(tl.float32)
        if not CHUNK:
            if wc == 0:  # no clean token: the state moves to ``last`` for the rows that do not commit
                tl.store(state + off_h, h.to(state.dtype.element_ty), mask=c_h)
                tl.store(last + off_h, h.to(last.dtype.element_ty), mask=nc_h)
        # An anchored window (sn < cnt) starts from the state after the first sn clean tokens: stored to ``wstart``
        # (this program's own slice) when it passes and loaded back after the clean tokens. Kept on chip instead,
        # a second state copy took the kernel from 126 to 233 registers (sm_90): half the programs per SM.
        anchored = (sn < cnt) & (wc < W)
        if not CHUNK and not REUSE:  # (REUSE: the window goes on from the state after the clean tokens)
            if anchored & (sn == 0):
                tl.store(wstart + off_h, h, mask=mask_h)
        # Tokens go in blocks of TB: each block's conv, SiLU, q/k norms and gates are computed for all its tokens
        # at once (its loads issued together), then the recurrence runs through them one by one from registers.
        o_t = tl.arange(0, TB)
        p_gate = proj_row + D + HV * V
        if CHUNK:  # every token at once (TB >= W): see ``CHUNK``
            CHUNK_DOT: tl.constexpr = "ieee"
            tok_ok = o_t < W
            # q, k and S_0 in slices of KC channels / state rows, so no product holds a [TB, K] operand: the
            # products over K accumulate slice by slice, the L2 norms apply after
            base_h = (i_n * HV + hv).to(tl.int64) * K * V
            o_c = tl.arange(0, KC)
            sq_q = tl.zeros([TB], dtype=tl.float32)
            sq_k = tl.zeros([TB], dtype=tl.float32)
            ks = tl.zeros([TB, BVP], dtype=tl.float32)
            qs = tl.zeros([TB, BVP], dtype=tl.float32)
            kk = tl.zeros([TB, TB], dtype=tl.float32)
            qk = tl.zeros([TB, TB], dtype=tl.float32)
            for c0 in range(0, BK, KC):
                mask_c = (c0 + o_c) < K
                h_c0 = tl.load(state + base_h + (c0 + o_c)[:, None] * V + o_v[None, :],
                               mask=mask_c[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
                q_c = _conv_silu_rows(proj_row, conv_row, cw, cb, i_h * K + c0 + o_c, mask_c, o_t, tok_ok, wc, sn,
                                      s_pt, S, HAS_BIAS)
                k_c = _conv_silu_rows(proj_row, conv_row, cw, cb, H * K + i_h * K + c0 + o_c, mask_c, o_t, tok_ok,
                                      wc, sn, s_pt, S, HAS_BIAS)
                sq_q += tl.sum(q_c * q_c, 1)
                sq_k += tl.sum(k_c * k_c, 1)
                ks += tl.dot(k_c, h_c0, input_precision=CHUNK_DOT)
                qs += tl.dot(q_c, h_c0, input_precision=CHUNK_DOT)
                kk += tl.dot(k_c, tl.trans(k_c), input_precision=CHUNK_DOT)
                qk += tl.dot(q_c, tl.trans(k_c), input_precision=CHUNK_DOT)
            r_k = 1.0 / tl.sqrt(sq_k + 1e-6)
            r_q = scale / tl.sqrt(sq_q + 1e-6)
            ks = ks * r_k[:, None]  # [TB, BVP]: S_0^T k_t
            qs = qs * r_q[:, None]
            kk = kk * r_k[:, None] * r_k[None, :]
            qk = qk * r_q[:, None] * r_k[None, :]
            b_vs = _conv_silu_rows(proj_row, conv_row, cw, cb, ch_v, mask_v, o_t, tok_ok, wc, sn, s_pt, S, HAS_BIAS)
            betas, gs = _token_gates(p_gate, o_t, tok_ok, s_pt, hv, dtb, neg_a, proj, HV)
            real = tok_ok & ((o_t >= wc) | (o_t < cnt))  # padding (clean or past W): decay 1, no write
            gs = tl.where(real, gs, 0.0)
            betas = tl.where(real, betas, 0.0)
            ti, ii = o_t[:, None], o_t[None, :]
            anc = tl.where(ti < wc, ii < ti, (ii < sn) | ((ii >= wc) & (ii < ti)))  # i on t's path, before t
            incl = anc | (ii == ti)
            g_path = tl.sum(tl.where(incl, gs[None, :], 0.0), 1)  # [TB] log-decay from S_0 to after token t
            gap = tl.where(incl, g_path[:, None] - g_path[None, :], 0.0)
            dec = tl.where(incl, tl.exp(gap), 0.0)  # e^(G_t - G_i) where i is on t's path (or t itself)
            e_g = tl.exp(g_path)
            neg = -tl.where(anc, betas[:, None] * dec * kk, 0.0)  # N = -A, strictly lower triangular
            u = betas[:, None] * (b_vs - e_g[:, None] * ks)
            for lvl in tl.static_range(4):  # u = (I + A)^-1 rhs = prod_j (I + N^(2^j)) rhs (TB = 16 = 2^4)
                u += tl.dot(neg, u, input_precision=CHUNK_DOT)
                if lvl < 3:
                    neg = tl.dot(neg, neg, input_precision=CHUNK_DOT)
            o_all = e_g[:, None] * qs + tl.dot(dec * qk, u, input_precision=CHUNK_DOT)
            # the state after the clean tokens (S_0 itself without any): cache (commit) or ``last`` (not), KC rows
            # at a time, S_0's slice and k's channels read again
            g_c = tl.sum(tl.where(o_t == wc - 1, g_path, 0.0))
            w_c = tl.where(o_t < wc, tl.exp(g_c - g_path), 0.0) * r_k
            for c0 in range(0, BK, KC):
                mask_c = (c0 + o_c) < K
                m_c = mask_c[:, None] & mask_v[None, :]
                off_c = base_h + (c0 + o_c)[:, None] * V + o_v[None, :]
                h_c0 = tl.load(state + off_c, mask=m_c, other=0.0).to(tl.float32)
                if wc > 0:
                    k_c = _conv_silu_rows(proj_row, conv_row, cw, cb, H * K + i_h * K + c0 + o_c, mask_c, o_t,
                                          tok_ok, wc, sn, s_pt, S, HAS_BIAS)
                    h_c0 = tl.exp(g_c) * h_c0 + tl.dot(tl.trans(k_c * w_c[:, None]), u, input_precision=CHUNK_DOT)
                tl.debug_barrier()  # every program thread's read of the slice before the write over it
                flag_c = tl.zeros([KC, BVP], dtype=tl.int32) + flag
                tl.store(state + off_c, h_c0.to(state.dtype.element_ty), mask=m_c & (flag_c != 0))
                tl.store(last + off_c, h_c0.to(last.dtype.element_ty), mask=m_c & (flag_c == 0))
            o_all = o_all.to(proj.dtype.element_ty).to(tl.float32)  # HF rounds o to the layer's dtype before the norm
            m_out = tok_ok[:, None] & mask_v[None, :]
            p_out = out + i_n.to(tl.int64) * s_oc + o_t[:, None] * s_ot + hv * V + o_v[None, :]
            if NV == 1:
                z_all = tl.load(proj_row + o_t[:, None] * s_pt + D + hv * V + o_v[None, :], mask=m_out, other=0.0)
                tl.store(p_out, _gated_norm_rows(o_all, z_all.to(tl.float32), nwv, eps, proj, V, ROUND_PROD)
                         .to(out.dtype.element_ty), mask=m_out)
            else:  # o as it enters the norm; the group's last program norms whole heads
                tl.store(p_out, o_all.to(out.dtype.element_ty), mask=m_out)
        if not CHUNK:  # the serial form: the tokens one by one, in blocks of TB prepared together
            for t0 in range(0, W, TB):
                tt = t0 + o_t
                tok_ok = tt < W
                b_qs, b_ks, b_vs, betas, gs = _token_inputs(proj_row, conv_row, cw, cb, ch_q, ch_k, ch_v, mask_k,
                                                            mask_v, tt, tok_ok, wc, sn, s_pt, p_gate, hv, dtb, neg_a,
                                                            scale, proj, HV, S, HAS_BIAS, False)
                real = tl.where((tt >= wc) | (tt < cnt), 1.0, 0.0)  # padding clean token: decay 1, no write
                decays = tl.exp(gs * real)
                betas = betas * real
                if PARALLEL:
                    kqs = tl.sum(b_ks * b_qs, 1)  # [TB]: k . q of every token of the block
                for i in tl.static_range(TB):
                    t = t0 + i
                    if t < W:
                        sel = o_t == i
                        b_q, b_k, b_v = _row(b_qs, sel), _row(b_ks, sel), _row(b_vs, sel)
                        d = tl.sum(tl.where(sel, decays, 0.0))
                        if REUSE and anchored & (t == wc):  # the window's first token is the last clean token:
                            o = tl.sum(h * b_q[:, None], 0)  # its update is the one the state has just had
                        elif PARALLEL:  # S^T k and S^T q side by side from the state before this token
                            hk = tl.sum(h * b_k[:, None], 0)
                            hq = tl.sum(h * b_q[:, None], 0)
                            b_v = tl.sum(tl.where(sel, betas, 0.0)) * (b_v - d * hk)
                            o = d * hq + b_v * tl.sum(tl.where(sel, kqs, 0.0))
                            h = h * d + b_k[:, None] * b_v[None, :]
                        else:
                            h *= d
                            b_v = tl.sum(tl.where(sel, betas, 0.0)) * (b_v - tl.sum(h * b_k[:, None], 0))
                            h += b_k[:, None] * b_v[None, :]
                            o = tl.sum(h * b_q[:, None], 0)
                        if not REUSE and anchored & (t == sn - 1):
                            tl.store(wstart + off_h, h, mask=mask_h)
                        if t == wc - 1:  # the state after the clean tokens: cache (commit) or ``last`` (not)
                            tl.store(state + off_h, h.to(state.dtype.element_ty), mask=c_h)
                            tl.store(last + off_h, h.to(last.dtype.element_ty), mask=nc_h)
                            if not REUSE and anchored:  # the window goes on from the state after its ``seen``
                                # clean tokens
                                tl.debug_barrier()
                                h = tl.load(wstart + off_h, mask=mask_h, other=0.0)
                        o = o.to(proj.dtype.element_ty).to(tl.float32)  # HF rounds o to the layer's dtype before the norm
                        p_o = out + i_n.to(tl.int64) * s_oc + t * s_ot + hv * V + o_v
                        if NV == 1:
                            z = tl.load(proj_row + t * s_pt + D + hv * V + o_v, mask=mask_v, other=0.0).to(tl.float32)
                            tl.store(p_o, _gated_norm(o, z, nwv, eps, proj, V, ROUND_PROD).to(out.dtype.element_ty),
                                     mask=mask_v)
                        else:  # o as it enters the norm; the group's last program norms whole heads
                            tl.store(p_o, o.to(out.dtype.element_ty), mask=mask_v)
        if not EARLY:
            left_v = _conv_context(proj_row, conv_row, ch_v, mask_v, cnt, s_pt, S, BS)
        tl.debug_barrier()  # every read of the old conv state (the token loop's) before any write of the new one
        _store_conv_context(conv_row, lconv_row, ch_v, mask_v, left_v, flag, S, BS)
        if G == 1:
            left_q = _conv_context(proj_row, conv_row, ch_q, mask_k, cnt, s_pt, S, BS)
            left_k = _conv_context(proj_row, conv_row, ch_k, mask_k, cnt, s_pt, S, BS)
            tl.debug_barrier()
            _store_conv_context(conv_row, lconv_row, ch_q, mask_k, left_q, flag, S, BS)
            _store_conv_context(conv_row, lconv_row, ch_k, mask_k, left_k, flag, S, BS)
        else:
            tl.debug_barrier()  # this program's reads of the q/k conv state and its stores of o, before arriving
            arrived = tl.atomic_add(counter + i_nh, 1, sem="acq_rel")
            if arrived == G - 1:  # every program of the group is done: finish the group
                if EARLY:  # every load of the tail before its first store: the q/k conv context, o and z
                    left_q = _conv_context(proj_row, conv_row, ch_q, mask_k, cnt, s_pt, S, BS)
                    left_k = _conv_context(proj_row, conv_row, ch_k, mask_k, cnt, s_pt, S, BS)
                if NV > 1:
                    o_f = tl.arange(0, BVF)
                    mask_f = o_f < V
                    nwf = tl.load(nw + o_f, mask=mask_f, other=0.0).to(tl.float32)
                    o_n = tl.arange(0, TBN)
                    for r in range(R):
                        hv2 = i_h * R + r
                        for t0 in range(0, W, TBN):  # a block of tokens' heads at once
                            tt = t0 + o_n
                            mk = (tt < W)[:, None] & mask_f[None, :]
                            p_o = out + i_n.to(tl.int64) * s_oc + tt[:, None] * s_ot + hv2 * V + o_f[None, :]
                            o = tl.load(p_o, mask=mk, other=0.0, cache_modifier=".cg").to(tl.float32)
                            z = tl.load(proj_row + tt[:, None] * s_pt + D + hv2 * V + o_f[None, :], mask=mk, other=0.0)
                            y = _gated_norm_rows(o, z.to(tl.float32), nwf, eps, proj, V, ROUND_PROD)
                            tl.store(p_o, y.to(out.dtype.element_ty), mask=mk)
                if EARLY:
                    tl.debug_barrier()  # this program's reads of the old q/k conv state before its writes
                    _store_conv_context(conv_row, lconv_row, ch_q, mask_k, left_q, flag, S, BS)
                    _store_conv_context(conv_row, lconv_row, ch_k, mask_k, left_k, flag, S, BS)
                else:  # one token: each commit loads, then stores (sessions 6-19's order, the AR step's fastest)
                    left_q = _conv_context(proj_row, conv_row, ch_q, mask_k, cnt, s_pt, S, BS)
                    tl.debug_barrier()
                    _store_conv_context(conv_row, lconv_row, ch_q, mask_k, left_q, flag, S, BS)
                    left_k = _conv_context(proj_row, conv_row, ch_k, mask_k, cnt, s_pt, S, BS)
                    tl.debug_barrier()
                    _store_conv_context(conv_row, lconv_row, ch_k, mask_k, left_k, flag, S, BS)
                tl.atomic_xchg(counter + i_nh, 0)  # ready for the next launch
        if L2 and L2_END:
            _l2_lines(l2a, n_l2a, n_l2a, 0, 1, 0, LINE, L2B)
            _l2_lines(l2b, n_l2b, row_l2b, stride_l2b, 1, 0, LINE, L2B)

    _KERNEL = gdn_mixer_kernel
    return _KERNEL


def launch(proj, conv_w, conv_b, A_log, dt_bias, norm_w, state, conv, last_state, last_conv, counts, commit,
           wc: int, H: int, HV: int, K: int, V: int, eps: float, v_block: int | None = None,
           seen: torch.Tensor | None = None, token_block: int | None = None,
           parallel_readout: bool | None = None, chunk: bool | None = None, l2_a: torch.Tensor | None = None,
           l2_b: torch.Tensor | None = None, l2_kb: int | None = None,
           anchor_reuse: bool | None = None) -> torch.Tensor:
    """See ``gdn_ops.gdn_mixer`` (``seen`` None: ``counts``). proj [C, W, 2HK + 2HV*V + 2HV] (last stride 1); conv / last_conv [C, D, S]
    and state / last_state [C, HV, K, V] contiguous. ``v_block``: state columns per program (None:
    ``V_BLOCK``, or all V); ``token_block``: tokens whose inputs are prepared together (None: ``TOKEN_BLOCK``);
    ``parallel_readout``: None for ``PARALLEL_READOUT``; ``anchor_reuse``: None for ``ANCHOR_REUSE`` (serial form
    only); ``chunk``: the chunk form for steps of 2 to
    ``CHUNK_MAX_TOKENS`` tokens per row (None: ``CHUNK``; other steps run the serial form either way).
    ``l2_a`` / ``l2_b``: contiguous weights of the GEMMs after the mixer, of which the first ``l2_kb`` KB (None:
    ``L2_NEXT_KB``; ``l2_a`` first) are prefetched into L2 on CUDA (a hint: never under the interpreter).
    Returns [C, W, HV*V] in proj's dtype."""
    import triton

    from flarectl.engine.gemv import arrival_counters, use_pdl

    C, W, _ = proj.shape
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    for t in (state, conv, last_state, last_conv):
        assert t.is_contiguous()
    S = conv.shape[-1]
    out = torch.empty(C, W, HV * V, device=proj.device, dtype=proj.dtype)
    use_chunk = (CHUNK if chunk is None else chunk) and 1 < W <= CHUNK_MAX_TOKENS
    reuse = (ANCHOR_REUSE if anchor_reuse is None else anchor_reuse) and not use_chunk
    # anchored windows' start states (written and read only where a row's window sees fewer than all clean tokens;
    # the chunk form and ``ANCHOR_REUSE`` need none)
    wstart = (torch.empty(state.shape, dtype=torch.float32, device=state.device)
              if seen is not None and not use_chunk and not reuse else state)
    if NAN_FILL and out.is_floating_point():
        out.fill_(float("nan"))
    bk, bvf = triton.next_power_of_2(K), triton.next_power_of_2(V)
    if use_chunk:
        bk = max(bk, 16)  # tl.dot's smallest tile; the lanes past K are masked
    bv = min(triton.next_power_of_2(v_block or (W > 1 and V_BLOCK_MULTI) or V_BLOCK or V), bvf)
    nv = -(-V // bv)
    groups = C * H
    counter = arrival_counters(proj.device, groups) if nv * (HV // H) > 1 else counts
    warps = NUM_WARPS or (4 if bk * bv <= 4096 else 8)
    round_prod = torch.promote_types(norm_w.dtype, proj.dtype) == proj.dtype
    cb = conv_b if conv_b is not None else conv_w
    pdl = use_pdl(proj.device)
    l2_lines = l2_plan(l2_a, l2_b, L2_NEXT_KB if l2_kb is None else l2_kb, proj.device, L2_ROW_BYTES)
    _kernel()[(groups * (HV // H) * nv,)](
        proj, conv_w.contiguous(), cb, A_log, dt_bias, norm_w, out, state, last_state, wstart, conv, last_conv,
        counts, counts if seen is None else seen, commit, counter, l2_a if l2_lines[0] else counts,
        l2_b if l2_lines[1] else counts, *l2_lines, K ** -0.5, eps, W, wc, proj.stride(0), proj.stride(1), out.stride(0),
        out.stride(1), H=H, HV=HV, K=K, V=V, S=S, BK=bk, BV=bv, NV=nv, BVF=bvf,
        BS=triton.next_power_of_2(max(S, 1)), HAS_BIAS=conv_b is not None, ROUND_PROD=round_prod, PDL=pdl,
        TB=16 if use_chunk else min(triton.next_power_of_2(max(W, 1)), token_block or TOKEN_BLOCK),
        TBN=min(triton.next_power_of_2(max(W, 1)), NORM_TOKEN_BLOCK), EARLY=W > 1,
        PARALLEL=PARALLEL_READOUT if parallel_readout is None else parallel_readout, CHUNK=use_chunk,
        BVP=max(bv, 16) if use_chunk else bv, KC=min(bk, 32), num_warps=warps, **({"launch_pdl": True} if pdl else {}),
        L2=l2_lines[0] + l2_lines[1] > 0, L2_END=L2_AT_END, LINE=L2_LINE, L2B=32 * warps, REUSE=reuse,
        **({"maxnreg": MAXNREG} if MAXNREG and proj.device.type == "cuda" else {}))
    return out


def l2_plan(a: torch.Tensor | None, b: torch.Tensor | None, kb: int, device: torch.device,
            row_bytes: int = 0) -> tuple[int, int, int, int]:
    """(lines of ``a``, lines of ``b``, lines per row of ``b``, ``b``'s row stride in bytes) a launch prefetches
    (``l2_lines``); (0, 0, 1, 0) off CUDA, under Triton's interpreter (no inline PTX there) or with ``kb`` 0. The
    tensors must be contiguous and on the launch's device."""
    if kb <= 0 or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 0, 0, 1, 0
    for t in (a, b):
        if t is not None and (not t.is_contiguous() or t.device != device):
            raise ValueError("the mixer's L2 prefetch takes contiguous tensors on the launch's device")
    return l2_lines(a, b, kb, row_bytes)


def l2_lines(a: torch.Tensor | None, b: torch.Tensor | None, kb: int, row_bytes: int = 0) -> tuple[int, int, int, int]:
    """The ``L2_LINE``-byte lines that cover the first ``kb`` KB of a, then of b (each whole at most): (lines of a,
    lines of b, lines per row of b, b's row stride in bytes). ``row_bytes`` > 0: of b (2-D, [N, K]) the first
    ``row_bytes`` of every row instead, rows in order while the budget lasts (what each program of a GEMM over b's
    rows reads first)."""
    left = kb * 1024
    n_a = 0
    if a is not None:
        nbytes = min(a.numel() * a.element_size(), left)
        left -= nbytes
        n_a = -(-nbytes // L2_LINE)
    if b is None or left <= 0:
        return n_a, 0, 1, 0
    if row_bytes > 0 and b.dim() == 2:
        stride = b.stride(0) * b.element_size()
        per_row = -(-min(row_bytes, stride) // L2_LINE)
        rows = min(b.shape[0], left // (per_row * L2_LINE))
        return n_a, rows * per_row, per_row, stride
    nbytes = min(b.numel() * b.element_size(), left)
    n_b = -(-nbytes // L2_LINE)
    return n_a, n_b, max(n_b, 1), 0
