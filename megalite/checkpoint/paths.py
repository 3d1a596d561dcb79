"""Where checkpoints live: step directory names, the `latest` pointer, and the one function that finds a
checkpoint from whatever path a user gives (a run directory, a checkpoint root, or a step directory)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from megalite.errors import CheckpointError

MANIFEST = "manifest.json"
LATEST = "latest"
DS_TAG = "ds"  # DeepSpeed's tag: its files live in STEPDIR/ds/
_STEP_RE = re.compile(r"^step(\d+)$")


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of `step` (zero-padded so that names sort by step)."""
    return f"step{int(step):08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint directory name, or None for anything else."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None



def committed_steps(root: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, directory) of committed-looking checkpoint directories under `root`, newest first (unverified)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        step = parse_step(name)
        if step is not None and os.path.isdir(os.path.join(root, name)):
            found.append((step, os.path.join(root, name)))
    return sorted(found, reverse=True)


def read_latest(root: str | os.PathLike) -> str | None:
    """The step directory name `root/latest` names, or None when the file is absent or empty.

    Only a plain step directory name (stepNNNNNNNN) is accepted, so `latest` can never point outside `root`.
    """
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8", errors="replace").strip()
    if not name:
        return None
    if parse_step(name) is None:
        raise CheckpointError(f"{path}: names {name!r}, which is not a checkpoint directory name (stepNNNNNNNN)")
    return name


def checkpoint_root(path: str | os.PathLike) -> Path:
    """The checkpoint root of a run directory, a checkpoint root, or a step directory."""
    p = Path(path)
    if (p / MANIFEST).is_file() or parse_step(p.name) is not None:
        return p.parent
    if (p / LATEST).is_file() or committed_steps(p):
        return p
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    raise CheckpointError(f"{p}: not a megalite checkpoint, checkpoint root or run directory (no {MANIFEST}, no "
                          f"{LATEST}, no step directories)")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory a path means: itself if it holds a manifest; else the checkpoint its root's
    `latest` names; else (no usable `latest`) the newest step directory with a manifest."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    root = checkpoint_root(p)
    name = read_latest(root)
    if name is not None:
        if (root / name / MANIFEST).is_file():
            return root / name
        raise CheckpointError(f"{root / LATEST}: names {name!r}, which is not a complete checkpoint in {root}")
    for _, step_dir in committed_steps(root):
        if os.path.isfile(os.path.join(step_dir, MANIFEST)):
            return Path(step_dir)
    raise CheckpointError(f"{root}: no complete checkpoint (no step directory with a {MANIFEST})")
