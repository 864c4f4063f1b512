"""Our own Triton kernels (flare_kernels.two_stream) run on CPU under Triton's interpreter, at tiny sizes.

The interpreter must be switched on before triton is imported, so the real tests run in a fresh child process
(``test_interpreter_suite`` below spawns it with TRITON_INTERPRET=1); in this process nothing imports triton.
fla's kernels cannot run this way: here the clean-stream chunk quantities come from the pure-torch
``_torch_chunk.chunk_fwd_torch``, and our kernels are checked against torch autograd of the same maps.
"""

from __future__ import annotations

import os

import pytest

CHILD = os.environ.get("FLARE_INTERP_CHILD") == "1"

if not CHILD:

    def test_interpreter_suite(run_interpreted):
        run_interpreted(__file__, "FLARE_INTERP_CHILD")

else:
    import math

    import numpy as np  # noqa: F401
    import torch
    import triton.runtime.interpreter as _ti

    # numpy >= 2.4 refuses int() of a 1-element 1-d array, which the interpreter does for run-time loop bounds
    _orig_patch = _ti._patch_lang_tensor

    def _patch(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _ti._patch_lang_tensor = _patch

    from flare_kernels.two_stream import triton_gdn as tk

    tk.NAN_FILL = True  # every buffer our launchers allocate starts as NaN: unwritten elements fail the checks
    from flare_kernels.two_stream._meta import build_meta
    from flare_kernels.two_stream.naive import (_recurrent, naive_two_stream_causal_conv1d,
                                                naive_two_stream_gated_delta_rule)
    from flare_kernels.two_stream.triton_conv import triton_two_stream_causal_conv1d

    from two_stream_cases import clean_chunks, problem, rel, torch_window_map

    @pytest.mark.parametrize("seed,HV,K,V", [(0, 2, 32, 16), (1, 4, 16, 16)])
    def test_window_forward_matches_naive(seed, HV, K, V):
        P = problem(seed, HV=HV, K=K, V=V, H=1 if HV == 2 else 2)
        scale = K**-0.5
        meta, ch = clean_chunks(P, scale)
        o_ref, on_ref, ht_ref = naive_two_stream_gated_delta_rule(**P, output_final_state=True)
        # the torch chunk reference itself reproduces the clean stream
        assert rel(ch["o"], o_ref[0]) < 1e-5 and rel(ch["ht"], ht_ref) < 1e-5
        f = lambda x: x.float().contiguous()  # noqa: E731
        on, S = tk.window_forward(f(P["qn"][0]), f(P["kn"][0]), f(P["vn"][0]), f(P["gn"][0]), f(P["betan"][0]),
                                  f(P["k"][0]), f(ch["v_new"]), f(ch["gc"]), f(ch["h"]), meta, scale,
                                  store_state=True, run_window=True)
        assert torch.isfinite(on).all()
        assert rel(on, on_ref[0]) < 1e-4
        # boundary states vs the recurrence
        cu = P["cu_seqlens"].tolist()
        for w, (d, p) in enumerate(zip(P["window_doc"].tolist(), P["window_prefix"].tolist())):
            s, e = cu[d], cu[d] + p
            qe = P["q"][0, s:e].repeat_interleave(HV // P["q"].shape[2], 1)
            ke = P["k"][0, s:e].repeat_interleave(HV // P["q"].shape[2], 1)
            _, st = _recurrent(qe, ke, P["v"][0, s:e], P["g"][0, s:e], P["beta"][0, s:e], P["initial_state"][d])
            assert rel(S[w], st[-1]) < 1e-4, (w, d, p)

    @pytest.mark.parametrize("fused", [True, False])
    def test_window_backward_matches_autograd(fused):
        P = problem(3, H=1, HV=2, K=32, V=16, max_win=3)
        K = 32
        scale = K**-0.5
        meta, ch = clean_chunks(P, scale)
        gen = torch.Generator().manual_seed(7)
        leaves = [ch["h"], P["k"][0], ch["v_new"], ch["gc"] * math.log(2.0), P["qn"][0], P["kn"][0], P["vn"][0],
                  P["gn"][0], P["betan"][0]]
        leaves = [x.double().clone().requires_grad_() for x in leaves]
        on, S = torch_window_map(P, ch, meta, scale, leaves)
        don = torch.randn(on.shape, generator=gen, dtype=torch.float64)
        dS = torch.randn(S.shape, generator=gen, dtype=torch.float64)
        loss = (on * don).sum() if fused else (S * dS).sum()
        loss.backward()
        ref = [x.grad for x in leaves]
        f = lambda x: x.detach().float().contiguous()  # noqa: E731
        dv_clean = torch.zeros_like(f(ch["v_new"]))
        noisy = tuple(f(P[n][0]) for n in ("qn", "kn", "vn", "gn", "betan")) if fused else None
        out = tk.window_backward(noisy, f(don) if fused else None, None if fused else f(dS), f(P["k"][0]),
                                 f(ch["v_new"]), f(ch["gc"]), f(ch["h"]), dv_clean, meta, scale)
        T, H = P["k"].shape[1], 1
        assert rel(out["x_inj"], ref[0]) < 1e-4
        assert rel(out["dk"].view(T, H, 2, K).sum(2), ref[1]) < 1e-4
        assert rel(dv_clean, ref[2]) < 1e-4
        assert rel(out["dg"], ref[3]) < 1e-4
        if fused:
            Tn = P["qn"].shape[1]
            assert rel(out["dqn"].view(Tn, H, 2, K).sum(2), ref[4]) < 1e-4
            assert rel(out["dkn"].view(Tn, H, 2, K).sum(2), ref[5]) < 1e-4
            assert rel(out["dvn"], ref[6]) < 1e-4
            assert rel(out["dgn"], ref[7]) < 1e-4
            assert rel(out["dbn"], ref[8]) < 1e-4

    def chunk_case(case):
        """Window layouts for the chunk-map kernels: random windows (GQA, 2 V blocks at BV=16), FLARE B=1 and B=4."""
        from test_chunk_windows import flare_layout_problem

        from flare_kernels.two_stream.chunk_windows import window_slots

        P = {"random": lambda: problem(3, H=1, HV=2, K=32, V=16, max_win=3),
             "random-gqa": lambda: problem(4, H=2, HV=4, K=16, V=32, max_win=8, with_h0=False),
             "flare-b1": lambda: flare_layout_problem(5, T=131, B=1, views=1, V=16),
             "flare-b4-2views": lambda: flare_layout_problem(6, T=150, B=4, views=2, V=16)}[case]()
        scale = P["q"].shape[-1] ** -0.5
        meta, ch = clean_chunks(P, scale)
        f = lambda x: x.float().contiguous()  # noqa: E731
        noisy = tuple(f(P[n][0]) for n in ("qn", "kn", "vn", "gn", "betan"))
        clean = (f(P["k"][0]), f(ch["v_new"]), f(ch["gc"]), f(ch["h"]))
        return P, noisy, clean, meta, scale, window_slots(meta, P["qn"].shape[1], "cpu")

    @pytest.mark.parametrize("case", ["random", "random-gqa", "flare-b1", "flare-b4-2views"])
    def test_chunk_windows_triton_forward_matches_torch_map(case):
        """The Triton forward of the chunk-parallel window map == the torch map (fp32 in, interpreter)."""
        from flare_kernels.two_stream.chunk_windows import window_forward_chunked
        from flare_kernels.two_stream.triton_chunk_windows import chunk_windows_forward_triton

        _, noisy, clean, meta, scale, slots = chunk_case(case)
        args = (*noisy, *clean, meta, scale)
        got = chunk_windows_forward_triton(*args, slots, BV=16)
        ref = window_forward_chunked(*args, slots=slots)
        assert torch.isfinite(got).all()
        assert rel(got, ref) < 1e-5, rel(got, ref)

    @pytest.mark.parametrize("impl", ["one-kernel", "split", "split-blocks", "split-ranges"])
    @pytest.mark.parametrize("case", ["random", "random-gqa", "flare-b1", "flare-b4-2views"])
    def test_chunk_windows_triton_backward_matches_torch_map(case, impl):
        """The Triton backward of the chunk-parallel window map == the torch map's autograd (interpreter): the
        one-kernel backward (V blocks of 16) and the two-kernel one (default blocks, one launch; K and V blocks of 16
        with one chunk per launch; launches of all chunks but one, then a partial one)."""
        from flare_kernels.two_stream import triton_chunk_windows_bwd as split
        from flare_kernels.two_stream.chunk_windows import window_backward_chunked
        from flare_kernels.two_stream.triton_chunk_windows import chunk_windows_backward_triton

        P, noisy, clean, meta, scale, slots = chunk_case(case)
        don = torch.randn(P["vn"].shape[1:], generator=torch.Generator().manual_seed(1))
        dv_got, dv_ref = torch.full_like(clean[1], 0.25), torch.full_like(clean[1], 0.25)
        if impl == "one-kernel":
            got = chunk_windows_backward_triton(noisy, don, *clean, dv_got, meta, scale, slots, BV=16)
        else:
            saved = dict(split.KEYS_CONFIG), dict(split.VALUES_CONFIG), split.SCRATCH_BUDGET, split.scratch_chunks
            if impl == "split-blocks":  # several K blocks in the keys kernel, several V blocks (random-gqa)
                split.KEYS_CONFIG["BK"], split.VALUES_CONFIG["BV"] = 16, 16
                split.SCRATCH_BUDGET = 1  # -> one chunk per launch
            if impl == "split-ranges":
                split.scratch_chunks = lambda n_chunks, per_chunk, budget: n_chunks - 1  # the last launch partial
            try:
                got = chunk_windows_backward_triton(noisy, don, *clean, dv_got, meta, scale, slots)
            finally:
                split.KEYS_CONFIG.update(saved[0])
                split.VALUES_CONFIG.update(saved[1])
                split.SCRATCH_BUDGET, split.scratch_chunks = saved[2], saved[3]
            assert meta.n_chunks >= 3
        ref = window_backward_chunked(noisy, don, *clean, dv_ref, meta, scale, slots=slots)
        assert rel(dv_got, dv_ref) < 1e-5, "dv_clean"
        for name in ref:
            assert torch.isfinite(got[name]).all(), name
            assert rel(got[name], ref[name]) < 1e-5, (name, rel(got[name], ref[name]))


    def test_scratch_chunks_spreads_launches_evenly():
        from flare_kernels.two_stream.triton_chunk_windows_bwd import scratch_chunks

        mib = 1 << 20
        assert scratch_chunks(128, 3 * mib // 2, 64 * mib) == 32  # T=8192, B=1: 4 launches of 32 chunks
        assert scratch_chunks(128, mib, 1 << 30) == 128  # fits: one launch
        assert scratch_chunks(9, 1, 8) == 5  # 8 fit per launch: 2 launches, 5 + 4 chunks rather than 8 + 1
        assert scratch_chunks(5, 10**9, 1) == 1  # a chunk over the budget still runs, one per launch

    @pytest.mark.parametrize("K,V,with_h0", [(32, 16, True), (96, 32, False)])
    def test_bwd_dhu_injection_matches_autograd(K, V, with_h0):
        """L = <do, o_inter> + <R, v_new> + <dht, h_T> + sum_c <X_c, h_c> over independent (q,k,w,u,G,h0)."""
        gen = torch.Generator().manual_seed(11)
        lens = (70, 5, 130)
        H, HV = 1, 2
        T = sum(lens)
        cu = torch.tensor([0, *np.cumsum(lens).tolist()])
        meta = build_meta(T, cu, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                          torch.zeros(1, dtype=torch.long), "cpu")
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        q, k, w, u = r(T, H, K), r(T, H, K) * 0.2, r(T, HV, K) * 0.2, r(T, HV, V)
        g = torch.nn.functional.logsigmoid(r(T, HV)) * 0.3
        h0 = r(3, HV, K, V) * 0.3 if with_h0 else None
        do, R, dht = r(T, HV, V), r(T, HV, V), r(3, HV, K, V)
        X = r(meta.n_chunks, HV, K, V)
        scale = K**-0.5
        # chunk-local cumsum
        G = torch.zeros(T, HV, dtype=torch.float64)
        for c in range(meta.n_chunks):
            t0, n = int(meta.chunk_tok0[c]), int(meta.chunk_len[c])
            G[t0:t0 + n] = g[t0:t0 + n].cumsum(0)
        leaves = [x.clone().requires_grad_() for x in (q, k, w, u)]
        h0l = h0.clone().requires_grad_() if with_h0 else None
        ql, kl, wl, ul = leaves
        ke = kl.repeat_interleave(HV // H, 1)
        qe = ql.repeat_interleave(HV // H, 1)
        loss = 0
        c = 0
        hs, vnews = [], torch.zeros(T, HV, V, dtype=torch.float64)
        vn_list = []
        for d in range(3):
            S = h0l[d] if with_h0 else torch.zeros(HV, K, V, dtype=torch.float64)
            while c < meta.n_chunks and int(meta.chunk_tok0[c]) < int(cu[d + 1]):
                t0, n = int(meta.chunk_tok0[c]), int(meta.chunk_len[c])
                S.retain_grad() if S.requires_grad else None
                hs.append(S)
                sl = slice(t0, t0 + n)
                vnew = ul[sl] - torch.einsum("ihk,hkv->ihv", wl[sl], S)
                vn_list.append((sl, vnew))
                o_inter = scale * torch.einsum("ihk,hkv->ihv", qe[sl], S) * torch.exp(G[sl])[..., None]
                loss = loss + (o_inter * do[sl]).sum() + (vnew * R[sl]).sum() + (S * X[c]).sum()
                gl = G[t0 + n - 1]
                S = torch.exp(gl)[:, None, None] * S + torch.einsum(
                    "jhk,jhv->hkv", ke[sl] * torch.exp(gl[None] - G[sl])[..., None], vnew)
                c += 1
            loss = loss + (S * dht[d]).sum()
        hs_req = [s for s in hs]
        for s in hs_req:
            if s.requires_grad:
                s.retain_grad()
        vgrads = []
        for sl, vn_ in vn_list:
            vn_.retain_grad()
            vgrads.append((sl, vn_))
        loss.backward()
        # reference dh[c] = grad w.r.t. the state leaving chunk c = grad of h_{c+1} (or of the final state)
        f = lambda x: x.float().contiguous()  # noqa: E731
        dh, dh0, dv2 = tk.bwd_dhu_inj(f(q), f(k), f(w), f(G / math.log(2.0)), f(h0) if with_h0 else None, f(dht),
                                      f(do), f(R), f(X), scale, meta)
        ref_dv = torch.zeros(T, HV, V, dtype=torch.float64)
        for sl, vn_ in vgrads:
            ref_dv[sl] = vn_.grad
        assert rel(dv2, ref_dv) < 1e-4
        if with_h0:
            assert rel(dh0, h0l.grad) < 1e-4
        # dh[c] (gradient w.r.t. the state leaving chunk c) = total gradient of the state entering chunk c+1
        cu_l = cu.tolist()
        c = 0
        for d in range(3):
            idx = [i for i in range(meta.n_chunks) if cu_l[d] <= int(meta.chunk_tok0[i]) < cu_l[d + 1]]
            for j, ci in enumerate(idx):
                if j + 1 < len(idx):
                    ref = hs[idx[j + 1]].grad
                else:
                    ref = dht[d]
                assert rel(dh[ci], ref) < 1e-4, (d, ci)

    @pytest.mark.parametrize("silu,bias,init,width", [(True, True, True, 4), (False, False, False, 3),
                                                      (True, False, True, 2)])
    def test_conv_matches_naive(silu, bias, init, width):
        P = problem(5, lens=(40, 3, 21), max_win=5)
        gen = torch.Generator().manual_seed(13)
        D = 80
        T, Tn = P["q"].shape[1], P["qn"].shape[1]
        x = torch.randn(1, T, D, generator=gen, dtype=torch.float64)
        xn = torch.randn(1, Tn, D, generator=gen, dtype=torch.float64)
        wt = torch.randn(D, width, generator=gen, dtype=torch.float64)
        b = torch.randn(D, generator=gen, dtype=torch.float64) if bias else None
        h = torch.randn(3, D, width - 1, generator=gen, dtype=torch.float64) if init else None
        dy = torch.randn(1, T, D, generator=gen, dtype=torch.float64)
        dyn = torch.randn(1, Tn, D, generator=gen, dtype=torch.float64)
        win = (P["window_doc"], P["window_prefix"], P["window_offsets"])

        def run(fn, dtype):
            ins = [t.to(dtype).clone().requires_grad_() if t is not None else None for t in (x, xn, wt, b, h)]
            y, yn, fin = fn(ins[0], ins[1], ins[2], *win, bias=ins[3], cu_seqlens=P["cu_seqlens"],
                            initial_state=ins[4], output_final_state=True, activation="silu" if silu else None)
            ((y * dy.to(dtype)).sum() + (yn * dyn.to(dtype)).sum() + (fin * 0.5).sum()).backward()
            return [y, yn, fin] + [t.grad if t is not None else None for t in ins]

        ref = run(naive_two_stream_causal_conv1d, torch.float64)
        got = run(triton_two_stream_causal_conv1d, torch.float32)
        names = ["y", "yn", "final", "dx", "dxn", "dw", "db", "dinit"]
        for n, a, bb in zip(names, got, ref):
            if bb is None:
                assert a is None, n
                continue
            assert torch.isfinite(a).all(), n
            assert rel(a, bb) < 1e-5, (n, rel(a, bb))
