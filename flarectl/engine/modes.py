"""The three decoding modes as per-row step plans and per-group updates (one forward per engine step).

Every row keeps its committed tokens in the slot cache except ``pending`` (the last final token). A plan is
``(clean, window, commit)``: the clean tokens to feed (committed this step iff ``commit``) and the noisy window.

* ``ar``: clean [pending], committed; the logits at clean position 0 give the next token.
* ``ar-trust``: a draft step feeds the tokens accepted so far as clean (committed) and the window
  [pending, mask x (B-1)] -> drafts d_1..d_B. A verify step feeds [pending, d_1..d_{B-1}] as clean tokens *not*
  committed — their logits check all B drafts — and, fused into the same forward, the next draft window
  [d_B, mask x (B-1)] (it sees exactly the verified prefix). After a full accept the verified clean tokens are
  committed from the step's kept state (``finish_step``: no recomputation) and the window's drafts are verified by
  the next step: one forward per fully accepted block. After a rejection at j, the AR token at j is emitted, the
  speculative window is dropped and the next draft step re-feeds the accepted prefix (no GDN rollback anywhere).
  Acceptance is ``flarectl.decoding.ar_trust``'s (greedy, or exact speculative sampling): lossless.
* ``diffusion-trust``: the window [pending, decided tokens or mask]; a finished block's clean tokens
  [pending, x_1..x_{B-1}] are committed by the next step, which also carries the next block's window
  (``flarectl.decoding.diffusion_trust``).

The update functions work on a group of rows sharing mode, sampler, block size and threshold, vectorised.
"""

from __future__ import annotations

import torch

from flarectl.decoding import ar_trust, diffusion_trust
from flarectl.decoding.sampling import Sampler
from flarectl.engine.requests import Row


def plan(row: Row) -> tuple[list[int], list[int], bool]:
    """The row's next step: (clean tokens, window tokens, commit the clean tokens now)."""
    if row.mode == "ar":
        return [row.pending], [], True
    if row.mode == "ar-trust" and row.phase == "verify":
        return [row.pending, *row.drafts[:-1]], [row.drafts[-1]] + [row.mask_id] * (row.block - 1), False
    clean, row.commit_tokens = row.commit_tokens, []
    if row.mode == "ar-trust":
        return clean, [row.pending] + [row.mask_id] * (row.block - 1), True
    body = [x if d else row.mask_id for x, d in zip(row.x[:-1], row.decided[:-1])]
    return clean, [row.pending, *body], True


def group_key(row: Row) -> tuple:
    s = row.sampler
    return (row.mode, row.phase if row.mode == "ar-trust" else "", "greedy" if s.greedy else id(s), row.block,
            row.req.threshold if row.mode == "diffusion-trust" else 0.0)


def update(rows: list[Row], logits: torch.Tensor, width_clean: int, sampler: Sampler,
           idx: slice | torch.Tensor | None = None) -> None:
    """Apply one step's logits [C, W, V] (all slots) to this group's rows: sample/accept/denoise and emit.
    Only the group's rows and positions are read (gathered once). ``idx``: the rows' slots in ``logits`` (a slice or
    a device index tensor; default built from the rows)."""
    mode, block = rows[0].mode, rows[0].block
    if idx is None:
        idx = torch.tensor([r.slot for r in rows], device=logits.device)
    if mode == "ar":
        _update_ar(rows, logits[idx, 0], sampler)
    elif mode == "ar-trust" and rows[0].phase == "verify":
        _update_verify(rows, logits[idx, :block], logits[idx, width_clean:width_clean + block], sampler)
    else:
        window = logits[idx, width_clean:width_clean + block]
        (_update_draft if mode == "ar-trust" else _update_denoise)(rows, window, sampler)


def _update_ar(rows, logits, sampler):
    # greedy: the argmax of the logits is the argmax of the one-hot ``sampler.probs`` (first maximum either way)
    tokens = (logits.argmax(-1) if sampler.greedy else sampler.sample(sampler.probs(logits))).tolist()
    for row, t in zip(rows, tokens):
        row.pending = t
        row.emit([t])


def _update_draft(rows, window_logits, sampler):
    q = sampler.probs(window_logits)  # [G, B, V]
    drafts = ar_trust.propose(q, sampler, [r.index for r in rows], [len(r.tokens) for r in rows])
    for i, (row, d) in enumerate(zip(rows, drafts.tolist())):
        row.drafts, row.q, row.phase = d, (None if sampler.greedy else q[i]), "verify"


def _update_verify(rows, clean_logits, window_logits, sampler):
    """clean_logits [G, B, V]: p_0..p_{B-1} check d_1..d_B (no bonus position); window_logits [G, B, V]: the next
    block's draft distributions, used only after a full accept."""
    p = sampler.probs(clean_logits)
    p = torch.cat([p, p[:, -1:]], 1)  # the acceptance rules take a bonus row; after a full accept it is unused
    drafts = torch.tensor([r.drafts for r in rows], dtype=torch.long, device=p.device)
    if sampler.greedy:
        n, nxt = ar_trust.accept_greedy(p, drafts)
    else:
        n, nxt = ar_trust.accept_speculative(p, torch.stack([r.q for r in rows]), drafts, sampler)
    accepted, nxt = torch.stack([n, nxt]).tolist()  # one device->host copy
    full = [r for r, k in zip(rows, accepted) if k == r.block]
    for row, k, t in zip(rows, accepted, nxt):
        row.hist[k] += 1
        if k == row.block:  # all drafts are final; d_B is the new pending token, the window drafted what follows
            row.commit_late, row.pending = True, row.drafts[-1]
            row.emit(row.drafts)
        else:
            row.commit_tokens = [row.pending, *row.drafts[:k]]
            row.pending, row.phase, row.q = t, "draft", None
            row.emit(row.drafts[:k] + [t])
    if full:
        sel = torch.tensor([i for i, r in enumerate(rows) if r in full], device=window_logits.device)
        _update_draft(full, window_logits[sel], sampler)


def _update_denoise(rows, window_logits, sampler):
    tok, conf = diffusion_trust.propose(window_logits, sampler)
    # one device->host copy (token ids < 2^24 are exact in float32); the selection runs on the host copies
    tok, conf = torch.stack([tok.to(conf.dtype), conf]).cpu().unbind(0)
    tok = tok.long()
    undecided = torch.tensor([[not d for d in r.decided] for r in rows])
    newly = diffusion_trust.select_confident(conf, undecided, rows[0].req.threshold)
    for row, toks, new in zip(rows, tok.tolist(), newly.tolist()):
        for j, chosen in enumerate(new):
            if chosen:
                row.x[j], row.decided[j] = toks[j], True
        row.hist[sum(new)] += 1
        end = next((j for j, d in enumerate(row.decided) if not d), row.block)
        if end > row.emitted:
            done = row.emit(row.x[row.emitted:end])
            row.emitted = end
            if done:
                continue
        if end == row.block:  # block finished: the next step commits it and opens the next block
            row.commit_tokens = [row.pending, *row.x[:-1]]
            row.pending = row.x[-1]
            row.x, row.decided, row.emitted = [row.mask_id] * row.block, [False] * row.block, 0
