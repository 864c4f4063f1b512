"""Overlapped trust steps: greedy anchored AR-Trust and Diffusion-Trust rows decided on the device (issue 6).

One step at a time, the host reads each step's results (accepted counts, tokens, confidences), updates every row
and builds the next step's inputs while the device idles. Here the rows' decoding state lives on the device
(``TrustState``) and one step's read-out decides the next step's inputs there (``TrustState.advance``), so the
engine queues step N+1 before it reads step N's *record* (what each row emitted), and the host's work on step N
(emits, stop checks, streaming) runs while the device computes step N+1.

It covers rows that are greedy, use the anchored scheme (the default of both modes) and share one block size
B >= 2. Every such step has one shape: B clean columns and a B-wide window.

* AR-Trust draft row: clean [accepted prefix..., pending] (committed; at most B tokens: a rejection accepts at most
  B-2 drafts), window [pending, mask x (B-1)] anchored on pending. Its clean logits at pending give the AR token
  (emitted, the new pending); window positions 1..B-1 the drafts; the row turns to verify.
* AR-Trust verify row: clean [pending, d_1..d_{B-1}] (uncommitted), window [d_{B-1}, mask x (B-1)] anchored. The
  longest prefix of drafts equal to the clean argmaxes is accepted, then the AR token at the first mismatch (or the
  bonus). A full accept commits the clean tokens after the step (``late``) and takes the window's drafts; a
  rejection keeps [pending, accepted drafts] to commit with the next draft step.
* Diffusion-Trust commit row (its block fully decided): clean [pending, x_1..x_{B-1}] (committed), window
  [x_{B-1}, mask x (B-1)] anchored; the AR token at x_{B-1} is emitted and the window's positions 1..B-1 make the
  first denoising pass over the next block.
* Diffusion-Trust denoise row: no clean token, window [pending, decided tokens or mask]; one denoising pass.

The decisions are ``modes``' (the same acceptance rule, ``diffusion_trust.select_confident`` vectorised with a
threshold per row), made from the one-pass read-out (``argmax``: the argmax and its softmax probability), so the
tokens are the ones the step-at-a-time loop gives with ``modes.GREEDY_READ`` (on CPU with either read-out).

Only the host applies stops (``max_new_tokens``, stop ids and strings), one step late, so a row runs one step past
its end: that step is dropped, as in the overlapped AR loop. It writes only the row's own slot (within the
capacity's two spare blocks), and the slot is reset before a new request uses it. Each request gets the same
tokens in the same ``on_token`` calls; across requests the calls come in slot order (one step at a time: group by
group). Where a test has replaced ``ar_trust.propose`` (its hook for forced drafts), the hook gets the drafting
rows' window argmaxes and token indices as the step-at-a-time loop gives them, in one call per step (``sampler``
None; a row's dropped extra step included), at the cost of a device sync per step.

On CPU the tests find the same tokens bit for bit. On a GPU every overlapped step has the (B, B) shape, where one
step at a time runs narrower ones too; matrix products can round differently between shapes, so a near-tie can
resolve differently between the two loops (as it can between any two step widths).

Costs: every step is B + B wide. One step at a time, a step is that wide as soon as one row has clean tokens, which
at C = 8 is nearly every step (an anchored Diffusion-Trust row commits every ~2.5 forwards at 1.5 tokens/forward);
at low concurrency, Diffusion-Trust's window-only steps (C x B, ~13% cheaper at the 2B shape) become full ones. On
CUDA ``TrustState.advance`` is one torch.compiled function (read-out op, decisions, state update, next inputs)
replayed from a CUDA graph; eager it is ~230 small aten calls (counted on CPU).
"""

from __future__ import annotations

import torch

from flarectl.decoding import ar_trust
from flarectl.engine import modes
from flarectl.engine.argmax import argmax_confidence, device_read
from flarectl.engine.requests import Row

DRAFT, VERIFY, COMMIT, DENOISE = 0, 1, 2, 3
"""Record kinds: what a row's step was."""

_PROPOSE = ar_trust.propose  # the hook's own function: drafts are the window's argmaxes

HEAD = 4
"""Record columns before the tokens: kind, histogram index, tokens of the first group, tokens of the second."""


def block_of(row: Row) -> int | None:
    """The block size of a row that ``TrustState`` can step (greedy, anchored, AR-Trust or Diffusion-Trust, block
    >= 2), else None."""
    if row.mode not in ("ar-trust", "diffusion-trust") or row.scheme != modes.ANCHORED:
        return None
    if not row.sampler.greedy or row.block < 2:
        return None
    return row.block


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a stream sync (pinned, asynchronous on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class TrustState:
    """The decoding state of C slots on the device, for rows that ``block_of`` accepts (one block size B). Slots
    not ``live`` take part in the step with nothing to do. Tensors (K = B - 1): ``pending`` [C], ``verify`` [C]
    (AR-Trust phase), ``drafts`` [C, K], ``accepted`` [C, B] and ``n_accepted`` [C] (AR-Trust: tokens committed
    before ``pending`` by the next draft step), ``x`` [C, K], ``decided`` [C, K], ``emitted`` [C] (Diffusion-Trust
    block), ``threshold`` [C] (fp64), ``generated`` [C] (tokens emitted so far)."""

    def __init__(self, slots: int, block: int, mask_id: int, device: torch.device, compile: bool | None = None,
                 graphs: bool | None = None):
        if block < 2:
            raise ValueError(f"overlapped trust steps need a block size >= 2; got {block}")
        self.slots, self.block, self.mask_id, self.device = slots, block, int(mask_id), torch.device(device)
        self.key: frozenset[int] = frozenset()
        self.loaded = False  # whether the state is the rows' (else the host's rows hold it: ``store``)
        C, B, K = slots, block, block - 1
        self._fields = dict(live=(C,), dt=(C,), verify=(C,), pending=(C,), drafts=(C, K), accepted=(C, B),
                            n_accepted=(C,), x=(C, K), decided=(C, K), emitted=(C,), threshold=(C,),
                            generated=(C,))
        self._dtypes = dict(live=torch.bool, dt=torch.bool, verify=torch.bool, decided=torch.bool,
                            threshold=torch.float64)
        for name, shape in self._fields.items():
            setattr(self, name, torch.zeros(shape, dtype=self._dtypes.get(name, torch.long), device=self.device))
        cuda = self.device.type == "cuda"
        self.compiled = cuda if compile is None else bool(compile)
        self.graphs = cuda if graphs is None else bool(graphs)
        self._fast = None
        if self.compiled or self.graphs:
            self._fast = torch.compile(_advance_fused, dynamic=False) if self.compiled else _advance_fused
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._fast_ok = False  # the compiled path has run once (after that a failure is not a compile's)
        self.requests = [-1] * C  # the request index in each slot (``ar_trust.propose``'s hook takes them)
        self.record_width = HEAD + B + K
        pin = self.device.type == "cuda"
        self.host_records = [torch.empty(C, self.record_width, dtype=torch.long, pin_memory=pin) for _ in range(2)]

    # -- host <-> device --------------------------------------------------------------------------------------
    def load(self, rows: list[tuple[int, Row]]) -> None:
        """Take the rows' state from the host (rows between steps: nothing left to commit late)."""
        host = {n: torch.zeros(s, dtype=self._dtypes.get(n, torch.long)) for n, s in self._fields.items()}
        for slot, row in rows:
            host["live"][slot] = True
            host["pending"][slot] = row.pending
            host["generated"][slot] = len(row.tokens)
            self.requests[slot] = row.index
            if row.mode == "ar-trust":
                host["verify"][slot] = row.phase == "verify"
                if row.phase == "verify":
                    host["drafts"][slot] = torch.tensor(row.drafts)
                acc = row.commit_tokens
                host["accepted"][slot, :len(acc)] = torch.tensor(acc, dtype=torch.long)
                host["n_accepted"][slot] = len(acc)
            else:
                host["dt"][slot] = True
                host["x"][slot] = torch.tensor(row.x)
                host["decided"][slot] = torch.tensor(row.decided)
                host["emitted"][slot] = row.emitted
                host["threshold"][slot] = float(row.req.threshold)
        for name, t in host.items():
            getattr(self, name).copy_(_to_device(t, self.device))
        self.key = frozenset(slot for slot, _ in rows)
        self.loaded = True

    def store(self, rows: list[tuple[int, Row]]) -> None:
        """Give the rows' state back to the host (after the last queued step has been read)."""
        host = {n: getattr(self, n).cpu() for n in ("verify", "pending", "drafts", "accepted", "n_accepted", "x",
                                                    "decided", "emitted")}
        for slot, row in rows:
            row.pending = int(host["pending"][slot])
            if row.mode == "ar-trust":
                row.phase = "verify" if bool(host["verify"][slot]) else "draft"
                if row.phase == "verify":  # (a draft row's drafts are from before: no step reads them)
                    row.drafts = host["drafts"][slot].tolist()
                row.commit_tokens = host["accepted"][slot, :int(host["n_accepted"][slot])].tolist()
                row.q = None
            else:
                row.x, row.decided = host["x"][slot].tolist(), host["decided"][slot].tolist()
                row.emitted = int(host["emitted"][slot])
        self.loaded = False

    def keep(self, slots: frozenset[int]) -> None:
        """Stop stepping every slot not in ``slots`` (its request has left)."""
        mask = torch.zeros(self.slots, dtype=torch.bool)
        mask[sorted(slots)] = True
        self.live &= _to_device(mask, self.device)
        self.key = frozenset(slots)

    # -- one step ---------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._fields}

    def inputs(self):
        """The step's inputs from the state: (ids [C, 2B], counts [C], wlen [C], commit [C] bool, seen [C]), as
        ``modes.plan`` and ``StepInputs.upload`` would build them (zeros where a slot is not live)."""
        return step_inputs(self.tensors(), self.block, self.mask_id)

    def advance(self, logits: torch.Tensor, force_first: bool):
        """logits [C, 2B, V] of the step that ``inputs`` built -> (late [C] bool: rows whose clean tokens the backend
        commits after the step, record [C, HEAD + 2B - 1] long (``decide``), the next step's ``inputs``); the state
        moves on. ``force_first``: ``modes._force_first_pass()``. On CUDA (``compile``/``graphs``) one compiled
        function does it all, replayed from a CUDA graph when the logits are a graph's static output."""
        if ar_trust.propose is not _PROPOSE or self._fast is None:
            return self._advance_eager(logits, force_first)
        if not self.graphs:
            out = self._compiled_call(lambda: self._fast(self.tensors(), logits, self.block, self.mask_id,
                                                         force_first))
            return self.advance(logits, force_first) if out is None else out
        key = (logits.data_ptr(), tuple(logits.shape), force_first)
        if key not in self._graphs:
            if len(self._graphs) > 8:
                self._graphs.clear()
            capture = self._compiled_call(lambda: self._capture(logits, force_first))
            if capture is None:
                return self.advance(logits, force_first)
            self._graphs[key] = capture
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _compiled_call(self, call):
        """``call()`` (a compiled call, or the capture of one); None if torch.compile failed there the first time:
        then it warns and drops the compiled path (the caller runs the step again without it, as
        ``StaticStep.fallback_eager`` does)."""
        if self._fast_ok or not self.compiled:
            return call()
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - a compile that fails: the eager decisions are the same
            import warnings

            warnings.warn(f"torch.compile of the overlapped trust decisions failed ({type(exc).__name__}: {exc}); "
                          "running them eager", stacklevel=2)
            self.compiled, self._graphs = False, {}
            self._fast = _advance_fused if self.graphs else None
            return None
        self._fast_ok = True
        return result

    def _advance_eager(self, logits, force_first):
        tok, conf = device_read(logits)
        new, late, record, (window, drafting, draft, n1) = decide(self.tensors(), tok, conf, self.block,
                                                                  self.mask_id, force_first)
        if ar_trust.propose is not _PROPOSE:
            new["drafts"] = self._propose(window, drafting, draft, n1, new["drafts"])
        for name, t in new.items():
            getattr(self, name).copy_(t)
        return late, record, self.inputs()

    def _capture(self, logits, force_first):
        """A CUDA graph of ``_fast`` on these logits; the warm-up runs' changes to the state are undone."""
        saved = {name: t.clone() for name, t in self.tensors().items()}
        args = (self.tensors(), logits, self.block, self.mask_id, force_first)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._fast(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._fast(*args)
        finally:
            for name, t in saved.items():
                getattr(self, name).copy_(t)
        return graph, out

    def _propose(self, window, drafting, draft, n1, drafts) -> torch.Tensor:
        """A test's ``ar_trust.propose`` hook applied to the ``drafting`` rows' anchored windows [C, B] (window
        position 0 predicts the row's last token of this step: a draft row's AR token, a full accept's bonus), called
        as the step-at-a-time loop calls it (a device sync)."""
        rows = drafting.nonzero()[:, 0].tolist()
        if not rows:
            return drafts
        generated = (self.generated + torch.where(draft, 0, n1 - 1))[rows].tolist()
        forced = ar_trust.propose(window[rows].cpu(), None, [self.requests[r] for r in rows], generated)
        drafts = drafts.clone()
        drafts[rows] = torch.as_tensor(forced, dtype=torch.long).to(self.device)[:, 1:]
        return drafts


def step_inputs(s: dict[str, torch.Tensor], block: int, mask_id: int):
    """``TrustState.inputs`` on the state tensors ``s``."""
    B = block
    draft, verify, commit, denoise = _kinds(s)
    live, dt, x, drafts, pending = s["live"], s["dt"], s["x"], s["drafts"], s["pending"]
    cols = torch.arange(B, device=pending.device)
    nacc = s["n_accepted"][:, None]
    draft_clean = torch.where(cols < nacc, s["accepted"], torch.where(cols == nacc, pending[:, None], 0))
    full_clean = torch.cat([pending[:, None], torch.where(dt[:, None], x, drafts)], 1)
    clean = torch.where(draft[:, None], draft_clean, torch.where((verify | commit)[:, None], full_clean, 0))
    counts = torch.where(draft, s["n_accepted"] + 1, torch.where(verify | commit, B, 0))
    head = torch.where(draft | denoise, pending, torch.where(dt, x[:, -1], drafts[:, -1]))
    body = torch.where(denoise[:, None] & s["decided"], x, mask_id)
    window = torch.where(live[:, None], torch.cat([head[:, None], body], 1), 0)
    wlen = torch.where(live, B, 0)
    anchored = draft | verify | commit
    return torch.cat([clean, window], 1), counts, wlen, draft | commit | denoise, counts - anchored.long()


def _kinds(s):
    live, dt, verify = s["live"], s["dt"], s["verify"]
    done = s["decided"].all(1)
    return live & ~dt & ~verify, live & ~dt & verify, live & dt & done, live & dt & ~done


def decide(s: dict[str, torch.Tensor], tok: torch.Tensor, conf: torch.Tensor, block: int, mask_id: int,
           force_first: bool):
    """One step's decisions from the read-out tok, conf [C, 2B] (argmax and its probability per position) of the
    step that ``step_inputs(s)`` built -> (the state's new values by name, late [C] bool, record [C, HEAD + 2B - 1],
    (anchored windows' argmaxes [C, B], rows that draft from them, draft rows, n1): what the drafts hook takes).
    Record row: kind, histogram index, n1, n2, then the first group's n1 tokens (in B columns) and the second
    group's n2 (Diffusion-Trust's newly final block tokens; B - 1 columns)."""
    B, K = block, block - 1
    draft, verify, commit, denoise = _kinds(s)
    dt = s["dt"] & s["live"]
    drafts, pending = s["drafts"], s["pending"]
    anchor = tok.gather(1, torch.where(draft, s["n_accepted"], K)[:, None])[:, 0]  # the AR token (draft, commit)
    win_tok, win_conf = tok[:, B:], conf[:, B:]
    # AR-Trust verify: the longest prefix of drafts equal to the clean argmaxes, then the AR token after it
    target = tok[:, :B]
    n = (drafts == target[:, :K]).long().cumprod(1).sum(1)
    after = target.gather(1, n[:, None])[:, 0]
    full = n == K
    # Diffusion-Trust: one denoising pass (a commit row's over the next block: window positions 1..B-1)
    undecided = commit[:, None] | ~s["decided"]
    cand_tok = torch.where(commit[:, None], win_tok[:, 1:], win_tok[:, :K])
    cand_conf = torch.where(commit[:, None], win_conf[:, 1:], win_conf[:, :K]).masked_fill(~undecided, -1.0)
    # ``< 1.0`` on the fp64 threshold, as ``select_confident`` tests the float: 1 - 1e-8 rounds to 1.0 in fp32
    below_one = (s["threshold"] < 1.0)[:, None]
    chosen = (cand_conf >= s["threshold"].to(cand_conf.dtype)[:, None]) & undecided & below_one
    force = denoise | (commit & force_first)
    best = torch.nn.functional.one_hot(cand_conf.argmax(1), K).bool() & undecided.any(1, keepdim=True)
    newly = chosen | (best & force[:, None])
    x = torch.where(newly, cand_tok, torch.where(commit[:, None], mask_id, s["x"]))
    decided = newly | (s["decided"] & ~commit[:, None])
    start = torch.where(commit, 0, s["emitted"])
    end = decided.long().cumprod(1).sum(1)
    # the record
    n_new = newly.long().sum(1)
    kind = torch.where(draft, DRAFT, torch.where(verify, VERIFY, torch.where(commit, COMMIT, DENOISE)))
    hist = torch.where(verify, n, torch.where(commit, 1 + n_new, n_new))
    n1 = torch.where(verify, n + 1, torch.where(draft | commit, 1, 0))
    n2 = torch.where(dt, end - start, 0)
    cols = torch.arange(B, device=tok.device)
    verified = torch.where(cols < n[:, None], torch.cat([drafts, drafts[:, :1]], 1), after[:, None])
    first = torch.where(verify[:, None], verified, torch.where(cols == 0, anchor[:, None], 0))
    second = x.gather(1, (start[:, None] + cols[:K]).clamp(max=K - 1))
    record = torch.cat([torch.stack([kind, hist, n1, n2], 1), first, second], 1)
    # the next state
    late = verify & full
    rejected = verify & ~full
    drafting = draft | late
    new = dict(
        accepted=torch.where(rejected[:, None], torch.cat([pending[:, None], drafts], 1), s["accepted"]),
        n_accepted=torch.where(rejected, n + 1, torch.where(draft, 0, s["n_accepted"])),
        drafts=torch.where(drafting[:, None], win_tok[:, 1:], drafts),
        pending=torch.where(draft | commit, anchor, torch.where(verify, after, pending)),
        verify=torch.where(draft, True, torch.where(verify, full, s["verify"])),
        x=torch.where(dt[:, None], x, s["x"]),
        decided=torch.where(dt[:, None], decided, s["decided"]),
        emitted=torch.where(dt, end, s["emitted"]),
        generated=s["generated"] + torch.where(s["live"], n1 + n2, 0))
    return new, late, record, (win_tok, drafting, draft, n1)


def _advance_fused(s: dict[str, torch.Tensor], logits: torch.Tensor, block: int, mask_id: int, force_first: bool):
    """The read-out (``argmax_confidence``, the op: compiled and captured code), ``decide``, the state updated in
    place and the next step's inputs, in one function for torch.compile and a CUDA graph."""
    lead = logits.shape[:-1]
    packed = argmax_confidence(logits.reshape(-1, logits.shape[-1]))
    tok, conf = packed[0].long().reshape(lead), packed[1].reshape(lead)
    new, late, record, _ = decide(s, tok, conf, block, mask_id, force_first)
    for name, t in new.items():
        s[name].copy_(t)
    return late, record, step_inputs(s, block, mask_id)


def apply_record(row: Row, record: list[int], block: int) -> None:
    """The host's part of one row's step: its histogram and emits, in the order ``modes`` makes them (a row that
    ends on the first group takes nothing from the second)."""
    kind, hist, n1, n2 = record[:HEAD]
    first, second = record[HEAD:HEAD + n1], record[HEAD + block:HEAD + block + n2]
    if kind == DRAFT:
        row.emit(first)
    elif kind == VERIFY:
        row.hist[hist] += 1
        row.emit(first)
    elif kind == COMMIT and row.emit(first):
        row.hist[1] += 1
    else:  # a commit row that goes on, or a denoise row: the denoising pass
        row.hist[hist] += 1
        if n2:
            row.emit(second)
