"""Self-distilled transfer data: kept answers are the model's greedy continuations; drops are counted by reason."""

import torch

from flarectl.data.self_distill import _prompt_ids, is_looping, self_distill
from flarectl.data.sources import SHIPPED_SOURCES, load_records, parse_source


def test_is_looping():
    assert is_looping([1, 2, 3, 4, 5, 6, 7, 8] * 8)
    assert not is_looping(list(range(64)))
    assert not is_looping([1, 2] * 3)  # too short to judge


def _greedy(model, ids, n):
    out = model.hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_self_distill_keeps_greedy_answers_and_counts_drops():
    from flarectl.models.loading import load_model

    model = load_model("debug-llama", dtype="float32", device="cpu", seed=3)
    tok = model.tokenizer
    records = [{"task": "t", "prompt": "abc", "source": "s"}, {"task": "t", "prompt": "hello there", "source": "s"}]
    first = _greedy(model, _prompt_ids(tok, "abc"), 6)
    # (prompts go through the chat template, as in self_distill) make the 4th greedy token of record 0 the "EOS": record 0 then ends after 3 tokens
    old_eos = tok.eos_token_id
    try:
        tok.eos_token_id = first[3]
        second = _greedy(model, _prompt_ids(tok, "hello there"), 6)
        kept, report = self_distill(model, records, max_new_tokens=6, batch_size=2)
    finally:
        tok.eos_token_id = old_eos
    assert report.prompts == 2
    expect_second_kept = first[3] in second and second.index(first[3]) > 0
    assert report.kept == 1 + int(expect_second_kept)
    assert kept[0]["prompt"] == "abc" and kept[0]["task"] == "t"
    assert kept[0]["response"] == tok.decode(first[:3], skip_special_tokens=True).strip()
    assert "record 0" in kept[0]["source"]
    assert sum(report.dropped.values()) + report.kept == report.prompts


def test_shipped_sources_resolve():
    for name in SHIPPED_SOURCES:
        assert parse_source(name).kind == "shipped"
        first = next(iter(load_records(name)))
        assert first.data["prompt"] and first.data["response"], name


def test_math_prompts_avoid_the_benchmark_prompts(tmp_path):
    """The synthetic math prompts (scripts/data/make_math_prompts.py) are deterministic, distinct, and share no
    6-word run with the gsm8k-style benchmark prompts they are meant to be disjoint from."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_math_prompts", root / "scripts/data/make_math_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bench = [json.loads(x)["prompt"] for x in (root / "flarectl/engine/prompts/gsm8k_style.jsonl").read_text().splitlines()
             if x.strip()]
    recs = mod.make(200, 0, bench)
    assert recs == mod.make(200, 0, bench) and len({r["prompt"] for r in recs}) == 200
    question = lambda p: p.split("\nAnswer:")[0]  # noqa: E731 - the format line is shared by design
    banned = set().union(*(mod.shingles(question(q)) for q in bench))
    assert not any(mod.shingles(question(r["prompt"])) & banned for r in recs)
    shipped = [r.data["prompt"] for r in load_records("smollm2-selfdistill-math")]
    assert shipped and set(shipped) <= {r["prompt"] for r in mod.make(320, 0, bench)}
