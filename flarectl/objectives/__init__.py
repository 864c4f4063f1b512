"""Training objectives: ``flare`` (clean causal stream + complementary noisy views), ``block-diffusion`` (noisy views
over a block-causal clean context, no AR loss) and ``ar`` (plain next-token SFT)."""

from flarectl.objectives.losses import LossTerms, cross_entropy_sum, two_stream_loss_terms
from flarectl.objectives.two_stream import (
    IGNORE,
    PackedRow,
    TwoStreamBatch,
    build_two_stream_batch,
    response_blocks,
)

OBJECTIVES = ("flare", "block-diffusion", "ar")

__all__ = ["IGNORE", "OBJECTIVES", "LossTerms", "PackedRow", "TwoStreamBatch", "build_two_stream_batch",
           "cross_entropy_sum", "response_blocks", "two_stream_loss_terms"]
