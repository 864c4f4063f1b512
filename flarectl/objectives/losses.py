"""Loss terms of the two-stream objective, computed only at labelled positions, in memory-bounded chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flarectl.models.adapter import FlareModel
from flarectl.objectives.two_stream import IGNORE, TwoStreamBatch


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def cross_entropy_sum(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                      chunk: int = 4096) -> torch.Tensor:
    """Sum of token cross-entropies at positions where ``labels != IGNORE``.

    hidden [B, L, H]; labels [B, L]. Logits are formed ``chunk`` positions at a time and recomputed in backward, so
    peak memory is O(chunk x vocab) instead of O(B x L x vocab).
    """
    sel = labels != IGNORE
    h, y = hidden[sel], labels[sel]
    total = hidden.new_zeros((), dtype=torch.float32)
    weight = lm_head.weight
    if lm_head.bias is not None:
        raise ValueError("lm_head with bias is not supported")
    for i in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, h[i:i + chunk], weight, y[i:i + chunk], use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h[i:i + chunk], weight, y[i:i + chunk])
    return total


@dataclass
class LossTerms:
    """Sums (not means) of each term for one micro-batch, plus term counts."""

    ar_sum: torch.Tensor
    diffusion_sum: torch.Tensor
    ar_count: int
    diffusion_count: int


def two_stream_loss_terms(model: FlareModel, batch: TwoStreamBatch) -> LossTerms:
    """One packed forward over [clean | noisy views]; both loss terms as sums."""
    hidden = model.hidden_states(batch.input_ids, batch.layout)
    lm_head = model.hf.lm_head
    return LossTerms(cross_entropy_sum(hidden, lm_head, batch.ar_labels),
                     cross_entropy_sum(hidden, lm_head, batch.diffusion_labels),
                     batch.num_ar_terms, batch.num_diffusion_terms)
