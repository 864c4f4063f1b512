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
are still denoising (their clean section is empty).
"""

from __future__ import annotations

import torch

from flarectl.decoding.rows import RowTracker
from flarectl.decoding.runner import pad_rows
from flarectl.decoding.sampling import Sampler


def select_confident(conf: torch.Tensor, undecided: torch.Tensor, threshold: float) -> torch.Tensor:
    """conf, undecided [R, B] -> positions to decide now [R, B] (bool): conf >= threshold (never when threshold
    >= 1), plus the most confident undecided position of every row that has one."""
    conf = conf.masked_fill(~undecided, -1.0)
    chosen = (conf >= threshold) & undecided if threshold < 1.0 else torch.zeros_like(undecided)
    best = torch.nn.functional.one_hot(conf.argmax(1), conf.shape[1]).bool()
    return chosen | (best & undecided.any(1, keepdim=True))


def propose(logits: torch.Tensor, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, B, V] -> (tokens [R, B], confidence [R, B]). Greedy: argmax and its softmax probability;
    sampling: a draw from the processed distribution and its processed probability."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1) if sampler.greedy \
        else sampler.probs(logits)
    tok = sampler.sample(probs)
    return tok, probs.gather(-1, tok[..., None])[..., 0]


def window_inputs(pending: torch.Tensor, x: torch.Tensor, decided: torch.Tensor, mask_id: int) -> torch.Tensor:
    """pending [R], block tokens x [R, B], decided [R, B] -> window [R, B] = [pending, x[:B-1] or mask]."""
    body = torch.where(decided[:, :-1], x[:, :-1], torch.full_like(x[:, :-1], mask_id))
    return torch.cat([pending[:, None], body], 1)


def decode_diffusion_trust(runner, prompts: list[list[int]], sampler: Sampler, tracker: RowTracker, device, *,
                           block_size: int, mask_id: int, threshold: float) -> None:
    """Decode every row until it stops; results land in ``tracker``."""
    rows = len(prompts)
    pending = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
    x = torch.full((rows, block_size), mask_id, dtype=torch.long, device=device)
    decided = torch.zeros(rows, block_size, dtype=torch.bool, device=device)
    emitted = [0] * rows
    clean, counts = pad_rows([p[:-1] for p in prompts], device)
    _, logits = runner.forward(clean, counts, window_inputs(pending, x, decided, mask_id), commit=True)
    tracker.count_forward()
    while True:
        tok, conf = propose(logits, sampler)
        newly = select_confident(conf, ~decided, threshold)
        x, decided = torch.where(newly, tok, x), decided | newly
        prefix = decided.long().cumprod(1).sum(1).tolist()
        for b, (k, end) in enumerate(zip(newly.sum(1).tolist(), prefix)):
            tracker.record(b, k)
            if end > emitted[b]:
                tracker.emit(b, x[b, emitted[b]:end].tolist())
                emitted[b] = end
        keep = tracker.compact()
        if keep is not None:
            if not tracker.active:
                return
            emitted = [emitted[b] for b in keep.tolist()]
            keep = keep.to(device)
            runner.keep(keep)
            pending, x, decided = pending[keep], x[keep], decided[keep]
        done = decided.all(1)  # [R]: these rows commit their block and open the next one in this forward
        clean = torch.cat([pending[:, None], x[:, :-1]], 1)
        clean = clean if bool(done.any()) else clean[:, :0]
        counts = torch.where(done, block_size, 0)
        pending = torch.where(done, x[:, -1], pending)
        x = torch.where(done[:, None], torch.full_like(x, mask_id), x)
        decided = decided & ~done[:, None]
        emitted = [0 if d else e for d, e in zip(done.tolist(), emitted)]
        _, logits = runner.forward(clean, counts, window_inputs(pending, x, decided, mask_id), commit=True)
        tracker.count_forward()
