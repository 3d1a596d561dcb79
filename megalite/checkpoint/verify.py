"""Verification of a committed checkpoint against its manifest: every file's size and SHA-256, the pickles' globals,
the directory's contents. A resume shares the work over all ranks (`verify_share`); `verify_checkpoint` does it in
one process (`megalite checkpoint verify`, the offline reshard, consolidation)."""

from __future__ import annotations

import os
from typing import Any

from megalite.checkpoint.manifest import read_manifest
from megalite.checkpoint.paths import MANIFEST, step_dir_name
from megalite.checkpoint.safe_load import unsafe_globals
from megalite.errors import CheckpointError
from megalite.files import sha256_file


def step_problem(manifest: dict[str, Any], path: str) -> str | None:
    """A manifest whose step is not its directory's (a directory renamed or copied over another), else None."""
    if step_dir_name(manifest.get("step", -1)) != os.path.basename(path):
        return f"{os.path.join(path, MANIFEST)}: field step is {manifest.get('step')!r} but the directory is {path}"
    return None


def unlisted_files(manifest: dict[str, Any], path: str) -> list[str]:
    """Files in a step directory that its manifest does not list (DeepSpeed's globs could pick them up)."""
    mpath = os.path.join(path, MANIFEST)
    listed = set(manifest["files"])
    problems = []
    for dirpath, _, filenames in os.walk(path):
        for fn in filenames:
            rel = os.path.relpath(os.path.join(dirpath, fn), path)
            if rel != MANIFEST and rel not in listed:
                problems.append(f"{os.path.join(path, rel)}: not listed in {mpath} (unexpected file)")
    return problems


def listed_files(manifest: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every file a manifest lists."""
    return {rel: (meta["size"], meta["sha256"]) for rel, meta in manifest["files"].items()}


def verify_share(path: str, files: dict[str, Any], rank: int, world: int, hashes: bool = True) -> list[str]:
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



def verify_checkpoint(path: str | os.PathLike) -> dict:
    """One process: check a committed checkpoint against its manifest (format, body hash, every file's size and
    SHA-256, pickle globals); returns the manifest or raises CheckpointError listing every problem."""
    path = os.path.abspath(path)
    try:
        manifest = read_manifest(path)
        step = step_problem(manifest, path)
        problems = [step] if step else unlisted_files(manifest, path) + verify_share(path, listed_files(manifest), 0, 1)
    except CheckpointError as e:
        problems = [str(e)]
    if problems:
        raise CheckpointError(f"{path}: checkpoint failed verification:\n  " + "\n  ".join(problems))
    return manifest
