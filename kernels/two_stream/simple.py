"""Simple two-stream baseline (benchmark only): materialise every window-boundary state in HBM, replay windows.

Clean stream: fla's chunked gated delta rule (its internals, same as ``chunk_gated_delta_rule``). Boundary
states: a Triton kernel writes the state at every window boundary to HBM, fp32 ``[W, HV, K, V]`` — memory grows
as T/B states per layer, which is what the fused path avoids. Windows: fla's ``chunk_gated_delta_rule`` over the
noisy stream with ``cu_seqlens = window_offsets`` and ``initial_state`` = those states. Autograd-correct: fla
returns the boundary-state gradients (dh0 of the window op) and ``TwoStreamGDNFunction`` (mode "states") injects
them into the clean backward, like the fused path does for its on-chip ones.
"""

from __future__ import annotations

import torch

from ._meta import build_meta, l2norm
from .fused import TwoStreamGDNFunction, enable_fla_hopper_bypass


def simple_two_stream_gated_delta_rule(
    q, k, v, g, beta, qn, kn, vn, gn, betan, window_doc, window_prefix, window_offsets,
    cu_seqlens=None, initial_state=None, output_final_state=False, scale=None, use_qk_l2norm_in_kernel=False,
):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    enable_fla_hopper_bypass(q.device)
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k, qn, kn = l2norm(q), l2norm(k), l2norm(qn), l2norm(kn)
    meta = build_meta(q.shape[1], cu_seqlens, window_doc, window_prefix, window_offsets, q.device)
    c = lambda x: x.contiguous()  # noqa: E731
    h0 = c(initial_state.float()) if initial_state is not None else None
    o, states, ht = TwoStreamGDNFunction.apply(
        c(q), c(k), c(v), c(g), c(beta), c(qn), c(kn), c(vn), c(gn), c(betan), h0, meta, scale,
        output_final_state, "states")
    on, _ = chunk_gated_delta_rule(c(qn), c(kn), c(vn), c(gn), c(betan), scale=scale, initial_state=states,
                                   cu_seqlens=window_offsets.to(q.device, torch.long))
    return o.to(v.dtype), on.to(vn.dtype), (ht if output_final_state else None)
