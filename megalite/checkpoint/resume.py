"""Choosing the checkpoint to resume: verified on every rank, rejected ones quarantined, `resume: never` honoured.

Resume (collective): rank 0 lists candidates and reads their manifests; every rank hashes a share of the files and
scans their pickles for globals outside the allowlist; the problems are all-gathered, so every rank reaches the same
decision from the same data and a corrupt file cannot make ranks disagree.

Policies: 'never' moves the root's checkpoints aside (ROOT/superseded-TIME/, nothing deleted) and starts fresh;
'auto' takes the newest checkpoint that verifies, falling back to older ones (each rejection logged with the file and
field) and starting fresh when none is complete; 'must' is the same but raises CheckpointError when nothing verifies.
When every candidate was rejected for a layout/model/run mismatch (not corruption), both raise rather than start
fresh over another run's files. ROOT must be a file system that every rank sees.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

from megalite.checkpoint.manifest import identity_difference, read_manifest
from megalite.checkpoint.paths import LATEST, MANIFEST, committed_steps, parse_step, read_latest
from megalite.checkpoint.verify import listed_files, step_problem, unlisted_files, verify_share
from megalite.distributed import all_gather_objects, broadcast_object
from megalite.distributed import rank as global_rank
from megalite.distributed import world_size as global_world_size
from megalite.errors import CheckpointError
from megalite.files import fsync_dir

log = logging.getLogger("megalite.checkpoint")

RESUME_POLICIES = ("auto", "must", "never")


class ResumeChoice:
    """Resuming half of `CheckpointManager` (megalite.checkpoint.manager): expects `root`, `layout`, `model`,
    `identity`, `relayout`, `resume_report` and `_verified`."""

    root: str
    layout: dict
    model: dict
    identity: dict | None
    relayout: bool
    resume_report: list[str]
    _verified: dict[str, str]
    moved_aside: str | None = None  # where `resume: never` moved the earlier checkpoints, for the run to say

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
        steps = committed_steps(self.root)
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
        self.moved_aside = None
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
                self.moved_aside = moved[0]
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
                mine = verify_share(path, header["files"], rank, world)
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
        committed = committed_steps(self.root)
        latest_path = os.path.join(self.root, LATEST)
        if not os.path.exists(latest_path):
            if committed:
                notes.append(f"latest file {latest_path} is missing: using the newest complete checkpoint")
            return {"notes": notes, "candidates": [path for _, path in committed]}
        try:
            latest_name = read_latest(self.root)
        except CheckpointError as e:
            latest_name, problem = None, f"{e}: using the newest complete checkpoint instead"
        else:
            problem = None if latest_name else (f"latest file {latest_path} is empty: using the newest complete "
                                                "checkpoint instead")
        if latest_name and not os.path.isdir(os.path.join(self.root, latest_name)):
            problem = (f"latest file {latest_path} names {latest_name!r}, which is not a checkpoint directory of this "
                       "root: using the newest complete checkpoint instead")
        if problem:
            notes.append(problem)
        else:
            # `latest` is the run's only notion of newest: a directory after it was committed by a save that was killed
            # before `latest` moved, or belongs to something else; it is never resumed.
            newest = parse_step(latest_name)
            for step, path in committed:
                if step > newest:
                    notes.append(f"ignoring {path}: newer than {latest_name}, which latest names (a save "
                                 "interrupted before latest was updated)")
            committed = [(step, path) for step, path in committed if step <= newest]
        return {"notes": notes, "candidates": [path for _, path in committed]}

    def _check_manifest(self, path: str, expected_model: dict) -> dict[str, Any]:
        """Rank 0: read and check one candidate's manifest; returns the files to hash, or the problems found
        ("mismatch": the checkpoint is intact but another run's or layout's)."""
        try:
            manifest = read_manifest(path)
        except CheckpointError as e:
            return {"problems": [str(e)]}
        step = step_problem(manifest, path)
        if step:
            return {"problems": [step]}
        mpath = os.path.join(path, MANIFEST)
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
        return {"problems": unlisted_files(manifest, path), "files": listed_files(manifest), "step": manifest["step"],
                "body_sha256": manifest["body_sha256"]}

