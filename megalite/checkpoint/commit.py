"""The commit protocol: a checkpoint becomes visible whole or not at all, written synchronously or in the background.

On-disk layout under ROOT:
    ROOT/.tmp-step00000100/          being written (never loaded, removed by the next run)
    ROOT/step00000100/manifest.json  complete: written last, before the directory is renamed into place
    ROOT/step00000100/ds/...         DeepSpeed's files (tag "ds"); zero_to_fp32.py etc. next to ds/
    ROOT/latest                      "step00000100", replaced atomically after the rename

Save (collective): rank 0 creates the temporary directory; every rank lets DeepSpeed write its files through
megalite's checkpoint engine, which hashes (SHA-256) and fsyncs each file as it is written; the ranks all-gather their
file lists, hashes, RNG states and client state; rank 0 checks the directory against the lists (files DeepSpeed
copies itself, such as zero_to_fp32.py, are hashed after the write and marked so), writes manifest.json (temp file +
fsync + os.replace), renames the directory into place, fsyncs ROOT, updates `latest` the same way and prunes to the
newest `keep` checkpoints. Rank 0 then broadcasts the outcome so that every rank returns or raises together.

Asynchronous saves (save_async) run the same protocol in two halves. On the training thread, phase 1 as above, then
DeepSpeed's save_checkpoint with megalite's engine in snapshot mode: each state dict DeepSpeed hands it is copied into
host memory (no tensor shared with training) instead of written; that copy is the only stall. A background thread
then writes and hashes the files and runs phase 3 (confirm, manifest, rename, `latest`, prune) over a process group
of its own, so its collectives never interleave with training's. At most one save is in flight: the next save (or
wait()) first finishes it; a failure is raised there, on every rank alike.

Fault injection for tests: MEGALITE_CKPT_FAULT=<point> (megalite.checkpoint.faults).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

from megalite.checkpoint.ds_engine import safe_engine
from megalite.checkpoint.faults import fault
from megalite.checkpoint.manifest import (
    FORMAT,
    FORMAT_VERSION,
    check_json,
    git_commit,
    manifest_body_hash,
    read_manifest,
    versions,
)
from megalite.checkpoint.paths import DS_TAG, LATEST, MANIFEST, committed_steps, parse_step, read_latest, step_dir_name
from megalite.checkpoint.rng import rng_state
from megalite.checkpoint.snapshot import snapshot_bytes
from megalite.distributed import all_gather_objects, broadcast_object, is_distributed
from megalite.distributed import rank as global_rank
from megalite.errors import CheckpointError
from megalite.files import atomic_write_text, fsync_dir, sha256_file

log = logging.getLogger("megalite.checkpoint")


def _param_shapes(engine: Any) -> dict[str, list[int]]:
    """Full (pre-ZeRO-3-partition) shapes of this rank's parameters: enough for a resharding tool."""
    module = getattr(engine, "module", engine)
    shapes: dict[str, list[int]] = {}
    for name, p in module.named_parameters():
        shape = getattr(p, "ds_shape", None) or p.shape
        shapes[name] = [int(s) for s in shape]
    return shapes


def _group_by_value(values: list[Any]) -> list[dict[str, Any]]:
    """[{"ranks": [...], "value": v}] grouping equal per-rank values (DP replicas share one entry)."""
    groups: list[dict[str, Any]] = []
    for rank, v in enumerate(values):
        for g in groups:
            if g["value"] == v:
                g["ranks"].append(rank)
                break
        else:
            groups.append({"ranks": [rank], "value": v})
    return groups


@dataclass
class PendingSave:
    """A checkpoint being written in the background (CheckpointManager.save_async)."""

    step: int
    path: str  # the step directory it commits to
    snapshot_s: float  # how long training stalled: DeepSpeed's save with every tensor copied to host memory
    snapshot_bytes: int  # host memory the snapshot holds until written
    thread: threading.Thread | None = None
    outcome: tuple[str, str] | None = None  # ("ok", directory) or ("error", message), once finished
    write_s: float | None = None  # background: write, hash, confirm and commit
    waited_s: float | None = None  # how long wait() blocked the training thread

    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


class CommitProtocol:
    """Saving half of `CheckpointManager` (megalite.checkpoint.manager): expects `root`, `keep`, `layout`, `config`,
    `model`, `identity`, `_group` (the background saves' process group) and `_pending`."""

    root: str
    keep: int
    layout: dict
    config: dict
    model: dict
    identity: dict | None
    _group: Any
    _pending: PendingSave | None

    # ------------------------------------------------------------------ save

    def save(self, engine: Any, step: int, client_state: dict, needed_bytes: int = 0) -> str:
        """Write and commit the checkpoint of `step` (collective over all ranks); returns its directory.

        `needed_bytes` (an estimate of the checkpoint's size) is checked against the free space first, so a full disk
        is found before anything is written; a disk that fills up during the write is caught too. A background save
        still in flight is finished first."""
        self.wait()
        tmp, final, local = self._prepare(engine, step, client_state, needed_bytes)
        fault("before_shards", self.root)

        # Phase 2: DeepSpeed writes; our engine hashes and fsyncs each file as it is written. A rank whose write
        # fails (a full disk) reports it below instead of leaving the others waiting in the next collective.
        safe = safe_engine(engine)
        safe.begin_recording(self.root)
        local["error"] = None
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state={}, save_latest=False)
        except Exception as e:  # noqa: BLE001 - shared with every rank, then raised everywhere
            local["error"] = f"rank {global_rank()}: {type(e).__name__}: {e}"
        finally:
            written, failures = safe.end_recording()
        self._record_files(local, tmp, written, failures)
        return self._raise_unless_committed(step, final, self._confirm_and_commit(step, tmp, final, local))

    def save_async(self, engine: Any, step: int, client_state: dict, needed_bytes: int = 0) -> PendingSave:
        """Snapshot the checkpoint of `step` into host memory and return; a background thread writes, hashes and
        commits it with the same protocol as `save` (collective: every rank calls it at the same step).

        Needs `background=True` at construction. A save still in flight is finished first (at most one in flight);
        `wait()` finishes this one and raises if it failed."""
        if self._group is None and is_distributed():
            raise CheckpointError("save_async needs a CheckpointManager made with background=True")
        self.wait()
        t0 = time.perf_counter()
        tmp, final, local = self._prepare(engine, step, client_state, needed_bytes)
        fault("before_shards", self.root)
        safe = safe_engine(engine)
        safe.begin_recording(self.root, snapshot=True)
        local["error"] = None
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state={}, save_latest=False)
        except Exception as e:  # noqa: BLE001 - shared with every rank by the background commit
            local["error"] = f"rank {global_rank()}: {type(e).__name__}: {e}"
        finally:
            snapshots = safe.take_snapshots()
            copied, _ = safe.end_recording()  # files DeepSpeed wrote outside the snapshot: none so far
        fault("after_snapshot", self.root)
        pending = PendingSave(step=step, path=final, snapshot_s=time.perf_counter() - t0,
                              snapshot_bytes=sum(snapshot_bytes(state) for state, _ in snapshots))
        pending.thread = threading.Thread(target=self._write_in_background, name=f"megalite-save-{step}",
                                          args=(pending, safe, snapshots, tmp, local, copied), daemon=True)
        self._pending = pending
        pending.thread.start()
        return pending

    def _write_in_background(self, pending: PendingSave, safe: Any, snapshots: list, tmp: str, local: dict,
                             copied: dict) -> None:
        """The background half of save_async: write the snapshots, then confirm and commit over the checkpoint
        group (its own process group, so these collectives never interleave with training's)."""
        t0 = time.perf_counter()
        try:
            safe.begin_recording(self.root)
            try:
                for state, path in snapshots:
                    safe.write(state, path)
                    safe.buffers.give_back(state)  # written: the next snapshot may copy into it
            except Exception as e:  # noqa: BLE001 - this rank still confirms below: the others wait for it there
                local["error"] = f"rank {global_rank()}: {type(e).__name__}: {e}"
            snapshots.clear()
            written, failures = safe.end_recording()
            self._record_files(local, tmp, {**copied, **written}, failures)
            pending.outcome = self._confirm_and_commit(pending.step, tmp, pending.path, local, group=self._group)
        except BaseException as e:  # noqa: BLE001 - surfaces in wait() on the training thread
            pending.outcome = ("error", f"rank {global_rank()}: {type(e).__name__}: {e}")
        pending.write_s = time.perf_counter() - t0

    @property
    def in_flight(self) -> PendingSave | None:
        """The background save not yet waited for (it may have finished)."""
        return self._pending

    def wait(self) -> PendingSave | None:
        """Finish the background save in flight, if any: block until it is committed (or failed) and return it;
        raises CheckpointError, on every rank alike, when it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        t0 = time.perf_counter()
        pending.thread.join()
        pending.waited_s = time.perf_counter() - t0
        self._raise_unless_committed(pending.step, pending.path, pending.outcome or ("error", "no outcome"))
        return pending

    def _prepare(self, engine: Any, step: int, client_state: dict, needed_bytes: int) -> tuple[str, str, dict]:
        """Phase 1 (collective): validate inputs and create the temporary directory; agree before anything is
        written. Returns the temporary and final directories and this rank's record for the manifest."""
        rank = global_rank()
        name = step_dir_name(step)
        tmp = os.path.join(self.root, f".tmp-{name}")
        final = os.path.join(self.root, name)
        problem = None
        try:
            local_client = check_json(client_state, f"client_state passed to save(step={step}) on rank {rank}")
            if rank == 0:
                os.makedirs(self.root, exist_ok=True)
                if os.path.exists(tmp):  # left by a run killed while saving this same step
                    shutil.rmtree(tmp)
                free = shutil.disk_usage(self.root).free
                if needed_bytes > free:
                    raise CheckpointError(f"not enough free space: the checkpoint needs about "
                                          f"{needed_bytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free on {self.root}")
                os.makedirs(tmp)
        except (CheckpointError, OSError) as e:
            problem = f"rank {rank}: {e}"
            local_client = None
        problems = [p for p in all_gather_objects(problem) if p]
        if problems:
            raise CheckpointError(f"checkpoint save of step {step} to {final} failed before writing: "
                                  + "; ".join(problems) + "; the previous checkpoint and `latest` are unchanged")
        local = {
            "rng": rng_state(),
            "client_state": local_client,
            "param_shapes": _param_shapes(engine),
        }
        return tmp, final, local

    @staticmethod
    def _record_files(local: dict, tmp: str, written: dict, failures: list[str]) -> None:
        if failures and local["error"] is None:
            local["error"] = f"rank {global_rank()}: " + "; ".join(failures)
        local["files"] = {os.path.relpath(p, tmp): list(v) for p, v in written.items()}

    def _confirm_and_commit(self, step: int, tmp: str, final: str, local: dict, group: Any = None) -> tuple[str, str]:
        """Phase 3 (collective over `group`): all ranks confirm; rank 0 writes the manifest and commits; every rank
        gets the same outcome, ("ok", directory) or ("error", message)."""
        gathered = all_gather_objects(local, group=group)
        outcome: tuple[str, str]
        if global_rank() == 0:
            try:
                failed = [g["error"] for g in gathered if g["error"]]
                if failed:
                    raise CheckpointError("writing the files failed: " + "; ".join(failed))
                outcome = ("ok", self._commit(step, tmp, final, gathered))
            except Exception as e:  # noqa: BLE001 - must reach the other ranks, who are waiting below
                shutil.rmtree(tmp, ignore_errors=True)  # nothing half written stays; `latest` is untouched
                outcome = ("error", f"{e}{self._free_space_note()}")
        else:
            outcome = ("", "")
        return broadcast_object(outcome, group=group)

    @staticmethod
    def _raise_unless_committed(step: int, final: str, outcome: tuple[str, str]) -> str:
        if outcome[0] != "ok":
            raise CheckpointError(f"checkpoint save of step {step} to {final} failed: {outcome[1]}; the previous "
                                  "checkpoint and `latest` are unchanged")
        return outcome[1]

    def _free_space_note(self) -> str:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return ""
        return f" ({free / 2**20:.1f} MiB free on {self.root})"

    def _commit(self, step: int, tmp: str, final: str, gathered: list[dict]) -> str:
        """Rank 0: check the files, write the manifest, rename into place, update latest, prune."""
        files: dict[str, dict[str, Any]] = {}
        for rank, info in enumerate(gathered):
            for rel, (size, digest) in info["files"].items():
                if rel in files and files[rel]["sha256"] != digest:
                    raise CheckpointError(f"{os.path.join(tmp, rel)} was written by ranks {files[rel]['rank']} "
                                          f"and {rank} with different contents")
                files.setdefault(rel, {"size": size, "sha256": digest, "rank": rank, "hashed": "as_written"})
        for rel, meta in files.items():
            path = os.path.join(tmp, rel)
            actual = os.path.getsize(path) if os.path.exists(path) else None
            if actual != meta["size"]:
                raise CheckpointError(f"{path}: rank {meta['rank']} wrote {meta['size']} bytes, found {actual}")
        for dirpath, dirnames, filenames in os.walk(tmp):
            for fn in filenames:
                rel = os.path.relpath(os.path.join(dirpath, fn), tmp)
                if rel not in files:
                    # Written by DeepSpeed without the checkpoint engine (zero_to_fp32.py): hash it now.
                    size, digest = sha256_file(os.path.join(dirpath, fn))
                    files[rel] = {"size": size, "sha256": digest, "rank": 0, "hashed": "after_write"}
            for d in dirnames:
                fsync_dir(os.path.join(dirpath, d))
        fsync_dir(tmp)

        clients = [g["client_state"] for g in gathered]
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "created_unix": time.time(),
            "deepspeed_tag": DS_TAG,
            "layout": self.layout,
            "model": self.model,
            "run_identity": self.identity,
            "param_shapes": [{"ranks": g["ranks"], "shapes": g["value"]}
                             for g in _group_by_value([g["param_shapes"] for g in gathered])],
            "versions": versions(),
            "git_commit": git_commit(),
            "config": self.config,
            "rng": [g["rng"] for g in gathered],
            "files": dict(sorted(files.items())),
        }
        if all(c == clients[0] for c in clients):
            manifest["client_state"] = clients[0]
        else:
            manifest["client_state_per_rank"] = clients
        manifest["body_sha256"] = manifest_body_hash(manifest)

        fault("before_manifest", self.root)
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        fault("before_rename", self.root)
        if os.path.exists(final):
            # Re-saving a step (a 'never' run in an old root): move the old one out of the way atomically.
            self._discard(final)
        os.rename(tmp, final)
        fsync_dir(self.root)
        fault("before_latest", self.root)
        atomic_write_text(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
        fault("after_latest", self.root)
        self._prune(keep_also=os.path.basename(final))
        log.info("checkpoint step %d committed to %s (%d files)", step, final, len(files))
        return final

    def _discard(self, path: str) -> None:
        """Remove a directory: first rename it out of the namespace so it can never be seen half deleted."""
        trash = os.path.join(self.root, f".trash-{os.path.basename(path)}-{os.getpid()}-{time.time_ns()}")
        os.rename(path, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def latest_step(self) -> int | None:
        """The step `latest` names (None when there is none)."""
        name = read_latest(self.root)
        return parse_step(name) if name else None

    def committed_steps(self) -> list[tuple[int, str]]:
        """(step, dir) of committed-looking checkpoint directories, newest first (not yet verified)."""
        return committed_steps(self.root)

    def _prune(self, keep_also: str) -> None:
        """Keep the newest `keep` checkpoints up to the one just committed. Checkpoints newer than it belong to a
        timeline this run abandoned by resuming from an older `latest` (a save killed before `latest` moved): they
        go too, when they are this run's. Rejected and superseded checkpoints live elsewhere and never count;
        .tmp-* directories (being written) are never touched."""
        newest = parse_step(keep_also)
        kept = 0
        for step, path in self.committed_steps():
            if os.path.basename(path) == keep_also:
                kept += 1
            elif step > newest:
                if self._is_ours(path):
                    log.info("removing %s: newer than `latest` %s, from an abandoned save", path, keep_also)
                    self._discard(path)
            elif kept < self.keep:
                kept += 1
            else:
                log.info("removing old checkpoint %s (keep=%d)", path, self.keep)
                self._discard(path)

    def _is_ours(self, path: str) -> bool:
        """Whether a checkpoint directory's manifest carries this run's identity (unreadable: no)."""
        try:
            return read_manifest(path).get("run_identity") == self.identity
        except CheckpointError:
            return False
