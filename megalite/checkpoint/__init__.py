"""Checkpoints: every read and write of training state goes through this package.

    paths        step directory names, `latest`, and the one resolver from any path a user gives to a step directory
    manifest     the manifest's format and hash, `read_manifest` (the one parser), run identity and model fields
    manager      CheckpointManager, the object over one checkpoint root, made of:
      commit       the commit protocol: synchronous and asynchronous (snapshot + background write) saves, pruning
      resume       choosing the checkpoint to resume: verification on every rank, quarantine, `resume: never`
      load         a verified checkpoint into a DeepSpeed engine of the same layout
    verify       file sizes, hashes and pickle globals against the manifest (resume and `checkpoint verify`)
    reshard      TrainingState: a checkpoint's full training state by canonical parameter name, any layout
    consolidate  full, unsharded weights (and a model) from a checkpoint of any layout
    snapshot     host copies of state dicts for asynchronous saves, with reused buffers
    ds_engine    megalite's DeepSpeed checkpoint engine (hash + fsync as written, snapshot mode, safe loads)
    safe_load    torch.load(weights_only=True) with an allowlist; static pickle scan
    rng          RNG states as JSON
    faults       fault injection points for the crash-safety tests

The training loop's own checkpoint object (when to save, the non-finite guard, sync or async, the restore after a
reshard) is megalite.engine.checkpointer.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562): `megalite checkpoint list` and path lookups need no torch.
_EXPORTS = {
    "CheckpointManager": "manager", "RESUME_POLICIES": "resume", "verify_checkpoint": "verify",
    "model_signature": "manifest", "read_manifest": "manifest", "manifest_layout": "manifest", "run_identity": "manifest", "safe_torch_load": "safe_load",
    "DS_TAG": "paths", "LATEST": "paths", "MANIFEST": "paths", "checkpoint_root": "paths",
    "committed_steps": "paths", "resolve_checkpoint": "paths",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megalite.checkpoint.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megalite.checkpoint' has no attribute {name!r}")
