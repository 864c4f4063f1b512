"""Our Triton kernels' default launch configurations fit an H100 (sm_90): compiled on CPU with Triton's compiler
and the ptxas shipped in the triton wheel (no GPU needed). Guards against ``OutOfResources: shared memory`` at
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
