"""Two-stream objective: packed-forward equivalence, token-equal accounting, visibility."""

import pytest
import torch

from flarectl.objectives import IGNORE, PackedRow, build_two_stream_batch, response_blocks

DOCS = [(13, 4), (9, 0), (17, 6)]  # (length, prompt length): 3 packed documents, odd lengths
MASK_ID = 258


def _row(pad: int = 3) -> PackedRow:
    ids = torch.randint(0, 256, (sum(n for n, _ in DOCS) + pad,))
    return PackedRow(ids, [n for n, _ in DOCS], [p for _, p in DOCS])


def _explicit_window_logits(model, doc_ids, prefix_len, window_ids):
    """HF's own model on [clean prefix + window] with a 4D mask: causal prefix, bidirectional window."""
    seq = torch.cat([doc_ids[:prefix_len], window_ids])[None]
    length, k = seq.shape[1], window_ids.numel()
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed[length - k:, length - k:] = True
    mask = torch.zeros(1, 1, length, length, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    return model.hf(input_ids=seq, attention_mask=mask).logits[0, length - k:], model.hf(input_ids=seq).logits[0, -k:]


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_packed_forward_equals_explicit_forwards(debug_models, name, block_size):
    model = debug_models[name]
    row = _row()
    batch = build_two_stream_batch([row], block_size=block_size, mask_token_id=MASK_ID)
    logits = model(batch.input_ids, batch.layout)[0]
    lay = batch.layout
    offset = 0
    for n, _ in DOCS:  # clean stream == each document alone, causally
        ref = model.hf(input_ids=row.input_ids[offset:offset + n][None]).logits[0]
        torch.testing.assert_close(logits[offset:offset + n], ref, rtol=0, atol=1e-6)
        offset += n
    starts = [sum(n for n, _ in DOCS[:d]) for d in range(len(DOCS))]
    differs = False
    n_windows = int(lay.window_ids.max()) + 1
    assert n_windows == 2 * sum(len(response_blocks(p, n, block_size)) for n, p in DOCS)
    for w in range(n_windows):
        cols = (lay.window_ids[0] == w).nonzero()[:, 0]
        d, start = int(lay.doc_ids[0, cols[0]]), int(lay.window_start[0, cols[0]])
        doc = row.input_ids[starts[d]:starts[d] + DOCS[d][0]]
        ref, causal = _explicit_window_logits(model, doc, start, batch.input_ids[0, cols])
        torch.testing.assert_close(logits[cols], ref, rtol=0, atol=1e-6)
        differs |= len(cols) > 1 and not torch.allclose(ref, causal, atol=1e-6)
    assert differs == (block_size > 1), "window attention must be bidirectional (and the check able to fail)"


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("schedule", ["uniform", "position"])
def test_token_equal_accounting(block_size, schedule):
    """Every response token: exactly one AR term and one diffusion term; prompt and padding: none."""
    row = _row(pad=5)
    batch = build_two_stream_batch([row, _row(pad=0)], block_size=block_size, mask_token_id=MASK_ID,
                                   mask_schedule=schedule, generator=torch.Generator().manual_seed(block_size))
    lay = batch.layout
    for r in range(2):
        ar, diff = {}, {}
        for col in range(batch.input_ids.shape[1]):
            d, pos = int(lay.doc_ids[r, col]), int(lay.position_ids[r, col])
            if int(batch.ar_labels[r, col]) != IGNORE:
                assert lay.window_ids[r, col] < 0
                ar[(d, pos + 1)] = ar.get((d, pos + 1), 0) + 1
            if int(batch.diffusion_labels[r, col]) != IGNORE:
                assert lay.window_ids[r, col] >= 0
                diff[(d, pos + 1)] = diff.get((d, pos + 1), 0) + 1
        response = {(d, i) for d, (n, p) in enumerate(DOCS) for i in range(max(p, 1), n)}
        assert set(ar) == response and set(ar.values()) == {1}
        assert set(diff) == response and set(diff.values()) == {1}
    assert batch.num_ar_terms == batch.num_diffusion_terms == 2 * sum(n - max(p, 1) for n, p in DOCS)


def test_masked_inputs_never_leak_their_target():
    """A diffusion target's own input position is masked in the view that scores it."""
    row = _row()
    batch = build_two_stream_batch([row], block_size=4, mask_token_id=MASK_ID)
    lay, ids = batch.layout, batch.input_ids[0]
    for col in (batch.diffusion_labels[0] != IGNORE).nonzero()[:, 0].tolist():
        w, target_pos = int(lay.window_ids[0, col]), int(lay.position_ids[0, col]) + 1
        same = ((lay.window_ids[0] == w) & (lay.position_ids[0] == target_pos)).nonzero()[:, 0]
        assert all(int(ids[c]) == MASK_ID for c in same.tolist())


def test_objective_variants():
    row = _row()
    ar = build_two_stream_batch([row], block_size=4, mask_token_id=MASK_ID, objective="ar")
    assert ar.num_diffusion_terms == 0 and ar.input_ids.shape[1] == row.input_ids.numel()
    bd = build_two_stream_batch([row], block_size=4, mask_token_id=MASK_ID, objective="block-diffusion")
    assert bd.num_ar_terms == 0 and bd.num_diffusion_terms > 0
    clean = bd.layout.window_ids[0] < 0
    # block-causal clean context: some clean token sees a later clean token of its block
    assert bool((bd.layout.clean_limit[0][clean] > bd.layout.position_ids[0][clean] + 1).any())
