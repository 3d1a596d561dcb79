"""megalite's own weights directory: `model.json` (a model preset) + `model.safetensors` (full tensors).

The tensors use the canonical, TP-independent names and layouts of `megalite.model.weights`, so one
directory loads at any TP degree; `model.json` holds only ModelConfig keys, so it can serve as the
`model` of a run file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file

from megalite.config import ParallelConfig, model_config_from_dict
from megalite.config.unique_json import DuplicateKeyError, loads_unique
from megalite.errors import CheckpointError
from megalite.interop.hf import HFTensors, copy_tokenizer, gathered_state
from megalite.model import build_model
from megalite.model.weights import load_full_state_dict, model_buffers

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def save_weights(model: torch.nn.Module, out_dir: Union[str, Path], tokenizer_dir: Optional[Union[str, Path]] = None,
                 write: Optional[bool] = None) -> Optional[Path]:
    """Gather the shards (collective over TP) and write model.json + model.safetensors on the writing rank."""
    state = gathered_state(model, write)
    if state is None:
        return None
    state.update(model_buffers(model))  # the routers' expert bias (the same on every rank)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS), metadata={"format": "megalite"})
    copy_tokenizer(tokenizer_dir, out)
    return out


def load_weights(path: Union[str, Path], grid: Any = None, parallel_cfg: Optional[ParallelConfig] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
                 **overrides: Any) -> torch.nn.Module:
    """Build the model of a weights directory, holding this TP rank's shards (read one tensor at a time)."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path}: expected {CONFIG} and {WEIGHTS} (written by `megalite convert`)")
    try:
        raw = loads_unique((path / CONFIG).read_text())
    except DuplicateKeyError as e:  # json.loads would keep the last silently
        raise CheckpointError(f"{path / CONFIG}: {e}; keep one") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG}: not valid JSON: {e}") from None
    cfg = model_config_from_dict({**raw, **overrides}, str(path / CONFIG))
    model = build_model(cfg, parallel_cfg, grid, device=device, dtype=dtype)
    state = HFTensors(path)
    try:
        load_full_state_dict(model, state, model.group)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: {e}") from None
    return model
