"""Resumable training state, written atomically with safetensors + JSON (no pickle anywhere).

A training checkpoint is a directory ``step-N/`` holding the FLARE model checkpoint (HF-compatible) plus
``optimizer.safetensors`` (every tensor of the optimizer state), ``trainer_state.json`` (step, data position,
optimizer param groups and scalar state, RNG states as tensors in ``rng.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flarectl.models.adapter import FlareModel
from flarectl.models.loading import atomic_save_dir, save_checkpoint


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, pstate in state_dict["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(target: Path, model: FlareModel, optimizer: torch.optim.Optimizer, *, step: int,
                        data_position: dict, recipe, extra: dict | None = None) -> Path:
    """Write model + optimizer + RNG + progress to ``target`` atomically."""

    def write(tmp: Path) -> None:
        save_checkpoint(model, tmp / "model", recipe=recipe)
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": step, "data_position": data_position, "optimizer": meta, **(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

    return atomic_save_dir(target, write)


def load_training_state(source: Path, model: FlareModel, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from ``source``; return the trainer_state dict."""
    from safetensors.torch import load_model

    state = json.loads((source / "trainer_state.json").read_text())
    load_model(model.hf, str(source / "model" / "model.safetensors"), strict=False, device=str(model.device))
    tensors = load_file(str(source / "optimizer.safetensors"), device=str(model.device))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    rng = load_file(str(source / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return state


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The ``checkpoints/step-N`` directory with the largest N, or None."""
    root = Path(output_dir) / "checkpoints"
    steps = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None
