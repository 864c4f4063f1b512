"""Shared engine-test helpers (a module, not a fixture: the interpreter child and the parent both import it)."""

from __future__ import annotations

import torch


def cuda_ar_steps(backend, steps: int = 3, shift: bool = False) -> list[torch.Tensor]:
    """Prefill four slots of a CUDA ``SlotBackend`` and run ``steps`` AR steps (one clean token a row, every row
    committing) -> the logits of each step (fp32 copies). ``shift``: a different token each step."""
    backend.prefill([0, 1, 2, 3], [[5, 6, 7], [], list(range(10, 30)), [9]])
    ids = torch.arange(4, device="cuda")[:, None] + 3
    ones = torch.ones(4, dtype=torch.long, device="cuda")
    return [backend.step(ids + (i if shift else 0), ones, ones * 0, ones.bool(), 1).float().clone()
            for i in range(steps)]
