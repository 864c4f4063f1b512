"""The projections between two mixers in one launch: a persistent kernel with grid barriers.

Between one layer's mixer (GDN or attention) and the next layer's, an AR step runs four skinny GEMMs
(``gemv``, ``norm_gemv``), each its own launch, and each launch costs ~4-7 us over its weight bytes (ramp, tail and
launch; docs/perf/engine.md, sessions 5-13): ~0.5 ms of the 2.13 ms AR step at C = 8 (Qwen3.5-2B shape).
``layer_chain`` runs the four as *phases* of one launch of ``G`` programs (one per SM, all resident):

    h1   = hidden + o @ w_out^T                              [M, D]   out_proj and the residual add
    act  = glu(rstd(h1) * (h1 @ w_gate_up^T))                [M, I]   post-attention norm, gate|up, SwiGLU
    h2   = h1 + act @ w_down^T                               [M, D]   down and the residual add: the next hidden
    proj = rstd(h2) * (h2 @ w_next^T)                        [M, Nn]  the next layer's norm and input projection

(``w_gate_up`` / ``w_next`` with the norms' gains folded in and gate|up rows interleaved, as ``norm_gemv`` takes
them; no ``w_next`` after the last layer: three phases). Every program owns whole column tiles of a phase (full K,
so no split-K partials: deterministic, and a row's result does not depend on the other rows). Programs meet at a
grid barrier between phases (an arrival counter, release / acquire at GPU scope); optionally (``PREFETCH``, off by
default), before it waits, each program prefetches into L2 the weight rows of its first tile in the next phase
(``cp.async.bulk.prefetch.L2``, sm_90+). The last program out resets the counter, so
launches that follow one another on a stream (or in a CUDA graph) share it. A spin that polls ``MAX_SPIN`` times
gives up and counts a failure (``failures``): a grid that is not all resident (another process on the GPU, MPS)
gives wrong numbers and a flag, never a hang; the engine checks the flag (``check``) before it hands out a finished
request, so wrong numbers end in a one-line error, never in a result.

``layer_chain`` (the op ``flarectl::layer_chain``, opaque to torch.compile, capturable in a CUDA graph) is the fast
path; ``layer_chain_reference`` its pure-torch twin (fp32 products and sums, eager torch's roundings). On CPU the op
runs the twin unless Triton's interpreter is on; interpreted, the grid is one program (programs run one after
another, so a barrier could not be met by more), and ``ONLY`` runs one phase alone on more programs (tests).

Off unless asked (``resolve``: env ``FLARECTL_ENGINE_LAYER_CHAIN=1``). Timed on an H100 (session 16, Qwen3.5-2B
shape, C = 8): correct (its GPU tests pass), but slower than the launch chain it replaces, AR step 2.252 ms against
2.137 ms without it (2.573 ms with the L2 prefetch); the plain-GEMV probe agrees (one persistent launch per layer
1.362 ms against 1.241 ms for four launches). Kept as an opt-in, tested path; docs/perf/engine.md, session 16.
Two knobs built after that measurement, to take back the barrier's cost, are untimed: ``PRELOAD`` (each program's
first weight block of the next phase in registers before it waits, so the phase does not start its pipeline from
nothing) and ``NORM_LOOP`` (the norms' sums of squares inside the K loop instead of a pass over the activations
before it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from flarectl.engine import gemv
from flarectl.engine.envs import env_int
from flarectl.errors import FlareError

MAX_ROWS = 16
"""Largest M (C x W tokens) the kernel takes: the AR step up to 16 slots (one 16-row dot tile)."""

MAX_SPIN = 1 << 22
"""Polls of the barrier counter before a program gives up (seconds on a GPU; a resident grid needs a few hundred)."""

ENABLED: bool | None = None
"""The static step's default: None reads env ``FLARECTL_ENGINE_LAYER_CHAIN`` (1 on), else off."""

BN_LIMIT = 128
"""Widest column tile (wider phases loop over tiles)."""

PREFETCH = env_int("FLARECTL_ENGINE_LAYER_CHAIN_PF", 0, low=0, high=1)
"""The L2 prefetch of each program's next tile before a barrier, on sm_90+ (env ``FLARECTL_ENGINE_LAYER_CHAIN_PF=1``).
Off by default: on the H100 (session 16) it made the chained AR step 0.32 ms slower (2.573 vs 2.252 ms)."""

PRELOAD = env_int("FLARECTL_ENGINE_LAYER_CHAIN_PRELOAD", 0, low=0, high=1)
"""Before each barrier, every program loads the first K block of its first tile of the next phase into registers
(env ``FLARECTL_ENGINE_LAYER_CHAIN_PRELOAD=1``): those weights do not depend on the barrier, so they stream while the
program waits and the phase starts with a block in hand. Off until timed on a GPU (session 16 built it after its
device time ran out)."""

NORM_LOOP = env_int("FLARECTL_ENGINE_LAYER_CHAIN_NORM_LOOP", 0, low=0, high=1)
"""The norm phases' sums of squares inside the K loop (the Gram matrix on the tensor cores; env
``FLARECTL_ENGINE_LAYER_CHAIN_NORM_LOOP=1``) instead of a pass over the activations before it. Off until timed: on
sm_90 (Triton 3.6, offline) it takes the 'fit' kernel from 148 to 255 registers (4 B spilled); 'balance' builds stay
at 168-190, unspilled."""

TILE_KB = env_int("FLARECTL_ENGINE_LAYER_CHAIN_TILE_KB", 32, low=1, high=128, power_of_two=True)
"""Weight bytes (KB) per pipeline stage of every phase (env ``FLARECTL_ENGINE_LAYER_CHAIN_TILE_KB``): a phase of
narrow tiles takes longer K blocks, so each program keeps as many bytes in flight as one of wide tiles."""

BK_MAX = 512

TILINGS = ("fit", "balance")
TILING = os.environ.get("FLARECTL_ENGINE_LAYER_CHAIN_TILING", "fit").strip().lower()
"""How a phase's columns become tiles (env ``FLARECTL_ENGINE_LAYER_CHAIN_TILING``; ``tile_n``): 'fit' (one tile per
program where it fits) or 'balance' (the fewest columns on the busiest program)."""
if TILING not in TILINGS:
    raise FlareError(f"FLARECTL_ENGINE_LAYER_CHAIN_TILING must be one of {', '.join(TILINGS)}; got {TILING!r}")


def resolve(flag: bool | None, use_gemv: bool, device: torch.device) -> bool:
    """Whether the step chains its projections: ``flag`` (None: ``ENABLED``, else the env), only with the skinny
    kernels (``use_gemv``) on CUDA or under the interpreter."""
    if flag is None:
        flag = ENABLED if ENABLED is not None else os.environ.get("FLARECTL_ENGINE_LAYER_CHAIN", "0").strip().lower() in (
            "1", "true", "yes", "on")
    return bool(flag) and use_gemv and (device.type == "cuda" or gemv._interpreting())


def _glu(y: torch.Tensor) -> torch.Tensor:
    return F.silu(y[..., 0::2]) * y[..., 1::2]


def _norm_project(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    acc = torch.promote_types(h.dtype, torch.float32)
    hf = h.to(acc)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return ((hf @ w.to(acc).t()) * rstd).to(h.dtype)


def layer_chain_reference(o: torch.Tensor, hidden: torch.Tensor, w_out: torch.Tensor, w_gate_up: torch.Tensor,
                          eps_mlp: float, w_down: torch.Tensor, w_next: torch.Tensor | None,
                          eps_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin. o [M, KV] (the mixer's output), hidden [M, D], w_out [D, KV], w_gate_up [2I, D] (gain folded, rows
    interleaved), w_down [D, I], w_next [Nn, D] (gain folded) or None -> (h2 [M, D], proj [M, Nn], or [M, 0]
    without ``w_next``), in o's dtype; products and sums in fp32 (fp64 stays fp64), each intermediate rounded to
    o's dtype as eager torch rounds it."""
    acc = torch.promote_types(o.dtype, torch.float32)
    h1 = hidden + (o.to(acc) @ w_out.to(acc).t()).to(o.dtype)
    act = _glu(_norm_project(h1, w_gate_up, eps_mlp))
    h2 = h1 + (act.to(acc) @ w_down.to(acc).t()).to(o.dtype)
    proj = _norm_project(h2, w_next, eps_next) if w_next is not None else o.new_empty(o.shape[0], 0)
    return h2, proj


def block_k(K: int, bn: int, elem: int) -> int | None:
    """A phase's K block: ``TILE_KB`` of weights per stage over ``bn`` columns, a power of two in [16, ``BK_MAX``]
    that divides K (no K masks), or None."""
    bk = 16
    while bk * 2 <= min(BK_MAX, TILE_KB * 1024 // (bn * elem)):
        bk *= 2
    while bk >= 16 and K % bk:
        bk //= 2
    return bk if bk >= 16 else None


def tile_n(N: int, programs: int, glu: bool, tiling: str | None = None) -> int:
    """Columns per tile, a power of two from 16 (32 with the activation: 16 outputs) to ``BN_LIMIT``. ``tiling``
    (None: ``TILING``) 'fit': the narrowest whose tiles fit one per program (wider phases loop); 'balance': the one
    that puts the fewest columns on the busiest program (ties: the widest). E.g. gate|up of the Qwen3.5-2B shape
    (12,288 columns) on 132 programs: 'fit' 96 tiles of 128 (36 programs idle), 'balance' 384 of 32 (96 columns on
    the busiest program)."""
    narrow = 32 if glu else 16
    widths = [narrow << i for i in range(8) if narrow << i <= max(BN_LIMIT, narrow)]
    if (tiling or TILING) == "balance":
        busiest = lambda bn: -(-(-(-N // bn)) // programs) * bn  # noqa: E731
        return min(reversed(widths), key=busiest)
    return next((bn for bn in widths if -(-N // bn) <= programs), widths[-1])


def applies(o: torch.Tensor, hidden: torch.Tensor, w_out: torch.Tensor, w_gate_up: torch.Tensor | None,
            w_down: torch.Tensor | None, w_next: torch.Tensor | None) -> bool:
    """Shapes and dtypes the kernel takes: M <= ``MAX_ROWS`` rows, one float dtype for all, contiguous 2-D weights
    of matching shapes (even gate|up rows), every K a multiple of 16, on CUDA or interpreted, one device."""
    if w_gate_up is None or w_down is None:
        return False
    D, KV = hidden.shape[-1], o.shape[-1]
    rows = o.numel() // max(KV, 1)
    ws = [w_out, w_gate_up, w_down] + ([w_next] if w_next is not None else [])
    if not (0 < rows <= MAX_ROWS and hidden.numel() == rows * D
            and o.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and all(w.dim() == 2 and w.is_contiguous() and w.dtype == o.dtype and w.device == o.device for w in ws)
            and hidden.dtype == o.dtype and (o.is_cuda or gemv._interpreting())):
        return False
    inter = w_gate_up.shape[0] // 2
    ok = (tuple(w_out.shape) == (D, KV) and tuple(w_gate_up.shape) == (2 * inter, D) and inter > 0
          and tuple(w_down.shape) == (D, inter) and (w_next is None or w_next.shape[1] == D))
    return ok and all(k % 16 == 0 for k in (KV, D, inter))


# -- the kernel -------------------------------------------------------------------------------------------------

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    gemv._kernels()  # defines the shared helper gemv._mma
    _mma = gemv._mma

    @triton.jit
    def _k_block(acc, gram, a, b, GRAM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """One K block: acc += a @ b; GRAM: gram += a @ a^T (the rows' sums of squares on its diagonal). The Gram
        dot first, so that Triton lays both dots' warps out along the columns (``norm_gemv``'s loop, session 18)."""
        if GRAM:
            gram = _mma(gram, a, tl.trans(a), IEEE, UPCAST)
        acc = _mma(acc, a, b, IEEE, UPCAST)
        return acc, gram

    @triton.jit
    def _tile(x, w, y, res, M, eps, rstd, t, b_pre, N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr, STAGES: tl.constexpr, PRE: tl.constexpr,
              NORM_LOOP: tl.constexpr):
        """Column tile ``t`` of y = epilogue(prologue(x) @ w^T), full K. NORM: rows scaled by rsqrt(mean(x^2) + eps):
        ``rstd`` from the phase's pass over x before its tiles, or (NORM_LOOP) from sums of squares taken in the K
        loop (the Gram matrix x x^T on the tensor cores, as ``norm_gemv``: the weights stream from the start); GLU:
        interleaved (gate, up) columns -> silu(gate) * up (y has N / 2 columns); RESIDUAL: res + y. PRE: ``b_pre``
        is this tile's first [BK, BN] block of w^T, loaded before the barrier. Activations are read from L2 (.cg:
        other programs wrote them)."""
        rm = tl.arange(0, BM)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        rn = t * BN + tl.arange(0, BN)
        n_ok = rn < N
        p_w = w + rn[None, :].to(tl.int64) * K + rk[:, None]  # [BK, BN] tile of w^T
        p_x = x + rm[:, None] * K + rk[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        gram = tl.zeros([BM, BM], dtype=tl.float32)
        IN_LOOP: tl.constexpr = NORM and NORM_LOOP
        K0: tl.constexpr = BK if PRE else 0
        if PRE:
            a = tl.load(p_x, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            acc, gram = _k_block(acc, gram, a, b_pre, IN_LOOP, IEEE, UPCAST)
            p_w += BK
            p_x += BK
        for _k in tl.range(K0, K, BK, num_stages=STAGES):
            b = tl.load(p_w, mask=n_ok[None, :], other=0.0)
            a = tl.load(p_x, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            acc, gram = _k_block(acc, gram, a, b, IN_LOOP, IEEE, UPCAST)
            p_w += BK
            p_x += BK
        if IN_LOOP:
            ss = tl.sum(tl.where(rm[:, None] == rm[None, :], gram, 0.0), axis=1)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        if NORM:
            acc = acc * rstd[:, None]
        if GLU:  # as eager torch rounds them: y, silu(gate), silu(gate) * up
            HALF: tl.constexpr = BN // 2
            o = acc.to(y.dtype.element_ty).to(tl.float32)
            gate, up = tl.split(tl.reshape(o, [BM, HALF, 2]))
            act = (gate / (1.0 + tl.exp(-gate))).to(y.dtype.element_ty).to(tl.float32)
            cols = t * HALF + tl.arange(0, HALF)
            tl.store(y + rm[:, None] * (N // 2) + cols[None, :], (act * up).to(y.dtype.element_ty),
                     mask=m_ok[:, None] & (cols < N // 2)[None, :])
        else:
            offs = rm[:, None] * N + rn[None, :]
            mask = m_ok[:, None] & n_ok[None, :]
            out = acc.to(y.dtype.element_ty)
            if RESIDUAL:
                r = tl.load(res + offs, mask=mask, other=0.0, cache_modifier=".cg")
                out = (r.to(tl.float32) + out.to(tl.float32)).to(y.dtype.element_ty)
            tl.store(y + offs, out, mask=mask)

    @triton.jit
    def _phase(x, w, y, res, M, eps, pid, G, b_pre, N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, STAGES: tl.constexpr, ELEM: tl.constexpr, PF: tl.constexpr,
               PRE: tl.constexpr, NORM_LOOP: tl.constexpr):
        """This program's column tiles of the phase (pid, pid + G, ...): ``_tile`` each. PF: each tile first asks
        L2 for the program's next one (a no-op with one tile per program). PRE: the first tile's first K block is
        ``b_pre`` (``_preload``)."""
        tiles = tl.cdiv(N, BN)
        rstd = 0.0
        if NORM and not NORM_LOOP:
            rm = tl.arange(0, BM)
            rk = tl.arange(0, BK)
            ss = tl.zeros([BM], dtype=tl.float32)
            for k in range(0, K, BK):
                a = tl.load(x + rm[:, None] * K + (k + rk)[None, :], mask=(rm < M)[:, None], other=0.0,
                            cache_modifier=".cg").to(tl.float32)
                ss += tl.sum(a * a, axis=1)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        first = pid
        if PRE:
            if pid < tiles:
                _prefetch(w, pid + G, N, K, BN, ELEM, PF)
                _tile(x, w, y, res, M, eps, rstd, pid, b_pre, N, K, BM, BN, BK, NORM, GLU, RESIDUAL, IEEE, UPCAST,
                      STAGES, True, NORM_LOOP)
            first = pid + G
        for t in range(first, tiles, G):
            _prefetch(w, t + G, N, K, BN, ELEM, PF)
            _tile(x, w, y, res, M, eps, rstd, t, b_pre, N, K, BM, BN, BK, NORM, GLU, RESIDUAL, IEEE, UPCAST, STAGES,
                  False, NORM_LOOP)

    @triton.jit
    def _preload(w, pid, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRE: tl.constexpr):
        """PRE: the first [BK, BN] block of w^T of this program's first tile in a phase, loaded into registers
        before the barrier that phase waits on (the weights do not depend on it: the loads are in flight while the
        program waits); else a placeholder."""
        if PRE:
            rn = pid * BN + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            return tl.load(w + rn[None, :].to(tl.int64) * K + rk[:, None], mask=(rn < N)[None, :], other=0.0)
        else:
            return 0.0

    @triton.jit
    def _prefetch(w, tile, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, ELEM: tl.constexpr,
                  PF: tl.constexpr):
        """Hint: tile ``tile`` of w (BN whole rows of K) into L2, if there is one."""
        if PF:
            if tile < tl.cdiv(N, BN):
                rn = tl.minimum(tile * BN + tl.arange(0, BN), N - 1)
                size = tl.full([BN], K * ELEM, tl.int32)
                tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                          [w + rn.to(tl.int64) * K, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _grid_sync(sync, target, SPIN: tl.constexpr):
        """Arrive (release), poll until ``target`` programs have arrived, acquire. After SPIN polls: count a failure
        in sync[2] and go on."""
        tl.debug_barrier()  # every thread's stores of this phase issued before the arrival
        seen = tl.atomic_add(sync, 1, sem="acq_rel", scope="gpu") + 1
        polls = 0
        while (seen < target) & (polls < SPIN):
            seen = tl.load(sync, volatile=True)
            polls += 1
        tl.atomic_add(sync, 0, sem="acquire", scope="gpu")
        if seen < target:
            tl.atomic_add(sync + 2, 1)
        tl.debug_barrier()

    globals().update(_phase=_phase, _tile=_tile, _k_block=_k_block, _preload=_preload, _prefetch=_prefetch,
                     _grid_sync=_grid_sync, _mma=_mma, tl=tl)

    @triton.jit
    def layer_chain_kernel(o, hidden, w_out, w_gate_up, w_down, w_next, h1, act, h2, proj, sync, M, eps_mlp,
                           eps_next, D: tl.constexpr, KV: tl.constexpr, I: tl.constexpr, NN: tl.constexpr,
                           BN_OUT: tl.constexpr, BN_GU: tl.constexpr, BN_DOWN: tl.constexpr,
                           BN_NEXT: tl.constexpr, BK_OUT: tl.constexpr, BK_GU: tl.constexpr,
                           BK_DOWN: tl.constexpr, BK_NEXT: tl.constexpr, BM: tl.constexpr, NEXT: tl.constexpr,
                           ONLY: tl.constexpr, PF: tl.constexpr, PRE: tl.constexpr, NORM_LOOP: tl.constexpr,
                           ELEM: tl.constexpr, SPIN: tl.constexpr,
                           IEEE: tl.constexpr, UPCAST: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        if ONLY == 0 or ONLY == 1:
            _phase(o, w_out, h1, hidden, M, 0.0, pid, G, 0.0, D, KV, BM, BN_OUT, BK_OUT, False, False, True, IEEE,
                   UPCAST, STAGES, ELEM, PF, False, NORM_LOOP)
        if ONLY == 0 or ONLY == 2:
            b_pre = _preload(w_gate_up, pid, 2 * I, D, BN_GU, BK_GU, PRE)
            if ONLY == 0:
                _prefetch(w_gate_up, pid, 2 * I, D, BN_GU, ELEM, PF)
                _grid_sync(sync, G, SPIN)
            _phase(h1, w_gate_up, act, h1, M, eps_mlp, pid, G, b_pre, 2 * I, D, BM, BN_GU, BK_GU, True, True, False,
                   IEEE, UPCAST, STAGES, ELEM, PF, PRE, NORM_LOOP)
        if ONLY == 0 or ONLY == 3:
            b_pre = _preload(w_down, pid, D, I, BN_DOWN, BK_DOWN, PRE)
            if ONLY == 0:
                _prefetch(w_down, pid, D, I, BN_DOWN, ELEM, PF)
                _grid_sync(sync, 2 * G, SPIN)
            _phase(act, w_down, h2, h1, M, 0.0, pid, G, b_pre, D, I, BM, BN_DOWN, BK_DOWN, False, False, True, IEEE,
                   UPCAST, STAGES, ELEM, PF, PRE, NORM_LOOP)
        if NEXT:
            if ONLY == 0 or ONLY == 4:
                b_pre = _preload(w_next, pid, NN, D, BN_NEXT, BK_NEXT, PRE)
                if ONLY == 0:
                    _prefetch(w_next, pid, NN, D, BN_NEXT, ELEM, PF)
                    _grid_sync(sync, 3 * G, SPIN)
                _phase(h2, w_next, proj, h2, M, eps_next, pid, G, b_pre, NN, D, BM, BN_NEXT, BK_NEXT, True, False,
                       False, IEEE, UPCAST, STAGES, ELEM, PF, PRE, NORM_LOOP)
        if ONLY == 0:
            # the last program out resets the counter: every program is past its last poll by then
            tl.debug_barrier()
            out = tl.atomic_add(sync + 1, 1, sem="acq_rel", scope="gpu")
            if out == G - 1:
                tl.atomic_xchg(sync, 0)
                tl.atomic_xchg(sync + 1, 0)

    _KERNEL = layer_chain_kernel
    return _KERNEL


_SYNC: dict[str, torch.Tensor] = {}


def sync_buffer(device: torch.device) -> torch.Tensor:
    """The device's barrier words, kept for the process (graphs hold the address): [arrivals, exits, failures]."""
    key = str(device)
    if key not in _SYNC:
        _SYNC[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return _SYNC[key]


def failures(device: torch.device) -> int:
    """Barrier spins that gave up on ``device`` since the process started (0 unless the grid was not resident)."""
    buf = _SYNC.get(str(device))
    return 0 if buf is None else int(buf[2].item())


def check(device: torch.device, since: int = 0) -> None:
    """Raise ``FlareError`` (one line) if a barrier spin on ``device`` gave up after ``since`` failures had been
    counted: the outputs of that launch, and of what followed it, are not to be trusted."""
    n = failures(device) - since
    if n > 0:
        raise FlareError(f"layer chain: {n} grid barrier wait(s) on {device} gave up (the grid was not all resident: "
                         "another process or MPS sharing the GPU?); outputs since are wrong — rerun with "
                         "FLARECTL_ENGINE_LAYER_CHAIN=0")


def programs(device: torch.device) -> int:
    """The grid: one program per SM on CUDA; one interpreted (programs run one after another there)."""
    return gemv._sm_count(device) if device.type == "cuda" else 1


def launch(o: torch.Tensor, hidden: torch.Tensor, w_out: torch.Tensor, w_gate_up: torch.Tensor, eps_mlp: float,
           w_down: torch.Tensor, w_next: torch.Tensor | None, eps_next: float, grid: int | None = None,
           only: int = 0, prefetch: bool | None = None, preload: bool | None = None,
           norm_loop: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch (``layer_chain``'s contract, 2-D o / hidden). ``grid``: programs (None: ``programs``); ``only``
    1-4: that phase alone, without barriers (tests, through ``launch_phases``); ``prefetch``: the L2 prefetch (None:
    ``PREFETCH``, on sm_90+); ``preload``: each phase's first weight block loaded before its barrier (None:
    ``PRELOAD``); ``norm_loop``: the norms' sums of squares in the K loop (None: ``NORM_LOOP``)."""
    kernel = _kernel()
    o, hidden = o.contiguous(), hidden.contiguous()
    M, KV = o.shape
    D, inter = hidden.shape[1], w_down.shape[1]
    NN = w_next.shape[0] if w_next is not None else 0
    dev = o.device
    G = programs(dev) if grid is None else grid
    if only == 0 and G > 1 and not o.is_cuda:
        raise ValueError("an interpreted chain runs on one program (its barriers need every program resident)")
    h1, act, h2 = (gemv._empty((M, n), o.dtype, dev) for n in (D, inter, D))
    proj = gemv._empty((M, NN), o.dtype, dev)
    _launch(kernel, o, hidden, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next, h1, act, h2, proj, G, only,
            prefetch, preload, norm_loop)
    return h2, proj


def _launch(kernel, o, hidden, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next, h1, act, h2, proj, G, only,
            prefetch, preload=None, norm_loop=None):
    M, KV = o.shape
    D, inter = hidden.shape[1], w_down.shape[1]
    NN = w_next.shape[0] if w_next is not None else 0
    if any(k % 16 for k in (KV, D, inter)):
        raise ValueError(f"layer_chain needs every K a multiple of 16, got {KV}, {D}, {inter}")
    f32 = o.dtype == torch.float32
    if prefetch is None:
        prefetch = bool(PREFETCH) and o.is_cuda and torch.cuda.get_device_capability(o.device)[0] >= 9
    dev = o.device
    bns = dict(BN_OUT=tile_n(D, G, False), BN_GU=tile_n(2 * inter, G, True), BN_DOWN=tile_n(D, G, False),
               BN_NEXT=tile_n(max(NN, 1), G, False))
    bm, elem = gemv.row_block(M), o.element_size()
    bks = dict(BK_OUT=block_k(KV, bns["BN_OUT"], elem), BK_GU=block_k(D, bns["BN_GU"], elem),
               BK_DOWN=block_k(inter, bns["BN_DOWN"], elem), BK_NEXT=block_k(D, bns["BN_NEXT"], elem))
    widest = max((bm * bk + bk * bn) for bk, bn in zip(bks.values(), bns.values()))  # elements per stage
    stages = max(1, min(2 if f32 else 4, (gemv.smem_bytes(dev) - 8 * 1024) // (widest * elem)))
    kernel[(G,)](o, hidden, w_out, w_gate_up, w_down, w_next if w_next is not None else w_out, h1, act, h2, proj,
                 sync_buffer(dev), M, float(eps_mlp), float(eps_next), D=D, KV=KV, I=inter, NN=max(NN, 1), **bns,
                 **bks, BM=bm, NEXT=w_next is not None, ONLY=only, PF=bool(prefetch),
                 PRE=bool(PRELOAD if preload is None else preload),
                 NORM_LOOP=bool(NORM_LOOP if norm_loop is None else norm_loop), ELEM=o.element_size(), SPIN=MAX_SPIN,
                 IEEE=f32, UPCAST=gemv._interpreting() and not f32, num_warps=4, num_stages=stages, STAGES=stages)


def launch_phases(o, hidden, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next, grid: int,
                  preload: bool | None = None, norm_loop: bool | None = None):
    """Tests: the four phases as four launches of ``grid`` programs each (``ONLY``), no barriers -> (h2, proj, h1,
    act): checks the partition of tiles over programs, which one interpreted program cannot."""
    kernel = _kernel()
    o, hidden = o.contiguous(), hidden.contiguous()
    M = o.shape[0]
    D, inter = hidden.shape[1], w_down.shape[1]
    NN = w_next.shape[0] if w_next is not None else 0
    h1, act, h2 = (gemv._empty((M, n), o.dtype, o.device) for n in (D, inter, D))
    proj = gemv._empty((M, NN), o.dtype, o.device)
    for only in (1, 2, 3, 4) if w_next is not None else (1, 2, 3):
        _launch(kernel, o, hidden, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next, h1, act, h2, proj, grid,
                only, False, preload, norm_loop)
    return h2, proj, h1, act


@torch.library.custom_op("flarectl::layer_chain", mutates_args=())
def layer_chain(o: torch.Tensor, hidden: torch.Tensor, w_out: torch.Tensor, w_gate_up: torch.Tensor, eps_mlp: float,
                w_down: torch.Tensor, w_next: torch.Tensor | None, eps_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h2, proj) of ``layer_chain_reference`` in one launch: o [M, KV], hidden [M, D] (M <= ``MAX_ROWS``). The
    Triton kernel on CUDA or under the interpreter (one program), the twin elsewhere."""
    if not (o.is_cuda or gemv._interpreting()):
        return layer_chain_reference(o, hidden, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next)
    return launch(o, hidden, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next)


@layer_chain.register_fake
def _(o, hidden, w_out, w_gate_up, eps_mlp, w_down, w_next, eps_next):
    return hidden.new_empty(hidden.shape), o.new_empty(o.shape[0], w_next.shape[0] if w_next is not None else 0)
