"""Skinny GEMMs for decode steps: ``y[M, N] = x[M, K] @ w[N, K]^T`` with M <= ``MAX_ROWS`` (a few tokens).

At M = 8 (an AR step of 8 slots) a projection is a matrix-vector product in all but name: every weight is read
once and used M times, so the time is the weight bytes over the memory bandwidth. cuBLAS reached ~74% of the copy
bandwidth at these shapes on an H100 (docs/perf/engine.md); this is a GEMV-class Triton kernel for them:

* one program per ``BN`` output columns and K split (``SPLIT`` programs share the K range of a column block, so
  projections with few columns, such as 2048, still fill every SM);
* the M <= 64 rows of x ride in one ``tl.dot`` tile (BM = 16, 32 or 64: the next power of two, at least 16),
  accumulated in fp32 (bf16/fp16 inputs; fp32 inputs use IEEE products, no TF32). Up to 16 rows serve AR steps
  (C x 1), up to 64 the trust steps (C x (B clean + B window), e.g. 8 x (4 + 4));
* split-K is **deterministic**: each split writes its fp32 partial [SPLIT, M, N] and a second small kernel sums
  them in a fixed order and casts, or (``Config.inline``, an opt-in tuning candidate, ``INLINE_SPLIT``) the last
  split of each column block to arrive sums them in the same order inside the kernel: the same bits, one launch
  fewer.

The launch configuration (BN, BK, SPLIT, warps, stages) is chosen per (M, N, K, dtype) the first time a shape runs
outside CUDA-graph capture by timing a few candidates and cuBLAS itself (``tune``) the way a decode step runs them:
back to back in a CUDA graph over enough copies of the weight that each launch reads it from HBM (``chain_ms``;
``TUNE_MODE``, env ``FLARECTL_GEMV_TUNE``: ``cold`` one launch at a time after an L2 flush, as before session 8;
``0`` the heuristic ``default_config``), and kept for the process; where cuBLAS is faster the op calls
``F.linear`` for that shape.

``skinny_linear`` (the op ``flarectl::skinny_linear``, opaque to torch.compile and capturable in a CUDA graph,
registered like ``flarectl::gdn_recurrence``) is the fast path; ``skinny_linear_reference`` is its pure-torch
twin with the same signature (fp32 products, cast to x's dtype). On CPU the op runs the twin unless Triton's
interpreter is on (``TRITON_INTERPRET=1``, which the tests use to run the kernel itself at tiny sizes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flarectl.engine import l2_next
from flarectl.engine.envs import env_int

MAX_ROWS = env_int("FLARECTL_GEMV_MAX_ROWS", 64, high=64)
"""Largest M served by the kernel (one dot tile of at most 64 rows); larger inputs go to ``F.linear`` (cuBLAS). Env
``FLARECTL_GEMV_MAX_ROWS`` (read at import) lowers it, e.g. to 16 (sessions 5-9: cuBLAS for every trust step)."""

NAN_FILL = False
"""Tests: allocate outputs and partials NaN-filled, so an element the kernels leave unwritten fails the check."""


@dataclass(frozen=True)
class Config:
    bn: int
    bk: int
    split: int
    warps: int = 4
    stages: int = 4
    inline: bool = False
    """Split-K (``split`` > 1) of a plain product finished inside the kernel (``launch_fused``'s last-arriving split
    sums the partials in split order) instead of by a second reduce launch: the same bits, one launch fewer."""

    @property
    def label(self) -> str:
        """Short form for tables: ``cuBLAS``, or ``BN x BK, split S, W warps, S stages`` (+ ``inline``)."""
        if self.bn == 0:
            return "cuBLAS"
        text = f"{self.bn}x{self.bk} split {self.split} w{self.warps} s{self.stages}"
        return text + " inline" if self.inline else text


INLINE_SPLIT = env_int("FLARECTL_GEMV_INLINE_SPLIT", 0, low=0, high=1)
"""Whether ``tune`` also times each split-K candidate of a plain product with its split finished in the kernel
(``Config.inline``; env ``FLARECTL_GEMV_INLINE_SPLIT=1``). Off until its GPU test has run (built in session 16,
whose device time ran out first): the kernel path is ``launch_fused``'s, GPU-tested with its fusions on."""


def skinny_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The twin: x [M, K] @ w [N, K]^T with fp32 products and sums (fp64 stays fp64), cast to x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc) @ w.to(acc).t()).to(x.dtype)


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once (the interpreter is chosen at import)


def _interpreting() -> bool:
    return _INTERPRET


def kernel_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Shapes and dtypes the Triton kernel takes: x [..., K] with at most MAX_ROWS rows, bf16/fp16/fp32, w [N, K]
    of the same dtype and unit stride along K, on CUDA (or CPU under the interpreter)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and w.dtype == x.dtype and w.dim() == 2 and w.shape[1] == x.shape[-1] and w.stride(1) == 1
            and (x.is_cuda or _interpreting()) and x.device == w.device)


# -- kernels ----------------------------------------------------------------------------------------------------

_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _finish(acc, y, res, offs, mask, RESIDUAL: tl.constexpr):
        out = acc.to(y.dtype.element_ty)
        if RESIDUAL:  # residual + y, both in y's dtype, as eager torch adds them
            r = tl.load(res + offs, mask=mask, other=0.0)
            out = (r.to(tl.float32) + out.to(tl.float32)).to(y.dtype.element_ty)
        tl.store(y + offs, out, mask=mask)

    @triton.jit
    def _w_tile(p_w, n_mask, k_ok, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        if EVEN_K:
            if EVEN_N:
                return tl.load(p_w)
            return tl.load(p_w, mask=n_mask, other=0.0)
        return tl.load(p_w, mask=n_mask & k_ok[:, None], other=0.0)

    @triton.jit
    def _x_tile(p_x, m_mask, k_ok, up_off, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr):
        if EVEN_K:
            a = tl.load(p_x, mask=m_mask, other=0.0)
        else:
            a = tl.load(p_x, mask=m_mask & k_ok[None, :], other=0.0)
        if SWIGLU:  # x = [gate | up] (up at +up_off): silu(gate) * up, rounded as eager torch rounds them
            if EVEN_K:
                u = tl.load(p_x + up_off, mask=m_mask, other=0.0)
            else:
                u = tl.load(p_x + up_off, mask=m_mask & k_ok[None, :], other=0.0)
            gf = a.to(tl.float32)
            a = ((gf / (1.0 + tl.exp(-gf))).to(a.dtype).to(tl.float32) * u.to(tl.float32)).to(a.dtype)
        return a

    @triton.jit
    def _mma(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's bf16 dot is wrong: exact fp32 products of the same bf16 values instead
            return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        if IEEE:
            return acc + tl.dot(a, b, input_precision="ieee")
        return acc + tl.dot(a, b)

    @triton.jit
    def _l2_prefetch(w, rn, N, stride_wn, k_start, k_end, L2_LINES: tl.constexpr, LINE: tl.constexpr):
        """Prefetch into L2 the first L2_LINES lines (LINE elements each) of w[rn, k_start:k_end]: hints only."""
        kl = k_start + tl.arange(0, L2_LINES) * LINE
        rows = tl.minimum(rn, N - 1).to(tl.int64) * stride_wn
        addr = w + rows[:, None] + tl.minimum(kl, k_end - 1)[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)

    # jitted functions resolve the functions they call through their globals (and Triton's interpreter wants
    # triton.language among them when another module's kernel calls these helpers first)
    globals().update(_finish=_finish, _w_tile=_w_tile, _x_tile=_x_tile, _mma=_mma, _l2_prefetch=_l2_prefetch,
                     _l2_next_lines=l2_next.lines(), tl=tl)

    @triton.jit
    def gemv_kernel(x, w, y, M, N, K, stride_xm, stride_wn, k_per_split, res, ws, counter, up_off,
                    nx, n_nx, row_nx, stride_nx, seg_nx, segstride_nx,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                    EVEN_N: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                    PRE: tl.constexpr, TRIGGER: tl.constexpr, L2_LINES: tl.constexpr, LINE: tl.constexpr,
                    NX: tl.constexpr, NX_END: tl.constexpr, NXB: tl.constexpr):
        pid_n = tl.program_id(0)
        if NX and not NX_END:  # the next GEMM's first weight bytes into L2 (``l2_next``; hints)
            _l2_next_lines(nx, n_nx, row_nx, stride_nx, seg_nx, segstride_nx, 128, NXB)
        pid_s = tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        k0 = pid_s * k_per_split
        p_x = x + rm[:, None] * stride_xm + (k0 + rk)[None, :]
        p_w = w + rn[None, :].to(tl.int64) * stride_wn + (k0 + rk)[:, None]  # [BK, BN] tile of w^T
        m_mask = rm[:, None] < M
        n_mask = rn[None, :] < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if PRE > 0:
            # Programmatic dependent launch: this grid may start while the previous kernel still runs. Let the next
            # kernel launch too (TRIGGER 0: now; 1: once this program's loop is done); the first PRE weight tiles do
            # not depend on the previous kernel, so they stream in (and L2_LINES more lines per column are
            # prefetched into L2) before waiting for it (its output is x).
            if PDL and TRIGGER == 0:
                tl.extra.cuda.gdc_launch_dependents()
            rkp = tl.arange(0, PRE * BK)
            kp_ok = (rkp < k_per_split) & ((k0 + rkp) < K)
            b_pre = _w_tile(w + rn[None, :].to(tl.int64) * stride_wn + (k0 + rkp)[:, None], n_mask, kp_ok, False,
                            EVEN_N)
            if PDL and L2_LINES > 0:
                _l2_prefetch(w, rn, N, stride_wn, k0 + PRE * BK, tl.minimum(k0 + k_per_split, K), L2_LINES, LINE)
            if PDL:
                tl.extra.cuda.gdc_wait()
            p_xp = x + rm[:, None] * stride_xm + (k0 + rkp)[None, :]
            acc = _mma(acc, _x_tile(p_xp, m_mask, kp_ok, up_off, False, SWIGLU), b_pre, IEEE, UPCAST)
            p_x += PRE * BK
            p_w += PRE * BK
        for kk in range(PRE * BK, k_per_split, BK):
            k_ok = (k0 + kk + rk) < K
            b = _w_tile(p_w, n_mask, k_ok, EVEN_K, EVEN_N)
            acc = _mma(acc, _x_tile(p_x, m_mask, k_ok, up_off, EVEN_K, SWIGLU), b, IEEE, UPCAST)
            p_x += BK
            p_w += BK
        if PDL and TRIGGER == 1:
            tl.extra.cuda.gdc_launch_dependents()
        out_mask = m_mask & n_mask
        offs = rm[:, None] * N + rn[None, :]
        if PARTIAL:  # fp32 partial of this K split: [SPLIT, M, N]
            tl.store(y + pid_s * M * N + offs, acc, mask=out_mask)
        elif SPLIT > 1:
            # Split-K in one launch: every split stores its fp32 partial; the split that arrives last at this
            # column block's counter sums them all in split order (deterministic), finishes, and resets the counter.
            tl.store(ws + pid_s * M * N + offs, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial stored before the (release) arrival
            arrived = tl.atomic_add(counter + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                acc = tl.load(ws + offs, mask=out_mask, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    acc += tl.load(ws + s * M * N + offs, mask=out_mask, other=0.0, cache_modifier=".cg")
                _finish(acc, y, res, offs, out_mask, RESIDUAL)
                tl.atomic_xchg(counter + pid_n, 0)
        else:
            _finish(acc, y, res, offs, out_mask, RESIDUAL)
        if NX and NX_END:
            _l2_next_lines(nx, n_nx, row_nx, stride_nx, seg_nx, segstride_nx, 128, NXB)

    @triton.jit
    def reduce_kernel(ws, y, total, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        acc = tl.load(ws + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT):  # fixed order: deterministic
            acc += tl.load(ws + s * total + offs, mask=mask, other=0.0)
        tl.store(y + offs, acc.to(y.dtype.element_ty), mask=mask)

    _KERNELS = (gemv_kernel, reduce_kernel)
    return _KERNELS


def _empty(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if NAN_FILL else out


def split_plan(K: int, bk: int, split: int) -> tuple[int, int]:
    """(splits actually used, K per split): K per split a multiple of ``bk``, no split left empty."""
    blocks = -(-K // bk)
    split = max(1, min(split, blocks))
    per = -(-blocks // split) * bk
    return -(-K // per), per


PDL: bool | None = None
"""Programmatic dependent launch of the kernels (Hopper+): each launch lets the next one launch, may start while the
previous kernel runs, streams its first weight tiles (``pdl_plan``; the mixer: its state slice), then waits for it
(``gdc_wait``); the decode-attention kernel waits first; tuning leaves cuBLAS out. None: env
``FLARECTL_ENGINE_PDL=1``, else off. Off because it does not pay on the H100: AR step at C=8 2.311 ms
(replay) with it on the engine's kernels, 2.249 ms with inductor's too, against 2.209-2.222 ms without (session 6);
a chain of 24 layers' four projections, one-wave configurations tuned for it, 1.380 vs 1.381 ms without (session 8,
docs/perf/engine.md). With one preloaded tile outputs are bitwise the same either way. Session 13 added the depth
knobs below; not yet timed on a GPU."""


PDL_PRELOAD_KB = env_int("FLARECTL_ENGINE_PDL_PRELOAD_KB", 0, low=0, high=256)
"""With PDL: weight bytes (KB) each program loads before ``gdc_wait`` — whole BK tiles, at least one (0: one tile,
the session-6 behaviour); env ``FLARECTL_ENGINE_PDL_PRELOAD_KB``."""
PDL_TRIGGER_LATE = env_int("FLARECTL_ENGINE_PDL_TRIGGER_LATE", 0, low=0, high=1)
"""With PDL: 0 lets the next kernel launch as each program starts, 1 once its main loop is done."""
PDL_L2_KB = env_int("FLARECTL_ENGINE_PDL_L2_KB", 0, low=0, high=1024)
"""With PDL: weight bytes (KB) per program prefetched into L2 (after the preloaded tiles) before ``gdc_wait``."""


PDL_INTERPRET = False
"""Tests: interpreted launches take a PDL launch's load order (``pdl_plan``'s tiles loaded first, then the loop) without
its griddepcontrol instructions and L2 prefetches (neither runs off sm_90), so the twin checks its arithmetic."""


PDL_PRELOAD_MAX_BYTES_PER_THREAD = 256
"""Cap on the preloaded tiles: bytes per thread (256 = 64 registers). Offline sm_90 builds (Triton 3.6, session 13)
of the GDN input projection with 64 KB preloaded reached 255 registers and spilled 224 bytes."""


def pdl_plan(cfg: Config, elem: int) -> tuple[int, int, int]:
    """(tiles loaded before ``gdc_wait``, trigger 0/1, L2 lines per column prefetched) for a PDL launch (a power of
    two each, as Triton's ranges need): as many tiles as ``PDL_PRELOAD_KB`` holds, within
    ``PDL_PRELOAD_MAX_BYTES_PER_THREAD``, at least one."""
    tile = cfg.bk * cfg.bn * elem
    cap = min(PDL_PRELOAD_KB * 1024, PDL_PRELOAD_MAX_BYTES_PER_THREAD * 32 * cfg.warps)
    pre = 1
    while (pre * 2) * tile <= cap:
        pre *= 2
    lines = 0
    if PDL_L2_KB:
        want = PDL_L2_KB * 1024 // (cfg.bn * 128)
        lines = 1
        while lines * 2 <= want:
            lines *= 2
    return pre, PDL_TRIGGER_LATE, lines


def use_pdl(device: torch.device, want: bool | None = None) -> bool:
    """Whether launches on ``device`` use programmatic dependent launch: ``want`` (None: ``PDL``, else env
    ``FLARECTL_ENGINE_PDL=1``), and never interpreted, only CUDA sm90+."""
    if want is None:
        want = PDL if PDL is not None else os.environ.get("FLARECTL_ENGINE_PDL", "0").strip().lower() in (
            "1", "true", "yes", "on")
    return (bool(want) and device.type == "cuda" and not _interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def row_block(M: int) -> int:
    """Rows of the dot tile for M rows: the next power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, 1 << (max(M, 1) - 1).bit_length())


_SMEM: dict[str, int] = {}


def smem_bytes(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (opt-in maximum; 160 KB where unknown, e.g. interpreted)."""
    key = str(device)
    if key not in _SMEM:
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        _SMEM[key] = int(getattr(props, "shared_memory_per_block_optin", 0) or 160 * 1024)
    return _SMEM[key]


def fit_stages(stages: int, bm: int, bn: int, bk: int, elem: int, budget: int) -> int:
    """Pipeline stages that fit ``budget`` bytes of shared memory with one [bm, bk] x-tile and one [bk, bn] w-tile
    of ``elem`` bytes each per stage (at least 1: Triton reports what still does not fit)."""
    per_stage = (bm * bk + bk * bn) * elem
    return max(1, min(stages, (budget - 8 * 1024) // per_stage))


def _common(x: torch.Tensor, N: int, even_k: bool, cfg: Config, pdl: bool | None = None, bm: int | None = None) -> dict:
    f32 = x.dtype == torch.float32
    bm = row_block(x.shape[0]) if bm is None else bm
    stages = fit_stages(min(cfg.stages, 2) if f32 else cfg.stages,  # fp32 tiles: 2x smem
                        bm, cfg.bn, cfg.bk, x.element_size(), smem_bytes(x.device))
    out = dict(BM=bm, BN=cfg.bn, BK=cfg.bk, EVEN_K=even_k, EVEN_N=N % cfg.bn == 0, IEEE=f32,
               UPCAST=_interpreting() and not f32, num_warps=cfg.warps, num_stages=stages)
    pdl = use_pdl(x.device, pdl)
    pre, trigger, l2_lines = pdl_plan(cfg, x.element_size()) if pdl or PDL_INTERPRET else (0, 0, 0)
    # PRE > 0 and PDL 0: the PDL launch's load order without the griddepcontrol instructions (tests, interpreted)
    out.update(PDL=int(pdl), PRE=pre, TRIGGER=trigger, L2_LINES=l2_lines if pdl else 0, LINE=128 // x.element_size())
    if pdl:
        out["launch_pdl"] = True
    return out


def launch(x: torch.Tensor, w: torch.Tensor, cfg: Config, pdl: bool | None = None) -> torch.Tensor:
    """The kernel with one launch configuration: x [M, K] (M <= MAX_ROWS), w [N, K] -> [M, N] in x's dtype. Split-K
    is summed by a second small kernel, or (``cfg.inline``) by the last split of each column block."""
    gemv_kernel, reduce_kernel = _kernels()
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    split, per = split_plan(K, cfg.bk, cfg.split)
    if cfg.inline and split > 1:
        return launch_fused(x, w, None, False, cfg, pdl)
    y = _empty((M, N), x.dtype, x.device)
    grid = (-(-N // cfg.bn), split)
    common = _common(x, N, split * per == K, cfg, pdl) | l2_next.kernel_args(w, cfg.warps)
    l2_next.note_split(w, split, per)
    if split == 1:
        gemv_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), per, y, y, y, 0, PARTIAL=False, SWIGLU=False, RESIDUAL=False, SPLIT=1,
                          **common)
        return y
    ws = _empty((split, M, N), torch.float32, x.device)
    gemv_kernel[grid](x, w, ws, M, N, K, x.stride(0), w.stride(0), per, ws, ws, ws, 0, PARTIAL=True, SWIGLU=False,
                      RESIDUAL=False, SPLIT=1, **common)
    block = 1024
    reduce_kernel[(-(-M * N // block),)](ws, y, M * N, SPLIT=split, BLOCK=block, num_warps=4)
    return y


_COUNTERS: dict[str, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n`` arrival counters, kept for the process (and every buffer it ever
    handed out kept alive: CUDA graphs hold their addresses). Each fused launch leaves its counters at zero again
    (the last split resets them), so launches that follow one another on a stream, or in a graph, share it."""
    bufs = _COUNTERS.setdefault(str(device), [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device))
    return bufs[-1]


def launch_fused(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, swiglu: bool,
                 cfg: Config, pdl: bool | None = None) -> torch.Tensor:
    """One launch, split-K finished in the kernel (the last split of a column block sums the fp32 partials in split
    order): x [M, K] (``swiglu``: [M, 2K] = [gate | up], the input is silu(gate) * up), w [N, K], ``residual``
    [M, N] or None -> (residual +) input @ w^T, [M, N] in x's dtype."""
    gemv_kernel, _ = _kernels()
    x = x.contiguous()
    M = x.shape[0]
    K = x.shape[1] // 2 if swiglu else x.shape[1]
    N = w.shape[0]
    split, per = split_plan(K, cfg.bk, cfg.split)
    y = _empty((M, N), x.dtype, x.device)
    grid = (-(-N // cfg.bn), split)
    ws = _empty((split, M, N), torch.float32, x.device) if split > 1 else y
    counter = arrival_counters(x.device, grid[0]) if split > 1 else y
    res = residual.contiguous() if residual is not None else y
    l2_next.note_split(w, split, per)
    gemv_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), per, res, ws, counter, K if swiglu else 0,
                      PARTIAL=False, SWIGLU=swiglu, RESIDUAL=residual is not None, SPLIT=split,
                      **_common(x, N, split * per == K, cfg, pdl), **l2_next.kernel_args(w, cfg.warps))
    return y


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_config(M: int, N: int, K: int, device: torch.device, bn: int = 64, bk: int = 128) -> Config:
    """Heuristic: ``bn`` columns per program, and as many K splits as it takes to put ~2 programs on every SM
    (each split at least two ``bk`` blocks)."""
    programs = -(-N // bn)
    want = max(1, -(-2 * _sm_count(device) // programs))
    split = 1
    while split * 2 <= want and K // (split * 2) >= 2 * bk:
        split *= 2
    return Config(bn, bk, split, 4, 4 if bk <= 128 else 3)


def candidates(M: int, N: int, K: int, device: torch.device) -> list[Config]:
    """The configurations ``tune`` times: a few column widths and K blocks at their heuristic split and at half of
    it, plus the default's split doubled."""
    out = []
    for bn in (32, 64, 128):
        for bk in (128, 256):
            c = default_config(M, N, K, device, bn, bk)
            out.append(c)
            if c.split > 1:
                out.append(Config(c.bn, c.bk, c.split // 2, c.warps, c.stages))
    d = default_config(M, N, K, device)
    for s in (d.split // 2, d.split * 2):
        if s >= 1 and K // s >= d.bk:
            out.append(Config(d.bn, d.bk, s, d.warps, d.stages))
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


CUBLAS = Config(0, 0, 0)
"""The choice 'no kernel': ``F.linear`` (cuBLAS) for this shape, where it timed faster."""

_CHOSEN: dict[tuple, Config] = {}
TIMINGS: dict[tuple, list[tuple[Config, float]]] = {}
"""Per tuned shape key (M, N, K, dtype): every candidate's median ms, L2-cold (for benchmarks and reports)."""

_FLUSH: dict[str, torch.Tensor] = {}


def _key(x, w, variant: str = ""):
    return (x.shape[0], w.shape[0], x.shape[1], str(x.dtype), str(x.device)) + ((variant,) if variant else ())


def cold_ms(fn, device: torch.device, repeats: int = 10) -> float:
    """Median ms of ``fn`` (one launch, or a few) with the L2 cache flushed before each: a 512 MB memset runs first,
    so the weights come from HBM as they do inside a step, and the host's launch overhead hides behind the memset
    (it is queued before the start event is reached)."""
    buf = _FLUSH.get(str(device))
    if buf is None:
        buf = _FLUSH[str(device)] = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    fn()
    times = []
    for _ in range(repeats):
        buf.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def chain_ms(run, w: torch.Tensor, repeats: int = 10, chain_bytes: float = 160e6) -> float:
    """Median ms per launch of ``run(w_i)`` launched back to back in one CUDA graph (at least 4 launches) over
    copies ``w_i`` of the weight ``w`` (``chain_bytes`` in all; a weight that large alone is not copied), so that
    each launch reads its weight from HBM as inside a decode step, where the previous launch's tail and this one's
    ramp meet: how a configuration runs in a step, which a single L2-cold launch (``cold_ms``) misjudges by up to
    2 us a launch (H100, session 8)."""
    distinct = max(1, min(24, -(-int(chain_bytes) // max(w.numel() * w.element_size(), 1))))
    copies = [w] + [w.clone() for _ in range(distinct - 1)]
    copies = copies * -(-4 // distinct)
    n = len(copies)
    stream = torch.cuda.Stream(w.device)
    stream.wait_stream(torch.cuda.current_stream(w.device))
    with torch.cuda.stream(stream):
        for c in copies:  # compile and warm up outside the capture
            run(c)
    torch.cuda.current_stream(w.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            run(c)
    graph.replay()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    del graph, copies
    return sorted(times)[len(times) // 2]


TUNE_MODE: str | None = None
"""How ``tune`` times candidates: ``chain`` (``chain_ms``) or ``cold`` (``cold_ms``); ``off``: no timing, the
heuristic ``default_config``. None: env ``FLARECTL_GEMV_TUNE`` (``0`` = off, ``cold``; else ``chain``)."""


def tune_mode() -> str:
    """``chain``, ``cold`` or ``off`` (``TUNE_MODE``, else env ``FLARECTL_GEMV_TUNE``); anything else: ValueError."""
    mode = TUNE_MODE or os.environ.get("FLARECTL_GEMV_TUNE", "chain").strip().lower()
    mode = {"0": "off", "false": "off", "no": "off", "1": "chain", "": "chain"}.get(mode, mode)
    if mode not in ("chain", "cold", "off"):
        raise ValueError(f"FLARECTL_GEMV_TUNE must be chain, cold or 0 (off), not {mode!r}")
    return mode


def measure(run, w: torch.Tensor, repeats: int = 10) -> float:
    """ms of one ``run(w)`` launch as ``tune_mode`` times it (``chain_ms`` or ``cold_ms``)."""
    if tune_mode() == "cold":
        return cold_ms(lambda: run(w), w.device, repeats)
    return chain_ms(run, w, repeats)


def _variant(residual, swiglu: bool) -> str:
    return ("swiglu" if swiglu else "") + ("+res" if residual is not None else "")


def tune(x: torch.Tensor, w: torch.Tensor, repeats: int = 10, residual: torch.Tensor | None = None,
         swiglu: bool = False) -> Config:
    """Time every candidate and (plain products only, PDL off) ``F.linear`` (cuBLAS) as ``measure`` does and keep
    the fastest for this shape (``CUBLAS`` if cuBLAS wins: then the op calls ``F.linear``). Fused products
    (``residual`` / ``swiglu``, ``launch_fused``) choose among the kernel's configurations."""
    variant = _variant(residual, swiglu)
    key = _key(x, w, variant)
    M = x.shape[0]
    K = x.shape[1] // 2 if swiglu else x.shape[1]
    N = w.shape[0]
    # cuBLAS is no candidate under PDL: its launches are not programmatic, so each one would serialise the PDL
    # launches on both sides of it in the step, which a chain of one shape cannot show
    results = [] if variant or use_pdl(x.device) else [(CUBLAS, measure(lambda wi: F.linear(x, wi), w, repeats))]
    configs = candidates(M, N, K, x.device)
    if not variant and INLINE_SPLIT:
        configs += [replace(c, inline=True) for c in configs if c.split > 1]
    for cfg in configs:
        run = ((lambda wi: launch_fused(x, wi, residual, swiglu, cfg)) if variant  # noqa: B023
               else (lambda wi: launch(x, wi, cfg)))  # noqa: B023
        try:
            results.append((cfg, measure(run, w, repeats)))
        except Exception:  # noqa: BLE001 - a config that does not fit (resources): skip it
            continue
    TIMINGS[key] = results
    return min(results, key=lambda r: r[1])[0]


def config_for(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None,
               swiglu: bool = False) -> Config:
    variant = _variant(residual, swiglu)
    key = _key(x, w, variant)
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return cfg
    M = x.shape[0]
    K = x.shape[1] // 2 if swiglu else x.shape[1]
    N = w.shape[0]
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if x.is_cuda and not capturing and tune_mode() != "off":
        cfg = tune(x, w, residual=residual, swiglu=swiglu)
    else:
        cfg = default_config(M, N, K, x.device)
    if not capturing:
        _CHOSEN[key] = cfg
    return cfg


def _skinny(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if not (x.is_cuda or _interpreting()):
        return skinny_linear_reference(x, w)
    x = x.contiguous()
    cfg = config_for(x, w)
    return F.linear(x, w) if cfg == CUBLAS else launch(x, w, cfg)


@torch.library.custom_op("flarectl::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ w [N, K]^T -> [M, N] in x's dtype, fp32 accumulation (the Triton kernel on CUDA
    or under the interpreter; ``skinny_linear_reference`` elsewhere)."""
    return _skinny(x, w)


@skinny_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def skinny_linear_fused_reference(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None,
                                  swiglu: bool) -> torch.Tensor:
    """The twin of ``skinny_linear_fused``: eager torch's roundings (silu(gate), then * up, in x's dtype; the
    product as ``skinny_linear_reference``; residual + y in x's dtype)."""
    if swiglu:
        gate, up = x.chunk(2, -1)
        x = F.silu(gate) * up
    y = skinny_linear_reference(x, w)
    return y if residual is None else residual + y


@torch.library.custom_op("flarectl::skinny_linear_fused", mutates_args=())
def skinny_linear_fused(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None,
                        swiglu: bool) -> torch.Tensor:
    """(residual +) (silu(gate) * up if ``swiglu`` else x) @ w^T in one kernel launch: x [M, K] or [M, 2K] =
    [gate | up] (M <= MAX_ROWS), w [N, K], residual [M, N] or None -> [M, N] in x's dtype (an MLP's down
    projection with its activation and the residual add: three kernels of the step become one). The Triton kernel
    on CUDA or under the interpreter; ``skinny_linear_fused_reference`` elsewhere."""
    if not (x.is_cuda or _interpreting()):
        return skinny_linear_fused_reference(x, w, residual, swiglu)
    x = x.contiguous()
    return launch_fused(x, w, residual, swiglu, config_for(x, w, residual, swiglu))


@skinny_linear_fused.register_fake
def _(x, w, residual, swiglu):
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """``F.linear(x, w)`` for x [..., K]; through ``skinny_linear`` when ``use_kernel`` and ``kernel_applies``
    (decided from shapes and dtypes: static under torch.compile)."""
    if use_kernel and kernel_applies(x, w):
        return skinny_linear(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def fused_applies(x: torch.Tensor, w: torch.Tensor | None, swiglu: bool) -> bool:
    """Shapes and dtypes ``skinny_linear_fused`` takes: x [..., K] (``swiglu``: [..., 2K]) with at most MAX_ROWS
    rows, w [N, K] of x's dtype (bf16/fp16/fp32) with unit stride along K, on x's device (CPU: the op's twin)."""
    if w is None or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    k = x.shape[-1] // 2 if swiglu else x.shape[-1]
    return (0 < rows <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and w.dtype == x.dtype and w.dim() == 2 and w.shape[1] == k and (not swiglu or x.shape[-1] == 2 * k)
            and w.stride(1) == 1 and x.device == w.device)


FUSE_DOWN_DEFAULT = False
"""Off: on the H100 (session 6, runs 2-3) the fused down projection is slower than what the compiled step does
instead (compiled silu * up -> cuBLAS split-K -> residual add: 15.3 us per layer in a graph of 24 distinct weights,
against 16.1 us for the best of 64 kernel configurations; AR step 2.32 -> 2.40 ms)."""


def resolve_fuse_down(fuse_down: bool | None, gemv: bool) -> bool:
    """None -> ``FUSE_DOWN_DEFAULT`` where the skinny kernels are (``gemv``); env ``FLARECTL_ENGINE_FUSE_DOWN=1`` /
    ``0`` overrides."""
    if fuse_down is None:
        env = os.environ.get("FLARECTL_ENGINE_FUSE_DOWN")
        if env is not None:
            return gemv and env.strip().lower() not in ("0", "false", "no", "off", "")
        return gemv and FUSE_DOWN_DEFAULT
    return bool(fuse_down)


def plain_weight(module) -> torch.Tensor | None:
    """The weight of a plain bias-free ``nn.Linear`` (which ``linear`` may replace), else None. Decided once,
    outside compiled code."""
    if type(module) is torch.nn.Linear and module.bias is None and type(module.weight.data) is torch.Tensor:
        return module.weight
    return None


def module_linear(x: torch.Tensor, module, w: torch.Tensor | None, use_kernel: bool) -> torch.Tensor:
    """``module(x)``; ``linear(x, w)`` instead when ``w`` (the module's ``plain_weight``) is given."""
    if use_kernel and w is not None:
        return linear(x, w, True)
    return module(x)


def resolve_gemv(gemv: bool | None, device: torch.device) -> bool:
    """None -> on for CUDA (env ``FLARECTL_ENGINE_GEMV=0`` turns it off), off elsewhere."""
    if gemv is None:
        env = os.environ.get("FLARECTL_ENGINE_GEMV")
        if env is not None:
            return env.strip().lower() not in ("0", "false", "no", "off", "")
        return device.type == "cuda"
    return bool(gemv)
