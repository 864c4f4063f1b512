"""The chunk-parallel noisy-window map (flare_kernels.two_stream.chunk_windows) against the per-window references.

Pure torch, CPU: forward vs the naive twin, backward (every noisy gradient and every injection into the clean chunk
quantities) vs autograd of the per-window map that ``window_backward`` is also checked against.
"""

from __future__ import annotations

import math

import pytest
import torch

from flare_kernels.two_stream.chunk_windows import (window_backward_chunked, window_forward_chunked,
                                                    window_slots)
from flare_kernels.two_stream.naive import naive_two_stream_gated_delta_rule
from two_stream_cases import clean_chunks, problem, rel, torch_window_map


def flare_layout_problem(seed, T=150, B=4, views=2, H=2, HV=4, K=16, V=8):
    """One document with the FLARE layout: ``views`` windows of B tokens after every multiple of B (and the end)."""
    P = problem(seed, lens=(T,), H=H, HV=HV, K=K, V=V)
    gen = torch.Generator().manual_seed(seed + 100)
    prefixes = [p for p in range(0, T, B)] * views
    wl = [min(B, T - p) for p in prefixes]
    off = torch.nn.functional.pad(torch.tensor(wl).cumsum(0), (1, 0))
    Tn = int(off[-1])
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    P.update(window_doc=torch.zeros(len(wl), dtype=torch.long), window_prefix=torch.tensor(prefixes),
             window_offsets=off, qn=r(1, Tn, H, K), kn=torch.nn.functional.normalize(r(1, Tn, H, K), dim=-1),
             vn=r(1, Tn, HV, V), gn=torch.nn.functional.logsigmoid(r(1, Tn, HV)) * 0.3,
             betan=torch.rand(1, Tn, HV, generator=gen))
    return P


CASES = [
    ("random", lambda: problem(3, H=1, HV=2, K=32, V=16, max_win=3)),
    ("random-gqa", lambda: problem(4, H=2, HV=4, K=16, V=16, max_win=8, with_h0=False)),
    ("flare-b1", lambda: flare_layout_problem(5, T=131, B=1, views=1)),
    ("flare-b4-2views", lambda: flare_layout_problem(6, T=150, B=4, views=2)),
    ("flare-b3", lambda: flare_layout_problem(7, T=97, B=3, views=2)),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_chunk_windows_forward_matches_naive(name, make):
    P = make()
    K = P["q"].shape[-1]
    scale = K**-0.5
    meta, ch = clean_chunks(P, scale)
    _, on_ref, _ = naive_two_stream_gated_delta_rule(
        **{k: (v.double() if v is not None and torch.is_floating_point(v) else v) for k, v in P.items()})
    d = lambda x: x.double()  # noqa: E731
    on = window_forward_chunked(d(P["qn"][0]), d(P["kn"][0]), d(P["vn"][0]), d(P["gn"][0]), d(P["betan"][0]),
                                d(P["k"][0]), d(ch["v_new"]), d(ch["gc"]), d(ch["h"]), meta, scale)
    assert torch.isfinite(on).all()
    assert rel(on, on_ref[0]) < 1e-10


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_chunk_windows_backward_matches_per_window_autograd(name, make):
    P = make()
    K = P["q"].shape[-1]
    H, HV = P["q"].shape[2], P["v"].shape[2]
    scale = K**-0.5
    meta, ch = clean_chunks(P, scale)
    leaves = [ch["h"], P["k"][0], ch["v_new"], ch["gc"] * math.log(2.0), P["qn"][0], P["kn"][0], P["vn"][0],
              P["gn"][0], P["betan"][0]]
    leaves = [x.double().clone().requires_grad_() for x in leaves]
    on, _ = torch_window_map(P, ch, meta, scale, leaves)
    don = torch.randn(on.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (on * don).sum().backward()
    ref = [x.grad for x in leaves]
    d = lambda x: x.detach().double().contiguous()  # noqa: E731
    dv_clean = torch.full_like(d(ch["v_new"]), 0.5)
    noisy = tuple(d(P[n][0]) for n in ("qn", "kn", "vn", "gn", "betan"))
    out = window_backward_chunked(noisy, don, d(P["k"][0]), d(ch["v_new"]), d(ch["gc"]), d(ch["h"]), dv_clean,
                                  meta, scale)
    T, Tn = P["k"].shape[1], P["qn"].shape[1]
    group = lambda x, n: x.view(n, H, HV // H, -1).sum(2)  # noqa: E731
    tol = 1e-6  # f32 results of f64 math
    assert rel(out["x_inj"], ref[0]) < tol
    assert rel(group(out["dk"], T), ref[1]) < tol
    assert rel(dv_clean - 0.5, ref[2]) < tol  # accumulated in place
    assert rel(out["dg"], ref[3]) < tol
    assert rel(group(out["dqn"], Tn), ref[4]) < tol
    assert rel(group(out["dkn"], Tn), ref[5]) < tol
    assert rel(out["dvn"], ref[6]) < tol
    assert rel(out["dgn"], ref[7]) < tol
    assert rel(out["dbn"], ref[8]) < tol


def test_window_slots_layout():
    P = problem(11, lens=(70, 5, 130), max_win=4)
    meta, _ = clean_chunks(P, 1.0)
    Tn = P["qn"].shape[1]
    s = window_slots(meta, Tn, "cpu")
    flat_tok = s.slot_tok.view(-1)
    # every noisy token has exactly one slot, in its window's checkpoint chunk, and windows stay contiguous
    assert torch.equal(flat_tok[s.tok_slot], torch.arange(Tn))
    assert int((flat_tok < Tn).sum()) == Tn
    win_of_tok = s.slot_win.view(-1)[s.tok_slot]
    chunk_of_tok = s.tok_slot // s.n_slots
    assert torch.equal(chunk_of_tok, meta.win_chunk.long()[win_of_tok])
    assert s.n_slots == int(torch.bincount(chunk_of_tok, minlength=meta.n_chunks).max())


def test_chunk_groups_give_the_same_result(monkeypatch):
    """Processing the chunks in several groups (bounded memory) changes nothing."""
    import flare_kernels.two_stream.chunk_windows as cw

    P = problem(12, lens=(70, 5, 130), H=1, HV=2, K=16, V=16, max_win=4)
    scale = 0.25
    meta, ch = clean_chunks(P, scale)
    d = lambda x: x.double().contiguous()  # noqa: E731
    noisy = tuple(d(P[n][0]) for n in ("qn", "kn", "vn", "gn", "betan"))
    args = (d(P["k"][0]), d(ch["v_new"]), d(ch["gc"]), d(ch["h"]))
    don = torch.randn(P["vn"].shape[1:], generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run():
        on = window_forward_chunked(*noisy, *args, meta, scale)
        dv = torch.zeros_like(args[1])
        out = window_backward_chunked(noisy, don, *args, dv, meta, scale)
        return [on, dv, *out.values()]

    whole = run()
    monkeypatch.setattr(cw, "GROUP_BYTES", 1)  # one chunk per group
    assert len(cw._groups(meta.n_chunks, 2, 8, 16, 16, 8, cw.GROUP_BYTES)) == meta.n_chunks
    split = run()
    for a, b in zip(whole, split):
        assert rel(a, b) < 1e-12


def test_meta_and_slots_are_built_once_per_index_tensors():
    """Every GDN layer of a forward passes the same index tensors: the meta (and its slots) is built once."""
    from flare_kernels.two_stream._meta import build_meta

    P = problem(13, lens=(70, 5, 130))
    args = (P["cu_seqlens"], P["window_doc"], P["window_prefix"], P["window_offsets"])
    m1 = build_meta(205, *args, "cpu")
    assert build_meta(205, *args, "cpu") is m1
    assert window_slots(m1, P["qn"].shape[1], "cpu") is window_slots(m1, P["qn"].shape[1], "cpu")
    m2 = build_meta(205, P["cu_seqlens"].clone(), *args[1:], "cpu")  # equal values, other tensor: rebuilt
    assert m2 is not m1 and torch.equal(m2.win_chunk, m1.win_chunk)
