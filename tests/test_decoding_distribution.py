"""AR-Trust sampling is lossless: its output distribution equals the AR one (chi-square against enumeration)."""

import itertools

import pytest
import torch

from flarectl.decoding import ar_trust, generate
from flarectl.decoding.sampling import process_logits
from flarectl.models.loading import load_model

ALLOWED = [65, 66, 67, 68]  # "A".."D": the wrapped model can only emit these
PROMPT = [70]  # one token: every forward runs through the batched pending GDN path (fast for 10^3+ rows)
N_SAMPLES, LENGTH, BLOCK = 5_000, 3, 2
TEMPERATURE, TOP_P = 0.9, 0.95
ALPHA = 1e-3


class FourTokenModel(torch.nn.Module):
    """A FlareModel whose logits are restricted to ``ALLOWED`` (others -inf) and sharpened by ``scale``."""

    def __init__(self, base, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.hf, self.tokenizer, self.flare_meta = base.hf, base.tokenizer, None
        keep = torch.full((base.config.vocab_size,), float("-inf"))
        keep[ALLOWED] = 0.0
        self.register_buffer("keep", keep)

    @property
    def device(self):
        return self.base.device

    def new_cache(self, batch, capacity):
        return self.base.new_cache(batch, capacity)

    def forward(self, input_ids, layout=None, cache=None, commit_all=True):
        logits = self.base(input_ids, layout, cache, commit_all=commit_all)
        return logits * self.scale + self.keep.to(logits.dtype)


@pytest.fixture(scope="module")
def four_token_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = load_model("debug-hybrid", dtype="float32", device="cpu", seed=3)
    yield FourTokenModel(base, scale=12.0)
    torch.set_num_threads(threads)


def exact_ar_distribution(model) -> dict[tuple[int, ...], float]:
    """P(x1..xL | prompt) under AR sampling with the same temperature / top-p, by enumeration (no cache)."""
    probs = {(): 1.0}
    for _ in range(LENGTH):
        prefixes = list(probs)
        ids = torch.tensor([PROMPT + list(p) for p in prefixes])
        with torch.no_grad():
            step = process_logits(model(ids)[:, -1], TEMPERATURE, TOP_P)
        probs = {p + (t,): probs[p] * float(step[i, t]) for i, p in enumerate(prefixes) for t in ALLOWED}
    return probs


def chi_square_pvalue(counts: dict, expected_probs: dict, n: int) -> float:
    """Pearson chi-square p-value; cells with expected count < 5 are pooled; observations in impossible cells
    give p = 0. Survival function of chi2(df) = regularized upper gamma Q(df/2, x/2)."""
    if any(counts.get(k, 0) for k, p in expected_probs.items() if p == 0):
        return 0.0
    if set(counts) - set(expected_probs):
        return 0.0
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for k, p in expected_probs.items():
        if p == 0:
            continue
        if p * n >= 5:
            obs.append(counts.get(k, 0)), exp.append(p * n)
        else:
            pool_o, pool_e = pool_o + counts.get(k, 0), pool_e + p * n
    if pool_e > 0:
        obs.append(pool_o), exp.append(pool_e)
    o, e = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def sample_counts(model, mode, seed=0) -> dict:
    results = generate(model, [PROMPT] * N_SAMPLES, mode, max_new_tokens=LENGTH, temperature=TEMPERATURE,
                       top_p=TOP_P, seed=seed, block_size=BLOCK, mask_token_id=258, stop_ids=[])
    counts: dict = {}
    for r in results:
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    return counts, results


def accept_always(p, q, drafts, sampler):
    """WRONG rule (for the negative control): accept every draft, bonus from p."""
    n = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long, device=drafts.device)
    return n, torch.multinomial(p[:, -1], 1, generator=sampler.generator)[:, 0]


def accept_with_prob_p(p, q, drafts, sampler):
    """WRONG rule: accept d w.p. p(d) (no ratio), resample from p at the first rejection."""
    rows, block = drafts.shape
    ok = sampler.uniform((rows, block), p) < p[:, :block].gather(-1, drafts[..., None])[..., 0]
    n = ok.long().cumprod(1).sum(1)
    nxt = torch.multinomial(p[torch.arange(rows), n], 1, generator=sampler.generator)[:, 0]
    return n, nxt


def test_exact_distribution_is_a_distribution(four_token_model):
    probs = exact_ar_distribution(four_token_model)
    assert len(probs) == len(ALLOWED) ** LENGTH
    assert abs(sum(probs.values()) - 1) < 1e-5


def test_ar_sampling_matches_enumeration(four_token_model):
    """Sanity: plain AR sampling passes the same test (checks the test and the AR sampler)."""
    expected = exact_ar_distribution(four_token_model)
    counts, _ = sample_counts(four_token_model, "ar", seed=1)
    assert chi_square_pvalue(counts, expected, N_SAMPLES) > ALPHA


def test_ar_trust_sampling_matches_ar_distribution(four_token_model):
    expected = exact_ar_distribution(four_token_model)
    counts, results = sample_counts(four_token_model, "ar-trust", seed=2)
    assert chi_square_pvalue(counts, expected, N_SAMPLES) > ALPHA
    hist = torch.tensor([r.acceptance_histogram for r in results]).sum(0)
    assert hist[0] > 0 and hist[1:].sum() > 0  # both rejections and acceptances happened: the test has teeth


@pytest.mark.parametrize("wrong_rule", [accept_always, accept_with_prob_p])
def test_wrong_acceptance_rule_fails_the_same_test(four_token_model, monkeypatch, wrong_rule):
    expected = exact_ar_distribution(four_token_model)
    monkeypatch.setattr(ar_trust, "accept_speculative", wrong_rule)
    counts, _ = sample_counts(four_token_model, "ar-trust", seed=2)
    assert chi_square_pvalue(counts, expected, N_SAMPLES) < ALPHA
