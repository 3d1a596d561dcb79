"""megalite's DeepSpeed checkpoint engine: hashes and fsyncs each file as DeepSpeed writes it, and loads only
through the safe loader. DeepSpeed is imported when an engine is first made (it is the engine's base class)."""

from __future__ import annotations

import os
from typing import Any

import torch

from megalite.checkpoint.faults import fault
from megalite.checkpoint.safe_load import safe_torch_load
from megalite.checkpoint.snapshot import SnapshotBuffers, host_snapshot
from megalite.errors import CheckpointError
from megalite.files import HashingWriter


def _base_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine


def _make_safe_engine_class() -> type:
    base = _base_engine_class()

    class SafeCheckpointEngine(base):  # type: ignore[misc, valid-type]
        """DeepSpeed checkpoint engine: hashes+fsyncs files as written, loads only with weights_only=True."""

        megalite_safe = True

        def __init__(self, zipfile_serialization: bool = True):
            super().__init__(None)
            self.name = "MegaliteSafeCheckpointEngine"
            self.zipfile_serialization = zipfile_serialization
            self.recording: dict[str, tuple[int, str]] | None = None
            self.failures: list[str] = []
            self.fault_dir = "."
            # Snapshot mode (asynchronous saves): save() copies the state into host memory and queues it; the
            # background writer calls write_snapshots() later.
            self.snapshots: list[tuple[Any, str]] | None = None
            self.buffers = SnapshotBuffers()  # host memory reused by the next snapshot once a write is done

        def begin_recording(self, fault_dir: str, snapshot: bool = False) -> None:
            self.recording, self.failures = {}, []
            self.fault_dir = fault_dir
            self.snapshots = [] if snapshot else None

        def end_recording(self) -> tuple[dict[str, tuple[int, str]], list[str]]:
            """The files written since begin_recording (path -> size, SHA-256) and the writes that failed."""
            written, self.recording = self.recording or {}, None
            return written, self.failures

        def take_snapshots(self) -> list[tuple[Any, str]]:
            """The (state, path) pairs queued in snapshot mode; leaves snapshot mode."""
            taken, self.snapshots = self.snapshots or [], None
            return taken

        def preserves_storage_sharing(self) -> bool:
            # DeepSpeed clones tensors before save() when the engine would keep storage sharing (torch.save does);
            # a snapshot copies every tensor compactly itself, so that clone would only copy twice.
            return self.snapshots is None

        def save(self, state_dict: Any, path: str) -> None:
            if self.snapshots is not None:
                self.snapshots.append((host_snapshot(state_dict, buffers=self.buffers), path))
                return
            self.write(state_dict, path)

        def write(self, state_dict: Any, path: str) -> None:
            """Write, hash and fsync one file; a failure is recorded (see end_recording), not raised."""
            if self.recording is not None and self.recording:
                fault("between_shards", self.fault_dir)
            try:
                fault("write_file", self.fault_dir)
                writer = HashingWriter(path)
                try:
                    torch.save(state_dict, writer, _use_new_zipfile_serialization=self.zipfile_serialization)
                finally:
                    size, digest = writer.close()
            except (OSError, RuntimeError) as e:
                # A full disk. Recorded, not raised: DeepSpeed's save runs collectives after its writes, and a rank
                # that left it early would leave the others waiting there. The manager reports it once all return.
                self.failures.append(f"{path}: {e}")
                if os.path.exists(path):
                    os.unlink(path)
                return
            if self.recording is not None:
                self.recording[os.path.abspath(path)] = (size, digest)

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location=map_location)

    return SafeCheckpointEngine


_SAFE_ENGINE_CLASS: type | None = None


def _safe_engine_class() -> type:
    global _SAFE_ENGINE_CLASS
    if _SAFE_ENGINE_CLASS is None:
        _SAFE_ENGINE_CLASS = _make_safe_engine_class()
    return _SAFE_ENGINE_CLASS


def install_safe_loading(engine: Any) -> None:
    """Replace the DeepSpeed engine's checkpoint engine by megalite's (weights_only loads, hashed saves)."""
    current = getattr(engine, "checkpoint_engine", None)
    if getattr(current, "megalite_safe", False):
        return
    if current is not None and type(current) is not _base_engine_class():
        # Decoupled/fast/datastates engines write asynchronously: the commit protocol cannot vouch for them.
        raise CheckpointError(
            f"DeepSpeed config selects checkpoint engine {type(current).__name__}; megalite needs the default "
            "torch engine (remove the DeepSpeed 'checkpoint' engine settings from the config)."
        )
    zip_ser = getattr(current, "zipfile_serialization", True) if current is not None else True
    engine.checkpoint_engine = _safe_engine_class()(zipfile_serialization=bool(zip_ser))


def safe_engine(engine: Any) -> Any:
    install_safe_loading(engine)
    return engine.checkpoint_engine

