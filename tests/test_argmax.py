"""The one-pass greedy read-out (``flarectl.engine.argmax``) against its twin and against the sampler's generic path it
replaces in the engine's greedy trust-mode updates (``modes.GREEDY_READ``).

The Triton kernel runs on CPU under Triton's interpreter in a child process (the interpreter must be on before triton
is imported), output NaN-filled first so an unwritten element fails."""

from __future__ import annotations

import os

import pytest
import torch

from flarectl.engine import argmax

CHILD = os.environ.get("FLARE_ARGMAX_CHILD") == "1"


def _logits(seed: int, n: int, v: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """Random logits with ties for the maximum (inside a block, across blocks and splits) and -inf entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    for r in range(n):
        top = float(x[r].max()) + 1 + r
        tied = {(7 * r + 3) % v, (v // 2 + r) % v, v - 1 - r % v}  # the first of these must win
        for c in tied:
            x[r, c] = top
        if (5 * r + 1) % v not in tied:
            x[r, (5 * r + 1) % v] = float("-inf")
    return x.to(device, dtype)


if CHILD:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("n,v,split", [(1, 1, None), (3, 5, None), (2, 2047, None), (4, 2049, None),
                                           (7, 5000, None), (5, 9001, 2), (3, 9001, 5), (2, 6144, 3),
                                           (6, 4100, 1)])
    def test_kernel_matches_twin_interpreted(dtype, n, v, split, monkeypatch):
        from flarectl.engine import gemv

        monkeypatch.setattr(argmax, "NAN_FILL", True)
        x = _logits(n * 1000 + v, n, v, dtype)
        got = argmax.launch(x, split)
        want = argmax.argmax_confidence_reference(x)
        assert torch.equal(got[0], want[0]), (got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-7)
        assert int(gemv.arrival_counters(x.device, n)[:n].abs().sum()) == 0  # the last split reset them

    def test_kernel_reads_a_row_strided_view_interpreted(monkeypatch):
        monkeypatch.setattr(argmax, "NAN_FILL", True)
        x = _logits(3, 6, 4500, torch.float32)[::2]  # rows 0, 2, 4: row stride 2V
        assert argmax.kernel_applies(x)
        torch.testing.assert_close(argmax.argmax_confidence(x), argmax.argmax_confidence_reference(x),
                                   rtol=2e-6, atol=1e-7)

    def test_op_uses_the_kernel_interpreted(monkeypatch):
        calls = []
        real = argmax.launch
        monkeypatch.setattr(argmax, "launch", lambda x, split=None: calls.append(tuple(x.shape)) or real(x, split))
        x = _logits(1, 3, 3000, torch.bfloat16)
        tok, conf = argmax.greedy_read(x.view(1, 3, 3000))
        assert calls == [(3, 3000)] and tok.shape == conf.shape == (1, 3) and tok.device.type == "cpu"
        assert torch.equal(tok[0], x.float().argmax(-1))

else:
    def test_interpreter_suite(run_interpreted):
        out = run_interpreted(__file__, "FLARE_ARGMAX_CHILD")
        assert "29 passed" in out, out[-2000:]  # every interpreted case ran (none skipped)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
    def test_twin_is_the_sampler_path(dtype):
        """The twin gives the tokens of the one-hot greedy 'probabilities' and the confidence of
        ``diffusion_trust.propose``, bit for bit: switching the read-out changes no decision on CPU."""
        from flarectl.decoding import diffusion_trust
        from flarectl.decoding.sampling import Sampler, process_logits

        x = _logits(0, 6, 777, dtype)
        packed = argmax.argmax_confidence_reference(x)
        assert torch.equal(packed[0].long(), process_logits(x, 0.0).argmax(-1))
        tok, conf = diffusion_trust.propose(x, Sampler.create(0.0, 1.0, 0, "cpu"))
        assert torch.equal(packed[0].long(), tok) and torch.equal(packed[1], conf)
        assert packed.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    def test_op_registration_and_cpu_twin():
        x = _logits(1, 4, 50, torch.float32)
        torch.library.opcheck(argmax.argmax_confidence, (x,))
        assert not argmax.kernel_applies(x)  # CPU without the interpreter: the twin
        assert torch.equal(argmax.argmax_confidence(x), argmax.argmax_confidence_reference(x))
        assert not argmax.kernel_applies(x.double()) and not argmax.kernel_applies(x.t())

    def test_greedy_view_indexes_like_logits():
        from flarectl.engine.modes import Greedy

        x = _logits(2, 12, 40, torch.float32).view(3, 4, 40)
        view = Greedy.read(x)
        assert torch.equal(view.tokens, x.argmax(-1)) and view.shape == (3, 4)
        sel = torch.tensor([2, 0])
        for key in [(slice(None), slice(1, 3)), sel, (sel, slice(0, 2))]:
            sub = view[key]
            assert torch.equal(sub.tokens, x[key].argmax(-1))
            assert torch.equal(sub.conf, torch.softmax(x[key], -1).amax(-1))


def _mixed_run(m, read: bool, monkeypatch, dt_scheme: str, ar_scheme: str = "anchored"):
    from flarectl.engine import Engine, Request, modes

    monkeypatch.setattr(modes, "GREEDY_READ", read)
    engine = Engine(m, concurrency=3, capacity=64, mask_token_id=258, diffusion_trust_scheme=dt_scheme,
                    ar_trust_scheme=ar_scheme)
    mix = [([5, 6, 7], "ar-trust", 4, 12, 0.9), ([9], "diffusion-trust", 4, 10, 0.6), ([1, 2], "ar", None, 5, 0.9),
           ([70, 71], "ar-trust", 2, 9, 0.9), (list(range(80, 95)), "diffusion-trust", 3, 11, 0.5),
           ([33, 34, 35], "ar-trust", 3, 7, 0.9), ([3, 4], "diffusion-trust", 2, 8, 0.9)]
    for prompt, mode, block, n, thr in mix:
        engine.submit(Request(prompt, mode, max_new_tokens=n, block_size=block, threshold=thr, stop_ids=[]))
    return [(r.token_ids, r.forwards, r.acceptance_histogram) for r in engine.run()]


@pytest.mark.skipif(CHILD, reason="parent process only")
@pytest.mark.parametrize("dt_scheme,ar_scheme", [("plain", "anchored"), ("anchored", "anchored"), ("plain", "fused")])
def test_engine_greedy_read_changes_nothing(monkeypatch, dt_scheme, ar_scheme):
    """The engine with the one-pass read-out == with the sampler's generic path: tokens, forwards and acceptance
    histograms of every mode, every scheme (a sharpened fp32 debug model, so drafts are accepted and thresholds
    pass)."""
    from flarectl.models.loading import load_model

    m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
    with torch.no_grad():
        m.hf.lm_head.weight.mul_(30)
    on = _mixed_run(m, True, monkeypatch, dt_scheme, ar_scheme)
    assert on == _mixed_run(m, False, monkeypatch, dt_scheme, ar_scheme)
    assert sum(sum(k * c for k, c in enumerate(h)) for _, _, h in on) > 0  # drafts accepted / tokens decided


@pytest.mark.gpu
@pytest.mark.skipif(CHILD, reason="parent process only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_on_cuda_matches_twin(dtype, monkeypatch):
    """At the Qwen3.5 vocabulary (248,320) and the engine's row counts (AR 8, window 32, trust 64), NaN-filled."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    monkeypatch.setattr(argmax, "NAN_FILL", True)
    for n in (1, 8, 32, 64):
        x = _logits(n, n, 248320, dtype, "cuda")
        got = argmax.argmax_confidence(x)
        want = argmax.argmax_confidence_reference(x)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(CHILD, reason="parent process only")
def test_engine_greedy_read_changes_nothing_on_cuda(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from flarectl.models.loading import load_model

    m = load_model("debug-hybrid", dtype="float32", device="cuda", seed=1)
    with torch.no_grad():
        m.hf.lm_head.weight.mul_(30)
    for scheme in ("plain", "anchored"):
        assert _mixed_run(m, True, monkeypatch, scheme) == _mixed_run(m, False, monkeypatch, scheme)
