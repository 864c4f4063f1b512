"""``flarectl.engine.layer_chain``: a block's out_proj, MLP and the next block's norm + input projection in one
persistent launch with grid barriers, against its pure-torch twin and against the unchained step.

The kernel runs on CPU under Triton's interpreter in a child process (as tests/test_engine_kernels.py), one program
for the whole chain (programs run one after another there, so a barrier could not be met by more) and several
programs per phase alone (``launch_phases``: the partition of tiles over programs). Outputs are NaN-filled first
(``gemv.NAN_FILL``). In this process: the op's registration, the twin's agreement with the unchained step's own
twins, and the dispatch rules. GPU-only tests (``-m gpu``) run the real grid with its barriers, graphed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

CHILD = os.environ.get("FLARE_LAYER_CHAIN_CHILD") == "1"


def _problem(M, D, KV, inter, NN, dtype=torch.float32, device="cpu", seed=0):
    """Random arguments of ``layer_chain``: o [M, KV], hidden [M, D], w_out [D, KV], w_gate_up [2I, D], w_down [D, I],
    w_next [NN, D] (None for NN = 0), eps values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = dict(o=r(M, KV), hidden=r(M, D), w_out=r(D, KV) / KV ** 0.5, w_gate_up=r(2 * inter, D) / D ** 0.5,
                eps_mlp=1e-6, w_down=r(D, inter) / inter ** 0.5,
                w_next=r(NN, D) / D ** 0.5 if NN else None, eps_next=1e-5)
    return {k: v.to(device, dtype) if torch.is_tensor(v) else v for k, v in args.items()}


def _call(fn, a, **kw):
    return fn(a["o"], a["hidden"], a["w_out"], a["w_gate_up"], a["eps_mlp"], a["w_down"], a["w_next"], a["eps_next"],
              **kw)


def _close_to_truth(got, a, slack=3.0):
    """bf16: each output's distance to the fp64 chain is within ``slack`` x the twin's own distance (+ 1 bf16 ulp
    of the largest value): the kernel rounds like the twin, not necessarily bit for bit (the interpreter truncates
    fp32 -> bf16)."""
    from flarectl.engine.layer_chain import layer_chain_reference

    truth = _call(layer_chain_reference, {k: v.double() if torch.is_tensor(v) else v for k, v in a.items()})
    twin = _call(layer_chain_reference, a)
    for g, t, w in zip(got, truth, twin):
        if t.numel():
            assert not g.isnan().any()
            ulp = float(t.abs().max()) * 2.0 ** -7
            assert float((g.double() - t).abs().max()) <= slack * float((w.double() - t).abs().max()) + ulp


if not CHILD:
    from flarectl.engine import layer_chain as lc

    def test_interpreter_suite(run_interpreted):
        run_interpreted(__file__, "FLARE_LAYER_CHAIN_CHILD", timeout=900)

    def test_op_registration_and_cpu_twin():
        """The op passes opcheck (with and without the next projection); on CPU it is the twin, and the twin is the
        unchained step's own twins composed: out_proj + add, the fused norm gate|up, down + add, the fused norm
        input projection."""
        from flarectl.engine import gemv, norm_gemv

        for NN in (40, 0):
            a = _problem(5, 32, 48, 24, NN)
            torch.library.opcheck(lc.layer_chain, tuple(a.values()))
            h2, proj = _call(lc.layer_chain, a)
            for dtype in (torch.float32, torch.bfloat16):
                b = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in a.items()}
                h1 = b["hidden"] + gemv.skinny_linear_reference(b["o"], b["w_out"])
                act, _ = norm_gemv.norm_linear_reference(h1, None, b["w_gate_up"], b["eps_mlp"], True)
                want_h2 = h1 + gemv.skinny_linear_reference(act, b["w_down"])
                got_h2, got_proj = _call(lc.layer_chain_reference, b)
                assert torch.equal(got_h2, want_h2)
                if NN:
                    want, _ = norm_gemv.norm_linear_reference(want_h2, None, b["w_next"], b["eps_next"], False)
                    assert torch.equal(got_proj, want)
                else:
                    assert got_proj.shape == (5, 0)
            torch.testing.assert_close(h2, _call(lc.layer_chain_reference, a)[0])
            assert proj.shape == (5, NN)

    def test_dispatch_rules(monkeypatch):
        """``applies``: at most MAX_ROWS rows, one dtype, contiguous weights of matching shapes, every K a multiple
        of 16, CUDA or interpreted (not plain CPU). Tiles: narrowest power of two with one tile per program.
        ``resolve``: the flag, else the env; only with the skinny kernels, never on plain CPU."""
        a = _problem(4, 32, 48, 24 * 2, 40)
        args = (a["o"], a["hidden"], a["w_out"], a["w_gate_up"], a["w_down"], a["w_next"])
        assert not lc.applies(*args)  # CPU, not interpreting
        assert [lc.block_k(2048, 16, 2), lc.block_k(6144, 128, 2), lc.block_k(2048, 64, 2), lc.block_k(48, 16, 2),
                lc.block_k(2048, 16, 4)] == [512, 128, 256, 16, 512]
        assert lc.block_k(40, 16, 2) is None
        shapes = ((8224, False), (2048, False), (12288, True), (5120, False), (10 ** 6, False))
        assert [lc.tile_n(n, 132, glu, "fit") for n, glu in shapes] == [64, 16, 128, 64, 128]
        assert [lc.tile_n(n, 132, glu, "balance") for n, glu in shapes] == [64, 16, 32, 16, 32]
        assert lc.tile_n(160, 2, True, "balance") == 32 and lc.tile_n(160, 2, True, "fit") == 128
        for tiling in lc.TILINGS:
            assert lc.tile_n(12288, 1, True, tiling) == 128 and lc.tile_n(40, 8, True, tiling) == 32
        cpu = torch.device("cpu")
        assert not lc.resolve(True, True, cpu)
        monkeypatch.setattr(lc.gemv, "_INTERPRET", True)
        assert lc.applies(*args)
        assert lc.applies(*args[:5], None)
        big = torch.randn(lc.MAX_ROWS + 1, 48)
        assert not lc.applies(big, torch.randn(lc.MAX_ROWS + 1, 32), *args[2:])
        assert not lc.applies(args[0], args[1], args[2].t().contiguous().t(), *args[3:])  # non-contiguous
        assert not lc.applies(args[0].double(), *args[1:])
        assert not lc.applies(args[0], args[1], args[2], None, args[4], args[5])
        assert not lc.applies(args[0], args[1], args[2], args[3], args[4], torch.randn(40, 16))  # next's K != D
        odd = _problem(4, 32, 40, 48, 0)  # KV = 40: no common K block
        assert not lc.applies(odd["o"], odd["hidden"], odd["w_out"], odd["w_gate_up"], odd["w_down"], None)
        assert lc.resolve(True, True, cpu) and not lc.resolve(True, False, cpu) and not lc.resolve(False, True, cpu)
        monkeypatch.setenv("FLARECTL_ENGINE_LAYER_CHAIN", "1")
        assert lc.resolve(None, True, cpu)
        monkeypatch.setenv("FLARECTL_ENGINE_LAYER_CHAIN", "0")
        assert not lc.resolve(None, True, cpu)

    def test_static_step_plans_chains_only_when_asked():
        """Off by default and on plain CPU; the plan (under the interpreter's rules): every layer closes with the
        next layer's folded input weight, the last with none; never without the folded norms."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        assert not SlotBackend(m, 2, 32, fuse=True, gemv=True, fuse_norm=True).eager.layer_chain
        assert not SlotBackend(m, 2, 32, fuse=True, gemv=True, fuse_norm=True, layer_chain=True).eager.layer_chain
        lc.gemv._INTERPRET = True
        try:
            on = SlotBackend(m, 2, 32, fuse=True, gemv=True, fuse_norm=True, layer_chain=True).eager
            off = SlotBackend(m, 2, 32, fuse=True, gemv=True, fuse_norm=False, layer_chain=True).eager
        finally:
            lc.gemv._INTERPRET = False
        assert on.layer_chain and not off.layer_chain
        n = len(m.layers)
        for i in range(n):
            w_next, eps = on.fused[i]["chain"]
            if i + 1 < n:
                key = "w_qkv" if "w_qkv" in on.fused[i + 1] else "w_in"
                assert w_next is on.fused[i + 1][key] and eps == on.fused[i + 1]["eps_in"]
            else:
                assert w_next is None
        assert not any("chain" in f for f in off.fused.values())

    @pytest.mark.gpu
    @pytest.mark.parametrize("M,tiling,prefetch,preload,norm_loop", [
        (1, "fit", 0, 0, 0), (8, "fit", 0, 0, 0), (16, "fit", 0, 0, 0), (8, "balance", 0, 0, 0),
        (16, "balance", 0, 0, 0), (8, "fit", 1, 0, 0), (8, "fit", 0, 1, 0), (8, "fit", 0, 1, 1),
        (16, "balance", 0, 1, 1)])
    def test_layer_chain_on_cuda_matches_twin(M, tiling, prefetch, preload, norm_loop, monkeypatch):
        """The real grid (one program per SM, barriers, with and without the L2 prefetch, the preload, the norm's
        sums in the K loop) at the Qwen3.5-2B shapes (bf16; GDN out_proj 2048, MLP 6144, next in_proj 8224 (GDN) /
        5120 (attention) / none), eager and replayed in a CUDA graph: close to the fp64 chain as the twin is, bitwise
        the same on every replay, the barrier words back at zero, no failed spin."""
        if not torch.cuda.is_available():
            pytest.skip("no CUDA")
        monkeypatch.setattr(lc, "TILING", tiling)
        monkeypatch.setattr(lc, "PREFETCH", prefetch)
        monkeypatch.setattr(lc, "PRELOAD", preload)
        monkeypatch.setattr(lc, "NORM_LOOP", norm_loop)
        dev = torch.device("cuda")
        for NN in (8224, 5120, 0):
            a = _problem(M, 2048, 2048, 6144, NN, torch.bfloat16, dev, seed=M)
            eager = _call(lc.layer_chain, a)
            _close_to_truth(eager, a)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                _call(lc.layer_chain, a)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                graphed = _call(lc.layer_chain, a)
            for _ in range(3):
                g.replay()
                torch.cuda.synchronize()
                for x, y in zip(graphed, eager):
                    assert torch.equal(x, y)
            assert lc.sync_buffer(dev)[:2].tolist() == [0, 0] and lc.failures(dev) == 0

    @pytest.mark.gpu
    def test_static_step_layer_chain_on_cuda_equals_unchained():
        """Graphed and compiled (the CUDA default), bf16 debug hybrid: the chained step's logits are close to the
        unchained step's and give the same greedy tokens; no failed spin."""
        if not torch.cuda.is_available():
            pytest.skip("no CUDA")
        from engine_helpers import cuda_ar_steps

        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="bfloat16", device="cuda", seed=1)
        outs = []
        for chain in (False, True):
            b = SlotBackend(m, 4, 64, layer_chain=chain)
            assert b.eager.layer_chain == chain
            outs.append(cuda_ar_steps(b))
        for a, r in zip(outs[1], outs[0]):
            torch.testing.assert_close(a, r, rtol=3e-2, atol=3e-2 * float(r.abs().max()))
            assert torch.equal(a.argmax(-1), r.argmax(-1))
        assert lc.failures(torch.device("cuda")) == 0

else:
    from flarectl.engine import gemv
    from flarectl.engine import layer_chain as lc

    gemv.NAN_FILL = True

    @pytest.mark.parametrize("M,D,KV,inter,NN", [(1, 32, 48, 16, 56), (5, 48, 32, 48, 200), (16, 64, 96, 48, 0),
                                                  (3, 16, 16, 16, 24)])
    def test_kernel_matches_twin(M, D, KV, inter, NN):
        """One program for the whole chain (every phase loops over all its tiles; odd N leaves partial tiles):
        fp32 to 1e-5 of the twin; bf16 as close to the fp64 chain as the twin is; the norms' sums of squares before
        the K loop or in it (``NORM_LOOP``), each with the first weight block of every phase preloaded before its
        barrier (``PRELOAD``) giving the same bits as without."""
        a = _problem(M, D, KV, inter, NN, seed=M + D)
        b = {k: v.bfloat16() if torch.is_tensor(v) else v for k, v in a.items()}
        for norm_loop in (False, True):
            got = _call(lc.launch, a, preload=False, norm_loop=norm_loop)
            for g, w in zip(got, _call(lc.layer_chain_reference, a)):
                assert g.shape == w.shape and not g.isnan().any()
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            for g, p in zip(got, _call(lc.launch, a, preload=True, norm_loop=norm_loop)):
                assert torch.equal(g, p)
            for preload in (False, True):
                _close_to_truth(_call(lc.launch, b, preload=preload, norm_loop=norm_loop), b)
        assert lc.sync_buffer(torch.device("cpu")).tolist() == [0, 0, 0, 0]

    @pytest.mark.parametrize("grid,tiling,preload,norm_loop", [
        (2, "fit", False, False), (3, "fit", False, False), (7, "fit", False, False), (2, "balance", False, False),
        (3, "balance", False, False), (3, "fit", True, False), (2, "balance", True, True), (7, "fit", True, True),
        (3, "balance", False, True)])
    def test_phases_on_several_programs_match_one(grid, tiling, preload, norm_loop, monkeypatch):
        """Each phase alone on ``grid`` programs (tiles pid, pid + grid, ...) gives the one-program chain's values
        bitwise (fp32), intermediates included; 'balance' gives programs several tiles (gate|up on 2: 3 and 2);
        ``preload``: each program's first tile starts from its preloaded block, the later ones do not (7 programs:
        some have no tile, so their preload is masked); ``norm_loop``: against the one-program chain that takes the
        sums of squares in the K loop too."""
        monkeypatch.setattr(lc, "TILING", tiling)
        a = _problem(6, 48, 32, 80, 72, seed=grid)
        h2, proj = _call(lc.launch, a, preload=False, norm_loop=norm_loop)
        p_h2, p_proj, h1, act = _call(lc.launch_phases, a, grid=grid, preload=preload, norm_loop=norm_loop)
        assert torch.equal(p_h2, h2) and torch.equal(p_proj, proj)
        want_h1 = a["hidden"] + a["o"] @ a["w_out"].t()
        torch.testing.assert_close(h1, want_h1, rtol=1e-5, atol=1e-5)
        assert act.shape == (6, 80) and not act.isnan().any()

    def test_interpreted_chain_refuses_several_programs():
        with pytest.raises(ValueError, match="one program"):
            _call(lc.launch, _problem(2, 16, 16, 16, 16), grid=2)

    def test_static_step_layer_chain_equals_unchained():
        """The engine step with the chain running (interpreted, fp32 debug hybrid) == the unchained fused-norm step
        == the plain step, over mixed clean / window steps with late commits (4 to 16 rows)."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        sys.path.insert(0, os.path.dirname(__file__))
        from test_engine_kernels import _mixed_steps

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        backends = [SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_norm=True, layer_chain=True),
                    SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_norm=True, layer_chain=False),
                    SlotBackend(m, 4, 64, fuse=False, gemv=False)]
        assert backends[0].eager.layer_chain and not backends[1].eager.layer_chain
        calls, orig = [], lc.launch
        lc.launch = lambda *a, **k: calls.append(1) or orig(*a, **k)
        try:
            for _ in _mixed_steps(backends, 11, random_wlen=True):
                pass
        finally:
            lc.launch = orig
        assert len(calls) >= 4 * len(m.layers), "the chain did not close every layer"

    def test_a_barrier_that_gave_up_fails_the_engine():
        """A flagged barrier (sync[2] counts a spin that gave up) ends the run in a FlareError before the finished
        request is handed out; a failure counted before the step was built is not this step's."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.engine.engine import Engine
        from flarectl.engine.requests import Request
        from flarectl.errors import FlareError
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        flags = lc.sync_buffer(torch.device("cpu"))
        flags[2] += 1  # an earlier engine's failure
        engine = Engine(m, concurrency=2, capacity=64)
        engine.backend = SlotBackend(m, 2, 64, fuse=True, gemv=True, fuse_norm=True, layer_chain=True)
        assert engine.backend.eager.layer_chain
        for p in ([5, 6, 7], [8, 9]):
            engine.submit(Request(prompt=p, max_new_tokens=3, stop_ids=[-1]))
        assert [r.finish_reason for r in engine.run()] == ["length", "length"]
        engine.submit(Request(prompt=[10, 11], max_new_tokens=4))
        engine.step()
        flags[2] += 1  # a barrier of the next step gives up
        with pytest.raises(FlareError, match="FLARECTL_ENGINE_LAYER_CHAIN=0"):
            engine.run()
        assert len(engine.done) == 2
