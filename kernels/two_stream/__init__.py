"""flare_kernels.two_stream: the FLARE two-stream Gated DeltaNet and short convolution, with a dispatcher.

Public API (signatures identical to the naive twin in ``naive.py``, plus a keyword-only ``backend``):

* ``two_stream_gated_delta_rule(q, k, v, g, beta, qn, kn, vn, gn, betan, window_doc, window_prefix,
  window_offsets, cu_seqlens=None, initial_state=None, output_final_state=False, scale=None,
  use_qk_l2norm_in_kernel=False, *, backend="auto") -> (o, on, final_state)``
* ``two_stream_causal_conv1d(x, xn, weight, window_doc, window_prefix, window_offsets, bias=None,
  cu_seqlens=None, initial_state=None, output_final_state=False, activation="silu", *, backend="auto")
  -> (y, yn, final_state)``

Backends: ``"auto"`` (default): ``"fused"`` when the inputs are CUDA tensors and Triton (+ fla for the gated delta
rule) is installed, ``"reference"`` otherwise — on CPU tensors Triton and fla are never imported, even when
installed (fla crashes without a GPU). ``"fused"``: Triton kernels (CUDA). ``"reference"``: the naive twin (any
device, slow, fp32). ``"simple"``: the benchmark baseline — for the gated delta rule, materialised boundary
states + fla's chunk op over the windows (CUDA); for the convolution, a vectorised pure-torch gather (any device).
"""

from __future__ import annotations

import importlib.util

import torch

from .naive import naive_two_stream_causal_conv1d, naive_two_stream_gated_delta_rule

__all__ = [
    "BACKENDS",
    "naive_two_stream_causal_conv1d",
    "naive_two_stream_gated_delta_rule",
    "resolve_backend",
    "two_stream_causal_conv1d",
    "two_stream_gated_delta_rule",
]

BACKENDS = ("auto", "fused", "reference", "simple")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(backend: str, x: torch.Tensor, *, needs_fla: bool) -> str:
    """The backend that will run for tensors like ``x``. Never imports triton/fla."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok = x.is_cuda and _installed("triton") and (not needs_fla or _installed("fla"))
        return "fused" if ok else "reference"
    if backend == "fused" and not x.is_cuda:
        raise ValueError("backend='fused' needs CUDA tensors (use 'reference' or 'auto' on CPU)")
    if backend == "simple" and needs_fla and not x.is_cuda:
        raise ValueError("backend='simple' for the gated delta rule needs CUDA tensors")
    return backend


def two_stream_gated_delta_rule(
    q, k, v, g, beta, qn, kn, vn, gn, betan, window_doc, window_prefix, window_offsets,
    cu_seqlens=None, initial_state=None, output_final_state=False, scale=None, use_qk_l2norm_in_kernel=False,
    *, backend: str = "auto",
):
    """Two-stream gated delta rule; see ``naive.naive_two_stream_gated_delta_rule`` for the contract."""
    args = (q, k, v, g, beta, qn, kn, vn, gn, betan, window_doc, window_prefix, window_offsets)
    kw = dict(cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
              scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    b = resolve_backend(backend, q, needs_fla=True)
    if b == "reference":
        return naive_two_stream_gated_delta_rule(*args, **kw)
    if b == "fused":
        from .fused import fused_two_stream_gated_delta_rule

        return fused_two_stream_gated_delta_rule(*args, **kw)
    from .simple import simple_two_stream_gated_delta_rule

    return simple_two_stream_gated_delta_rule(*args, **kw)


def two_stream_causal_conv1d(
    x, xn, weight, window_doc, window_prefix, window_offsets, bias=None, cu_seqlens=None, initial_state=None,
    output_final_state=False, activation="silu", *, backend: str = "auto",
):
    """Two-stream causal depthwise conv1d; see ``naive.naive_two_stream_causal_conv1d`` for the contract."""
    args = (x, xn, weight, window_doc, window_prefix, window_offsets)
    kw = dict(bias=bias, cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
              activation=activation)
    b = resolve_backend(backend, x, needs_fla=False)
    if b == "reference":
        return naive_two_stream_causal_conv1d(*args, **kw)
    if b == "fused":
        from .triton_conv import triton_two_stream_causal_conv1d

        return triton_two_stream_causal_conv1d(*args, **kw)
    from .torch_conv import torch_two_stream_causal_conv1d

    return torch_two_stream_causal_conv1d(*args, **kw)
