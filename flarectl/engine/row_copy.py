"""Copy the rows of a device mask from one tensor to another, reading and writing only those rows (issue 6).

``StaticStep.commit_last`` commits the clean tokens of rows that a step left uncommitted (AR-Trust's full accepts)
from the GDN state and conv context that the step kept (``last_state`` / ``last_conv``). The mask is on the device
(the overlapped trust loop decides it there), so the copy cannot pick rows on the host. Written as
``dst.copy_(torch.where(mask, src, dst))`` it reads every row twice, writes and reads a temporary and writes every
row: 5 x 8.4 MB per GDN layer at the Qwen3.5-2B shape (C = 8, fp32 state), ~0.76 GB per commit over 18 layers
(~0.27 ms at 2.8 TB/s: arithmetic, not a timing), however few rows commit.

* ``copy_rows_reference`` (the twin; the default off CUDA): per pair ``torch.where(mask, src, dst, out=dst)``: no
  temporary, 3 passes.
* ``launch``: one Triton launch for all pairs of one shape and dtype (every GDN layer's state, then every layer's
  conv context: two launches a commit, where torch takes two kernels a layer). Programs are (pair x row, block); each
  reads its row's mask and returns if it is off, so only masked rows are read and written (2 x 8.4 MB x the share of
  masked rows per layer), and a commit with no masked row costs two launches of programs that exit at once (the
  overlapped trust loop commits after every step; one step at a time, only when a row accepted fully). The pairs'
  addresses come from a table on the device, built once per set of tensors.
  The default on CUDA (``KERNEL``; env ``FLARECTL_ENGINE_ROW_COPY=0`` turns it off), since an H100 timed it and ran
  its CUDA tests in session 26.

``copy_rows`` takes the kernel where ``KERNEL`` is set (or its caller asks for it) and it applies (contiguous
tensors of one shape and dtype on CUDA, or under Triton's interpreter), else the twin. The copy is exact either way.
The overlapped trust loop (``trust_overlap``, itself opt-in) always asks for it: it commits after every step with
the mask on the device, and the twin would pass over every row's state each time.
"""

from __future__ import annotations

import os

import torch

_KERNEL_ENV = os.environ.get("FLARECTL_ENGINE_ROW_COPY", "").strip().lower()
KERNEL: bool | None = None if not _KERNEL_ENV else _KERNEL_ENV not in ("0", "false", "no", "off")
"""Whether ``copy_rows`` uses the Triton kernel. None (the default): on CUDA (timed on an H100 in session 26: AR-Trust
2,523 -> 2,566 tok/s one step at a time; its CUDA tests pass); env ``FLARECTL_ENGINE_ROW_COPY=0/1`` overrides (read
at import; tests set the attribute)."""

BLOCK = 4096
"""Elements a program copies."""


def copy_rows_reference(dsts: list[torch.Tensor], srcs: list[torch.Tensor], rows: torch.Tensor) -> None:
    """The twin: pairs dst, src [R, ...] (same shape), rows [R] bool -> dst[r] = src[r] where rows[r], in place."""
    for dst, src in zip(dsts, srcs, strict=True):
        torch.where(rows.view(-1, *([1] * (dst.dim() - 1))), src, dst, out=dst)


def kernel_applies(dsts: list[torch.Tensor], srcs: list[torch.Tensor], rows: torch.Tensor) -> bool:
    """Contiguous tensors of one shape and dtype (float or integer), one bool mask entry per row, all on one CUDA
    device (or the interpreter)."""
    from flarectl.engine.gemv import _interpreting

    if not dsts or len(dsts) != len(srcs):
        return False
    first = dsts[0]
    return (first.dim() >= 1 and first.dtype in _TRITON_TYPES and rows.dtype == torch.bool
            and rows.shape == first.shape[:1] and (first.is_cuda or _interpreting())
            and all(t.shape == first.shape and t.dtype == first.dtype and t.is_contiguous()
                    and t.device == rows.device for t in (*dsts, *srcs)))


_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32"}

_KERNELS: dict[torch.dtype, object] = {}
_TABLES: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
"""(device, dtype, addresses) -> (the [P, 2] int64 address table on the device, the tensors: held, so no address
is reused while the table lives)."""


def _kernel(dtype: torch.dtype):
    if dtype in _KERNELS:
        return _KERNELS[dtype]
    import triton
    import triton.language as tl

    element = getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64",
                           "i64": "int64", "i32": "int32"}[_TRITON_TYPES[dtype]])

    @triton.jit
    def copy_rows_kernel(table, rows, per_row, R, BLOCK: tl.constexpr, ELEMENT: tl.constexpr):
        pair_row = tl.program_id(0)
        row = pair_row % R
        if tl.load(rows + row) != 0:
            pair = pair_row // R
            dst = tl.load(table + 2 * pair).to(tl.pointer_type(ELEMENT))
            src = tl.load(table + 2 * pair + 1).to(tl.pointer_type(ELEMENT))
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            keep = cols < per_row
            base = row.to(tl.int64) * per_row
            tl.store(dst + base + cols, tl.load(src + base + cols, mask=keep), mask=keep)

    _KERNELS[dtype] = (copy_rows_kernel, element)
    return _KERNELS[dtype]


def address_table(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> torch.Tensor:
    """[P, 2] int64 on the tensors' device: each pair's (dst, src) address; built once per set of tensors."""
    key = (dsts[0].device, dsts[0].dtype, tuple((d.data_ptr(), s.data_ptr()) for d, s in zip(dsts, srcs)))
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        table = torch.tensor([list(p) for p in key[2]], dtype=torch.int64).to(dsts[0].device)
        _TABLES[key] = (table, [*dsts, *srcs])
    return _TABLES[key][0]


def launch(dsts: list[torch.Tensor], srcs: list[torch.Tensor], rows: torch.Tensor) -> None:
    """The kernel (``copy_rows_reference``'s contract, ``kernel_applies``' inputs): one launch for all pairs."""
    R = dsts[0].shape[0]
    per_row = dsts[0][0].numel() if R else 0
    if per_row == 0:
        return
    fn, element = _kernel(dsts[0].dtype)
    grid = (len(dsts) * R, -(-per_row // BLOCK))
    fn[grid](address_table(dsts, srcs), rows.view(torch.uint8), per_row, R, BLOCK=BLOCK, ELEMENT=element,
             num_warps=4)


def copy_rows(dsts: list[torch.Tensor], srcs: list[torch.Tensor], rows: torch.Tensor,
              kernel: bool | None = None) -> None:
    """dst[r] = src[r] where rows[r], for every pair (in place): the kernel where ``kernel`` (None: ``KERNEL``) is on
    and it applies, else the twin."""
    if kernel is None:
        kernel = rows.is_cuda if KERNEL is None else KERNEL
    if kernel and kernel_applies(dsts, srcs, rows):
        launch(dsts, srcs, rows)
    else:
        copy_rows_reference(dsts, srcs, rows)
