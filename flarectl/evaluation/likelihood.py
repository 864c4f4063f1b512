"""How likely the model's own AR path finds a generated continuation: a fluency proxy for decoding modes that need
not reproduce AR greedy (Diffusion-Trust), measured with the one checkpoint's causal path."""

from __future__ import annotations

import torch


@torch.no_grad()
def ar_nll(model, prompts: list[list[int]], outputs: list[list[int]]) -> list[float | None]:
    """Mean negative log-likelihood (nats per token) of each output [T_i] after its prompt [P_i] under the model's AR
    path (``model.hf``, causal, fp32 log-softmax): -1/T sum_t log p(o_t | prompt, o_<t). None for an empty output.
    One sequence at a time (no padding, so nothing depends on batch composition)."""
    hf = model.hf
    device = next(hf.parameters()).device
    out: list[float | None] = []
    for prompt, gen in zip(prompts, outputs, strict=True):
        if not gen:
            out.append(None)
            continue
        if not prompt:
            raise ValueError("ar_nll needs a non-empty prompt to predict the first output token from")
        ids = torch.tensor([list(prompt) + list(gen)], device=device)
        logits = hf(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # [T, V]: position i predicts i + 1
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
        out.append(float(-logp.mean()))
    return out
