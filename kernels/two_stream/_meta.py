"""Window / chunk bookkeeping shared by the fused and simple two-stream paths (pure torch, device-side).

Every index here is computed with torch ops on the inputs' device; the only host values needed are the number
of clean chunks (from ``cu_seqlens`` on the host, as fla needs too) and the number of windows (a shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CHUNK = 64  # fla's chunk size for the gated delta rule; checkpoints are the states entering each chunk


@dataclass
class ChunkMeta:
    """Clean-stream chunk layout (fla's varlen convention) and, per window, where its boundary state lives."""

    n_docs: int
    n_chunks: int
    cu_seqlens: torch.Tensor  # [N+1] long (device)
    chunk_tok0: torch.Tensor  # [NT] int32: first token of each chunk
    chunk_len: torch.Tensor  # [NT] int32: tokens in each chunk (1..64)
    win_chunk: torch.Tensor  # [W] int32: global chunk whose entering state is the window's checkpoint
    win_tok0: torch.Tensor  # [W] int32: first token of that chunk
    win_r: torch.Tensor  # [W] int32: tokens of that chunk before the window's boundary (0..64)
    win_off: torch.Tensor  # [W+1] int32: window boundaries in the noisy stream
    chunk_wstart: torch.Tensor  # [NT] int32: start of each chunk's windows in win_order
    chunk_wcount: torch.Tensor  # [NT] int32: number of windows whose checkpoint is this chunk
    win_order: torch.Tensor  # [W] int32: windows sorted by checkpoint chunk
    derived: dict = field(default_factory=dict)  # layouts computed from this meta (e.g. window slots), by key


# Every GDN layer of one forward passes the same index tensors (the model builds its plan once per layout): build
# the meta once for them (each build syncs with the device), keyed by the tensors' identity.
_LAST_META: list = []  # [(key tensors, T, device, meta)]


def build_meta(T: int, cu_seqlens, window_doc, window_prefix, window_offsets, device) -> ChunkMeta:
    """Chunk and window bookkeeping (memoised for the last identical set of index tensors)."""
    keys = (cu_seqlens, window_doc, window_prefix, window_offsets)
    if _LAST_META:
        k0, T0, d0, meta = _LAST_META[0]
        if T0 == T and str(d0) == str(device) and all(a is b for a, b in zip(k0, keys)):
            return meta
    meta = _build_meta(T, cu_seqlens, window_doc, window_prefix, window_offsets, device)
    _LAST_META[:] = [(keys, T, device, meta)]
    return meta


def _build_meta(T: int, cu_seqlens, window_doc, window_prefix, window_offsets, device) -> ChunkMeta:
    if cu_seqlens is None:
        cu = torch.tensor([0, T], dtype=torch.long, device=device)
        cu_host = [0, T]
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        cu_host = cu_seqlens.tolist()
    lens_host = [cu_host[i + 1] - cu_host[i] for i in range(len(cu_host) - 1)]
    if any(n <= 0 for n in lens_host):
        raise ValueError("the fused two-stream path needs every clean document to be non-empty")
    n_docs = len(lens_host)
    nck_host = [(n + CHUNK - 1) // CHUNK for n in lens_host]
    n_chunks = sum(nck_host)

    lens = cu[1:] - cu[:-1]
    nck = (lens + CHUNK - 1) // CHUNK
    chunk_off = torch.nn.functional.pad(nck.cumsum(0), (1, 0))  # [N+1]
    # per chunk: doc and index within doc
    doc_of_chunk = torch.repeat_interleave(torch.arange(n_docs, device=device), nck, output_size=n_chunks)
    idx_in_doc = torch.arange(n_chunks, device=device) - chunk_off[doc_of_chunk]
    chunk_tok0 = cu[doc_of_chunk] + idx_in_doc * CHUNK
    chunk_len = torch.minimum(cu[doc_of_chunk + 1] - chunk_tok0, torch.full_like(chunk_tok0, CHUNK))

    wd = window_doc.to(device=device, dtype=torch.long)
    wp = window_prefix.to(device=device, dtype=torch.long)
    c_local = torch.minimum(wp // CHUNK, nck[wd] - 1)
    win_chunk = chunk_off[wd] + c_local
    win_tok0 = cu[wd] + c_local * CHUNK
    win_r = wp - c_local * CHUNK
    W = wd.shape[0]
    counts = torch.bincount(win_chunk, minlength=n_chunks) if W else torch.zeros(n_chunks, dtype=torch.long, device=device)
    wstart = torch.nn.functional.pad(counts.cumsum(0), (1, 0))[:-1]
    order = torch.sort(win_chunk, stable=True).indices if W else win_chunk

    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    return ChunkMeta(
        n_docs=n_docs,
        n_chunks=n_chunks,
        cu_seqlens=cu,
        chunk_tok0=i32(chunk_tok0),
        chunk_len=i32(chunk_len),
        win_chunk=i32(win_chunk),
        win_tok0=i32(win_tok0),
        win_r=i32(win_r),
        win_off=i32(window_offsets.to(device)),
        chunk_wstart=i32(wstart),
        chunk_wcount=i32(counts),
        win_order=i32(order),
    )


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Same normalisation as the naive twin (x * rsqrt(sum x^2 + 1e-6)), differentiable, in x's dtype via fp32."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)
