"""What `megalite plan` plans: a run config read as the planner needs it, which is not quite as `megalite train` does.

- The planner models other stacks' published runs too, so a config megalite could not train is still planned when
  the cost model can represent it: attention dropout (megalite's attention kernels have none) is validated as 0
  and planned as given, and the plan says megalite cannot train it (`estimate.plan_notes`).
- `--search` looks for a layout, so the config's own layout need not be valid at the world size (tensor parallelism
  not dividing the heads, a world size too small for TP x PP, ZeRO-2 with a pipeline): the config is validated with
  its model-parallel degrees set to 1, the search keeps its global batch, and the problems of its own layout are
  returned to be said instead of being the end of it.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megalite import config as C
from megalite.errors import ConfigError


@dataclass
class PlanInput:
    """A config as `megalite plan` plans it."""

    cfg: C.Config
    own_layout_problems: list[str]  # why the config's own layout is not valid at the world size (--search only)
    global_batch: int | None = None  # sequences per step a search keeps when the config's own layout is invalid


def load_for_plan(path: str | os.PathLike, overrides: list[str], world_size: int, search: bool) -> PlanInput:
    """The config at `path` with `overrides`, validated for `world_size` (ConfigError otherwise), except for what the
    planner can plan anyway (see the module's docstring)."""
    path = Path(path)
    raw = C.read_json(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    raw = C.apply_overrides(C.expand_references(raw, path.parent), overrides)
    raw.pop("source", None)
    model = raw.get("model")
    dropout = model.get("attention_dropout") if isinstance(model, dict) else None
    planned_only = (isinstance(dropout, numbers.Real) and not isinstance(dropout, bool) and 0 < dropout < 1)
    if planned_only:
        raw["model"] = {**model, "attention_dropout": 0.0}  # megalite's kernel rule; the range rule still applies
    try:
        cfg = C.from_dict(raw, world_size=world_size, source=str(path))
        problems: list[str] = []
        global_batch = None
    except ConfigError as error:
        if not search:
            raise
        cfg, global_batch = _without_own_layout(raw, world_size, str(path), error)
        problems = error.problems
    if planned_only:
        cfg.model = dataclasses.replace(cfg.model, attention_dropout=float(dropout))
    return PlanInput(cfg, problems, global_batch)


def _without_own_layout(raw: dict, world_size: int, source: str, error: ConfigError) -> tuple[C.Config, int]:
    """The config with tensor, pipeline (and, if need be, context) parallelism set to 1 and ZeRO-0 to ZeRO-1, validated
    at `world_size`, and the global batch its own layout asks for (micro-batch x accumulation x its data-parallel
    degree, at least 1; or deepspeed.train_batch_size). Raises `error` when the config has problems besides its layout."""
    parallel = raw.get("parallel") if isinstance(raw.get("parallel"), dict) else {}
    ds = raw.get("deepspeed") if isinstance(raw.get("deepspeed"), dict) else {}

    def whole(value: Any, default: int = 1) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    model_parallel = whole(parallel.get("tensor")) * whole(parallel.get("pipeline")) * whole(parallel.get("context"))
    batch = whole(ds.get("train_batch_size"), 0) or (
        whole(ds.get("train_micro_batch_size_per_gpu")) * whole(ds.get("gradient_accumulation_steps"))
        * max(1, world_size // model_parallel))
    for context in dict.fromkeys((whole(parallel.get("context")), 1)):
        trial = copy.deepcopy(raw)
        trial["parallel"] = {**parallel, "tensor": 1, "pipeline": 1, "context": context, "sequence_parallel": False}
        trial["deepspeed"] = {k: v for k, v in ds.items() if k != "train_batch_size"}
        zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
        if zero.get("stage", 0) == 0:  # ZeRO-0 may be what is invalid (bf16); the search tries every stage anyway
            trial["deepspeed"]["zero_optimization"] = {**zero, "stage": 1}
        try:
            return C.from_dict(trial, world_size=world_size, source=source), batch
        except ConfigError:
            continue
    raise error
