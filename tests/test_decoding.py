"""Decoding: AR with the hybrid cache, AR-Trust (exact), Diffusion-Trust, against no-cache recomputation."""

import pytest
import torch

from flarectl.decoding import StopChecker, ar_trust, generate
from flarectl.decoding.diffusion_trust import select_confident
from flarectl.decoding.sampling import process_logits, top_p_filter
from flarectl.engine import modes
from flarectl.models.loading import load_model

MASK = 258
PROMPTS = [[60, 61, 62, 63, 64], [70, 71], [80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97,
                                              98, 99], [33, 34, 35]]  # one prompt > 16 tokens: packed prefill


@pytest.fixture(scope="module")
def models(sharp):
    """fp64 debug models with a sharpened LM head (peaky distributions: drafts get accepted, thresholds pass)."""
    return sharp


def run(model, prompts, mode, **kw):
    kw = {"max_new_tokens": 12, "stop_ids": [], "block_size": 4, "mask_token_id": MASK} | kw
    return generate(model, prompts, mode, **kw)


def ids(results):
    return [r.token_ids for r in results]


# -- AR ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
def test_ar_cached_equals_recompute_and_batch_equals_alone(models, name):
    m = models[name]
    cached = ids(run(m, PROMPTS, "ar"))
    assert cached == ids(run(m, PROMPTS, "ar", use_cache=False))
    assert cached == [ids(run(m, [p], "ar"))[0] for p in PROMPTS]
    assert all(len(t) == 12 for t in cached)


def test_ar_length_one_prompt_and_forward_count(models):
    res = run(models["debug-hybrid"], [[7], [7, 8, 9]], "ar", max_new_tokens=5)
    assert [r.forwards for r in res] == [5, 5]  # prefill + 4 one-token steps
    assert ids(res)[0] == ids(run(models["debug-hybrid"], [[7]], "ar", max_new_tokens=5))[0]


# -- AR-Trust greedy == AR greedy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_ar_trust_greedy_equals_ar(models, name, block):
    m = models[name]
    reference = ids(run(m, PROMPTS, "ar", max_new_tokens=14))
    batch = run(m, PROMPTS, "ar-trust", block_size=block, max_new_tokens=14)
    assert ids(batch) == reference
    assert ids(run(m, PROMPTS[1:2], "ar-trust", block_size=block, max_new_tokens=14)) == reference[1:2]
    for r in batch:
        hist = r.acceptance_histogram
        assert len(hist) == block + 1 and hist[block] == 0  # B - 1 drafts per verify: at most B - 1 accepted
        # every verify emits accepted + 1 tokens, every draft step one (the last may be cut by max_new_tokens)
        verifies = sum(hist)
        drafts = r.forwards - verifies
        assert sum(k * c for k, c in enumerate(hist)) + verifies + drafts >= len(r.token_ids)
        if block == 1:  # nothing to draft: plain AR, one token per forward
            assert verifies == 0 and r.forwards == 14
        else:  # a draft step first and after each rejection (unless the request ended there)
            rejected = sum(hist[:block - 1])
            assert rejected <= drafts <= rejected + 1


def _forced_drafts(reference, correct: bool):
    """A ``propose`` hook returning the AR tokens (all accepted) or tokens that never match (all rejected)."""
    def propose(q, sampler, rows, generated):
        block = q.shape[1]
        out = []
        for r, g in zip(rows, generated):
            truth = (reference[r] + [0] * (block + 1))[g:g + block]
            out.append(truth if correct else [(t + 1) % 256 for t in truth])
        return torch.tensor(out)
    return propose


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
@pytest.mark.parametrize("correct", [True, False])
@pytest.mark.parametrize("read", [False, True])
def test_ar_trust_forced_accept_and_reject(models, monkeypatch, name, correct, read):
    """``read``: the engine's one-pass greedy read-out (``modes.GREEDY_READ``): the hook gets argmax tokens."""
    monkeypatch.setattr(modes, "GREEDY_READ", read)
    m, block, n = models[name], 4, 15
    reference = ids(run(m, PROMPTS, "ar", max_new_tokens=n))
    monkeypatch.setattr(ar_trust, "propose", _forced_drafts(reference, correct))
    res = run(m, PROMPTS, "ar-trust", block_size=block, max_new_tokens=n)
    assert ids(res) == reference
    for r in res:
        hist = r.acceptance_histogram
        if correct:  # 15 tokens: a draft step (1 token), 3 full accepts (3 drafts + the bonus each), then a 4th
            # verify (its last forced draft lies past the reference, so it may be rejected): 5 forwards
            assert sum(hist) == 4 and hist[3] >= 3 and hist[3] + hist[2] == 4 and r.forwards == 5
        else:  # every verify rejects its first draft and emits the AR token, every draft step emits one: as AR
            assert hist == [7, 0, 0, 0, 0] and r.forwards == n


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
def test_ar_trust_schemes_both_exact(models, monkeypatch, name):
    """Both AR-Trust schemes reproduce AR greedy; with drafts that are always wrong the anchored scheme still emits
    one token per forward (an exact AR token in every draft and every verify step), the fused one every other."""
    m, n = models[name], 12
    reference = ids(run(m, PROMPTS, "ar", max_new_tokens=n))
    for scheme in ("anchored", "fused"):
        assert ids(run(m, PROMPTS, "ar-trust", ar_trust_scheme=scheme)) == reference
    monkeypatch.setattr(ar_trust, "propose", _forced_drafts(reference, False))
    forwards = {s: [r.forwards for r in run(m, PROMPTS, "ar-trust", ar_trust_scheme=s)] for s in ("anchored", "fused")}
    assert forwards == {"anchored": [n] * 4, "fused": [2 * n] * 4}
    with pytest.raises(ValueError, match="scheme"):
        run(m, PROMPTS, "ar-trust", ar_trust_scheme="tree")


# -- every mode: cache == no-cache recomputation ---------------------------------------------------------------------

@pytest.mark.parametrize("mode,temperature,scheme", [
    ("ar", 0.0, "plain"), ("ar", 0.8, "plain"), ("ar-trust", 0.0, "plain"), ("ar-trust", 0.8, "plain"),
    ("diffusion-trust", 0.0, "plain"), ("diffusion-trust", 0.8, "plain"), ("diffusion-trust", 0.0, "anchored"),
    ("diffusion-trust", 0.8, "anchored")])
def test_cached_equals_recompute(models, mode, temperature, scheme):
    m = models["debug-hybrid"]
    kw = dict(temperature=temperature, top_p=0.9, seed=5, threshold=0.6, max_new_tokens=13,
              diffusion_trust_scheme=scheme)
    cached = run(m, PROMPTS, mode, **kw)
    again = run(m, PROMPTS, mode, **kw, use_cache=False)
    assert ids(cached) == ids(again)
    assert [r.forwards for r in cached] == [r.forwards for r in again]
    assert [r.acceptance_histogram for r in cached] == [r.acceptance_histogram for r in again]


# -- Diffusion-Trust -------------------------------------------------------------------------------------------------

def test_diffusion_trust_batch_equals_alone(models):
    m = models["debug-hybrid"]
    batch = ids(run(m, PROMPTS, "diffusion-trust", threshold=0.6))
    assert batch == [ids(run(m, [p], "diffusion-trust", threshold=0.6))[0] for p in PROMPTS]


def test_diffusion_trust_stops_at_eos_inside_a_block(models):
    m = models["debug-hybrid"]
    full = run(m, PROMPTS[:1], "diffusion-trust", max_new_tokens=16, threshold=1.0)[0]
    cut = next(i for i in range(5, 16) if i % 4 not in (0, 3) and full.token_ids[i] not in full.token_ids[:i])
    eos = full.token_ids[cut]
    res = run(m, PROMPTS[:1], "diffusion-trust", max_new_tokens=16, threshold=1.0, stop_ids=[eos])[0]
    assert res.token_ids == full.token_ids[:cut + 1] and res.finish_reason == "eos"
    assert res.forwards < full.forwards


def test_diffusion_trust_threshold_one_is_one_token_per_step(models):
    for name in ("debug-hybrid", "debug-llama"):
        res = run(models[name], PROMPTS, "diffusion-trust", threshold=1.0, max_new_tokens=12)
        for r in res:
            assert r.acceptance_histogram == [0, 12, 0, 0, 0]
            assert r.forwards == 12 and r.tokens_per_forward == 1.0


def test_diffusion_trust_low_threshold_commits_several_per_step(models):
    res = run(models["debug-hybrid"], PROMPTS, "diffusion-trust", threshold=0.5, max_new_tokens=16)
    assert any(sum(r.acceptance_histogram[2:]) > 0 for r in res)
    assert all(r.tokens_per_forward == len(r.token_ids) / r.forwards for r in res)
    assert max(r.tokens_per_forward for r in res) > 1.0


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
@pytest.mark.parametrize("block", [1, 2, 4])
def test_diffusion_trust_anchored_ends_every_block_with_an_exact_ar_token(models, name, block, monkeypatch):
    """Anchored Diffusion-Trust (greedy): every block is B-1 denoised tokens and then the commit step's clean-path
    token, which is AR greedy's next token for the prefix so far (the tokens at positions kB - 1), at no extra
    forward: the histogram counts it with the denoised tokens of that forward. B = 1 is AR decoding itself."""
    m, n = models[name], 14
    res = run(m, PROMPTS, "diffusion-trust", block_size=block, threshold=0.6, max_new_tokens=n,
              diffusion_trust_scheme="anchored")
    if block == 1:
        assert ids(res) == ids(run(m, PROMPTS, "ar", max_new_tokens=n))
    for prompt, r in zip(PROMPTS, res):
        assert len(r.token_ids) == n and sum(r.acceptance_histogram) == r.forwards
        assert sum(k * c for k, c in enumerate(r.acceptance_histogram)) >= n  # (the last forward may decide more)
        for i in range(block - 1, n, block):
            with torch.no_grad():
                logits = m.hf(torch.tensor([prompt + r.token_ids[:i]])).logits[0, -1]
            assert int(logits.argmax()) == r.token_ids[i], (i, block)
    plain = run(m, PROMPTS, "diffusion-trust", block_size=block, threshold=1.0, max_new_tokens=n)
    anchored = run(m, PROMPTS, "diffusion-trust", block_size=block, threshold=1.0, max_new_tokens=n,
                   diffusion_trust_scheme="anchored")
    # threshold 1: one denoised token per forward; the commit step's pass does not see the AR token in front of the
    # block, so by default it decides nothing (one token: the AR token) ...
    assert all(a.acceptance_histogram[1] == a.forwards == sum(a.acceptance_histogram) for a in anchored)
    monkeypatch.setattr(modes, "ANCHORED_FORCE_FIRST_PASS", True)
    forced = run(m, PROMPTS, "diffusion-trust", block_size=block, threshold=1.0, max_new_tokens=n,
                 diffusion_trust_scheme="anchored")
    if block > 1:  # ... forced (session 11), it decides its most confident token too: fewer forwards than plain
        assert all(a.forwards < p.forwards for a, p in zip(forced, plain))
        for prompt, r in zip(PROMPTS, forced):  # still an exact AR token at the end of every block
            for i in range(block - 1, n, block):
                with torch.no_grad():
                    logits = m.hf(torch.tensor([prompt + r.token_ids[:i]])).logits[0, -1]
                assert int(logits.argmax()) == r.token_ids[i], (i, block)
    with pytest.raises(ValueError, match="diffusion-trust scheme"):
        run(m, PROMPTS, "diffusion-trust", diffusion_trust_scheme="fused")


def test_anchored_first_pass_force_env(monkeypatch):
    monkeypatch.setattr(modes, "ANCHORED_FORCE_FIRST_PASS", False)
    monkeypatch.delenv("FLARECTL_DT_ANCHORED_FORCE_FIRST", raising=False)
    assert not modes._force_first_pass()
    monkeypatch.setenv("FLARECTL_DT_ANCHORED_FORCE_FIRST", "1")
    assert modes._force_first_pass()
    monkeypatch.setattr(modes, "ANCHORED_FORCE_FIRST_PASS", True)
    monkeypatch.setenv("FLARECTL_DT_ANCHORED_FORCE_FIRST", "0")
    assert not modes._force_first_pass()


def test_select_confident():
    conf = torch.tensor([[0.95, 0.2, 0.91, 0.1], [0.3, 0.4, 0.2, 0.1]])
    undecided = torch.tensor([[True, True, True, True], [True, False, True, True]])
    got = select_confident(conf, undecided, 0.9)
    assert got.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert select_confident(conf, undecided, 1.0).sum(1).tolist() == [1, 1]
    assert select_confident(conf, undecided, 0.9, force=False).tolist() == [[True, False, True, False], [False] * 4]
    assert not select_confident(conf, undecided, 1.0, force=False).any()


def test_diffusion_trust_greedy_proposal_is_the_logits_argmax():
    """Two logits an ulp apart whose softmax probabilities round to one value: greedy Diffusion-Trust proposes the
    larger logit (the argmax AR decoding takes), not the first of the tied probabilities."""
    from flarectl.decoding import diffusion_trust
    from flarectl.decoding.sampling import Sampler

    logits = torch.zeros(1, 1, 300)
    logits[0, 0, 100] = 1e-3
    logits[0, 0, 200] = torch.nextafter(torch.tensor(1e-3), torch.tensor(1.0))
    probs = torch.softmax(logits, -1)
    assert probs[0, 0, 100] == probs[0, 0, 200]  # the tie the softmax makes
    tok, conf = diffusion_trust.propose(logits, Sampler.create(0.0, 1.0, 0, "cpu"))
    assert tok.item() == 200 and conf.item() == probs[0, 0, 200].item()


# -- sampling, stopping, streaming, validation -----------------------------------------------------------------------

def test_process_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert process_logits(logits, 0.0).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    p = torch.softmax(logits, -1)
    kept = top_p_filter(p, 0.8)
    assert kept[0, 2:].sum() == 0 and abs(float(kept.sum()) - 1) < 1e-6
    assert torch.allclose(process_logits(logits, 2.0), torch.softmax(logits / 2, -1))


def test_stop_checker_finds_the_completing_token():
    decode = lambda t: "".join(map(chr, t))  # noqa: E731
    sc = StopChecker(["END"], decode)
    assert sc.extend([ord(c) for c in "abcE"]) is None
    assert sc.extend([ord(c) for c in "NDxyz"]) == 6 and sc.text_cut == 3


@pytest.mark.parametrize("mode", ["ar", "ar-trust", "diffusion-trust"])
def test_stop_strings_and_streaming(models, mode):
    m = models["debug-hybrid"]
    full = run(m, PROMPTS[:2], mode, max_new_tokens=10, threshold=0.6)
    decode = lambda t: m.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    stop = decode(full[0].token_ids[4:6]) or decode(full[0].token_ids[3:6])
    streamed = {0: [], 1: []}
    res = run(m, PROMPTS[:2], mode, max_new_tokens=10, threshold=0.6, stop_strings=[stop],
              on_token=lambda row, new: streamed[row].extend(new))
    assert res[0].finish_reason == "stop" and stop not in res[0].text
    assert decode(res[0].token_ids).startswith(res[0].text) and stop in decode(res[0].token_ids)
    assert stop not in decode(res[0].token_ids[:-1])  # the last token completes the stop string
    assert [streamed[i] for i in (0, 1)] == ids(res)


def test_eos_default_from_tokenizer(models):
    m = models["debug-llama"]
    res = generate(m, PROMPTS[:1], "ar", max_new_tokens=3)
    assert res[0].finish_reason in ("length", "eos") and res[0].text is not None


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="fast"), "mode must be one of"),
    (dict(mode="diffusion-trust", threshold=0.0), "threshold"),
    (dict(mode="diffusion-trust", threshold=1.5), "threshold"),
    (dict(mode="ar-trust", block_size=0), "block size"),
    (dict(mode="ar-trust", block_size=65), "block size"),
    (dict(mode="ar-trust", block_size=4, mask_token_id=10_000), "mask token"),
    (dict(mode="ar", top_p=0.0), "top_p"),
    (dict(mode="ar", max_new_tokens=0), "max_new_tokens"),
])
def test_argument_validation(models, kwargs, message):
    kw = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(models["debug-llama"], [[1, 2]], kw.pop("mode"), **kw)


def test_trust_mode_needs_block_size_and_mask(models):
    m = models["debug-llama"]  # no FLARE metadata
    with pytest.raises(ValueError, match="block_size is required"):
        generate(m, [[1, 2]], "ar-trust", max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(m, [[]], "ar", max_new_tokens=2)


def test_trust_modes_with_one_token_prompts(models):
    """A one-token prompt has no clean context: the first window runs alone on an empty cache."""
    m = models["debug-hybrid"]
    prompts = [[7], [7, 8, 9]]
    assert ids(run(m, prompts, "ar-trust")) == ids(run(m, prompts, "ar"))
    dt = ids(run(m, prompts, "diffusion-trust", threshold=0.6))
    assert dt == [ids(run(m, [p], "diffusion-trust", threshold=0.6))[0] for p in prompts]


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
def test_diffusion_trust_block_one_greedy_equals_ar(models, name):
    """With B = 1 the window is just the pending token, whose logits are the AR ones."""
    m = models[name]
    res = run(m, PROMPTS, "diffusion-trust", block_size=1)
    assert ids(res) == ids(run(m, PROMPTS, "ar"))
    assert all(r.forwards == 12 for r in res)
