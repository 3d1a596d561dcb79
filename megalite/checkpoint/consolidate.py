"""Full, unsharded fp32 weights from a megalite checkpoint of any layout.

TP shards are merged with the model's own sharding metadata (built on the meta device at the
checkpoint's TP degree), pipeline stages by the pipeline module's layer numbering, and ZeRO
partitions are already gathered by DeepSpeed at save time (megalite turns on
`stage3_gather_16bit_weights_on_model_save` for ZeRO-3). Every file is read with the safe loader
of `megalite.checkpoint.safe_load`; nothing in a checkpoint runs code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from megalite import config as config_mod
from megalite.checkpoint.manager import verify_checkpoint
from megalite.checkpoint.paths import MANIFEST, resolve_checkpoint
from megalite.checkpoint.safe_load import safe_torch_load
from megalite.config import ParallelConfig
from megalite.data.prepare import manifest_tokenizer
from megalite.errors import CheckpointError
from megalite.model import build_model, load_full_state_dict, tensor_parallel_group
from megalite.model.pipeline import HEAD, layer_order
from megalite.model.transformer import Transformer
from megalite.parallel.sharding import unshard_tensors


def checkpoint_config(manifest: dict, step_dir: Path) -> config_mod.Config:
    """The resolved run config stored in the manifest."""
    raw = dict(manifest.get("config") or {})
    if not raw:
        raise CheckpointError(f"{step_dir / MANIFEST}: no config stored")
    raw.pop("source", None)
    try:
        return config_mod.from_dict(raw)
    except Exception as e:  # noqa: BLE001 - a stored config that no longer validates is a checkpoint problem
        raise CheckpointError(f"{step_dir / MANIFEST}: stored config does not load: {e}") from None


def _load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    return safe_torch_load(str(path), map_location="cpu")


def _meta_model(cfg: config_mod.Config) -> torch.nn.Module:
    """The unsharded model on the meta device: its sharding attributes (partition dim, fused-block sizes)
    do not depend on the TP degree, so they describe how any TP degree's shards fit together."""

    return Transformer(cfg.model, ParallelConfig(), None, device="meta")


def load_full_weights(path: str | os.PathLike) -> tuple[config_mod.Config, dict[str, torch.Tensor], dict]:
    """(config, full fp32 state dict keyed like a TP1 megalite model, manifest) of a checkpoint."""
    step_dir = resolve_checkpoint(path)
    manifest = verify_checkpoint(str(step_dir))  # sizes, hashes, no code-carrying pickles
    cfg = checkpoint_config(manifest, step_dir)
    layout = manifest.get("layout", {})
    tp, pp = int(layout.get("tensor", 1)), int(layout.get("pipeline", 1))
    ds_dir = step_dir / manifest.get("deepspeed_tag", "ds")
    if pp > 1:
        shards = [_pipeline_state(cfg, ds_dir, tp_rank) for tp_rank in range(tp)]
    elif int(layout.get("zero_stage", 0)) == 3:
        shards = [_zero3_state(step_dir, ds_dir.name, tp_rank) for tp_rank in range(tp)]
    else:
        shards = [_module_state(ds_dir / f"mp_rank_{r:02d}_model_states.pt") for r in range(tp)]
    return cfg, merge_tensor_parallel(cfg, shards), manifest


def _pipeline_state(cfg: config_mod.Config, ds_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's weights from DeepSpeed's per-layer pipeline files, under the whole model's names."""
    state: dict[str, torch.Tensor] = {}
    order = layer_order(cfg.model)
    for index, prefix in enumerate(order):
        if index == len(order) - 1 and prefix != HEAD:
            continue  # the tied copy of the embedding: its weight is the embedding's
        matches = sorted(ds_dir.glob(f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"))
        if not matches:
            raise CheckpointError(f"{ds_dir}: no file for pipeline layer {index} of tensor-parallel rank {tp_rank}")
        for name, tensor in _load(matches[0]).items():
            state[HEAD if prefix == HEAD else prefix + name] = tensor
    return state


def _zero3_state(step_dir: Path, tag: str, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights from ZeRO-3 partitions, merged by DeepSpeed's own zero_to_fp32.

    zero_to_fp32 unpickles with weights_only=False, so it only ever sees files that verify_checkpoint has
    just checked against the manifest's hashes and scanned for pickle globals outside the allowlist. It
    reads one model-parallel rank, so each TP rank's files are shown to it through a directory of links.
    """
    # DeepSpeed's own merge of its ZeRO-3 partitions (DeepSpeed is heavy: imported only for ZeRO-3 checkpoints).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    source = step_dir / tag
    with tempfile.TemporaryDirectory() as view:
        (Path(view) / tag).mkdir()
        suffix = f"_mp_rank_{tp_rank:02d}_"
        for f in source.glob(f"zero_pp_rank_*{suffix}*.pt"):
            (Path(view) / tag / f.name.replace(suffix, "_mp_rank_00_")).symlink_to(f.resolve())
        try:
            return get_fp32_state_dict_from_zero_checkpoint(view, tag=tag)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(f"{source}: ZeRO-3 partitions of tensor-parallel rank {tp_rank} do not merge: "
                                  f"{e}") from None


def _module_state(path: Path) -> dict[str, torch.Tensor]:
    state = _load(path)
    module = state.get("module")
    if not isinstance(module, dict) or not module:
        raise CheckpointError(f"{path}: no module weights (a ZeRO-3 checkpoint saved without gathered weights?)")
    empty = [k for k, v in module.items() if isinstance(v, torch.Tensor) and v.numel() == 0]
    if empty:
        raise CheckpointError(f"{path}: parameters {empty[:3]} are empty (ZeRO-3 partitions were not gathered)")
    return module


def merge_tensor_parallel(cfg: config_mod.Config, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One full state dict from every TP rank's state dict (rank order)."""
    tp = len(shards)
    if tp == 1:
        return {k: v.float() for k, v in shards[0].items()}
    reference = dict(_meta_model(cfg).named_parameters())
    full = {}
    for name, param in reference.items():
        missing = [r for r, s in enumerate(shards) if name not in s]
        if missing:
            raise CheckpointError(f"tensor-parallel ranks {missing} have no weight {name!r}")
        full[name] = unshard_tensors([s[name].float() for s in shards], param)
    return full


def model_from_checkpoint(path: str | os.PathLike, grid=None) -> tuple[config_mod.Config, torch.nn.Module, Path]:  # noqa: ANN001
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


def find_tokenizer(step_dir: Path, cfg: config_mod.Config, explicit: str | None = None) -> str:
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
