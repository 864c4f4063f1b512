"""The engine's own Gated DeltaNet decode recurrence (Triton), which commits the state in place.

The static step keeps, per row, the GDN state after the step's clean tokens. Before, fla's fused recurrent kernel
wrote it into a separate buffer (``last``) for every row, and a ``where`` pass copied it into the cache for the rows
that commit — reading two states and writing one per layer and step (24 MB per layer at C=8 on Qwen3.5-2B). Here the
kernel stores each row's final state where it belongs: into the cache ``state`` for rows that commit, into ``last``
for the others (whose cache state must stay as it was; ``StaticStep.commit_last`` may commit it later). So after a
step the state after the clean tokens of row c is ``state[c]`` if ``commit[c]`` else ``last[c]`` (``last[c]`` of a
committing row is left stale), and the window recurrence starts from exactly that (``MODE`` 1). No pass over the
states besides the recurrence's own read and write.

Same arithmetic as fla's ``fused_recurrent_gated_delta_rule_fwd_kernel`` (0.6.0; q/k L2 norm with eps 1e-6 and the
scale in-kernel, head-wise beta, log-space decay g, state [K, V] per head, one program per (row, v-head, V block)),
written again for this layout and the per-row store. Launch: ``launch(...)``; pure-torch twin:
``gdn_ops._recurrence_torch`` followed by the same row selection (``gdn_ops.gdn_recurrence_commit`` with
``kernel='torch'``).
"""

from __future__ import annotations

import os

import torch

NAN_FILL = False
"""Tests: outputs allocated NaN-filled, so unwritten elements fail."""

BV = 8
"""V columns per program (fla's choice for decoding: many small programs, one warp each)."""

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def gdn_commit_kernel(q, k, v, g, beta, o, state, last, commit, scale, T,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr):
        # MODE 0 (commit): start from state; final state -> state (commit) or last (not).
        # MODE 1 (from):   start from state (commit) or last (not); no final state.
        pid = tl.program_id(0)
        NV = tl.cdiv(V, BV)
        i_v, i_nh = pid % NV, pid // NV
        i_n, i_hv = i_nh // HV, i_nh % HV
        i_h = i_hv // (HV // H)
        flag = tl.load(commit + i_n)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        mask_k, mask_v = o_k < K, o_v < V
        mask_h = mask_k[:, None] & mask_v[None, :]
        # the row's commit flag broadcast to a block mask (a scalar bool in a mask is refused by Triton 3.9's
        # interpreter: "mask has unsupported dtype")
        flag_h = tl.zeros([BK, BV], dtype=tl.int32) + flag.to(tl.int32)
        c, nc = mask_h & (flag_h != 0), mask_h & (flag_h == 0)
        off_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        if MODE == 0:
            h = tl.load(state + off_h, mask=mask_h, other=0.0).to(tl.float32)
        else:  # masked loads: only the selected buffer is read
            h = (tl.load(state + off_h, mask=c, other=0.0).to(tl.float32)
                 + tl.load(last + off_h, mask=nc, other=0.0).to(tl.float32))
        p_q = q + (i_n * T * H + i_h) * K + o_k
        p_k = k + (i_n * T * H + i_h) * K + o_k
        p_v = v + (i_n * T * HV + i_hv) * V + o_v
        p_o = o + (i_n * T * HV + i_hv) * V + o_v
        p_g = g + i_n * T * HV + i_hv
        p_b = beta + i_n * T * HV + i_hv
        for _ in range(0, T):
            b_q = tl.load(p_q, mask=mask_k, other=0.0).to(tl.float32)
            b_k = tl.load(p_k, mask=mask_k, other=0.0).to(tl.float32)
            b_v = tl.load(p_v, mask=mask_v, other=0.0).to(tl.float32)
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6) * scale
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
            b_beta = tl.load(p_b).to(tl.float32)
            h *= tl.exp(tl.load(p_g).to(tl.float32))
            b_v = b_beta * (b_v - tl.sum(h * b_k[:, None], 0))
            h += b_k[:, None] * b_v[None, :]
            b_o = tl.sum(h * b_q[:, None], 0)
            tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=mask_v)
            p_q += H * K
            p_k += H * K
            p_v += HV * V
            p_o += HV * V
            p_g += HV
            p_b += HV
        if MODE == 0:
            tl.store(state + off_h, h.to(state.dtype.element_ty), mask=c)
            tl.store(last + off_h, h.to(last.dtype.element_ty), mask=nc)

    _KERNEL = gdn_commit_kernel
    return _KERNEL


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def applies(device: torch.device) -> bool:
    return device.type == "cuda" or _interpreting()


def launch(q, k, v, g, beta, state, last, commit, scale: float, mode: int) -> torch.Tensor:
    """q, k [C, T, H, K] raw; v [C, T, HV, V]; g, beta [C, T, HV]; state, last [C, HV, K, V]; commit [C] bool.
    mode 0: writes the final state into ``state`` (commit rows) / ``last`` (others); mode 1: starts from
    ``state``/``last`` by the same rule and writes no state. Returns o [C, T, HV, V] in v's dtype."""
    import triton

    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    C, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    o = torch.empty_like(v)
    if NAN_FILL and o.is_floating_point():
        o.fill_(float("nan"))
    if T == 0 and mode == 1:
        return o  # (mode 0 with no tokens still runs: the state moves to ``last`` for the non-committing rows)
    bv = min(BV, triton.next_power_of_2(V))
    _kernel()[(triton.cdiv(V, bv) * C * HV,)](
        q, k, v, g, beta, o, state, last, commit, scale, T, H=H, HV=HV, K=K, V=V,
        BK=triton.next_power_of_2(K), BV=bv, MODE=mode, num_warps=1, num_stages=3)
    return o
