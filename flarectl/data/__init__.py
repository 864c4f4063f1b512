"""Training data: sources -> documents -> packed sequences, plus the default offline transfer set.

Names are re-exported lazily so that importing one submodule does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "sources", "DataReport": "sources", "Record": "sources", "SourceSpec": "sources",
    "load_records": "sources", "parse_source": "sources",
    "DataConfig": "documents", "Document": "documents", "ChatEncoder": "documents",
    "iter_documents": "documents", "load_documents": "documents",
    "PackedSequence": "packing", "PackedBatch": "packing", "PackedDataset": "packing", "DataPosition": "packing",
    "pack_documents": "packing", "collate": "packing", "build_packed_dataset": "packing", "pad_id_of": "packing",
    "default_transfer_records": "transfer_set", "default_transfer_path": "transfer_set",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flarectl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"flarectl.data.{_EXPORTS[name]}"), name)
