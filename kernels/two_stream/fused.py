"""Fused two-stream gated delta rule (CUDA): fla's chunked clean stream + our Triton window kernels.

Forward
    clean stream with fla's chunk internals (cumsum, WY, chunk states ``h``, outputs): the states entering every
    64-token chunk are the strided checkpoints. The noisy windows anchored in a chunk are computed together in
    chunk-parallel form (``chunk_windows``): their boundary states enter only through products with the windows'
    queries and keys (checkpoint + the chunk's UT/WY new values), and each window's delta rule is a block-diagonal
    WY solve — dense per-chunk matrix products like fla's own chunk kernels. No per-window state exists anywhere.
    Default ``_window="chunk-triton"``: the map as Triton kernels (``triton_chunk_windows``, one program per
    chunk, V block and head). Kept for comparison: ``"chunk"`` / ``"chunk-f32"`` (the same map in torch, bf16 /
    fp32 operands) and ``"loop"`` (the first design: one Triton program per window that rebuilds its state on
    chip and walks its tokens, ``triton_gdn._window_fwd_kernel``).

Backward (custom autograd.Function, recompute instead of store: only fla's saved inputs + the WY matrix ``A``)
    1. recompute w, u, h, v_new (as fla does); dv_local from fla;
    2. the noisy windows' backward: the chunk-parallel map's reverse pass recomputed on chip
       (``triton_chunk_windows_bwd``: a values kernel and a keys kernel) gives the noisy-token gradients and,
       through the boundary states, the injection into the clean chunk: d(h_c) via ``x_inj``, d(v_new) in place
       into dv_local, plus direct dk and dg terms (``"chunk"``: torch autograd of the map, one chunk group at a
       time; ``"loop"``: ``_window_bwd_kernel``, one program per (chunk, V block, head) walking its windows);
    3. ``_bwd_dhu_inj_kernel``: fla's reverse state recurrence with ``x_inj`` added at each chunk start, so the
       noisy loss reaches every earlier clean token and the initial state;
    4. fla's chunk_bwd_dqkwg (guarded, see ``hopper_guard``) and prepare_wy_repr_bwd, then our injection terms.

Hopper (Triton >= 3.4, < 3.7.1): fla refuses the gated chunk_bwd_dqkwg because of a Triton miscompile tied to a
64-wide tile (fla issue #640); fla 0.6.0 uses 128-wide tiles there. We chose a *guarded workaround* over
rewriting that kernel: once per process, before the first backward on such a device, ``hopper_guard`` runs fla's
full gated backward with the guard bypassed against the fp32 naive reference (bf16, T=256 and 320, H=2, HV=4,
K=V=128 and 64, with gates and initial state) at fla's own thresholds. If it passes, the bypass is used; if not,
dqkwg falls back to ``chunk_bwd_dqkwg_torch`` (pure torch, slower, correct). Why: the rest of the clean backward
is fla's tested code, the self-check proves the bypass on the very device and software stack, and the torch
fallback keeps training correct even where it does not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading

import torch

from ._meta import build_meta, l2norm
from . import triton_gdn as tk
from .chunk_windows import window_backward_chunked, window_forward_chunked, window_slots

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------
# fla imports (lazy: never on CPU) and the Hopper guard
# ------------------------------------------------------------------------------------------------------------

_GUARD_LOCK = threading.Lock()
_GUARD_STATE: dict[int, str] = {}  # device index -> "native" | "bypass" | "torch"


def _fla():
    from fla.ops.common import chunk_o
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local, chunk_fwd_o
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.index import prepare_chunk_indices

    return dict(
        chunk_o=chunk_o, fwd_h=chunk_gated_delta_rule_fwd_h, dqkwg=chunk_bwd_dqkwg, dv_local=chunk_bwd_dv_local,
        fwd_o=chunk_fwd_o, fwd_intra=chunk_gated_delta_rule_fwd_intra, wy_bwd=prepare_wy_repr_bwd,
        recompute_w_u=recompute_w_u_fwd, cumsum=chunk_local_cumsum, chunk_indices=prepare_chunk_indices,
    )


def _guard_active(device) -> bool:
    """True where fla's gated dqkwg guard would raise (Hopper + Triton in [3.4.0, 3.7.1))."""
    chunk_o = _fla()["chunk_o"]
    return bool(chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1)


@contextlib.contextmanager
def _bypass_dqkwg_guard():
    """Temporarily tell fla.ops.common.chunk_o that Triton is >= 3.7.1 (the only thing its guard checks)."""
    chunk_o = _fla()["chunk_o"]
    with _GUARD_LOCK:
        old = chunk_o.TRITON_ABOVE_3_7_1
        chunk_o.TRITON_ABOVE_3_7_1 = True
        try:
            yield
        finally:
            chunk_o.TRITON_ABOVE_3_7_1 = old


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def hopper_self_check(device=None, verbose=False) -> tuple[bool, dict]:
    """Run fla's gated chunk backward with the Hopper guard bypassed vs the fp32 naive twin on ``device``.

    Shapes: bf16, T in {256, 320}, H=2, HV=4, K=V in {128, 64}, gates, beta, initial state. fla's thresholds:
    o/final state 0.005, dq/dk/dv/dh0 0.008, dbeta/dg 0.02 (relative RMS error). Returns (ok, errors)."""
    device = torch.device(device or "cuda")
    # Isolated from the caller's autograd context: it may run lazily inside a gradient-checkpointed forward, whose
    # saved-tensor hooks would otherwise record the check's tensors (and then fail the recomputation's count check).
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        return _self_check(device, verbose)


def _self_check(device, verbose):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from .naive import _recurrent

    gen = torch.Generator(device="cpu").manual_seed(1234)
    errs = {}
    ok = True
    for T, D in ((256, 128), (320, 64)):
        H, HV = 2, 4
        mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
        q = mk(1, T, H, D)
        k = torch.nn.functional.normalize(mk(1, T, H, D), dim=-1)
        v = mk(1, T, HV, D)
        g = torch.nn.functional.logsigmoid(mk(1, T, HV)) * 0.5
        beta = torch.rand(1, T, HV, generator=gen)
        h0 = mk(1, HV, D, D) * 0.1
        do, dht = mk(1, T, HV, D), mk(1, HV, D, D) * 0.1
        leaves = [x.to(device, torch.bfloat16).requires_grad_() for x in (q, k, v, g, beta)]
        h0d = h0.to(device).requires_grad_()
        with _bypass_dqkwg_guard():
            o, ht = chunk_gated_delta_rule(*leaves, initial_state=h0d, output_final_state=True)
            (o.float() * do.to(device)).sum().add_((ht * dht.to(device)).sum()).backward()
        got = [x.grad for x in leaves] + [h0d.grad]
        # fp32 reference (naive twin's recurrence), on the same device
        rl = [x.detach().float().to(device).requires_grad_() for x in leaves]
        rh0 = h0.to(device).requires_grad_()
        qe = rl[0][0].repeat_interleave(HV // H, 1) * D**-0.5
        ke = rl[1][0].repeat_interleave(HV // H, 1)
        ro, st = _recurrent(qe, ke, rl[2][0], rl[3][0], rl[4][0], rh0[0])
        (ro[None] * do.to(device)).sum().add_((st[-1][None] * dht.to(device)).sum()).backward()
        ref = [x.grad for x in rl] + [rh0.grad]
        checks = {"o": (o, ro[None], 0.005), "ht": (ht, st[-1][None], 0.005)}
        for name, a, b, tol in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), got, ref,
                                   (0.008, 0.008, 0.008, 0.02, 0.02, 0.008)):
            checks[name] = (a, b, tol)
        for name, (a, b, tol) in checks.items():
            e = _rel(a, b)
            errs[f"T{T}_D{D}_{name}"] = e
            if not (e <= tol):  # NaN fails too
                ok = False
    if verbose:
        print("hopper_self_check", ok, {k_: round(v_, 5) for k_, v_ in errs.items()})
    return ok, errs


def dqkwg_mode(device) -> str:
    """How chunk_bwd_dqkwg runs on ``device``: "native" (no guard), "bypass" (self-check passed) or "torch"."""
    idx = torch.device(device).index or 0
    if idx in _GUARD_STATE:
        return _GUARD_STATE[idx]
    if not _guard_active(device):
        mode = "native"
    else:
        try:
            ok, errs = hopper_self_check(device)
        except Exception as e:  # noqa: BLE001 - any failure means: do not trust the bypass
            ok, errs = False, {"error": repr(e)}
        mode = "bypass" if ok else "torch"
        (log.info if ok else log.warning)("fla gated dqkwg on Hopper/Triton<3.7.1: self-check %s -> %s (%s)",
                                          "passed" if ok else "FAILED", mode, errs)
    _GUARD_STATE[idx] = mode
    return mode


def _dqkwg(F, meta, **kw):
    mode = dqkwg_mode(kw["q"].device)
    if mode == "torch":
        from ._torch_chunk import chunk_bwd_dqkwg_torch

        sq = lambda x: x[0]  # noqa: E731
        dq, dk, dw, dg = chunk_bwd_dqkwg_torch(
            sq(kw["q"]), sq(kw["k"]), sq(kw["v"]), sq(kw["w"]), sq(kw["g"]), kw["h"][0], sq(kw["dv"]),
            sq(kw["do"]), kw["dh"][0], kw["scale"], meta)
        return dq[None], dk[None], dw[None], dg[None]
    ctx = _bypass_dqkwg_guard() if mode == "bypass" else contextlib.nullcontext()
    with ctx:
        return F["dqkwg"](**kw)


# ------------------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------------------


def _clean_forward(F, q, k, v, g, beta, scale, h0, cu, ci, output_final_state):
    gc = F["cumsum"](g, chunk_size=64, scale=1.0 / math.log(2.0), cu_seqlens=cu, chunk_indices=ci)
    w, u, A = F["fwd_intra"](k=k, v=v, g=gc, beta=beta, cu_seqlens=cu, chunk_indices=ci, chunk_size=64)
    h, v_new, ht = F["fwd_h"](k=k, w=w, u=u, g=gc, initial_state=h0, output_final_state=output_final_state,
                              cu_seqlens=cu, chunk_indices=ci, chunk_size=64)
    o = F["fwd_o"](q=q, k=k, v=v_new, h=h, g=gc, scale=scale, cu_seqlens=cu, chunk_indices=ci, chunk_size=64)
    return gc, A, h, v_new, o, ht


def _matmul_dtype(mode, q):
    """Operand dtype of the chunk-parallel window map's large products: the inputs' half dtype (as fla's chunk
    kernels use bf16 operands with fp32 accumulation), or fp32 throughout for mode "fused-f32"."""
    if mode != "fused-f32" and q.dtype in (torch.bfloat16, torch.float16):
        return q.dtype
    return None


# _window name -> autograd mode. "chunk-triton" (default): the chunk map's forward and backward as Triton kernels
# (triton_chunk_windows*.py); H100, T=8192 fwd+bwd: 5.5-5.9 ms vs 27-32 ms for the torch map (docs/perf/kernels.md).
WINDOW_MODES = {"chunk": "fused", "chunk-f32": "fused-f32", "chunk-triton": "fused-chunk-triton",
                "loop": "fused-loop"}
CHUNK_MODES = ("fused", "fused-f32", "fused-chunk-triton")


class TwoStreamGDNFunction(torch.autograd.Function):
    """mode "fused" / "fused-f32" (chunk-parallel windows, half / fp32 matmul operands) / "fused-loop" (one
    Triton program per window): returns (o, on, ht); mode "states": returns (o, S_boundary [W,HV,K,V] f32, ht) —
    the simple baseline's materialised boundary states (its windows then run through fla's own chunk op)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, qn, kn, vn, gn, betan, h0, meta, scale, output_final_state, mode):
        F = _fla()
        cu = meta.cu_seqlens  # always fla's varlen path (batch 1): h is [1, NT, HV, K, V] in chunk order
        ci = F["chunk_indices"](cu, 64)
        gc, A, h, v_new, o, ht = _clean_forward(F, q, k, v, g, beta, scale, h0, cu, ci, output_final_state)
        fused = mode != "states"
        slots = None
        if mode in CHUNK_MODES:
            slots = window_slots(meta, qn.shape[1], qn.device)
            if mode == "fused-chunk-triton":
                from .triton_chunk_windows import chunk_windows_forward_triton

                on = chunk_windows_forward_triton(qn[0], kn[0], vn[0], gn[0], betan[0], k[0], v_new[0], gc[0], h[0],
                                                  meta, scale, slots)
            else:
                on = window_forward_chunked(qn[0], kn[0], vn[0], gn[0], betan[0], k[0], v_new[0], gc[0], h[0],
                                            meta, scale, slots=slots, matmul_dtype=_matmul_dtype(mode, q))
            s = None
        else:
            on, s = tk.window_forward(
                qn[0] if fused else None, kn[0] if fused else None, vn[0] if fused else None,
                gn[0] if fused else None, betan[0] if fused else None,
                k[0], v_new[0], gc[0], h[0], meta, scale, store_state=not fused, run_window=fused)
        ctx.save_for_backward(q, k, v, gc, beta, A, h0, qn, kn, vn, gn, betan)
        ctx.meta, ctx.scale, ctx.cu, ctx.ci, ctx.mode, ctx.slots = meta, scale, cu, ci, mode, slots
        ctx.g_dtype = g.dtype
        second = on[None] if fused else s
        return o.to(q.dtype), second, ht

    @staticmethod
    def backward(ctx, do, d_second, dht):
        F = _fla()
        q, k, v, gc, beta, A, h0, qn, kn, vn, gn, betan = ctx.saved_tensors
        meta, scale, cu, ci = ctx.meta, ctx.scale, ctx.cu, ctx.ci
        fused = ctx.mode != "states"
        do = do.contiguous()
        # Peak memory: every full-size temporary is dropped as soon as its last reader has run (u after fwd_h, the
        # injection after the dh recurrence, h / v_new / dh / w after dqkwg), and the noisy gradients are final
        # (input dtype) before the clean stream's backward allocates its own.
        w, u = F["recompute_w_u"](k=k, v=v, beta=beta, A=A, g=gc, cu_seqlens=cu, chunk_indices=ci)
        h, v_new, _ = F["fwd_h"](k=k, w=w, u=u, g=gc, initial_state=h0, output_final_state=False,
                                 cu_seqlens=cu, chunk_indices=ci, chunk_size=64)
        del u
        dv = F["dv_local"](q=q, k=k, do=do, g=gc, scale=scale, cu_seqlens=cu, chunk_size=64, chunk_indices=ci)
        if ctx.mode == "fused-chunk-triton":
            from .triton_chunk_windows import chunk_windows_backward_triton

            inj = chunk_windows_backward_triton((qn[0], kn[0], vn[0], gn[0], betan[0]), d_second[0], k[0], v_new[0],
                                                gc[0], h[0], dv[0], meta, scale, ctx.slots)
        elif ctx.mode in CHUNK_MODES:
            inj = window_backward_chunked((qn[0], kn[0], vn[0], gn[0], betan[0]), d_second[0].contiguous(), k[0],
                                          v_new[0], gc[0], h[0], dv[0], meta, scale, slots=ctx.slots,
                                          matmul_dtype=_matmul_dtype(ctx.mode, q))
        elif fused:
            inj = tk.window_backward((qn[0], kn[0], vn[0], gn[0], betan[0]), d_second[0], None, k[0], v_new[0],
                                     gc[0], h[0], dv[0], meta, scale)
        else:
            inj = tk.window_backward(None, None, d_second.contiguous(), k[0], v_new[0], gc[0], h[0], dv[0],
                                     meta, scale)
        T, H, K = q.shape[1], q.shape[2], q.shape[3]
        HV = v.shape[2]
        if fused:
            Tn = qn.shape[1]
            per_h = (lambda x: x) if HV == H else (lambda x: x.view(Tn, H, HV // H, K).sum(2))  # noqa: E731
            ng = [per_h(inj.pop("dqn"))[None].to(qn.dtype), per_h(inj.pop("dkn"))[None].to(kn.dtype),
                  inj.pop("dvn")[None].to(vn.dtype), inj.pop("dgn")[None].to(gn.dtype),
                  inj.pop("dbn")[None].to(betan.dtype)]
        else:
            ng = [None] * 5
        dh, dh0, dv2 = tk.bwd_dhu_inj(q[0], k[0], w[0], gc[0], h0, dht.contiguous() if dht is not None else None,
                                      do[0], dv[0], inj.pop("x_inj"), scale, meta)
        del dv
        dq, dk, dw, dg = _dqkwg(F, meta, q=q, k=k, v=v_new, w=w, g=gc, h=h, dv=dv2[None], do=do, dh=dh[None],
                                scale=scale, cu_seqlens=cu, chunk_indices=ci, chunk_size=64)
        del h, v_new, dh, w
        dk2, dvv, db, dg2 = F["wy_bwd"](k=k, v=v, beta=beta, A=A, dw=dw, du=dv2[None], g=gc, cu_seqlens=cu,
                                         chunk_indices=ci)
        del dw, dv2
        # sums in place into the injected (f32, freshly allocated) terms: no further full-size f32 temporaries
        dk_inj = inj.pop("dk")
        dk_inj = dk_inj if HV == H else dk_inj.view(T, H, HV // H, K).sum(2)
        dk = dk_inj[None].add_(dk).add_(dk2)
        del dk2
        dg = inj.pop("dg")[None].add_(dg).add_(dg2)
        dg = F["cumsum"](dg, chunk_size=64, reverse=True, cu_seqlens=cu, chunk_indices=ci)
        grads = [dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), dg.to(ctx.g_dtype),
                 db.to(beta.dtype)]
        return (*grads, *ng, dh0, None, None, None, None)


def fused_two_stream_gated_delta_rule(
    q, k, v, g, beta, qn, kn, vn, gn, betan, window_doc, window_prefix, window_offsets,
    cu_seqlens=None, initial_state=None, output_final_state=False, scale=None, use_qk_l2norm_in_kernel=False,
    _window="chunk-triton",
):
    """Same signature and semantics as ``naive_two_stream_gated_delta_rule`` (CUDA only). ``_window`` picks the
    noisy-window implementation for benchmarks (``WINDOW_MODES``); the default is the chunk-parallel map in Triton."""
    if _window not in WINDOW_MODES:
        raise ValueError(f"_window must be one of {sorted(WINDOW_MODES)}, got {_window!r}")
    if q.shape[0] != 1:
        raise ValueError("packed layout: batch dimension must be 1")
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k, qn, kn = l2norm(q), l2norm(k), l2norm(qn), l2norm(kn)
    meta = build_meta(q.shape[1], cu_seqlens, window_doc, window_prefix, window_offsets, q.device)
    c = lambda x: x.contiguous()  # noqa: E731
    h0 = c(initial_state.float()) if initial_state is not None else None
    if torch.is_grad_enabled():
        dqkwg_mode(q.device)  # decide the Hopper guard (self-check) now, not inside autograd's backward
    o, second, ht = TwoStreamGDNFunction.apply(
        c(q), c(k), c(v), c(g), c(beta), c(qn), c(kn), c(vn), c(gn), c(betan), h0, meta, scale,
        output_final_state, WINDOW_MODES[_window])
    return o.to(v.dtype), second, (ht if output_final_state else None)


def enable_fla_hopper_bypass(device) -> bool:
    """For code that calls fla's public chunk op directly (the simple baseline): if fla's Hopper guard applies
    and the self-check passes on ``device``, lift the guard process-wide. Returns True when fla's gated backward
    can be used; False means the self-check failed (the guard stays, fla's backward raises as before)."""
    mode = dqkwg_mode(device)
    if mode == "bypass":
        _fla()["chunk_o"].TRITON_ABOVE_3_7_1 = True
    return mode != "torch"
