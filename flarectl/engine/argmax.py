"""Greedy read-out of a step's logits in one pass: each row's argmax and its softmax probability (issue 6).

Greedy decoding needs two numbers per position from the [.., V] logits: the argmax (AR tokens, AR-Trust drafts and
verification) and, for Diffusion-Trust, its confidence ``softmax(logits)[argmax] = 1 / sum(exp(logits - max))``.
The modes used to get them through the sampler's generic path: logits to fp32, a one-hot of the argmax as the
"probabilities", then the argmax of that (AR-Trust), or a full softmax and a gather (Diffusion-Trust). At the
Qwen3.5-2B vocabulary (248,320) and a trust step (C=8 rows x 4 positions) that is tens of MB written and read
several times and a dozen launches after every step, plus one device->host copy per stage.

``argmax_confidence`` (op ``flarectl::argmax_confidence``) reads the logits once: split along V, every program keeps
a running (max, first index of the max, sum of exp(x - max)) over its columns; the last program of a row to arrive
at the row's counter combines the splits in split order (deterministic), writes ``[token, confidence]`` and resets
the counter. One launch; the output is one small fp32 tensor ``[2, N]`` (token ids < 2^24 are exact in fp32), so
the host reads everything with one copy. ``argmax_confidence_reference`` is its twin with the same signature
(torch's argmax: the first maximum; the softmax probability in fp32 or fp64).

Ties go to the first maximum, as ``torch.argmax``; rows holding NaN are outside the contract (torch returns the
NaN's index, the kernel does not).
"""

from __future__ import annotations

import torch

NAN_FILL = False
"""Tests: the output NaN-filled first, so an element the kernel leaves unwritten fails."""

BLOCK = 2048
"""Columns a program loads per inner step."""

MAX_VOCAB = 1 << 24
"""Token ids travel as fp32 in the packed output: exact below 2^24."""


def argmax_confidence_reference(logits: torch.Tensor) -> torch.Tensor:
    """The twin. logits [N, V] -> [2, N] in fp32 (fp64 for fp64 logits): row 0 the argmax (first maximum), row 1
    its softmax probability computed in that precision."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    tok = x.argmax(-1)
    conf = torch.softmax(x, -1).gather(-1, tok[:, None])[:, 0]
    return torch.stack([tok.to(acc), conf])


def kernel_applies(logits: torch.Tensor) -> bool:
    """2-D float logits with unit column stride, at most ``MAX_VOCAB`` columns, on CUDA (or the interpreter)."""
    from flarectl.engine.gemv import _interpreting

    return (logits.dim() == 2 and logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and logits.shape[0] > 0 and 0 < logits.shape[1] <= MAX_VOCAB and logits.stride(1) == 1
            and (logits.is_cuda or _interpreting()))


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def argmax_confidence_kernel(x, out, ws, counter, N, V, stride_row, per_split,
                                 SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        s = tl.program_id(1)
        start = s * per_split
        stop = tl.minimum(start + per_split, V)
        cols = tl.arange(0, BLOCK)
        base = x + row.to(tl.int64) * stride_row
        m = tl.full([], -float("inf"), tl.float32)
        idx = tl.zeros([], tl.int32)
        total = tl.zeros([], tl.float32)
        for off in range(start, stop, BLOCK):
            c = off + cols
            v = tl.load(base + c, mask=c < stop, other=-float("inf")).to(tl.float32)
            bm = tl.max(v, axis=0)
            bi = tl.argmax(v, axis=0, tie_break_left=True) + off
            new_m = tl.maximum(m, bm)
            total = total * tl.exp(m - new_m) + tl.sum(tl.exp(v - new_m), axis=0)
            idx = tl.where(bm > m, bi, idx)  # strictly greater: an earlier block keeps a tie
            m = new_m
        if SPLIT == 1:
            tl.store(out + row, idx.to(tl.float32))
            tl.store(out + N + row, 1.0 / total)
        else:
            # every split stores (max, index, sum); the row's last arrival combines them in split order
            p = ws + (row * SPLIT + s) * 3
            tl.store(p, m)
            tl.store(p + 1, idx.to(tl.float32))
            tl.store(p + 2, total)
            tl.debug_barrier()
            arrived = tl.atomic_add(counter + row, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                q = ws + row * SPLIT * 3
                best = tl.load(q, cache_modifier=".cg")
                best_i = tl.load(q + 1, cache_modifier=".cg")
                for j in tl.static_range(1, SPLIT):
                    mj = tl.load(q + 3 * j, cache_modifier=".cg")
                    ij = tl.load(q + 3 * j + 1, cache_modifier=".cg")
                    best_i = tl.where(mj > best, ij, best_i)
                    best = tl.maximum(best, mj)
                acc = 0.0
                for j in tl.static_range(SPLIT):
                    acc += tl.load(q + 3 * j + 2, cache_modifier=".cg") * tl.exp(
                        tl.load(q + 3 * j, cache_modifier=".cg") - best)
                tl.store(out + row, best_i)
                tl.store(out + N + row, 1.0 / acc)
                tl.atomic_xchg(counter + row, 0)

    _KERNEL = argmax_confidence_kernel
    return _KERNEL


def _splits(rows: int, vocab: int, device: torch.device) -> int:
    """Splits along V: about two programs per SM over all rows, at least one ``BLOCK`` each, at most 64."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # the interpreter: a few splits, so the combine path runs
    return max(1, min(64, -(-2 * sms // rows), -(-vocab // BLOCK)))


def launch(logits: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """The kernel (``argmax_confidence``'s contract). ``split``: splits along V (None: ``_splits``)."""
    from flarectl.engine.gemv import arrival_counters

    N, V = logits.shape
    split = split or _splits(N, V, logits.device)
    per = -(-V // split)
    per = -(-per // BLOCK) * BLOCK
    split = -(-V // per)  # no empty split
    out = torch.empty(2, N, dtype=torch.float32, device=logits.device)
    if NAN_FILL:
        out.fill_(float("nan"))
    ws = torch.empty(N * split * 3, dtype=torch.float32, device=logits.device) if split > 1 else out
    counter = arrival_counters(logits.device, N) if split > 1 else out
    _kernel()[(N, split)](logits, out, ws, counter, N, V, logits.stride(0), per, SPLIT=split, BLOCK=BLOCK,
                          num_warps=4)
    return out


@torch.library.custom_op("flarectl::argmax_confidence", mutates_args=())
def argmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [2, N] fp32: each row's argmax (first maximum; as fp32) and its softmax probability. One
    Triton launch where ``kernel_applies``, else the twin."""
    if kernel_applies(logits):
        return launch(logits)
    return argmax_confidence_reference(logits)


@argmax_confidence.register_fake
def _(logits):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(2, logits.shape[0], dtype=dtype)


def device_read(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (tokens [...] long, confidence [...] fp32 or fp64) **on the logits' device**: the same
    numbers as ``greedy_read``, with no copy to the host (the overlapped trust steps decide on the device)."""
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    packed = launch(flat) if kernel_applies(flat) else argmax_confidence_reference(flat)
    return packed[0].long().reshape(lead), packed[1].reshape(lead)


def greedy_read(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] on any device -> (tokens [...] long, confidence [...] fp32 or fp64) **on the host**, with one
    device->host copy."""
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    # eager callers skip the custom op's dispatch (it exists for compiled and captured code)
    packed = (launch(flat) if kernel_applies(flat) else argmax_confidence_reference(flat)).cpu()
    return packed[0].long().reshape(lead), packed[1].reshape(lead)
