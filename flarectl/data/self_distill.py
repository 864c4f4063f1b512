"""Self-distilled transfer data: the model's own greedy answers to a set of prompts.

Conversion then learns block denoising of the model's *own* distribution: the AR loss starts at the model's
optimum (so a short conversion does not damage the AR model) and the drafts the noisy path learns are the ones the
clean path accepts, which raises AR-Trust / Diffusion-Trust tokens per forward. The responses come from
``transformers``' ``generate`` (greedy, left-padded batches); the prompts are any prompt/response records (by
default the shipped transfer set's).

    python -m flarectl.data.self_distill --model smollm2-135m-instruct --out distilled.jsonl

Records that did not finish (no EOS within ``max_new_tokens``) or that loop (a repeated n-gram covering most of
the answer) are counted and left out; the report says how many.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch


@dataclass
class DistillReport:
    """What ``self_distill`` kept and why it dropped the rest."""

    prompts: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    response_tokens: int = 0
    seconds: float = 0.0


def is_looping(token_ids: Sequence[int], n: int = 8, max_share: float = 0.5) -> bool:
    """True when one n-gram's repeats cover more than ``max_share`` of the tokens (a degenerate answer)."""
    if len(token_ids) < 4 * n:
        return False
    grams = Counter(tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1))
    top = grams.most_common(1)[0][1]
    return top * n > max_share * len(token_ids) and top > 2


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def self_distill(
    model,
    records: Sequence[dict],
    *,
    max_new_tokens: int = 384,
    batch_size: int = 32,
    max_prompt_tokens: int = 640,
    source_name: str = "model",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict], DistillReport]:
    """Answer every record's ``prompt`` greedily with ``model`` (a FlareModel); return new prompt/response records
    (same ``task``; ``source`` names the model and the original record) and a report."""
    import time

    hf, tok = model.hf, model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    report = DistillReport(prompts=len(records))
    start = time.perf_counter()
    encoded = []
    for i, rec in enumerate(records):
        ids = _prompt_ids(tok, rec["prompt"])
        if len(ids) > max_prompt_tokens:
            report.dropped["prompt too long"] += 1
            continue
        encoded.append((i, ids))
    encoded.sort(key=lambda item: len(item[1]))  # similar lengths per batch: less padding
    out: list[tuple[int, dict]] = []
    for b in range(0, len(encoded), batch_size):
        batch = encoded[b:b + batch_size]
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, ids) in enumerate(batch):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            attention[r, width - len(ids):] = 1
        gen = hf.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                          eos_token_id=tok.eos_token_id)
        for r, (i, _) in enumerate(batch):
            new = gen[r, width:].tolist()
            if tok.eos_token_id not in new:
                report.dropped["no EOS within max_new_tokens"] += 1
                continue
            new = new[:new.index(tok.eos_token_id)]
            if not new:
                report.dropped["empty answer"] += 1
                continue
            if is_looping(new):
                report.dropped["looping answer"] += 1
                continue
            rec = records[i]
            text = tok.decode(new, skip_special_tokens=True).strip()
            out.append((i, {"task": rec.get("task", "distilled"), "prompt": rec["prompt"], "response": text,
                            "source": f"self-distilled: {source_name} greedy answer to record {i} "
                                      f"({rec.get('source', 'prompt set')})",
                            "license": rec.get("license", "")}))
            report.response_tokens += len(new)
        if on_batch is not None:
            on_batch(len(batch))
    out.sort(key=lambda item: item[0])
    report.kept = len(out)
    report.seconds = time.perf_counter() - start
    return [rec for _, rec in out], report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flarectl.data.self_distill``: write a self-distilled JSONL from a model and a prompt source."""
    from flarectl.data.sources import load_records
    from flarectl.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--source", default="default", help="Prompt source (records need a 'prompt' field).")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    records = [dict(r.data) if hasattr(r, "data") else dict(r) for r in load_records(args.source)]
    distilled, report = self_distill(model, records, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.batch_size, source_name=args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for rec in distilled:
            handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    print(json.dumps({**asdict(report), "dropped": dict(report.dropped), "out": str(args.out)}))


if __name__ == "__main__":
    main()
