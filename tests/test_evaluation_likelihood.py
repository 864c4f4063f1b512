"""``flarectl.evaluation.likelihood.ar_nll``: the AR path's mean NLL of a continuation."""

import math

import pytest
import torch

from flarectl.decoding import generate
from flarectl.evaluation.likelihood import ar_nll
from flarectl.models.loading import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("debug-hybrid", dtype="float32", device="cpu", seed=3)


def test_ar_nll_matches_a_direct_sum(model):
    prompt, gen = [5, 9, 11, 2], [17, 3, 3, 40, 8]
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([prompt + gen])).logits[0].double()
    want = -sum(torch.log_softmax(logits[len(prompt) - 1 + t], -1)[tok] for t, tok in enumerate(gen)) / len(gen)
    got = ar_nll(model, [prompt, [7]], [gen, []])
    assert math.isclose(got[0], float(want), rel_tol=1e-5) and got[1] is None


def test_ar_greedy_is_likelier_than_random_tokens(model):
    prompts = [[5, 9, 11, 2], [30, 31]]
    greedy = [r.token_ids for r in generate(model, prompts, "ar", max_new_tokens=8, stop_ids=[])]
    g = torch.Generator().manual_seed(0)
    rand = [torch.randint(0, 250, (8,), generator=g).tolist() for _ in prompts]
    assert all(a < b for a, b in zip(ar_nll(model, prompts, greedy), ar_nll(model, prompts, rand)))
    with pytest.raises(ValueError, match="non-empty prompt"):
        ar_nll(model, [[]], [[1]])
