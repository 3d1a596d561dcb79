"""Loading checkpoint files without ever running code from them: torch.load(weights_only=True) with an
explicit allowlist of the DeepSpeed types its checkpoints store, and a static scan of pickle globals."""

from __future__ import annotations

import importlib
import pickle
import zipfile
from typing import Any

import torch

from megalite.errors import CheckpointError


def safe_globals_allowlist() -> list[Any]:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoints (found by saving ZeRO 0-3, fp32/bf16)."""
    allowed: list[Any] = []
    candidates = [
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # fp16 runs on GPUs
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ]
    for module, name in candidates:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # a DeepSpeed without the type cannot have stored it
            continue
    return allowed


def _refusal(path: str, err: BaseException) -> CheckpointError:
    text = str(err)
    lines = text.splitlines()
    detail = next((line.strip() for line in lines if "Unsupported" in line or "GLOBAL" in line), "")
    if not detail:
        detail = lines[0] if lines else type(err).__name__
    return CheckpointError(
        f"{path}: refused to load: the file needs code outside megalite's allowlist of checkpoint types "
        f"({detail}). Nothing from it was executed. Do not load this file unless you know who wrote it."
    )


def safe_torch_load(path: str, map_location: Any = None, mmap: bool = False) -> Any:
    """torch.load with weights_only=True and DeepSpeed's allowlisted types; CheckpointError names the file.
    `mmap` maps the file instead of reading it (tensors are read on access)."""
    try:
        with torch.serialization.safe_globals(safe_globals_allowlist()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: checkpoint file is missing ({e})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint file ({type(e).__name__}: {e})") from None


def unsafe_globals(path: str) -> list[str]:
    """Pickle globals in a torch file outside the allowlist, read statically (nothing is executed)."""
    if not zipfile.is_zipfile(path):
        # Legacy (non-zip) torch files cannot be scanned statically: a weights_only load is the check.
        safe_torch_load(path, map_location="cpu")
        return []
    with torch.serialization.safe_globals(safe_globals_allowlist()):
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))

