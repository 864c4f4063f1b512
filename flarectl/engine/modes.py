"""The three decoding modes as per-row step plans and per-group updates (one forward per engine step).

Every row keeps its committed tokens in the slot cache except ``pending`` (the last final token). A plan is
``(clean, window, commit, anchored)``: the clean tokens to feed (committed this step iff ``commit``), the noisy
window, and whether the window is *anchored* on the last clean token (its first token is that token, at the same
position, and it sees only the clean tokens before it) rather than placed after the clean tokens.

* ``ar``: clean [pending], committed; the logits at clean position 0 give the next token.
* ``ar-trust`` (``ANCHORED``, the default scheme): every forward both verifies and drafts, and every forward
  emits at least one exact AR token.
  - A draft step (after a rejection, and first) feeds the accepted tokens and ``pending`` as clean tokens
    (committed) and the window [pending, mask x (B-1)] anchored on ``pending``. The clean logits at ``pending``
    give the next token exactly as AR decoding would (it is emitted and becomes ``pending``); the window position 0
    predicts that same token (dropped), positions 1..B-1 give the drafts d_1..d_{B-1} of the tokens after it.
  - A verify step feeds [pending, d_1..d_{B-1}] as clean tokens, *not* committed, and the window
    [d_{B-1}, mask x (B-1)] anchored on d_{B-1}. Clean position j checks d_{j+1}; position B-1 is the bonus
    distribution after a full accept. Emitted: the accepted drafts plus the AR token at the first mismatch (or
    the bonus), so k + 1 tokens for k accepted. After a full accept the B clean tokens are committed from the
    step's kept state (``finish_step``: no recomputation), the bonus becomes ``pending`` and the window's positions
    1..B-1 are the next drafts (they follow the bonus): one forward per B tokens. After a rejection the next step
    is a draft step that re-feeds the accepted prefix (no GDN rollback anywhere).
  The ``FUSED`` scheme (sessions 1-8) drafts B tokens with an unanchored window and emits nothing in draft steps;
  it stays selectable (``Engine(ar_trust_scheme="fused")``) for comparison.
  Acceptance is ``flarectl.decoding.ar_trust``'s (greedy, or exact speculative sampling): lossless either way.
* ``diffusion-trust``, ``PLAIN`` scheme (the paper's; ``Engine(diffusion_trust_scheme="plain")``): the window
  [pending, decided tokens or mask]; a finished block's clean tokens [pending, x_1..x_{B-1}] are committed by the
  next step, which also carries the next block's window (``flarectl.decoding.diffusion_trust``).
  The ``ANCHORED`` scheme (the default since session 12: on a 1000-step GPU conversion of SmolLM2-135M, threshold
  0.9, C=8, 1.44 -> 1.56 tokens/forward on gsm8k-style prompts and 1.37 -> 1.54 on HumanEval, with the same share
  of AR's greedy prefix, docs/perf/engine.md) denoises B-1 tokens per block with
  the same B-wide window (its last position's prediction is unused) and commits a finished block as AR-Trust's
  anchored draft step does: the clean tokens [pending, x_1..x_{B-1}] (B, committed) and the window
  [x_{B-1}, mask x (B-1)] anchored on x_{B-1}. The clean logits at x_{B-1} give the next token exactly as AR decoding
  would (emitted; it becomes ``pending``), and the window's positions 1..B-1 make the first denoising pass over the
  next block. So every block ends with one exact AR token at no extra forward: B tokens per cycle instead of B-1.
  That first pass predicts the block without the token in front of it (the AR token is only known from the same
  forward), so it decides only tokens at or above the threshold and never forces the most confident one
  (``ANCHORED_FORCE_FIRST_PASS``; env ``FLARECTL_DT_ANCHORED_FORCE_FIRST=1`` forces it, session 11's behaviour).

The update functions work on a group of rows sharing mode, sampler, block size and threshold, vectorised.
"""

from __future__ import annotations

import os

import torch

from flarectl.decoding import ar_trust, diffusion_trust
from flarectl.decoding.sampling import Sampler
from flarectl.engine.argmax import greedy_read
from flarectl.engine.requests import Row


ANCHORED, FUSED, PLAIN = "anchored", "fused", "plain"
AR_TRUST_SCHEMES = (ANCHORED, FUSED)
DIFFUSION_TRUST_SCHEMES = (PLAIN, ANCHORED)

ANCHORED_FORCE_FIRST_PASS = False
"""Whether the anchored Diffusion-Trust commit step's denoising pass (made before the AR token in front of the block
is known) always decides its most confident token, as every other pass does. Off: it decides only tokens at or
above the threshold. Env ``FLARECTL_DT_ANCHORED_FORCE_FIRST`` (0/1) overrides, read at each step."""


_GREEDY_READ_ENV = os.environ.get("FLARECTL_GREEDY_READ", "").strip().lower()
GREEDY_READ: bool | None = None if not _GREEDY_READ_ENV else _GREEDY_READ_ENV not in ("0", "false", "no", "off")
"""Whether greedy trust-mode groups read each step's logits once (``Greedy``: argmax and its softmax probability per
position, one kernel launch on CUDA and one device->host copy) instead of through the sampler's generic path (fp32
copies, a one-hot or a full softmax, a copy to the host per stage). The same tokens either way; Diffusion-Trust's
confidence differs only in rounding on CUDA (on CPU the twin computes it as the generic path does: the same bits).
None (the default): on for logits on CUDA, off elsewhere (on CPU it saves nothing). Timed on an H100 in session 26
(2B shape, C=8): AR-Trust 2,292 -> 2,523 tok/s, Diffusion-Trust 2,627 -> 2,669 (docs/perf/engine.md). Env
``FLARECTL_GREEDY_READ=0/1`` overrides (read at import; tests and benchmarks set the attribute)."""


def greedy_read_on(logits: torch.Tensor) -> bool:
    """``GREEDY_READ`` for these logits (None: on CUDA)."""
    return logits.is_cuda if GREEDY_READ is None else bool(GREEDY_READ)


class Greedy:
    """A greedy read-out of a group's logits, on the host: ``tokens`` [G, n] (long, the argmax) and ``conf`` [G, n]
    (its softmax probability). It stands in for the logits [G, n, V] in the update functions and indexes like them
    (rows and positions; a device index is brought to the host)."""

    device = torch.device("cpu")

    def __init__(self, tokens: torch.Tensor, conf: torch.Tensor):
        self.tokens, self.conf = tokens, conf

    @classmethod
    def read(cls, logits: torch.Tensor) -> "Greedy":
        """logits [G, n, V] (any device) -> the read-out, with one kernel launch and one device->host copy."""
        return cls(*greedy_read(logits))

    def __getitem__(self, key) -> "Greedy":
        host = tuple(k.cpu() if isinstance(k, torch.Tensor) else k for k in (key if isinstance(key, tuple) else (key,)))
        return Greedy(self.tokens[host], self.conf[host])

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape


def _probs(x, sampler: Sampler) -> torch.Tensor:
    """The processed distributions of logits x [G, n, V], or for a ``Greedy`` read-out its argmax tokens [G, n]
    (what ``ar_trust.propose`` and ``ar_trust.accept_greedy`` take in their place)."""
    return x.tokens if isinstance(x, Greedy) else sampler.probs(x)


def _force_first_pass() -> bool:
    env = os.environ.get("FLARECTL_DT_ANCHORED_FORCE_FIRST", "").strip().lower()
    return ANCHORED_FORCE_FIRST_PASS if not env else env not in ("0", "false", "no", "off")


def configure(row: Row, ar_trust_scheme: str, diffusion_trust_scheme: str) -> None:
    """Set a new row's scheme for its mode; an anchored Diffusion-Trust block holds B-1 tokens."""
    if row.mode == "ar-trust":
        row.scheme = ar_trust_scheme
    elif row.mode == "diffusion-trust":
        row.scheme = diffusion_trust_scheme
        if row.scheme == ANCHORED:
            row.x, row.decided = row.x[:row.block - 1], row.decided[:row.block - 1]


def _dt_anchored(row: Row) -> bool:
    return row.mode == "diffusion-trust" and row.scheme == ANCHORED


def plan(row: Row) -> tuple[list[int], list[int], bool, bool]:
    """The row's next step: (clean tokens, window tokens, commit the clean tokens now, window anchored on the last
    clean token)."""
    masks = [row.mask_id] * (row.block - 1) if row.mask_id is not None else []
    if row.mode == "ar":
        return [row.pending], [], True, False
    if row.mode == "ar-trust" and row.scheme == ANCHORED:
        if row.phase == "verify":
            return [row.pending, *row.drafts], [row.drafts[-1], *masks], False, True
        clean, row.commit_tokens = [*row.commit_tokens, row.pending], []
        row.anchor = len(clean) - 1
        return clean, ([row.pending, *masks] if row.block > 1 else []), True, True  # B = 1: nothing to draft
    if _dt_anchored(row):
        if all(row.decided):  # block finished (or B = 1): commit it; the clean path gives the next token
            clean = [row.pending, *row.x]
            row.phase, row.anchor = "commit", len(clean) - 1
            return clean, ([row.x[-1], *masks] if row.block > 1 else []), True, True
        row.phase = "denoise"
        return [], [row.pending, *(x if d else row.mask_id for x, d in zip(row.x, row.decided))], True, False
    if row.mode == "ar-trust" and row.phase == "verify":
        return [row.pending, *row.drafts[:-1]], [row.drafts[-1], *masks], False, False
    clean, row.commit_tokens = row.commit_tokens, []
    if row.mode == "ar-trust":
        return clean, [row.pending, *masks], True, False
    body = [x if d else row.mask_id for x, d in zip(row.x[:-1], row.decided[:-1])]
    return clean, [row.pending, *body], True, False


def group_key(row: Row) -> tuple:
    s = row.sampler
    return (row.mode, (row.phase, row.scheme) if row.mode == "ar-trust" or _dt_anchored(row) else "",
            "greedy" if s.greedy else id(s),
            row.block, row.req.threshold if row.mode == "diffusion-trust" else 0.0)


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
        return
    # greedy: every position the group may need, read once (``GREEDY_READ``); else the logits themselves
    group = Greedy.read(logits[idx]) if sampler.greedy and greedy_read_on(logits) else logits[idx]
    window = group[:, width_clean:width_clean + block]
    if mode == "ar-trust" and rows[0].scheme == ANCHORED:
        if rows[0].phase == "verify":
            _update_verify_anchored(rows, group[:, :block], window, sampler)
        else:
            _update_draft_anchored(rows, group, window, sampler)
    elif _dt_anchored(rows[0]):
        if rows[0].phase == "commit":
            _update_commit_anchored(rows, group, window, sampler)
        else:
            _decide(rows, window[:, :block - 1], sampler)
    elif mode == "ar-trust" and rows[0].phase == "verify":
        _update_verify(rows, group[:, :block], window, sampler)
    else:
        (_update_draft if mode == "ar-trust" else _update_denoise)(rows, window, sampler)


def _update_ar(rows, logits, sampler):
    # greedy: the argmax of the logits is the argmax of the one-hot ``sampler.probs`` (first maximum either way)
    apply_ar_tokens(rows, (logits.argmax(-1) if sampler.greedy else sampler.sample(sampler.probs(logits))).tolist())


def apply_ar_tokens(rows: list[Row], tokens: list[int]) -> None:
    """AR rows take their next tokens (host ints): each becomes the row's ``pending`` token and is emitted."""
    for row, t in zip(rows, tokens):
        row.pending = t
        row.emit([t])


def _update_draft(rows, window_logits, sampler):
    q = _probs(window_logits, sampler)  # [G, B, V] (greedy read-out: [G, B] tokens)
    drafts = ar_trust.propose(q, sampler, [r.index for r in rows], [len(r.tokens) for r in rows])
    for i, (row, d) in enumerate(zip(rows, drafts.tolist())):
        row.drafts, row.q, row.phase = d, (None if sampler.greedy else q[i]), "verify"


def _update_verify(rows, clean_logits, window_logits, sampler):
    """clean_logits [G, B, V]: p_0..p_{B-1} check d_1..d_B (no bonus position); window_logits [G, B, V]: the next
    block's draft distributions, used only after a full accept."""
    p = _probs(clean_logits, sampler)
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


def _draft_after_bonus(rows, window_logits, sampler):
    """Drafts d_1..d_{B-1} from an anchored window's positions 1..B-1 (position 0 predicts the token the clean path
    has just given exactly); block size 1 has nothing to draft and stays in the draft phase (plain AR)."""
    if rows[0].block == 1:
        return
    q = _probs(window_logits, sampler)  # [G, B, V] (greedy read-out: [G, B] tokens)
    # window position 0 predicts the token just emitted (the row's last): ``propose``'s offset is that token's index
    drafts = ar_trust.propose(q, sampler, [r.index for r in rows], [len(r.tokens) - 1 for r in rows])[:, 1:]
    for i, (row, d) in enumerate(zip(rows, drafts.tolist())):
        row.drafts, row.q, row.phase = d, (None if sampler.greedy else q[i, 1:]), "verify"


def _anchor_tokens(rows, group, sampler) -> list[int]:
    """The next token of each row from the clean logits at its anchor column (``row.anchor``) of the group's logits
    [G, W, V] (or their ``Greedy`` read-out): exact AR (greedy argmax, else a draw from the processed distribution)."""
    if isinstance(group, Greedy):
        return group.tokens.gather(1, torch.tensor([[r.anchor] for r in rows]))[:, 0].tolist()
    anchor = torch.tensor([r.anchor for r in rows], device=group.device)
    clean = group.gather(1, anchor[:, None, None].expand(-1, 1, group.shape[-1]))[:, 0]  # [G, V]
    return (clean.argmax(-1) if sampler.greedy else sampler.sample(sampler.probs(clean))).tolist()


def _update_draft_anchored(rows, group, window_logits, sampler):
    """Draft step: the clean logits at each row's anchor (its ``pending`` token) give the next token, exact AR."""
    live = []
    for i, (row, t) in enumerate(zip(rows, _anchor_tokens(rows, group, sampler))):
        row.pending = t
        if not row.emit([t]):
            live.append(i)
    if live:
        if len(live) < len(rows):
            window_logits = window_logits[torch.tensor(live, device=window_logits.device)]
        _draft_after_bonus([rows[i] for i in live], window_logits, sampler)


def _update_verify_anchored(rows, clean_logits, window_logits, sampler):
    """clean_logits [G, B, V]: p_0..p_{B-2} check d_1..d_{B-1}, p_{B-1} is the bonus distribution; window_logits
    [G, B, V]: the anchored window on d_{B-1}, whose positions 1..B-1 are the next drafts after a full accept."""
    p = _probs(clean_logits, sampler)
    drafts = torch.tensor([r.drafts for r in rows], dtype=torch.long, device=p.device)
    if sampler.greedy:
        n, nxt = ar_trust.accept_greedy(p, drafts)
    else:
        n, nxt = ar_trust.accept_speculative(p, torch.stack([r.q for r in rows]), drafts, sampler)
    accepted, nxt = torch.stack([n, nxt]).tolist()  # one device->host copy
    full = []
    for i, (row, k, t) in enumerate(zip(rows, accepted, nxt)):
        row.hist[k] += 1
        done = row.emit(row.drafts[:k] + [t])
        if k == len(row.drafts):  # every clean token is final: commit them all after the step; the bonus is next
            row.commit_late, row.pending = True, t
            if not done:
                full.append(i)
        else:
            row.commit_tokens = [row.pending, *row.drafts[:k]]
            row.pending, row.phase, row.q = t, "draft", None
    if full:
        sel = torch.tensor(full, device=window_logits.device)
        _draft_after_bonus([rows[i] for i in full], window_logits[sel], sampler)


def _decide(rows, window_logits, sampler, extra: int = 0, force: bool = True) -> list[bool]:
    """One denoising pass: window_logits [G, n, V] predict the rows' block positions 0..n-1; decide the confident
    ones (``diffusion_trust.select_confident``; ``force``: and each row's most confident undecided one), emit the
    decided prefix. ``extra``: tokens this forward already emitted per row (the histogram counts tokens per
    forward). Returns, per row, whether it is done."""
    if isinstance(window_logits, Greedy):  # already on the host
        tok, conf = window_logits.tokens, window_logits.conf
    else:
        tok, conf = diffusion_trust.propose(window_logits, sampler)
        # one device->host copy (token ids < 2^24 are exact in float32); the selection runs on the host copies
        tok, conf = torch.stack([tok.to(conf.dtype), conf]).cpu().unbind(0)
        tok = tok.long()
    undecided = torch.tensor([[not d for d in r.decided] for r in rows])
    newly = diffusion_trust.select_confident(conf, undecided, rows[0].req.threshold, force)
    done = []
    for row, toks, new in zip(rows, tok.tolist(), newly.tolist()):
        for j, chosen in enumerate(new):
            if chosen:
                row.x[j], row.decided[j] = toks[j], True
        row.hist[extra + sum(new)] += 1
        end = next((j for j, d in enumerate(row.decided) if not d), len(row.x))
        finished = False
        if end > row.emitted:
            finished = row.emit(row.x[row.emitted:end])
            row.emitted = end
        done.append(finished)
    return done


def _update_commit_anchored(rows, group, window_logits, sampler):
    """Anchored Diffusion-Trust commit step: the clean logits at each row's anchor (the block's last token) give the
    next token, exact AR (emitted: the new ``pending``); the window's positions 1..B-1 denoise the next block
    (unforced unless ``ANCHORED_FORCE_FIRST_PASS``: they do not see that token yet)."""
    live = []
    for i, (row, t) in enumerate(zip(rows, _anchor_tokens(rows, group, sampler))):
        row.pending = t
        n = row.block - 1
        row.x, row.decided, row.emitted = [row.mask_id] * n, [False] * n, 0
        if row.emit([t]) or n == 0:  # done, or B = 1 (plain AR): this forward gave one token
            row.hist[1] += 1
        else:
            live.append(i)
    if live:
        if len(live) < len(rows):
            window_logits = window_logits[torch.tensor(live, device=window_logits.device)]
        _decide([rows[i] for i in live], window_logits[:, 1:], sampler, extra=1, force=_force_first_pass())


def _update_denoise(rows, window_logits, sampler):
    done = _decide(rows, window_logits, sampler)
    for row, finished in zip(rows, done):
        if finished:
            continue
        if all(row.decided):  # block finished: the next step commits it and opens the next block
            row.commit_tokens = [row.pending, *row.x[:-1]]
            row.pending = row.x[-1]
            row.x, row.decided, row.emitted = [row.mask_id] * row.block, [False] * row.block, 0
