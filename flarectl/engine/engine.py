"""The serving engine: continuous batching of up to C requests over fixed slots, one model forward per step.

    engine = Engine(model, concurrency=8, capacity=4096)
    engine.submit(Request(prompt_ids, mode="ar-trust", max_new_tokens=256))
    results = engine.run()          # or call engine.step() yourself (e.g. from a server loop)

Each step: admit waiting requests into free slots (their prompts, less the last token, are prefilled into the
slot), ask every row for its plan (``modes.plan``), run one static-shape forward over all C slots
(``backends``: CUDA-graphed on CUDA), update each group of rows (``modes.update``), stream final tokens, and
free the slots of finished requests — the others never wait for them. A request with bad parameters fails alone
(its result has ``finish_reason == "error"``).

**Overlap** (``Engine(overlap=...)``, env ``FLARECTL_ENGINE_OVERLAP=0/1``; default on for CUDA): while no request is
waiting for a free slot, step N+1 is queued before the host reads step N, so the host's work on step N (emits, stop
checks, streaming) runs while the device computes step N+1 instead of between the two.
* Every row AR (greedy, or sampling with the request's own seeded sampler): step N+1's input tokens are step N's,
  chosen on the device (the argmax, or a draw from the request's generator as the one-step loop draws it).
* Every row greedy anchored AR-Trust or Diffusion-Trust with one block size >= 2: the rows' decoding state moves to
  the device and each step's decisions are made there (``trust_overlap``); the host reads each step's record (what
  every row emitted) one step later.
A request that ends at step N has had one more step computed for it, which is dropped (its slot is released after;
nothing it committed is ever read). Tokens reach the host, and the streams, one step later than without it. The same
tokens either way. Anything else (mixed AR and trust rows, sampled trust rows, samplers shared between requests:
``generate``'s batches, where an extra draw would move the others' streams) runs one step at a time; an admission
drains the step in flight first.
"""

from __future__ import annotations

import os
import time
from collections import deque

import torch

from flarectl.decoding.sampling import Sampler
from flarectl.engine import modes, trust_overlap
from flarectl.engine.backends import make_backend
from flarectl.engine.requests import MAX_BLOCK_SIZE, MODES, Request, RequestResult, Row, failed


class StepInputs:
    """The step's inputs ``ids [C, Wc+Ww] | counts | wlen | commit | seen`` packed in one staging buffer (pinned on
    CUDA) and sent with one asynchronous host->device copy per step; no tensor is built from Python lists. The
    returned views stay valid until the next ``upload``. ``seen``: the clean tokens each row's window sees
    (``counts``, or ``counts - 1`` for a window anchored on the last clean token)."""

    def __init__(self, rows: int, device: torch.device):
        self.rows, self.device = rows, torch.device(device)
        self.on_host = self.device.type == "cpu"
        self.width = 0
        self._uploaded = None  # CUDA event: the last upload has left the staging buffer

    def _grow(self, width: int) -> None:
        self.width = max(width, 2 * self.width, 8)
        n = self.rows * (self.width + 4)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=not self.on_host and torch.cuda.is_available())
        self.host_np = self.host.numpy()
        self.dev = self.host if self.on_host else torch.zeros(n, dtype=torch.long, device=self.device)

    def upload(self, plans: dict[int, tuple[list[int], list[int], bool, bool]], wc: int, ww: int):
        """plans: slot -> (clean tokens, window tokens, commit, anchored) -> (ids, counts, wlen, commit, seen) on
        the device."""
        if wc + ww > self.width:
            self._grow(wc + ww)
        if self._uploaded is not None:
            self._uploaded.synchronize()  # never overwrite the staging buffer while a copy still reads it
        n = wc + ww + 4
        table = self.host_np[:self.rows * n].reshape(self.rows, n)
        table[:] = 0
        for slot, (clean, window, commit, anchored) in plans.items():
            row = table[slot]
            row[:len(clean)] = clean
            row[wc:wc + len(window)] = window
            row[n - 4:] = (len(clean), len(window), commit, len(clean) - (1 if anchored and window else 0))
        packed = self.dev[:self.rows * n]
        if not self.on_host:
            packed.copy_(self.host[:self.rows * n], non_blocking=True)
            if self._uploaded is None:
                self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        packed = packed.view(self.rows, n)
        return packed[:, :wc + ww], packed[:, n - 4], packed[:, n - 3], packed[:, n - 2].bool(), packed[:, n - 1]


_OVERLAP_ENV = os.environ.get("FLARECTL_ENGINE_OVERLAP", "").strip().lower()
OVERLAP_DEFAULT: bool | None = (None if not _OVERLAP_ENV else _OVERLAP_ENV not in ("0", "false", "no", "off"))
"""``Engine(overlap=None)``: whether steps overlap the host's work on the previous step (module docstring). None (the
default): on for CUDA, off elsewhere (on a CPU nothing runs asynchronously, so it can only cost). Timed on an H100
in session 26 (2B shape, C=8): AR 3,425 -> 3,731 tok/s, AR-Trust +8.5% and Diffusion-Trust +4.9% over one step at a
time with the read-out and the row copy (docs/perf/engine.md). Env ``FLARECTL_ENGINE_OVERLAP=0/1`` overrides (read
at import)."""


class Engine:
    """Continuous-batching decoder. ``capacity``: tokens per slot (prompt + new tokens + 2 blocks + 2 must fit).
    ``block_size`` / ``mask_token_id``: defaults for trust-mode requests (else the checkpoint's FLARE metadata).
    ``backend``: auto | static | adapter | recompute (``backends``). ``compile``: torch.compile the static step
    before CUDA-graph capture (None: on for CUDA; env FLARECTL_ENGINE_COMPILE=0 turns it off).
    ``ar_trust_scheme``: 'anchored' (default: every forward emits an exact AR token too) or 'fused' (the earlier
    scheme, for comparison; ``modes``). ``diffusion_trust_scheme``: 'anchored' (default: every block
    ends with an exact AR token from its commit step) or 'plain' (the paper's; ``modes``). ``overlap``: queue
    steps ahead of the host's work on the previous one (None: ``OVERLAP_DEFAULT``, on for CUDA; module docstring)."""

    def __init__(self, model, *, concurrency: int = 8, capacity: int = 4096, backend: str = "auto",
                 block_size: int | None = None, mask_token_id: int | None = None, tokenizer=None,
                 cuda_graphs: bool | None = None, gdn_kernel: str = "auto", compile: bool | None = None,
                 ar_trust_scheme: str = modes.ANCHORED, diffusion_trust_scheme: str = modes.ANCHORED,
                 overlap: bool | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1; got {concurrency}")
        if ar_trust_scheme not in modes.AR_TRUST_SCHEMES:
            raise ValueError(f"ar-trust scheme must be one of {', '.join(modes.AR_TRUST_SCHEMES)}; "
                             f"got {ar_trust_scheme!r}")
        if diffusion_trust_scheme not in modes.DIFFUSION_TRUST_SCHEMES:
            raise ValueError(f"diffusion-trust scheme must be one of {', '.join(modes.DIFFUSION_TRUST_SCHEMES)}; "
                             f"got {diffusion_trust_scheme!r}")
        self.ar_trust_scheme = ar_trust_scheme
        self.diffusion_trust_scheme = diffusion_trust_scheme
        self.model = model
        self.device = model.device
        self.concurrency, self.capacity = concurrency, capacity
        kw = dict(cuda_graphs=cuda_graphs, gdn_kernel=gdn_kernel, compile=compile)
        self.backend = make_backend(backend, model, concurrency, capacity, **kw)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        meta = getattr(model, "flare_meta", None)
        self.block_size = block_size if block_size is not None else (meta.block_size if meta else None)
        if mask_token_id is None:
            mask_token_id = meta.mask_token_id if meta else getattr(self.tokenizer, "mask_token_id", None)
        self.mask_id = mask_token_id
        self.vocab = int(model.hf.get_input_embeddings().weight.shape[0])
        self.greedy = Sampler.create(0.0, 1.0, 0, self.device)
        self.waiting: deque[tuple[Request, float]] = deque()
        self.rows: dict[int, Row] = {}  # slot -> row
        self.free = list(range(concurrency))[::-1]
        self.done: dict[int, RequestResult] = {}
        self.submitted = 0
        self.steps = 0
        self.overlapped_steps = 0  # steps queued ahead of the host's work on the one before (``overlap``)
        self.inputs = StepInputs(concurrency, self.device)
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}
        default = self.device.type == "cuda" if OVERLAP_DEFAULT is None else OVERLAP_DEFAULT
        self.overlap = default if overlap is None else bool(overlap)
        self._inflight: _Inflight | None = None  # a queued AR step whose tokens the host has not read yet
        self._ar_inputs: tuple | None = None  # (row set, counts, wlen, commit, seen) of overlapped AR steps
        self._token_buffers: list[torch.Tensor] = []  # two pinned host buffers of C tokens, used in turn
        self._trust: trust_overlap.TrustState | None = None  # the rows' state on the device (overlapped trust steps)
        self._trust_inputs: tuple | None = None  # the next overlapped trust step's inputs (device)

    # -- requests ---------------------------------------------------------------------------------------------
    def _check(self, req: Request) -> int:
        """Validate a request; return its block size (0 for ar). Raises ValueError with a one-line reason."""
        if req.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {req.mode!r}")
        prompt = list(req.prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= int(t) < self.vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab})")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {req.max_new_tokens}")
        if req.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {req.temperature}")
        if not 0 < req.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {req.top_p}")
        if not 0 < req.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1]; got {req.threshold}")
        if req.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        block = 0
        if req.mode != "ar":
            block = req.block_size if req.block_size is not None else self.block_size
            if block is None:
                raise ValueError("block_size is required: the model has no FLARE metadata (a plain AR checkpoint)")
            if not 1 <= block <= MAX_BLOCK_SIZE:
                raise ValueError(f"block size must be in 1..{MAX_BLOCK_SIZE}; got {block}")
            if self.mask_id is None or not 0 <= self.mask_id < self.vocab:
                raise ValueError(f"trust modes need a mask token id in the vocabulary; got {self.mask_id}")
        need = len(prompt) + req.max_new_tokens + 2 * max(block, 1) + 2
        if need > self.capacity:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({req.max_new_tokens}) does not fit the "
                             f"engine's slot capacity {self.capacity}")
        return block

    def submit(self, req: Request) -> int:
        """Queue a request; returns its index (results are keyed by it)."""
        req.index = self.submitted
        self.submitted += 1
        self.waiting.append((req, time.perf_counter()))
        return req.index

    def _admit(self) -> None:
        joining: list[Row] = []
        while self.free and self.waiting:
            req, t0 = self.waiting.popleft()
            try:
                block = self._check(req)
            except ValueError as exc:
                self.done[req.index] = failed(req, str(exc))
                continue
            stop_ids = req.stop_ids
            if stop_ids is None:
                eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
                stop_ids = [] if eos is None else [eos]
            row = Row(req, self.free.pop(), stop_ids=stop_ids, tokenizer=self.tokenizer,
                      mask_id=self.mask_id if block else None, block=block, submitted=t0)
            modes.configure(row, self.ar_trust_scheme, self.diffusion_trust_scheme)
            if req.sampler is not None:
                row.sampler = req.sampler
            elif req.temperature == 0:
                row.sampler = self.greedy
            else:
                row.sampler = Sampler.create(req.temperature, req.top_p, req.seed, self.device)
            joining.append(row)
        if joining:
            self.backend.prefill([r.slot for r in joining], [list(map(int, r.req.prompt[:-1])) for r in joining])
            for r in joining:
                self.rows[r.slot] = r

    def warmup(self, modes_: list[str], block_size: int | None = None) -> None:
        """Capture the step shapes these modes use (static backend; CUDA graphs are captured on first use)."""
        if not hasattr(self.backend, "warmup"):
            return
        b = block_size or self.block_size or 1
        shapes = {(1, 0)} if "ar" in modes_ else set()
        if "ar-trust" in modes_:
            shapes |= {(wc, b) for wc in range(b + 2)} | {(b + 1, 0)}
        if "diffusion-trust" in modes_:
            shapes |= {(0, b), (b, b)} | ({(1, 0)} if b == 1 else set())
        self.backend.warmup(sorted(shapes))

    # -- stepping ---------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting or self._inflight)

    @torch.no_grad()
    def step(self) -> list[RequestResult]:
        """Admit, run one forward over all slots, update rows; returns the requests finished in this step (with
        ``overlap``: the requests the host found finished in it)."""
        before = set(self.done)
        if self._inflight is not None and self._overlap_kind() != self._inflight.kind:
            self._drain()
        self._admit()
        kind = self._overlap_kind()
        if kind == "ar":
            self._forward_overlapped()
        elif kind == "trust":
            self._forward_trust_overlapped()
        elif self.rows:
            self._forward()
        elif self._inflight is not None:
            self._drain()
        return [self.done[i] for i in sorted(set(self.done) - before)]

    # -- overlapped steps ---------------------------------------------------------------------------------------
    def _overlap_kind(self) -> str | None:
        """How the next step may overlap the host's work (None: one step at a time). No admission may be due (a
        waiting request and a free slot). 'ar': every row AR, greedy or sampling with a sampler of its own. 'trust':
        every row greedy anchored AR-Trust or Diffusion-Trust with one block size >= 2 (``trust_overlap``)."""
        if not self.overlap or not self.rows or (self.waiting and self.free):
            return None
        rows = self.rows.values()
        if all(r.mode == "ar" and (r.sampler.greedy or r.req.sampler is None) for r in rows):
            return "ar"
        blocks = {trust_overlap.block_of(r) for r in rows}
        if len(blocks) == 1 and None not in blocks and self.mask_id is not None:
            return "trust"
        return None

    def _next_tokens(self, last: torch.Tensor, rows: list[tuple[int, Row]]) -> torch.Tensor:
        """last [C, V]: the step's logits at each row's clean token -> [C] tokens on the device, as ``modes`` takes
        them: the argmax (the first maximum); a sampling row draws from its own generator, as its one-row group
        does in a step at a time."""
        tokens = last.argmax(-1)
        for slot, row in rows:
            if not row.sampler.greedy:
                one = slice(slot, slot + 1)
                tokens[one] = row.sampler.sample(row.sampler.probs(last[one]))
        return tokens

    def _forward_overlapped(self) -> None:
        """Queue one AR step (its inputs: the in-flight step's tokens on the device, else the rows' pending tokens),
        the choice of its tokens (``_next_tokens``) and their copy to the host; then read the previous step's."""
        rows = list(self.rows.items())
        key = frozenset(self.rows)
        if self._inflight is not None and self._ar_inputs is not None and self._ar_inputs[0] == key:
            ids = self._inflight.tokens[:, None]  # the tokens of the step before, never seen by the host
        else:  # the first overlapped step, or the row set changed: every input anew (counts, commit, ...)
            plans = {slot: ([row.pending], [], True, False) for slot, row in rows}
            ids, *rest = self.inputs.upload(plans, 1, 0)
            self._ar_inputs = (key, *rest)
            if self._inflight is not None:  # the rows' pending tokens are a step behind: the device has the next
                ids = self._inflight.tokens[:, None]
        counts, wlen, commit, seen = self._ar_inputs[1:]
        logits = self.backend.step(ids, counts, wlen, commit, 1, None)
        self.backend.finish_step(None)
        self.steps += 1
        tokens = self._next_tokens(logits[:, 0], rows)
        if not self._token_buffers:
            pin = self.device.type == "cuda"
            self._token_buffers = [torch.empty(self.concurrency, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        host = self._token_buffers[self.steps % 2]
        host.copy_(tokens, non_blocking=True)
        self._queue(_Inflight("ar", tokens, host, rows))

    def _forward_trust_overlapped(self) -> None:
        """Queue one trust step whose inputs the device state gives (``trust_overlap.TrustState``: loaded from the
        rows when the loop turns to overlapped trust steps), its decisions and its record's copy to the host; then
        read the previous step's record."""
        rows = list(self.rows.items())
        state = self._trust
        if state is None or state.block != rows[0][1].block:  # (kept between turns: its CUDA graphs stay valid)
            state = self._trust = trust_overlap.TrustState(
                self.concurrency, rows[0][1].block, self.mask_id, self.device,
                compile=getattr(self.backend, "compiled", None),  # as the step is (FLARECTL_ENGINE_COMPILE=0: not)
                graphs=bool(getattr(self.backend, "cuda_graphs", False)))
        if not state.loaded:
            state.load(rows)
            self._trust_inputs = state.inputs()
        elif state.key != frozenset(self.rows):
            state.keep(frozenset(self.rows))
            self._trust_inputs = state.inputs()
        ids, counts, wlen, commit, seen = self._trust_inputs
        logits = self.backend.step(ids, counts, wlen, commit, state.block, seen)
        late, record, self._trust_inputs = state.advance(logits, modes._force_first_pass())
        self.backend.finish_step(late, copy_kernel=True)  # every step: only the masked rows move (``row_copy``)
        self.steps += 1
        host = state.host_records[self.steps % 2]
        host.copy_(record, non_blocking=True)
        self._queue(_Inflight("trust", None, host, rows))

    def _queue(self, step: "_Inflight") -> None:
        """``step`` is in flight (an event marks its copy to the host on CUDA); read the one queued before it."""
        self.overlapped_steps += 1
        if self.device.type == "cuda":
            step.ready = torch.cuda.Event()
            step.ready.record()
        previous, self._inflight = self._inflight, step
        if previous is not None:
            self._read(previous)

    def _drain(self) -> None:
        """Read the step in flight; after trust steps the rows take their state back from the device."""
        previous, self._inflight = self._inflight, None
        self._read(previous)
        if previous.kind == "trust":
            self._trust.store(list(self.rows.items()))

    def _read(self, step: "_Inflight") -> None:
        """The host's work on a queued step, for the rows that were in it and are still in flight: AR tokens, or each
        trust row's record (``trust_overlap.apply_record``)."""
        if step.ready is not None:
            step.ready.synchronize()
        values = step.host.tolist()
        live = [(slot, row) for slot, row in step.rows if self.rows.get(slot) is row]
        for _, row in live:
            row.forwards += 1
        if step.kind == "ar":
            modes.apply_ar_tokens([row for _, row in live], [values[slot] for slot, _ in live])
        else:
            for slot, row in live:
                trust_overlap.apply_record(row, values[slot], row.block)
        self._retire()

    # -- one step at a time -------------------------------------------------------------------------------------
    def _forward(self) -> None:
        if self._inflight is not None:
            self._drain()
        self._ar_inputs = None  # the upload below reuses the buffers those views point to
        plans = {slot: modes.plan(row) for slot, row in self.rows.items()}
        wc = max(len(p[0]) for p in plans.values())
        ww = max(len(p[1]) for p in plans.values())
        ids, counts, wlen, commit, seen = self.inputs.upload(plans, wc, ww)
        anchored = any(p[3] and p[1] for p in plans.values())
        logits = self.backend.step(ids, counts, wlen, commit, wc, seen if anchored else None)
        self.steps += 1
        groups: dict[tuple, list[Row]] = {}
        for row in self.rows.values():
            row.forwards += 1
            groups.setdefault(modes.group_key(row), []).append(row)
        for rows in groups.values():
            modes.update(rows, logits, wc, rows[0].sampler, self._rows_index([r.slot for r in rows]))
        late = [row.slot for row in self.rows.values() if row.commit_late]  # full accepts: commit after all
        for slot in late:
            self.rows[slot].commit_late = False
        self.backend.finish_step(self._slot_mask(late) if late else None)
        self._retire()

    def _retire(self) -> None:
        """Results of the finished rows leave; their slots are freed."""
        finished = [s for s, r in self.rows.items() if r.finish is not None]
        if finished:
            self.backend.check()  # no result leaves if a kernel flagged its outputs
        for slot in finished:
            row = self.rows.pop(slot)
            self.done[row.index] = row.result()
            self.backend.release(slot)
            self.free.append(slot)

    def _rows_index(self, slots: list[int]) -> slice | torch.Tensor:
        """Where a group's rows sit in the step's logits: a slice when the slots are consecutive (no copy), else a
        device index tensor, cached by slot tuple (groups are stable between joins and leaves: no upload per step)."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        key = tuple(slots)
        idx = self._index_cache.get(key)
        if idx is None:
            if len(self._index_cache) > 256:
                self._index_cache.clear()
            idx = self._index_cache[key] = torch.tensor(slots, dtype=torch.long, device=self.device)
        return idx

    def _slot_mask(self, slots: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.concurrency, dtype=torch.bool)
        mask[slots] = True
        return mask.to(self.device)

    def run(self) -> list[RequestResult]:
        """Step until every submitted request is finished; results in submission order."""
        while self.busy:
            self.step()
        return [self.done[i] for i in range(self.submitted)]


class _Inflight:
    """An overlapped step queued on the device: ``kind`` ('ar' or 'trust'), an AR step's ``tokens`` [C] (device),
    the ``host`` copy of its tokens or of the trust record (pinned on CUDA), the event after that copy (None off
    CUDA) and the (slot, row) pairs it ran for."""

    __slots__ = ("kind", "tokens", "host", "ready", "rows")

    def __init__(self, kind, tokens, host, rows):
        self.kind, self.tokens, self.host, self.ready, self.rows = kind, tokens, host, None, rows
