"""Build the FLARE two-stream training row from packed documents.

Blocks and the logit shift. In a document with prompt length ``p`` (context only) and length ``n``, the targets
are the response tokens ``r0 = max(p, 1) .. n-1``. They are cut into blocks of ``B`` starting at ``r0``; block
``[s, e)`` is predicted, as in AR, from outputs one position to the left, so its **noisy window** holds the inputs
at positions ``[s-1, e-1)``: the anchor ``x[s-1]`` (always clean: the last prompt token or the previous block's
last token) followed by ``x[s..e-2]`` with the masked ones replaced by the mask token. The output at window
position ``l-1`` predicts ``x[l]``. At inference the window is exactly [last committed token, masks...].

Token-equal accounting. For every block a masked set ``M`` is drawn; view 1 masks ``M`` and view 2 masks the
complement. A target ``x[l]`` contributes a diffusion term in the view where ``l`` is masked and nowhere else (the
last target of a block is never an input, so only its membership in ``M`` decides which view scores it). With the
clean stream's next-token term, each response token has exactly one AR and one diffusion term, at unit weight.

Row layout: ``[clean packed sequence | view-1 windows | view-2 windows | padding]`` (one forward; the clean stream
is computed once). Visibility and the GDN state schedule follow from the ``StreamLayout`` (see models/layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flarectl.models.layout import StreamLayout

IGNORE = -100


@dataclass
class PackedRow:
    """One packed training sequence: ``input_ids`` [T] and per-document lengths / prompt lengths (sum(doc_lens) <= T;
    tokens past the documents are padding)."""

    input_ids: torch.Tensor
    doc_lens: list[int]
    prompt_lens: list[int]


@dataclass
class TwoStreamBatch:
    """Model inputs and labels for one micro-batch; all tensors [B, L]."""

    input_ids: torch.Tensor
    layout: StreamLayout
    ar_labels: torch.Tensor  # clean positions: next response token, else IGNORE
    diffusion_labels: torch.Tensor  # noisy positions: target of a masked position, else IGNORE

    @property
    def num_ar_terms(self) -> int:
        return int((self.ar_labels != IGNORE).sum())

    @property
    def num_diffusion_terms(self) -> int:
        return int((self.diffusion_labels != IGNORE).sum())

    def select_rows(self, start: int, stop: int) -> "TwoStreamBatch":
        """Rows [start, stop) (a data-parallel rank's share of a global micro-batch)."""
        lay = self.layout
        layout = StreamLayout(lay.position_ids[start:stop], lay.doc_ids[start:stop], lay.window_ids[start:stop],
                              lay.window_start[start:stop], None if lay.limit is None else lay.limit[start:stop])
        return TwoStreamBatch(self.input_ids[start:stop], layout, self.ar_labels[start:stop],
                              self.diffusion_labels[start:stop])

    def to(self, device) -> "TwoStreamBatch":
        return TwoStreamBatch(self.input_ids.to(device), self.layout.to(device), self.ar_labels.to(device),
                              self.diffusion_labels.to(device))


def response_blocks(prompt_len: int, doc_len: int, block_size: int) -> list[tuple[int, int]]:
    """Target blocks [s, e) of one document (document-relative positions)."""
    r0 = max(prompt_len, 1)
    return [(s, min(s + block_size, doc_len)) for s in range(r0, doc_len, block_size)]


def sample_block_mask(length: int, block_size: int, schedule: str, min_ratio: float, gen: torch.Generator) -> list[bool]:
    """Masked set M of one block of ``length`` targets (True = masked in view 1).

    uniform: ratio t ~ U(min_ratio, 1), each position masked w.p. t. position: w.p. t * 2(j+1)/(B+1) (clipped to 1),
    so later positions are masked more often at the same mean ratio.
    """
    t = min_ratio + (1.0 - min_ratio) * float(torch.rand((), generator=gen))
    u = torch.rand(length, generator=gen)
    if schedule == "position":
        probs = torch.tensor([min(1.0, t * 2 * (j + 1) / (block_size + 1)) for j in range(length)])
    else:
        probs = torch.full((length,), t)
    return (u < probs).tolist()


def build_two_stream_batch(
    rows: list[PackedRow],
    *,
    block_size: int,
    mask_token_id: int,
    objective: str = "flare",
    mask_schedule: str = "uniform",
    min_mask_ratio: float = 0.0,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> TwoStreamBatch:
    """Assemble the two-stream rows for ``objective`` in {"flare", "block-diffusion", "ar"}."""
    gen = generator or torch.Generator().manual_seed(0)
    views = 0 if objective == "ar" else 2
    built = [_build_row(r, block_size, mask_token_id, views, objective, mask_schedule, min_mask_ratio, gen)
             for r in rows]
    length = max(len(b["ids"]) for b in built)

    def stack(key, fill):
        return torch.tensor([b[key] + [fill] * (length - len(b[key])) for b in built], dtype=torch.long)

    layout = StreamLayout(stack("pos", 0), stack("doc", -1), stack("win", -1), stack("wstart", 0),
                          stack("limit", 0) if objective == "block-diffusion" else None)
    return TwoStreamBatch(stack("ids", pad_token_id), layout, stack("ar", IGNORE), stack("diff", IGNORE))


def _build_row(row: PackedRow, block_size, mask_id, views, objective, schedule, min_ratio, gen) -> dict:
    ids = row.input_ids.tolist()
    out = {k: [] for k in ("ids", "pos", "doc", "win", "wstart", "limit", "ar", "diff")}
    offset = 0
    doc_blocks = []
    for d, (n, p) in enumerate(zip(row.doc_lens, row.prompt_lens)):
        doc = ids[offset:offset + n]
        blocks = response_blocks(p, n, block_size)
        block_end = {}
        for s, e in blocks:
            for i in range(s - 1, e - 1):
                block_end[i] = e - 1
        r0 = max(p, 1)
        for i, tok in enumerate(doc):
            out["ids"].append(tok)
            out["pos"].append(i)
            out["doc"].append(d)
            out["win"].append(-1)
            out["wstart"].append(i)
            # block-diffusion ablation: clean context is block-causal over the shifted windows, prompt causal
            out["limit"].append(block_end.get(i, i + 1) if objective == "block-diffusion" else i + 1)
            target = doc[i + 1] if i + 1 < n and i + 1 >= r0 else IGNORE
            out["ar"].append(target if objective != "block-diffusion" else IGNORE)
            out["diff"].append(IGNORE)
        doc_blocks.append((d, doc, blocks))
        offset += n
    for _ in range(len(ids) - offset):  # padding of the packed sequence
        for k, v in (("ids", ids[-1] if ids else 0), ("pos", 0), ("doc", -1), ("win", -1), ("wstart", 0),
                     ("limit", 0), ("ar", IGNORE), ("diff", IGNORE)):
            out[k].append(v)

    window = 0
    masks = {(d, s): sample_block_mask(e - s, block_size, schedule, min_ratio, gen)
             for d, _, blocks in doc_blocks for s, e in blocks} if views else {}
    for view in range(views):
        for d, doc, blocks in doc_blocks:
            for s, e in blocks:
                masked = masks[(d, s)]
                if view == 1:
                    masked = [not m for m in masked]
                for j, i in enumerate(range(s - 1, e - 1)):
                    # window input at position i: anchor (j == 0) is clean; position i = s+j-1 holds target j-1
                    is_masked_input = j > 0 and masked[j - 1]
                    out["ids"].append(mask_id if is_masked_input else doc[i])
                    out["pos"].append(i)
                    out["doc"].append(d)
                    out["win"].append(window)
                    out["wstart"].append(s - 1)
                    out["limit"].append(s - 1)
                    out["ar"].append(IGNORE)
                    out["diff"].append(doc[i + 1] if masked[j] else IGNORE)
                window += 1
    return out
