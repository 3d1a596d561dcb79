"""Run configs for the planner's tests: model presets, configs on paper (validated, then given the attention
dropout megalite's kernels refuse but the published runs modelled had)."""

from __future__ import annotations

import copy
import dataclasses
import json

from megalite import config as C


def preset_model(name: str) -> dict:
    """The model section of the shipped preset `name`."""
    return json.loads((C.CONFIGS_DIR / "models" / f"{name}.json").read_text())


def plan_config(model: dict | str, world: int | None = None, **sections) -> C.Config:
    """A validated config of `model` (a preset name or a model section) with `sections` merged into its sections;
    sequence 2048 (or the model's limit), micro-batch 1."""
    model = preset_model(model) if isinstance(model, str) else model
    raw = {"model": model, "data": {"prefixes": ["x"], "seq_length": min(2048, model.get("max_position_embeddings",
                                                                                       1024))},
           "deepspeed": {"train_micro_batch_size_per_gpu": 1}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return from_dict_on_paper(raw, world)


def from_dict_on_paper(raw: dict, world: int | None = None) -> C.Config:
    """A validated config; attention dropout (which megalite's kernels refuse) is set afterwards, for the on-paper
    models of Megatron-LM's runs, which had it."""
    raw = copy.deepcopy(raw)
    attention_dropout = raw["model"].pop("attention_dropout", 0.0)
    cfg = C.from_dict(raw, world_size=world)
    cfg.model = dataclasses.replace(cfg.model, attention_dropout=attention_dropout)
    return cfg
