"""The engine's own Triton kernels against their pure-torch twins: the skinny GEMM (``flarectl.engine.gemv``) and
the GDN decode recurrence that commits states in place (``flarectl.engine.recurrence``); the L2 prefetch
(``flarectl.engine.prefetch``: a timing hint, so the step's values must not change with it).

The kernels run on CPU under Triton's interpreter, at tiny sizes, in a child process (the interpreter must be on
before triton is imported; same pattern as tests/test_kernels_interpret.py). Outputs and split-K partials are
NaN-filled first (``gemv.NAN_FILL``, ``recurrence.NAN_FILL``), so an element the kernels leave unwritten fails. In this process: the op's
registration (``torch.library.opcheck``), the dispatch rules, and the twin on CPU.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

CHILD = os.environ.get("FLARE_ENGINE_KERNELS_CHILD") == "1"

def _mixer_problem(seed, C, W, wc, H, HV, K, V, S=3, bias=False, dtype=torch.float32, device="cpu",
                   anchored=False):
    """Random inputs of ``gdn_mixer``: proj [C, W, 2HK + 2HV*V + 2HV], conv weights/state, gates' parameters,
    GDN state, counts <= wc (some rows with padding), commit flags; ``anchored``: ``seen`` = counts - 1 for some
    rows (windows anchored on the last clean token)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    D = 2 * H * K + HV * V
    proj = r(C, W, D + HV * V + 2 * HV)
    args = dict(proj=proj, conv_w=r(D, S + 1) * 0.5, conv_b=r(D) * 0.1 if bias else None,
                A_log=r(HV) * 0.3, dt_bias=r(HV) * 0.3, norm_w=1 + 0.1 * r(V),
                state=r(C, HV, K, V) * 0.3, conv=r(C, D, S),
                counts=torch.randint(0, wc + 1, (C,), generator=g) if wc else torch.zeros(C, dtype=torch.long),
                commit=torch.rand(C, generator=g) < 0.5)
    args["commit"][0], args["commit"][-1] = True, False
    if anchored:
        args["counts"][0] = args["counts"][-1] = wc  # a committing and a non-committing row anchored
        lower = (torch.rand(C, generator=g) < 0.5) | (torch.arange(C) == 0) | (torch.arange(C) == C - 1)
        args["seen"] = args["counts"] - (lower & (args["counts"] > 0)).long()
    return {k: (v.to(device, dtype) if v is not None and v.is_floating_point() else
                v.to(device) if v is not None else None) for k, v in args.items()}

def _run_mixer(fn, a, wc, H, HV, K, V, eps=1e-6):
    """Calls ``fn`` (the op, the chain or ``mixer.launch``) on copies: (out, state, conv, last_state,
    last_conv), with ``last_*`` NaN-filled first."""
    st, cv = a["state"].clone(), a["conv"].clone()
    ls, lc = torch.full_like(st, float("nan")), torch.full_like(cv, float("nan"))
    kw = {"seen": a["seen"]} if a.get("seen") is not None else {}
    out = fn(a["proj"], a["conv_w"], a["conv_b"], a["A_log"], a["dt_bias"], a["norm_w"], st, cv, ls, lc,
             a["counts"], a["commit"], wc, H, HV, K, V, eps, **kw)
    return out, st, cv, ls, lc


def _assert_same_steps(on, off):
    """Clean / window / commit steps on two backends of one fp32 model: bitwise the same logits, lengths, states and
    conv contexts (a timing-only option must change no value)."""
    for b in (on, off):
        b.prefill([0, 1, 2, 3], [[5, 6, 7], [], list(range(10, 30)), [9]])
    g = torch.Generator().manual_seed(0)
    for wc, ww in [(1, 0), (0, 4), (1, 3), (5, 0), (1, 0)]:
        ids = torch.randint(0, 250, (4, wc + ww), generator=g)
        counts, wlen = torch.full((4,), wc), torch.full((4,), ww)
        commit = torch.tensor([True, False, True, True])
        outs = [b.step(ids, counts, wlen, commit, wc) for b in (on, off)]
        for b in (on, off):
            b.finish_step(torch.tensor([False, True, False, False]))
        assert torch.equal(outs[0], outs[1])
    assert torch.equal(on.cache.lengths, off.cache.lengths)
    for i in on.cache.gdn:
        assert torch.equal(on.cache.gdn[i].state, off.cache.gdn[i].state)
        assert torch.equal(on.cache.gdn[i].conv, off.cache.gdn[i].conv)


def _core_problem(seed, C=3, wc=1, ww=0, hq=4, hkv=2, d=32, rot=8, S=40, dtype=torch.float32, gated=True,
                  norm=True, device="cpu"):
    """Arguments of ``attention_core`` (a q|k|v projection output, q/k norm gains, rotary tables, a random cache,
    lengths up to the capacity's last slot so the clean tokens' slots are capped, window lengths 0..ww)."""
    g = torch.Generator().manual_seed(seed)
    W = wc + ww
    width = hq * d * (2 if gated else 1) + 2 * hkv * d
    r = lambda *sh: torch.randn(*sh, generator=g).to(dtype).to(device)  # noqa: E731
    qkv = r(C, W, width)
    gq = (1 + 0.2 * torch.randn(d, generator=g)).to(device) if norm else None
    gk = (1 + 0.2 * torch.randn(d, generator=g)).to(device) if norm else None
    ang = torch.rand(C, W, rot // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(device)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(device)
    key, value = r(C, hkv, S, d), r(C, hkv, S, d)
    lengths = torch.tensor([5, 0, S - 1, S // 2] * C)[:C].to(device)
    counts = torch.randint(0, wc + 1, (C,), generator=g).to(device) if wc else torch.zeros(C, dtype=torch.long, device=device)
    wlen = torch.randint(0, ww + 1, (C,), generator=g).to(device)
    return [qkv, gq, gk, 1e-6, cos, sin, key, value, lengths, counts, wlen, wc, S, d ** -0.5, hq, hkv, gated]


def _clean_slot_mask(key: torch.Tensor, lengths: torch.Tensor, wc: int) -> torch.Tensor:
    """[C, Hkv, S, D] bool: the cache slots a step's wc clean tokens write (slot length + t, capped at S - 1). Derived
    from the lengths, not from which values changed: a bf16 value written can equal the one it replaces."""
    S = key.shape[2]
    slots = (lengths[:, None] + torch.arange(wc, device=key.device)).clamp(max=S - 1)  # [C, wc]
    rows = torch.zeros(key.shape[0], S, dtype=torch.bool, device=key.device)
    rows.scatter_(1, slots.long(), True)
    return rows[:, None, :, None].expand_as(key)


def _assert_bf16_near(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 results of one formula with roundings placed alike: at most 1% of elements beyond 2 ulp, none beyond 4
    ulp of the tensor's largest magnitude (a rounding flipped upstream can move a difference by a few ulp)."""
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    assert (diff > 1.6e-2 * want.abs() + 1e-2).float().mean() <= 0.01, diff.max()
    assert diff.max() <= 4 * 2.0 ** -7 * want.abs().max(), diff.max()


def _mixed_steps(backends, seed: int, random_wlen: bool = False):
    """Prefills four slots in every backend, then runs clean / window-only / mixed / clean steps with random counts,
    commits and late commits (``finish_step``) through all of them, asserting after each that every backend's
    logits equal the first's (1e-5); yields after each step (for further checks)."""
    for b in backends:
        b.prefill([0, 1, 2, 3], [[5, 6, 7], [], list(range(10, 30)), [9]])
    g = torch.Generator().manual_seed(seed)
    for wc, ww in [(1, 0), (0, 2), (2, 2), (1, 0)]:
        ids = torch.randint(0, 250, (4, wc + ww), generator=g)
        counts = torch.randint(0 if ww else 1, wc + 1, (4,), generator=g) if wc else torch.zeros(4).long()
        wlen = torch.randint(0, ww + 1, (4,), generator=g) if random_wlen else torch.full((4,), ww)
        commit = torch.rand(4, generator=g) < 0.6
        late = (torch.rand(4, generator=g) < 0.5) & ~commit
        outs = [b.step(ids, counts, wlen, commit, wc) for b in backends]
        for b in backends:
            b.finish_step(late)
        for out in outs[1:]:
            torch.testing.assert_close(outs[0], out, rtol=1e-5, atol=1e-5)
        yield


if not CHILD:
    from flarectl.engine import gemv

    def test_interpreter_suite(run_interpreted):
        run_interpreted(__file__, "FLARE_ENGINE_KERNELS_CHILD")

    def test_op_registration_and_cpu_twin():
        """The custom op passes opcheck (schema, fake tensor, autograd registration) and on CPU without the
        interpreter it is the twin."""
        x, w = torch.randn(5, 24), torch.randn(7, 24)
        torch.library.opcheck(gemv.skinny_linear, (x, w))
        torch.testing.assert_close(gemv.skinny_linear(x, w), x @ w.t())
        xb, wb = x.bfloat16(), w.bfloat16()
        ref = (xb.float() @ wb.float().t()).bfloat16()
        assert torch.equal(gemv.skinny_linear_reference(xb, wb), ref)

    def test_fused_op_registration_and_cpu_twin(monkeypatch):
        """``flarectl::skinny_linear_fused`` passes opcheck (both fusions, residual or None); on CPU without the
        interpreter it is the twin: residual + (silu(gate) * up) @ w^T with eager torch's roundings."""
        import torch.nn.functional as F

        x, w, r = torch.randn(3, 16), torch.randn(5, 8), torch.randn(3, 5)
        torch.library.opcheck(gemv.skinny_linear_fused, (x, w, r, True))
        torch.library.opcheck(gemv.skinny_linear_fused, (x[:, :8].contiguous(), w, None, False))
        torch.testing.assert_close(gemv.skinny_linear_fused(x, w, r, True), r + (F.silu(x[:, :8]) * x[:, 8:]) @ w.t())
        xb, wb, rb = x.bfloat16(), w.bfloat16(), r.bfloat16()
        hb = F.silu(xb[:, :8]) * xb[:, 8:]
        assert torch.equal(gemv.skinny_linear_fused_reference(xb, wb, rb, True),
                           rb + (hb.float() @ wb.float().t()).bfloat16())
        assert gemv.fused_applies(x, w, True) and not gemv.fused_applies(x, w, False)
        assert gemv.fused_applies(torch.randn(gemv.MAX_ROWS, 16), w, True)
        assert not gemv.fused_applies(torch.randn(gemv.MAX_ROWS + 1, 16), w, True)
        assert not gemv.fused_applies(x, None, True)
        assert gemv.resolve_fuse_down(None, True) == gemv.FUSE_DOWN_DEFAULT and not gemv.resolve_fuse_down(None, False)
        monkeypatch.setenv("FLARECTL_ENGINE_FUSE_DOWN", "1")
        assert gemv.resolve_fuse_down(None, True) and not gemv.resolve_fuse_down(None, False)
        monkeypatch.setenv("FLARECTL_ENGINE_FUSE_DOWN", "0")
        assert not gemv.resolve_fuse_down(None, True) and gemv.resolve_fuse_down(True, False)

    def test_decode_attention_op_registration_and_cpu_twin(monkeypatch):
        """``flarectl::decode_attention`` passes opcheck; on CPU without the interpreter it is the twin (the mask of
        ``attention_mask`` and SDPA over the first ``cap`` slots plus the window); ``resolve``'s rules."""
        from flarectl.engine import attention

        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 3, 4, 8, generator=g).transpose(1, 2)  # [C, Hq, W, D], W = 1 clean + 2 window
        key, value = torch.randn(2, 1, 20, 8, generator=g), torch.randn(2, 1, 20, 8, generator=g)
        kw, vw = torch.randn(2, 1, 2, 8, generator=g), torch.randn(2, 1, 2, 8, generator=g)
        lengths, counts, wlen = torch.tensor([3, 9]), torch.tensor([1, 0]), torch.tensor([2, 1])
        args = (q, key, value, kw, vw, lengths, counts, wlen, 1, 16, 0.35)
        torch.library.opcheck(attention.decode_attention, args)
        torch.testing.assert_close(attention.decode_attention(*args), attention.decode_attention_reference(*args))
        assert attention.resolve(True, torch.device("cpu")) and not attention.resolve(None, torch.device("cpu"))
        monkeypatch.setenv("FLARECTL_ENGINE_ATTN", "1")
        assert attention.resolve(None, torch.device("cuda")) and not attention.resolve(None, torch.device("cpu"))

    def test_attention_core_op_registration_plan_and_cpu_twin(monkeypatch):
        """``flarectl::attention_core`` passes opcheck (it mutates the cache); on CPU without the interpreter it is
        the twin; ``plan`` reads the q/k norms' gains (None where their form is unknown); ``resolve``'s rules."""
        from flarectl.engine import attention_core
        from flarectl.models.loading import load_model

        args = _core_problem(0, C=2, wc=2, ww=2)
        torch.library.opcheck(attention_core.attention_core, tuple(args))
        ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        torch.testing.assert_close(attention_core.attention_core(*args),
                                   attention_core.attention_core_reference(*ref), rtol=0, atol=0)
        assert torch.equal(args[6], ref[6]) and torch.equal(args[7], ref[7])
        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        attn = next(layer.self_attn for kind, layer in zip(m.layer_kinds, m.layers) if kind == "attention")
        gq, gk, eps = attention_core.plan(attn)
        x = torch.randn(3, attn.head_dim)
        torch.testing.assert_close(attention_core._norm(x, gq, eps), attn.q_norm(x))
        torch.testing.assert_close(attention_core._norm(x, gk, eps), attn.k_norm(x))
        attn_plain = torch.nn.Module()
        assert attention_core.plan(attn_plain) == (None, None, 0.0)
        attn_odd = torch.nn.Module()
        attn_odd.q_norm, attn_odd.k_norm = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
        assert attention_core.plan(attn_odd) is None
        monkeypatch.delenv("FLARECTL_ENGINE_ATTN_CORE", raising=False)
        assert attention_core.resolve(None, True) and not attention_core.resolve(False, True)  # on by default
        assert not attention_core.resolve(True, False) and not attention_core.resolve(None, False)  # needs the kernel
        monkeypatch.setenv("FLARECTL_ENGINE_ATTN_CORE", "0")
        assert not attention_core.resolve(None, True) and attention_core.resolve(True, True)

    def test_norm_linear_op_registration_and_cpu_twin(monkeypatch):
        """``flarectl::norm_linear`` passes opcheck (residual or None, with and without the activation); on CPU it
        is the twin, which is the unfused chain (residual add, RMSNorm with its gain, projection, silu(gate) * up)
        with the gain folded into the weight and the gate|up rows interleaved; ``project`` above MAX_ROWS (torch)
        agrees; ``norm_gain`` reads Qwen3.5's (1 + w) and Llama's (w) norms and refuses others."""
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated

        from flarectl.engine import norm_gemv

        g = torch.Generator().manual_seed(0)
        x, r = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
        w_gate, w_up = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
        torch.library.opcheck(norm_gemv.norm_linear, (x, r, w_gate, 1e-6, False))
        torch.library.opcheck(norm_gemv.norm_linear, (x, None, torch.cat([w_gate, w_up]), 1e-6, True))
        qn, ln = Qwen3_5RMSNorm(16, eps=1e-6), LlamaRMSNorm(16, eps=1e-6)
        with torch.no_grad():
            qn.weight.copy_(0.1 * torch.randn(16, generator=g))
            ln.weight.copy_(1 + 0.1 * torch.randn(16, generator=g))
        for norm in (qn, ln):
            gain, eps = norm_gemv.norm_gain(norm)
            h = x + r
            chain = F.silu(norm(h) @ w_gate.t()) * (norm(h) @ w_up.t())
            w = norm_gemv.interleave_glu(norm_gemv.fold_gain(torch.cat([w_gate, w_up]), gain))
            y, h_out = norm_gemv.norm_linear(x, r, w, eps, True)
            torch.testing.assert_close(y, chain, rtol=1e-5, atol=1e-5)
            assert torch.equal(h_out, h)
            y, h_out = norm_gemv.norm_linear(x, None, norm_gemv.fold_gain(w_gate, gain), eps, False)
            torch.testing.assert_close(y, norm(x) @ w_gate.t(), rtol=1e-5, atol=1e-5)
            assert h_out.shape == (0, 16)
            big = torch.randn(2, 9, 16, generator=g)  # 18 rows > MAX_ROWS: the torch formula
            y, h_out = norm_gemv.project(big, big, w, eps, True, True)
            torch.testing.assert_close(y, F.silu(norm(2 * big) @ w_gate.t()) * (norm(2 * big) @ w_up.t()),
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(h_out, 2 * big)
        assert norm_gemv.norm_gain(Qwen3_5RMSNormGated(16)) is None
        assert norm_gemv.norm_gain(torch.nn.LayerNorm(16)) is None
        assert norm_gemv.resolve(None, True) == norm_gemv.FUSE_NORM_DEFAULT and not norm_gemv.resolve(None, False)
        monkeypatch.setenv("FLARECTL_ENGINE_FUSE_NORM", "0")
        assert not norm_gemv.resolve(None, True) and norm_gemv.resolve(True, False)

    def test_static_step_fuse_norm_rules_and_equality():
        """With ``fuse_norm`` (and the skinny kernels), the step folds every layer's norm gains into its fused weights (no extra
        copies) and gives the unfused step's logits (fp32 debug hybrid, twin on CPU; mixed clean / window steps);
        asking for it together with the fused down projection is an error."""
        from flarectl.engine import norm_gemv
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        on = SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_norm=True)
        assert SlotBackend(m, 4, 64, fuse=True, gemv=True).eager.fuse_norm == norm_gemv.FUSE_NORM_DEFAULT
        assert on.eager.fuse_norm and all("eps_in" in f and "eps_mlp" in f for f in on.eager.fused.values())
        off = SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_norm=False)
        assert not off.eager.fuse_norm and not any("eps_in" in f for f in off.eager.fused.values())
        assert not SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_down=True).eager.fuse_norm
        with pytest.raises(ValueError, match="exclude"):
            SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_down=True, fuse_norm=True)
        for _ in _mixed_steps([on, off, SlotBackend(m, 4, 64, fuse=False, gemv=False)], 7, random_wlen=True):
            pass

    def test_dispatch_rules():
        """``linear`` takes the kernel only for <= MAX_ROWS rows of bf16/fp16/fp32 on CUDA (or interpreted);
        everything else is F.linear, same values."""
        w = torch.randn(6, 8)
        assert not gemv.kernel_applies(torch.randn(3, 8), w)  # CPU, not interpreting
        assert not gemv.kernel_applies(torch.randn(3, 8).double(), w.double())
        x = torch.randn(5, 13, 8)  # 65 rows > MAX_ROWS (64)
        assert gemv.MAX_ROWS == 64 and gemv.row_block(64) == 64 and gemv.row_block(17) == 32 and gemv.row_block(3) == 16
        torch.testing.assert_close(gemv.linear(x, w, True), torch.nn.functional.linear(x, w))
        lin = torch.nn.Linear(8, 6, bias=True)
        assert gemv.plain_weight(lin) is None  # biased: the module itself
        torch.testing.assert_close(gemv.module_linear(x, lin, gemv.plain_weight(lin), True), lin(x))

    def test_split_plan_and_configs():
        assert gemv.split_plan(300, 32, 3) == (3, 128)  # 10 blocks -> 4 per split -> 3 splits (last short)
        assert gemv.split_plan(64, 32, 8) == (2, 32)  # never more splits than K blocks
        for M, N, K in [(8, 2048, 2048), (8, 2048, 6144), (8, 248320, 2048), (1, 17, 40)]:
            d = gemv.default_config(M, N, K, torch.device("cpu"))
            assert d.split >= 1 and K // d.split >= 1
            assert d in gemv.candidates(M, N, K, torch.device("cpu"))

    def _rec_problem(seed, C=3, T=4, H=2, HV=4, K=16, V=8, dtype=torch.float32, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        q, k, v = r(C, T, H, K), r(C, T, H, K), r(C, T, HV, V)
        gate = -torch.rand(C, T, HV, generator=g) * 0.5
        beta = torch.rand(C, T, HV, generator=g)
        state = r(C, HV, K, V) * 0.3
        commit = torch.tensor([True, False, True, False, True][:C])
        out = (q, k, v, gate, beta, state, commit)
        return tuple(t.to(device) for t in out[:5]) + (state.to(device), commit.to(device))

    def test_tune_mode(monkeypatch):
        monkeypatch.setattr(gemv, "TUNE_MODE", None)
        monkeypatch.delenv("FLARECTL_GEMV_TUNE", raising=False)
        assert gemv.tune_mode() == "chain"
        for env, mode in [("0", "off"), ("cold", "cold"), ("1", "chain"), ("Chain", "chain")]:
            monkeypatch.setenv("FLARECTL_GEMV_TUNE", env)
            assert gemv.tune_mode() == mode
        monkeypatch.setenv("FLARECTL_GEMV_TUNE", "fast")
        with pytest.raises(ValueError, match="chain, cold or 0"):
            gemv.tune_mode()
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-llama", dtype="float32", device="cpu", seed=1)
        with pytest.raises(ValueError, match="FLARECTL_GEMV_TUNE"):  # when the step is built, not in its first call
            SlotBackend(m, 2, 16, gemv=True)
        assert not SlotBackend(m, 2, 16, gemv=False).eager.gemv  # not read without the skinny kernels
        monkeypatch.setattr(gemv, "TUNE_MODE", "cold")
        assert gemv.tune_mode() == "cold"
        # tuning needs CUDA: on CPU (interpreted or not) the heuristic is chosen and kept
        x, w = torch.randn(3, 40), torch.randn(17, 40)
        monkeypatch.setattr(gemv, "_CHOSEN", {})
        assert gemv.config_for(x, w) == gemv.default_config(3, 17, 40, x.device)

    def test_pdl_plan(monkeypatch):
        """Tiles preloaded before ``gdc_wait``: as many as ``PDL_PRELOAD_KB`` holds (a power of two, at least one)
        within 64 registers' worth per thread; L2 lines per column from ``PDL_L2_KB``; the trigger as set."""
        bf16 = 2
        monkeypatch.setattr(gemv, "PDL_PRELOAD_KB", 0)
        monkeypatch.setattr(gemv, "PDL_L2_KB", 0)
        monkeypatch.setattr(gemv, "PDL_TRIGGER_LATE", 1)
        assert gemv.pdl_plan(gemv.Config(32, 128, 4), bf16) == (1, 1, 0)
        monkeypatch.setattr(gemv, "PDL_PRELOAD_KB", 64)
        assert gemv.pdl_plan(gemv.Config(32, 128, 4), bf16)[0] == 4  # 8 KB tiles, capped at 32 KB (4 warps)
        assert gemv.pdl_plan(gemv.Config(32, 128, 4, 8), bf16)[0] == 8  # 8 warps: 64 KB allowed
        assert gemv.pdl_plan(gemv.Config(64, 256, 1), bf16)[0] == 1  # one 32 KB tile already fills the cap
        monkeypatch.setattr(gemv, "PDL_PRELOAD_KB", 20)
        assert gemv.pdl_plan(gemv.Config(32, 128, 4), bf16)[0] == 2  # whole tiles, a power of two
        monkeypatch.setattr(gemv, "PDL_L2_KB", 64)
        assert gemv.pdl_plan(gemv.Config(64, 128, 1), bf16)[2] == 8  # 64 KB / (64 columns x 128 B)
        monkeypatch.setattr(gemv, "PDL_L2_KB", 1)
        assert gemv.pdl_plan(gemv.Config(64, 128, 1), bf16)[2] == 1

    def test_tune_leaves_cublas_out_under_pdl(monkeypatch):
        """Tuning times cuBLAS beside the kernel's candidates, except under PDL (a cuBLAS launch would serialise the
        programmatic launches around it): measured with a stand-in timer, on CPU."""
        calls = []
        monkeypatch.setattr(gemv, "measure", lambda run, w, repeats=10: calls.append(run) or float(len(calls)))
        monkeypatch.setattr(gemv, "candidates", lambda M, N, K, device: [gemv.Config(16, 16, 1)])
        monkeypatch.setattr(gemv, "TIMINGS", {})
        x, w = torch.randn(3, 40), torch.randn(17, 40)
        gemv.tune(x, w)
        assert [c for c, _ in next(iter(gemv.TIMINGS.values()))] == [gemv.CUBLAS, gemv.Config(16, 16, 1)]
        monkeypatch.setattr(gemv, "use_pdl", lambda device, want=None: True)
        monkeypatch.setattr(gemv, "TIMINGS", {})
        assert gemv.tune(x, w) == gemv.Config(16, 16, 1)
        assert [c for c, _ in next(iter(gemv.TIMINGS.values()))] == [gemv.Config(16, 16, 1)]

    def test_tune_times_inline_split(monkeypatch):
        """With ``INLINE_SPLIT`` on (env ``FLARECTL_GEMV_INLINE_SPLIT=1``), plain products time every split-K
        candidate in both forms (``Config.inline``), fused ones and one-split candidates once; off, no inline form.
        The fastest wins (stand-in timer, on CPU)."""
        split, one = gemv.Config(16, 16, 4), gemv.Config(16, 16, 1)
        monkeypatch.setattr(gemv, "measure", lambda run, w, repeats=10: 1.0)
        monkeypatch.setattr(gemv, "candidates", lambda M, N, K, device: [one, split])
        monkeypatch.setattr(gemv, "use_pdl", lambda device, want=None: True)  # no cuBLAS entry
        x, w = torch.randn(3, 64), torch.randn(17, 64)
        for flag, want in ((1, [one, split, dataclasses.replace(split, inline=True)]), (0, [one, split])):
            monkeypatch.setattr(gemv, "INLINE_SPLIT", flag)
            monkeypatch.setattr(gemv, "TIMINGS", {})
            gemv.tune(x, w)
            assert [c for c, _ in next(iter(gemv.TIMINGS.values()))] == want
        monkeypatch.setattr(gemv, "INLINE_SPLIT", 1)
        monkeypatch.setattr(gemv, "TIMINGS", {})
        gemv.tune(torch.randn(3, 128), w, residual=torch.randn(3, 17), swiglu=True)
        assert [c for c, _ in next(iter(gemv.TIMINGS.values()))] == [one, split]
        times = iter([3.0, 2.0, 1.0])
        monkeypatch.setattr(gemv, "measure", lambda run, w, repeats=10: next(times))
        assert gemv.tune(x, w) == dataclasses.replace(split, inline=True)

    @pytest.mark.gpu
    def test_chain_tuning_on_cuda():
        """chain_ms copies the weight so the chain streams from HBM, and tune() in chain mode picks a candidate
        whose launch matches the twin."""
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(8, 1024, device="cuda", generator=g).bfloat16()
        w = torch.randn(1536, 1024, device="cuda", generator=g).bfloat16()
        calls = []
        ms = gemv.chain_ms(lambda wi: calls.append(wi.data_ptr()) or torch.nn.functional.linear(x, wi), w,
                           repeats=3, chain_bytes=16e6)
        assert ms > 0 and len(set(calls)) == 6  # ceil(16 MB / 3.1 MB) distinct weights, w itself first
        assert calls[0] == w.data_ptr()
        old = gemv.TUNE_MODE
        try:
            gemv.TUNE_MODE = "chain"
            cfg = gemv.tune(x, w, repeats=2)
        finally:
            gemv.TUNE_MODE = old
        timed = gemv.TIMINGS[gemv._key(x, w)]
        assert cfg in [c for c, _ in timed] and all(t > 0 for _, t in timed)
        y = torch.nn.functional.linear(x, w) if cfg == gemv.CUBLAS else gemv.launch(x, w, cfg)
        torch.testing.assert_close(y.float(), gemv.skinny_linear_reference(x, w).float(), rtol=2e-2, atol=2e-2)

    def test_recurrence_commit_twin_semantics():
        """The torch twin of ``gdn_recurrence_commit``: committing rows get the new state in the cache, the others
        keep theirs and get the new state in ``last``; ``gdn_recurrence_from`` starts from exactly that."""
        from flarectl.engine.gdn_ops import (_recurrence_torch, gdn_recurrence_commit, gdn_recurrence_from)

        q, k, v, g, b, state, commit = _rec_problem(0)
        scale = 16 ** -0.5
        full = torch.empty_like(state)
        o_ref = _recurrence_torch(q, k, v, g, b, state.clone(), full, scale)
        st, last = state.clone(), torch.full_like(state, float("nan"))
        o = gdn_recurrence_commit(q, k, v, g, b, st, last, commit, scale, "torch")
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(st[commit], full[commit])
        assert torch.equal(st[~commit], state[~commit])
        torch.testing.assert_close(last[~commit], full[~commit])
        ow = gdn_recurrence_from(q, k, v, g, b, st, last, commit, scale, "torch")
        torch.testing.assert_close(ow, _recurrence_torch(q, k, v, g, b, full.clone(), None, scale))
        torch.library.opcheck(gdn_recurrence_from, (q, k, v, g, b, st, last, commit, scale, "torch"))

    @pytest.mark.gpu
    def test_recurrence_kernel_on_cuda_matches_twin():
        from flarectl.engine import recurrence
        from flarectl.engine.gdn_ops import gdn_recurrence_commit, gdn_recurrence_from

        recurrence.NAN_FILL = True
        try:
            for T in (1, 5):
                q, k, v, g, b, state, commit = _rec_problem(T, C=5, T=T, H=4, HV=8, K=128, V=128, device="cuda")
                outs = []
                for kern in ("triton", "torch"):
                    st, last = state.clone(), torch.full_like(state, float("nan"))
                    o = gdn_recurrence_commit(q, k, v, g, b, st, last, commit, 128 ** -0.5, kern)
                    ow = gdn_recurrence_from(q, k, v, g, b, st, last, commit, 128 ** -0.5, kern)
                    outs.append((o, ow, st, last[~commit]))
                for a, r in zip(outs[0], outs[1]):
                    torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
        finally:
            recurrence.NAN_FILL = False

    def test_mixer_op_registration_and_cpu_twin():
        """``flarectl::gdn_mixer`` passes opcheck (schema, fake tensor, the four mutated buffers) and on CPU without
        the interpreter it is the torch chain ``gdn_mixer_chain``."""
        from flarectl.engine.gdn_ops import gdn_mixer, gdn_mixer_chain

        a = _mixer_problem(0, C=3, W=3, wc=2, H=1, HV=2, K=8, V=8)
        got, ref = _run_mixer(gdn_mixer, a, 2, 1, 2, 8, 8), _run_mixer(gdn_mixer_chain, a, 2, 1, 2, 8, 8)
        c = a["commit"]
        for u, t in zip(got[:3], ref[:3]):
            assert torch.equal(u, t)
        assert torch.equal(got[3][~c], ref[3][~c]) and torch.equal(got[4], ref[4])
        st, cv = a["state"].clone(), a["conv"].clone()
        torch.library.opcheck(gdn_mixer, (a["proj"], a["conv_w"], a["conv_b"], a["A_log"], a["dt_bias"],
                                          a["norm_w"], st, cv, torch.zeros_like(st), torch.zeros_like(cv),
                                          a["counts"], a["commit"], 2, 1, 2, 8, 8, 1e-6))

    def test_static_step_mixer_twin_equals_chain():
        """The step with gdn_kernel='mixer' (on CPU: the op's torch chain) == 'torch' (gdn_block's own chain) to
        1e-5 (fp32 debug hybrid, fused projections), caches included, through clean / window / late-commit steps."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        backends = [SlotBackend(m, 4, 64, gdn_kernel=k, fuse=True, gemv=False) for k in ("mixer", "torch")]
        assert backends[0].gdn_kernel == "mixer"
        for _ in _mixed_steps(backends, seed=5):
            for i, c in backends[1].cache.gdn.items():
                torch.testing.assert_close(backends[0].cache.gdn[i].state, c.state, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(backends[0].cache.gdn[i].conv, c.conv, rtol=1e-5, atol=1e-5)

    def test_resolve_gdn_kernel_mixer(monkeypatch):
        from flarectl.engine.gdn_ops import resolve_gdn_kernel

        assert resolve_gdn_kernel("mixer", torch.device("cpu")) == "mixer"
        assert resolve_gdn_kernel("auto", torch.device("cpu")) == "torch"
        with pytest.raises(ValueError):
            resolve_gdn_kernel("nope", torch.device("cpu"))

    @pytest.mark.gpu
    @pytest.mark.parametrize("v_block", [None, 32])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_mixer_kernel_on_cuda_matches_twin(dtype, v_block):
        """The one-kernel mixer on CUDA at the Qwen3.5-2B GDN shape (H = HV = 16, K = V = 128, C = 8) == the torch
        chain: AR (W 1), clean + window (W 5, wc 3) and anchored (W 8, wc 4, windows seeing counts - 1 clean tokens)
        steps; NaN-filled output; whole states or 32-column blocks (the group's last program norms; counters back at
        zero, repeated launches give the same bits); tokens' inputs prepared 1, 2, 4 or 8 at a time; the state read
        out in parallel and serially; the chunk form (``mixer.CHUNK``); with the L2 prefetch of the next weights
        (``mixer.L2_NEXT_KB``) and the register cap (``mixer.MAXNREG``) the same bits as without."""
        if not torch.cuda.is_available():
            pytest.skip("no CUDA")
        import functools
        import itertools

        from flarectl.engine import mixer
        from flarectl.engine.gdn_ops import gdn_mixer_chain

        tol = 1e-4 if dtype == torch.float32 else 2e-2
        knobs = mixer.L2_AT_END, mixer.L2_ROW_BYTES, mixer.MAXNREG
        mixer.NAN_FILL = True
        try:
            # (token block, parallel read-out, chunk form)
            settings = [(tb, True, False) for tb in (1, 2, 4, 8)] + [(2, False, False), (None, False, True)]
            for (W, wc, anchored), (token_block, parallel, chunk) in itertools.product(
                    ((1, 1, False), (5, 3, False), (8, 4, True)), settings):
                launch = functools.partial(mixer.launch, v_block=v_block, token_block=token_block,
                                           parallel_readout=parallel, chunk=chunk)
                a = _mixer_problem(W, 8, W, wc, 16, 16, 128, 128, 3, False, dtype, "cuda", anchored=anchored)
                a["state"] = a["state"].float()
                got = _run_mixer(launch, a, wc, 16, 16, 128, 128)
                again = _run_mixer(launch, a, wc, 16, 16, 128, 128)
                assert all(torch.equal(u.nan_to_num(), v.nan_to_num()) for u, v in zip(got, again))  # deterministic
                assert not gemv.arrival_counters(torch.device("cuda"), 1).any()
                ref = _run_mixer(gdn_mixer_chain, a, wc, 16, 16, 128, 128)
                c = a["commit"]
                assert not got[0].isnan().any()
                torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=tol, atol=tol)
                torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol)
                torch.testing.assert_close(got[3][~c], ref[3][~c], rtol=tol, atol=tol)
                assert torch.equal(got[2], ref[2]) and torch.equal(got[4], ref[4])
            # the L2 prefetch of the next GEMMs' weights (a hint) at the program's start and end: the same bits
            w_a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
            w_b = torch.randn(1000, 2048, device="cuda", dtype=torch.bfloat16)
            for W, wc, anchored in ((1, 1, False), (8, 4, True)):
                a = _mixer_problem(W, 8, W, wc, 16, 16, 128, 128, 3, False, dtype, "cuda", anchored=anchored)
                a["state"] = a["state"].float()
                plain = _run_mixer(functools.partial(mixer.launch, v_block=v_block), a, wc, 16, 16, 128, 128)
                for at_end, row_bytes in ((False, 0), (True, 0), (False, 512)):
                    mixer.L2_AT_END, mixer.L2_ROW_BYTES = at_end, row_bytes
                    hinted = _run_mixer(functools.partial(mixer.launch, v_block=v_block, l2_a=w_a, l2_b=w_b,
                                                          l2_kb=9000), a, wc, 16, 16, 128, 128)
                    assert all(torch.equal(u.nan_to_num(), v.nan_to_num()) for u, v in zip(plain, hinted))
                mixer.MAXNREG = 128  # the register cap: the same code, registers spilled at worst
                capped = _run_mixer(functools.partial(mixer.launch, v_block=v_block), a, wc, 16, 16, 128, 128)
                mixer.MAXNREG = knobs[2]
                assert all(torch.equal(u.nan_to_num(), v.nan_to_num()) for u, v in zip(plain, capped))
        finally:
            mixer.NAN_FILL = False
            mixer.L2_AT_END, mixer.L2_ROW_BYTES, mixer.MAXNREG = knobs

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_mixer_anchor_reuse_on_cuda_matches_twin(dtype):
        """``anchor_reuse`` on CUDA at the Qwen3.5-2B GDN shape (C = 8, 32-column blocks), the trust step's anchored
        layout (W 8, wc 4) with every anchored window's first token the row's last clean token == the torch chain,
        both read-outs."""
        if not torch.cuda.is_available():
            pytest.skip("no CUDA")
        import functools

        from flarectl.engine import mixer
        from flarectl.engine.gdn_ops import gdn_mixer_chain

        tol = 1e-4 if dtype == torch.float32 else 2e-2
        mixer.NAN_FILL = True
        try:
            a = _mixer_problem(8, 8, 8, 4, 16, 16, 128, 128, 3, False, dtype, "cuda", anchored=True)
            a["state"] = a["state"].float()
            for r in range(8):
                if a["seen"][r] < a["counts"][r]:
                    a["proj"][r, 4] = a["proj"][r, int(a["counts"][r]) - 1]
            ref = _run_mixer(gdn_mixer_chain, a, 4, 16, 16, 128, 128)
            c = a["commit"]
            for parallel in (False, True):
                got = _run_mixer(functools.partial(mixer.launch, v_block=32, parallel_readout=parallel, chunk=False,
                                                   anchor_reuse=True), a, 4, 16, 16, 128, 128)
                assert not got[0].isnan().any()
                torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=tol, atol=tol)
                torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol)
                torch.testing.assert_close(got[3][~c], ref[3][~c], rtol=tol, atol=tol)
                assert torch.equal(got[2], ref[2]) and torch.equal(got[4], ref[4])
        finally:
            mixer.NAN_FILL = False

    def test_mixer_l2_prefetch_plan(monkeypatch):
        """The mixer's L2 prefetch (``mixer.L2_NEXT_KB``): the lines cover the first KB of out_proj's weight, then of
        gate|up's, each whole at most; off CPU-side and under the interpreter (no inline PTX); the step hands the
        mixer both weights only with the knob on."""
        from flarectl.engine import mixer, static_step

        a, b = torch.empty(64, 64, dtype=torch.bfloat16), torch.empty(300, 64, dtype=torch.bfloat16)  # 8 KB, 37.5 KB
        assert mixer.l2_lines(a, b, 4) == (32, 0, 1, 0)
        assert mixer.l2_lines(a, b, 8) == (64, 0, 1, 0)
        assert mixer.l2_lines(a, b, 9) == (64, 8, 8, 0)
        assert mixer.l2_lines(a, b, 1000) == (64, 300, 300, 0)  # 38,400 bytes: 300 lines of 128
        assert mixer.l2_lines(a, None, 1000) == (64, 0, 1, 0) and mixer.l2_lines(None, b, 1) == (0, 8, 8, 0)
        # the first bytes of every row of b (rows of 128 bytes here: one line each, at most)
        assert mixer.l2_lines(a, b, 1000, row_bytes=100) == (64, 300, 1, 128)
        assert mixer.l2_lines(a, b, 9, row_bytes=512) == (64, 8, 1, 128)  # 1 KB left: 8 rows
        wide = torch.empty(10, 1000, dtype=torch.bfloat16)  # rows of 2000 bytes
        assert mixer.l2_lines(None, wide, 1000, row_bytes=300) == (0, 30, 3, 2000)
        assert mixer.l2_lines(None, wide, 1, row_bytes=300) == (0, 6, 3, 2000)  # 1 KB: 2 rows of 3 lines
        assert mixer.l2_plan(a, b, 1000, torch.device("cpu")) == (0, 0, 1, 0)
        assert mixer.l2_plan(a, b, 0, torch.device("cuda")) == (0, 0, 1, 0)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert mixer.l2_plan(a, b, 8, torch.device("cuda")) == (0, 0, 1, 0)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="contiguous"):
            mixer.l2_plan(a.t(), b, 8, torch.device("cuda"))
        old = mixer.L2_NEXT_KB
        try:
            mixer.L2_NEXT_KB = 0
            assert static_step._l2_next(a, b) == (None, None)
            mixer.L2_NEXT_KB = 64
            got = static_step._l2_next(a, b)
            assert got[0] is a and got[1] is b
            assert static_step._l2_next(None, b) == (None, None) and static_step._l2_next(a.t(), b) == (None, None)
        finally:
            mixer.L2_NEXT_KB = old

    def test_resolve_gemv(monkeypatch):
        monkeypatch.delenv("FLARECTL_ENGINE_GEMV", raising=False)
        assert gemv.resolve_gemv(None, torch.device("cuda")) and not gemv.resolve_gemv(None, torch.device("cpu"))
        monkeypatch.setenv("FLARECTL_ENGINE_GEMV", "0")
        assert not gemv.resolve_gemv(None, torch.device("cuda"))
        assert gemv.resolve_gemv(True, torch.device("cpu"))

    def test_prefetch_op_registration_and_cpu_noop():
        """``flarectl::l2_prefetch`` passes opcheck; off CUDA (no interpreter) it does nothing at all."""
        from flarectl.engine import prefetch

        x, w = torch.randn(3, 8), torch.randn(40, 8).bfloat16()
        token = torch.full((16,), 7, dtype=torch.int32)
        for method in prefetch.METHODS:
            torch.library.opcheck(prefetch.l2_prefetch, (x, prefetch.words(w, 100), token, method, 4))
        assert (token == 7).all()
        v = prefetch.words(w, 50)  # a prefix view of the weight's bytes as int32 words, no copy
        assert v.numel() == 12 and v.data_ptr() == w.data_ptr()
        assert prefetch.words(w).numel() * 4 == w.numel() * 2

    def test_static_step_prefetch_is_a_noop_numerically():
        """The step with the L2 prefetch planned (``prefetch_mb`` > 0) gives bitwise the same logits, cache and kept
        states as without, through clean/window/commit steps (fp32 debug hybrid, fused projections; on CPU the op
        does nothing). The plan prefetches, before each GEMM, a prefix of the next GEMM's weight, in launch order."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.adapter import ATTENTION
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        on, off = SlotBackend(m, 4, 64, fuse=True, prefetch_mb=0.01), SlotBackend(m, 4, 64, fuse=True)
        assert on.eager.prefetch_mb == 0.01 and off.eager.prefetch_mb == 0.0 and not off.eager._pf
        step = on.eager
        cap = int(0.01 * 2**20) // 4
        for i, kind in enumerate(m.layer_kinds):  # GEMM after each of layer i's four: out, gate|up, down, next
            layer, f = m.layers[i], step.fused[i]
            out = layer.self_attn.o_proj if kind == ATTENTION else layer.linear_attn.out_proj
            nxt = (step.fused[i + 1].get("w_qkv", step.fused[i + 1].get("w_in")) if i + 1 < len(m.layers)
                   else m.hf.lm_head.weight)
            plan, _ = step._pf[i]
            for before, w in zip(plan, (out.weight, f["w_gate_up"], layer.mlp.down_proj.weight, nxt)):
                ((v, method, grid),) = before
                assert v.data_ptr() == w.data_ptr() and v.numel() == min(cap, w.numel() * w.element_size() // 4)
                assert (method, grid) == ("bulk", 8)
        ((v, _, _),), _ = step._pf_first  # the first input projection's weight, while the prologue runs
        assert v.data_ptr() == step.fused[0].get("w_qkv", step.fused[0].get("w_in")).data_ptr()
        with pytest.raises(ValueError):
            SlotBackend(m, 2, 16, fuse=True, prefetch_mb=1, prefetch_method="nope")
        assert SlotBackend(m, 2, 16, fuse=False, prefetch_mb=1).eager.prefetch_mb == 0.0  # unfused: off
        _assert_same_steps(on, off)

    def test_l2_next_layout_and_registry(monkeypatch):
        """``l2_next``: the lines that cover the first bytes of every row (of every K split the next GEMM last used)
        within the KB budget; pairs registered in launch order, broken by a None; off on CPU, under the interpreter
        and with ``ROW_BYTES`` 0 (then the kernels get no prefetch at all)."""
        from flarectl.engine import l2_next

        a = torch.empty(10, 64, dtype=torch.bfloat16)
        b = torch.empty(300, 2048, dtype=torch.bfloat16)  # rows of 4096 bytes
        c = torch.empty(7, 6144, dtype=torch.bfloat16)
        try:
            l2_next.clear()
            assert l2_next.register([a, b, None, c, None]) == 1
            assert l2_next.register([b, c]) == 1
            assert l2_next._NEXT[a.data_ptr()][1] is b and l2_next._NEXT[b.data_ptr()][1] is c
            assert c.data_ptr() not in l2_next._NEXT
            assert l2_next.layout(b, 512, 8192) == (300 * 4, 4, 4096, 1, 4096)  # 4 lines of 128 a row
            assert l2_next.layout(b, 512, 64) == (128 * 4, 4, 4096, 1, 4096)  # 64 KB: the first 128 rows
            assert l2_next.layout(b, 100, 8192) == (300, 1, 4096, 1, 4096)
            l2_next.note_split(c, 4, 1536)  # down's split-K: every split's first bytes
            assert l2_next.layout(c, 512, 8192) == (7 * 4 * 4, 4, 12288, 4, 3072)
            l2_next.note_split(c, 4, 32)  # segments shorter than row_bytes: one segment's worth
            assert l2_next.layout(c, 512, 8192) == (7 * 4 * 1, 1, 12288, 4, 64)
            state = torch.empty(3, 4, 100, dtype=torch.float32)  # 4,800 bytes
            assert l2_next.register_whole(a, state) == 1 and l2_next.register_whole(a, state.transpose(1, 2)) == 0
            assert l2_next._WHOLE[a.data_ptr()][1] is state
            assert l2_next.whole_layout(state, 8192) == (38, 38, 0, 1, 0)  # 4,800 bytes: 38 lines of 128
            assert l2_next.whole_layout(state, 1) == (8, 8, 0, 1, 0)
            monkeypatch.setattr(l2_next, "ROW_BYTES", 0)
            assert l2_next.plan(a) == (a, l2_next.OFF)
            monkeypatch.setattr(l2_next, "ROW_BYTES", 512)
            assert l2_next.plan(a) == (a, l2_next.OFF)  # CPU tensors
            args = l2_next.kernel_args(a, 4)
            assert args["NX"] is False and args["nx"] is a and args["NXB"] == 128
        finally:
            l2_next.clear()
        assert not l2_next._NEXT and not l2_next._SPLITS and not l2_next._WHOLE

    def test_static_step_l2_next_chain_order(monkeypatch):
        """The projections' prefetch chain: per layer out_proj -> gate|up -> down -> the next layer's input
        projection (the LM head after the last); never input projection -> out_proj. Registered only on CUDA."""
        from flarectl.engine import l2_next
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.adapter import ATTENTION
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        monkeypatch.setattr(l2_next, "ROW_BYTES", 512)
        step = SlotBackend(m, 2, 16, fuse=True).eager
        assert step.l2_next_pairs == 0 and not l2_next._NEXT  # CPU: nothing registered
        registered, whole = [], []
        monkeypatch.setattr(l2_next, "register", lambda ws: registered.append(ws) or len(ws) - 1)
        monkeypatch.setattr(l2_next, "register_whole", lambda w, t: whole.append((w, t)) or 1)
        seq = step._gemm_weights()
        assert len(seq) == 4 * len(m.layers) + 1 and seq[-1] is m.hf.lm_head.weight
        for i, kind in enumerate(m.layer_kinds):
            layer, f = m.layers[i], step.fused[i]
            out = layer.self_attn.o_proj if kind == ATTENTION else layer.linear_attn.out_proj
            assert seq[4 * i] is f["w_qkv" if kind == ATTENTION else "w_in"] and seq[4 * i + 1] is out.weight
            assert seq[4 * i + 2] is f["w_gate_up"] and seq[4 * i + 3] is layer.mlp.down_proj.weight
        gdn = sorted(step.cache.gdn)
        assert gdn and step._register_l2_next(force=True) == 3 * len(m.layers) + len(gdn)
        assert registered == [seq[4 * i + 1: 4 * i + 5] for i in range(len(m.layers))]
        # each GDN layer's input projection -> the state its mixer reads next
        assert [(w is seq[4 * i], t is step.cache.gdn[i].state) for (w, t), i in zip(whole, gdn)] == [(True, True)] * len(gdn)

    @pytest.mark.parametrize("lead", [0, 2])
    def test_static_step_state_prefetch_plan_and_values(lead):
        """``prefetch_state``: each GDN layer's whole recurrent state is planned ``lead`` GEMMs before its input
        projection (clamped to the first GEMM), beside the weight prefetch when both are on; the step's logits,
        cache and kept states are bitwise those without it (the 'load' method runs its kernel under the
        interpreter only; here the plan and the values)."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        on = SlotBackend(m, 4, 64, fuse=True, prefetch_state="line_last", prefetch_state_lead=lead)
        both = SlotBackend(m, 4, 64, fuse=True, prefetch_mb=0.01, prefetch_state="bulk", prefetch_state_lead=lead)
        off = SlotBackend(m, 4, 64, fuse=True)
        assert (on.eager.prefetch_state, on.eager.prefetch_state_lead, on.eager.prefetch_mb) == ("line_last", lead, 0)
        assert off.eager.prefetch_state == "" and not off.eager._pf
        gdn = sorted(on.cache.gdn)
        assert gdn, "the debug hybrid has GDN layers"
        planned = {}
        for i, (plan, _) in on.eager._pf.items():
            for j, before in enumerate(plan):
                for v, method, grid in before:
                    assert (method, grid) == ("line_last", 32)
                    planned[4 * i + j] = v
        want = {max(4 * i - lead, 0): on.cache.gdn[i].state for i in gdn}
        assert sorted(planned) == sorted(want)
        for g, state in want.items():
            v = planned[g]
            assert v is state
        for i, (plan, _) in both.eager._pf.items():  # weights (bulk) and states (bulk) side by side
            for j, before in enumerate(plan):
                assert len(before) == 1 + sum(max(4 * k - lead, 0) == 4 * i + j for k in gdn)
        with pytest.raises(ValueError):
            SlotBackend(m, 2, 16, fuse=True, prefetch_state="nope")
        with pytest.raises(ValueError):
            SlotBackend(m, 2, 16, fuse=True, prefetch_state="bulk", prefetch_state_lead=-1)
        _assert_same_steps(on, off)

    def test_static_step_compiles_with_state_prefetch():
        """The step compiles (inductor, on CPU) with the GDN states' prefetch planned one GEMM early: the prefetch
        reads a cache tensor the step mutates, which aot_autograd takes only as the tensor itself (an int32 view of
        it failed to compile on the H100, session 17, and the step fell back to eager); its logits match eager."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        b = SlotBackend(m, 4, 64, fuse=True, compile=True, prefetch_state="line_last", prefetch_state_lead=1)
        ref = SlotBackend(m, 4, 64, fuse=True, compile=False)
        outs = []
        for backend in (b, ref):
            backend.prefill([0, 1, 2, 3], [[5, 6, 7], [], list(range(10, 30)), [9]])
            ones = torch.ones(4, dtype=torch.long)
            outs.append(backend.step(torch.arange(4)[:, None] + 3, ones, ones * 0, ones.bool(), 1))
        assert b.eager.compiled and b.eager.compile_error is None, b.eager.compile_error
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)

    def test_resolve_prefetch_state(monkeypatch):
        from flarectl.engine.static_step import resolve_prefetch_state
        from flarectl.errors import FlareError

        cuda, cpu = torch.device("cuda"), torch.device("cpu")
        monkeypatch.delenv("FLARECTL_ENGINE_PREFETCH_STATE", raising=False)
        monkeypatch.delenv("FLARECTL_ENGINE_PREFETCH_STATE_LEAD", raising=False)
        assert resolve_prefetch_state(None, None, cuda) == ("", 0)  # off by default (untimed)
        monkeypatch.setenv("FLARECTL_ENGINE_PREFETCH_STATE", "Line_Last")
        monkeypatch.setenv("FLARECTL_ENGINE_PREFETCH_STATE_LEAD", "2")
        assert resolve_prefetch_state(None, None, cuda) == ("line_last", 2)
        assert resolve_prefetch_state(None, None, cpu) == ("", 0)  # env only acts on CUDA
        assert resolve_prefetch_state("bulk", 1, cpu) == ("bulk", 1)
        monkeypatch.setenv("FLARECTL_ENGINE_PREFETCH_STATE", "off")
        assert resolve_prefetch_state(None, None, cuda)[0] == ""
        monkeypatch.setenv("FLARECTL_ENGINE_PREFETCH_STATE_LEAD", "9")
        with pytest.raises(FlareError):
            resolve_prefetch_state(None, None, cuda)

    def test_prefetch_op_traces_under_torch_compile():
        """The prefetch op traces (fullgraph) between ops of a compiled function and leaves its values alone."""
        from flarectl.engine import prefetch

        def fn(x, w, views, token):
            prefetch.l2_prefetch(x, views, token, "bulk", 8)
            return torch.nn.functional.linear(x, w) * 2

        x, w = torch.randn(3, 8), torch.randn(6, 8)
        token = torch.zeros(8, dtype=torch.int32)
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w, prefetch.words(w, 64), token)
        torch.testing.assert_close(got, fn(x, w, prefetch.words(w, 64), token))

    def test_resolve_prefetch(monkeypatch):
        from flarectl.engine.static_step import resolve_prefetch

        monkeypatch.delenv("FLARECTL_ENGINE_PREFETCH_MB", raising=False)
        assert resolve_prefetch(None, torch.device("cuda")) == 0.0  # off by default (it did not pay)
        monkeypatch.setenv("FLARECTL_ENGINE_PREFETCH_MB", "24")
        assert resolve_prefetch(None, torch.device("cuda")) == 24.0
        assert resolve_prefetch(None, torch.device("cpu")) == 0.0
        assert resolve_prefetch(2, torch.device("cpu")) == 2.0

    @pytest.mark.gpu
    def test_static_step_prefetch_on_cuda_equals_off():
        """Graphed and compiled (the CUDA default) with the side-stream prefetch of weights and/or GDN states: logits
        bitwise equal to off."""
        if not torch.cuda.is_available():
            pytest.skip("no CUDA")
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="bfloat16", device="cuda", seed=1)
        outs = []
        variants = [{}, {"prefetch_mb": 1, "prefetch_method": "bulk"},
                    {"prefetch_mb": 1, "prefetch_method": "load_wide"}, {"prefetch_state": "line_last"}, {"prefetch_state": "bulk", "prefetch_state_lead": 2},
                    {"prefetch_mb": 1, "prefetch_state": "line", "prefetch_state_lead": 1}]
        from engine_helpers import cuda_ar_steps

        for kw in variants:
            outs.append(cuda_ar_steps(SlotBackend(m, 4, 64, **kw)))
        for o in outs[1:]:
            for a, r in zip(o, outs[0]):
                assert torch.equal(a, r)

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_kernel_on_cuda_matches_twin(dtype):
        """Odd shapes, every candidate config (split-K included), deterministic across calls; the opt-in inline
        split-K (``Config.inline``) at one even and one odd shape (each build costs the device call ~1 s)."""
        gemv.NAN_FILL = True
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            for M, N, K in [(1, 17, 40), (8, 2048, 2048), (3, 513, 777), (40, 513, 777), (64, 2048, 2048)]:
                x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
                w = torch.randn(N, K, device="cuda", generator=g).to(dtype)
                ref = (x.double() @ w.double().t())
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                configs = gemv.candidates(M, N, K, x.device)
                inline = [dataclasses.replace(c, inline=True) for c in configs if c.split > 1]
                for cfg in configs + (inline if (M, N) in ((8, 2048), (3, 513)) else []):
                    y = gemv.launch(x, w, cfg)
                    assert y.dtype == dtype and not y.isnan().any(), cfg
                    err = float((y.double() - ref).norm() / ref.norm())
                    assert err < tol, (M, N, K, cfg, err)
                    assert torch.equal(y, gemv.launch(x, w, cfg)), cfg  # no atomics: same bits
                gemv.tune(x, w, repeats=2)
                assert gemv._key(x, w) in gemv.TIMINGS
                y = gemv.skinny_linear(x, w)
                torch.testing.assert_close(y.float(), gemv.skinny_linear_reference(x, w).float(),
                                           rtol=tol, atol=tol * float(ref.abs().max()))
        finally:
            gemv.NAN_FILL = False

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_fused_kernel_on_cuda_matches_twin(dtype):
        """``launch_fused`` at the Qwen3.5-2B down projection (M 8, N 2048, K 6144) and an odd shape: split-K
        finished in-kernel (8 and 4 splits) and one pass == the twin, the same bits on a repeat, counters back at zero; the
        tuned op too."""
        gemv.NAN_FILL = True
        try:
            g = torch.Generator(device="cuda").manual_seed(1)
            for M, N, K in [(8, 2048, 6144), (3, 513, 777)]:
                x = torch.randn(M, 2 * K, device="cuda", generator=g).to(dtype)
                w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(dtype)
                r = torch.randn(M, N, device="cuda", generator=g).to(dtype)
                ref = gemv.skinny_linear_fused_reference(x, w, r, True).float()
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                for cfg in (gemv.Config(128, 128, 8), gemv.Config(32, 256, 4, 8, 3), gemv.Config(16, 128, 1)):
                    y = gemv.launch_fused(x, w, r, True, cfg)
                    assert y.dtype == dtype and not y.isnan().any(), cfg
                    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
                    assert torch.equal(y, gemv.launch_fused(x, w, r, True, cfg)), cfg
                assert not gemv.arrival_counters(x.device, 1).any()
                y = gemv.skinny_linear_fused(x, w, r, True)
                torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
        finally:
            gemv.NAN_FILL = False

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_norm_kernel_on_cuda_matches_twin(dtype):
        """``norm_gemv.launch`` at the Qwen3.5-2B shapes it serves (GDN input projection, gate|up with the
        activation) and an odd one, one-pass and split-K configs: == the twin; h == x + residual bitwise; the same bits
        on a repeat; counters back at zero; the op too (with the heuristic configuration: timing ~15 candidates per
        shape made this test outlast a device call; tuning itself is ``test_chain_tuning_on_cuda``'s)."""
        from flarectl.engine import norm_gemv

        gemv.NAN_FILL = True
        gemv.TUNE_MODE = "off"
        try:
            g = torch.Generator(device="cuda").manual_seed(2)
            for M, N, K, glu in [(8, 8192 + 64, 2048, False), (8, 12288, 2048, True), (3, 514, 777, True),
                                 (24, 12288, 2048, True), (64, 8224, 2048, False)]:  # trust-step rows
                x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
                r = torch.randn(M, K, device="cuda", generator=g).to(dtype)
                w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(dtype)
                ref, ref_h = norm_gemv.norm_linear_reference(x, r, w, 1e-6, glu)
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                for cfg in (gemv.Config(64, 128, 1), gemv.Config(32, 256, 4, 8, 3), gemv.Config(128, 128, 2)):
                    y, h = norm_gemv.launch(x, r, w, 1e-6, glu, cfg)
                    assert not y.isnan().any(), cfg
                    err = float((y.float() - ref.float()).norm() / ref.float().norm())
                    assert err < tol, (M, N, K, cfg, err)
                    assert torch.equal(h, ref_h), cfg
                    assert torch.equal(y, norm_gemv.launch(x, r, w, 1e-6, glu, cfg)[0]), cfg
                assert not gemv.arrival_counters(x.device, 1).any()
                y, h = norm_gemv.norm_linear(x, None, w, 1e-6, glu)
                ref = norm_gemv.norm_linear_reference(x, None, w, 1e-6, glu)[0]
                assert float((y.float() - ref.float()).norm() / ref.float().norm()) < tol and h.numel() == 0
        finally:
            gemv.TUNE_MODE = None
            gemv.NAN_FILL = False

    @pytest.mark.gpu
    def test_l2_next_on_cuda_gives_the_same_bits(monkeypatch):
        """The projections' L2 prefetch of the next GEMM's weight rows (``l2_next``), at the programs' start and
        end, on the chain gate|up (fused norm, SwiGLU) -> down (split-K, both forms) -> the next input projection,
        which prefetches a GDN state (``STATE``): each launch's output has the same bits as without it, and it is
        planned (NX) only for registered weights."""
        from flarectl.engine import l2_next, norm_gemv

        g = torch.Generator(device="cuda").manual_seed(5)
        bf = torch.bfloat16
        x = torch.randn(8, 2048, device="cuda", generator=g).to(bf)
        r = torch.randn(8, 2048, device="cuda", generator=g).to(bf)
        w_gu = (torch.randn(12288, 2048, device="cuda", generator=g) / 45).to(bf)
        w_down = (torch.randn(2048, 6144, device="cuda", generator=g) / 78).to(bf)
        w_in = (torch.randn(8224, 2048, device="cuda", generator=g) / 45).to(bf)

        def chain():
            act, h = norm_gemv.launch(x, r, w_gu, 1e-6, True, gemv.Config(32, 128, 1))
            two = gemv.launch(act, w_down, gemv.Config(32, 128, 4))  # partials + reduce kernel
            one = gemv.launch_fused(act, w_down, h, False, gemv.Config(32, 128, 4))  # split-K in the kernel
            y, _ = norm_gemv.launch(two, h, w_in, 1e-6, False, gemv.Config(64, 128, 2))
            return act, h, two, one, y

        try:
            l2_next.clear()
            plain = chain()
            assert l2_next.register([w_gu, w_down, w_in]) == 2
            monkeypatch.setattr(l2_next, "ROW_BYTES", 512)
            assert l2_next.kernel_args(w_gu, 4)["NX"] and l2_next.kernel_args(w_down, 4)["NX"]
            assert not l2_next.kernel_args(w_in, 4)["NX"]  # nothing registered after it
            state = torch.randn(8, 16, 128, 128, device="cuda", generator=g)  # a GDN state (8 MB)
            assert l2_next.register_whole(w_in, state) == 1
            monkeypatch.setattr(l2_next, "STATE", True)
            assert l2_next.kernel_args(w_in, 4)["nx"] is state
            for at_end in (True, False):
                monkeypatch.setattr(l2_next, "AT_END", at_end)
                hinted = chain()
                assert all(torch.equal(u, v) for u, v in zip(plain, hinted)), at_end
            assert not gemv.arrival_counters(x.device, 1).any()
        finally:
            l2_next.clear()

    @pytest.mark.gpu
    def test_pdl_depth_on_cuda_matches_twin_in_a_graph(monkeypatch):
        """Programmatic dependent launch with the session-13 depth knobs (weights preloaded before ``gdc_wait``: one
        tile, 32 KB; the late trigger; L2 prefetch lines) on an H100: a chain of dependent launches — norm projection
        -> out-projection-shaped GEMM (split-K in-kernel) -> norm gate|up with SwiGLU -> down (split-K in-kernel), the
        next layer's input the previous output, as in a GDN layer — captured in a CUDA graph and replayed == the same
        chain eager with PDL off == the twins chained in fp32 (bf16 tolerance); the same bits replay after replay; one
        preloaded tile gives PDL off's bits exactly (same summation order); counters back at zero. And the decode-attention
        kernel launched programmatically == PDL off's bits == the twin."""
        from flarectl.engine import norm_gemv

        if not gemv.use_pdl(torch.device("cuda"), True):
            pytest.skip("PDL needs sm_90+")
        g = torch.Generator(device="cuda").manual_seed(3)
        D, I, M = 2048, 6144, 8
        r = lambda *sh: (torch.randn(*sh, device="cuda", generator=g) / sh[-1] ** 0.5).to(torch.bfloat16)  # noqa: E731
        w_in, w_out, w_gu, w_down = r(4096, D), r(D, 4096), r(2 * I, D), r(D, I)
        x0, res0 = torch.randn(M, D, device="cuda", generator=g).bfloat16(), r(M, D) * 8
        cfgs = {"in": gemv.Config(64, 256, 1, 4, 3), "out": gemv.Config(32, 256, 4, 4, 3),
                "gu": gemv.Config(128, 128, 1, 4, 3), "down": gemv.Config(32, 128, 4, 4, 4)}

        def chain(pdl):
            y, h = norm_gemv.launch(x0, res0, w_in, 1e-6, False, cfgs["in"], pdl)
            o = gemv.launch_fused(y, w_out, None, False, cfgs["out"], pdl)
            a, h2 = norm_gemv.launch(o, h, w_gu, 1e-6, True, cfgs["gu"], pdl)
            return gemv.launch_fused(a, w_down, h2, False, cfgs["down"], pdl)

        def twin():
            y, h = norm_gemv.norm_linear_reference(x0, res0, w_in, 1e-6, False)
            o = gemv.skinny_linear_fused_reference(y, w_out, None, False)
            a, h2 = norm_gemv.norm_linear_reference(o, h, w_gu, 1e-6, True)
            return gemv.skinny_linear_fused_reference(a, w_down, h2, False)

        off = chain(False)
        ref = twin().float()
        torch.testing.assert_close(off.float(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))
        for preload_kb, late, l2_kb in ((0, 0, 0), (32, 0, 0), (32, 1, 64)):
            monkeypatch.setattr(gemv, "PDL_PRELOAD_KB", preload_kb)
            monkeypatch.setattr(gemv, "PDL_TRIGGER_LATE", late)
            monkeypatch.setattr(gemv, "PDL_L2_KB", l2_kb)
            eager = chain(True)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain(True)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain(True)
            graph.replay()
            first = out.clone()
            for _ in range(3):
                graph.replay()
                assert torch.equal(out, first), (preload_kb, late, l2_kb)
            assert torch.equal(first, eager), (preload_kb, late, l2_kb)
            torch.testing.assert_close(first.float(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))
            if preload_kb == 0:
                assert torch.equal(first, off)  # one tile first, then the loop: PDL off's order
        assert not gemv.arrival_counters(x0.device, 1).any()
        # the decode-attention kernel launched programmatically (AR step, 2 splits) == the twin, == PDL off's bits
        from flarectl.engine import attention

        C, HQ, HKV, Dh, cap = 8, 8, 2, 256, 524
        q = torch.randn(C, 1, HQ, Dh, device="cuda", generator=g).bfloat16().transpose(1, 2)
        key, value = (torch.randn(C, HKV, cap, Dh, device="cuda", generator=g).bfloat16() for _ in range(2))
        lengths = torch.randint(1, cap - 1, (C,), device="cuda", generator=g)
        args = (q, key, value, q[:, :2, :0], q[:, :2, :0], lengths, torch.ones_like(lengths),
                torch.zeros_like(lengths), 1, cap, Dh ** -0.5)
        want = attention.launch(*args, splits=2)
        monkeypatch.setattr(gemv, "PDL", True)
        got = attention.launch(*args, splits=2)
        assert torch.equal(got, want)
        torch.testing.assert_close(got.float(), attention.decode_attention_reference(*args).float(), rtol=2e-2,
                                   atol=2e-2)

    @pytest.mark.gpu
    @pytest.mark.parametrize("pdl", [False, True])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_attention_core_on_cuda_matches_twin(dtype, pdl, monkeypatch):
        """``attention_core`` at the Qwen3.5-2B attention shape (C 8, 8 query / 2 kv heads, D 256, 64 rotary dims,
        gated, 524 slots; two rows with a full cache, so their clean tokens share the last slot): AR (W 1), verify
        (W 5) and draft (5 + 4) steps == the twin (output; cache written at the same slots, to 2 ulp in bf16),
        NaN-filled outputs, the same bits on a repeat, with and without PDL launches; then a graphed, compiled
        engine step with it == without it (fp32 debug hybrid, 1e-4)."""
        from flarectl.engine import attention, attention_core, gemv
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        if pdl and torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("PDL needs sm_90+")
        monkeypatch.setattr(gemv, "PDL", pdl)
        attention.NAN_FILL = attention_core.NAN_FILL = True
        try:
            for wc, ww in ((1, 0), (5, 0), (5, 4)):
                args = _core_problem(3, C=8, wc=wc, ww=ww, hq=8, hkv=2, d=256, rot=64, S=524, dtype=dtype,
                                     device="cuda")
                ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                key0 = args[6].clone()
                got = attention_core.attention_core(*args)
                want = attention_core.attention_core_reference(*ref)
                assert not got.isnan().any()
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
                wrote = _clean_slot_mask(key0, args[8], wc)
                assert torch.equal(args[6][~wrote], key0[~wrote]) and torch.equal(ref[6][~wrote], key0[~wrote])
                assert torch.equal(args[7], ref[7])
                if dtype == torch.bfloat16:
                    _assert_bf16_near(args[6], ref[6])
                again = [a.clone() if isinstance(a, torch.Tensor) else a for a in ref]
                assert torch.equal(attention_core.attention_core(*again), attention_core.attention_core(*again))
        finally:
            attention.NAN_FILL = attention_core.NAN_FILL = False
        m = load_model("debug-hybrid", dtype="float32", device="cuda", seed=1)
        from engine_helpers import cuda_ar_steps

        outs = []
        for core in (True, False):
            b = SlotBackend(m, 4, 64, attn_core=core)
            assert b.eager.attn_core == core
            outs.append(cuda_ar_steps(b, shift=True))
        for a, r in zip(*outs):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_decode_attention_on_cuda_matches_twin(dtype):
        """The decode-attention kernel at the Qwen3.5-2B attention shape (C 8, 8 query / 2 kv heads, D 256, 524
        slots): AR (W 1), verify (W 5) and draft (5 + 4) steps, split counts, tokens per program, slots per step and
        warps, and the defaults, == the twin; NaN-filled output, the same bits on a repeat, counters back at zero."""
        from flarectl.engine import attention

        attention.NAN_FILL = True
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            C, HQ, HKV, D, cap = 8, 8, 2, 256, 524
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            for wc, ww in ((1, 0), (5, 0), (5, 4)):
                W = wc + ww
                r = lambda *sh: torch.randn(*sh, device="cuda", generator=g).to(dtype)  # noqa: E731
                q = r(C, W, HQ, D).transpose(1, 2)
                key, value = r(C, HKV, cap, D), r(C, HKV, cap, D)
                kw, vw = r(C, ww, HKV, D).transpose(1, 2), r(C, ww, HKV, D).transpose(1, 2)
                lengths = torch.randint(0, cap - wc, (C,), device="cuda", generator=g)
                counts = torch.randint(0, wc + 1, (C,), device="cuda", generator=g)
                wlen = torch.randint(0, ww + 1, (C,), device="cuda", generator=g)
                args = (q, key, value, kw, vw, lengths, counts, wlen, wc, cap, D ** -0.5)
                ref = attention.decode_attention_reference(*args).float()
                for splits, tokens, bn, warps in ((1, None, None, None), (2, None, None, None), (8, None, None, None),
                                                  (None, None, None, None), (None, 8, None, None), (2, 4, None, None),
                                                  (4, 4, 64, 8), (8, 1, 32, 4), (4, 2, 32, 8)):
                    kw = dict(splits=splits, tokens_per_program=tokens, block_n=bn, num_warps=warps)
                    out = attention.launch(*args, **kw)
                    assert not out.isnan().any(), kw
                    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
                    assert torch.equal(out, attention.launch(*args, **kw))
                assert not gemv.arrival_counters(q.device, 1).any()
        finally:
            attention.NAN_FILL = False

else:
    import triton.runtime.interpreter as _ti

    # numpy >= 2.4 refuses int() of a 1-element 1-d array, which the interpreter does for run-time loop bounds
    _orig_patch = _ti._patch_lang_tensor

    def _patch(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _ti._patch_lang_tensor = _patch

    from flarectl.engine import gemv, recurrence

    gemv.NAN_FILL = True
    recurrence.NAN_FILL = True

    SHAPES = [(1, 1, 1), (1, 17, 40), (3, 33, 130), (8, 40, 64), (16, 100, 300), (5, 64, 33), (13, 7, 257),
              (17, 20, 70), (40, 33, 96), (64, 18, 130)]  # 32- and 64-row tiles: trust steps (C x (B + B))
    CONFIGS = [gemv.Config(16, 16, 1), gemv.Config(32, 32, 1), gemv.Config(16, 32, 3), gemv.Config(32, 16, 4),
               gemv.Config(64, 64, 2)]

    @pytest.mark.parametrize("grid", [(1,), (7,), (5, 3), (300,)])
    def test_l2_next_lines_cover_the_rows_first_bytes(grid):
        """The prefetch's walk (``l2_next.l2_lines``' arithmetic, run as ``record_kernel`` in the interpreter): on
        any grid, every planned line is reached exactly once, and the lines are exactly the first ``row_bytes`` of
        each row of each K split within the budget, inside the tensor (a last split shorter than the others
        included), or the whole contiguous tensor (the mixer's out_proj weight)."""
        from flarectl.engine import gemv as gemv_mod
        from flarectl.engine import l2_next

        def expected(rows, k_bytes, row_stride, split, per_bytes, row_bytes):
            out = []
            for r in range(rows):
                for sp in range(split):
                    seg_len = min(per_bytes, k_bytes - sp * per_bytes)
                    first = min(row_bytes, seg_len)
                    out += [r * row_stride + sp * per_bytes + c for c in range(0, first, l2_next.LINE)]
            return out

        try:
            w = torch.empty(37, 1000, dtype=torch.bfloat16)  # rows of 2000 bytes
            for split_k, row_bytes, kb in [(None, 512, 8192), (None, 100, 8192), ((3, 352), 300, 8192),
                                           ((3, 352), 1000, 8192), ((2, 512), 256, 20)]:
                l2_next.clear()
                if split_k:
                    l2_next.note_split(w, *split_k)
                lay = l2_next.layout(w, row_bytes, kb)
                got = l2_next.record_offsets(lay, grid).tolist()
                split, per = split_k or (1, 1000)
                rows = lay[0] // (lay[1] * lay[3])
                want = expected(rows, 2000, 2000, split, per * 2, lay[1] * l2_next.LINE)
                assert got == want, (split_k, row_bytes, kb)
                assert max(got) < w.numel() * 2 and rows == min(37, kb * 1024 // (lay[1] * split * 128))
                if split_k == (3, 352):  # the last split: 1000 - 704 = 296 elements, 592 bytes
                    assert gemv_mod.split_plan(1000, 32, 3)[0] == 3
            n = -(-w.numel() * 2 // l2_next.LINE)  # the mixer's contiguous form: per_row = n, stride 0
            got = l2_next.record_offsets((n, n, 0, 1, 0), grid).tolist()
            assert got == list(range(0, w.numel() * 2, l2_next.LINE))
        finally:
            l2_next.clear()

    @pytest.mark.parametrize("M,N,K", SHAPES)
    def test_kernel_matches_twin(M, N, K):
        """Every config (one pass and split-K, even and ragged N/K) == the fp64 product, bf16 and fp32 inputs."""
        g = torch.Generator().manual_seed(M * 1000 + N + K)
        x32, w32 = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            x, w = x32.to(dtype), w32.to(dtype)
            ref = x.double() @ w.double().t()
            twin = gemv.skinny_linear_reference(x, w)
            for cfg in CONFIGS:
                y = gemv.launch(x, w, cfg)
                assert y.shape == (M, N) and y.dtype == dtype
                assert not y.isnan().any(), cfg
                torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))
                torch.testing.assert_close(y.float(), twin.float(), rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))

    @pytest.mark.parametrize("M,N,K", [(1, 17, 40), (3, 33, 130), (8, 40, 64), (13, 7, 257), (40, 33, 96)])
    def test_inline_split_equals_two_launches(M, N, K, monkeypatch):
        """``Config.inline``: split-K finished by the last split of each column block (one launch, through
        ``launch_fused``) gives the same bits as the partials + reduce kernel (same summation order), NaN-filled
        outputs and partials, counters back at zero; a one-split config ignores the flag."""
        fused = []
        real = gemv.launch_fused
        monkeypatch.setattr(gemv, "launch_fused", lambda *a, **k: fused.append(a[4]) or real(*a, **k))
        g = torch.Generator().manual_seed(M * 7 + N + K)
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
            for cfg in (gemv.Config(16, 32, 3), gemv.Config(32, 16, 4), gemv.Config(16, 16, 1)):
                two = gemv.launch(x, w, cfg)
                fused.clear()
                one = gemv.launch(x, w, dataclasses.replace(cfg, inline=True))
                assert not one.isnan().any() and torch.equal(one, two), (dtype, cfg)
                split = gemv.split_plan(K, cfg.bk, cfg.split)[0]
                assert len(fused) == (split > 1), (cfg, split)
            assert not gemv.arrival_counters(x.device, 1).any()

    def test_mutations_are_caught():
        """The check has teeth: a wrong split plan (one K block dropped) fails it."""
        x, w = torch.randn(4, 96), torch.randn(24, 96)
        good = gemv.launch(x, w, gemv.Config(16, 32, 3))
        torch.testing.assert_close(good, x @ w.t(), rtol=1e-5, atol=1e-4)
        orig = gemv.split_plan
        try:
            gemv.split_plan = lambda K, bk, split: (split - 1, -(-K // bk) // split * bk) if split > 1 else (1, K)
            bad = gemv.launch(x, w, gemv.Config(16, 32, 3))
        finally:
            gemv.split_plan = orig
        assert not torch.allclose(bad, x @ w.t(), rtol=1e-3, atol=1e-3)

    @pytest.mark.parametrize("M,N,K", [(1, 17, 40), (3, 40, 70), (8, 33, 64), (16, 100, 300), (5, 7, 257),
                                       (33, 20, 96)])
    def test_fused_kernel_matches_twin(M, N, K):
        """``launch_fused`` (one launch, split-K finished by the last split) == its twin for every config and both
        fusions (silu(gate) * up prologue, residual epilogue), fp32 and bf16; NaN-filled outputs and partials; the
        same bits on a repeat (fixed summation order); arrival counters back at zero."""
        g = torch.Generator().manual_seed(M * 1000 + N + K)
        x32, w32, r32 = torch.randn(M, 2 * K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, \
            torch.randn(M, N, generator=g)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            w, r = w32.to(dtype), r32.to(dtype)
            for swiglu in (True, False):
                x = x32.to(dtype) if swiglu else x32[:, :K].to(dtype)
                for res in (r, None):
                    ref = gemv.skinny_linear_fused_reference(x, w, res, swiglu)
                    for cfg in CONFIGS:
                        y = gemv.launch_fused(x, w, res, swiglu, cfg)
                        assert y.shape == (M, N) and y.dtype == dtype and not y.isnan().any(), cfg
                        torch.testing.assert_close(y.float(), ref.float(), rtol=tol,
                                                   atol=tol * max(1.0, float(ref.float().abs().max())))
                        assert torch.equal(y, gemv.launch_fused(x, w, res, swiglu, cfg)), cfg
        assert not gemv.arrival_counters(torch.device("cpu"), 1).any()

    def test_fused_mutation_is_caught():
        """The check has teeth: a fixup that skips the last split's partial fails it."""
        x, w = torch.randn(4, 96), torch.randn(24, 96)
        good = gemv.launch_fused(x, w, None, False, gemv.Config(16, 32, 3))
        torch.testing.assert_close(good, x @ w.t(), rtol=1e-5, atol=1e-4)
        orig = gemv.split_plan
        try:
            gemv.split_plan = lambda K, bk, split: (split - 1, -(-K // bk) // split * bk) if split > 1 else (1, K)
            bad = gemv.launch_fused(x, w, None, False, gemv.Config(16, 32, 3))
        finally:
            gemv.split_plan = orig
        assert not torch.allclose(bad, x @ w.t(), rtol=1e-3, atol=1e-3)

    @pytest.mark.parametrize("M,N,K", [(1, 18, 40), (5, 40, 70), (8, 34, 257), (13, 20, 64), (24, 18, 40),
                                       (40, 20, 70)])
    def test_norm_kernel_matches_twin(M, N, K):
        """``norm_gemv.launch`` (residual add + RMSNorm prologue, gain folded in the weight, optional SwiGLU
        epilogue; split-K finished in-kernel) == its twin for one-pass and split configs, residual or None, fp32 and
        bf16; NaN-filled outputs and partials; the same bits on a repeat; counters back at zero. 24 rows: the add in
        a 64-row tile; 40 rows: the add in torch first (``ADD_MAX_ROWS``), a 64-row tile without it."""
        from flarectl.engine import norm_gemv

        g = torch.Generator().manual_seed(M * 1000 + N + K)
        x32, r32 = torch.randn(M, K, generator=g), torch.randn(M, K, generator=g)
        w32 = torch.randn(N, K, generator=g) / K ** 0.5
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            x, r, w = x32.to(dtype), r32.to(dtype), w32.to(dtype)
            for glu, res in ((False, r), (True, r), (True, None)):
                ref, ref_h = norm_gemv.norm_linear_reference(x, res, w, 1e-6, glu)
                for cfg in (gemv.Config(16, 16, 1), gemv.Config(16, 32, 3), gemv.Config(64, 64, 2)):
                    y, h = norm_gemv.launch(x, res, w, 1e-6, glu, cfg)
                    assert y.shape == ref.shape and not y.isnan().any(), cfg
                    torch.testing.assert_close(y.float(), ref.float(), rtol=tol,
                                               atol=tol * max(1.0, float(ref.float().abs().max())))
                    if res is not None:  # (the interpreter truncates to bf16 where the GPU rounds: tolerance)
                        torch.testing.assert_close(h.float(), ref_h.float(), rtol=tol, atol=tol)
                    else:
                        assert h.numel() == 0
                    assert torch.equal(y, norm_gemv.launch(x, res, w, 1e-6, glu, cfg)[0]), cfg
        assert not gemv.arrival_counters(torch.device("cpu"), 1).any()

    def test_norm_mutation_is_caught():
        """The check has teeth: a split plan that drops the last K block fails it (products and sums of squares)."""
        from flarectl.engine import norm_gemv

        x, r, w = torch.randn(4, 96), torch.randn(4, 96), torch.randn(24, 96)
        ref = norm_gemv.norm_linear_reference(x, r, w, 1e-6, False)[0]
        torch.testing.assert_close(norm_gemv.launch(x, r, w, 1e-6, False, gemv.Config(16, 32, 3))[0], ref,
                                   rtol=1e-5, atol=1e-4)
        orig = gemv.split_plan
        try:
            gemv.split_plan = lambda K, bk, split: (split - 1, -(-K // bk) // split * bk) if split > 1 else (1, K)
            bad = norm_gemv.launch(x, r, w, 1e-6, False, gemv.Config(16, 32, 3))[0]
        finally:
            gemv.split_plan = orig
        assert not torch.allclose(bad, ref, rtol=1e-3, atol=1e-3)

    @pytest.mark.parametrize("preload_kb", [0, 1, 8])
    @pytest.mark.parametrize("M,N,K", [(1, 17, 40), (8, 33, 257), (24, 18, 130)])
    def test_pdl_load_order_matches_twin(M, N, K, preload_kb, monkeypatch):
        """A PDL launch's load order (``gemv.pdl_plan``: the first tiles loaded before the wait — one, or as many as
        ``PDL_PRELOAD_KB`` holds, more than a split's K range included — then the loop), run interpreted without the
        griddepcontrol instructions (``gemv.PDL_INTERPRET``): the skinny GEMM (two-launch and one-launch split-K), the
        fused one (SwiGLU + residual) and the norm projection (+ residual, + SwiGLU) == their twins, NaN-filled
        outputs, fp32 and bf16, the same bits on a repeat."""
        from flarectl.engine import norm_gemv

        monkeypatch.setattr(gemv, "PDL_INTERPRET", True)
        monkeypatch.setattr(gemv, "PDL_PRELOAD_KB", preload_kb)
        monkeypatch.setattr(gemv, "NAN_FILL", True)
        g = torch.Generator().manual_seed(M * 7 + N + K + preload_kb)
        x32, r32 = torch.randn(M, 2 * K, generator=g), torch.randn(M, max(N, K), generator=g)
        w32 = torch.randn(N, K, generator=g) / K ** 0.5
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            x, w = x32[:, :K].to(dtype), w32.to(dtype)
            for cfg in (gemv.Config(16, 16, 1), gemv.Config(16, 32, 3), gemv.Config(32, 16, 4)):
                assert gemv.pdl_plan(cfg, x.element_size())[0] >= 1
                ref = gemv.skinny_linear_reference(x, w).float()
                got = gemv.launch(x, w, cfg)
                assert not got.isnan().any() and torch.equal(got, gemv.launch(x, w, cfg)), cfg
                torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))
                for swiglu in (False, True):
                    xin = x32.to(dtype) if swiglu else x
                    res = r32[:, :N].to(dtype)
                    want = gemv.skinny_linear_fused_reference(xin, w, res, swiglu).float()
                    got = gemv.launch_fused(xin, w, res, swiglu, cfg)
                    assert not got.isnan().any(), cfg
                    torch.testing.assert_close(got.float(), want, rtol=tol,
                                               atol=tol * max(1.0, float(want.abs().max())))
                for glu in (False, True):
                    wn = w if not glu or N % 2 == 0 else w[:-1]
                    r = r32[:, :K].to(dtype)
                    want, want_h = norm_gemv.norm_linear_reference(x, r, wn, 1e-6, glu)
                    got, h = norm_gemv.launch(x, r, wn, 1e-6, glu, cfg)
                    assert not got.isnan().any(), cfg
                    torch.testing.assert_close(got.float(), want.float(), rtol=tol,
                                               atol=tol * max(1.0, float(want.float().abs().max())))
                    torch.testing.assert_close(h.float(), want_h.float(), rtol=tol, atol=tol)

    def test_static_step_fuse_norm_kernel_equals_unfused():
        """The engine step with the fused norm kernel running (interpreted) == the unfused step (fp32 debug hybrid,
        mixed clean / window steps with late commits)."""
        from flarectl.engine import norm_gemv
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        backends = [SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_norm=True),
                    SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_norm=False)]
        calls, orig = [], norm_gemv.launch
        norm_gemv.launch = lambda *a, **k: calls.append(1) or orig(*a, **k)
        try:
            for _ in _mixed_steps(backends, 5):
                pass
        finally:
            norm_gemv.launch = orig
        assert calls, "the fused norm kernel never ran"

    def test_cublas_choice_dispatches_to_f_linear():
        """A shape whose tuning picked cuBLAS runs ``F.linear`` (no kernel launch)."""
        x, w = torch.randn(3, 24), torch.randn(5, 24)
        gemv._CHOSEN[gemv._key(x, w)] = gemv.CUBLAS
        orig, calls = gemv.launch, []
        gemv.launch = lambda *a, **k: calls.append(1) or orig(*a, **k)
        try:
            torch.testing.assert_close(gemv.skinny_linear(x, w), x @ w.t())
        finally:
            gemv.launch = orig
            gemv._CHOSEN.pop(gemv._key(x, w))
        assert not calls

    def test_op_and_linear_dispatch_interpreted():
        """Under the interpreter the op runs the kernel (CPU tensors), with leading dims flattened by ``linear``."""
        x, w = torch.randn(2, 3, 40), torch.randn(17, 40)
        assert gemv.kernel_applies(x, w)
        y = gemv.linear(x, w, True)
        assert y.shape == (2, 3, 17)
        torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-4)

    def test_static_step_with_gemv_equals_without():
        """The engine step with the kernel in its projections and LM head (and, ``fuse_down``, each MLP's
        activation, down projection and residual add in one launch; or ``fuse_norm``: the fused norm kernel up to
        16 rows, above that the add and norm in torch and the projection through the kernel) == the step without
        (fp32 debug hybrid, fused projections; steps of 4 to 28 rows: 16-, 32- and 64-row tiles)."""
        from flarectl.engine import norm_gemv
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        backends = [SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_down=True),
                    SlotBackend(m, 4, 64, fuse=True, gemv=True, fuse_norm=True),
                    SlotBackend(m, 4, 64, fuse=True, gemv=False)]
        assert backends[0].eager.gemv and not backends[2].eager.gemv and backends[1].eager.fuse_norm
        assert backends[0].eager.fuse_down and all(f.get("fuse_down") for f in backends[0].eager.fused.values())
        for b in backends:
            b.prefill([0, 1, 2, 3], [[5, 6, 7], [], list(range(10, 30)), [9]])
        g = torch.Generator().manual_seed(0)
        rows, fused_calls, norm_calls = [], [], []
        orig, orig_fused, orig_norm = gemv.launch, gemv.launch_fused, norm_gemv.launch
        gemv.launch = lambda x, *a, **k: rows.append(x.shape[0]) or orig(x, *a, **k)
        gemv.launch_fused = lambda *a, **k: fused_calls.append(1) or orig_fused(*a, **k)
        norm_gemv.launch = lambda x, *a, **k: norm_calls.append(x.shape[0]) or orig_norm(x, *a, **k)
        try:
            for wc, ww in [(1, 0), (1, 0), (0, 4), (1, 3), (5, 0), (4, 3), (1, 0)]:
                ids = torch.randint(0, 250, (4, wc + ww), generator=g)
                counts = torch.full((4,), wc)
                wlen = torch.full((4,), ww)
                commit = torch.tensor([True, False, True, True])
                outs = [b.step(ids, counts, wlen, commit, wc) for b in backends]
                for b in backends:
                    b.finish_step(None)
                for out in outs[1:]:
                    torch.testing.assert_close(outs[0], out, rtol=1e-4, atol=1e-4)
        finally:
            gemv.launch, gemv.launch_fused, norm_gemv.launch = orig, orig_fused, orig_norm
        assert {4, 16, 20, 28} <= set(rows), sorted(set(rows))  # AR, 16-row, 32-row tiles ran
        assert fused_calls, "the fused down projection never ran"
        assert norm_calls and max(norm_calls) <= norm_gemv.MAX_ROWS
        assert torch.equal(backends[0].cache.lengths, backends[2].cache.lengths)


    @pytest.mark.parametrize("T,H,HV,K,V", [(1, 2, 4, 16, 8), (3, 1, 2, 16, 16), (2, 2, 2, 8, 24), (0, 1, 2, 8, 8)])
    def test_recurrence_kernel_matches_twin(T, H, HV, K, V):
        """The commit kernel (mode 0) and the window kernel (mode 1) == the torch twin: outputs, the cache state
        (new for committing rows, bitwise untouched for the others) and ``last`` of the non-committing rows. V=24
        with 8-column programs covers several V blocks; NaN-filled ``last`` catches a read of the wrong buffer."""
        from flarectl.engine.gdn_ops import _recurrence_torch, gdn_recurrence_commit, gdn_recurrence_from

        g = torch.Generator().manual_seed(T * 100 + K + V)
        C = 4
        q, k, v = torch.randn(C, T, H, K, generator=g), torch.randn(C, T, H, K, generator=g), \
            torch.randn(C, T, HV, V, generator=g)
        gate, beta = -torch.rand(C, T, HV, generator=g), torch.rand(C, T, HV, generator=g)
        state = torch.randn(C, HV, K, V, generator=g) * 0.3
        commit = torch.tensor([True, False, False, True])
        scale = K ** -0.5
        full = torch.empty_like(state)
        o_ref = _recurrence_torch(q, k, v, gate, beta, state.clone(), full, scale)
        st, last = state.clone(), torch.full_like(state, float("nan"))
        o = gdn_recurrence_commit(q, k, v, gate, beta, st, last, commit, scale, "triton")
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st[commit], full[commit], rtol=1e-5, atol=1e-5)
        assert torch.equal(st[~commit], state[~commit])
        assert last[commit].isnan().all()  # never written: the committing rows' state went to the cache only
        torch.testing.assert_close(last[~commit], full[~commit], rtol=1e-5, atol=1e-5)
        qw, kw, vw = q[:, :2] * 0.5 + 0.1, k[:, :2], v[:, :2]  # a window after the clean tokens (T=0: none)
        ow = gdn_recurrence_from(qw, kw, vw, gate[:, :2], beta[:, :2], st, last, commit, scale, "triton")
        ref_w = _recurrence_torch(qw, kw, vw, gate[:, :2], beta[:, :2], full.clone(), None, scale)
        torch.testing.assert_close(ow, ref_w, rtol=1e-5, atol=1e-5)
        assert torch.equal(st[~commit], state[~commit])

    MIXER_SHAPES = [  # C, W, wc, H, HV, K, V, S, bias, v_block
        (3, 1, 1, 1, 1, 8, 8, 3, False, None), (4, 3, 2, 2, 4, 16, 8, 3, True, None),
        (2, 4, 0, 1, 2, 12, 24, 3, False, None), (3, 5, 3, 1, 3, 8, 5, 2, True, None),
        (3, 2, 1, 2, 2, 16, 16, 3, True, 8), (2, 3, 1, 1, 2, 8, 24, 3, False, 8), (3, 5, 3, 1, 3, 8, 5, 2, True, 4),
        (2, 1, 1, 1, 1, 8, 8, 3, False, 4)]

    ANCHORED_MIXER_SHAPES = [(3, 3, 1, 1, 1, 8, 8, 3, False, None, True), (4, 5, 2, 2, 4, 16, 8, 3, True, 8, True),
                             (3, 7, 4, 1, 3, 8, 5, 2, True, 4, True),
                             (2, 6, 3, 1, 2, 40, 24, 3, False, None, True)]  # K 40: the chunk form's 2 slices of K

    @pytest.mark.parametrize("C,W,wc,H,HV,K,V,S,bias,v_block,anchored",
                             [(*shape, False) for shape in MIXER_SHAPES] + ANCHORED_MIXER_SHAPES)
    def test_mixer_kernel_matches_twin(C, W, wc, H, HV, K, V, S, bias, v_block, anchored):
        """The one-kernel mixer (``mixer.launch``, NaN-filled output) == the torch chain: the normed output, the
        cache state (new for committing rows, bitwise untouched for the others), ``last_state`` of the others,
        the conv state and ``last_conv``; odd K/V (masked lanes), HV = 1..3 x H, padding, window only (wc 0);
        ``v_block``: the state's columns split over programs (the group's last program norms and commits q/k;
        its arrival counters are left at zero for the next launch); ``anchored``: windows that see ``seen`` =
        counts - 1 clean tokens (their conv context and start state kept from before the last clean token); the
        tokens' inputs prepared in one block or in blocks of 2 (``token_block``); both read-outs of the state
        (``parallel_readout``)."""
        import functools

        from flarectl.engine import mixer
        from flarectl.engine.gdn_ops import gdn_mixer_chain

        mixer.NAN_FILL = True
        a = _mixer_problem(C * 7 + W, C, W, wc, H, HV, K, V, S, bias, anchored=anchored)
        ref = _run_mixer(gdn_mixer_chain, a, wc, H, HV, K, V)
        c = a["commit"]
        # one block of tokens, and blocks of 2 (the last one partial for odd W); the state read out in parallel
        # (S^T k and S^T q from the state before each token) and serially (o from the updated state)
        for token_block, parallel, chunk in ((None, True, False), (2, True, False), (None, False, False),
                                             (2, False, False), (None, False, True)):
            got = _run_mixer(functools.partial(mixer.launch, v_block=v_block, token_block=token_block,
                                               parallel_readout=parallel, chunk=chunk), a, wc, H, HV, K, V)
            assert not gemv.arrival_counters(torch.device("cpu"), 1).any()
            assert got[0].shape == (C, W, HV * V) and not got[0].isnan().any()
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[1][~c], a["state"][~c])
            assert got[3][c].isnan().all()  # the committing rows' state went to the cache only
            torch.testing.assert_close(got[3][~c], ref[3][~c], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[2], ref[2]) and torch.equal(got[4], ref[4])

    @pytest.mark.parametrize("shape", ANCHORED_MIXER_SHAPES)
    def test_mixer_anchor_reuse_matches_twin_under_its_contract(shape):
        """``anchor_reuse`` (the window of an anchored row goes on from the state after the clean tokens instead of
        redoing its first token, ``mixer.ANCHOR_REUSE``) == the torch chain when every anchored window's first token
        is the row's last clean token, as the engine's plans make it (NaN-filled output; both read-outs, token blocks
        of 1 and 2); with any other first token the anchored rows' windows differ (the shortcut ran), the other rows
        and the committed state do not."""
        import functools

        from flarectl.engine import mixer
        from flarectl.engine.gdn_ops import gdn_mixer_chain

        C, W, wc, H, HV, K, V, S, bias, v_block, _ = shape
        mixer.NAN_FILL = True
        a = _mixer_problem(C * 11 + W, C, W, wc, H, HV, K, V, S, bias, anchored=True)
        anchored = (a["seen"] < a["counts"]).tolist()
        assert any(anchored)
        broken = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        for r, anch in enumerate(anchored):
            if anch:
                a["proj"][r, wc] = a["proj"][r, int(a["counts"][r]) - 1]  # the contract: window[0] = last clean
        ref = _run_mixer(gdn_mixer_chain, a, wc, H, HV, K, V)
        c = a["commit"]
        for token_block, parallel in ((None, False), (2, False), (None, True)):
            launch = functools.partial(mixer.launch, v_block=v_block, token_block=token_block,
                                       parallel_readout=parallel, chunk=False, anchor_reuse=True)
            got = _run_mixer(launch, a, wc, H, HV, K, V)
            assert not got[0].isnan().any()
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[3][~c], ref[3][~c], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[2], ref[2]) and torch.equal(got[4], ref[4])
        ref_b = _run_mixer(gdn_mixer_chain, broken, wc, H, HV, K, V)
        got_b = _run_mixer(functools.partial(mixer.launch, v_block=v_block, chunk=False, anchor_reuse=True), broken,
                           wc, H, HV, K, V)
        for r, anch in enumerate(anchored):
            same = torch.allclose(got_b[0][r, wc:], ref_b[0][r, wc:], rtol=1e-5, atol=1e-5)
            assert same != anch, (r, anch)
            torch.testing.assert_close(got_b[0][r, :wc], ref_b[0][r, :wc], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_b[1], ref_b[1], rtol=1e-5, atol=1e-5)

    def test_static_step_mixer_equals_adapter_path_and_chain():
        """The engine step with the one-kernel mixer (interpreted) == the adapter path and == the step without it
        ('torch', 1e-5) (fp32 debug hybrid: H=2, HV=4), through clean / window / commit / late-commit steps."""
        from flarectl.engine.backends import AdapterBackend, SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        backends = [SlotBackend(m, 4, 64, gdn_kernel=k, fuse=True, gemv=False) for k in ("torch", "torch")]
        backends.append(AdapterBackend(m, 4, 64))
        for b in backends:
            b.prefill([0, 1, 2, 3], [[5, 6, 7], [], list(range(10, 30)), [9]])
        backends[0].eager.recurrence = "mixer"  # after the prefill (64-token chunks: slow when interpreted)
        from flarectl.engine import mixer

        default_block = mixer.V_BLOCK
        g = torch.Generator().manual_seed(3)
        for (wc, ww), mixer.V_BLOCK in [((2, 1), None), ((1, 0), 8)]:  # (window only: the kernel tests, wc 0;
            # interpreted steps are slow); V_BLOCK 8: two programs per v-head (V 16), four per k-head (HV = 2H)
            ids = torch.randint(0, 250, (4, wc + ww), generator=g)
            counts = torch.randint(0 if ww else 1, wc + 1, (4,), generator=g) if wc else torch.zeros(4).long()
            wlen = torch.full((4,), ww)
            commit = torch.rand(4, generator=g) < 0.6
            late = (torch.rand(4, generator=g) < 0.5) & ~commit
            seen = counts - (counts > 0).long() * (torch.arange(4) % 2) if ww else None  # rows 1, 3 anchored
            outs = [b.step(ids, counts, wlen, commit, wc, seen) for b in backends]
            for b in backends:
                b.finish_step(late)
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
            for r in range(4):
                c = int(counts[r])
                torch.testing.assert_close(outs[0][r, :c], outs[2][r, :c], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(outs[0][r, wc:], outs[2][r, wc:], rtol=1e-4, atol=1e-4)
            assert torch.equal(backends[0].cache.lengths, backends[2].cache.lengths)
        mixer.V_BLOCK = default_block

    def test_static_step_triton_recurrence_equals_adapter_path():
        """The engine step with the in-place-commit recurrence kernel == the adapter path (fp32 debug hybrid),
        through mixed clean/window steps, commits, late commits (``finish_step``) and prefill."""
        from flarectl.engine.backends import AdapterBackend, SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        recurrence.BV = 64  # one V block per program: fewer interpreted programs (the unit test above covers 8)
        backends = [SlotBackend(m, 4, 64, gdn_kernel="triton", gemv=False), AdapterBackend(m, 4, 64)]
        assert backends[0].gdn_kernel == "triton"
        for b in backends:
            b.prefill([0, 1, 2, 3], [[5, 6, 7], [], list(range(10, 30)), [9]])
        g = torch.Generator().manual_seed(3)
        for wc, ww, anchored in [(1, 0, False), (0, 2, False), (2, 2, False), (2, 2, True), (1, 0, False)]:
            # (0, 2): no clean token, the state moves to ``last``; anchored: rows 1, 3 see counts - 1 clean tokens
            ids = torch.randint(0, 250, (4, wc + ww), generator=g)
            counts = torch.randint(0 if ww else 1, wc + 1, (4,), generator=g) if wc else torch.zeros(4).long()
            wlen = torch.full((4,), ww)
            commit = torch.rand(4, generator=g) < 0.6
            late = (torch.rand(4, generator=g) < 0.5) & ~commit
            seen = counts - (counts > 0).long() * (torch.arange(4) % 2) if anchored else None
            outs = [b.step(ids, counts, wlen, commit, wc, seen) for b in backends]
            for b in backends:
                b.finish_step(late)
            for r in range(4):
                c = int(counts[r])
                torch.testing.assert_close(outs[0][r, :c], outs[1][r, :c], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(outs[0][r, wc:], outs[1][r, wc:], rtol=1e-4, atol=1e-4)
            assert torch.equal(backends[0].cache.lengths, backends[1].cache.lengths)

    ATTN_SHAPES = [(3, 4, 2, 16, 40, 2, 3), (2, 2, 2, 24, 70, 1, 0), (4, 8, 2, 16, 33, 0, 4), (2, 4, 1, 16, 64, 5, 0)]

    @pytest.mark.parametrize("C,HQ,HKV,D,cap,wc,ww", ATTN_SHAPES)
    def test_decode_attention_kernel_matches_twin(C, HQ, HKV, D, cap, wc, ww):
        """The decode-attention kernel (NaN-filled output; 1, 2 and 4 KV splits, the last split combining; one query
        token per program or blocks of 2, 4 and 8 sharing a pass over the cache) == the twin (mask + SDPA): clean,
        window-only and mixed steps, padding window queries, GQA 1-4, odd D and capacity, non-contiguous q and
        window keys; counters back at zero."""
        from flarectl.engine import attention

        attention.NAN_FILL = True
        block = attention.BLOCK_N
        attention.BLOCK_N = 16  # several blocks per split at these sizes
        try:
            g = torch.Generator().manual_seed(C * 100 + cap)
            W = wc + ww
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                r = lambda *sh: torch.randn(*sh, generator=g).to(dtype)  # noqa: E731
                q = r(C, W, HQ, D).transpose(1, 2)
                key, value = r(C, HKV, cap + 5, D), r(C, HKV, cap + 5, D)
                kw, vw = r(C, ww, HKV, D).transpose(1, 2), r(C, ww, HKV, D).transpose(1, 2)
                lengths = torch.randint(0, cap - wc, (C,), generator=g)
                counts = torch.randint(0, wc + 1, (C,), generator=g)
                wlen = torch.randint(0, ww + 1, (C,), generator=g)
                args = (q, key, value, kw, vw, lengths, counts, wlen, wc, cap, D ** -0.5)
                ref = attention.decode_attention_reference(*args).float()
                for splits, tokens in ((1, None), (2, None), (4, None), (1, 2), (2, 8), (4, 4)):
                    out = attention.launch(*args, splits=splits, tokens_per_program=tokens)
                    assert out.shape == q.shape and not out.isnan().any(), (splits, tokens)
                    torch.testing.assert_close(out.float(), ref, rtol=2 * tol, atol=2 * tol)
            assert not gemv.arrival_counters(torch.device("cpu"), 1).any()
        finally:
            attention.NAN_FILL = False
            attention.BLOCK_N = block

    CORE_SHAPES = [dict(), dict(wc=3, ww=2), dict(wc=0, ww=4), dict(gated=False, norm=False, rot=0),
                   dict(C=2, wc=2, ww=3, hq=6, hkv=3, d=24, rot=12, S=21), dict(C=4, wc=5, hq=2, hkv=1, d=16, rot=16),
                   dict(wc=4, ww=3, hq=9, hkv=3, d=64, rot=64, S=37, gated=False, norm=False)]  # SmolLM2's heads

    def test_attention_core_prologue_capped_slot_written_by_the_last_clean_token_only():
        """Clean tokens capped to the cache's last slot all map to it; on a GPU their programs run in any order, so
        only the last clean token's program may write it (the H100 caught the race). Launching every program but
        the last leaves the slot untouched; all of them write the last token's k/v; uncapped slots are written."""
        from flarectl.engine import attention_core

        S, wc = 9, 4
        args = _core_problem(2, C=1, wc=wc, ww=2, S=S)
        qkv, gq, gk, eps, cos, sin, key, value, lengths = args[:9]
        lengths.fill_(S - 3)  # tokens 0, 1 at slots S-3, S-2; tokens 2, 3 capped to S-1
        hq, hkv, gated = args[14], args[15], args[16]
        key0 = key.clone()
        partial = key.clone()
        attention_core.prologue(qkv, gq, gk, eps, cos, sin, partial, value.clone(), lengths, wc, hq, hkv, gated,
                                programs=wc - 1)
        assert torch.equal(partial[:, :, S - 1], key0[:, :, S - 1])  # token 2 is capped but not last: no write
        assert not torch.equal(partial[:, :, S - 3: S - 1], key0[:, :, S - 3: S - 1])
        full = key.clone()
        attention_core.prologue(qkv, gq, gk, eps, cos, sin, full, value.clone(), lengths, wc, hq, hkv, gated)
        ref = key.clone()
        attention_core.attention_core_reference(qkv, gq, gk, eps, cos, sin, ref, value.clone(), lengths, args[9],
                                                args[10], wc, S, args[13], hq, hkv, gated)
        torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6)
        assert not torch.equal(full[:, :, S - 1], key0[:, :, S - 1])

    @pytest.mark.parametrize("kw", CORE_SHAPES)
    def test_attention_core_kernel_matches_twin(kw):
        """``attention_core`` (prologue kernel + attention kernel with the gate, interpreted; NaN-filled outputs)
        == the twin: the output, the clean tokens' k/v in the cache (slots capped at the capacity), every other slot
        untouched. fp32 to 1e-5; bf16: the prologue's q / cache k to 2 ulp of the twin's eager roundings and the
        output as close to an fp64 twin as the bf16 twin is (+ the attention kernel's P rounding). Shapes: clean,
        window-only and mixed steps; GQA 1-3 (9 query heads over 3, as a converted SmolLM2); odd D, rotary width and
        capacity; full and partial rotary; with and without gate and norms."""
        from flarectl.engine import attention, attention_core

        attention.NAN_FILL = attention_core.NAN_FILL = True
        try:
            for dtype in (torch.float32, torch.bfloat16):
                args = _core_problem(7, dtype=dtype, **kw)
                key0, value0 = args[6].clone(), args[7].clone()
                ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                got = attention_core.attention_core(*args)
                want = attention_core.attention_core_reference(*ref)
                assert not got.isnan().any()
                wrote = _clean_slot_mask(key0, args[8], args[11])  # only the clean tokens' slots change
                assert torch.equal(args[6][~wrote], key0[~wrote]) and torch.equal(ref[6][~wrote], key0[~wrote])
                if dtype == torch.float32:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(args[6], ref[6], rtol=1e-5, atol=1e-6)
                    assert torch.equal(args[7], ref[7])  # values are copied, not computed
                    continue
                _assert_bf16_near(args[6], ref[6])
                assert torch.equal(args[7], ref[7])
                exact = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in _core_problem(7, dtype=dtype, **kw)]
                exact = attention_core.attention_core_reference(*exact)
                err_got = (got.double() - exact).abs().max().item()
                err_twin = (want.double() - exact).abs().max().item()
                assert err_got <= 3 * err_twin + 1e-2, (err_got, err_twin)
                qkv, gq, eps, cos, sin = ref[0], ref[1], ref[3], ref[4], ref[5]
                q, _, _ = attention_core.prologue(qkv, gq, ref[2], eps, cos, sin, key0.clone(), value0.clone(),
                                                  ref[8], ref[11], ref[14], ref[15], ref[16])
                qs = attention_core.split_heads(qkv, ref[14], ref[15], key0.shape[-1], ref[16])[0]
                q_twin = attention_core.apply_rope(attention_core._norm(qs, gq, eps).transpose(1, 2), cos, sin)
                _assert_bf16_near(q, q_twin)
        finally:
            attention.NAN_FILL = attention_core.NAN_FILL = False

    def test_static_step_attention_core_equals_torch_path():
        """The engine step with its attention layers through ``attention_core`` (interpreted) == through the
        attention kernel with the norms, RoPE, cache write and gate in torch (fp32 debug hybrid, 1e-5), over
        clean / window / commit / late-commit steps."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        backends = [SlotBackend(m, 4, 64, gdn_kernel="torch", gemv=False, attn_kernel=True, fuse=True, attn_core=k)
                    for k in (True, False)]
        assert backends[0].eager.attn_core and not backends[1].eager.attn_core
        assert any("core" in f for f in backends[0].eager.fused.values())
        for _ in _mixed_steps(backends, seed=5, random_wlen=True):
            assert torch.equal(backends[0].cache.lengths, backends[1].cache.lengths)

    def test_static_step_decode_attention_equals_sdpa():
        """The engine step with its attention layers through the kernel (interpreted) == the step with SDPA over
        the masked capacity (fp32 debug hybrid, 1e-5), through clean / window / commit / late-commit steps."""
        from flarectl.engine.backends import SlotBackend
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
        backends = [SlotBackend(m, 4, 64, gdn_kernel="torch", gemv=False, attn_kernel=k) for k in (True, False)]
        assert backends[0].eager.attn_kernel and not backends[1].eager.attn_kernel
        for _ in _mixed_steps(backends, seed=4, random_wlen=True):
            assert torch.equal(backends[0].cache.lengths, backends[1].cache.lengths)

    def test_ops_trace_under_torch_compile():
        """The ops trace through dynamo/AOT (fake impls, the mutated cache state, the fused norm projection's two
        outputs) and give the eager values."""
        from flarectl.engine import norm_gemv
        from flarectl.engine.gdn_ops import gdn_recurrence_commit, gdn_recurrence_from

        def fn(x, w, q, k, v, g, b, st, last, commit):
            y = gemv.linear(x, w, True) * 2
            o = gdn_recurrence_commit(q, k, v, g, b, st, last, commit, 0.25, "triton")
            ow = gdn_recurrence_from(q, k, v, g, b, st, last, commit, 0.25, "triton")
            yn, h = norm_gemv.project(x, x * 0.5, w[:16], 1e-6, True, True)
            return y, o + 1, ow, yn * 3, h - 1

        gen = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
        x, w = r(2, 3, 40), r(17, 40)
        q, k, v = r(2, 1, 1, 16), r(2, 1, 1, 16), r(2, 1, 2, 8)
        g, b = -torch.rand(2, 1, 2, generator=gen), torch.rand(2, 1, 2, generator=gen)
        state, commit = r(2, 2, 16, 8), torch.tensor([True, False])
        args = lambda: (x, w, q, k, v, g, b, state.clone(), torch.zeros_like(state), commit)  # noqa: E731
        a1, a2 = args(), args()
        ref = fn(*a1)
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*a2)
        for u, t in zip(got, ref):
            torch.testing.assert_close(u, t)
        torch.testing.assert_close(a2[7], a1[7])  # the cache state mutated in place the same way
        torch.testing.assert_close(a2[8][1], a1[8][1])

    @pytest.mark.parametrize("n,nbytes,grid", [(1, None, 1), (37, None, 3), (1000 * 37, 10_000, 5),
                                               (4097 * 5, None, 7), (16384 + 3, None, 2)])
    def test_prefetch_load_kernel_reads_every_word(n, nbytes, grid):
        """The portable prefetch kernel ('load'; 'load_wide' takes 16384-word blocks) reads exactly the requested
        prefix: the XOR of the words its programs store equals the XOR of the prefix (odd sizes, ragged last
        program; untouched token entries keep their NaN-like sentinel)."""
        import numpy as np

        from flarectl.engine import prefetch

        w = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
        v = prefetch.words(w, nbytes)
        for method, block in (("load", 1024), ("load_wide", 16384)):
            token = torch.full((64,), -7, dtype=torch.int32)
            prefetch.l2_prefetch(torch.zeros(1), v, token, method, grid)
            per = -(-(-(-v.numel() // grid)) // block) * block
            progs = -(-v.numel() // per) if v.numel() else 0
            assert (token[progs:] == -7).all()
            got = np.bitwise_xor.reduce(token[:progs].numpy()) if progs else 0
            assert got == (np.bitwise_xor.reduce(v.numpy()) if v.numel() else 0)
