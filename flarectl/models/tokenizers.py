"""A tiny byte-level tokenizer for the debug presets (no hub, no files)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEBUG_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer (256 bytes + ChatML specials + mask) for the debug presets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_map = bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "mask_token": "<|mask|>"})
    fast.chat_template = CHATML_TEMPLATE
    return fast
