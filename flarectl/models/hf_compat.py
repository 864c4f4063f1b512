"""Keep HF's own modeling usable on CPU when flash-linear-attention and Triton are installed.

transformers binds fla's kernels into the Qwen3.5 / Qwen3-Next modeling modules once, at import, without a device
check, so with fla + triton installed and no GPU the first HF forward crashes ("0 active drivers"). On a machine
without CUDA we rebind those module globals to the pure-torch functions they wrap. flarectl's own runner never
calls them; this matters for HF baselines (`generate`) and parity tests.
"""

from __future__ import annotations

import importlib
import inspect

import torch

_KERNEL_FUNCS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                 "causal_conv1d_update")
_MODULES = ("transformers.models.qwen3_5.modeling_qwen3_5", "transformers.models.qwen3_next.modeling_qwen3_next")


def use_torch_fallbacks_on_cpu() -> None:
    """Rebind HF's hybrid-model kernel functions to their pure-torch versions when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    for mod_name in _MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            continue
        for fn_name in _KERNEL_FUNCS:
            fn = getattr(mod, fn_name, None)
            if fn is not None:
                setattr(mod, fn_name, inspect.unwrap(fn))
