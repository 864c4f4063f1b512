"""Noisy windows of the two-stream gated delta rule in *chunk-parallel* form (pure torch, batched matmuls).

Every window whose boundary state lives in clean chunk ``c`` (checkpoint ``h_c``, the state entering the chunk) is
processed together with the other windows of that chunk, as dense per-chunk matrix products — the same shape of
work as fla's chunk kernels — instead of one window (or one sequential loop over a chunk's windows) at a time.
Nothing per window is ever materialised: the boundary state ``S_w`` appears only through its products with the
window's queries and keys.

Notation per chunk (one value head; G = chunk-local inclusive cumsum of the clean log decay, natural units;
``v'`` = fla's new values ``u - w h``; r_i = clean tokens of the chunk before slot i's window boundary)::

    x^T S_i      = e^{G_{r_i-1}} x^T h_c + sum_{j < r_i} e^{G_{r_i-1} - G_j} (x . k_j) v'_j       (apply_s0)
    Γ_i          = sum of the noisy log decays of slot i's window up to and including i
    (I + L) d    = beta ∘ (v - e^Γ ∘ (K_n S))     L_ij = [same window, j < i] beta_i e^{Γ_i-Γ_j} (k_i . k_j)
    o_i          = scale * ( e^{Γ_i} q_i^T S_i + sum_{j <= i, same window} e^{Γ_i-Γ_j} (q_i . k_j) d_j )

which is the delta rule of each window started from its boundary state (the WY/UT form of fla, with a
block-diagonal window mask). Slots are the noisy tokens of a chunk's windows, padded to the largest chunk.

The backward is torch autograd of this map (recomputed, nothing saved between forward and backward); it yields
the noisy-token gradients and the boundary-state gradients already pushed into the clean chunk quantities
(``x_inj`` = d/d h_c, d/d v', d/d k, d/d G), the same contract as ``triton_gdn.window_backward``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ._meta import CHUNK
from ._torch_chunk import RCP_LN2, _chunk_index

_LN2 = 1.0 / RCP_LN2


@dataclass
class WindowSlots:
    """Where every noisy token sits in its checkpoint chunk's slot array ``[NT, NC]``."""

    n_slots: int  # NC: slots per chunk (the most noisy tokens any chunk anchors)
    max_window: int  # longest window (the WY solve below is exact after max_window - 1 substitution steps)
    slot_tok: torch.Tensor  # [NT, NC] long: noisy token of each slot, Tn for an empty slot
    slot_win: torch.Tensor  # [NT, NC] long: window of each slot, -1 for an empty slot
    slot_r: torch.Tensor  # [NT, NC] long: clean tokens of the chunk before the slot's window (0..64)
    tok_slot: torch.Tensor  # [Tn] long: flat slot (chunk * NC + slot) of every noisy token


def window_slots(meta, Tn: int, device) -> WindowSlots:
    """Slot layout from the chunk meta (one host sync: the slot count; cached on the meta)."""
    key = ("window_slots", Tn, str(device))
    if key not in meta.derived:
        meta.derived[key] = _window_slots(meta, Tn, device)
    return meta.derived[key]


def _window_slots(meta, Tn: int, device) -> WindowSlots:
    NT = meta.n_chunks
    W = meta.win_r.shape[0]
    off = meta.win_off.to(device=device, dtype=torch.long)
    wlen = off[1:] - off[:-1]  # [W]
    wchunk = meta.win_chunk.to(device=device, dtype=torch.long)
    order = meta.win_order.to(device=device, dtype=torch.long)
    # tokens of the windows in checkpoint-chunk order; a chunk's slots are its windows' tokens back to back
    start_sorted = torch.nn.functional.pad(wlen[order].cumsum(0), (1, 0))  # [W+1]
    per_chunk = torch.zeros(NT, dtype=torch.long, device=device).index_add_(0, wchunk, wlen)
    n_slots, max_window = torch.stack([per_chunk.max(), wlen.max()]).tolist() if W else (1, 1)  # one host sync
    n_slots = max(n_slots, 1)
    chunk_base = torch.nn.functional.pad(per_chunk.cumsum(0), (1, 0))[:-1]  # [NT] first sorted token of a chunk
    slot0 = torch.empty(W, dtype=torch.long, device=device)
    slot0[order] = start_sorted[:-1] - chunk_base[wchunk[order]]
    win_of_tok = torch.repeat_interleave(torch.arange(W, device=device), wlen, output_size=Tn)
    t_in_win = torch.arange(Tn, device=device) - off[win_of_tok]
    tok_slot = wchunk[win_of_tok] * n_slots + slot0[win_of_tok] + t_in_win
    slot_tok = torch.full((NT * n_slots,), Tn, dtype=torch.long, device=device)
    slot_tok[tok_slot] = torch.arange(Tn, device=device)
    slot_win = torch.full((NT * n_slots,), -1, dtype=torch.long, device=device)
    slot_win[tok_slot] = win_of_tok
    slot_r = torch.zeros(NT * n_slots, dtype=torch.long, device=device)
    slot_r[tok_slot] = meta.win_r.to(device=device, dtype=torch.long)[win_of_tok]
    v = lambda x: x.view(NT, n_slots)  # noqa: E731
    return WindowSlots(n_slots, max_window, v(slot_tok), v(slot_win), v(slot_r), tok_slot)


def _gather(x, index, valid, heads, f):
    """Rows ``index`` [n, L] of x [N, H', ...] -> [n, HV, L, ...] in dtype f: heads picked by ``heads`` [HV] (the
    query/key head of each value head; None = all), zero where ``valid`` [n, L] is False. Only the group's rows are
    copied (the full tensors are never cast or expanded)."""
    y = x[index]
    if heads is not None:
        y = y[:, :, heads]
    y = y.to(f) * valid.view(*valid.shape, *([1] * (y.dim() - 2))).to(f)
    return y.transpose(1, 2)


def chunk_windows_map(h, Kc, Vc, Gc, Q, Kn, Vn, gs, bs, slot_r, slot_win, max_window, *, matmul_dtype=None):
    """Noisy outputs of a group of n chunks, as a differentiable function of gathered per-chunk tensors.

    h [n,HV,K,V] (state entering each chunk); Kc [n,HV,64,K], Vc [n,HV,64,V] (clean keys / new values, zero past
    the chunk end); Gc [n,HV,64] chunk-local inclusive cumsum of the clean log decay (natural units); Q (already
    scaled), Kn [n,HV,NC,K]; Vn [n,HV,NC,V]; gs, bs [n,HV,NC] noisy log decay and beta; slot_r, slot_win [n,NC].
    All math in the dtype of the inputs; ``matmul_dtype`` (e.g. bf16) casts the operands of the products with
    the clean chunk (the large ones) only. Returns o [n,HV,NC,V] (garbage-free zeros in empty slots).
    """
    f = h.dtype
    dev = h.device
    n, HV = Kc.shape[0], Kc.shape[1]
    NC = Q.shape[2]

    def mm(a, b):
        if matmul_dtype is None or matmul_dtype == f:
            return a @ b
        return (a.to(matmul_dtype) @ b.to(matmul_dtype)).to(f)

    # boundary-state products: x^T S_i for x in [Q; Kn] at once
    r = slot_r[:, None, :]  # [n,1,NC]
    Gr = torch.where(r > 0, Gc.gather(2, (r - 1).clamp_min(0).expand(n, HV, NC)), 0.0)  # [n,HV,NC]
    before = torch.arange(CHUNK, device=dev)[None, None, None, :] < r[..., None]  # [n,1,NC,64]
    coef = torch.where(before, torch.exp(torch.where(before, Gr[..., None] - Gc[..., None, :], 0.0)), 0.0)
    X = torch.cat([Q, Kn], 2)  # [n,HV,2NC,K]
    XS = (torch.exp(torch.cat([Gr, Gr], 2))[..., None] * mm(X, h)
          + mm(mm(X, Kc.transpose(-1, -2)) * torch.cat([coef, coef], 2), Vc))  # [n,HV,2NC,V]
    QS, KS = XS[:, :, :NC], XS[:, :, NC:]

    # window-local decays and the delta rule in WY form (block-diagonal over windows)
    win = slot_win[:, None, :]  # [n,1,NC]
    same = (win[..., :, None] == win[..., None, :]) & (win[..., :, None] >= 0)  # [n,1,NC,NC]
    ii = torch.arange(NC, device=dev)
    incl = same & (ii[:, None] >= ii[None, :])
    strict = same & (ii[:, None] > ii[None, :])
    gam = (incl.to(f) @ gs[..., None]).squeeze(-1)  # [n,HV,NC]
    dec = torch.where(incl, torch.exp(torch.where(incl, gam[..., :, None] - gam[..., None, :], 0.0)), 0.0)
    eg = torch.exp(gam)[..., None]
    rhs = bs[..., None] * (Vn - eg * KS)
    # (I + L) d = rhs by forward substitution in matrix form: L is strictly lower and block-diagonal with blocks
    # of at most max_window, so L^max_window = 0 and d_{m+1} = rhs - L d_m is exact after max_window - 1 steps
    # (none for one-token windows). Batched matmuls instead of a batched triangular solve.
    d = rhs
    if max_window > 1:
        L = torch.where(strict, bs[..., None] * dec * (Kn @ Kn.transpose(-1, -2)), 0.0)
        for _ in range(max_window - 1):
            d = rhs - L @ d
    return eg * QS + (Q @ Kn.transpose(-1, -2) * dec) @ d


_COMPILED = {}


def _map_fn():
    """The map, or its torch.compile'd version when FLARE_WINDOW_COMPILE=1 (fuses the elementwise work around the
    matrix products; compiled once per shape)."""
    if os.environ.get("FLARE_WINDOW_COMPILE", "0") != "1":
        return chunk_windows_map
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(chunk_windows_map, dynamic=False)
    return _COMPILED["fn"]


def _head_map(h_src, hv, device):
    """Value head -> query/key head (consecutive value heads share one), or None when they are the same."""
    return None if h_src == hv else torch.arange(hv, device=device) // (hv // h_src)


def _groups(NT, HV, NC, K, V, elem_bytes, budget_bytes):
    """Chunk ranges whose largest intermediate ([n, HV, 2NC, max(K, V)]) stays under ``budget_bytes``."""
    per_chunk = HV * 2 * NC * max(K, V, CHUNK) * elem_bytes
    step = max(1, int(budget_bytes // max(per_chunk, 1)))
    return [(c, min(c + step, NT)) for c in range(0, NT, step)]


# Largest intermediate per chunk group (bytes). Bounds the extra memory of the map (and of its recomputed
# backward) independently of the sequence length; groups run one after the other.
GROUP_BYTES = int(os.environ.get("FLARE_WINDOW_GROUP_MB", "64")) << 20


class _Prepared:
    """Everything the map needs, gathered per chunk group."""

    def __init__(self, qn, kn, vn, gn, bn, k, v_new, gc, h, meta, scale, slots, f):
        HV, dev = v_new.shape[1], h.device
        self.meta, self.slots, self.f, self.scale = meta, slots, f, scale
        self.idx, self.mask = _chunk_index(meta, dev)
        self.heads = _head_map(k.shape[1], HV, dev)
        self.clean = (h, k, v_new, gc)
        self.noisy = (qn, kn, vn, gn, bn)
        Tn = qn.shape[0]
        self.slot_valid = slots.slot_tok < Tn
        self.slot_tok = slots.slot_tok.clamp_max(Tn - 1)
        K, V = k.shape[2], v_new.shape[2]
        self.groups = _groups(meta.n_chunks, HV, slots.n_slots, K, V, torch.finfo(f).bits // 8, GROUP_BYTES)

    def gather(self, c0, c1):
        f, hm = self.f, self.heads
        h, k, vnew, gc = self.clean
        qn, kn, vn, gn, bn = self.noisy
        idx, mask = self.idx[c0:c1], self.mask[c0:c1]
        st, sv = self.slot_tok[c0:c1], self.slot_valid[c0:c1]
        return [h[c0:c1].to(f), _gather(k, idx, mask, hm, f), _gather(vnew, idx, mask, None, f),
                _gather(gc, idx, mask, None, f) * _LN2, _gather(qn, st, sv, hm, f) * self.scale,
                _gather(kn, st, sv, hm, f), _gather(vn, st, sv, None, f), _gather(gn, st, sv, None, f),
                _gather(bn, st, sv, None, f)]


def _math_dtype(h):
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def window_forward_chunked(qn, kn, vn, gn, bn, k, v_new, gc, h, meta, scale, *, slots=None, matmul_dtype=None):
    """Drop-in for ``triton_gdn.window_forward(..., run_window=True)``: returns on [Tn,HV,V] (dtype of vn).

    qn, kn [Tn,H,K]; vn [Tn,HV,V]; gn, bn [Tn,HV]; k [T,H,K]; v_new [T,HV,V]; gc [T,HV] log2 chunk-local cumsum
    (fla's); h [NT,HV,K,V]."""
    Tn, HV, V = qn.shape[0], v_new.shape[1], v_new.shape[2]
    if Tn == 0:
        return vn.new_zeros(vn.shape)
    slots = slots or window_slots(meta, Tn, qn.device)
    P = _Prepared(qn, kn, vn, gn, bn, k, v_new, gc, h, meta, scale, slots, _math_dtype(h))
    o = torch.empty(meta.n_chunks, slots.n_slots, HV, V, dtype=vn.dtype, device=vn.device)
    with torch.no_grad():
        for c0, c1 in P.groups:
            x = P.gather(c0, c1)
            o[c0:c1] = _map_fn()(*x, slots.slot_r[c0:c1], slots.slot_win[c0:c1],
                                         slots.max_window, matmul_dtype=matmul_dtype).transpose(1, 2).to(vn.dtype)
    return o.view(-1, HV, V)[slots.tok_slot]


def window_backward_chunked(noisy, don, k, v_new, gc, h, dv_clean, meta, scale, *, slots=None, matmul_dtype=None):
    """Drop-in for ``triton_gdn.window_backward(noisy, don, None, ...)`` (the fused case).

    Recomputes the chunk-parallel map under autograd, one chunk group at a time, and returns dict(x_inj
    [NT,HV,K,V], dk [T,HV,K], dg [T,HV] (w.r.t. the natural-unit chunk cumsum), dqn/dkn [Tn,HV,K], dvn [Tn,HV,V]
    (dtype of vn), dgn/dbn [Tn,HV]), f32; ``dv_clean`` [T,HV,V] (gradient w.r.t. v_new) is increased in place."""
    qn, kn, vn, gn, bn = noisy
    T, K = k.shape[0], k.shape[2]
    HV, V = v_new.shape[1], v_new.shape[2]
    Tn = qn.shape[0]
    dev = k.device
    z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=dev)  # noqa: E731
    out = dict(x_inj=z(meta.n_chunks, HV, K, V), dk=z(T, HV, K), dg=z(T, HV), dqn=z(Tn, HV, K), dkn=z(Tn, HV, K),
               dvn=z(Tn, HV, V), dgn=z(Tn, HV), dbn=z(Tn, HV))
    if Tn == 0:
        out["dvn"] = out["dvn"].to(vn.dtype)
        return out
    slots = slots or window_slots(meta, Tn, qn.device)
    f = _math_dtype(h)
    P = _Prepared(qn, kn, vn, gn, bn, k, v_new, gc, h, meta, scale, slots, f)
    dvc = z(T, HV, V)
    don_pad = torch.cat([don, don.new_zeros(1, HV, V)])
    for c0, c1 in P.groups:
        with torch.enable_grad():
            x = [t.detach().requires_grad_() for t in P.gather(c0, c1)]
            o = _map_fn()(*x, slots.slot_r[c0:c1], slots.slot_win[c0:c1], slots.max_window,
                          matmul_dtype=matmul_dtype)
            st = slots.slot_tok[c0:c1]
            g = torch.autograd.grad(o, x, don_pad[st].transpose(1, 2).to(f))
        dh, dKc, dVc, dGc, dQ, dKn, dVn, dgs, dbs = g
        out["x_inj"][c0:c1] = dh
        idx, mask = P.idx[c0:c1][P.mask[c0:c1]], P.mask[c0:c1]
        for name, grad in (("dk", dKc), ("dg", dGc)):
            out[name].index_add_(0, idx, grad.transpose(1, 2)[mask].float())
        dvc.index_add_(0, idx, dVc.transpose(1, 2)[mask].float())
        valid = st < Tn
        tok = st[valid]
        for name, grad, mul in (("dqn", dQ, scale), ("dkn", dKn, 1.0), ("dvn", dVn, 1.0), ("dgn", dgs, 1.0),
                                ("dbn", dbs, 1.0)):
            out[name].index_add_(0, tok, grad.transpose(1, 2)[valid].float() * mul)
    dv_clean += dvc.to(dv_clean.dtype)
    out["dvn"] = out["dvn"].to(vn.dtype)
    return out
