"""L2 prefetch of the next GEMM's weights from inside the kernel that runs before it (issue 6): hints, no values.

At M = 8 every projection launch of a decode step pays ~1 us of launch gap, 1.5-3.3 us before its first weight tiles
arrive and 0.5-2.3 us of tail (H100, session 8's launch anatomy, docs/perf/engine.md), ~4 us a launch over its
bytes at copy bandwidth. Each program of a GEMM streams its rows of the weight from K = 0 (from each split's first K
with split-K), so the first bytes of every row (of every split) are what the whole next launch waits for first. Here
the launch before it issues ``prefetch.global.L2::evict_last`` for them, each program its share of the 128-byte
lines, one line per thread and instruction, at its start or (the default) once its own work is stored, when the
memory is idle in its tail, the launch gap and the split-K reduce. Nothing waits on a prefetch and no value changes.

* ``ROW_BYTES`` (env ``FLARECTL_ENGINE_L2_NEXT_ROW_BYTES``, read at import; 0, the default: off): bytes of each row
  (of each split) of the next weight; ``KB`` (``FLARECTL_ENGINE_L2_NEXT_KB``): at most this much per launch, rows
  in order; ``AT_END`` (``FLARECTL_ENGINE_L2_NEXT_AT`` = 'end' | 'start').
* Which weight follows which: ``register`` (``StaticStep`` at build: gate|up -> down, down -> the next layer's input
  projection or the LM head, out_proj -> gate|up), looked up by the launching kernel (``plan``) from the weight it
  reads, so the projections' ops keep their signatures. The splits of the next weight's GEMM are those its last
  launch used (``note_split``); before any, its first split only.
* ``STATE`` (env ``FLARECTL_ENGINE_L2_NEXT_STATE=1``): each GDN layer's input projection also prefetches the
  layer's recurrent state, which the mixer reads next (``register_whole``).
* ``lines`` is the jitted helper the kernels call (the GDN mixer's prefetch of out_proj and gate|up uses it too,
  ``mixer.L2_NEXT_KB``).

Off under Triton's interpreter (no inline PTX there) and off CUDA. Timed in session 24 (H100) and off by default:
512 bytes a row gave AR 2.035 ms against 2.018, and the state prefetch AR 1.996 against 2.028 but trust 2.749
against 2.700 (docs/perf/engine.md).
"""

from __future__ import annotations

import os

import torch

from flarectl.engine.envs import env_int

LINE = 128
"""Bytes per prefetched line."""

ROW_BYTES: int = env_int("FLARECTL_ENGINE_L2_NEXT_ROW_BYTES", 0, low=0, high=1 << 16)
"""Bytes of every row (of every split) of the next GEMM's weight a projection launch prefetches (0: off)."""

KB: int = env_int("FLARECTL_ENGINE_L2_NEXT_KB", 8192, low=1, high=1 << 20)
"""At most this many KB per launch (rows in order): the LM head's 248,320 rows x 512 bytes would be 121 MB."""

AT_END = os.environ.get("FLARECTL_ENGINE_L2_NEXT_AT", "end").strip().lower() != "start"
"""Issue the prefetches once the program's own results are stored (True) or as it starts."""

STATE = os.environ.get("FLARECTL_ENGINE_L2_NEXT_STATE", "0").strip().lower() in ("1", "true", "yes", "on")
"""Each GDN layer's input projection also prefetches the layer's recurrent state (at most ``KB``), which the
mixer reads right after it (env ``FLARECTL_ENGINE_L2_NEXT_STATE=1``; off). The mixer reads its 8.4 MB (C = 8) at
~1.3 TB/s; session 18's side-stream state prefetch cost 0.11-0.13 ms, but it ran beside the projection, not in
its tail."""

_NEXT: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
"""data_ptr of a weight -> (that weight, the next GEMM's weight): both held, so no address is reused while
registered."""
_SPLITS: dict[int, tuple[int, int]] = {}
_WHOLE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
"""data_ptr of a weight -> (that weight, a contiguous tensor its launch prefetches from the start: a GDN state)."""

OFF = (0, 1, 0, 1, 0)
"""``plan``'s line layout when nothing is prefetched: (lines, per_row, row_stride, segments, segment_stride)."""


def register(weights: list[torch.Tensor | None]) -> int:
    """The weights of consecutive GEMMs, in launch order: each one's launch will prefetch the next one's rows
    (a None breaks the chain). Returns the pairs registered."""
    pairs = 0
    for a, b in zip(weights, weights[1:]):
        if a is not None and b is not None and b.dim() == 2 and b.stride(1) == 1:
            _NEXT[a.data_ptr()] = (a, b)
            pairs += 1
    return pairs


def register_whole(w: torch.Tensor, t: torch.Tensor) -> int:
    """A launch over ``w`` will prefetch ``t`` (contiguous) from its start, at most ``KB``. Returns 1 (0 if ``t`` is
    not contiguous)."""
    if not t.is_contiguous():
        return 0
    _WHOLE[w.data_ptr()] = (w, t)
    return 1


def clear() -> None:
    """Forget every registered pair, whole tensor and split."""
    _NEXT.clear()
    _WHOLE.clear()
    _SPLITS.clear()


def note_split(w: torch.Tensor, split: int, per: int) -> None:
    """The K splits (``split`` of ``per`` elements) the last launch over ``w`` used."""
    _SPLITS[w.data_ptr()] = (split, per)


def layout(nxt: torch.Tensor, row_bytes: int, kb: int) -> tuple[int, int, int, int, int]:
    """(lines, lines per row segment, row stride, segments per row, segment stride), strides in bytes: the first
    ``row_bytes`` of each of ``nxt``'s rows (of each K split its GEMM last used), rows in order while ``kb`` KB
    last."""
    elem = nxt.element_size()
    row_stride = nxt.stride(0) * elem
    split, per = _SPLITS.get(nxt.data_ptr(), (1, nxt.shape[1]))
    seg_stride = per * elem
    last = (nxt.shape[1] - (split - 1) * per) * elem  # the last split may be shorter: no line past a row's end
    per_row = -(-min(row_bytes, seg_stride, last) // LINE)
    rows = min(nxt.shape[0], kb * 1024 // (per_row * split * LINE))
    return rows * per_row * split, per_row, row_stride, split, seg_stride


def whole_layout(t: torch.Tensor, kb: int) -> tuple[int, int, int, int, int]:
    """The line layout of ``t``'s first ``kb`` KB (all of it at most), contiguous: one row of lines."""
    n = -(-min(t.numel() * t.element_size(), kb * 1024) // LINE)
    return n, max(n, 1), 0, 1, 0


def plan(w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
    """(the tensor to prefetch from, its line layout) for a launch over ``w``: the registered next weight's row
    prefixes (``ROW_BYTES``), else the registered whole tensor (``STATE``), else (``w``, ``OFF``): also when off
    CUDA or interpreted."""
    if not w.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return w, OFF
    entry = _NEXT.get(w.data_ptr()) if ROW_BYTES else None
    if entry is not None and entry[0].shape == w.shape:
        return entry[1], layout(entry[1], ROW_BYTES, KB)
    entry = _WHOLE.get(w.data_ptr()) if STATE else None
    if entry is not None and entry[0].shape == w.shape:
        return entry[1], whole_layout(entry[1], KB)
    return w, OFF


def kernel_args(w: torch.Tensor, warps: int) -> dict:
    """The prefetch's kernel arguments for a launch over ``w`` with ``warps`` warps (the kernels' ``nx*`` and
    ``NX*`` parameters)."""
    nxt, (n, per_row, row_stride, segs, seg_stride) = plan(w)
    return dict(nx=nxt, n_nx=n, row_nx=per_row, stride_nx=row_stride, seg_nx=segs, segstride_nx=seg_stride,
                NX=n > 0, NX_END=AT_END, NXB=32 * warps)


OFFLINE_TYPES = dict(nx="*bf16", n_nx="i32", row_nx="i32", stride_nx="i32", seg_nx="i32", segstride_nx="i32")
"""The prefetch's runtime arguments as Triton signature types (offline compiles of the projection kernels)."""


def offline_consts(on: bool = False, at_end: bool = True, warps: int = 4) -> dict:
    """The prefetch's constexprs for an offline compile of a projection kernel."""
    return dict(NX=on, NX_END=at_end, NXB=32 * warps)


_LINES = None


def lines():
    """The jitted helper ``lines(base, n, per_row, row_stride, segs, seg_stride, LINE, LB)``: this program's share
    of n LINE-byte lines into L2, line i at byte r * row_stride + s * seg_stride + c * LINE from ``base`` with
    (r, s, c) = i's row, segment and line within the segment (``per_row`` lines a segment, ``segs`` a row)."""
    global _LINES
    if _LINES is not None:
        return _LINES
    import triton
    import triton.language as tl

    @triton.jit
    def line_share(n):
        # [start, end) of the n lines for this program (programs of a 1-D or 2-D grid in order)
        per = tl.cdiv(n, tl.num_programs(0) * tl.num_programs(1))
        start = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * per
        return start, tl.minimum(start + per, n)

    @triton.jit
    def line_offset(idx, per_row, row_stride, segs, seg_stride, LINE: tl.constexpr):
        # byte offset of line idx: its row, its segment in the row, its line in the segment
        seg = idx // per_row
        return ((seg // segs).to(tl.int64) * row_stride + (seg % segs).to(tl.int64) * seg_stride
                + (idx % per_row).to(tl.int64) * LINE)

    globals().update(line_share=line_share, line_offset=line_offset)

    @triton.jit
    def l2_lines(base, n, per_row, row_stride, segs, seg_stride, LINE: tl.constexpr, LB: tl.constexpr):
        start, end = line_share(n)
        p = base.to(tl.pointer_type(tl.int8), bitcast=True)
        for i in range(start, end, LB):
            off = line_offset(tl.minimum(i + tl.arange(0, LB), end - 1), per_row, row_stride, segs, seg_stride, LINE)
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                                      [p + off], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def record_kernel(out, n, per_row, row_stride, segs, seg_stride, LINE: tl.constexpr, LB: tl.constexpr):
        # tests: l2_lines' walk with each line's byte offset stored at out[line] instead of prefetched
        start, end = line_share(n)
        for i in range(start, end, LB):
            idx = tl.minimum(i + tl.arange(0, LB), end - 1)
            tl.store(out + idx, line_offset(idx, per_row, row_stride, segs, seg_stride, LINE))

    _LINES = l2_lines
    global _RECORD
    _RECORD = record_kernel
    return _LINES


_RECORD = None


def record_offsets(layout_: tuple[int, int, int, int, int], grid: tuple[int, ...], lb: int = 128) -> torch.Tensor:
    """Tests (Triton's interpreter): the byte offsets ``l2_lines`` would prefetch for a line layout (``layout``'s
    tuple) on ``grid`` programs, one per line in line order (-1 where no program reached it)."""
    lines()
    n, per_row, row_stride, segs, seg_stride = layout_
    out = torch.full((max(n, 1),), -1, dtype=torch.int64)
    _RECORD[grid](out, n, per_row, row_stride, segs, seg_stride, LINE=LINE, LB=lb)
    return out[:n]
