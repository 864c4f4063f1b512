"""Diffusion-Trust: confidence-thresholded parallel decoding of one block at a time.

Per block (targets x[s..s+B-1]) the window holds [x[s-1] (pending), mask x (B-1)]; window position j predicts
x[s+j] and window input j+1 holds x[s+j] once decided. Each denoise step forwards the window (committing nothing),
proposes a token per position (greedy: argmax, confidence = its softmax probability; sampling: a draw from the
processed distribution, confidence = its processed probability), and decides every undecided position whose
confidence >= ``threshold`` and at least the most confident one (threshold 1.0: exactly one per step). Tokens are final — and streamed — once
every position before them is decided; a stop id / stop string / max_new_tokens ends the row there, mid-block.

A finished block is committed by the clean forward [x[s-1], x[s..s+B-2]] (x[s+B-1] becomes the pending token);
that forward also carries the next block's first window, which starts after those clean tokens (one forward
saved per block). Rows of a batch progress independently: in one forward some rows commit a block while others
are still denoising (their clean section is empty). The loop lives in the serving engine
(``flarectl.engine.modes``); this module holds its rules.
"""

from __future__ import annotations

import torch

from flarectl.decoding.sampling import Sampler


def select_confident(conf: torch.Tensor, undecided: torch.Tensor, threshold: float,
                     force: bool = True) -> torch.Tensor:
    """conf, undecided [R, B] -> positions to decide now [R, B] (bool): conf >= threshold (never when threshold
    >= 1), plus (``force``) the most confident undecided position of every row that has one."""
    conf = conf.masked_fill(~undecided, -1.0)
    chosen = (conf >= threshold) & undecided if threshold < 1.0 else torch.zeros_like(undecided)
    if not force:
        return chosen
    best = torch.nn.functional.one_hot(conf.argmax(1), conf.shape[1]).bool()
    return chosen | (best & undecided.any(1, keepdim=True))


def propose(logits: torch.Tensor, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, B, V] -> (tokens [R, B], confidence [R, B]). Greedy: the argmax of the logits (the first maximum,
    as AR greedy decoding takes it; not of their softmax, where two logits an ulp apart can round to one
    probability) and its softmax probability; sampling: a draw from the processed distribution and its processed
    probability."""
    if sampler.greedy:
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        tok = x.argmax(-1)
        return tok, torch.softmax(x, -1).gather(-1, tok[..., None])[..., 0]
    probs = sampler.probs(logits)
    tok = sampler.sample(probs)
    return tok, probs.gather(-1, tok[..., None])[..., 0]


def window_inputs(pending: torch.Tensor, x: torch.Tensor, decided: torch.Tensor, mask_id: int) -> torch.Tensor:
    """pending [R], block tokens x [R, B], decided [R, B] -> window [R, B] = [pending, x[:B-1] or mask]."""
    body = torch.where(decided[:, :-1], x[:, :-1], torch.full_like(x[:, :-1], mask_id))
    return torch.cat([pending[:, None], body], 1)
