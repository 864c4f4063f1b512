"""L2 weight prefetch on a side stream: a hint that pulls the next GEMM's weights into L2 while the current GEMM
and the small kernels between GEMMs run (issue 6, session 6).

At M = 8 a decode step's per-layer GEMMs are 8-50 MB each and reach only 0.7-1.8 TB/s one launch at a time (the
fixed cost per launch; docs/perf/engine.md), and the ~400 small kernels between them leave the memory idle. Here,
before GEMM j, the capturing stream forks onto a side stream (``side.wait_stream(main)``: the side stream may run
once the main stream has reached GEMM j) which issues L2 prefetches of (the first ``nbytes`` of) the weight of
GEMM j+1; the side stream is joined back once, at the end of the step (``join``). Nothing reads what the
prefetch writes (the ``token`` buffer, only for the 'load' method): it changes timing, never values.

Methods (``METHODS``): 'bulk' (Hopper's ``cp.async.bulk.prefetch.L2.global``: one instruction per ``CHUNK`` bytes,
no registers, no SM time to speak of), 'line' (``prefetch.global.L2`` per 128-byte line), 'line_last' (the same
with ``::evict_last``), 'load' (plain loads, their XOR stored in ``token``: portable, the only ones Triton's
interpreter runs; 4 KB per program and iteration), 'load_wide' (the same, 64 KB per program and iteration, 8
warps: more bytes in flight).

Measured on an H100 (docs/perf/engine.md, session 6): it does not pay — the step is no faster with any method or
budget, so ``StaticStep`` leaves it off by default (``prefetch_mb=0``).

``l2_prefetch`` (the op ``flarectl::l2_prefetch``) is opaque to torch.compile and capturable in a CUDA graph; it
does nothing off CUDA (and under the interpreter only the 'load' kernel runs, on the current stream).
"""

from __future__ import annotations

import os

import torch

METHODS = ("bulk", "line", "line_last", "load", "load_wide")
CHUNK = 16384
"""Bytes per bulk prefetch instruction ('bulk')."""
LINE = 128
"""Bytes per prefetched line ('line', 'line_last')."""

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KERNELS = None
_SIDE: dict[int, torch.cuda.Stream] = {}
_FORKED: set[int] = set()
"""Devices whose side stream has prefetches not yet joined (``join`` waits only then: a capture must not wait on
work recorded outside it)."""


def _kernels():
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def bulk_kernel(base, nchunks, per_prog, last_size, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        start = pid * per_prog
        end = tl.minimum(start + per_prog, nchunks)
        for i in range(0, per_prog, BLOCK):
            idx = tl.minimum(start + i + tl.arange(0, BLOCK), end - 1)
            addr = base + idx.to(tl.int64) * CHUNK
            size = tl.where(idx == nchunks - 1, last_size, CHUNK).to(tl.int32)
            tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                      [addr, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def line_kernel(base, nlines, per_prog, LINE: tl.constexpr, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr):
        pid = tl.program_id(0)
        start = pid * per_prog
        end = tl.minimum(start + per_prog, nlines)
        for i in range(0, per_prog, BLOCK):
            idx = tl.minimum(start + i + tl.arange(0, BLOCK), end - 1)
            addr = base + idx.to(tl.int64) * LINE
            if EVICT_LAST:
                tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                                          dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                                          dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def load_kernel(w, n, per_prog, token, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        start = pid * per_prog
        end = tl.minimum(start + per_prog, n)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(0, per_prog, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            acc = acc ^ tl.load(w + offs, mask=offs < end, other=0)
        tl.store(token + pid, tl.xor_sum(acc, 0))

    _KERNELS = (bulk_kernel, line_kernel, load_kernel)
    return _KERNELS


def words(w: torch.Tensor, nbytes: int | None = None) -> torch.Tensor:
    """The first ``nbytes`` (all if None) of a contiguous tensor as int32 words (a view; a tail of < 4 bytes is
    left out)."""
    flat = w.detach().reshape(-1).view(torch.uint8)
    flat = flat[:flat.numel() // 4 * 4].view(torch.int32)
    n = flat.numel() if nbytes is None else min(flat.numel(), nbytes // 4)
    return flat[:n]


def launch(w: torch.Tensor, method: str, grid: int, token: torch.Tensor | None = None) -> None:
    """Prefetch all of ``w`` (contiguous; pass a prefix view to limit the bytes) into L2 on the current stream.
    'load' writes one int32 per program into ``token`` (>= ``grid`` elements)."""
    bulk_kernel, line_kernel, load_kernel = _kernels()
    nbytes = w.numel() * w.element_size()
    if nbytes == 0:
        return
    if method in ("load", "load_wide"):
        x = words(w)
        block, warps = (1024, 4) if method == "load" else (16384, 8)
        per = -(-x.numel() // grid)
        per = -(-per // block) * block
        load_kernel[(-(-x.numel() // per),)](x, x.numel(), per, token, BLOCK=block, num_warps=warps)
        return
    base = w.data_ptr()
    if method == "bulk":
        nbytes = nbytes // 16 * 16  # the bulk copy's sizes are multiples of 16 bytes
        if nbytes == 0 or base % 16:
            return
        n = -(-nbytes // CHUNK)
        per = -(-n // grid)
        bulk_kernel[(-(-n // per),)](base, n, per, nbytes - (n - 1) * CHUNK, CHUNK=CHUNK, BLOCK=32, num_warps=1)
        return
    n = -(-nbytes // LINE)
    per = -(-n // grid)
    line_kernel[(-(-n // per),)](base, n, per, LINE=LINE, BLOCK=128, num_warps=4,
                                 EVICT_LAST=method == "line_last")


def _side(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE.get(idx)
    if s is None:
        with torch.cuda.device(idx):
            s = _SIDE[idx] = torch.cuda.Stream()
    return s


def _prefetch(x: torch.Tensor, w: torch.Tensor, token: torch.Tensor, method: str, grid: int) -> None:
    if not w.is_cuda:
        if _INTERPRET and method in ("load", "load_wide"):  # tests: the portable kernel's logic, on the current stream
            launch(w, method, grid, token)
        return
    main = torch.cuda.current_stream(w.device)
    side = _side(w.device)
    side.wait_stream(main)  # fork: the prefetch may start once the main stream reaches this point
    with torch.cuda.stream(side):
        launch(w, method, grid, token)
    _FORKED.add(side.device_index)


@torch.library.custom_op("flarectl::l2_prefetch", mutates_args=("token",))
def l2_prefetch(x: torch.Tensor, w: torch.Tensor, token: torch.Tensor, method: str, grid: int) -> None:
    """Prefetch ``w`` (a contiguous view: the bytes to pull) into L2 on the side stream, forked from the current
    stream at this point (``x``: only an ordering dependency, e.g. the input of the GEMM running now). A hint:
    writes nothing anyone reads (``token``: scratch of the 'load' method). Join with ``join`` before the end of
    the step / capture."""
    _prefetch(x, w, token, method, grid)


@l2_prefetch.register_fake
def _(x, w, token, method, grid):
    return None


def join(device: torch.device) -> None:
    """Make the current stream wait for the side stream's prefetches (required before a capture ends)."""
    if device.type != "cuda":
        return
    side = _side(device)
    if side.device_index in _FORKED:
        _FORKED.discard(side.device_index)
        torch.cuda.current_stream(device).wait_stream(side)


def plan(weights: list[torch.Tensor], nbytes: int) -> list[torch.Tensor]:
    """Prefix views (at most ``nbytes`` each) of each weight in GEMM order, to prefetch one GEMM ahead."""
    return [words(w, nbytes) for w in weights]
