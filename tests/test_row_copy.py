"""The masked row copy of the late commit (``flarectl.engine.row_copy``): the Triton kernel against its twin under
Triton's interpreter (in a child process: the interpreter must be on before triton is imported), with the copied
rows NaN-filled first so an unwritten element fails and the other rows checked bit for bit; and the engine's late
commits with the kernel on and off."""

from __future__ import annotations

import os

import pytest
import torch

from flarectl.engine import row_copy

CHILD = os.environ.get("FLARE_ROW_COPY_CHILD") == "1"


def _case(seed: int, shape: tuple[int, ...], dtype: torch.dtype, share: float, pairs: int = 3):
    """``pairs`` (dst, src) of one shape and a row mask; the rows to copy NaN-filled in every dst (an unwritten
    element fails), some other rows too (they must keep even their NaNs)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[0], generator=g) < share
    dsts, srcs = [], []
    for _ in range(pairs):
        dst = torch.randn(shape, generator=g).to(dtype)
        srcs.append(torch.randn(shape, generator=g).to(dtype))
        if dtype.is_floating_point:
            dst[1::3] = float("nan")
            dst[rows] = float("nan")
        dsts.append(dst)
    return dsts, srcs, rows


def _equal(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


if CHILD:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
    @pytest.mark.parametrize("shape,share,pairs", [((1, 1), 1.0, 1), ((3, 5), 0.5, 2), ((8, 2, 4, 3), 0.6, 3),
                                                   ((5, 4097), 0.4, 2), ((4, 3, 4096), 0.0, 3),
                                                   ((6, 2, 3001), 1.0, 1), ((0, 7), 1.0, 2)])
    def test_kernel_matches_twin_interpreted(dtype, shape, share, pairs):
        dsts, srcs, rows = _case(len(shape) * 100 + shape[-1], shape, dtype, share, pairs)
        want = [d.clone() for d in dsts]
        row_copy.copy_rows_reference(want, srcs, rows)
        assert row_copy.kernel_applies(dsts, srcs, rows)
        row_copy.launch(dsts, srcs, rows)
        _equal(dsts, want)

    def test_copy_rows_takes_the_kernel_only_when_on_interpreted(monkeypatch):
        calls = []
        real = row_copy.launch
        monkeypatch.setattr(row_copy, "launch", lambda *a: calls.append(1) or real(*a))
        dsts, srcs, rows = _case(1, (4, 9), torch.float32, 0.5)
        for on in (False, True):
            monkeypatch.setattr(row_copy, "KERNEL", on)
            row_copy.copy_rows(dsts, srcs, rows)
            row_copy.copy_rows(dsts, srcs, rows, kernel=not on)  # the caller's choice wins over ``KERNEL``
        monkeypatch.setattr(row_copy, "KERNEL", True)
        row_copy.copy_rows([d[:, ::2] for d in dsts], [s[:, ::2] for s in srcs], rows)  # strided: the twin
        row_copy.copy_rows([dsts[0], torch.zeros(4, 3)], [srcs[0], torch.ones(4, 3)], rows)  # shapes differ: the twin
        assert calls == [1, 1]

else:
    def test_interpreter_suite(run_interpreted):
        out = run_interpreted(__file__, "FLARE_ROW_COPY_CHILD")
        assert "29 passed" in out, out[-2000:]  # every interpreted case ran (none skipped)

    def test_twin_copies_only_the_masked_rows():
        dsts, srcs, rows = _case(3, (6, 4, 5), torch.float32, 0.5)
        before = [d.clone() for d in dsts]
        row_copy.copy_rows_reference(dsts, srcs, rows)
        for dst, src, old in zip(dsts, srcs, before):
            assert torch.equal(dst[rows], src[rows])
            torch.testing.assert_close(dst[~rows], old[~rows], rtol=0, atol=0, equal_nan=True)

    @pytest.mark.gpu
    def test_kernel_on_cuda_matches_twin():
        for dtype, shape in ((torch.float32, (8, 16, 128, 128)), (torch.bfloat16, (8, 6144, 3))):
            dsts, srcs, rows = _case(7, shape, dtype, 0.5, pairs=18)
            dsts, srcs, rows = [d.cuda() for d in dsts], [s.cuda() for s in srcs], rows.cuda()
            want = [d.clone() for d in dsts]
            row_copy.copy_rows_reference(want, srcs, rows)
            row_copy.launch(dsts, srcs, rows)
            _equal(dsts, want)

    @pytest.mark.gpu
    def test_engine_with_the_kernel_on_cuda_gives_the_same_tokens(monkeypatch):
        """Late commits (AR-Trust full accepts, sharpened debug model) through the kernel == through the twin."""
        from flarectl.engine import Engine, Request
        from flarectl.models.loading import load_model

        m = load_model("debug-hybrid", dtype="float32", device="cuda", seed=1)
        with torch.no_grad():
            m.hf.lm_head.weight.mul_(30)
        outs = []
        for on in (False, True):
            monkeypatch.setattr(row_copy, "KERNEL", on)
            engine = Engine(m, concurrency=3, capacity=64, mask_token_id=258, block_size=4)
            for p, n in (([5, 6, 7], 13), ([9, 1], 9), (list(range(40, 60)), 17), ([3, 3], 11)):
                engine.submit(Request(p, "ar-trust", max_new_tokens=n, stop_ids=[]))
            outs.append([(r.token_ids, r.acceptance_histogram) for r in engine.run()])
        assert outs[0] == outs[1]
