"""Full, unsharded fp32 weights from a megalite checkpoint of any layout.

TP shards are merged with the model's own sharding metadata (built on the meta device at the
checkpoint's TP degree), pipeline stages by the pipeline module's layer numbering, and ZeRO
partitions are already gathered by DeepSpeed at save time (megalite turns on
`stage3_gather_16bit_weights_on_model_save` for ZeRO-3). Every file is read with the safe loader
of `megalite.engine.checkpoint`; nothing in a checkpoint runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megalite import config as config_mod
from megalite.engine.checkpoint import MANIFEST
from megalite.errors import CheckpointError


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory with a manifest, or the one a checkpoint root's `latest` names."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if name and (p / name / MANIFEST).is_file():
            return p / name
        raise CheckpointError(f"{latest}: names {name!r}, which is not a complete checkpoint in {p}")
    if (p / "checkpoints").is_dir():
        return resolve_checkpoint(p / "checkpoints")
    raise CheckpointError(f"{p}: not a megalite checkpoint (no {MANIFEST}, no 'latest')")


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
    from megalite.engine.checkpoint import safe_torch_load

    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    return safe_torch_load(str(path), map_location="cpu")


def _meta_model(cfg: config_mod.Config) -> torch.nn.Module:
    """The unsharded model on the meta device: its sharding attributes (partition dim, fused-block sizes)
    do not depend on the TP degree, so they describe how any TP degree's shards fit together."""
    from megalite.config import ParallelConfig
    from megalite.model.transformer import Transformer

    return Transformer(cfg.model, ParallelConfig(), None, device="meta")


def load_full_weights(path: str | os.PathLike) -> tuple[config_mod.Config, dict[str, torch.Tensor], dict]:
    """(config, full fp32 state dict keyed like a TP1 megalite model, manifest) of a checkpoint."""
    from megalite.engine.checkpoint import verify_checkpoint

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


def _pipeline_layer_prefix(cfg: config_mod.Config, index: int) -> str | None:
    """Canonical name prefix of layer `index` of megalite's pipeline specs (None: a tied copy to skip)."""
    layers = cfg.model.num_layers
    if index == 0:
        return "embedding."
    if index <= layers:
        return f"layers.{index - 1}."
    if index == layers + 1:
        return "final_norm."
    return None if cfg.model.tied_embeddings else "output"


def _pipeline_state(cfg: config_mod.Config, ds_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's weights from DeepSpeed's per-layer pipeline files, under the whole model's names."""
    state: dict[str, torch.Tensor] = {}
    for index in range(cfg.model.num_layers + 3):
        prefix = _pipeline_layer_prefix(cfg, index)
        if prefix is None:
            continue
        matches = sorted(ds_dir.glob(f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"))
        if not matches:
            raise CheckpointError(f"{ds_dir}: no file for pipeline layer {index} of tensor-parallel rank {tp_rank}")
        for name, tensor in _load(matches[0]).items():
            state["output" if prefix == "output" else prefix + name] = tensor
    return state


def _zero3_state(step_dir: Path, tag: str, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights from ZeRO-3 partitions, merged by DeepSpeed's own zero_to_fp32.

    zero_to_fp32 unpickles with weights_only=False, so it only ever sees files that verify_checkpoint has
    just checked against the manifest's hashes and scanned for pickle globals outside the allowlist. It
    reads one model-parallel rank, so each TP rank's files are shown to it through a directory of links.
    """
    import tempfile

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
    from megalite.model.weights import unshard_tensors

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
    from megalite.config import ParallelConfig
    from megalite.model import build_model, load_full_state_dict, tensor_parallel_group

    cfg, state, _ = load_full_weights(path)
    tp = grid.get_tensor_model_parallel_world_size() if grid is not None else 1
    model = build_model(cfg.model, ParallelConfig(tensor=tp), grid, seed=cfg.train.seed)
    load_full_state_dict(model, state, tensor_parallel_group(grid))
    model.eval()
    return cfg, model, resolve_checkpoint(path)


def find_tokenizer(step_dir: Path, cfg: config_mod.Config, explicit: str | None = None) -> str:
    """The tokenizer of a run: explicit path, the run's output directory, or the data manifest's file."""
    from megalite.data.prepare import manifest_tokenizer

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


def export_hf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a checkpoint of any layout as a Hugging Face directory: merged fp32 weights in safetensors,
    vocabulary padding stripped, the run's tokenizer with its end-of-document token as eos."""
    import shutil
    import tempfile

    from megalite.interop.hf import to_hf

    cfg, model, step_dir = model_from_checkpoint(path)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tok_dir:
        try:
            tokenizer_file = find_tokenizer(step_dir, cfg)
        except CheckpointError:
            tokenizer_file = None
        ids = {}
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, Path(tok_dir) / "tokenizer.json")
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                          "model_max_length": cfg.model.max_position_embeddings}
            eod = _eod_token(cfg, tokenizer_file)
            if eod is not None:
                tok_config["eos_token"] = eod[1]
                # GPT-2's convention: without a separate beginning-of-sequence token, bos = eos.
                ids = {"eos_token_id": eod[0], "bos_token_id": eod[2] if eod[2] is not None else eod[0]}
            (Path(tok_dir) / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        model.hf_source = {"path": None, "config": ids}  # token ids for the exported config
        written = to_hf(model, out, tokenizer_dir=tok_dir if tokenizer_file else None, write=True)
    return Path(written)


def _eod_token(cfg: config_mod.Config, tokenizer_file: str) -> tuple[int, str, int | None] | None:
    """(id, text, beginning-of-sequence id or None) of the data's end-of-document token, from its manifest."""
    from tokenizers import Tokenizer

    from megalite.data.prepare import read_manifest

    for prefix in cfg.data.prefixes:
        info = read_manifest(prefix) or {}
        eod_id = info.get("eod_token_id")
        if eod_id is not None:
            token = Tokenizer.from_file(tokenizer_file).id_to_token(int(eod_id))
            return (int(eod_id), token, info.get("bos_token_id")) if token is not None else None
    return None
