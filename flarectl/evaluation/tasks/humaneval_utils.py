"""Functions referenced by ``flarectl_humaneval*.yaml`` (lm-eval loads this file by path via ``!function``).

Thin wrappers: the logic and its tests live in `flarectl.evaluation.humaneval`. The names match lm-eval's
humaneval utils, so the metric is registered as ``pass_at_k`` exactly as upstream.
"""

from __future__ import annotations

from typing import Any, Sequence

from flarectl.evaluation import humaneval


def load_dataset(**kwargs: Any) -> Any:
    """The bundled 164 problems as a ``DatasetDict`` with split "test"."""
    return humaneval.lm_eval_dataset(**kwargs)


def build_predictions(resps: list[list[str]], docs: list[dict[str, Any]]) -> list[list[str]]:
    """Prompt + generation for every generation of every doc."""
    return humaneval.lm_eval_build_predictions(resps, docs)


def pass_at_k(references: list[str], predictions: list[list[str]], k: int | Sequence[int] = (1,)) -> dict[str, float]:
    """``{"pass@k": ...}`` from executing every prediction against its reference in flarectl's sandbox."""
    return humaneval.lm_eval_pass_at_k(references, predictions, k)
