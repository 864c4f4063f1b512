"""The engine's static-shape model step over a slot cache (a ``HybridCache`` of C rows updated in place).

One step feeds every slot ``ids [C, Wc + Ww]``: a clean section of width Wc (the first ``counts[c]`` tokens are
real, the rest padding) followed by a noisy window of width Ww (the first ``wlen[c]`` real). Slot c's clean tokens
sit at positions ``L + i`` (L = ``cache.lengths[c]``), its window at ``L + seen[c] + j`` and sees the committed
prefix plus the step's first ``seen[c]`` clean tokens (window_start = L + seen[c]) and its own real window tokens
(block-bidirectional). ``seen`` defaults to ``counts`` (the window after the clean tokens); ``counts - 1`` anchors
the window on the last clean token (AR-Trust's anchored scheme, ``modes``). Rows with ``commit[c]`` commit their clean tokens in the same step; the others leave the
cache as it was (their clean keys/values are written at positions past the committed length, where nobody sees
them). This is exactly the visibility of ``StreamLayout`` and the rules of ``gdn._pending`` — the adapter path
(``FlareModel.forward`` with a ``HybridCache``) is the reference twin the tests compare against.

No host sync, no data-dependent shape: attention runs over the whole capacity with a length mask (SDPA), keys and
values are scattered at each slot's length, the Gated DeltaNet layers run a W-token recurrence (padding tokens
are identity updates: decay 1, beta 0) and the convolution state is gathered at ``counts``. So on CUDA each
(C, Wc, Ww) shape is captured once as a CUDA graph and replayed.

The step is cut into pure functions — a prologue (positions, embedding, RoPE, mask), one block per decoder layer
(``gdn_block`` / ``attention_block``: norm, mixer, residual, MLP, cache update; each returns ``(hidden, pending,
ready)``, ``pending`` being a residual add left to the next block, which fuses it into its own norm, and ``ready``
the next block's input projection where ``layer_chain`` made it) and the head — so that with
``compile=True`` (the default on CUDA) each is ``torch.compile``d (inductor, ``dynamic=False``; the same code
serves every layer of a kind) and the CUDA graph captures the fused kernels: eager, a decoder layer is ~90 small
kernels, which made the step cost ~4x the weight-bandwidth roofline (docs/perf/engine.md). The GDN recurrence is
one opaque op (``gdn_ops.py``: ``flarectl::gdn_recurrence_commit`` / ``_from``: on CUDA the engine's own Triton kernel
(``recurrence.py``), q/k L2 norm and scale inside it, each row's final state stored straight into the cache when the
row commits and into the step's kept-state buffer when not; fla's kernel plus a commit pass on request; a torch loop
elsewhere), or with the fused input projection the whole GDN mixer is (``flarectl::gdn_mixer``, ``mixer.py``).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from flarectl.engine.gemv import (fused_applies, linear, module_linear, plain_weight, resolve_fuse_down, resolve_gemv,
                                  skinny_linear_fused, use_pdl)
from flarectl.engine.gemv import tune_mode as gemv_tune_mode
from flarectl.engine import l2_next, layer_chain, mixer, norm_gemv
from flarectl.engine.attention import attention_mask, decode_attention, write_clean_slots
from flarectl.engine.attention_core import attention_core
from flarectl.engine.attention_core import resolve as resolve_attn_core
from flarectl.engine.attention import resolve as resolve_attn
from flarectl.engine.envs import env_int
from flarectl.engine.layer_chain import failures as layer_chain_failures, resolve as layer_chain_resolve
from flarectl.engine.prefetch import l2_prefetch
from flarectl.engine.row_copy import copy_rows
from flarectl.models.adapter import ATTENTION
from flarectl.models.attention import _project, apply_rope
from flarectl.models.cache import HybridCache
from flarectl.engine.gdn_ops import conv_recurrence, gdn_mixer, mixer_applies, resolve_gdn_kernel
from flarectl.models.gdn import _gates, _split_heads


def resolve_compile(compile: bool | None, device: torch.device) -> bool:
    """None -> on for CUDA (env ``FLARECTL_ENGINE_COMPILE=0`` turns it off), off elsewhere (CPU stays eager)."""
    if compile is None:
        env = os.environ.get("FLARECTL_ENGINE_COMPILE")
        if env is not None:
            return env.strip().lower() not in ("0", "false", "no", "off", "")
        return device.type == "cuda"
    return bool(compile)


# -- the step's pieces (pure functions of modules and tensors: compiled as they are) --------------------------------

def _plain_linears(linears) -> bool:
    return all(type(lin) is torch.nn.Linear and lin.bias is None and type(lin.weight.data) is torch.Tensor
               for lin in linears)


def fuse_weights(linears) -> torch.Tensor | None:
    """One [sum(out), in] copy of the weights of bias-free linears that read the same input (one GEMM instead of
    several: fewer kernels per layer), or None where that does not apply."""
    if not _plain_linears(linears):
        return None
    return torch.cat([lin.weight.detach() for lin in linears], 0)


def _pf(x, pf, j: int) -> None:
    """Before a layer's GEMM ``j`` (``x`` its input): fork the L2 prefetches planned there onto the side stream
    (``pf = (per GEMM a tuple of (view, method, grid), token)``, see ``StaticStep._plan_prefetch``): the next GEMM's
    weight (``prefetch_mb``) and/or a GDN layer's recurrent state (``prefetch_state``). A hint: no value changes.
    (Forking after GEMM j instead, with its output as the dependency, was measured too — session 6, run 5 — but
    that changes inductor's fusion around the GEMM outputs and so the bf16 rounding of the logits: not offered.)"""
    if pf is not None:
        plan, token = pf
        for view, method, grid in plan[j]:
            l2_prefetch(x, view, token, method, grid)


def _l2_next(w_out, w_gate_up) -> tuple:
    """The weights the mixer kernel may pull into L2 for the GEMMs after it (``mixer.L2_NEXT_KB``): out_proj's
    (``w_out``, its plain weight) and gate|up's (fused) when both are given and contiguous, else none."""
    if mixer.L2_NEXT_KB and w_out is not None and w_gate_up is not None and w_out.is_contiguous() \
            and w_gate_up.is_contiguous():
        return w_out, w_gate_up
    return None, None


def silu_mlp(mlp) -> bool:
    """A gated MLP with SiLU (HF's ``SiLUActivation`` / ``nn.SiLU``): its down projection may take the activation
    in its prologue (``gemv.skinny_linear_fused``)."""
    return type(getattr(mlp, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU")


def _mlp(mlp, x, w_gate_up, gemv: bool = False, w_down=None, pf=None, residual=None, fuse_down: bool = False):
    """``residual + mlp(x)`` (``residual`` None: ``mlp(x)``). ``fuse_down``: silu(gate) * up, the down projection
    and the residual add in one kernel (``gemv.skinny_linear_fused``) where it applies."""
    if w_gate_up is None:
        out = mlp(x)
        return out if residual is None else residual + out
    _pf(x, pf, 2)
    gate_up = linear(x, w_gate_up, gemv)
    if fuse_down and residual is not None and fused_applies(gate_up, w_down, swiglu=True):
        _pf(gate_up, pf, 3)
        flat = residual.reshape(-1, residual.shape[-1])
        return skinny_linear_fused(gate_up.reshape(-1, gate_up.shape[-1]), w_down, flat, True).view_as(residual)
    gate, up = gate_up.chunk(2, -1)
    h = mlp.act_fn(gate) * up
    _pf(h, pf, 3)
    out = module_linear(h, mlp.down_proj, w_down, gemv)
    return out if residual is None else residual + out


def _open(norm, hidden, pending, w, eps, gemv: bool, ready=None):
    """A sub-block's opening: ``h = hidden + pending`` (``pending`` None: nothing to add) and the input of its
    projection -> (x, projection or None, h). ``ready``: the projection, already made by the previous block's
    ``layer_chain`` (x None). ``eps`` given (``w`` has the norm's gain folded in): the add, the norm and the
    projection ``w`` in one kernel (``norm_gemv.project``), x None; else x = norm(h), the projection None."""
    if ready is not None:
        return None, ready, hidden
    if eps is not None:
        y, h = norm_gemv.project(hidden, pending, w, eps, False, gemv)
        return None, y, h
    h = hidden if pending is None else hidden + pending
    return norm(h), None, h


def _mlp_tail(layer, hidden, o, w_gate_up, gemv: bool, w_down, pf, fuse_down: bool, eps_mlp):
    """The residual add of a mixer's output ``o`` and the MLP sub-block -> (hidden, pending). ``eps_mlp`` given
    (``w_gate_up`` gain-folded and interleaved, ``norm_gemv``): hidden + o, the post-attention norm, gate|up and
    silu(gate) * up in one kernel, and the down projection's output is returned as ``pending`` (its residual add
    rides in the next block's opening); else as ``_mlp`` (pending None)."""
    if eps_mlp is not None:
        _pf(o, pf, 2)
        act, hidden = norm_gemv.project(o, hidden, w_gate_up, eps_mlp, True, gemv)
        _pf(act, pf, 3)
        return hidden, module_linear(act, layer.mlp.down_proj, w_down, gemv)
    hidden = hidden + o
    return _mlp(layer.mlp, layer.post_attention_layernorm(hidden), w_gate_up, gemv, w_down, pf, hidden,
                fuse_down), None


def _close(layer, hidden, o, out_module, w_out, w_gate_up, gemv: bool, w_down, pf, fuse_down: bool, eps_mlp,
           chain):
    """A block's closing after its mixer's output ``o`` [C, W, KV]: out_proj, the residual add and the MLP
    sub-block -> (hidden, pending, ready). ``chain`` (w_next or None, eps_next): where ``layer_chain.applies``,
    all of it and the next block's norm + input projection in one launch (``layer_chain``): pending None, ``ready``
    the next block's projection (None without w_next); else ``_mlp_tail`` after out_proj (ready None)."""
    if chain is not None and eps_mlp is not None:
        w_next, eps_next = chain
        o2, h = o.reshape(-1, o.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        if layer_chain.applies(o2, h, w_out, w_gate_up, w_down, w_next):
            h, proj = layer_chain.layer_chain(o2, h, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next)
            lead = hidden.shape[:-1]
            return h.view_as(hidden), None, (proj.view(*lead, proj.shape[-1]) if w_next is not None else None)
    hidden, pending = _mlp_tail(layer, hidden, module_linear(o, out_module, w_out, gemv), w_gate_up, gemv, w_down,
                                pf, fuse_down, eps_mlp)
    return hidden, pending, None


def gdn_block(layer, hidden, state, conv, last_state, last_conv, counts, commit, wc: int, kernel: str,
              w_in=None, w_gate_up=None, gemv: bool = False, w_out=None, w_down=None, pf=None,
              fuse_down: bool = False, pending=None, eps_in=None, eps_mlp=None, seen=None, chain=None,
              ready=None):
    """One Gated DeltaNet decoder layer of the step: hidden [C, W, hidden] -> [C, W, hidden]. Writes the state and
    conv context after each row's clean tokens into ``last_state`` / ``last_conv`` and into the cache
    (``state`` / ``conv``) for rows with ``commit``. ``w_in`` / ``w_gate_up``: fused copies of the input
    projections [qkv | z | b | a] and of the MLP's [gate | up] (``fuse_weights``), or None. ``gemv``: skinny
    projections (M <= ``gemv.MAX_ROWS`` rows) through ``gemv.skinny_linear``: the fused ones, and ``w_out`` / ``w_down`` (the
    plain weights of out_proj / down_proj, ``gemv.plain_weight``) when given. ``pf``: L2 prefetch of the next
    GEMM's weight before each of the layer's four GEMMs (``_pf``), or None. ``fuse_down``: the MLP's activation,
    down projection and residual add as one kernel (``_mlp``). ``pending``: the previous block's residual add, or
    None; ``eps_in`` / ``eps_mlp``: the norms' eps when their gains are folded into ``w_in`` / ``w_gate_up``
    (``_open``, ``_mlp_tail``). ``seen`` [C]: the clean tokens each row's window sees (None: ``counts``).
    ``chain`` / ``ready``: this block's closing in one launch with the next block's input projection (``_close``),
    and this block's own input projection made so by the previous one. Returns (hidden, pending, ready)."""
    module = layer.linear_attn
    _pf(hidden, pf, 0)
    x, proj, hidden = _open(layer.input_layernorm, hidden, pending, w_in, eps_in, gemv, ready)
    if kernel == "mixer" and mixer_applies(module, w_in):  # the whole mixer as one op (one Triton kernel on CUDA)
        proj = linear(x, w_in, gemv) if proj is None else proj
        normed = gdn_mixer(proj, module.conv1d.weight.squeeze(1), module.conv1d.bias, module.A_log, module.dt_bias,
                           module.norm.weight, state, conv, last_state, last_conv, counts, commit, wc,
                           module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim,
                           float(module.norm.variance_epsilon), seen, *_l2_next(w_out, w_gate_up))
        _pf(normed, pf, 1)
        return _close(layer, hidden, normed, module.out_proj, w_out, w_gate_up, gemv, w_down, pf, fuse_down,
                      eps_mlp, chain)
    if kernel == "mixer":
        kernel = "triton" if hidden.device.type == "cuda" else "torch"
    dt = torch.promote_types(hidden.dtype, torch.float32)
    if w_in is None:
        mixed, z = module.in_proj_qkv(x), module.in_proj_z(x)
        g, beta = _gates(module, x)
    else:
        nv = module.num_v_heads
        mixed, z, b, a = (linear(x, w_in, gemv) if proj is None else proj).split(
            [w_in.shape[0] - module.value_dim - 2 * nv, module.value_dim, nv, nv], -1)
        beta = b.sigmoid()
        g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)  # as gdn._gates
    g, beta = g.to(dt), beta.to(dt)
    core = conv_recurrence(mixed, g, beta, module.conv1d.weight.squeeze(1), module.conv1d.bias,
                           lambda y: _split_heads(module, y), state, conv, last_state, last_conv, counts, commit, wc,
                           module.head_k_dim ** -0.5, kernel, seen)  # commits the committing rows' state in place
    hv = module.head_v_dim  # gated RMSNorm with z, out_proj: as gdn._output
    normed = module.norm(core.reshape(-1, hv).to(hidden.dtype), z.reshape(-1, hv)).reshape(*hidden.shape[:2], -1)
    _pf(normed, pf, 1)
    return _close(layer, hidden, normed, module.out_proj, w_out, w_gate_up, gemv, w_down, pf, fuse_down, eps_mlp,
                  chain)


def _split_qkv(module, qkv, gated: bool):
    """``attention._project`` from the output of one GEMM for q|k|v: qkv [C, W, q + k + v features]."""
    bsz, length, _ = qkv.shape
    head_dim = module.head_dim
    q, k, v = qkv.split([module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features], -1)
    gate = None
    if gated:
        q, gate = torch.chunk(q.reshape(bsz, length, -1, head_dim * 2), 2, dim=-1)
        gate = gate.reshape(bsz, length, -1)
    q = q.reshape(bsz, length, -1, head_dim)
    k, v = k.reshape(bsz, length, -1, head_dim), v.reshape(bsz, length, -1, head_dim)
    if getattr(module, "q_norm", None) is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate


def attention_block(layer, hidden, key, value, lengths, cos, sin, mask, wc: int, cap: int, gated: bool,
                    w_qkv=None, w_gate_up=None, gemv: bool = False, w_out=None, w_down=None, pf=None,
                    fuse_down: bool = False, counts=None, wlen=None, attn_kernel: bool = False, pending=None,
                    eps_in=None, eps_mlp=None, chain=None, ready=None, core=None):
    """One softmax-attention decoder layer of the step (keys/values of the clean tokens written at each row's
    length; attention over the first ``cap`` slots plus the window). ``w_qkv`` / ``w_gate_up``: fused weights or
    None. ``pf``: as ``gdn_block``. ``attn_kernel``: ``attention.decode_attention`` (visibility from ``lengths``,
    ``counts``, ``wlen``; ``mask`` unused) instead of SDPA over the masked capacity. ``pending``, ``eps_in``,
    ``eps_mlp``, ``chain``, ``ready``: as ``gdn_block``. ``core`` (with ``w_qkv`` and ``attn_kernel``): (q-norm
    gain, k-norm gain, eps) or (None, None, 0.0) without q/k norms: the norms, RoPE, cache write, attention and
    gate as ``attention_core.attention_core`` (two launches). Returns (hidden, pending, ready)."""
    module = layer.self_attn
    if w_qkv is not None:
        _pf(hidden, pf, 0)
    x, qkv, hidden = _open(layer.input_layernorm, hidden, pending, w_qkv, eps_in, gemv, ready)
    bsz, width, _ = hidden.shape
    if core is not None and w_qkv is not None and attn_kernel:
        qkv = linear(x, w_qkv, gemv) if qkv is None else qkv
        d = module.head_dim
        hq, hkv = module.q_proj.out_features // (d * (2 if gated else 1)), module.k_proj.out_features // d
        out = attention_core(qkv, core[0], core[1], core[2], cos, sin, key, value, lengths, counts, wlen, wc, cap,
                             module.scaling, hq, hkv, gated)
        _pf(out, pf, 1)
        return _close(layer, hidden, out, module.o_proj, w_out, w_gate_up, gemv, w_down, pf, fuse_down, eps_mlp,
                      chain)
    q, k, v, gate = (_project(module, x, gated) if w_qkv is None
                     else _split_qkv(module, linear(x, w_qkv, gemv) if qkv is None else qkv, gated))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if wc:
        write_clean_slots(key, value, k, v, lengths, wc)
    if attn_kernel and key.dtype == q.dtype:
        out = decode_attention(q, key, value, k[:, :, wc:], v[:, :, wc:], lengths, counts, wlen, wc, cap,
                               module.scaling)
    else:
        if mask is None:
            mask = attention_mask(lengths, counts, wlen, wc, width - wc, cap)
        keys, values = key[:, :, :cap].to(k.dtype), value[:, :, :cap].to(v.dtype)
        if width > wc:
            keys, values = torch.cat([keys, k[:, :, wc:]], 2), torch.cat([values, v[:, :, wc:]], 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=module.scaling,
                                             enable_gqa=q.shape[1] != keys.shape[1])
    out = out.transpose(1, 2).reshape(bsz, width, -1)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    _pf(out, pf, 1)
    return _close(layer, hidden, out, module.o_proj, w_out, w_gate_up, gemv, w_down, pf, fuse_down, eps_mlp, chain)


def positions(lengths, counts, wc: int, width: int) -> torch.Tensor:
    cols = torch.arange(width, device=lengths.device)[None]
    return torch.where(cols >= wc, (lengths + counts)[:, None] + cols - wc, lengths[:, None] + cols)


def head(norm, lm_head, hidden, gemv: bool = False, w_head=None, pending=None):
    """The final norm of ``hidden (+ pending)`` and the LM head."""
    return module_linear(norm(hidden if pending is None else hidden + pending), lm_head, w_head, gemv)


COMPILE_MODES = (None, "max-autotune-no-cudagraphs")
"""Inductor modes for the step's pieces: default, or max-autotune without inductor's own CUDA graphs (the engine
captures the step itself) — benchmarks Triton GEMM templates against cuBLAS for the skinny decode GEMMs."""


PREFETCH_GRID = {"bulk": 8, "line": 32, "line_last": 32, "load": 64, "load_wide": 66}
"""Programs of the prefetch kernel per method (``prefetch.launch``)."""


def resolve_prefetch(mb: float | None, device: torch.device) -> float:
    """None -> env ``FLARECTL_ENGINE_PREFETCH_MB`` (MB of each next GEMM weight to prefetch; 0 off) on CUDA, else
    the default (0: off) — an explicit value is taken as it is on any device (off CUDA the prefetch does nothing)."""
    if mb is None:
        env = os.environ.get("FLARECTL_ENGINE_PREFETCH_MB")
        if env is not None and device.type == "cuda":
            return max(0.0, float(env))
        return DEFAULT_PREFETCH_MB if device.type == "cuda" else 0.0
    return max(0.0, float(mb))


DEFAULT_PREFETCH_MB = 0.0
"""Off: on the H100 no prefetch variant made the step faster (docs/perf/engine.md, session 6)."""
DEFAULT_PREFETCH_METHOD = "bulk"

DEFAULT_PREFETCH_STATE = ""
"""The GDN states' L2 prefetch (a ``prefetch.METHODS`` name; '' off). Off until timed (session 17 built it): each
mixer reads its layer's fp32 state (8.4 MB at C = 8, Qwen3.5-2B shape) from HBM after the input projection, at
~1.5 TB/s (11 us a layer, H100, session 16); pulled into L2 beside the projection, the reads would meet L2."""


def resolve_prefetch_state(method: str | None, lead: int | None, device: torch.device) -> tuple[str, int]:
    """(method, lead): None -> env ``FLARECTL_ENGINE_PREFETCH_STATE`` (a ``prefetch.METHODS`` name; '', '0' or
    'off': off) and ``FLARECTL_ENGINE_PREFETCH_STATE_LEAD`` (GEMMs ahead of the layer's input projection, 0-3) on
    CUDA, else ``DEFAULT_PREFETCH_STATE`` and 0. An explicit value is taken as it is (off CUDA it does nothing)."""
    if method is None:
        env = os.environ.get("FLARECTL_ENGINE_PREFETCH_STATE") if device.type == "cuda" else None
        method = DEFAULT_PREFETCH_STATE if env is None else env.strip().lower()
        method = "" if method in ("", "0", "off", "none", "false", "no") else method
    if lead is None:
        lead = env_int("FLARECTL_ENGINE_PREFETCH_STATE_LEAD", 0, low=0, high=3) if device.type == "cuda" else 0
    return method or "", int(lead)


def _compile(fn, mode: str | None = None, pdl: bool = False):
    """``torch.compile`` of one step piece; ``pdl``: inductor's kernels with programmatic dependent launch
    (``triton.enable_pdl``; only with the default mode: torch.compile takes a mode or options, not both)."""
    if pdl and mode is None:
        return torch.compile(fn, dynamic=False, options={"triton.enable_pdl": True})
    return torch.compile(fn, dynamic=False, mode=mode)


def _raise_recompile_limit(n: int = 256) -> None:
    """Every (C, Wc, Ww) shape is its own compiled graph of the same code: allow many (default limit is 8)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 4 * n:
            setattr(cfg, name, 4 * n)


class StaticStep:
    """``step(ids, counts, wlen, commit, width_clean)`` -> logits [C, W, V] on a fixed slot cache.
    ``compile``: torch.compile the step's pieces (None: on for CUDA, see ``resolve_compile``); ``compile_mode``: one
    of ``COMPILE_MODES`` (default None: inductor's default); ``gemv``: projections of at most ``gemv.MAX_ROWS``
    rows (C x W tokens) through the skinny Triton kernel ``gemv.skinny_linear`` (None: on for CUDA, see
    ``gemv.resolve_gemv``); ``prefetch_mb``: before each GEMM, prefetch (the first ``prefetch_mb`` MB of) the next
    GEMM's weight into L2 on a side stream (``prefetch.py``; 0 off, None: ``resolve_prefetch``; needs the fused
    projections, else off), with ``prefetch_method`` (one of ``prefetch.METHODS``). Timing only: the values are
    those of the step without it. Measured on an H100 (session 6): it does not pay, so it is off by default.
    ``fuse_down``: each MLP's silu(gate) * up, down projection and residual add as one kernel
    (``gemv.skinny_linear_fused``; None: ``gemv.resolve_fuse_down``). ``pdl``: inductor's kernels of the step with
    programmatic dependent launch (None: as the engine's own kernels, ``gemv.use_pdl``). ``attn_kernel``: attention
    layers through ``attention.decode_attention`` (each row's visible slots only; None: ``attention.resolve``).
    ``attn_core``: with the attention kernel, each attention layer's q/k norms, RoPE, cache write and output gate
    around it in two launches (``attention_core``; None: ``attention_core.resolve``, off by default, untimed).
    ``prefetch_state`` / ``prefetch_state_lead``: each GDN layer's recurrent state pulled into L2 on the side stream,
    ``lead`` GEMMs before its input projection, with that ``prefetch.METHODS`` method (None: ``resolve_prefetch_state``;
    off by default, untimed). ``fuse_norm``: each sub-block's residual add and RMSNorm inside its projection, and each MLP's activation inside
    gate|up (``norm_gemv``: the norm gains folded into the fused weight copies; None: ``norm_gemv.resolve``, on with
    ``gemv`` where ``norm_gemv.FUSE_NORM_DEFAULT``; never with ``fuse_down``, which needs gate|up un-activated)."""

    def __init__(self, model, cache: HybridCache, *, gdn_kernel: str = "auto", compile: bool | None = None,
                 fuse: bool | None = None, compile_mode: str | None = None, gemv: bool | None = None,
                 prefetch_mb: float | None = None, prefetch_method: str | None = None,
                 fuse_down: bool | None = None, pdl: bool | None = None, attn_kernel: bool | None = None,
                 fuse_norm: bool | None = None, layer_chain: bool | None = None,
                 prefetch_state: str | None = None, prefetch_state_lead: int | None = None,
                 attn_core: bool | None = None):
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}; got {compile_mode!r}")
        self.model, self.cache = model, cache
        self.compile_mode = compile_mode
        dev = cache.lengths.device
        self.kernel = resolve_gdn_kernel(gdn_kernel, dev)
        self.recurrence = self.kernel
        # Speculative commit: every step also keeps, per row that does not commit, the GDN state and conv context
        # after its whole clean section, so it can commit them afterwards (``commit_last``) once the caller knows
        # it wants to (AR-Trust after a fully accepted verify) — no recomputation, no rollback. (With the 'triton'
        # recurrence a committing row's state goes straight into the cache; its ``last_state`` is stale.)
        self.last_state = {i: torch.empty_like(c.state) for i, c in cache.gdn.items()}
        self.last_conv = {i: torch.empty_like(c.conv) for i, c in cache.gdn.items()}
        self.last_counts = torch.zeros_like(cache.lengths)
        self.last_commit = torch.zeros_like(cache.lengths, dtype=torch.bool)
        self.compiled = resolve_compile(compile, dev)
        self.gemv = resolve_gemv(gemv, dev)
        if self.gemv:
            gemv_tune_mode()  # a bad FLARECTL_GEMV_TUNE fails here (ValueError), not inside the first step
        self.pdl = use_pdl(dev) if pdl is None else bool(pdl) and use_pdl(dev, True)
        self.attn_kernel = resolve_attn(attn_kernel, dev)
        self.attn_core = resolve_attn_core(attn_core, self.attn_kernel)
        self.compile_error: str | None = None
        self.fused = self._fuse() if (self.compiled if fuse is None else fuse) else {}
        self.w_head = plain_weight(model.hf.lm_head) if self.gemv else None
        if self.gemv:  # the plain output linears' weights (no copies), for the skinny kernel
            for i, (kind, layer) in enumerate(zip(model.layer_kinds, model.layers)):
                out = layer.self_attn.o_proj if kind == ATTENTION else layer.linear_attn.out_proj
                down = getattr(layer.mlp, "down_proj", None)
                w = {"w_out": plain_weight(out), "w_down": plain_weight(down) if down is not None else None}
                self.fused[i] = self.fused.get(i, {}) | {k: v for k, v in w.items() if v is not None}
        self.fuse_down = resolve_fuse_down(fuse_down, self.gemv)
        if self.fuse_down:  # silu(gate) * up, down_proj and the residual add: one kernel (``_mlp``)
            for i, layer in enumerate(model.layers):
                f = self.fused.get(i, {})
                if "w_gate_up" in f and f.get("w_down") is not None and silu_mlp(layer.mlp):
                    f["fuse_down"] = True
        if fuse_norm and self.fuse_down:
            raise ValueError("fuse_norm and fuse_down exclude each other (fuse_down needs gate|up un-activated)")
        self.fuse_norm = norm_gemv.resolve(fuse_norm, self.gemv) and not self.fuse_down and bool(self.fused)
        if self.fuse_norm:
            self._fold_norms()
        if self.attn_core:
            self._plan_attn_core()
        self.layer_chain = layer_chain_resolve(layer_chain, self.gemv, dev) and self.fuse_norm
        if self.layer_chain:
            self._plan_chains()
        self._chain_failures = layer_chain_failures(dev) if self.layer_chain else 0
        self._plan_prefetch(resolve_prefetch(prefetch_mb, dev), prefetch_method or DEFAULT_PREFETCH_METHOD,
                            *resolve_prefetch_state(prefetch_state, prefetch_state_lead, dev))
        self.l2_next_pairs = self._register_l2_next()
        self._set_fns()
        self._shapes: set[tuple] = set()

    def _set_fns(self) -> None:
        if self.compiled:
            _raise_recompile_limit()
            mode, pdl = self.compile_mode, self.pdl
            self._gdn, self._attn = _compile(gdn_block, mode, pdl), _compile(attention_block, mode, pdl)
            self._head, self._prologue = _compile(head, mode, pdl), _compile(self.prologue, mode, pdl)
        else:
            self._gdn, self._attn, self._head, self._prologue = gdn_block, attention_block, head, self.prologue

    @torch.no_grad()
    def _fuse(self) -> dict[int, dict]:
        """Per layer: fused copies of the projections that read the same input (``fuse_weights``). A snapshot:
        build a new step (engine) after changing the model's weights."""
        out = {}
        for i, (kind, layer) in enumerate(zip(self.model.layer_kinds, self.model.layers)):
            if kind == ATTENTION:
                a = layer.self_attn
                w = {"w_qkv": fuse_weights([a.q_proj, a.k_proj, a.v_proj])}
            else:
                m = layer.linear_attn
                w = {"w_in": fuse_weights([m.in_proj_qkv, m.in_proj_z, m.in_proj_b, m.in_proj_a])}
            mlp = layer.mlp
            if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                w["w_gate_up"] = fuse_weights([mlp.gate_proj, mlp.up_proj])
            out[i] = {k: v for k, v in w.items() if v is not None}
        return out

    @torch.no_grad()
    def _plan_attn_core(self) -> None:
        """Per attention layer with a fused q|k|v weight: ``core`` = its q/k norm gains and eps for ``attention_core``
        (``attention_core.plan``); layers it does not apply to keep the step's torch code."""
        from flarectl.engine.attention_core import plan

        for i, (kind, layer) in enumerate(zip(self.model.layer_kinds, self.model.layers)):
            f = self.fused.get(i, {})
            core = plan(layer.self_attn) if kind == ATTENTION and "w_qkv" in f else None
            if core is not None:
                f["core"] = core

    @torch.no_grad()
    def _fold_norms(self) -> None:
        """Fold each layer's input norm gain into its fused input projection (``eps_in``) and the post-attention
        norm gain into its fused gate|up, rows interleaved for the activation (``eps_mlp``), where the norm is an
        RMSNorm of a known form (``norm_gemv.norm_gain``) and the MLP a SiLU-gated one. The fused copies are
        replaced, so no memory is added."""
        for i, (kind, layer) in enumerate(zip(self.model.layer_kinds, self.model.layers)):
            f = self.fused.get(i, {})
            key = "w_qkv" if kind == ATTENTION else "w_in"
            gain = norm_gemv.norm_gain(layer.input_layernorm) if key in f else None
            if gain is not None:
                f[key], f["eps_in"] = norm_gemv.fold_gain(f[key], gain[0]), gain[1]
            gain = (norm_gemv.norm_gain(layer.post_attention_layernorm)
                    if "w_gate_up" in f and silu_mlp(layer.mlp) else None)
            if gain is not None:
                f["w_gate_up"] = norm_gemv.interleave_glu(norm_gemv.fold_gain(f["w_gate_up"], gain[0]))
                f["eps_mlp"] = gain[1]

    def _plan_chains(self) -> None:
        """Per layer whose MLP takes the folded norm (``eps_mlp``): ``chain`` = (the next layer's folded input
        projection or None, its eps) for ``_close``. The next layer's input is ready only where its norm is folded."""
        n = len(self.model.layers)
        for i in range(n):
            f = self.fused.get(i, {})
            if f.get("eps_mlp") is None or f.get("w_out") is None or f.get("w_down") is None:
                continue
            nxt = self.fused.get(i + 1, {}) if i + 1 < n else {}
            key = "w_qkv" if i + 1 < n and self.model.layer_kinds[i + 1] == ATTENTION else "w_in"
            f["chain"] = (nxt[key], nxt["eps_in"]) if nxt.get("eps_in") is not None else (None, 0.0)

    def _gemm_weights(self) -> list[torch.Tensor | None]:
        """The weights the step's GEMMs read, in launch order: per layer its input projection (fused), out_proj /
        o_proj, gate|up (fused), down; the LM head last (None where a weight is not a plain tensor of the step)."""
        seq = []
        for i, (kind, layer) in enumerate(zip(self.model.layer_kinds, self.model.layers)):
            f = self.fused.get(i, {})
            out = layer.self_attn.o_proj if kind == ATTENTION else layer.linear_attn.out_proj
            seq += [f.get("w_qkv" if kind == ATTENTION else "w_in"), plain_weight(out), f.get("w_gate_up"),
                    plain_weight(getattr(layer.mlp, "down_proj", None))]
        seq.append(plain_weight(self.model.hf.lm_head))
        return seq

    def _register_l2_next(self, force: bool = False) -> int:
        """With ``l2_next.ROW_BYTES`` on CUDA (``force``: on any device, tests): register, for the projection
        kernels' L2 prefetch of the next GEMM's weight rows, out_proj -> gate|up -> down -> the next layer's input
        projection (the LM head after the last); not input projection -> out_proj (the mixer or attention runs
        between; the mixer prefetches for out_proj itself, ``mixer.L2_NEXT_KB``). With ``l2_next.STATE``: each GDN
        layer's input projection -> its recurrent state (whole). Returns the pairs registered."""
        if not force and (not (l2_next.ROW_BYTES or l2_next.STATE) or self.cache.lengths.device.type != "cuda"):
            return 0
        seq = self._gemm_weights()
        pairs = 0
        if l2_next.ROW_BYTES or force:
            for g in range(0, len(seq) - 1, 4):
                pairs += l2_next.register([seq[g + 1], seq[g + 2], seq[g + 3], seq[g + 4]])
        if l2_next.STATE or force:  # each GDN layer's input projection -> the layer's state, which its mixer reads
            for i, c in self.cache.gdn.items():
                if seq[4 * i] is not None:
                    pairs += l2_next.register_whole(seq[4 * i], c.state)
        return pairs

    def _plan_prefetch(self, mb: float, method: str, state_method: str = "", state_lead: int = 0) -> None:
        """What each GEMM forks onto the side stream before it runs (``_pf``), per layer and GEMM (input projection,
        out_proj/o_proj, gate|up, down):

        * ``mb`` > 0: (a prefix of) the next GEMM's weight, in launch order (the first layer's input projection
          while the prologue runs; the LM head after the last down projection), with ``method``. Off where a weight
          is not a plain tensor of the step.
        * ``state_method``: each GDN layer's recurrent state (all slots: [C, HV, K, V] fp32), which its mixer reads
          after the input projection, ``state_lead`` GEMMs before that projection (0: beside it; 2: beside the
          previous layer's gate|up), with that method.

        Hints only: no value changes."""
        from flarectl.engine import prefetch

        for m in (method, state_method or method):
            if m not in prefetch.METHODS:
                raise ValueError(f"prefetch method must be one of {prefetch.METHODS}; got {m!r}")
        if state_lead < 0:
            raise ValueError(f"prefetch state lead must be >= 0 GEMMs; got {state_lead}")
        self.prefetch_mb, self.prefetch_method = 0.0, method
        self.prefetch_state, self.prefetch_state_lead = "", 0
        self._pf_first, self._pf = (), {}
        layers = len(self.model.layers)
        before: list[list[tuple]] = [[] for _ in range(4 * layers)]  # before GEMM 4 * layer + j
        first: list[tuple] = []
        seq = self._gemm_weights()
        if mb > 0 and all(w is not None and w.is_contiguous() for w in seq):
            views = prefetch.plan(seq, int(mb * 2**20))
            grid = PREFETCH_GRID[method]
            first.append((views[0], method, grid))
            for g in range(4 * layers):
                before[g].append((views[g + 1], method, grid))
            self.prefetch_mb = float(mb)
        if state_method:
            grid = PREFETCH_GRID[state_method]
            for i, c in self.cache.gdn.items():
                # the state itself, not an int32 view of it: the step mutates it, and aot_autograd takes no
                # mutated input with a view of another dtype
                before[max(4 * i - state_lead, 0)].append((c.state, state_method, grid))
            self.prefetch_state, self.prefetch_state_lead = state_method, int(state_lead)
        if first or any(before):
            token = torch.zeros(1024, dtype=torch.int32, device=self.cache.lengths.device)
            self._pf_first = (tuple(first), token)
            self._pf = {i: (tuple(tuple(before[4 * i + j]) for j in range(4)), token) for i in range(layers)}

    @torch.no_grad()
    def commit_last(self, rows: torch.Tensor, copy_kernel: bool | None = None) -> None:
        """Commit the last step's clean tokens for ``rows`` [C] bool (rows that step left uncommitted): the kept GDN
        states and conv contexts into the cache (``row_copy.copy_rows``; ``copy_kernel``: its ``kernel``)."""
        rows = rows & ~self.last_commit
        gdn = self.cache.gdn
        copy_rows([c.state for c in gdn.values()], [self.last_state[i] for i in gdn], rows, copy_kernel)
        copy_rows([c.conv for c in gdn.values()], [self.last_conv[i] for i in gdn], rows, copy_kernel)
        self.cache.lengths.add_(torch.where(rows, self.last_counts, 0))

    def check(self) -> None:
        """Raise ``FlareError`` if a layer-chain barrier gave up since this step was built (``layer_chain.check``); a
        device read, so callers check once per finished request, not per step. Nothing to check without the chain."""
        if self.layer_chain:
            layer_chain.check(self.cache.lengths.device, self._chain_failures)

    def _attended_slots(self, wc: int) -> int:
        """How many cache slots attention reads: the whole capacity on CUDA (static shapes for graph capture); on
        other devices (eager) only up to the longest slot plus this step's clean tokens, rounded up to 64 — every
        slot past that is masked anyway, and reading the whole capacity made CPU decoding slow down with the
        ``max_new_tokens`` budget."""
        cache = self.cache
        if cache.lengths.device.type == "cuda":
            return cache.capacity
        used = int(cache.lengths.max()) + wc
        return min(cache.capacity, -(-max(used, 1) // 64) * 64)

    def prologue(self, ids, counts, wlen, wc: int, cap: int, need_mask: bool):
        """Embedding, RoPE and (if the model has attention layers) the attention mask of one step. ``counts``: the
        clean tokens each window sees (it places the windows; clean positions need only the lengths)."""
        model, lengths = self.model, self.cache.lengths
        width = ids.shape[1]
        hidden = model.hf.model.embed_tokens(ids)
        cos, sin = model._rope(hidden, positions(lengths, counts, wc, width))
        mask = attention_mask(lengths, counts, wlen, wc, width - wc, cap) if need_mask else None
        return hidden, cos, sin, mask

    # -- the step ---------------------------------------------------------------------------------------------
    def __call__(self, ids, counts, wlen, commit, width_clean: int, logits: bool = True,
                 seen: torch.Tensor | None = None) -> torch.Tensor:
        """ids [C, Wc+Ww] long; counts, wlen [C] long; commit [C] bool -> logits [C, Wc+Ww, V] (``logits=False``:
        the final hidden states, the LM head skipped — a prefill step). ``seen`` [C] long (None: ``counts``): the
        clean tokens each row's window sees; ``counts - 1`` anchors the window on the last clean token (the window's
        first token sits at that token's position and sees only the clean tokens before it). With
        ``mixer.ANCHOR_REUSE`` an anchored window's first token must be that clean token itself, as every plan of
        ``modes`` makes it."""
        key = (width_clean, ids.shape[1], logits, seen is None)
        if not self.compiled or key in self._shapes:
            return self._forward(ids, counts, wlen, commit, width_clean, logits, seen)
        try:  # first call of a shape compiles; a compile failure falls back to eager (and says so)
            out = self._forward(ids, counts, wlen, commit, width_clean, logits, seen)
        except Exception as exc:  # noqa: BLE001
            self.fallback_eager(f"torch.compile of the engine step failed: {type(exc).__name__}: {exc}")
            return self._forward(ids, counts, wlen, commit, width_clean, logits, seen)
        self._shapes.add(key)
        return out

    def prefill_widths(self, longest: int, chunk: int) -> list[int]:
        """Clean widths of the prefill steps for a longest context of ``longest`` tokens: fixed ``chunk``-wide steps
        when compiled (one compiled shape serves every prompt), else exact (the last step only as wide as needed)."""
        if self.compiled:
            return [chunk] * -(-longest // chunk)
        return [min(chunk, longest - start) for start in range(0, longest, chunk)]

    @torch.no_grad()
    def prefill(self, slots: list[int], contexts: list[list[int]], chunk: int = 64) -> None:
        """Empty ``slots`` and commit ``contexts`` (token lists, may be empty) into them with static steps of at
        most ``chunk`` clean tokens per slot (no LM head). Other slots take part with zero tokens, uncommitted:
        their caches are left as they were. Same cache as ``backends.prefill_into`` (the adapter path)."""
        cache = self.cache
        rows, dev = cache.batch_size, cache.lengths.device
        cache.reset_rows(torch.tensor(slots, dtype=torch.long, device=dev))
        commit = torch.zeros(rows, dtype=torch.bool)
        commit[slots] = True
        commit = commit.to(dev)
        longest = max((len(c) for c in contexts), default=0)
        start = 0
        for width in self.prefill_widths(longest, chunk):
            ids = torch.zeros(rows, width, dtype=torch.long)
            counts = torch.zeros(rows, dtype=torch.long)
            for slot, ctx in zip(slots, contexts):
                piece = ctx[start:start + width]
                ids[slot, :len(piece)] = torch.tensor(piece, dtype=torch.long)
                counts[slot] = len(piece)
            self(ids.to(dev), counts.to(dev), torch.zeros_like(counts).to(dev), commit, width, logits=False)
            start += width

    def fallback_eager(self, why: str) -> None:
        """Give up compiling (every later call runs eager); the reason stays in ``compile_error``."""
        self.compile_error = why.splitlines()[0][:300]
        warnings.warn(f"{self.compile_error}; the engine step runs eager")
        self.compiled = False
        self._set_fns()

    @torch.no_grad()  # inference only: compiled as an inference graph whatever the caller's grad mode
    def _forward(self, ids, counts, wlen, commit, wc: int, logits: bool = True, seen=None) -> torch.Tensor:
        model, cache = self.model, self.cache
        win = counts if seen is None else seen  # the clean tokens each window sees (positions, visibility)
        cap = self._attended_slots(wc)
        gated = model.family == "qwen3_5"
        if self._pf_first:  # the first layer's first GEMM weight, while the prologue runs
            first, token = self._pf_first
            for view, method, grid in first:
                l2_prefetch(ids, view, token, method, grid)
        hidden, cos, sin, mask = self._prologue(ids, win, wlen, wc, cap,
                                                ATTENTION in model.layer_kinds and not self.attn_kernel)
        pending = None  # a residual add each block leaves to the next (fused into its norm), or None
        ready = None  # the next block's input projection, made by this block's layer_chain, or None
        for i, (kind, layer) in enumerate(zip(model.layer_kinds, model.layers)):
            if kind == ATTENTION:
                kv = cache.attention[i]
                hidden, pending, ready = self._attn(layer, hidden, kv.key, kv.value, cache.lengths, cos, sin, mask,
                                                    wc, cap, gated, gemv=self.gemv, pf=self._pf.get(i), counts=win,
                                                    wlen=wlen, attn_kernel=self.attn_kernel, pending=pending,
                                                    ready=ready, **self.fused.get(i, {}))
            else:
                c = cache.gdn[i]
                hidden, pending, ready = self._gdn(layer, hidden, c.state, c.conv, self.last_state[i],
                                                   self.last_conv[i], counts, commit, wc, self.recurrence,
                                                   gemv=self.gemv, pf=self._pf.get(i), pending=pending, seen=seen,
                                                   ready=ready, **self.fused.get(i, {}))
        self.last_counts.copy_(counts)
        self.last_commit.copy_(commit)
        cache.lengths.add_(torch.where(commit, counts, 0))
        if logits:
            out = self._head(model.hf.model.norm, model.hf.lm_head, hidden, self.gemv, self.w_head, pending)
        else:
            out = hidden if pending is None else hidden + pending
        if self._pf:
            from flarectl.engine import prefetch

            prefetch.join(cache.lengths.device)  # the side stream rejoins once per step (and before capture ends)
        return out
