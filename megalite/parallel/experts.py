"""The experts of a Mixture-of-Experts layer as a parallel layer: split over an expert-parallel group, each expert's
FFN split over the tensor-parallel group.

Weights are stacked per expert, in Hugging Face's in-memory layout: `w_in` (E_local, 2F/tp or F/tp, H) holds each
expert's gate and up projections (gate rows first, SwiGLU) or its up projection (GELU); `w_out` (E_local, H, F/tp)
its down projection. The experts of an expert-parallel group of `ep` ranks are split contiguously: rank r holds
experts [r E/ep, (r+1) E/ep).

Tensor parallelism: experts are tensor-parallel like the dense MLP (`w_in` column-parallel, `w_out` row-parallel),
so every tensor-parallel rank holds 1/tp of every local expert and routes the same tokens; the partial outputs are
summed over the group. With sequence parallelism the tokens, routing weights and expert ids of the sequence chunks
are all-gathered on entry (the router ran on the chunk) and the output reduce-scattered back to the chunks. The
expert-parallel group joins ranks of the same tensor-parallel rank, so each tensor-parallel slice of the experts
has its own all-to-all.

The forward, per rank: each (token, slot) assignment that was not dropped is sorted by expert; the rows for the
experts of rank r are sent to rank r (`all_to_all`, with the counts exchanged first); received rows are regrouped by
local expert; one grouped matrix multiply per projection runs every local expert (the `matmul` the model passes,
`megalite.kernels.grouped_mm`: the kernel choice stays in the kernels package); the results travel back the same
way and are summed into their tokens, each scaled by its routing weight.

Where the weights live: with `replicate=False` each rank holds its experts only: the parameters carry DeepSpeed's
MoE marks (`allreduce=False`, `group_name`), so DeepSpeed reduces their gradients over the expert-data-parallel
ranks (the replicas holding the same experts) and ZeRO-1/2 partition them there. With `replicate=True` every rank
holds every expert and uses only its own experts' slice; the other experts' gradients are zero on this rank and
the ordinary data-parallel reduction over all replicas sums the holders' contributions. Which one a run uses is
the engine's choice (megalite.engine.moe: split at ZeRO-1/2, every expert held at ZeRO-0 and ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.parallel.layers import set_init, set_tensor_parallel_attributes
from megalite.parallel.mappings import (
    Group,
    all_to_all,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    group_rank,
    group_size,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
)


@dataclass(frozen=True)
class ExpertShard:
    """How a stacked expert parameter is split over its expert-parallel group: this rank holds experts
    [first, first + local) of `total` along dimension 0."""

    total: int
    first: int
    local: int
    group: Group


def expert_shard(param: torch.Tensor) -> Optional[ExpertShard]:
    """The expert split of a parameter (None when it holds every expert, or is not an expert weight)."""
    return getattr(param, "megalite_experts", None)


def deepspeed_expert_group_name(expert_parallel_size: int) -> str:
    """The name under which DeepSpeed keeps the expert and expert-data-parallel groups of this size (its
    `deepspeed.utils.groups` convention, which its ZeRO optimizers look up through `param.group_name`)."""
    return f"ep_size_{expert_parallel_size}"


class GroupedExperts(torch.nn.Module):
    """`num_experts` FFNs of width `ffn`, computed for the tokens routed to them (see the module docstring)."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        ffn: int,
        matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        swiglu: bool,
        group: Group = None,
        expert_group: Group = None,
        sequence_parallel: bool = False,
        replicate: bool = False,
        init_std: float = 0.02,
        out_std: float = 0.02,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        tp, ep = group_size(group), group_size(expert_group)
        if ffn % tp or num_experts % ep:
            raise ValueError(f"{num_experts} experts of width {ffn} cannot be split over {ep} expert-parallel and "
                             f"{tp} tensor-parallel ranks")
        self.group, self.expert_group = group, expert_group
        self.sequence_parallel = sequence_parallel and tp > 1
        self.swiglu, self.num_experts = swiglu, num_experts
        self.matmul = matmul  # grouped_mm(rows (A, K), weights (G, K, N), counts (G,)) -> (A, N)
        self.local = num_experts // ep
        self.first = group_rank(expert_group) * self.local
        self.replicate = replicate or ep == 1
        stored = num_experts if self.replicate else self.local
        f_local = ffn // tp
        self.w_in = torch.nn.Parameter(torch.empty(stored, (2 if swiglu else 1) * f_local, hidden, device=device,
                                                   dtype=dtype))
        self.w_out = torch.nn.Parameter(torch.empty(stored, hidden, f_local, device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.w_in, True, 1, [ffn, ffn] if swiglu else None)
        set_tensor_parallel_attributes(self.w_out, True, 2)
        set_init(self.w_in, "normal", init_std)
        set_init(self.w_out, "normal", out_std)
        for p in (self.w_in, self.w_out):
            if self.replicate:
                p.megalite_experts = None
            else:
                p.megalite_experts = ExpertShard(num_experts, self.first, self.local, expert_group)
                # DeepSpeed's MoE parameter convention: not reduced over all data-parallel ranks, but over the
                # expert-data-parallel group of this name (deepspeed.moe.utils.is_moe_param).
                p.allreduce = False
                p.group_name = deepspeed_expert_group_name(ep)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) (T/tp with sequence parallelism); indices (B, T, k) the experts of each token's k slots (-1:
        dropped), weights (B, T, k) their routing weights -> the weighted sum of each token's experts (B, T, H)."""
        if self.sequence_parallel:
            x = gather_from_sequence_parallel(x, self.group, dim=1)  # backward: reduce-scatter the partial grads
            weights = gather_from_sequence_parallel(weights, self.group, dim=1)
            indices = _all_gather(indices, self.group, dim=1)
        else:
            # The experts' partial input and weight gradients are summed over the tensor-parallel group.
            x = copy_to_tensor_parallel(x, self.group)
            weights = copy_to_tensor_parallel(weights, self.group)
        b, t, h = x.shape
        k = indices.shape[-1]
        flat = indices.reshape(-1)
        kept = flat >= 0
        expert = flat[kept]
        token = torch.arange(b * t, device=x.device).repeat_interleave(k)[kept]
        weight = weights.reshape(-1)[kept]
        order = torch.argsort(expert, stable=True)  # assignments by expert, tokens in order within each
        expert, token, weight = expert[order], token[order], weight[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        rows = x.reshape(b * t, h)[token]  # (assignments, H)
        out = self._experts(rows, counts)
        # Hugging Face's order: the expert's output times its fp32 weight, cast back, then summed per token.
        out = (out * weight.unsqueeze(-1)).to(x.dtype)
        y = x.new_zeros(b * t, h).index_add(0, token, out).view(b, t, h)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(y, self.group, dim=1)
        return reduce_from_tensor_parallel(y, self.group)

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert (counts[e] rows for expert e) -> each row through its expert's FFN."""
        ep = group_size(self.expert_group)
        if ep == 1:
            return self._ffn(rows, counts)
        # counts[r, j]: rows for local expert j of rank r; received[s, j]: rows rank s sends to my expert j.
        sent = counts.view(ep, self.local)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent.contiguous(), group=self.expert_group)
        send_splits, recv_splits = sent.sum(1).tolist(), received.sum(1).tolist()
        arrived = all_to_all(rows, send_splits, recv_splits, self.expert_group)  # ordered by (source, expert)
        by_expert = _source_major_to_expert_major(received)
        out = self._ffn(arrived[by_expert], received.sum(0))
        back = torch.empty_like(out).index_copy(0, by_expert, out)  # (source, expert) order again
        return all_to_all(back, recv_splits, send_splits, self.expert_group)

    def _ffn(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows grouped by local expert (counts[j] rows for local expert j) through the local experts."""
        w_in, w_out = self.w_in, self.w_out
        if self.replicate and w_in.shape[0] != self.local:  # every expert held: use this rank's slice
            w_in, w_out = w_in[self.first:self.first + self.local], w_out[self.first:self.first + self.local]
        hidden = self.matmul(rows, w_in.transpose(1, 2), counts)
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate="tanh")
        return self.matmul(hidden, w_out.transpose(1, 2), counts)


def _source_major_to_expert_major(counts: torch.Tensor) -> torch.Tensor:
    """For rows laid out in blocks (source s, expert j) of counts[s, j] rows, source-major, the row indices that
    list them expert-major: (expert 0: source 0, 1, ...), (expert 1: ...), ..."""
    sizes = counts.reshape(-1)
    starts = (sizes.cumsum(0) - sizes).view_as(counts).t().reshape(-1)  # block starts, expert-major
    lengths = counts.t().reshape(-1)
    block_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=counts.device), lengths)
    first_row_of_block = lengths.cumsum(0) - lengths
    within = torch.arange(int(lengths.sum()), device=counts.device) - first_row_of_block[block_of_row]
    return starts[block_of_row] + within


def _all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (no gradient: integer ids)."""
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
