"""How tensor-parallel parameters are split across ranks, and how shards go back together.

Every parameter carries its sharding description, set where it is created (parallel.layers):
`tensor_model_parallel` (bool), `partition_dim`, and `megalite_segments`: the full sizes along
`partition_dim` of fused blocks (e.g. [q, k, v] or [gate, up]). Each block is split evenly across TP
ranks and a rank's shard is the concatenation of its pieces, so the full (canonical, TP-independent)
layout is simply the blocks one after another. Model initialisation, checkpoint consolidation and export
all use these functions.

Stacked expert weights may also be split over an expert-parallel group along dimension 0 (`megalite_experts`, an
`ExpertShard`, set by megalite.parallel.experts): the full tensor holds every expert, a rank its contiguous range.
`full_shape` and `shard_tensor` include that split; `gather_tensor` gathers the tensor-parallel split only and
`gather_experts` the expert split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.parallel.experts import expert_shard
from megalite.parallel.mappings import Group, group_size


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """Whether the parameter holds a 1/TP shard."""
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """Shape of the unsharded parameter."""
    shape = list(param.shape)
    if is_tensor_parallel(param):
        shape[param.partition_dim] *= tp_size
    experts = expert_shard(param)
    if experts is not None:
        shape[0] = experts.total
    return tuple(shape)


def _segments(param: torch.Tensor, full_len: int) -> list[int]:
    """Full sizes of the fused blocks along the partition dimension (one block when not fused)."""
    return param.megalite_segments or [full_len]


def shard_tensor(full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of `full` laid out like `param` (its experts, then its tensor-parallel shard)."""
    experts = expert_shard(param)
    if experts is not None:
        full = full.narrow(0, experts.first, experts.local)
    if not is_tensor_parallel(param) or size == 1:
        return full
    dim = param.partition_dim
    pieces = []
    for block in full.split(_segments(param, full.shape[dim]), dim=dim):
        if block.shape[dim] % size:
            raise ValueError(f"a block of size {block.shape[dim]} cannot be split across {size} ranks")
        pieces.append(block.chunk(size, dim=dim)[rank])
    return torch.cat(pieces, dim=dim).contiguous()


def unshard_tensors(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The full tensor from every rank's shard (in rank order)."""
    if not is_tensor_parallel(param) or len(shards) == 1:
        return shards[0]
    dim, size = param.partition_dim, len(shards)
    full_len = shards[0].shape[dim] * size
    local_sizes = [s // size for s in _segments(param, full_len)]
    shape = list(shards[0].shape)
    shape[dim] = full_len
    # One allocation, the pieces copied into place (a resharding moves the largest parameters through here).
    out = torch.empty(shape, dtype=shards[0].dtype, device=shards[0].device)
    offset = 0
    for block, local in enumerate(local_sizes):
        start = sum(local_sizes[:block])
        for shard in shards:
            out.narrow(dim, offset, local).copy_(shard.narrow(dim, start, local))
            offset += local
    return out


def gather_tensor(local: torch.Tensor, param: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather `local` (the parameter or its gradient) to the full tensor on every TP rank."""
    size = group_size(group)
    if not is_tensor_parallel(param) or size == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local, group=group)
    return unshard_tensors(shards, param)


def gather_experts(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """All-gather `local` (this rank's experts of the parameter or its gradient, tensor-parallel shards already
    gathered) to every expert, on every rank of the parameter's expert-parallel group; a copy when not split."""
    experts = expert_shard(param)
    if experts is None or group_size(experts.group) == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(group_size(experts.group))]
    dist.all_gather(parts, local, group=experts.group)
    return torch.cat(parts, dim=0)
