"""Checkpoints: every read and write of training state goes through this package.

    paths        step directory names, `latest`, and finding a checkpoint from any path a user gives
    manifest     the manifest's format, hash, and the model fields a checkpoint must match
    manager      the commit protocol (save, also in the background), verified resume, loading into a DeepSpeed
                 engine, verify
    ds_engine    megalite's DeepSpeed checkpoint engine (hash + fsync as written, safe loads, host snapshots)
    snapshot     host-memory copies of the checkpoint state, for asynchronous saves
    reshard      `TrainingState`: a checkpoint of any layout's full training state, one parameter at a time
    safe_load    torch.load(weights_only=True) with an allowlist; static pickle scan
    rng          RNG states as JSON
    faults       fault injection points for the crash-safety tests
    consolidate  full, unsharded weights from a checkpoint of any layout
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562): `megalite checkpoint list` and path lookups need no torch.
_EXPORTS = {
    "CheckpointManager": "manager", "RESUME_POLICIES": "manager", "verify_checkpoint": "manager",
    "model_signature": "manifest", "run_identity": "manifest", "safe_torch_load": "safe_load",
    "DS_TAG": "paths", "LATEST": "paths", "MANIFEST": "paths", "checkpoint_root": "paths",
    "committed_steps": "paths", "resolve_checkpoint": "paths",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megalite.checkpoint.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megalite.checkpoint' has no attribute {name!r}")
