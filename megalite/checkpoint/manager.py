"""Crash-safe checkpoints under one root: the commit protocol, verified resume and loading into a DeepSpeed engine.

`CheckpointManager` is the one object over a checkpoint root. Its three concerns live in their own modules:

    commit.py   save / save_async / wait: the commit protocol (manifest written last, rename, `latest`), prune
    resume.py   find_resume: candidates after `latest`, verification on every rank, quarantine, `resume: never`
    load.py     load: a verified checkpoint into a DeepSpeed engine of the same layout, with each rank's RNG
    verify.py   the file checks both resume and `megalite checkpoint verify` use

The training loop does not call it directly: megalite.engine.checkpointer owns when to save, the non-finite guard,
sync/async and the restore after a reshard, and calls this.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from megalite.checkpoint.commit import CommitProtocol, PendingSave
from megalite.checkpoint.load import EngineLoad
from megalite.checkpoint.manifest import check_json
from megalite.checkpoint.resume import RESUME_POLICIES, ResumeChoice
from megalite.checkpoint.verify import verify_checkpoint
from megalite.config import Layout
from megalite.distributed import is_distributed
from megalite.errors import CheckpointError

__all__ = ["RESUME_POLICIES", "CheckpointManager", "PendingSave", "verify_checkpoint"]


class CheckpointManager(CommitProtocol, ResumeChoice, EngineLoad):
    """Saves, finds, verifies and loads megalite checkpoints under one root directory.

    `layout` (a Layout or its manifest form) is what every manifest records; `relayout` lets find_resume accept a
    checkpoint of another layout (the caller reshards it). `identity` (manifest.run_identity) makes checkpoints one
    run's; None accepts any run's. `background` creates the process group asynchronous saves commit over
    (collective)."""

    def __init__(
        self,
        root: str,
        keep: int = 2,
        layout: Layout | dict | None = None,
        config: dict | None = None,
        model: dict | None = None,
        identity: dict | None = None,
        relayout: bool = False,
        background: bool = False,
        background_timeout_s: float = 3600.0,
    ):
        if not isinstance(keep, int) or keep < 2:
            raise CheckpointError(f"checkpoint keep must be an integer >= 2 (got {keep!r}): one may be half written")
        self.root = os.path.abspath(root)
        self.keep = keep
        # All three go into manifest.json: fail now, on every rank, rather than halfway through a save.
        if isinstance(layout, Layout):
            layout = layout.to_manifest()
        self.layout = check_json(dict(layout or {}), "checkpoint layout")
        self.config = check_json(dict(config or {}), "resolved config given to CheckpointManager")
        if model is None and isinstance(self.config.get("model"), dict):
            model = self.config["model"]
        self.model = check_json(dict(model or {}), "model shape given to CheckpointManager")
        # Whether a checkpoint of another layout may be resumed (resharded by the caller): then layout differences
        # are noted, not rejected.
        self.relayout = relayout
        # What makes a checkpoint this run's (manifest.run_identity): None accepts any run's checkpoints.
        self.identity = check_json(identity, "run identity given to CheckpointManager") if identity else None
        self.resume_report: list[str] = []  # why find_resume chose what it chose, for logs and tests
        # Background saves (save_async) confirm and commit over a process group of their own (gloo: the objects
        # are small), so their collectives never interleave with the training thread's. Creating it is collective.
        self._group = None
        if background and is_distributed():
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=background_timeout_s))
        self._pending: PendingSave | None = None
        self._verified: dict[str, str] = {}

