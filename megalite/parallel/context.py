"""Context parallelism (DeepSpeed-Ulysses): each rank of a context group holds a contiguous chunk of every sequence.

Embeddings, norms, MLP and the loss run on the local chunk (B, T/cp, ...). Attention needs the whole sequence:
`ContextParallelAttention` wraps DeepSpeed's own `deepspeed.sequence.layer.DistributedAttention` around the local
attention function. It all-to-alls q, k, v from (sequence chunk, all local heads) to (whole sequence, heads/cp),
runs the attention kernel there, with the whole sequence's document ids, and all-to-alls the output back; its
backward is the reverse all-to-all (DeepSpeed's `_SeqAllToAll`).

Grouped-query attention: DeepSpeed 0.19.8 refuses fewer key/value heads than context ranks (an assertion), and
splits an indivisible count unevenly through its process-global group state. megalite instead replicates each
key/value head `cp / kv_heads` times before the all-to-all when the local kv heads divide the context size (each
rank then receives the one kv head its query heads use; the backward of the replication sums the copies'
gradients), and refuses other counts in config validation (`megalite.config.validate.context_errors`).

The loss: each rank holds a sum over its chunk's tokens; the micro-batch's loss is the sum over the context group
divided by the group's token count (`context_parallel_mean`), so every token of the batch counts once, never a mean
of chunk means. DeepSpeed's engine, told the context group through the mpu, mostly sums the context ranks'
gradient contributions and averages over data-parallel replicas only, so each rank's backward is that of its own
share; where DeepSpeed averages over the context ranks instead (its pipeline engine, ZeRO-3's reduce-scatter),
`grad_scale = cp` restores the sum (megalite.engine.build.context_grad_scale says where).

The collectives are the identity for a group of one rank (or None), so a model without context parallelism
never imports DeepSpeed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist

from megalite.config import kv_replication
from megalite.parallel.mappings import Group, gather_from_sequence_parallel, group_rank, group_size


def context_chunk(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim` (token ids, positions, labels, masks: no gradient)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by parallel.context={n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()  # contiguous: pipeline stages send it


def gather_context(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """All chunks of the sequence, in order, on every rank (logits for a caller that wants the whole sequence);
    the backward keeps this rank's chunk of the gradient."""
    return gather_from_sequence_parallel(x, group, dim=dim, reduce_grad=False)


class _LocalAttention(torch.nn.Module):
    """The attention function on (B, T, heads, D), the layout DeepSpeed's all-to-all produces (batch first)."""

    def __init__(self, attention: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: Optional[float],
                document_ids: Optional[torch.Tensor]) -> torch.Tensor:
        y = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale,
                           document_ids=document_ids)  # (B, heads, T, D)
        return y.transpose(1, 2)


class ContextParallelAttention(torch.nn.Module):
    """`attention(q, k, v, causal, scale, document_ids)` over a sequence split across `group`.

    q (B, H, T/cp, D), k and v (B, KVH, T/cp, D): this rank's chunk, all of its (tensor-parallel) heads; the
    document ids (B, T) are the whole sequence's. Returns (B, H, T/cp, D) like the attention function itself.
    """

    def __init__(self, attention: Callable[..., torch.Tensor], group: Group, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.group, self.size = group, group_size(group)
        self.attention = attention
        repeat = kv_replication(kv_heads, self.size)
        if heads % self.size or repeat is None:
            raise ValueError(f"{heads} query and {kv_heads} key/value heads per rank cannot be split over "
                             f"parallel.context={self.size} ranks")
        self.kv_repeat = repeat
        self.inner: Any = None
        if self.size > 1:
            from deepspeed.sequence.layer import DistributedAttention  # DeepSpeed's Ulysses layer, needed only here

            # Batch-first layout: the all-to-all scatters the head dimension (2) and gathers the sequence (1).
            self.inner = DistributedAttention(_LocalAttention(attention), group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                scale: Optional[float] = None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.inner is None:
            return self.attention(q, k, v, causal=causal, scale=scale, document_ids=document_ids)
        if self.kv_repeat > 1:  # kv head j -> copies j*r .. j*r+r-1: rank c receives copy c, the head its queries use
            k = k.repeat_interleave(self.kv_repeat, dim=1)
            v = v.repeat_interleave(self.kv_repeat, dim=1)
        y = self.inner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None,
                       causal=causal, scale=scale, document_ids=document_ids)  # (B, T/cp, H, D)
        return y.transpose(1, 2)


class _ContextMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_sum: torch.Tensor, count: torch.Tensor, group: Group, grad_scale: float) -> torch.Tensor:
        ctx.save_for_backward(count)
        ctx.grad_scale = grad_scale
        total = local_sum.detach().clone()
        dist.all_reduce(total, group=group)
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (count,) = ctx.saved_tensors
        return grad * ctx.grad_scale / count, None, None, None


def context_parallel_mean(local_sum: torch.Tensor, local_count: torch.Tensor, group: Group,
                          grad_scale: float = 1.0) -> torch.Tensor:
    """sum(local sums) / sum(local counts) over the context group, the same value on every rank; the backward is
    each rank's share (grad / total count, times `grad_scale`). With one rank: local_sum / local_count."""
    count = local_count.detach().clamp(min=1.0) if group_size(group) == 1 else _total(local_count, group)
    if group_size(group) == 1:
        return local_sum / count
    return _ContextMean.apply(local_sum, count, group, float(grad_scale))


def _total(x: torch.Tensor, group: Group) -> torch.Tensor:
    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    return total.clamp(min=1.0)
