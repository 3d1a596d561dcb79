"""Tensor/context/pipeline/data-parallel process grid, autograd collectives, parallel layers, context-parallel
attention, CE, RNG, sharding.

`ProcessGrid` is DeepSpeed's topology and is imported on first use, so the layers and the model that uses
them work without DeepSpeed.
"""

from typing import Any

from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megalite.parallel.mappings import (
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_sequence_parallel,
    scatter_to_tensor_parallel,
    sync_grad_across_tensor_parallel,
)
from megalite.parallel.random import checkpoint, get_rng_tracker, model_parallel_rng, model_parallel_seed

__all__ = [
    "ProcessGrid",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "copy_to_tensor_parallel",
    "reduce_from_tensor_parallel",
    "scatter_to_tensor_parallel",
    "gather_from_tensor_parallel",
    "scatter_to_sequence_parallel",
    "gather_from_sequence_parallel",
    "reduce_scatter_to_sequence_parallel",
    "sync_grad_across_tensor_parallel",
    "checkpoint",
    "get_rng_tracker",
    "model_parallel_rng",
    "model_parallel_seed",
]


def __getattr__(name: str) -> Any:
    if name == "ProcessGrid":  # DeepSpeed's topology underneath: import it only when a grid is wanted
        from megalite.parallel.grid import ProcessGrid

        return ProcessGrid
    raise AttributeError(f"module 'megalite.parallel' has no attribute {name!r}")
