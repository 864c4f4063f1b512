"""AR-Trust: exact self-speculative decoding (the noisy path drafts a block, the clean path verifies it).

For a row whose committed cache ends before the pending token x[s-1] (the engine's default, *anchored* scheme;
``flarectl.engine.modes``):

1. draft: clean [accepted tokens..., x[s-1]] (committed) and the window [x[s-1], mask x (B-1)] anchored on
   x[s-1] (same position, sees the clean tokens before it). The clean logits at x[s-1] give x[s] exactly as AR
   decoding would (emitted); window position j gives q_j for x[s+j], j >= 1: drafts d_1..d_{B-1} of the tokens
   after x[s] (greedy: argmax; sampling: d_j ~ q_j);
2. verify, fused with the next draft: clean [x[s], d_1..d_{B-1}] (not committed) — position j gives p_j for
   x[s+1+j] — and the window anchored on d_{B-1}, which sees exactly that clean prefix;
3. accept: greedy — the longest prefix with d_j == argmax p_{j-1}, then the AR token at the first mismatch (or
   the bonus token from p_{B-1} after a full accept); sampling — accept d_j with probability min(1, p(d_j)/q(d_j)),
   at the first rejection resample from normalize(max(p - q, 0)), after a full accept sample the bonus from
   p_{B-1} (Leviathan et al.). Either way the output is distributed exactly as AR decoding with the same
   temperature/top-p;
4. full accept: the B clean tokens are committed from the state the step kept, the bonus becomes the pending
   token and the window's positions 1..B-1 (which follow the bonus) are the next drafts (back to 2: one forward per
   B tokens); a rejection: the AR token becomes pending and the next draft step feeds the accepted prefix as
   clean tokens (back to 1, which emits a token too). No recurrent state is ever rolled back.

Rows of a batch accept different lengths. The loop lives in the serving engine (``flarectl.engine.modes``); this
module holds the rules it calls (``propose`` and the acceptance tests are hooks the tests replace).
"""

from __future__ import annotations

import torch

from flarectl.decoding.sampling import Sampler, sample_from


def draft_window(pending: torch.Tensor, block_size: int, mask_id: int) -> torch.Tensor:
    """pending [R] -> window inputs [R, B] = [pending, mask x (B-1)]."""
    masks = torch.full((pending.shape[0], block_size - 1), mask_id, dtype=torch.long, device=pending.device)
    return torch.cat([pending[:, None], masks], 1)


def propose(q: torch.Tensor, sampler: Sampler, rows: list[int], generated: list[int]) -> torch.Tensor:
    """Drafts [R, B] from the draft distributions q [R, B, V], or for greedy decoding from their argmax tokens
    [R, B] (an integer tensor: the engine's one-pass greedy read-out; returned as they are). A hook for tests that
    force drafts: ``rows`` are request indices and ``generated[r]`` the index, among row r's generated tokens, of the
    token that window position 0 predicts."""
    return q if not q.is_floating_point() else sampler.sample(q)


def accept_greedy(p: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p [R, B+1, V] (or its argmax [R, B+1], an integer tensor), drafts [R, B] -> (accepted count n [R], next token
    [R]): the AR argmax at position n."""
    target = p if not p.is_floating_point() else p.argmax(-1)  # [R, B+1]
    n = (drafts == target[:, :-1]).long().cumprod(1).sum(1)
    return n, target.gather(1, n[:, None])[:, 0]


def accept_speculative(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                       sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling. p [R, B+1, V] target, q [R, B, V] draft, drafts [R, B] ~ q.

    Returns (accepted count n [R], next token [R] from normalize(max(p_n - q_n, 0)), or from p_B if n == B).
    """
    rows, block = drafts.shape
    p_d = p[:, :block].gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    ok = sampler.uniform((rows, block), p) * q_d < p_d  # u < p/q  <=>  accept w.p. min(1, p/q)
    n = ok.long().cumprod(1).sum(1)
    idx = torch.arange(rows, device=p.device)
    p_n = p[idx, n]
    q_n = torch.where((n < block)[:, None], q[idx, n.clamp(max=block - 1)], torch.zeros_like(p_n))
    resid = (p_n - q_n).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_n)
    return n, sample_from(resid, sampler.generator)
