"""Tokens per forward and agreement with AR greedy of every decoding mode on a fixed prompt set.

    python scripts/decode_quality.py --model runs/quickstart/final --out decode_quality.json

Prompts: the first ``--code`` HumanEval prompts (raw completion) and ``--chat`` fixed chat questions. For each
mode (and each Diffusion-Trust threshold) it reports mean tokens/forward, seconds, and against AR greedy: exact
match rate and mean agreeing-prefix share (tokens until the first difference / AR length); and how likely the
model's own AR path finds each output (``ar_nll``: mean NLL per token, nats, averaged over prompts; AR greedy's is
the reference: a mode that departs from AR but keeps to likely text stays near it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the sea.",
    "Give three tips for writing clean Python code.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do I reverse a string in Python?",
    "Why is the sky blue?",
    "Write a Python function that returns the factorial of n.",
    "What are the three states of matter?",
    "Translate 'good morning' into Spanish and French.",
    "Name five fruits that are red.",
    "What does the `yield` keyword do in Python?",
    "Describe a sunset in one sentence.",
    "How many days are there in a leap year?",
    "Write a short poem about autumn leaves.",
]


def prompts(tokenizer, n_code: int, n_chat: int) -> list[tuple[str, list[int]]]:
    """(label, token ids) pairs: HumanEval prompts raw, chat prompts through the chat template."""
    from flarectl.evaluation.humaneval import load_problems

    out = []
    for p in load_problems()[:n_code]:
        out.append((p.task_id, tokenizer(p.prompt, add_special_tokens=True)["input_ids"]))
    for q in CHAT_PROMPTS[:n_chat]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
        out.append((q, tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def prefix_share(ref: list[int], other: list[int]) -> float:
    n = 0
    for a, b in zip(ref, other):
        if a != b:
            break
        n += 1
    return n / max(len(ref), 1)


def run(model_name: str, *, n_code: int, n_chat: int, max_new_tokens: int, batch_size: int,
        thresholds: list[float], device: str | None, schemes: tuple[str, ...] = ("anchored",),
        diffusion_schemes: tuple[str, ...] = ("anchored",)) -> dict:
    from flarectl.decoding import generate
    from flarectl.evaluation.likelihood import ar_nll
    from flarectl.models.loading import load_model

    model = load_model(model_name, device=device)
    items = prompts(model.tokenizer, n_code, n_chat)
    ids = [i for _, i in items]
    settings = ([("ar", None, None)] + [("ar-trust", None, s) for s in schemes]
                + [("diffusion-trust", t, d) for d in diffusion_schemes for t in thresholds])
    rows, ref = [], None
    for mode, threshold, scheme in settings:
        results, start = [], time.perf_counter()
        for b in range(0, len(ids), batch_size):
            results += generate(model, ids[b:b + batch_size], mode, max_new_tokens=max_new_tokens,
                                threshold=threshold or 0.9,
                                ar_trust_scheme=scheme if mode == "ar-trust" else "anchored",
                                diffusion_trust_scheme=scheme if mode == "diffusion-trust" else "anchored")
        seconds = time.perf_counter() - start
        toks = [r.token_ids for r in results]
        if mode == "ar":
            ref = toks
        tokens = sum(len(t) for t in toks)
        forwards = sum(r.forwards for r in results)
        hist = [sum(col) for col in zip(*[r.acceptance_histogram for r in results])] if mode != "ar" else []
        nll = [v for v in ar_nll(model, ids, toks) if v is not None]
        rows.append({
            "mode": mode, "scheme": scheme, "threshold": threshold, "prompts": len(ids), "tokens": tokens,
            "forwards": forwards, "acceptance_histogram": hist,
            "tokens_per_forward": tokens / max(forwards, 1), "seconds": seconds, "tokens_per_second": tokens / seconds,
            "exact_match_vs_ar": sum(a == b for a, b in zip(ref, toks)) / len(toks),
            "prefix_share_vs_ar": sum(prefix_share(a, b) for a, b in zip(ref, toks)) / len(toks),
            "ar_nll": sum(nll) / len(nll) if nll else None,
            "samples": [{"prompt": label, "text": r.text} for (label, _), r in list(zip(items, results))[:: max(1, len(items) // 4)]],
        })
    return {"model": model_name, "device": str(model.device), "max_new_tokens": max_new_tokens, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--code", type=int, default=16)
    parser.add_argument("--chat", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--thresholds", default="0.9,0.7,0.5")
    parser.add_argument("--device", default=None)
    parser.add_argument("--schemes", default="anchored", help="AR-Trust schemes to measure: anchored,fused")
    parser.add_argument("--diffusion-schemes", default="anchored",
                        help="Diffusion-Trust schemes to measure: anchored,plain")
    a = parser.parse_args()
    report = run(a.model, n_code=a.code, n_chat=a.chat, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                 thresholds=[float(t) for t in a.thresholds.split(",")], device=a.device,
                 schemes=tuple(a.schemes.split(",")), diffusion_schemes=tuple(a.diffusion_schemes.split(",")))
    a.out.write_text(json.dumps(report, indent=1))
    print(f"{'mode':26} {'thr':>5} {'tok/fwd':>8} {'tok/s':>8} {'exact':>6} {'prefix':>7} {'AR NLL':>7}")
    for r in report["rows"]:
        label = r["mode"] + (f" ({r['scheme']})" if r.get("scheme") else "")
        nll = f"{r['ar_nll']:7.3f}" if r["ar_nll"] is not None else f"{'-':>7}"
        print(f"{label:26} {r['threshold'] or '':>5} {r['tokens_per_forward']:8.2f} {r['tokens_per_second']:8.1f} "
              f"{r['exact_match_vs_ar']:6.2f} {r['prefix_share_vs_ar']:7.2f} {nll}")


if __name__ == "__main__":
    main()
