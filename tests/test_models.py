"""Adapter parity with HF, caches, checkpoints, mask token."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flarectl.models.layout import StreamLayout
from flarectl.models.loading import ensure_mask_token, load_model, save_checkpoint

NAMES = ("debug-hybrid", "debug-llama")


@pytest.mark.parametrize("name", NAMES)
def test_adapter_matches_hf_logits(debug_models, name):
    model = debug_models[name]
    ids = torch.randint(0, 256, (3, 19))
    ref = model.hf(input_ids=ids).logits
    out = model(ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_cached_extension_equals_full_forward(debug_models, name):
    model = debug_models[name]
    ids = torch.randint(0, 256, (2, 17))
    full = model(ids)
    cache = model.new_cache(2, 32)
    parts = [model(ids[:, :6], cache=cache)]
    parts.append(model(ids[:, 6:10], cache=cache, commit_all=False))
    cache.commit(4)
    for t in range(10, 17):
        parts.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-6)
    assert cache.lengths.tolist() == [17, 17]


@pytest.mark.parametrize("name", NAMES)
def test_rollback_to_any_length_per_row(debug_models, name):
    """Pending tokens committed to different lengths per row equal a fresh forward of the accepted prefix."""
    model = debug_models[name]
    ids = torch.randint(0, 256, (3, 14))
    cache = model.new_cache(3, 32)
    model(ids[:, :5], cache=cache)
    model(ids[:, 5:11], cache=cache, commit_all=False)  # 6 pending
    accepted = torch.tensor([0, 3, 6])
    cache.commit(accepted)
    for row, n in enumerate(accepted.tolist()):
        nxt = ids[row:row + 1, 11:12]
        one = cache.select_rows(torch.tensor([row]))
        got = model(nxt, cache=one)
        ref = model(torch.cat([ids[row:row + 1, :5 + n], nxt], 1))[:, -1:]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_text_only_load_of_multimodal_checkpoint(tmp_path):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = load_model("debug-hybrid", dtype="float32", device="cpu").hf.config.to_dict()
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
    full = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    full.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.model_type == "qwen3_5_text" and loaded.layer_kinds.count("gdn") == 3
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(loaded(ids), full(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_is_bit_exact(tmp_path, name):
    model = load_model(name, dtype="float32", device="cpu", seed=3)
    meta = ensure_mask_token(model, "<|mask|>", 4)
    target = save_checkpoint(model, tmp_path / "ckpt")
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "temporary directory left behind"
    files = {p.name for p in target.iterdir()}
    assert "model.safetensors" in files and "flare.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((target / "config.json").read_text())["flare"] == {"mask_token_id": meta.mask_token_id,
                                                                         "block_size": 4}
    again = load_model(str(target), dtype="float32", device="cpu")
    for (k, a), (_, b) in zip(model.hf.state_dict().items(), again.hf.state_dict().items()):
        assert torch.equal(a, b), k
    plain = AutoModelForCausalLM.from_pretrained(target)
    ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(plain(input_ids=ids).logits, model(ids), rtol=0, atol=1e-5)
    assert again.flare_meta == meta


def test_mask_token_added_when_missing(tmp_path):
    model = load_model("debug-llama", dtype="float32", device="cpu")
    before = model.hf.get_input_embeddings().weight.shape[0]
    meta = ensure_mask_token(model, "<|newmask|>", 2)
    assert model.tokenizer.convert_tokens_to_ids("<|newmask|>") == meta.mask_token_id
    assert model.hf.get_input_embeddings().weight.shape[0] >= max(before, meta.mask_token_id + 1)


def test_layout_visibility_rules():
    from flarectl.models.layout import visibility

    # clean doc of 4 tokens + one window of 2 starting at position 2
    lay = StreamLayout(torch.tensor([[0, 1, 2, 3, 2, 3]]), torch.tensor([[0, 0, 0, 0, 0, 0]]),
                       torch.tensor([[-1, -1, -1, -1, 0, 0]]), torch.tensor([[0, 1, 2, 3, 2, 2]]))
    vis = visibility(lay, lay)[0].int().tolist()
    assert vis == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                   [1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1]]


def test_gdn_index_plan_is_built_once_per_layout():
    """All GDN layers of a forward share the layout: the packed plan is built once (memoised by identity), never
    reused for another layout or for cached (decoding) calls."""
    from flarectl.models import gdn

    def layout():
        return StreamLayout(torch.tensor([[0, 1, 2, 3, 2, 3]]), torch.tensor([[0, 0, 0, 0, 0, 0]]),
                            torch.tensor([[-1, -1, -1, -1, 0, 0]]), torch.tensor([[0, 1, 2, 3, 2, 2]]))

    a, b = layout(), layout()
    plan_a = gdn._pack(a, None)
    assert gdn._pack(a, None) is plan_a
    plan_b = gdn._pack(b, None)
    assert plan_b is not plan_a and all(torch.equal(x, y) for x, y in zip(plan_a[1:3], plan_b[1:3]))
    assert gdn._pack(b, torch.tensor([4])) is not plan_b
