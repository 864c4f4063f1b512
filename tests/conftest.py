"""Shared fixtures. GPU tests (marked ``gpu``) are skipped when CUDA is unavailable."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def debug_models():
    """name -> fp64 FlareModel for the two tiny presets (hybrid and Llama)."""
    from flarectl.models.loading import load_model

    models = {}
    for name in ("debug-hybrid", "debug-llama"):
        m = load_model(name, dtype="float32", device="cpu", seed=1)
        m.hf.double()
        models[name] = m
    return models
