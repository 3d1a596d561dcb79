"""Precision names and their torch dtypes, in one table (config, kernels, model loading and the harness ask here).

torch is imported on use, so the torch-free parts of megalite (config, plan) can hold precision names.
"""

from __future__ import annotations

from typing import Any

from megalite.errors import ConfigError, shown

# Every spelling megalite accepts -> the canonical precision name (DeepSpeed's sections are bf16/fp16; fp32 is neither).
PRECISION_NAMES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical_precision(name: str, key: str = "precision") -> str:
    """'fp32', 'bf16' or 'fp16' for any accepted spelling; ConfigError naming `key` otherwise."""
    if not isinstance(name, str) or name.lower() not in PRECISION_NAMES:
        raise ConfigError(f"{key}: unknown precision {shown(name)}; valid: fp32 (float32), bf16 (bfloat16), fp16 (float16)")
    return PRECISION_NAMES[name.lower()]


def precision_bytes(name: str, key: str = "precision") -> int:
    """Bytes of one element in that precision."""
    return BYTES[canonical_precision(name, key)]


def torch_dtype(name: str, key: str = "precision") -> Any:
    """The torch dtype of a precision name (torch.float32 / torch.bfloat16 / torch.float16)."""
    import torch

    return getattr(torch, _TORCH_NAMES[canonical_precision(name, key)])
