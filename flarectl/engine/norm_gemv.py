"""Residual add + RMSNorm + projection (+ SwiGLU) in one skinny-GEMM launch, for decode steps (issue 6).

Every decoder layer of the step opens its two sub-blocks the same way: ``h = hidden + delta`` (the residual add of
the previous sub-block), ``x = rmsnorm(h) * gain``, ``x @ W^T``. Compiled, that is a small add+norm kernel before
each projection (and, for the MLP, a SiLU-times-up kernel after it): ~4 launches of ~1.5 us per layer that move
almost no bytes. Here they ride inside the projection, which streams its weight anyway:

* **the gain is folded into the weight** (``fold_gain``: W' = W * gain, a copy taken when the engine is built, as
  the fused projection copies already are), and the row scale is applied to the fp32 accumulator at the end:
  ``rmsnorm(h) @ (W * gain)^T = rstd * (h @ W'^T)`` with ``rstd = rsqrt(mean(h^2) + eps)`` per row;
* **the residual add rides in the dot**: the A tile's top rows are x's and its bottom rows the residual's (M <= 8:
  one 16-row tile; up to 16 rows: 32), loaded straight into the dots — a computed operand (x + r, or squares taken
  from the tile) cost the loads their software pipelining and made the kernel 1.5-4x slower on the H100 — so the
  product is (x + r) @ W'^T as the sum of the two halves, and the column blocks also store ``h = x + r`` (rounded as
  eager torch adds them; each block a few K chunks) as the new residual stream;
* **the sums of squares come from the tensor cores too**: the Gram matrix A @ A^T per tile, |x + r|^2 =
  G[i,i] + 2 G[i,i+R] + G[i+R,i+R] (each K split its own part; with split-K the last split to arrive at the column
  block's counter sums the partial products and sums in split order: deterministic, as ``gemv.launch_fused``);
* ``glu``: the weight's rows are [gate | up] interleaved (``interleave_glu``: g0, u0, g1, u1, ...), so every program
  holds matching gate and up columns and writes ``silu(gate) * up`` (rounded as eager torch rounds them): the MLP's
  activation needs no kernel of its own.

``norm_linear`` (op ``flarectl::norm_linear``) is the fast path; ``norm_linear_reference`` its twin with the same
signature (fp32 products and sums). ``project`` is what the step calls: the op for at most ``MAX_ROWS`` (32) rows on
CUDA (or under the interpreter), the same formula in torch (the GEMM through ``gemv.linear``, then the row scale)
otherwise.

The fold changes where bf16 rounds (the normalised activations are no longer rounded before the GEMM; the folded
weight is; the kernel's product and sums of squares take x + r unrounded, the stored h is rounded), like the mixer
kernel did: different rounding, not a different function (fp32 steps agree to 1e-5; bf16 logits are as close to an
fp32 reference as without it).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F

from flarectl.engine import gemv, l2_next
from flarectl.engine.envs import env_int

FUSE_NORM_DEFAULT = True
"""Whether steps with the skinny kernels (``gemv``) fuse each sub-block's residual add and RMSNorm into its
projection (and the MLP's activation into gate|up) by default; env ``FLARECTL_ENGINE_FUSE_NORM=0`` / ``1``
overrides (``resolve``). On since session 8, when the engine's CUDA tests passed with it (8/8). On the H100
(Qwen3.5-2B shape, random weights, C=8): AR step 2.200 vs 2.242-2.256 ms in one process, 207 vs 303 kernels;
through the CLI AR 2.215 ms (1.75x roofline; 2.348 ms in session 6), verify 2.692 ms (2.813), draft 3.051 ms
(3.100); bf16 logits vs an fp32 reference 5.2e-2 vs 5.4e-2 without (docs/perf/engine.md, session 7)."""


def resolve(flag: bool | None, use_gemv: bool) -> bool:
    """None -> ``FUSE_NORM_DEFAULT`` where the skinny kernels are on (env ``FLARECTL_ENGINE_FUSE_NORM``
    overrides); True / False as given."""
    if flag is None:
        env = os.environ.get("FLARECTL_ENGINE_FUSE_NORM")
        on = FUSE_NORM_DEFAULT if env is None else env.strip().lower() not in ("0", "false", "no", "off", "")
        return use_gemv and on
    return bool(flag)


# -- the weights ------------------------------------------------------------------------------------------------

def norm_gain(norm: torch.nn.Module) -> tuple[torch.Tensor, float] | None:
    """(gain [D] fp32, eps) of an RMSNorm module that computes ``x * rsqrt(mean(x^2) + eps) * gain`` — Qwen3.5's
    (gain = 1 + weight) or Llama's (gain = weight) — else None. Checked on a random fp32 probe, so a norm of another
    form is never folded."""
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if weight is None or weight.dim() != 1 or eps is None or "RMSNorm" not in name or "Gated" in name:
        return None
    with torch.no_grad():
        ref = copy.deepcopy(norm).float().cpu()  # the module itself in fp32 on CPU (the model's is left alone)
        gain_of = {"1+w": 1.0 + ref.weight.float(), "w": ref.weight.float()}
        probe = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0))
        want = ref(probe)
        rstd = torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + float(eps))
        for gain in gain_of.values():
            if torch.allclose(want, probe * rstd * gain, rtol=1e-4, atol=1e-5):
                return gain.to(weight.device), float(eps)
    return None


def fold_gain(w: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """W [N, K] * gain [K] along K, in fp32, rounded to W's dtype: a new tensor."""
    return (w.float() * gain.to(w.device)[None, :]).to(w.dtype).contiguous()


def interleave_glu(w: torch.Tensor) -> torch.Tensor:
    """[gate; up] [2I, K] -> rows g0, u0, g1, u1, ... [2I, K] (a new tensor)."""
    gate, up = w.chunk(2, 0)
    return torch.stack([gate, up], 1).reshape(w.shape).contiguous()


# -- the twin ---------------------------------------------------------------------------------------------------

def _glu(y: torch.Tensor) -> torch.Tensor:
    """Interleaved [.., 2I] -> silu(gate) * up [.., I], rounded as eager torch rounds them."""
    return F.silu(y[..., 0::2]) * y[..., 1::2]


def _add(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else x + residual


def norm_linear_reference(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float,
                          glu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin. x, residual [M, K] (residual may be None), w [N, K] with the norm's gain folded in ->
    (y, h): h = x + residual in x's dtype (an empty [0, K] when residual is None: the caller's x is h);
    y = rsqrt(mean(h^2) + eps) * (h @ w^T) with fp32 products and sums, in x's dtype ([M, N]), or with ``glu``
    silu(y[:, 0::2]) * y[:, 1::2] ([M, N/2])."""
    h = _add(x, residual)
    acc = torch.promote_types(x.dtype, torch.float32)
    hf = h.to(acc)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = ((hf @ w.to(acc).t()) * rstd).to(x.dtype)
    return (_glu(y) if glu else y), (h if residual is not None else x.new_empty(0, x.shape[-1]))


def project(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float, glu: bool,
            use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the step calls: x, residual [..., K] -> (y [..., N or N/2], h = x + residual [..., K], or x itself when
    residual is None). Through the op when ``use_kernel`` and the kernel applies (at most ``MAX_ROWS`` rows),
    else the same formula in torch (the GEMM in the activations' dtype through ``gemv.linear``: the skinny kernel
    up to ``gemv.MAX_ROWS`` rows when ``use_kernel``, else cuBLAS; then the fp32 row scale)."""
    lead, K = x.shape[:-1], x.shape[-1]
    if use_kernel and kernel_applies(x, residual, w, glu):
        y, h = norm_linear(x.reshape(-1, K), None if residual is None else residual.reshape(-1, K), w, eps, glu)
        return y.reshape(*lead, y.shape[-1]), (x if residual is None else h.reshape(*lead, K))
    h = _add(x, residual)
    rstd = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)
    y = (gemv.linear(h, w, use_kernel).float() * rstd).to(x.dtype)
    return (_glu(y) if glu else y), h


MAX_ROWS = env_int("FLARECTL_NORM_GEMV_MAX_ROWS", 32, high=64, power_of_two=True)
"""Largest M the fused kernel takes (env ``FLARECTL_NORM_GEMV_MAX_ROWS``, read at import; at most
``gemv.MAX_ROWS`` apply). Its Gram matrix is [BM, BM] for a dot tile of BM rows. Steps with more rows (trust steps,
C x 2B = 64 at C=8) add and normalise in torch and project through ``gemv.linear`` (the skinny kernel up to
``gemv.MAX_ROWS`` rows, else cuBLAS). On the H100 (Qwen3.5-2B shape, C=8, session 11): 16 -> 32 took the window step
(32 rows) from 2.410 to 2.344 ms; 64 left the trust step (64 rows, the add in torch) as it was (2.716 -> 2.721 ms).
32 is the default since session 12, when the kernel's CUDA test at 24 and 64 rows and the graphed engine step at 32
passed on the H100 (docs/perf/engine_session12/gpu/tests/); sessions 7-11 used 16."""

ADD_MAX_ROWS = 32
"""Largest M whose residual add rides in the dot tile (x's rows over the residual's: a 64-row tile). Above it the
add runs in torch first (``launch``) and the kernel takes h = x + residual as its input (rounded, as the twin does)."""


def kernel_applies(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, glu: bool) -> bool:
    """Shapes the kernel takes: as ``gemv.kernel_applies`` with at most ``MAX_ROWS`` rows, residual like x, an even
    N with ``glu``."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (rows <= MAX_ROWS and gemv.kernel_applies(x, w) and (residual is None or (residual.shape == x.shape
                                                                and residual.dtype == x.dtype))
            and (not glu or w.shape[0] % 2 == 0))


# -- the kernel -------------------------------------------------------------------------------------------------

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    gemv._kernels()  # defines the shared tile helpers (gemv._w_tile, gemv._mma)
    _w_tile, _mma, _l2_prefetch = gemv._w_tile, gemv._mma, gemv._l2_prefetch

    @triton.jit
    def _norm_finish(acc, ss, K, eps, y, pid_n, M, N, R: tl.constexpr, BN: tl.constexpr, GLU: tl.constexpr):
        """acc [R, BN] fp32 products of this column block, ss [R] sums of squares -> y (rows < M)."""
        rm = tl.arange(0, R)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        out = acc * rstd[:, None]
        if GLU:  # interleaved columns: (gate, up) pairs; silu(gate) * up, as eager torch rounds them
            HALF: tl.constexpr = BN // 2
            o = out.to(y.dtype.element_ty).to(tl.float32)
            gate, up = tl.split(tl.reshape(o, [R, HALF, 2]))
            act = (gate / (1.0 + tl.exp(-gate))).to(y.dtype.element_ty).to(tl.float32)
            cols = pid_n * HALF + tl.arange(0, HALF)
            tl.store(y + rm[:, None] * (N // 2) + cols[None, :], (act * up).to(y.dtype.element_ty),
                     mask=(rm[:, None] < M) & (cols[None, :] < N // 2))
        else:
            rn = pid_n * BN + tl.arange(0, BN)
            tl.store(y + rm[:, None] * N + rn[None, :], out.to(y.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _halves(t, R: tl.constexpr, BN: tl.constexpr):
        """[2R, BN] -> [R, BN]: the sum of the top and bottom halves (x's and the residual's rows)."""
        top, bottom = tl.split(tl.permute(tl.reshape(t, [2, R, BN]), [1, 2, 0]))
        return top + bottom

    @triton.jit
    def _a_tile(p_a, a_ok, k_ok, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(p_a, mask=a_ok, other=0.0)
        return tl.load(p_a, mask=a_ok & k_ok[None, :], other=0.0)

    globals().update(_norm_finish=_norm_finish, _halves=_halves, _a_tile=_a_tile, _w_tile=_w_tile, _mma=_mma,
                     _l2_prefetch=_l2_prefetch, _l2_next_lines=l2_next.lines(), tl=tl)

    @triton.jit
    def norm_gemv_kernel(x, res, w, y, h, ws, counter, M, N, K, stride_wn, k_per_split, eps,
                         nx, n_nx, row_nx, stride_nx, seg_nx, segstride_nx,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                         EVEN_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ADD: tl.constexpr,
                         GLU: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr, PRE: tl.constexpr,
                         TRIGGER: tl.constexpr, L2_LINES: tl.constexpr, LINE: tl.constexpr,
                         NX: tl.constexpr, NX_END: tl.constexpr, NXB: tl.constexpr):
        if NX and not NX_END:  # the next GEMM's first weight bytes into L2 (``l2_next``; hints)
            _l2_next_lines(nx, n_nx, row_nx, stride_nx, seg_nx, segstride_nx, 128, NXB)
        # The A tile's rows are x's (ADD: x's in the top half, the residual's in the bottom half), loaded straight
        # into the dots (computed operands would cost the loads their pipelining): acc = A @ W^T (ADD: the halves
        # summed, (x + r) @ W^T), and the Gram matrix A @ A^T on the tensor cores gives the rows' sums of squares
        # (ADD: |x + r|^2 = G[i,i] + 2 G[i,i+R] + G[i+R,i+R]).
        R: tl.constexpr = BM // 2 if ADD else BM
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        ri = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        k0 = pid_s * k_per_split
        row = ri % R
        if ADD:
            base = tl.where(ri >= R, res, x) + row * K
        else:
            base = x + row * K
        a_ok = (row < M)[:, None]
        p_a = base[:, None] + (k0 + rk)[None, :]
        p_w = w + rn[None, :].to(tl.int64) * stride_wn + (k0 + rk)[:, None]  # [BK, BN] tile of w^T
        n_mask = rn[None, :] < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        gram = tl.zeros([BM, BM], dtype=tl.float32)
        if PRE > 0:
            # Programmatic dependent launch (gemv.use_pdl, gemv.pdl_plan): let the next kernel launch (TRIGGER 0:
            # now; 1: after the loop), stream the first PRE weight tiles (and prefetch L2_LINES more lines per column
            # into L2: they do not depend on the previous kernel), then wait for the previous kernel before reading x.
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
            a_pre = _a_tile(base[:, None] + (k0 + rkp)[None, :], a_ok, kp_ok, False)
            gram = _mma(gram, a_pre, tl.trans(a_pre), IEEE, UPCAST)  # the Gram dot first: see the loop
            acc = _mma(acc, a_pre, b_pre, IEEE, UPCAST)
            p_a += PRE * BK
            p_w += PRE * BK
        for kk in range(PRE * BK, k_per_split, BK):
            k_ok = (k0 + kk + rk) < K
            b = _w_tile(p_w, n_mask, k_ok, EVEN_K, EVEN_N)
            a = _a_tile(p_a, a_ok, k_ok, EVEN_K)
            # The Gram dot comes first. Triton gives two dots that share an operand one warp layout, taken from the
            # first it converts: the [BM, BN] product first (as before session 18) made that [num_warps, 1], every
            # warp computing the whole 16-row tile (4x the tensor-core work and shared-memory reads of the weight
            # tile: 80 HMMA and 48 LDSM per K step on sm_90 against the plain kernel's 16 and 16). With the Gram
            # first, [1, num_warps]: each warp its own columns (24 HMMA, 20 LDSM; 128 loop instructions, was 228).
            gram = _mma(gram, a, tl.trans(a), IEEE, UPCAST)
            acc = _mma(acc, a, b, IEEE, UPCAST)
            p_a += BK
            p_w += BK
        if PDL and TRIGGER == 1:
            tl.extra.cuda.gdc_launch_dependents()
        diag = ri[:, None] == ri[None, :]
        if ADD:
            cross = ri[None, :] == ri[:, None] + R
            t = tl.sum(gram * (diag.to(tl.float32) + 2.0 * cross.to(tl.float32)), axis=1)
            ss = tl.sum(tl.reshape(t, [2, R]), axis=0)
            acc_y = _halves(acc, R, BN)
            # h = x + r (rounded as eager torch adds them): this split's K chunks, spread over the column blocks
            rm = tl.arange(0, R)
            chunks = tl.cdiv(k_per_split, BK)
            for c in range(pid_n, chunks, tl.num_programs(0)):
                kc = k0 + c * BK + rk
                offs = rm[:, None] * K + kc[None, :]
                if EVEN_K:
                    h_mask = (rm < M)[:, None]
                else:
                    h_mask = (rm < M)[:, None] & (kc < K)[None, :]
                xa = tl.load(x + offs, mask=h_mask, other=0.0)
                ra = tl.load(res + offs, mask=h_mask, other=0.0)
                tl.store(h + offs, (xa.to(tl.float32) + ra.to(tl.float32)).to(xa.dtype), mask=h_mask)
        else:
            ss = tl.sum(tl.where(diag, gram, 0.0), axis=1)
            acc_y = acc
        if SPLIT == 1:
            _norm_finish(acc_y, ss, K, eps, y, pid_n, M, N, R, BN, GLU)
        else:
            # every split stores its fp32 partial product and sum of squares; the last to arrive at this column
            # block's counter sums them in split order (deterministic), finishes, and resets the counter
            rm = tl.arange(0, R)
            m_mask = rm[:, None] < M
            offs = rm[:, None] * N + rn[None, :]
            tl.store(ws + pid_s * M * N + offs, acc_y, mask=m_mask & n_mask)
            p_ss = ws + SPLIT * M * N + pid_n * SPLIT * M + rm
            tl.store(p_ss + pid_s * M, ss, mask=rm < M)
            tl.debug_barrier()  # every thread's partials stored before the (release) arrival
            arrived = tl.atomic_add(counter + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                acc_y = tl.load(ws + offs, mask=m_mask & n_mask, other=0.0, cache_modifier=".cg")
                ss = tl.load(p_ss, mask=rm < M, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    acc_y += tl.load(ws + s * M * N + offs, mask=m_mask & n_mask, other=0.0, cache_modifier=".cg")
                    ss += tl.load(p_ss + s * M, mask=rm < M, other=0.0, cache_modifier=".cg")
                _norm_finish(acc_y, ss, K, eps, y, pid_n, M, N, R, BN, GLU)
                tl.atomic_xchg(counter + pid_n, 0)
        if NX and NX_END:
            _l2_next_lines(nx, n_nx, row_nx, stride_nx, seg_nx, segstride_nx, 128, NXB)

    _KERNEL = norm_gemv_kernel
    return _KERNEL


def launch(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float, glu: bool,
           cfg: gemv.Config, pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel with one launch configuration (``norm_linear``'s contract; x, residual [M, K], M <= 64);
    ``pdl``: programmatic dependent launch (None: ``gemv.use_pdl``). Above ``ADD_MAX_ROWS`` rows the residual add
    runs in torch first."""
    kernel = _kernel()
    x = x.contiguous()
    M, K = x.shape
    if residual is not None and M > ADD_MAX_ROWS:
        h = x + residual
        return launch(h, None, w, eps, glu, cfg, pdl)[0], h
    N = w.shape[0]
    split, per = gemv.split_plan(K, cfg.bk, cfg.split)
    y = gemv._empty((M, N // 2 if glu else N), x.dtype, x.device)
    h = gemv._empty((M, K), x.dtype, x.device) if residual is not None else x.new_empty(0, K)
    blocks = -(-N // cfg.bn)
    ws = gemv._empty((split * M * N + blocks * split * M,), torch.float32, x.device) if split > 1 else y
    counter = gemv.arrival_counters(x.device, blocks) if split > 1 else y
    res = residual.contiguous() if residual is not None else x
    bm = gemv.row_block(2 * M if residual is not None else M)  # ADD: x's rows on top, the residual's below
    common = gemv._common(x, N, split * per == K, cfg, pdl, bm=bm)
    l2_next.note_split(w, split, per)
    kernel[(blocks, split)](x, res, w, y, h if residual is not None else x, ws, counter, M, N, K, w.stride(0), per,
                            float(eps), ADD=residual is not None, GLU=glu, SPLIT=split, **common,
                            **l2_next.kernel_args(w, cfg.warps))
    return y, h


_CHOSEN: dict[tuple, gemv.Config] = {}


def config_for(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float,
               glu: bool) -> gemv.Config:
    """The launch configuration for this shape: tuned once per process outside capture (``gemv.measure`` among
    ``gemv.candidates``; ``gemv.tune_mode`` off: the heuristic), kept per (M, N, K, dtype, variant)."""
    key = gemv._key(x, w, "norm" + ("+glu" if glu else "") + ("+add" if residual is not None else ""))
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return cfg
    M, K = x.shape
    N = w.shape[0]
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if x.is_cuda and not capturing and gemv.tune_mode() != "off":
        results = []
        for c in gemv.candidates(M, N, K, x.device):
            try:
                results.append((c, gemv.measure(lambda wi: launch(x, residual, wi, eps, glu, c), w)))  # noqa: B023
            except Exception:  # noqa: BLE001 - a config that does not fit (resources): skip it
                continue
        gemv.TIMINGS[key] = results
        cfg = min(results, key=lambda r: r[1])[0]
    else:
        cfg = gemv.default_config(M, N, K, x.device)
    if not capturing:
        _CHOSEN[key] = cfg
    return cfg


@torch.library.custom_op("flarectl::norm_linear", mutates_args=())
def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float,
                glu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) of ``norm_linear_reference`` in one kernel launch (above ``ADD_MAX_ROWS`` rows with a residual: the
    add, then the launch): x, residual [M, K] (M <= 64; residual may be None), w [N, K] (gain folded; ``glu``: rows interleaved) -> y [M, N] or [M, N/2], h [M, K] (or [0, K]). The
    Triton kernel on CUDA or under the interpreter; the twin elsewhere."""
    if not (x.is_cuda or gemv._interpreting()):
        return norm_linear_reference(x, residual, w, eps, glu)
    x = x.contiguous()
    return launch(x, residual, w, eps, glu, config_for(x, residual, w, eps, glu))


@norm_linear.register_fake
def _(x, residual, w, eps, glu):
    n = w.shape[0] // 2 if glu else w.shape[0]
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0] if residual is not None else 0, x.shape[1])
