"""Mixture-of-Experts layers: the router and its rules (top-k, capacity), the balancing losses, the MoE block.

An MoE block takes the dense MLP's place on the layers `model.moe` names (`ModelConfig.is_moe_layer`). Per token:
router logits (the block's input times a replicated (E, H) weight, in the model's dtype), scores in fp32 (softmax,
or sigmoid as DeepSeek-V3), the top-k experts by score (plus a per-expert bias when `expert_bias`: DeepSeek-V3's
auxiliary-loss-free balancing, which moves the choice and never the weights), their scores as weights (renormalised
to sum to 1 when `normalize_top_k`, then times `routed_scaling`); optionally a capacity drops assignments
(`capacity_keep`). The experts themselves (and their expert and tensor parallelism) are
`megalite.parallel.experts.GroupedExperts`; shared experts are a dense MLP every token passes through.

Balancing losses, per MoE layer: the Switch/GShard load-balancing loss E * sum_i f_i P_i (f_i the fraction of the
top-k assignments routed to expert i before any drop, P_i the mean router probability of expert i; sigmoid scores
are normalised per token first) times `aux_loss`, and the router z-loss mean(logsumexp(logits)^2) times
`router_z_loss`. Both are taken over all the tokens of the micro-batch: the per-rank sums are added over the
context group, and over the tensor-parallel group under sequence parallelism (each such rank routes its chunk), so
the value is the same on every rank of a replica and each rank's gradient is its share, as with the LM loss
(`megalite.parallel.context`).

How they reach training: as gradients, injected at the block's output in the backward (Megatron's approach): the
block's output passes through `_InjectAuxGradient`, whose backward hands the loss term the gradient
`aux_loss_scale`, the factor the LM loss's own gradient carries (1 / gradient-accumulation steps, times the context
gradient scale where the engine averages over context ranks; the engine passes it at construction,
`megalite.engine.moe.aux_loss_scale`). So the
losses need no path to the last pipeline stage and survive both kinds of activation checkpointing (the reentrant
one recomputes the block, injection included, in the backward). The logged training loss stays the LM loss; the
block records the balancing losses' values separately. With `aux_loss_scale = 0` nothing is injected and
`last_aux_loss` keeps the term with its graph, for a caller that adds it to its loss itself (the reference loops of
the tests).

Statistics for metrics and for the bias update, recorded by training forwards (not by the recompute of activation
checkpointing, nor by evaluation): tokens routed to each expert by this rank (before drops), assignments dropped,
sums of the balancing losses. `take_statistics()` returns and resets them; `megalite.engine.moe` sums them over the
ranks and applies the bias update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megalite import kernels
from megalite.config import ModelConfig, MoEConfig
from megalite.parallel.experts import GroupedExperts
from megalite.parallel.layers import set_init, set_tensor_parallel_attributes
from megalite.parallel.mappings import Group, group_size, reduce_from_tensor_parallel, sync_grad_across_tensor_parallel


@dataclass
class Routing:
    """The router's decision for N tokens (any leading shape (..., k) / (..., E))."""

    indices: torch.Tensor  # (..., k) int64: each slot's expert, best first
    weights: torch.Tensor  # (..., k) fp32: each slot's weight (normalised and scaled as configured)
    scores: torch.Tensor  # (..., E) fp32: softmax probabilities or sigmoid scores of every expert
    counts: torch.Tensor  # (E,) int64: assignments per expert


def route(logits: torch.Tensor, moe: MoEConfig, bias: Optional[torch.Tensor] = None) -> Routing:
    """Top-k routing of router logits (..., E) (see the module docstring); `bias` (E,) moves the choice only."""
    logits = _at_least_fp32(logits)
    scores = torch.softmax(logits, dim=-1) if moe.router == "softmax" else torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    _, indices = torch.topk(choice, moe.top_k, dim=-1)
    weights = scores.gather(-1, indices)
    if moe.normalize_top_k:
        # DeepSeek-V3 guards the sum of sigmoid scores; softmax probabilities are never all zero.
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if moe.router == "sigmoid" else 0.0))
    if moe.routed_scaling != 1.0:
        weights = weights * moe.routed_scaling
    counts = torch.bincount(indices.reshape(-1), minlength=scores.shape[-1])
    return Routing(indices, weights, scores, counts)


def expert_capacity(num_tokens: int, moe: MoEConfig) -> int:
    """Assignments one expert accepts from one routing call of `num_tokens` tokens: ceil(c * tokens * k / E)."""
    if moe.capacity_factor is None:
        return num_tokens * moe.top_k
    return math.ceil(moe.capacity_factor * num_tokens * moe.top_k / moe.num_experts)


def capacity_keep(indices: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments (N, k) each expert accepts: per expert, the `capacity` of highest `priority`, ties to the
    earlier token (then the earlier slot); a bool mask like `indices`."""
    flat_expert, flat_priority = indices.reshape(-1), priority.reshape(-1)
    # Stable sorts from the least significant key: position (the flat order), priority (descending), expert.
    order = torch.sort(-flat_priority, stable=True).indices
    order = order[torch.sort(flat_expert[order], stable=True).indices]
    sorted_expert = flat_expert[order]
    counts = torch.bincount(sorted_expert, minlength=num_experts)
    first_of_expert = counts.cumsum(0) - counts
    rank_in_expert = torch.arange(order.numel(), device=indices.device) - first_of_expert[sorted_expert]
    keep = torch.empty_like(flat_expert, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(indices)


class _InjectAuxGradient(torch.autograd.Function):
    """Identity on the block's output; in the backward, gives the auxiliary loss term the gradient `scale`."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_meta = scale, (aux.shape, aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Router arithmetic in fp32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing the block."""
    return torch._C._current_graph_task_id() != -1


class Router(torch.nn.Module):
    """The replicated (E, H) router weight and, with `model.moe.expert_bias`, the per-expert choice bias (a buffer)."""

    def __init__(self, cfg: ModelConfig, group: Group, sequence_parallel: bool, device=None, dtype=None) -> None:
        super().__init__()
        moe = cfg.moe
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = torch.nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size, device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.weight, False)
        set_init(self.weight, "normal", cfg.init_std)
        # Under sequence parallelism each rank routes its chunk: the gradient is summed over the group.
        self.weight.sequence_parallel = sequence_parallel
        if moe.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, device=device, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> router logits (B, T, E), in the model's dtype as Hugging Face computes them."""
        w = sync_grad_across_tensor_parallel(self.weight, self.group) if self.sequence_parallel else self.weight
        return F.linear(x, w)


class MoE(torch.nn.Module):
    """Router, routed experts and (optionally) shared experts in place of a dense MLP: (B, T, H) -> (B, T, H), or
    (B, T/tp, H) in and out under sequence parallelism, like the MLP."""

    def __init__(
        self,
        cfg: ModelConfig,
        group: Group = None,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
        *,
        context_group: Group = None,
        expert_group: Group = None,
        replicate_experts: bool = False,
        shared: Optional[torch.nn.Module] = None,
        matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = kernels.grouped_mm,
        layer: int = 0,
        aux_loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if cfg.moe is None:
            raise ValueError("an MoE block needs model.moe")
        self.moe = cfg.moe
        self.layer = layer  # the model's layer index (its statistics are reported under it)
        self.group, self.context_group = group, context_group
        self.sequence_parallel = sequence_parallel and group_size(group) > 1
        self.router = Router(cfg, group, self.sequence_parallel, device, dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.experts = GroupedExperts(
            cfg.moe.num_experts, cfg.hidden_size, cfg.expert_ffn_size, matmul, swiglu=cfg.mlp == "swiglu",
            group=group, expert_group=expert_group, sequence_parallel=sequence_parallel,
            replicate=replicate_experts, init_std=cfg.init_std, out_std=out_std, device=device, dtype=dtype,
        )
        self.shared = shared
        # The gradient the balancing losses get in the backward (module docstring): the engine's value at construction.
        self.aux_loss_scale = aux_loss_scale
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.reset_statistics()

    # ---------------------------------------------------------------- statistics
    # Kept as tensors on the routing device: recording never waits for the device; the engine reads them once a step.
    STATISTICS = ("dropped", "aux_loss_sum", "z_loss_sum", "loss_forwards", "forwards")

    def reset_statistics(self) -> None:
        self.statistics: Optional[dict[str, torch.Tensor]] = None

    def _record(self, counts: torch.Tensor, dropped: torch.Tensor, losses: Optional[tuple]) -> None:
        if self.statistics is None:
            zeros = {name: torch.zeros((), dtype=torch.float64, device=counts.device) for name in self.STATISTICS}
            self.statistics = {"tokens_per_expert": torch.zeros_like(counts), **zeros}
        st = self.statistics
        st["tokens_per_expert"] += counts.detach()
        st["dropped"] += dropped
        st["forwards"] += 1
        if losses is not None:
            st["aux_loss_sum"] += losses[0].detach().double()
            st["z_loss_sum"] += losses[1].detach().double()
            st["loss_forwards"] += 1

    def take_statistics(self) -> dict[str, torch.Tensor]:
        """This rank's statistics since the last call, then reset: tokens_per_expert (E,) routed by this rank before
        drops, and scalar tensors dropped (assignments), aux_loss_sum and z_loss_sum (the balancing losses' values
        over loss_forwards forwards) and forwards."""
        st = self.statistics
        if st is None:
            st = {"tokens_per_expert": torch.zeros(self.moe.num_experts, dtype=torch.int64),
                  **{name: torch.zeros((), dtype=torch.float64) for name in self.STATISTICS}}
        self.reset_statistics()
        return st

    @torch.no_grad()
    def update_bias(self, global_tokens_per_expert: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's update: bias += rate * sign(mean load - load), centred (a shift of every bias changes no
        choice), from the loads of every rank since the last update."""
        bias = self.router.expert_bias
        if bias is None or rate == 0:
            return
        load = global_tokens_per_expert.to(bias.device, torch.float32)
        delta = rate * torch.sign(load.mean() - load)
        bias.add_(delta - delta.mean())

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        logits = self.router(x)  # (B, T, E)
        routing = route(logits, moe, self.router.expert_bias)
        indices, dropped = routing.indices, torch.zeros((), dtype=torch.int64, device=logits.device)
        if moe.capacity_factor is not None:
            capacity = expert_capacity(indices.shape[:-1].numel(), moe)
            keep = capacity_keep(indices, routing.scores.gather(-1, indices), moe.num_experts, capacity)
            indices = indices.masked_fill(~keep, -1)
            dropped = (~keep).sum()
        y = self.experts(x, indices, routing.weights)
        losses = None
        if self.training and (moe.aux_loss or moe.router_z_loss):
            losses = self._balancing_losses(_at_least_fp32(logits), routing)
            loss = moe.aux_loss * losses[0] + moe.router_z_loss * losses[1]
            if torch.is_grad_enabled():
                if self.aux_loss_scale:
                    y = _InjectAuxGradient.apply(y, loss, float(self.aux_loss_scale))
                    self.last_aux_loss = None
                else:
                    self.last_aux_loss = loss
        if self.training and not _recomputing():
            self._record(routing.counts, dropped, losses)
        if self.shared is not None:
            y = y + self.shared(x)
        return y

    def _balancing_losses(self, logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, router z-loss) over every token of the micro-batch (module docstring)."""
        e, k = self.moe.num_experts, self.moe.top_k
        probs = routing.scores.reshape(-1, e)
        if self.moe.router == "sigmoid":
            probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
        z = torch.logsumexp(logits.reshape(-1, e), dim=-1).square().sum()
        tokens = torch.tensor([probs.shape[0]], dtype=probs.dtype, device=probs.device)
        sums = torch.cat([probs.sum(0), routing.counts.to(probs.dtype), tokens, z.reshape(1)])
        # Sums over the ranks holding other tokens of the micro-batch; each rank's gradient stays its share.
        if self.sequence_parallel:
            sums = reduce_from_tensor_parallel(sums, self.group)
        sums = reduce_from_tensor_parallel(sums, self.context_group)
        prob_sum, counts, n, z_sum = sums[:e], sums[e:2 * e], sums[2 * e], sums[2 * e + 1]
        aux = e * torch.sum((counts / (n * k)) * (prob_sum / n))
        return aux, z_sum / n
