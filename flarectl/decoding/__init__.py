"""Decoding from one FLARE checkpoint: AR, AR-Trust (exact self-speculative) and Diffusion-Trust (parallel).

``generate`` runs a batch of prompts through the serving engine (``flarectl.engine``), the one decoding path of the
CLI, evaluation and ``flarectl bench``::

    results = generate(model, [[...prompt ids...], ...], "ar-trust", max_new_tokens=256, temperature=0.0)

Modes: ``ar`` (one token per forward), ``ar-trust`` (draft a block with the noisy path, verify with the clean path:
lossless — the output distribution is the AR one), ``diffusion-trust`` (denoise a block with confidence threshold
``threshold``). All modes share the hybrid cache, the sampler (temperature / top-p / seed) and the stop rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from flarectl.decoding import ar_trust, diffusion_trust  # noqa: F401  (mode rules the engine calls)
from flarectl.decoding.rows import GenerationResult
from flarectl.decoding.sampling import Sampler
from flarectl.decoding.stopping import StopChecker

__all__ = ["MODES", "GenerationResult", "Sampler", "StopChecker", "generate"]

MODES = ("ar", "ar-trust", "diffusion-trust")
MAX_BLOCK_SIZE = 64
# generate() compiles the engine step (CUDA) only for calls with at least this many requested tokens: a compile
# costs ~10 s per step shape, which a one-off short decode would not win back.
COMPILE_MIN_TOKENS = 4096


def _vocab_size(model) -> int:
    return int(model.hf.get_input_embeddings().weight.shape[0])


def _resolve_trust_settings(model, block_size, mask_token_id) -> tuple[int, int]:
    """Block size and mask id: explicit arguments, else the checkpoint's FLARE metadata, else the tokenizer's mask."""
    meta = getattr(model, "flare_meta", None)
    if block_size is None:
        if meta is None:
            raise ValueError("block_size is required: the model has no FLARE metadata (a plain AR checkpoint)")
        block_size = meta.block_size
    if mask_token_id is None:
        mask_token_id = meta.mask_token_id if meta is not None else getattr(model.tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError("trust modes need a mask token: the model has none (convert it first or pass mask_token_id)")
    if not 0 <= int(mask_token_id) < _vocab_size(model):
        raise ValueError(f"mask token id {mask_token_id} is outside the model's vocabulary ({_vocab_size(model)})")
    return int(block_size), int(mask_token_id)


def _validate(prompts, mode, max_new_tokens, temperature, top_p, block_size, threshold, stop_strings, tokenizer):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    if block_size is not None and not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block size must be in 1..{MAX_BLOCK_SIZE}; got {block_size}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer= or use a model that has one)")


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    mode: str = "ar",
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    block_size: int | None = None,
    threshold: float = 0.9,
    stop_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    on_token: Callable[[int, list[int]], None] | None = None,
    mask_token_id: int | None = None,
    use_cache: bool = True,
    compile: bool | None = None,
    ar_trust_scheme: str = "anchored",
    diffusion_trust_scheme: str = "anchored",
) -> list[GenerationResult]:
    """Generate a continuation for every prompt (a batch; rows finish independently).

    ``prompts``: token id lists (any lengths). ``stop_ids``: defaults to the tokenizer's EOS id. ``on_token(row,
    new_ids)`` is called as tokens become final. ``block_size`` / ``mask_token_id`` default to the checkpoint's
    FLARE metadata (trust modes). All prompts share one seeded sampler. ``use_cache=False`` recomputes every forward
    from scratch (the reference twin of the engine's slot cache). ``compile``: torch.compile the engine step (CUDA
    only; each new step shape compiles once per process, ~10 s). None: only when the call is large enough to pay
    that back (prompts x max_new_tokens >= COMPILE_MIN_TOKENS) or as env FLARECTL_ENGINE_COMPILE says.
    ``ar_trust_scheme``: 'anchored' (default: every forward also emits an exact AR token) or 'fused' (the earlier
    scheme; ``flarectl.engine.modes``) — the same tokens under greedy decoding, different forward counts.
    ``diffusion_trust_scheme``: 'anchored' (default: B-1 denoised tokens per block, then an exact AR token from the
    block's commit step) or 'plain' (B denoised tokens per block, the paper's; ``flarectl.engine.modes``).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    _validate(prompts, mode, max_new_tokens, temperature, top_p, block_size, threshold, stop_strings, tokenizer)
    if stop_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        stop_ids = [] if eos is None else [eos]
    prompts = [list(map(int, p)) for p in prompts]
    sampler = Sampler.create(temperature, top_p, seed, model.device)
    mask_id = None
    if mode != "ar":
        block_size, mask_id = _resolve_trust_settings(model, block_size, mask_token_id)
        _validate(prompts, mode, max_new_tokens, temperature, top_p, block_size, threshold, (), None)
    from flarectl.engine import Engine, Request  # the engine imports this package's mode rules

    capacity = max(map(len, prompts)) + max_new_tokens + 2 * (block_size or 1) + 2
    if compile is None and os.environ.get("FLARECTL_ENGINE_COMPILE") is None:
        compile = model.device.type == "cuda" and len(prompts) * max_new_tokens >= COMPILE_MIN_TOKENS
    engine = Engine(model, concurrency=len(prompts), capacity=capacity, backend="auto" if use_cache else "recompute",
                    block_size=block_size, mask_token_id=mask_id, tokenizer=tokenizer, compile=compile,
                    ar_trust_scheme=ar_trust_scheme, diffusion_trust_scheme=diffusion_trust_scheme)
    for p in prompts:
        engine.submit(Request(p, mode, max_new_tokens, temperature, top_p, seed, block_size, threshold, stop_ids,
                              stop_strings, on_token, sampler=sampler))
    results = engine.run()
    for r in results:
        if r.error is not None:
            raise ValueError(r.error)
    return [GenerationResult(r.token_ids, r.text, r.forwards, r.tokens_per_forward, r.seconds,
                             r.acceptance_histogram, r.finish_reason) for r in results]
