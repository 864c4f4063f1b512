"""Slot backends: where the engine's C slots live and how one step runs on them.

Every backend has ``prefill(slots, contexts)``, ``release(slot)``,
``step(ids [C, Wc+Ww], counts [C], wlen [C], commit [C], width_clean, seen [C] or None) -> logits [C, Wc+Ww, V]``
with the contract of ``StaticStep`` (see there; ``seen``: the clean tokens each window sees, None = ``counts``), and ``finish_step(rows [C] bool or None, copy_kernel=None)``, called once after every step, which
also commits that step's clean tokens for ``rows`` (a decision taken from the step's logits: AR-Trust's full
accepts; None: no such row, which costs the static backend nothing; ``copy_kernel``: the static backend's masked row
copy, ``row_copy.copy_rows``' ``kernel``). Three implementations give the same logits:

* ``SlotBackend`` — static slot cache + ``StaticStep`` (CUDA graphs on CUDA): the fast path.
* ``AdapterBackend`` — the same ``HybridCache`` driven through ``model.forward`` and ``HybridCache.commit`` (the
  adapter's pending path): works for any model exposing ``forward``/``new_cache`` (e.g. wrapped test models).
* ``RecomputeBackend`` — no cache at all: every step re-forwards each slot's whole sequence (``use_cache=False``).

The two reference backends need every window of a step to be full width (one block size per step).
"""

from __future__ import annotations

import torch

from flarectl.decoding.runner import CachedRunner, pad_rows, step_layout
from flarectl.engine.static_step import StaticStep
from flarectl.models.cache import HybridCache


def prefill_into(model, cache: HybridCache, slots: list[int], contexts: list[list[int]]) -> None:
    """Empty ``slots`` of ``cache`` and commit ``contexts`` (token lists, may be empty) into them, in place."""
    dev = cache.lengths.device
    idx = torch.tensor(slots, dtype=torch.long, device=dev)
    cache.lengths[idx] = 0
    for c in cache.gdn.values():
        c.state[idx] = 0
        c.conv[idx] = 0
    todo = [(s, ctx) for s, ctx in zip(slots, contexts) if ctx]
    if not todo:
        return
    span = max(len(ctx) for _, ctx in todo)
    runner = CachedRunner(model, len(todo), span + 1)
    ids, counts = pad_rows([ctx for _, ctx in todo], dev)
    runner.forward(ids, counts, None, commit=True)
    tmp, idx = runner.cache, torch.tensor([s for s, _ in todo], dtype=torch.long, device=dev)
    for i, kv in cache.attention.items():
        kv.key[idx, :, :span] = tmp.attention[i].key[:, :, :span].to(kv.key.dtype)
        kv.value[idx, :, :span] = tmp.attention[i].value[:, :, :span].to(kv.value.dtype)
    for i, c in cache.gdn.items():
        c.state[idx] = tmp.gdn[i].state.to(c.state.dtype)
        c.conv[idx] = tmp.gdn[i].conv.to(c.conv.dtype)
    cache.lengths[idx] = tmp.lengths


PREFILL_CHUNK = 64
"""Prompt tokens per slot and prefill step of the static backend (one compiled shape [C, 64] when compiled)."""


class SlotBackend:
    """Static slot cache of ``slots`` x ``capacity`` tokens, stepped by ``StaticStep`` (graphed on CUDA;
    ``compile``: torch.compile the step's pieces before capture, default on for CUDA; ``fuse``: one GEMM per group
    of projections that read the same input, default = ``compile``). ``prefill``: 'static' (default: prompts go
    through the same static step, ungraphed, ``PREFILL_CHUNK`` tokens per step) or 'adapter' (``prefill_into``, the
    adapter path; its reference twin). ``compile_mode``, ``gemv``, ``prefetch_*``,
    ``fuse_down``, ``pdl``, ``attn_kernel``, ``fuse_norm``, ``layer_chain``: see ``StaticStep``."""

    name = "static"

    def __init__(self, model, slots: int, capacity: int, *, cuda_graphs: bool | None = None,
                 gdn_kernel: str = "auto", compile: bool | None = None, fuse: bool | None = None,
                 prefill: str = "static", compile_mode: str | None = None, gemv: bool | None = None,
                 prefetch_mb: float | None = None, prefetch_method: str | None = None,
                 fuse_down: bool | None = None, pdl: bool | None = None, attn_kernel: bool | None = None,
                 fuse_norm: bool | None = None, layer_chain: bool | None = None,
                 prefetch_state: str | None = None, prefetch_state_lead: int | None = None,
                 attn_core: bool | None = None):
        if prefill not in ("static", "adapter"):
            raise ValueError(f"prefill must be static or adapter; got {prefill!r}")
        self.model = model
        self.capacity = capacity
        self.prefill_path = prefill
        self.cache = model.new_cache(slots, capacity)
        eager = StaticStep(model, self.cache, gdn_kernel=gdn_kernel, compile=compile, fuse=fuse,
                           compile_mode=compile_mode, gemv=gemv, prefetch_mb=prefetch_mb,
                           prefetch_method=prefetch_method, fuse_down=fuse_down, pdl=pdl,
                           attn_kernel=attn_kernel, fuse_norm=fuse_norm, layer_chain=layer_chain,
                           prefetch_state=prefetch_state, prefetch_state_lead=prefetch_state_lead,
                           attn_core=attn_core)
        self.eager = eager
        self.gdn_kernel = eager.kernel
        use_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs:
            from flarectl.engine.graphs import GraphedStep

            self._step = GraphedStep(eager)
        else:
            self._step = eager
        self.cuda_graphs = bool(use_graphs)

    @property
    def compiled(self) -> bool:
        return self.eager.compiled

    def prefill(self, slots: list[int], contexts: list[list[int]]) -> None:
        if self.prefill_path == "adapter":
            prefill_into(self.model, self.cache, slots, contexts)
        else:
            self.eager.prefill(slots, contexts, PREFILL_CHUNK)

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0

    def step(self, ids, counts, wlen, commit, width_clean: int, seen=None) -> torch.Tensor:
        return self._step(ids, counts, wlen, commit, width_clean, seen=seen)

    def finish_step(self, rows: torch.Tensor | None, copy_kernel: bool | None = None) -> None:
        if rows is not None:
            self.eager.commit_last(rows, copy_kernel)

    def check(self) -> None:
        """Raise ``FlareError`` if the step's device kernels flagged wrong outputs (``StaticStep.check``)."""
        self.eager.check()

    @torch.no_grad()
    def warmup(self, shapes: list[tuple[int, int]]) -> None:
        """Run (and on CUDA capture) each (Wc, Ww) step shape once, and compile the prefill shape, with nothing
        committed: the cache is unchanged."""
        rows, dev = self.cache.batch_size, self.cache.lengths.device
        zeros = torch.zeros(rows, dtype=torch.long, device=dev)
        for wc, ww in shapes:
            ids = torch.zeros(rows, wc + ww, dtype=torch.long, device=dev)
            self.step(ids, zeros, zeros, zeros.bool(), wc)
        if self.prefill_path == "static" and self.eager.compiled:  # compile the prefill shape too (not graphed)
            ids = torch.zeros(rows, PREFILL_CHUNK, dtype=torch.long, device=dev)
            self.eager(ids, zeros, zeros, zeros.bool(), PREFILL_CHUNK, logits=False)


def _check_full_windows(wlen: torch.Tensor, width: int) -> None:
    if width and bool(((wlen > 0) & (wlen != width)).any()):
        raise ValueError("the reference backends need one block size per step (all windows of equal width)")


class AdapterBackend:
    """The slot cache driven through ``model.forward`` (pending path) and ``HybridCache.commit``."""

    name = "adapter"

    def __init__(self, model, slots: int, capacity: int):
        self.model = model
        self.capacity = capacity
        self.cache = model.new_cache(slots, capacity)

    def check(self) -> None:
        """Nothing to check: no kernel here flags its outputs."""

    def prefill(self, slots: list[int], contexts: list[list[int]]) -> None:
        prefill_into(self.model, self.cache, slots, contexts)

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0

    def step(self, ids, counts, wlen, commit, width_clean: int, seen=None) -> torch.Tensor:
        ww = ids.shape[1] - width_clean
        _check_full_windows(wlen, ww)
        pad = 1 if ww and width_clean == 0 else 0  # the pending GDN path needs a clean column before a window
        if pad:
            ids = torch.cat([ids.new_zeros(ids.shape[0], 1), ids], 1)
        layout = step_layout(self.cache.lengths, counts, width_clean + pad, ww, seen)
        logits = self.model(ids, layout, self.cache, commit_all=False)
        self._last = (counts, commit)
        return logits[:, pad:]

    def finish_step(self, rows: torch.Tensor | None, copy_kernel: bool | None = None) -> None:
        counts, commit = self._last
        self.cache.commit(torch.where(commit if rows is None else commit | rows, counts, 0))


class RecomputeBackend:
    """No cache: each step re-forwards every occupied slot's committed tokens plus the step's tokens."""

    name = "recompute"

    def __init__(self, model, slots: int, capacity: int):
        self.model = model
        self.capacity = capacity
        self.committed: list[list[int] | None] = [None] * slots

    def check(self) -> None:
        """Nothing to check: no kernel here flags its outputs."""

    def prefill(self, slots: list[int], contexts: list[list[int]]) -> None:
        for s, ctx in zip(slots, contexts):
            self.committed[s] = list(ctx)

    def release(self, slot: int) -> None:
        self.committed[slot] = None

    def step(self, ids, counts, wlen, commit, width_clean: int, seen=None) -> torch.Tensor:
        wc, ww = width_clean, ids.shape[1] - width_clean
        _check_full_windows(wlen, ww)
        rows = [s for s, c in enumerate(self.committed) if c is not None]
        out = torch.zeros(ids.shape[0], ids.shape[1], 0, device=ids.device)
        self._last = ([], [], [])
        if not rows:
            return out
        counts_l = counts.tolist()
        full = [self.committed[s] + ids[s, :counts_l[s]].tolist() for s in rows]
        padded, lengths = pad_rows(full, ids.device)
        sel = torch.tensor(rows, device=ids.device)
        sees = lengths if seen is None else lengths - (counts - seen)[sel]  # each window's visible prefix
        if ww and bool((sees == 0).any()):
            raise ValueError("the recompute backend needs a clean token before every window")
        layout = step_layout(torch.zeros_like(lengths), lengths, padded.shape[1], ww, sees)
        logits = self.model(torch.cat([padded, ids[sel, wc:]], 1), layout)
        base = torch.tensor([len(self.committed[s]) for s in rows], device=ids.device)
        cols = (base[:, None] + torch.arange(wc, device=ids.device)).clamp(max=max(padded.shape[1] - 1, 0))
        clean = logits.gather(1, cols[:, :, None].expand(-1, -1, logits.shape[-1]))
        out = logits.new_zeros(ids.shape[0], ids.shape[1], logits.shape[-1])
        out[sel] = torch.cat([clean, logits[:, padded.shape[1]:]], 1)
        self._last = (rows, full, commit[sel].tolist())
        return out

    def finish_step(self, rows_mask: torch.Tensor | None, copy_kernel: bool | None = None) -> None:
        rows, full, commit = getattr(self, "_last", ([], [], []))
        extra = [False] * len(self.committed) if rows_mask is None else rows_mask.tolist()
        for s, f, c in zip(rows, full, commit):
            if c or extra[s]:
                self.committed[s] = f
        self._last = ([], [], [])


BACKENDS = {"static": SlotBackend, "adapter": AdapterBackend, "recompute": RecomputeBackend}


def make_backend(kind: str, model, slots: int, capacity: int, **kw):
    """kind: 'auto' (static for a FlareModel, else adapter), 'static', 'adapter' or 'recompute'."""
    if kind == "auto":
        from flarectl.models.adapter import FlareModel

        kind = "static" if isinstance(model, FlareModel) else "adapter"
    if kind not in BACKENDS:
        raise ValueError(f"engine backend must be one of auto, {', '.join(BACKENDS)}; got {kind!r}")
    return BACKENDS[kind](model, slots, capacity, **(kw if kind == "static" else {}))
