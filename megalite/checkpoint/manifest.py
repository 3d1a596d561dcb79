"""The manifest every committed checkpoint carries, and the fields it records about a run."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from typing import Any

import torch

import megalite
from megalite.errors import CheckpointError

FORMAT = "megalite-checkpoint"
FORMAT_VERSION = 1


def manifest_body_hash(manifest: dict) -> str:
    """SHA-256 of the manifest without its own `body_sha256` field (detects a truncated or edited manifest)."""
    body = {k: v for k, v in manifest.items() if k != "body_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def git_commit() -> str | None:
    """The git commit of the megalite source tree, when it is a git checkout with commits."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def versions() -> dict[str, str | None]:
    """Versions of the packages that wrote a checkpoint."""
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:  # loading tools may run without DeepSpeed
        ds_version = None
    return {
        "megalite": megalite.__version__,
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "python": platform.python_version(),
    }


def check_json(value: Any, where: str) -> Any:
    """Round-trip `value` through JSON so that what we save is exactly what a resume gets back."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{where} must be JSON-serialisable (dicts, lists, str, int, float, bool, None): {e}. "
            "Convert tensors/arrays to lists or ints before saving."
        ) from e



def model_signature(model_cfg: Any) -> dict[str, Any]:
    """The model fields a checkpoint must match to be loaded into a model: the one list used by resume and
    by `train.init_from` (names of megalite.config.ModelConfig attributes)."""
    keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size", "padded_vocab_size",
            "norm", "mlp", "position", "bias", "tied_embeddings")
    return {key: getattr(model_cfg, key) for key in keys}
