"""FlareLM (lm-eval model): loglikelihood through the clean path, rolling windows, generate_until in every mode."""

import math

import pytest
import torch
from lm_eval.api.instance import Instance

from flarectl.decoding import generate
from flarectl.evaluation.lm import EvalModelError, FlareLM

CONTEXTS = ["The cat sat", "", "Hello there, general", "a b c d e f g h i j"]
CONTINUATIONS = [" on the mat", "Once upon a time", " Kenobi!", " k"]


def _ll(lm, pairs):
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])


def _reference_logprob(model, ctx_ids, cont_ids):
    """Sum of log p(cont | ctx) from the HF model itself, one unpadded sequence at a time."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model.hf(ids).logits[0].double(), -1)
    n = len(ctx_ids)
    picked = [logp[n - 1 + i, t] for i, t in enumerate(cont_ids)]
    greedy = all(int(logp[n - 1 + i].argmax()) == t for i, t in enumerate(cont_ids))
    return float(sum(picked)), greedy


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
def test_loglikelihood_matches_unbatched_hf_forward(debug_models, name):
    model = debug_models[name]
    lm = FlareLM(model, batch_size=3)
    got = _ll(lm, list(zip(CONTEXTS, CONTINUATIONS)))
    for (ctx, cont), (logp, greedy) in zip(zip(CONTEXTS, CONTINUATIONS), got):
        if ctx:
            ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        else:  # lm-eval's rule: an empty context is the prefix (BOS, else EOS) token
            ctx_ids, cont_ids = [lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False)
        ref, ref_greedy = _reference_logprob(model, ctx_ids, cont_ids)
        # fp32 models: padded batches and one unpadded sequence may round differently (transformers 5.23's hybrid
        # path does, by ~1e-9 relative); a wrong position or token is off by orders of magnitude more
        assert logp == pytest.approx(ref, rel=1e-6, abs=1e-6)
        assert greedy == ref_greedy


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(debug_models):
    model = debug_models["debug-llama"]
    lm = FlareLM(model)
    ctx = lm.tok_encode("abc")
    greedy = generate(model, [ctx], "ar", max_new_tokens=3, stop_ids=[])[0].token_ids
    other = greedy[:-1] + [(greedy[-1] + 1) % 256]
    (lp_greedy, is_greedy), (lp_other, is_other) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert is_greedy and not is_other
    assert lp_greedy > lp_other


def test_rolling_scores_every_token_once_and_equals_empty_context_loglikelihood(debug_models, monkeypatch):
    model = debug_models["debug-hybrid"]
    lm = FlareLM(model, batch_size=2)
    text = "the quick brown fox jumps over the lazy dog"
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    (whole,) = lm.loglikelihood_rolling(req)
    ((expected, _),) = _ll(lm, [("", text)])
    assert whole == pytest.approx(expected, rel=1e-9)

    scored = []
    original = lm._continuation_logprobs
    monkeypatch.setattr(lm, "_continuation_logprobs",
                        lambda rows: scored.extend(len(c) for _, c in rows) or original(rows))
    lm._max_length = 8
    (windowed,) = lm.loglikelihood_rolling(req)
    assert sum(scored) == len(lm.tok_encode(text)) and len(scored) > 1
    assert math.isfinite(windowed) and windowed != pytest.approx(whole)


def _gen(lm, contexts, **gen_kwargs):
    return lm.generate_until([Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)])


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
def test_ar_trust_greedy_generations_equal_ar(debug_models, name):
    model = debug_models[name]
    contexts = ["def f(x):\n", "Question: 2+2?\nAnswer:", "x"]
    ar = _gen(FlareLM(model, mode="ar", batch_size=2), contexts, until=["\n\n"], max_gen_toks=12, do_sample=False)
    trust_lm = FlareLM(model, mode="ar-trust", batch_size=2, block_size=4)
    trust = _gen(trust_lm, contexts, until=["\n\n"], max_gen_toks=12, do_sample=False)
    assert trust == ar
    assert trust_lm.stats.requests == 3 and trust_lm.stats.tokens_per_forward is not None


def test_generate_until_honours_stop_sequences_and_max_gen_toks(debug_models):
    model = debug_models["debug-llama"]
    lm = FlareLM(model)
    ids = lm.tok_encode("hello")
    free = generate(model, [ids], "ar", max_new_tokens=20, stop_ids=[])[0]
    stop = free.text[3:5]  # a string the unconstrained greedy output contains
    (text,) = _gen(lm, ["hello"], until=[stop], max_gen_toks=20, do_sample=False)
    assert text == free.text[:free.text.index(stop)]
    lm.stats = type(lm.stats)()
    _gen(lm, ["hello"], until=[], max_gen_toks=5, do_sample=False)
    assert lm.stats.tokens <= 5


@pytest.mark.parametrize("scheme", ["anchored", "plain"])
def test_diffusion_trust_generates_and_counts_forwards(debug_models, scheme, monkeypatch):
    import flarectl.evaluation.lm as lm_module

    seen = []
    real = lm_module.generate
    monkeypatch.setattr(lm_module, "generate", lambda *a, **k: seen.append(k["diffusion_trust_scheme"]) or real(*a, **k))
    lm = FlareLM(debug_models["debug-hybrid"], mode="diffusion-trust", block_size=4, threshold=0.5,
                 diffusion_scheme=scheme)
    (text,) = _gen(lm, ["abc"], until=[], max_gen_toks=8, do_sample=False)
    assert isinstance(text, str) and seen == [scheme]
    assert lm.stats.tokens > 0 and lm.stats.forwards > 0 and lm.stats.tokens_per_second > 0
    with pytest.raises(EvalModelError, match="diffusion_scheme"):
        FlareLM(debug_models["debug-hybrid"], mode="diffusion-trust", block_size=4, diffusion_scheme="fused")


def test_generation_settings_follow_lm_eval_semantics(debug_models):
    lm = FlareLM(debug_models["debug-llama"])
    assert lm._settings({"until": "X", "do_sample": False, "temperature": 0.7})["temperature"] == 0.0
    assert lm._settings({"do_sample": True})["temperature"] == 1.0  # HF: sampling without a temperature
    s = lm._settings({"do_sample": True, "temperature": 0.2, "top_p": 0.95, "max_new_tokens": 7})
    assert (s["temperature"], s["top_p"], s["max_new_tokens"], s["until"]) == (0.2, 0.95, 7, [])
    assert lm._settings({"until": ["a", ""]})["max_new_tokens"] == 256


def test_trust_mode_needs_a_mask_token_and_a_block_size(debug_models):
    model = debug_models["debug-llama"]
    with pytest.raises(EvalModelError, match="--block-size"):
        FlareLM(model, mode="ar-trust")
    tok = model.tokenizer
    saved = tok.mask_token
    try:
        tok.mask_token = None
        with pytest.raises(EvalModelError, match="mask token"):
            FlareLM(model, mode="diffusion-trust", block_size=4)
    finally:
        tok.mask_token = saved


def test_registered_with_lm_eval_and_built_from_an_arg_string():
    from lm_eval.api.registry import get_model

    lm = get_model("flarectl").create_from_arg_string("model=debug-llama,mode=ar", {"batch_size": 2, "device": "cpu",
                                                                                   "max_batch_size": None})
    assert isinstance(lm, FlareLM) and lm.batch_size == 2 and lm.device.type == "cpu"
    with pytest.raises(EvalModelError, match="batch_size"):
        FlareLM(lm.model, batch_size="auto")


def test_chat_template_follows_lm_eval_conventions(debug_models):
    lm = FlareLM(debug_models["debug-llama"])
    chat = [{"role": "user", "content": "2+2?"}]
    assert lm.apply_chat_template(chat) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    prefill = lm.apply_chat_template([*chat, {"role": "assistant", "content": "The answer is"}], False)
    assert prefill.endswith("<|im_start|>assistant\nThe answer is")  # continue_final_message: no end token
    assert lm.tokenizer_name and lm.chat_template(True) == lm.tokenizer.chat_template
