"""Data pipeline: cleaning, tokenizers, Megatron indexed datasets, packing, blending, exactly-once sampling.

Names are imported lazily (PEP 562) so that `megalite --help` and prepare's worker processes do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_datasets": "megalite.data.dataset",
    "GPTDataset": "megalite.data.dataset",
    "BlendedDataset": "megalite.data.dataset",
    "collate": "megalite.data.dataset",
    "ResumableSampler": "megalite.data.sampler",
    "BatchStream": "megalite.data.stream",
    "IndexedDataset": "megalite.data.indexed",
    "IndexedDatasetWriter": "megalite.data.indexed",
    "prepare": "megalite.data.prepare",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megalite.data' has no attribute {name!r}")
