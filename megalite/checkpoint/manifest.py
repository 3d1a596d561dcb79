"""The manifest every committed checkpoint carries, and the fields it records about a run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import megalite
from megalite.checkpoint.paths import MANIFEST
from megalite.config import Config, Layout, from_dict
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
    """Versions of the packages that wrote a checkpoint (torch on use: reading manifests needs no torch)."""
    import torch

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


def read_manifest(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a step directory, parsed and self-consistent: a JSON object of this format and version whose
    body hash matches. The one place that parses manifest.json; CheckpointError naming the file and field."""
    path = Path(step_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint, never loaded)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON (truncated or corrupt): {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field format is not {FORMAT!r}")
    if manifest.get("body_sha256") != manifest_body_hash(manifest):
        raise CheckpointError(f"{path}: field body_sha256 does not match the manifest's content (edited or corrupt)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: field format_version is {manifest.get('format_version')!r}, this megalite "
                              f"reads {FORMAT_VERSION}")
    return manifest


def manifest_layout(manifest: dict[str, Any]) -> Layout:
    """The layout a manifest records (megalite.config.Layout)."""
    return Layout.from_manifest(manifest.get("layout") or {})


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
    by `train.init_from` (names of megalite.config.ModelConfig attributes). For MoE models, what decides the tensors:
    which layers have experts, how many, their widths and the routers' bias buffer (not the routing rules or the
    balancing coefficients, which a run started from another's weights may change)."""
    keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size", "padded_vocab_size",
            "norm", "mlp", "position", "bias", "tied_embeddings", "qk_norm", "attention_head_dim")
    out = {key: getattr(model_cfg, key) for key in keys}
    moe = getattr(model_cfg, "moe", None)
    out["moe"] = None if moe is None else {
        "num_experts": moe.num_experts, "expert_ffn_size": model_cfg.expert_ffn_size,
        "shared_ffn_size": model_cfg.shared_ffn_size, "expert_bias": moe.expert_bias,
        "layers": [i for i in range(model_cfg.num_layers) if model_cfg.is_moe_layer(i)]}
    return out


# Fields of a run that may change when it resumes (longer training, other logging, recompute to fit memory, more
# data loader workers, FP8 on or off: it keeps no state): everything else of the model and data sections, the seed
# and the optimizer type make a run what it is. The layout is compared separately (and may change through elastic
# resume).
RESUMABLE_MODEL_FIELDS = ("activation_checkpointing", "loss_chunk_tokens", "fp8")
RESUMABLE_DATA_FIELDS = ("num_workers", "cache_dir", "prefixes")  # prefixes by content below, not by path


def run_identity(cfg: Any) -> dict[str, Any]:
    """What makes checkpoints one run's: the seed, the model and data settings (the data by content, so a run
    resumed from another working directory is the same run) and the optimizer type."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in RESUMABLE_MODEL_FIELDS}
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in RESUMABLE_DATA_FIELDS}
    data["fingerprints"] = [data_fingerprint(p) for p in cfg.data.prefixes]
    optimizer = (cfg.deepspeed.get("optimizer") or {}).get("type", "AdamW")
    return check_json({"seed": cfg.train.seed, "model": model, "data": data, "optimizer": optimizer}, "run identity")


# The fields of a data manifest (PREFIX.json) that decide the tokens a run reads; other fields (the cleaning
# report, settings added by later versions of `prepare`) may differ for the same data.
DATA_FINGERPRINT_FIELDS = ("num_documents", "num_tokens", "dtype", "vocab_size", "eod_token_id", "bos_token_id",
                           "tokenizer_sha256")


def data_fingerprint(prefix: str) -> str:
    """A cheap content fingerprint of a data prefix: the token-deciding fields of its manifest and the sizes of its
    .idx and .bin files (without a manifest, the sizes alone)."""
    sizes = [os.path.getsize(f"{prefix}{ext}") if os.path.exists(f"{prefix}{ext}") else -1 for ext in (".idx", ".bin")]
    fields: dict[str, Any] = {}
    if os.path.isfile(f"{prefix}.json"):
        try:
            with open(f"{prefix}.json", encoding="utf-8") as f:
                manifest = json.load(f)
            fields = {k: manifest.get(k) for k in DATA_FINGERPRINT_FIELDS} if isinstance(manifest, dict) else {}
        except (OSError, ValueError):
            fields = {}
    body = json.dumps({"sizes": sizes, **fields}, sort_keys=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def identity_difference(theirs: Any, mine: dict[str, Any]) -> str:
    """The first field where a checkpoint's run identity differs from this run's, in words."""
    if not isinstance(theirs, dict):
        return "it records no run identity (written by an older megalite or another tool)"

    def first(a: Any, b: Any, path: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                found = first(a.get(key), b.get(key), f"{path}.{key}" if path else key)
                if found:
                    return found
            return None
        return None if a == b else f"{path} is {a!r} there but {b!r} in this run"

    return first(theirs, mine, "") or "identical"


def checkpoint_config(manifest: dict, step_dir: Path) -> Config:
    """The resolved run config stored in the manifest."""
    raw = dict(manifest.get("config") or {})
    if not raw:
        raise CheckpointError(f"{step_dir / MANIFEST}: no config stored")
    raw.pop("source", None)
    try:
        return from_dict(raw)
    except Exception as e:  # noqa: BLE001 - a stored config that no longer validates is a checkpoint problem
        raise CheckpointError(f"{step_dir / MANIFEST}: stored config does not load: {e}") from None
