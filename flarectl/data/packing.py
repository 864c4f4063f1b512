"""Pack documents into sequences of at most ``max_seq_len`` tokens and serve them in a resumable epoch order.

Packing is first-fit: documents are shuffled with the seed, then each goes into the first open sequence with
room for it (a new one when none has room). A document is never split. Each sequence is padded at its end to a
multiple of ``pad_to_multiple_of`` with ``pad_id``; the padding is NOT a document: it is described only by
``num_padding`` (``sum(doc_lens) + num_padding == T``) and carries no loss.

Epoch order: epoch ``e`` visits the packed sequences in a permutation seeded by ``(seed, e)`` (Python's
``random.Random`` with a string seed, stable across Python/torch versions and machines), so a training loop
that saved a `DataPosition` ``(epoch, index)`` resumes exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from flarectl.data.documents import DataConfig, Document, load_documents
from flarectl.data.sources import DataError, DataReport, SourceSpec


@dataclass(frozen=True)
class PackedSequence:
    """One packed row.

    input_ids: LongTensor [T], T <= max_seq_len and T % pad_to_multiple_of == 0.
    doc_lens / prompt_lens: per document, in order (prompt_len <= doc_len).
    doc_ids: index of each document in the list that was packed (for provenance and tests).
    num_padding: trailing pad tokens; sum(doc_lens) + num_padding == T.
    """

    input_ids: torch.Tensor
    doc_lens: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    doc_ids: tuple[int, ...]
    num_padding: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: ``index`` into epoch ``epoch``'s permutation (save it to resume)."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, state: Mapping[str, int]) -> "DataPosition":
        return cls(epoch=int(state["epoch"]), index=int(state["index"]))


@dataclass
class PackedBatch:
    """A batch of packed rows of equal length.

    input_ids: LongTensor [B, T]. doc_lens / prompt_lens: per row, per document. num_padding: LongTensor [B]
    (pad tokens at the end of each row). doc_ids: per row, the packed documents' indices.
    """

    input_ids: torch.Tensor
    doc_lens: list[list[int]]
    prompt_lens: list[list[int]]
    doc_ids: list[list[int]]
    num_padding: torch.Tensor

    def document_ids(self) -> torch.Tensor:
        """LongTensor [B, T] (on input_ids' device): the document number (0, 1, ... within the row) of every
        token; -1 on padding."""
        out = torch.full(self.input_ids.shape, -1, dtype=torch.long)
        for row, lens in enumerate(self.doc_lens):
            out[row, : sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        return out.to(self.input_ids.device)

    def position_ids(self) -> torch.Tensor:
        """LongTensor [B, T]: position of every token inside its own document (0 at each document start);
        padding continues counting from the last document."""
        out = torch.arange(self.input_ids.shape[1]).repeat(self.input_ids.shape[0], 1)
        for row, lens in enumerate(self.doc_lens):
            starts = torch.tensor([0] + list(lens)).cumsum(0)[:-1]
            offsets = torch.repeat_interleave(starts, torch.tensor(lens))
            out[row, : offsets.numel()] -= offsets
            out[row, offsets.numel():] -= int(starts[-1]) if len(lens) else 0
        return out.to(self.input_ids.device)

    def loss_mask(self) -> torch.Tensor:
        """BoolTensor [B, T]: True on response tokens (the tokens that are loss targets), False on prompts and
        padding. The objective applies its own shift (logit at l-1 predicts token l)."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for row, (lens, prompts) in enumerate(zip(self.doc_lens, self.prompt_lens)):
            start = 0
            for length, prompt_len in zip(lens, prompts):
                mask[row, start + prompt_len : start + length] = True
                start += length
        return mask.to(self.input_ids.device)

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with its tensors on `device`."""
        return PackedBatch(self.input_ids.to(device), self.doc_lens, self.prompt_lens, self.doc_ids,
                           self.num_padding.to(device))


# --------------------------------------------------------------------------------------------- packing


class _FirstFit:
    """First-fit bin finder: a max segment tree over the free space of `num_bins` bins of `capacity`.

    Unused bins stay at full capacity, so the first bin with room is an open one when any has room, else the
    next empty one. `place(n)` costs O(log num_bins).
    """

    def __init__(self, capacity: int, num_bins: int) -> None:
        self.size = 1 << max(0, (num_bins - 1).bit_length())
        self.tree = [0] * (2 * self.size)
        for leaf in range(num_bins):
            self.tree[self.size + leaf] = capacity
        for node in range(self.size - 1, 0, -1):
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def place(self, need: int) -> int:
        """Index of the first bin with at least `need` free tokens, after taking them from it."""
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
        self.tree[node] -= need
        parent = node // 2
        while parent:
            self.tree[parent] = max(self.tree[2 * parent], self.tree[2 * parent + 1])
            parent //= 2
        return node - self.size


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def first_fit_bins(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity: seeded shuffle, then first-fit.

    Returns the bins in creation order, each a list of item indices in insertion order.
    """
    too_long = [i for i, length in enumerate(lengths) if length > capacity or length < 1]
    if too_long:
        raise DataError(f"cannot pack document {too_long[0]} of length {lengths[too_long[0]]} into {capacity} tokens")
    order = list(range(len(lengths)))
    random.Random(f"flarectl-pack-{seed}").shuffle(order)
    finder = _FirstFit(capacity, len(lengths))
    bins: list[list[int]] = []
    for item in order:
        target = finder.place(lengths[item])
        if target == len(bins):
            bins.append([])
        bins[target].append(item)
    return bins


def build_sequence(documents: Sequence[Document], doc_ids: Sequence[int], pad_id: int, multiple: int) -> PackedSequence:
    """Concatenate the documents `doc_ids` into one `PackedSequence`, padded to a multiple of `multiple`."""
    ids = [token for i in doc_ids for token in documents[i].input_ids]
    padded = _round_up(len(ids), multiple)
    return PackedSequence(
        input_ids=torch.tensor(ids + [pad_id] * (padded - len(ids)), dtype=torch.long),
        doc_lens=tuple(len(documents[i]) for i in doc_ids),
        prompt_lens=tuple(documents[i].prompt_len for i in doc_ids),
        doc_ids=tuple(doc_ids),
        num_padding=padded - len(ids),
    )


def pack_documents(
    documents: Sequence[Document], max_seq_len: int, pad_id: int, pad_to_multiple_of: int = 8, seed: int = 0
) -> list[PackedSequence]:
    """Pack every document exactly once into sequences of length <= max_seq_len (deterministic in `seed`)."""
    if max_seq_len % pad_to_multiple_of:
        raise DataError(f"max_seq_len ({max_seq_len}) must be a multiple of pad_to_multiple_of ({pad_to_multiple_of})")
    bins = first_fit_bins([len(doc) for doc in documents], max_seq_len, seed)
    return [build_sequence(documents, ids, pad_id, pad_to_multiple_of) for ids in bins]


def collate(sequences: Sequence[PackedSequence], pad_id: int, length: int | None = None) -> PackedBatch:
    """Stack sequences into a `PackedBatch` [B, T], right-padding rows with `pad_id` to T = `length` or to the
    longest row; the extra padding is added to each row's `num_padding`."""
    longest = max(len(seq) for seq in sequences)
    length = longest if length is None else length
    if length < longest:
        raise DataError(f"collate length {length} is shorter than the longest sequence ({longest})")
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq.input_ids
    return PackedBatch(
        input_ids=input_ids,
        doc_lens=[list(seq.doc_lens) for seq in sequences],
        prompt_lens=[list(seq.prompt_lens) for seq in sequences],
        doc_ids=[list(seq.doc_ids) for seq in sequences],
        num_padding=torch.tensor([seq.num_padding + length - len(seq) for seq in sequences], dtype=torch.long),
    )


# ------------------------------------------------------------------------------------------ the dataset


class PackedDataset:
    """Packed sequences with an epoch-seeded order; `dataset[i]` is sequence i in packing order."""

    def __init__(self, sequences: Sequence[PackedSequence], pad_id: int, seed: int = 0) -> None:
        if not sequences:
            raise DataError("no packed sequences: the data set is empty")
        self.sequences = list(sequences)
        self.pad_id = pad_id
        self.seed = seed

    @classmethod
    def from_documents(cls, documents: Sequence[Document], pad_id: int, cfg: DataConfig) -> "PackedDataset":
        """Pack `documents` with the config's max_seq_len, pad_to_multiple_of and seed."""
        sequences = pack_documents(documents, cfg.max_seq_len, pad_id, cfg.pad_to_multiple_of, cfg.seed)
        return cls(sequences, pad_id=pad_id, seed=cfg.seed)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> PackedSequence:
        return self.sequences[index]

    def fingerprint(self) -> str:
        """sha256 of the seed, pad id and every sequence's tokens and layout: save it with a `DataPosition` and
        compare on resume, since the same position only means the same data when this matches."""
        digest = hashlib.sha256(f"{self.seed}/{self.pad_id}/{len(self.sequences)}".encode())
        for seq in self.sequences:
            digest.update(seq.input_ids.numpy().tobytes())
            digest.update(repr((seq.doc_lens, seq.prompt_lens, seq.num_padding)).encode())
        return digest.hexdigest()

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of sequence indices visited in `epoch` (deterministic in seed and epoch)."""
        order = list(range(len(self.sequences)))
        random.Random(f"flarectl-epoch-{self.seed}-{epoch}").shuffle(order)
        return order

    def iter_from(self, start: DataPosition = DataPosition()) -> Iterator[tuple[DataPosition, PackedSequence]]:
        """Endless stream of (position after this item, sequence) over epochs, starting at `start`."""
        epoch, index = start.epoch, start.index
        while True:
            order = self.epoch_order(epoch)
            for i in range(index, len(order)):
                following = DataPosition(epoch, i + 1) if i + 1 < len(order) else DataPosition(epoch + 1, 0)
                yield following, self.sequences[order[i]]
            epoch, index = epoch + 1, 0

    def batches(
        self, batch_size: int, start: DataPosition = DataPosition(), length: int | None = None, drop_last: bool = False
    ) -> Iterator[tuple[DataPosition, PackedBatch]]:
        """Endless stream of (position after this batch, batch). A batch never spans two epochs: the last one
        of an epoch is smaller (or dropped with `drop_last`). Resuming from a yielded position continues the
        exact same stream. `length` fixes T for every batch (else T = longest row)."""
        if batch_size < 1 or (drop_last and batch_size > len(self.sequences)):
            raise DataError(f"batch_size {batch_size} does not fit {len(self.sequences)} packed sequences per epoch")
        epoch, index = start.epoch, start.index
        while True:
            order = self.epoch_order(epoch)
            while index < len(order):
                rows = order[index : index + batch_size]
                index += len(rows)
                if drop_last and len(rows) < batch_size:
                    break
                following = DataPosition(epoch, index) if index < len(order) else DataPosition(epoch + 1, 0)
                yield following, collate([self.sequences[r] for r in rows], self.pad_id, length)
            epoch, index = epoch + 1, 0


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding never carries loss, so the choice is harmless)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("tokenizer has neither pad_token_id nor eos_token_id to pad with")
    return int(pad)


def build_packed_dataset(
    sources: Sequence[str | os.PathLike | Mapping[str, Any] | SourceSpec] | str | os.PathLike | SourceSpec,
    tokenizer: Any,
    cfg: DataConfig | None = None,
) -> tuple[PackedDataset, DataReport]:
    """Sources -> documents -> `PackedDataset`, with the `DataReport` of what was kept, truncated or skipped."""
    cfg = cfg or DataConfig()
    documents, report = load_documents(sources, tokenizer, cfg)
    return PackedDataset.from_documents(documents, pad_id_of(tokenizer), cfg), report
