"""The decoder-only Transformer (GPT-2 / Llama families), its weights, and its pipeline form."""

from __future__ import annotations

from typing import Any, Optional

import torch

from megalite.config import ModelConfig, ParallelConfig
from megalite.errors import ConfigError
from megalite.model.transformer import KVCache, Transformer
from megalite.model.weights import full_grads, full_state_dict, initialize_parameters, load_full_state_dict
from megalite.parallel.random import model_parallel_seed


def tensor_parallel_group(grid: Any) -> Optional[torch.distributed.ProcessGroup]:
    """The TP process group of `grid`, or None when there is no grid or TP is 1."""
    if grid is None or grid.get_tensor_model_parallel_world_size() == 1:
        return None
    return grid.get_tensor_model_parallel_group()


def context_parallel_group(grid: Any) -> Optional[torch.distributed.ProcessGroup]:
    """The context-parallel process group of `grid`, or None when there is no grid or CP is 1."""
    if grid is None or getattr(grid, "get_sequence_parallel_world_size", lambda: 1)() == 1:
        return None
    return grid.get_sequence_parallel_group()


def expert_parallel_group(grid: Any) -> Optional[torch.distributed.ProcessGroup]:
    """The expert-parallel process group of `grid`, or None when there is no grid or expert parallelism is 1."""
    if grid is None or getattr(grid, "get_expert_parallel_world_size", lambda: 1)() == 1:
        return None
    return grid.get_expert_parallel_group()


def replicate_experts(grid: Any) -> bool:
    """Whether every rank holds every expert's weights (the grid says so at ZeRO-0 and ZeRO-3; megalite.engine.moe)."""
    return bool(getattr(grid, "replicate_experts", False))


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: Optional[ParallelConfig] = None,
    grid: Any = None,
    seed: int = 1234,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    context_grad_scale: float = 1.0,
    aux_loss_scale: float = 1.0,
) -> Transformer:
    """This TP rank's shards of the model, initialised identically whatever the TP degree.

    `grid` is a megalite.parallel.ProcessGrid (None: TP=1 without torch.distributed). Also seeds
    the dropout streams (default and model-parallel) from `seed`. device='meta' allocates nothing.
    """
    parallel_cfg = parallel_cfg or ParallelConfig(tensor=grid.tp_size if grid is not None else 1)
    tp = grid.get_tensor_model_parallel_world_size() if grid is not None else 1
    if parallel_cfg.tensor != tp:
        raise ConfigError(f"parallel.tensor={parallel_cfg.tensor} but the process grid has tensor parallelism {tp}")
    cp = grid.get_sequence_parallel_world_size() if grid is not None else 1
    if grid is not None and parallel_cfg.context != cp:
        raise ConfigError(f"parallel.context={parallel_cfg.context} but the process grid has context parallelism {cp}")
    ep = grid.get_expert_parallel_world_size() if grid is not None else 1
    if grid is not None and parallel_cfg.expert != ep:
        raise ConfigError(f"parallel.expert={parallel_cfg.expert} but the process grid has expert parallelism {ep}")
    group = tensor_parallel_group(grid)
    model = Transformer(model_cfg, parallel_cfg, group, device=device, dtype=dtype,
                        context_group=context_parallel_group(grid), context_grad_scale=context_grad_scale,
                        expert_group=expert_parallel_group(grid), replicate_experts=replicate_experts(grid),
                        aux_loss_scale=aux_loss_scale)
    if torch.device(device or "cpu").type != "meta":
        initialize_parameters(model, seed, group)
    tp_rank = grid.get_tensor_model_parallel_rank() if grid is not None else 0
    pp_rank = grid.get_pipeline_model_parallel_rank() if grid is not None else 0
    model_parallel_seed(seed, tp_rank, pp_rank)
    return model


__all__ = [
    "build_model",
    "Transformer",
    "KVCache",
    "tensor_parallel_group",
    "context_parallel_group",
    "expert_parallel_group",
    "replicate_experts",
    "full_state_dict",
    "full_grads",
    "load_full_state_dict",
    "initialize_parameters",
]
