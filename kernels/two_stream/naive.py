"""Pure-torch reference ("naive twin") of the FLARE two-stream Gated DeltaNet and its short convolution.

This file is the contract every fast path in ``flare_kernels.two_stream`` must reproduce (same signature, same
outputs, same gradients). It is written to be obviously right, not fast: explicit loops, fp32 math.

Layout (packed, batch dimension 1, as fla's varlen API):

* **clean stream** — ``T`` tokens of ``N`` documents laid out back to back; ``cu_seqlens`` [N+1] gives the
  document boundaries (``None`` = one document). Processed causally, each document from its own initial state.
* **noisy stream** — ``Tn`` tokens forming ``W`` windows laid out back to back; ``window_offsets`` [W+1] are their
  boundaries in the noisy stream. Window ``w`` belongs to clean document ``window_doc[w]`` and *starts after the
  first* ``window_prefix[w]`` *tokens of that document* (0 <= prefix <= doc length): it starts from the clean
  recurrent state after exactly those tokens, its convolution sees exactly those tokens' inputs as its left
  context, it processes its own tokens causally, and it writes nothing back (no other window, no clean token and
  no final state ever sees it).

Semantics of one step of the gated delta rule (state ``S`` [HV, K, V], fp32), identical to fla's and HF's::

    S   = S * exp(g_t)
    S   = S + k_t ⊗ (beta_t * (v_t - k_t^T S))
    o_t = (scale * q_t)^T S

Grouped value heads: ``HV = H * r``; value head ``i`` uses query/key head ``i // r``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _doc_bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, total)]
    c = cu_seqlens.tolist()
    return [(c[i], c[i + 1]) for i in range(len(c) - 1)]


def _f(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (fp64 stays fp64, for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _expand_heads(x: torch.Tensor, hv: int) -> torch.Tensor:
    """[L, H, K] -> [L, HV, K] by repeating each head HV // H times (consecutive value heads share a key head)."""
    return x.repeat_interleave(hv // x.shape[1], dim=1)


def _recurrent(q, k, v, g, beta, state):
    """Run the gated delta rule over one causal segment. q,k [L,HV,K]; v [L,HV,V]; g,beta [L,HV]; state [HV,K,V].

    Returns (o [L,HV,V], states [L+1,HV,K,V]) where states[i] is the state after the first i tokens.
    """
    states = [state]
    outs = []
    for t in range(q.shape[0]):
        state = state * g[t].exp()[:, None, None]
        kv_mem = torch.einsum("hk,hkv->hv", k[t], state)
        delta = beta[t][:, None] * (v[t] - kv_mem)
        state = state + k[t][:, :, None] * delta[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], state))
        states.append(state)
    o = torch.stack(outs) if outs else q.new_zeros(0, v.shape[1], v.shape[2])
    return o, torch.stack(states)


def naive_two_stream_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    qn: torch.Tensor,
    kn: torch.Tensor,
    vn: torch.Tensor,
    gn: torch.Tensor,
    betan: torch.Tensor,
    window_doc: torch.Tensor,
    window_prefix: torch.Tensor,
    window_offsets: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Two-stream gated delta rule, reference.

    Args:
        q, k: clean queries/keys [1, T, H, K]; v: clean values [1, T, HV, V]; g: log decay [1, T, HV];
            beta: write strength (already sigmoided) [1, T, HV].
        qn, kn, vn, gn, betan: the same for the noisy stream, [1, Tn, ...].
        window_doc: [W] long, clean document of each window.
        window_prefix: [W] long, number of that document's clean tokens the window starts after.
        window_offsets: [W+1] long, window boundaries in the noisy stream (window_offsets[-1] == Tn).
        cu_seqlens: [N+1] long clean document boundaries, or None for one document.
        initial_state: [N, HV, K, V] state entering each document, or None (zeros).
        output_final_state: also return each document's final clean state.
        scale: query scale, default K ** -0.5.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head first (Qwen3.5 does).

    Returns:
        o [1, T, HV, V], on [1, Tn, HV, V] (dtype of v), final_state [N, HV, K, V] fp32 or None.
    """
    T, HV, K, V = q.shape[1], v.shape[2], q.shape[3], v.shape[3]
    scale = K**-0.5 if scale is None else scale
    docs = _doc_bounds(cu_seqlens, T)

    def prep(q_, k_, v_, g_, b_):
        q_, k_ = _f(q_[0]), _f(k_[0])
        if use_qk_l2norm_in_kernel:
            q_, k_ = _l2norm(q_), _l2norm(k_)
        return _expand_heads(q_, HV) * scale, _expand_heads(k_, HV), _f(v_[0]), _f(g_[0]), _f(b_[0])

    cq, ck, cv, cg, cb = prep(q, k, v, g, beta)
    nq, nk, nv, ng, nb = prep(qn, kn, vn, gn, betan)

    o_parts = []
    doc_states = []  # per document: [len+1, HV, K, V]
    for d, (s, e) in enumerate(docs):
        h0 = cv.new_zeros(HV, K, V) if initial_state is None else _f(initial_state[d])
        od, states = _recurrent(cq[s:e], ck[s:e], cv[s:e], cg[s:e], cb[s:e], h0)
        o_parts.append(od)
        doc_states.append(states)
    o = torch.cat(o_parts)

    on_parts = []
    offs = window_offsets.tolist()
    for w, (d, p) in enumerate(zip(window_doc.tolist(), window_prefix.tolist())):
        a, b = offs[w], offs[w + 1]
        ow, _ = _recurrent(nq[a:b], nk[a:b], nv[a:b], ng[a:b], nb[a:b], doc_states[d][p])
        on_parts.append(ow)
    on = torch.cat(on_parts) if on_parts else nv.new_zeros(0, HV, V)

    final = torch.stack([st[-1] for st in doc_states]) if output_final_state else None
    return o[None].to(v.dtype), on[None].to(vn.dtype), final


def naive_two_stream_causal_conv1d(
    x: torch.Tensor,
    xn: torch.Tensor,
    weight: torch.Tensor,
    window_doc: torch.Tensor,
    window_prefix: torch.Tensor,
    window_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Two-stream depthwise causal convolution, reference.

    ``y_t = act(bias + sum_j weight[:, j] * x_{t-(W-1)+j})`` over each clean document, whose left context before
    its first token is ``initial_state[d]`` (the ``W-1`` inputs that precede it, e.g. from a decoding cache) or
    zeros. A noisy window's left context is the last ``W-1`` inputs of [initial_state[d], first
    ``window_prefix[w]`` clean tokens of document d].

    Args:
        x: clean inputs [1, T, D]; xn: noisy inputs [1, Tn, D]; weight: [D, W]; bias: [D] or None.
        window_doc, window_prefix, window_offsets, cu_seqlens: as in ``naive_two_stream_gated_delta_rule``.
        initial_state: [N, D, W-1] or None (zeros).
        output_final_state: also return each document's last W-1 inputs [N, D, W-1].
        activation: "silu" or None.

    Returns:
        y [1, T, D], yn [1, Tn, D] (dtype of x), final_state [N, D, W-1] or None.
    """
    T, D = x.shape[1], x.shape[2]
    width = weight.shape[1]
    docs = _doc_bounds(cu_seqlens, T)
    w32 = _f(weight)

    def conv(seq_with_context: torch.Tensor, n_out: int) -> torch.Tensor:
        # seq_with_context: [W-1 + n_out, D] -> [n_out, D]
        out = F.conv1d(seq_with_context.t()[None], w32[:, None, :], None if bias is None else _f(bias), groups=D)
        out = out[0].t()[-n_out:] if n_out else out[0].t()[:0]
        return F.silu(out) if activation == "silu" else out

    contexts = []  # per document: [W-1 + len, D] inputs with left context
    y_parts = []
    for d, (s, e) in enumerate(docs):
        left = _f(x.new_zeros(D, width - 1)) if initial_state is None else _f(initial_state[d])
        ctx = torch.cat([left.t(), _f(x[0, s:e])])
        contexts.append(ctx)
        y_parts.append(conv(ctx, e - s))
    y = torch.cat(y_parts) if y_parts else _f(x.new_zeros(0, D))

    yn_parts = []
    offs = window_offsets.tolist()
    for w, (d, p) in enumerate(zip(window_doc.tolist(), window_prefix.tolist())):
        a, b = offs[w], offs[w + 1]
        left = contexts[d][p : p + width - 1]
        yn_parts.append(conv(torch.cat([left, _f(xn[0, a:b])]), b - a))
    yn = torch.cat(yn_parts) if yn_parts else _f(xn.new_zeros(0, D))

    final = torch.stack([c[-(width - 1) :].t() for c in contexts]) if output_final_state else None
    return y[None].to(x.dtype), yn[None].to(xn.dtype), final
