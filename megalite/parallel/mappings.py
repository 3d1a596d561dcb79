"""Autograd-aware collectives for tensor and sequence parallelism, in forward/backward pairs.

Each function is the identity when `group` is None or has one rank, so a TP=1 model runs without
torch.distributed. Pairs (forward -> backward):

    copy_to_tensor_parallel         identity        -> all-reduce
    reduce_from_tensor_parallel     all-reduce      -> identity
    scatter_to_tensor_parallel      split last dim  -> all-gather last dim
    gather_from_tensor_parallel     all-gather last -> split last dim
    scatter_to_sequence_parallel    split seq dim   -> all-gather seq dim
    gather_from_sequence_parallel   all-gather seq  -> reduce-scatter seq (or split)
    reduce_scatter_to_sequence_parallel  reduce-scatter seq -> all-gather seq
    all_reduce_both_ways            all-reduce      -> all-reduce (a sum every rank's result depends on)
    all_to_all                      all-to-all      -> all-to-all with the splits swapped (expert dispatch)

Collectives never write into their input: autograd may hand the same gradient tensor to two
branches (an add's backward does), so reducing it in place would corrupt the other branch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    """Number of ranks in `group` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This rank's index in `group` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    parts = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dtype):
        return _all_reduce(x, group).to(dtype or x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, dtype):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group).to(dtype or x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def copy_to_tensor_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient across `group` backward."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group: Group, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """All-reduce (sum) forward, the sum then cast to `dtype` (default: x's); identity backward (autograd widens
    the gradient back to x's dtype, exactly)."""
    if group_size(group) == 1:
        return x if dtype is None else x.to(dtype)
    return _ReduceFromTP.apply(x, group, dtype)


def scatter_to_tensor_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension; gather gradients backward."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather along the last dimension; split the gradient backward."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's chunk of the sequence dimension; all-gather gradients backward."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group, dim)


def gather_from_sequence_parallel(
    x: torch.Tensor, group: Group, dim: int = 1, reduce_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence dimension; backward reduce-scatters (consumer is TP-split) or splits."""
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group, dim, reduce_grad)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: Group, dim: int = 1,
                                        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sum across `group`, keep this rank's sequence chunk, cast it to `dtype` (default: x's); all-gather gradients
    backward, in `dtype`."""
    if group_size(group) == 1:
        return x if dtype is None else x.to(dtype)
    return _ReduceScatterToSP.apply(x, group, dim, dtype)


def all_reduce_both_ways(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over `group` forward, and sum the gradient over `group` backward: for a partial sum (say of squares
    over a tensor-parallel split of features) whose total every rank then uses."""
    return copy_to_tensor_parallel(reduce_from_tensor_parallel(x, group), group)


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group) -> torch.Tensor:
    """Rows of `x` (dim 0) in `len(group)` consecutive blocks of `send_splits` rows, block r to rank r; returns
    the blocks received, `recv_splits[r]` rows from rank r, in rank order. Backward sends the gradients home."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def sync_grad_across_tensor_parallel(param: torch.Tensor, group: Group) -> torch.Tensor:
    """Use a replicated parameter whose gradient is partial per rank (sequence-parallel norms).

    The all-reduce sits inside the autograd graph, so it runs in any backward, DeepSpeed's included.
    """
    return copy_to_tensor_parallel(param, group)
