"""Logits processing and sampling shared by every decoding mode.

The same ``Sampler`` turns the draft logits (q) and the verify logits (p) into distributions, so temperature and
top-p are applied to both alike — which is what exact speculative sampling needs (the target distribution is the
*processed* AR distribution). ``temperature == 0`` means greedy: the distribution is one-hot at the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches ``top_p``; renormalise. probs [..., V]."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < top_p  # the top token is always kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def process_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] (float32 or float64) after temperature and top-p.

    ``temperature == 0``: one-hot at the argmax (greedy).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample per distribution: probs [..., V] -> token ids [...] (long)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


@dataclass
class Sampler:
    """Temperature / top-p processing and seeded sampling (greedy when ``temperature == 0``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, temperature: float, top_p: float, seed: int | None, device: torch.device | str = "cpu") -> "Sampler":
        gen = torch.Generator(device=device)
        gen.manual_seed(0 if seed is None else int(seed))
        return cls(float(temperature), float(top_p), gen)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] -> processed probabilities [..., V]."""
        return process_logits(logits, self.temperature, self.top_p)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] -> tokens [...]: argmax when greedy, else a seeded draw."""
        if self.greedy:
            return probs.argmax(-1)
        return sample_from(probs, self.generator)

    def uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Seeded U[0, 1) draws of ``shape`` (dtype/device of ``like``)."""
        return torch.rand(shape, generator=self.generator, device=like.device, dtype=like.dtype)
