"""CUDA graphs for the static step: one graph per (Wc, Ww) shape, captured on first use and replayed after."""

from __future__ import annotations

import torch

from flarectl.engine.static_step import StaticStep


class GraphedStep:
    """Same call as ``StaticStep``; inputs are copied into the graph's static buffers, the output is the graph's
    static logits tensor (valid until the next call)."""

    def __init__(self, step: StaticStep):
        self.step = step
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _capture(self, wc: int, ww: int):
        lengths = self.step.cache.lengths
        rows, dev = lengths.shape[0], lengths.device
        bufs = dict(ids=torch.zeros(rows, wc + ww, dtype=torch.long, device=dev),
                    counts=torch.zeros(rows, dtype=torch.long, device=dev),
                    wlen=torch.zeros(rows, dtype=torch.long, device=dev),
                    commit=torch.zeros(rows, dtype=torch.bool, device=dev),
                    seen=torch.zeros(rows, dtype=torch.long, device=dev))
        # warm-up runs commit nothing (counts 0, commit False): the slot cache is left as it was
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(**bufs, width_clean=wc)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(**bufs, width_clean=wc)
        return graph, bufs, out

    def __call__(self, ids, counts, wlen, commit, width_clean: int, seen=None) -> torch.Tensor:
        key = (width_clean, ids.shape[1] - width_clean)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(*key)
            except Exception as exc:  # noqa: BLE001 - a compiled step that cannot be captured: capture it eager
                if not getattr(self.step, "compiled", False):
                    raise
                self.step.fallback_eager(f"CUDA graph capture of the compiled step failed: {exc}")
                torch.cuda.synchronize()
                self.graphs[key] = self._capture(*key)
        graph, bufs, out = self.graphs[key]
        bufs["ids"].copy_(ids)
        bufs["counts"].copy_(counts)
        bufs["wlen"].copy_(wlen)
        bufs["commit"].copy_(commit)
        bufs["seen"].copy_(counts if seen is None else seen)
        graph.replay()
        return out
