"""Tests of flare_kernels.two_stream: dispatcher, the naive twin (vs HF Qwen3.5 fallbacks, explicit prefix+window
semantics, fp64 gradcheck), the CPU helpers, and — on a GPU — fused/simple vs naive forward and all gradients.

CPU parts never import triton or fla. GPU tests carry ``pytest.mark.gpu`` and skip without CUDA. Our Triton
kernels' CPU checks (interpreter) live in tests/test_kernels_interpret.py.
"""

from __future__ import annotations

import inspect
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import flare_kernels.two_stream as ts
from flare_kernels.two_stream.naive import naive_two_stream_causal_conv1d, naive_two_stream_gated_delta_rule

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_problem(lens, H, HV, K, V, *, block=None, max_win=8, with_h0=True, dtype=torch.float32, device="cpu",
                 seed=None, conv_dim=None):
    """Random packed clean documents + noisy windows. ``block``: FLARE layout (a window of ``block`` tokens after
    every multiple of ``block``, plus one after the whole document); otherwise random prefixes/lengths."""
    seed = random.randrange(2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    docs, pres, wl = [], [], []
    for d, n in enumerate(lens):
        if block is not None:
            ps = list(range(0, n + 1, block)) + ([n] if n % block else [])
            for p in ps:
                docs.append(d), pres.append(p), wl.append(block)
        else:
            for p in sorted({0, n, *torch.randint(0, n + 1, (max(2, n // 16),), generator=gen).tolist()}):
                docs.append(d), pres.append(p), wl.append(int(torch.randint(1, max_win + 1, (1,), generator=gen)))
    if block is None:
        perm = torch.randperm(len(docs), generator=gen)
        docs, pres, wl = [[x[i] for i in perm] for x in (docs, pres, wl)]
    docs, pres, wl = torch.tensor(docs), torch.tensor(pres), torch.tensor(wl)
    off = F.pad(wl.cumsum(0), (1, 0))
    Tn = int(off[-1])
    P = dict(
        q=r(1, T, H, K), k=F.normalize(r(1, T, H, K), dim=-1), v=r(1, T, HV, V),
        g=F.logsigmoid(r(1, T, HV)) * 0.5 - 0.01, beta=torch.rand(1, T, HV, generator=gen),
        qn=r(1, Tn, H, K), kn=F.normalize(r(1, Tn, H, K), dim=-1), vn=r(1, Tn, HV, V),
        gn=F.logsigmoid(r(1, Tn, HV)) * 0.5 - 0.01, betan=torch.rand(1, Tn, HV, generator=gen),
    )
    P = {k_: v_.to(device=device, dtype=dtype) for k_, v_ in P.items()}
    P.update(window_doc=docs.to(device), window_prefix=pres.to(device), window_offsets=off.to(device),
             cu_seqlens=cu.to(device),
             initial_state=(r(len(lens), HV, K, V) * 0.2).to(device) if with_h0 else None)
    return P, seed


# ----------------------------------------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------------------------------------


def test_dispatcher_cpu_uses_reference_and_never_imports_triton():
    before = {m for m in sys.modules if m.split(".")[0] in ("triton", "fla")}
    P, _ = make_problem((9, 4), 1, 2, 4, 3, block=2)
    o, on, ht = ts.two_stream_gated_delta_rule(**P, output_final_state=True)
    ro, ron, rht = naive_two_stream_gated_delta_rule(**P, output_final_state=True)
    assert torch.equal(o, ro) and torch.equal(on, ron) and torch.equal(ht, rht)
    x = torch.randn(1, 13, 5)
    xn = torch.randn(1, P["qn"].shape[1], 5)
    w = torch.randn(5, 4)
    win = (P["window_doc"], P["window_prefix"], P["window_offsets"])
    y = ts.two_stream_causal_conv1d(x, xn, w, *win, cu_seqlens=P["cu_seqlens"])
    ry = naive_two_stream_causal_conv1d(x, xn, w, *win, cu_seqlens=P["cu_seqlens"])
    assert torch.equal(y[0], ry[0]) and torch.equal(y[1], ry[1])
    after = {m for m in sys.modules if m.split(".")[0] in ("triton", "fla")}
    assert after == before, f"CPU dispatch imported {sorted(after - before)}"


def test_dispatcher_backend_rules():
    x = torch.zeros(1)
    assert ts.resolve_backend("auto", x, needs_fla=True) == "reference"
    assert ts.resolve_backend("reference", x, needs_fla=True) == "reference"
    with pytest.raises(ValueError):
        ts.resolve_backend("fused", x, needs_fla=True)
    with pytest.raises(ValueError):
        ts.resolve_backend("simple", x, needs_fla=True)
    assert ts.resolve_backend("simple", x, needs_fla=False) == "simple"  # torch conv runs anywhere
    with pytest.raises(ValueError):
        ts.resolve_backend("bogus", x, needs_fla=False)


# ----------------------------------------------------------------------------------------------------------------
# the naive twin vs HF's pure-torch Qwen3.5 fallbacks and the explicit [prefix + window] semantics
# ----------------------------------------------------------------------------------------------------------------


class _HF:
    """HF's pure-torch Qwen3.5 fallbacks, unwrapped: the module binds fla's kernels when fla is importable, even
    on a machine without a GPU (where they crash); ``inspect.unwrap`` gives back the torch functions."""

    def __init__(self, mod):
        self.torch_recurrent_gated_delta_rule = inspect.unwrap(mod.torch_recurrent_gated_delta_rule)
        self.causal_conv1d_fn = inspect.unwrap(mod.causal_conv1d_fn)


def _hf():
    return _HF(pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5"))


@pytest.mark.parametrize("l2", [False, True])
def test_naive_gdn_matches_hf_prefix_plus_window(l2):
    hf = _hf()
    P, seed = make_problem((23, 7, 40), 2, 4, 8, 6, max_win=8)
    o, on, ht = naive_two_stream_gated_delta_rule(**P, output_final_state=True, use_qk_l2norm_in_kernel=l2)
    cu = P["cu_seqlens"].tolist()
    for d in range(len(cu) - 1):  # clean documents
        s, e = cu[d], cu[d + 1]
        ho, hs = hf.torch_recurrent_gated_delta_rule(
            P["q"][:, s:e], P["k"][:, s:e], P["v"][:, s:e], P["g"][:, s:e], P["beta"][:, s:e],
            initial_state=P["initial_state"][d:d + 1], output_final_state=True, use_qk_l2norm_in_kernel=l2)
        assert rel(o[:, s:e], ho) < 1e-5, seed
        assert rel(ht[d], hs[0]) < 1e-5, seed
    off = P["window_offsets"].tolist()
    for w, (d, p) in enumerate(zip(P["window_doc"].tolist(), P["window_prefix"].tolist())):
        a, b = off[w], off[w + 1]
        s = cu[d]
        cat = lambda cn, nn: torch.cat([P[cn][:, s:s + p], P[nn][:, a:b]], 1)  # noqa: E731
        ho, _ = hf.torch_recurrent_gated_delta_rule(
            cat("q", "qn"), cat("k", "kn"), cat("v", "vn"), cat("g", "gn"), cat("beta", "betan"),
            initial_state=P["initial_state"][d:d + 1], use_qk_l2norm_in_kernel=l2)
        assert rel(on[:, a:b], ho[:, p:]) < 1e-5, (seed, w)


def test_naive_conv_matches_hf_prefix_plus_window():
    hf = _hf()
    P, seed = make_problem((23, 2, 40), 1, 1, 2, 2, max_win=8)
    D, W = 6, 4
    gen = torch.Generator().manual_seed(seed)
    x, xn = torch.randn(1, 65, D, generator=gen), torch.randn(1, P["qn"].shape[1], D, generator=gen)
    wt, b = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    init = torch.randn(3, D, W - 1, generator=gen)
    win = (P["window_doc"], P["window_prefix"], P["window_offsets"])
    y, yn, fin = naive_two_stream_causal_conv1d(x, xn, wt, *win, bias=b, cu_seqlens=P["cu_seqlens"],
                                                initial_state=init, output_final_state=True)
    cu = P["cu_seqlens"].tolist()
    for d in range(3):
        seq = torch.cat([init[d].t()[None], x[:, cu[d]:cu[d + 1]]], 1)  # initial state = W-1 earlier inputs
        hy = hf.causal_conv1d_fn(seq.transpose(1, 2), wt, b, activation="silu").transpose(1, 2)[:, W - 1:]
        assert rel(y[:, cu[d]:cu[d + 1]], hy) < 1e-6, seed
        assert torch.allclose(fin[d], seq[0, -(W - 1):].t())
    off = P["window_offsets"].tolist()
    for w, (d, p) in enumerate(zip(P["window_doc"].tolist(), P["window_prefix"].tolist())):
        seq = torch.cat([init[d].t()[None], x[:, cu[d]:cu[d] + p], xn[:, off[w]:off[w + 1]]], 1)
        hy = hf.causal_conv1d_fn(seq.transpose(1, 2), wt, b, activation="silu").transpose(1, 2)
        assert rel(yn[:, off[w]:off[w + 1]], hy[:, -(off[w + 1] - off[w]):]) < 1e-6, (seed, w)


def test_naive_gdn_gradcheck_fp64():
    P, seed = make_problem((3, 2), 1, 2, 2, 2, max_win=2, dtype=torch.float64, seed=5)
    P["initial_state"] = P["initial_state"].double()
    names = ["q", "k", "v", "g", "beta", "qn", "kn", "vn", "gn", "betan", "initial_state"]
    ins = tuple(P[n].clone().requires_grad_() for n in names)

    def fn(*xs):
        kw = {**P, **dict(zip(names, xs))}
        o, on, ht = naive_two_stream_gated_delta_rule(**kw, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return o, on, ht

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "simple"])
def test_conv_gradcheck_fp64(impl):
    from flare_kernels.two_stream.torch_conv import torch_two_stream_causal_conv1d

    f = naive_two_stream_causal_conv1d if impl == "naive" else torch_two_stream_causal_conv1d
    P, _ = make_problem((5, 2), 1, 1, 2, 2, max_win=3, seed=3)
    gen = torch.Generator().manual_seed(0)
    D, W = 3, 3
    ins = (torch.randn(1, 7, D, generator=gen, dtype=torch.float64).requires_grad_(),
           torch.randn(1, P["qn"].shape[1], D, generator=gen, dtype=torch.float64).requires_grad_(),
           torch.randn(D, W, generator=gen, dtype=torch.float64).requires_grad_(),
           torch.randn(D, generator=gen, dtype=torch.float64).requires_grad_(),
           torch.randn(2, D, W - 1, generator=gen, dtype=torch.float64).requires_grad_())
    win = (P["window_doc"], P["window_prefix"], P["window_offsets"])

    def fn(x, xn, w, b, h):
        return f(x, xn, w, *win, bias=b, cu_seqlens=P["cu_seqlens"], initial_state=h, output_final_state=True)

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_simple_conv_matches_naive():
    P, seed = make_problem((30, 3, 17), 1, 1, 2, 2, max_win=6)
    gen = torch.Generator().manual_seed(seed)
    D, W = 8, 4
    x, xn = torch.randn(1, 50, D, generator=gen), torch.randn(1, P["qn"].shape[1], D, generator=gen)
    wt = torch.randn(D, W, generator=gen)
    win = (P["window_doc"], P["window_prefix"], P["window_offsets"])
    for act in ("silu", None):
        for init in (None, torch.randn(3, D, W - 1, generator=gen)):
            a = ts.two_stream_causal_conv1d(x, xn, wt, *win, cu_seqlens=P["cu_seqlens"], initial_state=init,
                                            output_final_state=True, activation=act, backend="simple")
            b = naive_two_stream_causal_conv1d(x, xn, wt, *win, cu_seqlens=P["cu_seqlens"], initial_state=init,
                                               output_final_state=True, activation=act)
            for u, v in zip(a, b):
                assert rel(u, v) < 1e-6, seed


# ----------------------------------------------------------------------------------------------------------------
# CPU helpers behind the fused path: torch chunk representation and the dqkwg fallback
# ----------------------------------------------------------------------------------------------------------------


def test_torch_chunk_fwd_and_dqkwg_fallback_match_autograd():
    from flare_kernels.two_stream._meta import build_meta
    from flare_kernels.two_stream._torch_chunk import chunk_bwd_dqkwg_torch, chunk_fwd_torch

    P, seed = make_problem((70, 5, 130), 1, 2, 16, 8, block=4)
    T = P["q"].shape[1]
    meta = build_meta(T, P["cu_seqlens"], P["window_doc"], P["window_prefix"], P["window_offsets"], "cpu")
    scale = 16**-0.5
    ch = chunk_fwd_torch(P["q"][0], P["k"][0], P["v"][0], P["g"][0], P["beta"][0], scale, P["initial_state"], meta)
    o, _, ht = naive_two_stream_gated_delta_rule(**P, output_final_state=True)
    assert rel(ch["o"], o[0]) < 1e-5 and rel(ch["ht"], ht) < 1e-5, seed
    # dqkwg: the chunk outputs and end states as functions of (q, k, w, G) with u, h_c held fixed
    gen = torch.Generator().manual_seed(seed)
    d = lambda x: x.double().clone().requires_grad_()  # noqa: E731
    q, k, w, G = d(P["q"][0]), d(P["k"][0]), d(ch["w"]), d(ch["gc"] * torch.log(torch.tensor(2.0)))
    h, u = ch["h"].double(), ch["u"].double()
    do = torch.randn(T, 2, 8, generator=gen, dtype=torch.float64)
    dh = torch.randn(meta.n_chunks, 2, 16, 8, generator=gen, dtype=torch.float64)
    dvx = torch.randn(T, 2, 8, generator=gen, dtype=torch.float64)  # gradient w.r.t. v_new from elsewhere
    loss = 0
    ke, qe = k.repeat_interleave(2, 1), q.repeat_interleave(2, 1)
    vnew_all = []
    for c in range(meta.n_chunks):
        t0, n = int(meta.chunk_tok0[c]), int(meta.chunk_len[c])
        sl = slice(t0, t0 + n)
        vnew = u[sl] - torch.einsum("ihk,hkv->ihv", w[sl], h[c])
        Gc = G[sl]
        att = torch.tril(torch.einsum("ihk,jhk->hij", qe[sl], ke[sl]) * torch.exp(Gc.t()[:, :, None] - Gc.t()[:, None, :]))
        oc = scale * (torch.einsum("ihk,hkv->ihv", qe[sl], h[c]) * torch.exp(Gc)[..., None]
                      + torch.einsum("hij,jhv->ihv", att, vnew.detach()))
        send = torch.exp(Gc[-1])[:, None, None] * h[c] + torch.einsum(
            "jhk,jhv->hkv", ke[sl] * torch.exp(Gc[-1][None] - Gc)[..., None], vnew.detach())
        loss = loss + (oc * do[sl]).sum() + (send * dh[c]).sum() + (vnew * dvx[sl]).sum()
        vnew_all.append(vnew.detach())
    loss.backward()
    dq, dk, dw, dg = chunk_bwd_dqkwg_torch(P["q"][0], P["k"][0], ch["v_new"].float(), ch["w"].float(),
                                           ch["gc"].float(), ch["h"].float(), dvx.float(), do.float(), dh.float(),
                                           scale, meta)
    assert rel(dq, q.grad) < 1e-5 and rel(dk, k.grad) < 1e-5 and rel(dw, w.grad) < 1e-5, seed
    assert rel(dg, G.grad) < 1e-5, seed


# ----------------------------------------------------------------------------------------------------------------
# GPU: fused / simple vs naive, forward and every gradient
# ----------------------------------------------------------------------------------------------------------------

TOL_BF16 = dict(o=0.005, on=0.005, ht=0.005, q=0.008, k=0.008, v=0.008, qn=0.008, kn=0.008, vn=0.008,
                initial_state=0.008, g=0.02, beta=0.02, gn=0.02, betan=0.02)
TOL_FP32 = {k_: v_ / 2.5 for k_, v_ in TOL_BF16.items()}
GRAD_NAMES = ["q", "k", "v", "g", "beta", "qn", "kn", "vn", "gn", "betan", "initial_state"]


def compare_gdn(P, backend, dtype, l2=False, final=True, seed=None):
    """Forward + backward of ``backend`` vs the naive twin (fp32 on the same bf16/fp32 values). Returns errors."""
    from flare_kernels.two_stream import triton_gdn

    triton_gdn.NAN_FILL = True
    dev = P["q"].device
    gen = torch.Generator(device="cpu").manual_seed(seed or 0)
    T, Tn, HV, V = P["v"].shape[1], P["vn"].shape[1], P["v"].shape[2], P["v"].shape[3]
    do = torch.randn(1, T, HV, V, generator=gen).to(dev)
    don = torch.randn(1, Tn, HV, V, generator=gen).to(dev)
    dht = torch.randn(P["cu_seqlens"].numel() - 1, HV, P["q"].shape[3], V, generator=gen).to(dev) * 0.1

    def run(fn, cast):
        leaves = {n: (P[n].to(cast) if P[n].is_floating_point() else P[n]).detach().clone().requires_grad_()
                  for n in GRAD_NAMES if P[n] is not None}
        kw = {**P, **leaves}
        o, on, ht = fn(**kw)
        loss = (o.float() * do).sum() + (on.float() * don).sum()
        if final:
            loss = loss + (ht.float() * dht).sum()
        loss.backward()
        out = dict(o=o, on=on, ht=ht)
        out.update({n: x.grad for n, x in leaves.items()})
        return out

    def fused(**kw):
        if backend.startswith("fused:"):  # an alternative window implementation of the fused path
            from flare_kernels.two_stream.fused import fused_two_stream_gated_delta_rule

            return fused_two_stream_gated_delta_rule(**kw, output_final_state=final, use_qk_l2norm_in_kernel=l2,
                                                     _window=backend.split(":", 1)[1])
        return ts.two_stream_gated_delta_rule(**kw, output_final_state=final, use_qk_l2norm_in_kernel=l2,
                                              backend=backend)

    def ref(**kw):
        return naive_two_stream_gated_delta_rule(**kw, output_final_state=final, use_qk_l2norm_in_kernel=l2)

    got = run(fused, dtype)
    exp = run(ref, torch.float32)
    errs = {}
    for n, e in exp.items():
        if e is None:
            continue
        a = got[n]
        assert a is not None, n
        errs[n] = rel(a, e)
    return errs


def _check(errs, dtype, seed, name=""):
    import json
    import os

    tol = TOL_BF16 if dtype == torch.bfloat16 else TOL_FP32
    if os.environ.get("FLARE_KERNEL_TEST_LOG"):  # record every measured error (the GPU run keeps this file)
        with open(os.environ["FLARE_KERNEL_TEST_LOG"], "a") as f:
            f.write(json.dumps(dict(test=name or os.environ.get("PYTEST_CURRENT_TEST", "?"), seed=seed,
                                    dtype=str(dtype), errs=errs)) + "\n")
    bad = {n: e for n, e in errs.items() if not (e <= tol[n])}
    assert not bad, f"seed={seed} errors over tolerance: {bad} (all: {errs})"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("block", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("with_h0", [True, False])
def test_fused_gdn_vs_naive_bf16(block, with_h0):
    P, seed = make_problem((200, 37, 131), 2, 4, 64, 64, block=block, with_h0=with_h0, dtype=torch.bfloat16,
                           device="cuda")
    _check(compare_gdn(P, "fused", torch.bfloat16, seed=seed), torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,K,l2", [(torch.bfloat16, 128, True), (torch.float32, 64, False)])
def test_fused_gdn_vs_naive_random_windows(dtype, K, l2):
    P, seed = make_problem((150, 64, 99), 1, 2, K, K, max_win=8, dtype=dtype, device="cuda")
    _check(compare_gdn(P, "fused", dtype, l2=l2, seed=seed), dtype, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("block", [1, 4])
def test_fused_gdn_vs_naive_scratch_ranges_bf16(block):
    """H == HV (the noisy q/k gradients are cast in the keys kernel, nothing summed after) and the backward's
    scratch forced to one chunk per launch (the launches walk the chunks in ranges, as at long T)."""
    from flare_kernels.two_stream import triton_chunk_windows_bwd as split

    P, seed = make_problem((200, 37, 131), 2, 2, 128, 128, block=block, dtype=torch.bfloat16, device="cuda")
    saved = split.SCRATCH_BUDGET
    split.SCRATCH_BUDGET = 1
    try:
        errs = compare_gdn(P, "fused", torch.bfloat16, seed=seed)
    finally:
        split.SCRATCH_BUDGET = saved
    _check(errs, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", ["chunk", "chunk-f32", "loop", "chunk-triton-one-kernel-bwd"])
@pytest.mark.parametrize("layout", ["random", "block3"])
def test_fused_window_variants_vs_naive(window, layout):
    """The other window implementations of the fused path (the torch chunk map with bf16 / fp32 operands, the
    per-window Triton loop, the Triton map with its one-kernel backward)."""
    from flare_kernels.two_stream import triton_chunk_windows as tcw

    if layout == "random":
        P, seed = make_problem((150, 64, 99), 1, 2, 128, 128, max_win=8, dtype=torch.bfloat16, device="cuda")
    else:
        P, seed = make_problem((200, 37, 131), 2, 4, 64, 64, block=3, dtype=torch.bfloat16, device="cuda")
    split = tcw.BWD_SPLIT
    tcw.BWD_SPLIT = window != "chunk-triton-one-kernel-bwd"
    try:
        errs = compare_gdn(P, f"fused:{window.replace('-one-kernel-bwd', '')}", torch.bfloat16,
                           l2=layout == "random", seed=seed)
    finally:
        tcw.BWD_SPLIT = split
    _check(errs, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_simple_gdn_vs_naive():
    P, seed = make_problem((130, 70), 2, 4, 64, 64, block=4, dtype=torch.bfloat16, device="cuda")
    _check(compare_gdn(P, "simple", torch.bfloat16, seed=seed), torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_conv_vs_naive(dtype):
    from flare_kernels.two_stream import triton_gdn

    triton_gdn.NAN_FILL = True
    P, seed = make_problem((200, 3, 131), 1, 1, 2, 2, max_win=8, device="cuda")
    gen = torch.Generator().manual_seed(seed)
    D, W = 200, 4
    T, Tn = 334, P["qn"].shape[1]
    base = dict(x=torch.randn(1, T, D, generator=gen), xn=torch.randn(1, Tn, D, generator=gen),
                weight=torch.randn(D, W, generator=gen) * 0.5, bias=torch.randn(D, generator=gen),
                initial_state=torch.randn(3, D, W - 1, generator=gen))
    dy, dyn = torch.randn(1, T, D, generator=gen).cuda(), torch.randn(1, Tn, D, generator=gen).cuda()
    win = (P["window_doc"], P["window_prefix"], P["window_offsets"])

    def run(backend, cast):
        leaves = {n: t.cuda().to(cast).requires_grad_() for n, t in base.items()}
        y, yn, fin = ts.two_stream_causal_conv1d(leaves["x"], leaves["xn"], leaves["weight"], *win,
                                                 bias=leaves["bias"], cu_seqlens=P["cu_seqlens"],
                                                 initial_state=leaves["initial_state"], output_final_state=True,
                                                 backend=backend)
        ((y.float() * dy).sum() + (yn.float() * dyn).sum() + fin.float().sum()).backward()
        return [y, yn, fin] + [leaves[n].grad for n in base]

    got, exp = run("fused", dtype), run("reference", torch.float32)
    tol = 0.005 if dtype == torch.bfloat16 else 1e-5
    for n, a, b in zip(["y", "yn", "final", "dx", "dxn", "dw", "db", "dinit"], got, exp):
        assert rel(a, b) <= tol, (seed, n, rel(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_hopper_guard_mode_is_decided():
    from flare_kernels.two_stream.fused import dqkwg_mode

    assert dqkwg_mode(torch.device("cuda")) in ("native", "bypass", "torch")
