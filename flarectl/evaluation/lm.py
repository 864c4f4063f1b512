"""``FlareLM``: a flarectl model as an lm-eval ``LM`` (registered as ``flarectl``).

* ``generate_until`` goes through `flarectl.decoding.generate` in the chosen mode (ar, ar-trust, diffusion-trust),
  batched ``batch_size`` requests at a time, grouped by generation kwargs as lm-eval's HF model does; ``until`` stop
  sequences, ``max_gen_toks`` and ``do_sample``/``temperature``/``top_p`` are honoured.
* ``loglikelihood`` / ``loglikelihood_rolling`` score through the clean causal path (``FlareModel.hidden_states``
  with no layout: one causal document per row) — never the noisy one — with lm-eval's own token accounting
  (`TemplateLM._encode_pair`, the BOS/EOS prefix for empty contexts, rolling windows of ``max_length``).
* Tokenisation and chat templates follow ``lm_eval.models.huggingface.HFLM`` (prefix token = BOS else EOS, no
  extra special tokens when the text already starts with BOS, ``continue_final_message`` for assistant prefills),
  so prompts are token-identical to ``lm_eval --model hf`` on the same checkpoint.

Every generation adds to `stats` (tokens, forwards, wall seconds) for the tokens/forward and tokens/s report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text, resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from flarectl.decoding import MODES, generate
from flarectl.errors import FlareError

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default when a task sets none


class EvalModelError(FlareError):
    """The model cannot be evaluated as asked (e.g. a trust mode on a checkpoint without a mask token)."""


@dataclass
class GenerationStats:
    """Totals over every ``generate_until`` batch: generated tokens, per-row forwards, wall-clock seconds."""

    requests: int = 0
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float | None:
        return self.tokens / self.forwards if self.forwards else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def as_dict(self) -> dict:
        return {"requests": self.requests, "tokens": self.tokens, "forwards": self.forwards,
                "seconds": self.seconds, "tokens_per_forward": self.tokens_per_forward,
                "tokens_per_second": self.tokens_per_second}


@register_model("flarectl")
class FlareLM(TemplateLM):
    """lm-eval model over a loaded ``FlareModel`` (or a name for `load_model`) decoding in ``mode``.

    From lm-eval's Python API after ``import flarectl.evaluation.lm``: ``simple_evaluate(model="flarectl",
    model_args="model=runs/quickstart/final,mode=ar-trust", ...)``. ``max_batch_size`` is accepted and unused.
    """

    def __init__(self, model="smollm2-135m-instruct", mode: str = "ar", batch_size: int | str | None = 1,
                 block_size: int | None = None, threshold: float = 0.9, seed: int = 0, device: str | None = None,
                 max_length: int | None = None, max_batch_size: int | None = None,
                 diffusion_scheme: str = "anchored"):
        super().__init__()
        if not str(batch_size or 1).isdigit() or int(batch_size or 1) < 1:
            raise EvalModelError(f"batch_size must be a positive integer, got '{batch_size}'")
        if isinstance(model, str):
            from flarectl.models.loading import load_model

            model = load_model(model, device=device)
        if mode not in MODES:
            raise EvalModelError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if diffusion_scheme not in ("anchored", "plain"):
            raise EvalModelError(f"diffusion_scheme must be anchored or plain, got '{diffusion_scheme}'")
        if mode != "ar" and model.flare_meta is None and getattr(model.tokenizer, "mask_token_id", None) is None:
            raise EvalModelError(f"--mode {mode} needs a FLARE checkpoint with a mask token and this model has none: "
                                 f"convert it first (`flarectl convert` writes runs/quickstart/final) or use --mode ar")
        if mode != "ar" and model.flare_meta is None and block_size is None:
            raise EvalModelError(f"--mode {mode} needs --block-size: the model has no FLARE metadata")
        self.model = model
        self.tokenizer = model.tokenizer
        self.mode = mode
        self.batch_size = int(batch_size or 1)
        self.block_size = block_size
        self.threshold = threshold
        self.diffusion_scheme = diffusion_scheme
        self.seed = seed
        self._device = model.device
        self._max_length = max_length
        self.stats = GenerationStats()

    # -- tokenisation (as HFLM) -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(self.model.config, self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint for lm-eval's request cache: the tokenizer's path, else the model type (presets)."""
        return str(self.tokenizer.name_or_path or f"flarectl-{self.model.model_type}").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.decode([self.prefix_token_id])
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- loglikelihood (clean causal path) --------------------------------------------------------------------
    @torch.no_grad()
    def _continuation_logprobs(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """rows: (tokens fed [L_i], continuation [n_i]) -> (sum log p(continuation), every token greedy) per row.

        The output at position j predicts token j + 1, so ``ctx + cont`` is fed without its last token and its last
        ``n_i`` positions are scored against ``cont``. Rows are right-padded, which causal rows never see.
        """
        width = max(len(fed) for fed, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=self._device)
        for r, (fed, _) in enumerate(rows):
            ids[r, :len(fed)] = torch.tensor(fed, dtype=torch.long)
        hidden = self.model.hidden_states(ids)  # [R, width, hidden]
        out = []
        for r, (fed, cont) in enumerate(rows):
            scored = hidden[r, len(fed) - len(cont):len(fed)]  # [n, hidden]
            logits = self.model.hf.lm_head(scored)  # [n, V]
            logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=self._device)
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (request key or None, context ids, continuation ids) -> (log p, is_greedy), in order."""
        collator = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            rows = []
            for _, ctx, cont in chunk:
                whole = (ctx + cont)[-(self.max_length + 1):]  # left-truncate as HFLM
                rows.append((whole[:-1], cont))
            results.extend(self._continuation_logprobs(rows))
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over every token of each string, in disjoint windows of at most ``max_length``."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logp
        return totals

    # -- generation (any decoding mode) -----------------------------------------------------------------------
    def _settings(self, gen_kwargs: dict) -> dict:
        """lm-eval generation kwargs -> `generate` keyword arguments (HF semantics: do_sample without a temperature
        samples at 1.0)."""
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        sample = bool(kwargs.get("do_sample"))
        temperature = float(gen_kwargs.get("temperature", 1.0) if sample else 0.0)
        return {"until": [s for s in kwargs["until"] if s], "max_new_tokens": int(kwargs["max_gen_toks"]),
                "temperature": temperature, "top_p": float(kwargs.get("top_p") or 1.0)}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        collator = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        texts = []
        for batch_index, chunk in enumerate(collator.get_batched(n=self.batch_size)):
            contexts, all_kwargs = zip(*chunk)
            texts.extend(self._generate_batch(list(contexts), self._settings(all_kwargs[0]), batch_index))
        return collator.get_original(texts)

    def _generate_batch(self, contexts: list[str], s: dict, batch_index: int) -> list[str]:
        keep = max(1, self.max_length - s["max_new_tokens"])
        prompts = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
        started = time.perf_counter()
        results = generate(self.model, prompts, self.mode, max_new_tokens=s["max_new_tokens"],
                           temperature=s["temperature"], top_p=s["top_p"], seed=self.seed + batch_index,
                           block_size=self.block_size, threshold=self.threshold, stop_strings=s["until"],
                           tokenizer=self.tokenizer, diffusion_trust_scheme=self.diffusion_scheme)
        self.stats.seconds += time.perf_counter() - started
        self.stats.requests += len(results)
        self.stats.tokens += sum(len(r.token_ids) for r in results)
        self.stats.forwards += sum(r.forwards for r in results)
        return [postprocess_generated_text(r.text, s["until"], None) for r in results]
