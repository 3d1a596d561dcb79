"""Crash-safe checkpoints: the commit protocol, verified resume and loading into a DeepSpeed engine.

Every checkpoint read or write in megalite goes through the `megalite.checkpoint` package.

On-disk layout under ROOT:
    ROOT/.tmp-step00000100/          being written (never loaded, removed by the next run)
    ROOT/step00000100/manifest.json  complete: written last, before the directory is renamed into place
    ROOT/step00000100/ds/...         DeepSpeed's files (tag "ds"); zero_to_fp32.py etc. next to ds/
    ROOT/latest                      "step00000100", replaced atomically after the rename

Save protocol (collective): rank 0 creates the temporary directory; every rank lets DeepSpeed write its
files through megalite's checkpoint engine, which hashes (SHA-256) and fsyncs each file as it is written;
the ranks all-gather their file lists, hashes, RNG states and client state; rank 0 checks the directory
against the lists (files DeepSpeed copies itself, such as zero_to_fp32.py, are hashed after the write and
marked so), writes manifest.json (temp file + fsync + os.replace), renames the directory into place,
fsyncs ROOT, updates `latest` the same way and prunes to the newest `keep` checkpoints. Rank 0 then
broadcasts the outcome so that every rank returns or raises together.

Asynchronous saves (save_async) run the same protocol in two halves. On the training thread, phase 1 as above,
then DeepSpeed's save_checkpoint with megalite's engine in snapshot mode: each state dict DeepSpeed hands it is
copied into host memory (no tensor shared with training) instead of written; that copy is the only stall. A
background thread then writes and hashes the files and runs phase 3 (confirm, manifest, rename, `latest`, prune)
over a process group of its own, so its collectives never interleave with training's. At most one save is in
flight: the next save (or wait()) first finishes it; a failure is raised there, on every rank alike.

Resume (collective): rank 0 lists candidates and reads their manifests; every rank hashes a share of
the files and scans their pickles for globals outside the allowlist; the problems are all-gathered, so
every rank reaches the same decision from the same data and a corrupt file cannot make ranks disagree.

Loading never executes code from a checkpoint: DeepSpeed reads files through `SafeCheckpointEngine`,
which calls torch.load(weights_only=True) with an explicit allowlist of DeepSpeed's own types.

Resume policies: 'never' ignores ROOT; 'auto' takes the newest checkpoint that verifies, falling back to
older ones (each rejection logged with the file and field) and starting fresh when none is complete;
'must' is the same but raises CheckpointError when nothing verifies. When every candidate was rejected for
a layout/model mismatch (not corruption), both raise rather than start fresh over another run's files.
ROOT must be a filesystem that every rank sees (rank 0 checks and hashes files written by all ranks).

Fault injection for tests: MEGALITE_CKPT_FAULT=<point> (see FAULT_POINTS), MEGALITE_CKPT_FAULT_RANK
(default 0) and MEGALITE_CKPT_FAULT_KILL=self|group (SIGKILL this process, or its whole process group).
The rank that reaches the point first writes the marker file fault-<point>-rank<r> into
MEGALITE_CKPT_FAULT_DIR (default ROOT) and fsyncs it, so a test can prove the point was reached.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from megalite.checkpoint.ds_engine import install_safe_loading, safe_engine
from megalite.checkpoint.faults import fault
from megalite.checkpoint.manifest import (
    FORMAT,
    FORMAT_VERSION,
    check_json,
    git_commit,
    identity_difference,
    manifest_body_hash,
    versions,
)
from megalite.checkpoint.paths import (
    DS_TAG,
    LATEST,
    MANIFEST,
    committed_steps,
    parse_step,
    read_latest,
    step_dir_name,
)
from megalite.checkpoint.rng import rng_state, set_rng_state
from megalite.checkpoint.safe_load import unsafe_globals
from megalite.checkpoint.snapshot import snapshot_bytes
from megalite.distributed import all_gather_objects, broadcast_object, is_distributed, scatter_objects
from megalite.distributed import rank as global_rank
from megalite.distributed import world_size as global_world_size
from megalite.errors import CheckpointError
from megalite.files import atomic_write_text, fsync_dir, sha256_file

log = logging.getLogger("megalite.checkpoint")

RESUME_POLICIES = ("auto", "must", "never")


def _param_shapes(engine: Any) -> dict[str, list[int]]:
    """Full (pre-ZeRO-3-partition) shapes of this rank's parameters: enough for a resharding tool."""
    module = getattr(engine, "module", engine)
    shapes: dict[str, list[int]] = {}
    for name, p in module.named_parameters():
        shape = getattr(p, "ds_shape", None) or p.shape
        shapes[name] = [int(s) for s in shape]
    return shapes


def _engine_layout(engine: Any, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"world_size": world}
    for key, attr in (("zero_stage", "zero_optimization_stage"),):
        fn = getattr(engine, attr, None)
        if callable(fn):
            out[key] = int(fn())
    for key in ("dp_world_size", "mp_world_size"):
        value = getattr(engine, key, None)
        if isinstance(value, int):
            out[key] = value
    out["pipeline"] = type(engine).__name__ == "PipelineEngine"
    return out


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


class CheckpointManager:
    """Saves, finds, verifies and loads megalite checkpoints under one root directory."""

    def __init__(
        self,
        root: str,
        keep: int = 2,
        layout: dict | None = None,
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
            for state, path in snapshots:
                safe.write(state, path)
                safe.buffers.give_back(state)  # written: the next snapshot may copy into it
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
        rank, world = global_rank(), global_world_size()
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
            "layout": _engine_layout(engine, world),
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
        layout = dict(gathered[0]["layout"])
        layout.update(self.layout)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "created_unix": time.time(),
            "deepspeed_tag": DS_TAG,
            "layout": layout,
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
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                return json.load(f).get("run_identity") == self.identity
        except (OSError, ValueError):
            return False

    def _quarantine(self, path: str, problems: list[str]) -> str:
        """Rank 0: move a checkpoint that failed verification out of the step namespace, with the reasons beside it,
        so it is never loaded and never counts toward `keep` (nothing is deleted: a transient fault stays
        recoverable by hand)."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = os.path.join(self.root, f"rejected-{os.path.basename(path)}-{stamp}-{os.getpid()}")
        os.rename(path, target)
        fsync_dir(self.root)
        with open(os.path.join(target, "REJECTED.txt"), "w", encoding="utf-8") as f:
            f.write("This checkpoint failed verification and was moved here by megalite:\n")
            f.write("\n".join(problems) + "\n")
        return target

    def _move_aside(self) -> str | None:
        """Rank 0, `resume: never`: move every committed checkpoint and `latest` of the root into
        ROOT/superseded-TIME/, so this run's checkpoints cannot mix with an earlier run's (nothing is deleted)."""
        steps = self.committed_steps()
        latest = os.path.join(self.root, LATEST)
        if not steps and not os.path.exists(latest):
            return None
        target = os.path.join(self.root, f"superseded-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
        os.makedirs(target)
        for _, path in steps:
            os.rename(path, os.path.join(target, os.path.basename(path)))
        if os.path.exists(latest):
            os.rename(latest, os.path.join(target, LATEST))
        fsync_dir(self.root)
        return target

    # ------------------------------------------------------------------ resume

    def find_resume(self, policy: str, expected_model: dict | None = None) -> str | None:
        """Choose and verify the checkpoint to resume from (collective; every rank gets the same answer)."""
        if policy not in RESUME_POLICIES:
            raise CheckpointError(f"train.resume must be one of {RESUME_POLICIES}, got {policy!r}")
        self.resume_report = []
        rank, world = global_rank(), global_world_size()
        if policy == "never":
            moved: tuple[str | None, str | None] = (None, None)
            if rank == 0:
                try:
                    moved = (self._move_aside(), None)
                except OSError as e:
                    moved = (None, f"{self.root}: cannot move the existing checkpoints aside: {e}")
            moved = broadcast_object(moved)
            if moved[1]:
                raise CheckpointError(moved[1])
            if moved[0]:
                self._note(f"resume policy 'never': moved the checkpoints already in {self.root} to {moved[0]}")
            self._note("resume policy 'never': starting fresh")
            return None
        expected_model = dict(self.model if expected_model is None else expected_model)

        plan: dict[str, Any] = {"notes": [], "candidates": []}
        if rank == 0:
            try:
                plan = self._plan()
            except Exception as e:  # noqa: BLE001 - must reach the other ranks
                plan = {"notes": [f"{self.root}: cannot list checkpoints: {type(e).__name__}: {e}"], "candidates": []}
        plan = broadcast_object(plan)
        for note in plan["notes"]:
            self._note(note)

        mismatch = False
        for path in plan["candidates"]:
            header: dict[str, Any]
            if rank == 0:
                try:
                    header = self._check_manifest(path, expected_model)
                except Exception as e:  # noqa: BLE001
                    header = {"problems": [f"{os.path.join(path, MANIFEST)}: {type(e).__name__}: {e}"]}
            else:
                header = {}
            header = broadcast_object(header)
            problems = list(header.get("problems", []))
            mismatch = mismatch or bool(header.get("mismatch"))
            if not problems:
                mine = _verify_share(path, header["files"], rank, world)
                problems = sorted({p for ps in all_gather_objects(mine) for p in ps})
            if not problems:
                self._note(f"resuming from {path} (step {header['step']}): manifest, sizes, hashes, layout verified")
                self._verified[path] = header["body_sha256"]
                return path
            for p in problems:
                self._note(f"rejected {path}: {p}")
            if not header.get("mismatch"):
                # Corrupt or incomplete: quarantined, so it never counts toward `keep` nor is tried again.
                where = None
                if rank == 0:
                    try:
                        where = self._quarantine(path, problems)
                    except OSError as e:
                        where = f"not moved ({e})"
                where = broadcast_object(where)
                self._note(f"quarantined {path} -> {where}")

        if mismatch:
            raise CheckpointError(
                f"{self.root}: no checkpoint matches this run (see above): refusing to start fresh over another "
                "run's checkpoints. To start a new run here anyway, set train.resume=never (the existing "
                "checkpoints are moved to a superseded-* folder, nothing is deleted); or use another "
                "train.checkpoint_dir; to start from those weights with a fresh optimizer, set train.init_from.\n"
                + "\n".join(self.resume_report)
            )
        if policy == "must":
            raise CheckpointError(
                f"{self.root}: resume 'must' but there is no complete, verified checkpoint to resume from.\n"
                + "\n".join(self.resume_report)
            )
        self._note(f"{self.root}: no complete checkpoint to resume from: starting fresh")
        return None

    def _note(self, msg: str) -> None:
        self.resume_report.append(msg)
        if global_rank() == 0:
            level = logging.WARNING if msg.startswith(("rejected", "latest", self.root)) else logging.INFO
            log.log(level, msg)

    def _plan(self) -> dict[str, Any]:
        """Rank 0: candidate directories, newest first, and notes about `latest` and leftovers."""
        notes: list[str] = []
        if not os.path.isdir(self.root):
            return {"notes": [f"{self.root}: no checkpoint directory yet"], "candidates": []}
        for name in sorted(os.listdir(self.root)):
            if name.startswith((".tmp-", ".trash-")):
                # Left by a run killed while saving or pruning; this run has not started saving yet.
                notes.append(f"removing incomplete {os.path.join(self.root, name)} (never committed)")
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        committed = self.committed_steps()
        latest_path = os.path.join(self.root, LATEST)
        latest_name = None
        if os.path.exists(latest_path):
            with open(latest_path, encoding="utf-8", errors="replace") as f:
                latest_name = f.read().strip()
            if not latest_name:
                notes.append(f"latest file {latest_path} is empty: using the newest complete checkpoint instead")
            elif parse_step(latest_name) is None or not os.path.isdir(os.path.join(self.root, latest_name)):
                notes.append(f"latest file {latest_path} names {latest_name!r}, which is not a checkpoint directory "
                             "of this root: using the newest complete checkpoint instead")
            else:
                # `latest` is the run's only notion of newest: a directory after it was committed by a save that
                # was killed before `latest` moved, or belongs to something else; it is never resumed.
                newest = parse_step(latest_name)
                for step, path in committed:
                    if step > newest:
                        notes.append(f"ignoring {path}: newer than {latest_name}, which latest names (a save "
                                     "interrupted before latest was updated)")
                committed = [(step, path) for step, path in committed if step <= newest]
        elif committed:
            notes.append(f"latest file {latest_path} is missing: using the newest complete checkpoint")
        return {"notes": notes, "candidates": [path for _, path in committed]}

    def _check_manifest(self, path: str, expected_model: dict) -> dict[str, Any]:
        """Rank 0: parse and check one manifest; returns files to hash or the problems found."""
        mpath = os.path.join(path, MANIFEST)
        if not os.path.exists(mpath):
            return {"problems": [f"{mpath}: missing (incomplete checkpoint, never loaded)"]}
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            return {"problems": [f"{mpath}: not valid JSON (truncated or corrupt): {e}"]}
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return {"problems": [f"{mpath}: field format is not {FORMAT!r}"]}
        if manifest.get("body_sha256") != manifest_body_hash(manifest):
            return {"problems": [f"{mpath}: field body_sha256 does not match the manifest's content (edited or "
                                 "corrupt)"]}
        if manifest.get("format_version") != FORMAT_VERSION:
            return {"problems": [f"{mpath}: field format_version is {manifest.get('format_version')!r}, "
                                 f"this megalite reads {FORMAT_VERSION}"]}
        if step_dir_name(manifest.get("step", -1)) != os.path.basename(path):
            return {"problems": [f"{mpath}: field step is {manifest.get('step')!r} but the directory is {path}"]}
        problems = []
        for key, want in sorted(self.layout.items()):
            have = manifest.get("layout", {}).get(key)
            if have != want and not self.relayout:
                problems.append(f"{mpath}: field layout.{key} is {have!r} but this run is configured with {want!r}")
        for key, want in sorted(expected_model.items()):
            have = manifest.get("model", {}).get(key)
            if have != want:
                problems.append(f"{mpath}: field model.{key} is {have!r} but this run is configured with {want!r}")
        if self.identity is not None and manifest.get("run_identity") != self.identity:
            problems.append(f"{mpath}: a checkpoint of another run: {identity_difference(manifest.get('run_identity'), self.identity)}")
        if problems:
            return {"problems": problems, "mismatch": True}
        # Files in the directory that the manifest does not list could be picked up by DeepSpeed's globs.
        listed = set(manifest["files"])
        for dirpath, _, filenames in os.walk(path):
            for fn in filenames:
                rel = os.path.relpath(os.path.join(dirpath, fn), path)
                if rel != MANIFEST and rel not in listed:
                    problems.append(f"{os.path.join(path, rel)}: not listed in {mpath} (unexpected file)")
        files = {rel: (meta["size"], meta["sha256"]) for rel, meta in manifest["files"].items()}
        return {"problems": problems, "files": files, "step": manifest["step"], "body_sha256": manifest["body_sha256"]}

    # ------------------------------------------------------------------ load

    def load(self, engine: Any, path: str) -> dict:
        """Load a verified checkpoint into `engine` safely and restore this rank's RNG (collective)."""
        rank, world = global_rank(), global_world_size()
        mpath = os.path.join(path, MANIFEST)
        shared: dict[str, Any] = {}
        per_rank: list[Any] = [None] * world
        if rank == 0:
            try:
                with open(mpath, encoding="utf-8") as f:
                    manifest = json.load(f)
                if manifest.get("body_sha256") != manifest_body_hash(manifest):
                    raise CheckpointError(f"{mpath}: field body_sha256 does not match the manifest's content")
                rngs = manifest.pop("rng", [])
                clients = manifest.pop("client_state_per_rank", None)
                per_rank = [
                    {"rng": rngs[r] if len(rngs) == world else None,
                     "client_state": clients[r] if clients is not None and r < len(clients) else None}
                    for r in range(world)
                ]
                shared = {"manifest": manifest, "error": None, "saved_ranks": len(rngs),
                          "has_per_rank_client": clients is not None}
            except (OSError, ValueError, KeyError, CheckpointError) as e:
                shared = {"manifest": None, "error": f"{mpath}: cannot read manifest: {e}"}
        shared = broadcast_object(shared)
        if shared["error"]:
            raise CheckpointError(shared["error"])
        mine_state = scatter_objects(per_rank)  # each rank gets only its own RNG/client state, not everyone's
        manifest = shared["manifest"]
        if self._verified.get(path) != manifest["body_sha256"]:
            # Not verified by find_resume: at least make sure no file can run code, agreed by all ranks.
            files = {rel: (meta["size"], meta["sha256"]) for rel, meta in manifest["files"].items()}
            mine = _verify_share(path, files, rank, world, hashes=False)
            problems = sorted({p for ps in all_gather_objects(mine) for p in ps})
            if problems:
                raise CheckpointError(f"{path}: refusing to load:\n" + "\n".join(problems))

        install_safe_loading(engine)
        load_path, _ = engine.load_checkpoint(path, tag=manifest.get("deepspeed_tag", DS_TAG),
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed did not load the checkpoint (tag {DS_TAG!r} missing?)")

        client = mine_state["client_state"] if shared["has_per_rank_client"] else manifest.get("client_state")
        rng = mine_state["rng"]
        if rng is not None:
            set_rng_state(rng)
        else:
            log.warning("%s: saved with %d ranks, running with %d: RNG states not restored",
                        mpath, shared["saved_ranks"], world)
        return {
            "step": manifest["step"],
            "client_state": client,
            "rng": rng,
            "config": manifest.get("config", {}),
            "layout": manifest.get("layout", {}),
            "path": path,
        }


def _verify_share(path: str, files: dict[str, Any], rank: int, world: int, hashes: bool = True) -> list[str]:
    """Check this rank's share of `files` (size, hash, pickle globals); returns problems, never raises."""
    # Greedy by size so that every rank hashes about the same number of bytes; deterministic on all ranks.
    load = [0] * world
    mine: list[str] = []
    for rel, (size, _) in sorted(files.items(), key=lambda kv: (-kv[1][0], kv[0])):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += max(int(size), 1)
        if owner == rank:
            mine.append(rel)
    problems = []
    for rel in mine:
        full = os.path.join(path, rel)
        size, digest = files[rel]
        try:
            if not os.path.exists(full):
                problems.append(f"{full}: missing (listed in {MANIFEST})")
                continue
            actual = os.path.getsize(full)
            if actual != size:
                problems.append(f"{full}: size is {actual} bytes, {MANIFEST} says {size} (truncated or corrupt)")
                continue
            if hashes and sha256_file(full)[1] != digest:
                problems.append(f"{full}: SHA-256 does not match {MANIFEST} (corrupt)")
                continue
            if rel.endswith((".pt", ".pth", ".bin")):
                bad = unsafe_globals(full)
                if bad:
                    problems.append(f"{full}: refused: pickle globals outside megalite's allowlist {bad} "
                                    "(a file that would run code on load)")
        except CheckpointError as e:
            problems.append(str(e))
        except Exception as e:  # noqa: BLE001 - one rank's exception must not make the ranks disagree
            problems.append(f"{full}: cannot verify: {type(e).__name__}: {e}")
    return problems


def verify_checkpoint(path: str) -> dict:
    """One process: check a committed checkpoint against its manifest (format, body hash, every file's size and
    SHA-256, pickle globals); returns the manifest or raises CheckpointError listing every problem."""
    checker = CheckpointManager(os.path.dirname(os.path.abspath(path)))
    report = checker._check_manifest(os.path.abspath(path), {})
    problems = list(report["problems"])
    if "files" in report:
        problems += _verify_share(os.path.abspath(path), report["files"], 0, 1)
    if problems:
        raise CheckpointError(f"{path}: checkpoint failed verification:\n  " + "\n  ".join(problems))
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        return json.load(f)
