"""Full, unsharded fp32 weights of a checkpoint of any layout, and a model built from them.

The weights are the fp32 master weights (for a 16-bit run more precise than the module's copy), assembled by
`megalite.checkpoint.reshard.TrainingState` from the checkpoint's TP shards, pipeline stages and ZeRO partitions,
after the files are verified against the manifest; nothing in a checkpoint runs code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megalite.checkpoint.manifest import MANIFEST
from megalite.checkpoint.paths import resolve_checkpoint
from megalite.checkpoint.reshard import TrainingState
from megalite.config import Config, ParallelConfig
from megalite.data.indexed import read_manifest
from megalite.data.prepare import manifest_tokenizer
from megalite.data.tokenizer import load_tokenizer, tokenizer_info
from megalite.errors import CheckpointError, DataError
from megalite.model import build_model, load_full_state_dict, tensor_parallel_group


def load_full_weights(path: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor], dict]:
    """(config, full fp32 state dict keyed like a TP1 megalite model, buffers (the routers' expert bias) included,
    manifest) of a checkpoint."""
    state = TrainingState(path)
    return state.config, {**{name: state.weight(name) for name in state.names()}, **state.buffers()}, state.manifest


def model_from_checkpoint(path: str | os.PathLike, grid=None) -> tuple[Config, torch.nn.Module, Path]:  # noqa: ANN001
    """(config, fp32 model sharded for `grid`'s TP degree (None: one process), step directory) of a checkpoint."""
    cfg, state, _ = load_full_weights(path)
    tp = grid.get_tensor_model_parallel_world_size() if grid is not None else 1
    model = build_model(cfg.model, ParallelConfig(tensor=tp), grid, seed=cfg.train.seed)
    try:
        load_full_state_dict(model, state, tensor_parallel_group(grid))
    except (KeyError, ValueError) as e:  # the stored config does not describe these weights
        raise CheckpointError(f"{resolve_checkpoint(path) / MANIFEST}: the stored config does not match the "
                              f"weights: {e}") from None
    model.eval()
    return cfg, model, resolve_checkpoint(path)


def find_tokenizer(step_dir: Path, cfg: Config, explicit: str | None = None) -> str:
    """The tokenizer of a run: explicit path, the run's output directory, or the data manifest's file."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [step_dir / "tokenizer.json", step_dir.parent.parent / "tokenizer.json",
                   Path(cfg.train.output_dir) / "tokenizer.json"]
    for prefix in cfg.data.prefixes:
        tok = manifest_tokenizer(prefix)
        if tok:
            candidates.append(Path(tok))
    for c in candidates:
        if c.is_file():
            return str(c)
    raise CheckpointError(f"{step_dir}: no tokenizer found (looked at {', '.join(map(str, candidates))}); "
                          "pass --tokenizer")


def run_tokenizer(cfg: Config, step_dir: Path | None = None,
                  explicit: str | None = None) -> tuple[Any, int | None, int | None]:
    """(tokenizer, end-of-document id, beginning-of-sequence id) of a run: the tokenizer of a checkpoint
    (`find_tokenizer`) or, without `step_dir`, of a live run's data (or `explicit`). The ids are the ones the
    data's manifest records, else the tokenizer's own special tokens (None where it has none)."""
    if step_dir is not None:
        path = find_tokenizer(step_dir, cfg, explicit)
    else:
        candidates = [explicit] if explicit else [manifest_tokenizer(p) for p in cfg.data.prefixes]
        path = next((c for c in candidates if c and os.path.isfile(c)), None)
        if path is None:
            raise DataError(f"data.prefixes {cfg.data.prefixes}: no tokenizer found (no manifest names an existing "
                            "tokenizer file)")
    tokenizer = load_tokenizer(path)
    for prefix in cfg.data.prefixes:  # the ids the model was trained with
        info = read_manifest(prefix) or {}
        if info.get("eod_token_id") is not None:
            bos = info.get("bos_token_id")
            return tokenizer, int(info["eod_token_id"]), None if bos is None else int(bos)
    try:
        found = tokenizer_info(tokenizer, source=str(path))
    except DataError:  # none of the usual end-of-document names
        return tokenizer, None, None
    return tokenizer, found.eod_token_id, found.bos_token_id
