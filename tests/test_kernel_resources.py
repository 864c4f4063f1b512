"""Our Triton kernels' default launch configurations fit an H100 (sm_90): compiled on CPU with Triton's compiler
and the ptxas it runs, shipped in the triton wheel (no GPU needed). Guards against ``OutOfResources: shared memory`` at
the first launch on the device, which the interpreter tests cannot see."""

from __future__ import annotations

import pytest

H100_SHARED_BYTES = 232448  # per-block opt-in limit reported by the H100


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["fwd", "bwd-values", "bwd-keys"])  # the defaults (V <= 128)
def test_chunk_window_kernels_fit_h100_shared_memory(kernel):
    pytest.importorskip("triton")
    from flare_kernels.bench.offline_compile import compile_report
    from flare_kernels.two_stream import triton_chunk_windows as tcw
    from flare_kernels.two_stream import triton_chunk_windows_bwd as tcwb

    cfg = {"fwd": tcw.FWD_CONFIG, "bwd": tcw.BWD_CONFIG, "bwd-values": tcwb.VALUES_CONFIG,
           "bwd-keys": dict(BV=tcwb.KEYS_CONFIG["BK"], num_warps=tcwb.KEYS_CONFIG["num_warps"])}[kernel]
    r = compile_report(kernel, cfg["BV"], cfg["num_warps"], maxw=8)  # block size 8: the longest substitution
    assert 0 < r["shared_bytes"] <= H100_SHARED_BYTES, r
    assert r["registers"] is None or r["registers"] <= 255, r  # None: the wheel's ptxas could not be run here


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [False, True])  # the state's read-out: serial (default) or parallel
@pytest.mark.parametrize("token_block,early,chunk,max_registers", [
    (1, False, False, 128),  # an AR step (W = 1): 4 programs of 4 warps per SM
    (1, True, False, 128),  # a step of several tokens per row, one at a time (the default since session 20)
    (8, True, False, None),  # 8 tokens' inputs prepared together (opt-in): 255 registers, a few bytes spilled
    (16, True, True, 255)])  # the chunk form (opt-in; 3 x TF32 on whole [16, K] tiles once spilled hundreds of bytes)
def test_engine_mixer_kernel_compiles_for_sm90(token_block, early, chunk, max_registers, parallel):
    """The one-kernel GDN mixer at the Qwen3.5-2B shape (bf16, 32-column state blocks, 4 warps), compiled for sm_90
    as the JIT specializes a launch (16-aligned pointers and strides), fits the shared memory and, where a bound is
    given, that many registers with nothing spilled (a second on-chip state copy for anchored windows once took it
    to 233: half the programs per SM); either read-out of the state (``mixer.PARALLEL_READOUT``); at an AR step's
    order of loads and stores and at a multi-token step's (``EARLY``: conv context loaded first, the tail's loads
    together); the chunk form (``mixer.CHUNK``). The device's Triton may count differently: 3.6 took the AR and
    multi-token builds to 149 and 168 registers (docs/perf/engine.md, session 21)."""
    c, regs, spills = _compile_mixer_sm90(token_block, early, chunk, parallel)
    if max_registers is not None:
        assert regs is not None, "ptxas could not report"  # Triton assembled the cubin with the same ptxas
        assert regs <= max_registers and spills == 0, (regs, spills)
    assert "prefetch.global.L2" not in c.asm["ptx"]


@pytest.mark.parametrize("parallel", [False, True])
def test_engine_mixer_anchor_reuse_compiles_for_sm90(parallel):
    """The multi-token mixer with ``mixer.ANCHOR_REUSE`` (no start-state round trip for anchored windows) keeps the
    multi-token build's bound: <= 128 registers, nothing spilled."""
    c, regs, spills = _compile_mixer_sm90(1, True, False, parallel, reuse=True)
    assert regs is not None, "ptxas could not report"
    assert regs <= 128 and spills == 0, (regs, spills)


@pytest.mark.slow
@pytest.mark.parametrize("at_end", [False, True])
@pytest.mark.parametrize("token_block,early", [(1, False), (1, True)])
def test_engine_mixer_l2_prefetch_compiles_for_sm90(token_block, early, at_end):
    """The mixer with its L2 prefetch of the next GEMMs' weights (``mixer.L2_NEXT_KB``), issued at the program's
    start or end: the PTX carries the prefetches, and the AR and multi-token builds keep the plain build's bound
    (<= 128 registers, nothing spilled): the prefetch holds no register past its instruction."""
    c, regs, spills = _compile_mixer_sm90(token_block, early, False, False, l2=True, l2_end=at_end)
    assert "prefetch.global.L2::evict_last" in c.asm["ptx"]
    assert regs is not None, "ptxas could not report"
    assert regs <= 128 and spills == 0, (regs, spills)


def _compile_mixer_sm90(token_block, early, chunk, parallel, l2=False, l2_end=False, reuse=False):
    """The mixer kernel compiled for sm_90 at the Qwen3.5-2B shape (see the test above) -> (kernel, registers,
    spilled bytes)."""
    pytest.importorskip("triton")
    from flarectl.engine import mixer

    fn = mixer._kernel()
    consts = dict(H=16, HV=16, K=128, V=128, S=3, BK=128, BV=32, NV=4, BVF=128, BS=4, HAS_BIAS=False,
                  ROUND_PROD=True, PDL=False, TB=token_block, TBN=8 if early else 1, EARLY=early, PARALLEL=parallel,
                  CHUNK=chunk, BVP=32, KC=32, L2=l2, L2_END=l2_end, LINE=mixer.L2_LINE, L2B=128, REUSE=reuse)
    types = dict(proj="*bf16", cw="*bf16", cb="*bf16", A_log="*fp32", dt_bias="*bf16", nw="*bf16", out="*bf16",
                 state="*fp32", last="*fp32", wstart="*fp32", conv="*bf16", lconv="*bf16", counts="*i64",
                 seen="*i64", commit="*i1", counter="*i32", l2a="*bf16", l2b="*bf16", n_l2a="i32", n_l2b="i32",
                 row_l2b="i32", stride_l2b="i32",
                 scale="fp32", eps="fp32", W="i32", wc="i32", s_pc="i32", s_pt="i32", s_oc="i32", s_ot="i32")
    aligned = [n for n, t in types.items() if t.startswith("*")] + ["s_pc", "s_pt", "s_oc", "s_ot"]
    c, regs, spills = _compile_sm90(fn, types, consts, num_warps=4, num_stages=3, aligned=aligned, spills=True)
    assert c.asm.get("cubin") and c.metadata.shared <= H100_SHARED_BYTES
    return c, regs, spills


def _compile_sm90(fn, types: dict, consts: dict, num_warps: int, num_stages: int, aligned=(), spills=False):
    """Compile a jitted kernel for sm_90 on this CPU box -> (compiled kernel, registers or None[, spilled bytes or
    None with ``spills``]). ``aligned``: the
    arguments marked 16-divisible (pointers of fresh torch tensors, sizes and strides that are multiples of 16), as
    the JIT specializes them at a real launch: without the mark Triton cannot vectorise the loads to 16 bytes and
    leaves every loop unpipelined (no ``cp.async``), so an unmarked offline compile misreports what the device runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flare_kernels.bench.offline_compile import ptxas_report

    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=num_warps,
                                                                              num_stages=num_stages))
    report = ptxas_report(c.asm["ptx"], 90)
    return (c, report["registers"], report["spill_stores"]) if spills else (c, report["registers"])


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["gemv", "norm"])
@pytest.mark.parametrize("pdl,pre,trigger,l2_lines", [(0, 0, 0, 0), (1, 1, 0, 0), (1, 2, 0, 0), (1, 2, 1, 8),
                                                      (1, 4, 0, 0)])
def test_skinny_kernels_compile_for_sm90_pipelined(kernel, pdl, pre, trigger, l2_lines):
    """The skinny GEMM and the fused norm projection at a Qwen3.5-2B AR-step shape (bf16, 64 x 128 tiles, 3 stages,
    split-K finished in-kernel), without and with programmatic dependent launch: PRE weight tiles loaded before
    ``gdc_wait``, the early or late trigger, L2 prefetch lines (the ``griddepcontrol`` branch runs only on sm_90+,
    never under the interpreter). Each compiles for sm_90 within the shared-memory limit, without spilling past 255
    registers where ptxas can report; the PTX carries both griddepcontrol instructions with PDL (none without) and
    the prefetches when asked; and the K loop stays software-pipelined (``cp.async`` stages in shared memory): the
    weight stream's bytes in flight per program, which a loop-carried register look-ahead was found to cost (the
    pipeliner then skips the loop; session 13, docs/perf/engine.md)."""
    c, regs = _compile_skinny_sm90(kernel, pdl, pre, trigger, l2_lines)
    ptx = c.asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == bool(pdl) and ("griddepcontrol.launch_dependents" in ptx) == bool(pdl)
    assert ("prefetch.global.L2" in ptx) == (l2_lines > 0)
    assert "cp.async" in ptx and "async_copy_global_to_local" in c.asm["ttgir"], "the K loop is not pipelined"
    assert c.metadata.shared >= 2 * 128 * 64 * 2  # at least two stages of weight tiles in shared memory
    assert c.metadata.shared <= H100_SHARED_BYTES
    assert regs is None or regs <= 255, regs


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["gemv", "norm"])
@pytest.mark.parametrize("at_end", [False, True])
def test_skinny_kernels_with_l2_next_compile_for_sm90(kernel, at_end):
    """With the prefetch of the next GEMM's weight rows (``l2_next``) at the program's start or end, the skinny GEMM
    and the fused norm projection still compile for sm_90 pipelined, with the prefetches in the PTX and no register
    spilled; and without it, none in the PTX."""
    c, regs, spills = _compile_skinny_sm90(kernel, 0, 0, 0, 0, nx=True, nx_end=at_end, spills=True)
    ptx = c.asm["ptx"]
    assert "prefetch.global.L2::evict_last" in ptx
    assert "cp.async" in ptx and "async_copy_global_to_local" in c.asm["ttgir"], "the K loop is not pipelined"
    assert regs is not None, "ptxas could not report"
    assert regs <= 255 and spills == 0, (regs, spills)
    assert "evict_last" not in _compile_skinny_sm90(kernel, 0, 0, 0, 0)[0].asm["ptx"]


def _compile_skinny_sm90(kernel, pdl, pre, trigger, l2_lines, nx=False, nx_end=True, spills=False):
    """The skinny GEMM ('gemv') or the fused norm projection ('norm') at a Qwen3.5-2B AR-step shape (bf16, 64 x 128
    tiles, 3 stages, split 2 finished in-kernel) compiled for sm_90 as a launch specializes it -> ``_compile_sm90``'s
    result."""
    pytest.importorskip("triton")
    from flarectl.engine import gemv, l2_next, norm_gemv

    common = dict(BM=16, BN=64, BK=128, EVEN_K=True, EVEN_N=True, IEEE=False, UPCAST=False, PDL=pdl, PRE=pre,
                  TRIGGER=trigger, L2_LINES=l2_lines, LINE=64, SPLIT=2, **l2_next.offline_consts(nx, nx_end))
    sizes = ["N", "K", "k_per_split", "stride_wn"]
    if kernel == "gemv":
        fn = gemv._kernels()[0]
        consts = dict(common, PARTIAL=False, SWIGLU=False, RESIDUAL=True)
        types = dict(x="*bf16", w="*bf16", y="*bf16", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
                     k_per_split="i32", res="*bf16", ws="*fp32", counter="*i32", up_off="i32")
        aligned = ["x", "w", "y", "res", "ws", "counter", "stride_xm", *sizes]
    else:
        fn = norm_gemv._kernel()
        consts = dict(common, ADD=True, GLU=True)
        types = dict(x="*bf16", res="*bf16", w="*bf16", y="*bf16", h="*bf16", ws="*fp32", counter="*i32", M="i32",
                     N="i32", K="i32", stride_wn="i32", k_per_split="i32", eps="fp32")
        aligned = ["x", "res", "w", "y", "h", "ws", "counter", *sizes]
    types.update(l2_next.OFFLINE_TYPES)
    return _compile_sm90(fn, types, consts, num_warps=4, num_stages=3, aligned=aligned + ["nx"], spills=spills)


@pytest.mark.slow
@pytest.mark.parametrize("add,glu,bn", [(True, False, 64), (True, True, 64), (False, False, 32), (True, True, 128)])
def test_norm_kernel_warps_split_the_columns(add, glu, bn):
    """The fused-norm projection's two dots (the product and the Gram matrix of the same A tile) get one warp
    layout from Triton, that of the dot it converts first. On a 16-row tile it must split the columns over the
    warps ([1, num_warps]), as the plain skinny kernel's does: with [num_warps, 1] every warp computed the whole
    tile (sm_90: 80 HMMA and 48 shared-memory matrix loads per K step against 24 and 20; docs/perf/engine.md,
    session 18)."""
    pytest.importorskip("triton")
    import re

    from flarectl.engine import l2_next, norm_gemv

    consts = dict(BM=16, BN=bn, BK=128, EVEN_K=True, EVEN_N=True, IEEE=False, UPCAST=False, PDL=0, PRE=0,
                  TRIGGER=0, L2_LINES=0, LINE=64, SPLIT=1, ADD=add, GLU=glu, **l2_next.offline_consts())
    types = dict(x="*bf16", res="*bf16", w="*bf16", y="*bf16", h="*bf16", ws="*fp32", counter="*i32", M="i32",
                 N="i32", K="i32", stride_wn="i32", k_per_split="i32", eps="fp32", **l2_next.OFFLINE_TYPES)
    aligned = ["x", "res", "w", "y", "h", "ws", "counter", "N", "K", "k_per_split", "stride_wn"]
    c, _ = _compile_sm90(norm_gemv._kernel(), types, consts, num_warps=4, num_stages=4, aligned=aligned)
    layouts = set(re.findall(r"nvidia_mma<\{[^}]*warpsPerCTA = (\[[^\]]*\])", c.asm["ttgir"]))
    assert layouts == {"[1, 4]"}, layouts


@pytest.mark.slow
@pytest.mark.parametrize("pdl,gate", [(0, False), (1, False), (0, True)])
def test_decode_attention_kernel_compiles_for_sm90(pdl, gate):
    """The decode-attention kernel at the Qwen3.5-2B attention shape (bf16, 8 query / 2 kv heads, D 256, an AR step's
    4 query heads per tile, 2 splits; with and without the output gate) compiles for sm_90 within the shared-memory
    limit, with the griddepcontrol instructions exactly when PDL is on (``gemv.use_pdl``: the step's launches stay
    programmatic around attention)."""
    pytest.importorskip("triton")
    from flarectl.engine import attention

    fn = attention._kernel()
    consts = dict(HKV=2, G=4, D=256, BD=256, BM=16, BN=64, BW=16, SPLITS=2, TQ=1, IEEE=False, UPCAST=False, PDL=pdl,
                  GATE=gate)
    types = {n: "*bf16" for n in ("q", "kc", "vc", "kw", "vw", "out", "gate")}
    types.update(ws_acc="*fp32", ws_ml="*fp32", counter="*i32", lengths="*i64", counts="*i64", wlen="*i64",
                 scale="fp32")
    ints = [n for n in fn.arg_names if n not in types and n not in consts]
    types.update({n: "i32" for n in ints})
    aligned = ["q", "kc", "vc", "kw", "vw", "out", "gate", "ws_acc", "ws_ml", "counter", "lengths", "counts", "wlen"]
    c, regs = _compile_sm90(fn, types, consts, num_warps=4, num_stages=3, aligned=aligned)
    ptx = c.asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == bool(pdl) and ("griddepcontrol.launch_dependents" in ptx) == bool(pdl)
    assert c.metadata.shared <= H100_SHARED_BYTES
    assert regs is None or regs <= 255, regs


@pytest.mark.slow
@pytest.mark.parametrize("gated,norm,pdl", [(True, True, 0), (True, True, 1), (False, False, 0)])
def test_attention_prologue_kernel_compiles_for_sm90(gated, norm, pdl):
    """The attention prologue (``attention_core``) at the Qwen3.5-2B attention shape (bf16, 8 query / 2 kv heads,
    D 256, 64 rotary dims) compiles for sm_90 without spilling (one token per program, all its heads); with PDL
    (``griddepcontrol`` wait and trigger, the branch that never runs interpreted) too."""
    pytest.importorskip("triton")
    from flarectl.engine import attention_core

    fn = attention_core._kernel()
    consts = dict(R=64, BHQ=8, BHK=2, BD=256, GATED=gated, NORM=norm, ROPE=True, PDL=pdl)
    types = {n: "*bf16" for n in ("qkv", "cos", "sin", "key", "value", "q_out", "k_win", "v_win")}
    types.update(gain_q="*fp32", gain_k="*fp32", lengths="*i64", eps="fp32")
    types.update({n: "i32" for n in fn.arg_names if n not in types and n not in consts})
    aligned = [n for n in types if types[n].startswith("*")]
    c, regs = _compile_sm90(fn, types, consts, num_warps=4, num_stages=1, aligned=aligned)
    assert c.metadata.shared <= H100_SHARED_BYTES
    assert regs is None or regs <= 128, regs


@pytest.mark.parametrize("split", [1, 8, 64])
@pytest.mark.parametrize("dtype", ["*bf16", "*fp32"])
def test_argmax_confidence_kernel_compiles_for_sm90(split, dtype):
    """The greedy read-out (``flarectl.engine.argmax``) compiles for sm_90 without spilling: one row's split of the
    vocabulary per program, the last arrival combining up to 64 splits (the combine is unrolled)."""
    pytest.importorskip("triton")
    from flarectl.engine import argmax

    fn = argmax._kernel()
    consts = dict(SPLIT=split, BLOCK=argmax.BLOCK)
    types = dict(x=dtype, out="*fp32", ws="*fp32", counter="*i32", N="i32", V="i32", stride_row="i32",
                 per_split="i32")
    c, regs, spilled = _compile_sm90(fn, types, consts, num_warps=4, num_stages=1,
                                     aligned=["x", "out", "ws", "counter", "V", "stride_row", "per_split"], spills=True)
    assert c.metadata.shared <= H100_SHARED_BYTES
    assert regs is None or regs <= 128, regs
    assert not spilled, spilled


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_rows_kernel_compiles_for_sm90(dtype):
    """The masked row copy of the late commit (``flarectl.engine.row_copy``: addresses from a table) compiles for
    sm_90 without spilling."""
    pytest.importorskip("triton")
    from flarectl.engine import row_copy

    import torch

    fn, element = row_copy._kernel(getattr(torch, dtype))
    types = dict(table="*i64", rows="*u8", per_row="i32", R="i32")
    c, regs, spilled = _compile_sm90(fn, types, dict(BLOCK=row_copy.BLOCK, ELEMENT=element), num_warps=4,
                                     num_stages=1, aligned=["table", "per_row"], spills=True)
    assert c.metadata.shared <= H100_SHARED_BYTES
    assert regs is None or regs <= 128, regs
    assert not spilled, spilled
