"""Mixture-of-Experts in the plan: what an MoE layer holds, saves, sends and computes on one GPU.

Where the experts live follows megalite.engine.moe: with expert parallelism ep > 1 at ZeRO-1/2 each rank holds E / ep
experts (times 1 / tp of each, tensor-parallel like the dense MLP), and their gradients, master weights and optimizer
states are partitioned over the expert-data-parallel ranks (replicas / ep) in DeepSpeed's `moe` parameter groups;
at ZeRO-0 every rank holds every expert with whole states; at ZeRO-3 every expert is an ordinary parameter, its
states partitioned over all replicas and every expert gathered for each forward and backward.

Tokens: each rank routes its tokens (under sequence parallelism its chunk), and every tensor-parallel rank runs the
experts for all its replica's tokens: A = tokens x top_k assignments per micro-batch (dropless; a capacity only
lowers it). Expert parallelism moves them by all-to-all: per MoE layer and micro-batch the dispatch and the combine
forward (again in a recompute) and their gradients backward, A x hidden elements each, of which (ep - 1) / ep leave
the rank; plus the exchange of the per-expert counts. On average a rank receives as many assignments as it sends.

FLOPs: a token runs the router, top_k experts and the shared experts (the active parameters).
"""

from __future__ import annotations

from megalite.config import Config, Layout, ModelConfig
from megalite.plan.layout import Settings


def experts_split(cfg: Config) -> bool:
    """Whether each rank holds only its experts (expert parallelism at ZeRO-1/2: megalite.engine.moe)."""
    return cfg.model.moe is not None and cfg.parallel.expert > 1 and cfg.zero_stage in (1, 2)


def experts_held(cfg: Config) -> int:
    """Experts whose weights one rank holds: E / ep where they are split, else all E."""
    e = cfg.model.moe.num_experts
    return e // cfg.parallel.expert if experts_split(cfg) else e


def moe_mlp_tensors(m: ModelConfig, tp: int, held: int, split: bool) -> list[tuple[str, int, bool, bool]]:
    """The parameters an MoE layer holds in place of the dense MLP on one TP rank, as (name, elements, in the decay
    group, an expert weight split over the expert-parallel group): the router (replicated), the stacked experts
    (no biases) and the shared experts (a dense MLP, biases as model.bias)."""
    h, f = m.hidden_size, m.expert_ffn_size // tp
    rows = 2 * f if m.mlp == "swiglu" else f
    out = [("mlp.router.weight", m.moe.num_experts * h, True, False),
           ("mlp.experts.w_in", held * rows * h, True, split), ("mlp.experts.w_out", held * h * f, True, split)]
    if m.shared_ffn_size:
        s = m.shared_ffn_size // tp
        s_rows = 2 * s if m.mlp == "swiglu" else s
        out += [("mlp.shared.fc.weight", s_rows * h, True, False), ("mlp.shared.proj.weight", h * s, True, False)]
        if m.bias:
            out += [("mlp.shared.fc.bias", s_rows, False, False), ("mlp.shared.proj.bias", h, False, False)]
    return out


def active_mlp_matrices(m: ModelConfig, tp: int) -> int:
    """Matrix elements of an MoE layer's MLP part that one token multiplies on one TP rank: the router, top_k experts'
    1 / tp and the shared experts' 1 / tp."""
    h, f = m.hidden_size, m.expert_ffn_size // tp
    per_expert = (3 if m.mlp == "swiglu" else 2) * h * f
    shared = (3 if m.mlp == "swiglu" else 2) * h * (m.shared_ffn_size // tp)
    return m.moe.num_experts * h + m.moe.top_k * per_expert + shared


def assignments(m: ModelConfig, tokens: int) -> int:
    """Token-expert assignments of `tokens` tokens (dropless)."""
    return tokens * m.moe.top_k


def moe_mlp_activation_bytes(m: ModelConfig, layout: Layout, s: Settings, N: int, Ns: int) -> float:
    """What autograd saves in one MoE layer's MLP part for one micro-batch of N tokens (Ns per rank under sequence
    parallelism), counted as megalite.model.moe and megalite.parallel.experts save it:

    - the router's input (the chunk under SP) and, while the balancing losses are computed, an fp32 copy of the
      logits with its log-sum-exp; the fp32 scores (softmax or sigmoid output), the chosen experts' ids (int64) and
      the weights with their sum (fp32), for the Ns tokens this rank routes;
    - per assignment: the rows sent to the experts, the experts' hidden activations as the dense MLP keeps them
      (SwiGLU: the gate/up output, silu(gate) and the product; GELU: pre- and post-activation), the rows coming back
      (kept by their weighting; under expert parallelism also the experts' output before the combine all-to-all,
      kept by its regrouping) and weighted (kept by the scatter-add into the tokens), their fp32 weight, the token
      and sort order (int64), whether it is kept (bool) and under expert parallelism the regrouping by local expert
      (int64); the bytes of a balanced load (a rank receives as many assignments as it sends on average);
    - the shared experts' MLP (its input is the router's unless sequence parallelism gathers its own).
    """
    e, tp, E, k = s.element, layout.tensor, m.moe.num_experts, m.moe.top_k
    h = m.hidden_size
    sp = layout.sequence_parallel
    act = 4 if m.mlp == "swiglu" else 2  # hidden activations kept per unit, as the dense MLP
    routed = Ns if sp else N
    losses = bool(m.moe.aux_loss or m.moe.router_z_loss)
    router = Ns * h * e + routed * E * 4 + routed * k * 8 + routed * (k + 1) * 4
    if losses:
        router += routed * E * 4 + routed * 4  # the fp32 logits log-sum-exp keeps, and its result
        if m.moe.router == "sigmoid":
            router += routed * 4  # the scores' per-token sum the aux loss normalises by
    A = assignments(m, N)
    ep = layout.expert > 1
    ids = 8 * 2 + 1 + (8 if ep else 0)  # token, sort order (int64), kept (bool), regrouping (int64)
    # rows in; hidden activations; rows out (before and after the combine all-to-all), weighted (kept by the weighting
    # and by the scatter-add); fp32 weight
    rows = (3 + (1 if ep else 0)) * h * e
    experts = A * (rows + act * (m.expert_ffn_size // tp) * e + 4 + ids) + 2 * 4 * E  # + group ends (int32)
    shared = 0.0
    if m.shared_ffn_size:
        shared = act * N * (m.shared_ffn_size // tp) * e + (N * h * e if sp else 0)
    return float(router + experts + shared)


def moe_pointwise_bytes(m: ModelConfig, layout: Layout, s: Settings, N: int, forward_passes: int) -> float:
    """HBM traffic of an MoE layer's memory-bound work beyond the dense MLP's pattern, per micro-batch: the experts'
    activation over A rows (as the dense MLP's), the gather of rows by expert, the weighting and the scatter-add back
    (read and write, forward passes and backward)."""
    e = s.element
    A = assignments(m, N)
    f = m.expert_ffn_size // layout.tensor
    act = (2 if m.mlp == "gelu" else 5) * A * f * e * forward_passes + (3 if m.mlp == "gelu" else 8) * A * f * e
    moves = 2 * 3 * A * m.hidden_size * e * (forward_passes + 1)  # gather, weight, scatter-add: read + write
    return float(act + moves)


def moe_collectives(cfg: Config, layout: Layout, s: Settings, N: int, moe_blocks: int,
                    forward_passes: int) -> list[tuple[str, str, float, float]]:
    """(group, kind, bytes per step, calls per step) of one GPU's MoE layers beyond the dense MLP's pattern, for `moe_blocks` MoE
    layers and N tokens per micro-batch:
    - EP: the all-to-alls (dispatch and combine in every forward pass, their gradients backward) of A x hidden
      elements, and the per-expert counts (E int64) each forward pass;
    - TP: the routing weights' collectives (fp32: all-gathered under SP with the ids, int64, and reduce-scattered
      backward; without SP all-reduced backward), the router's gradient all-reduce under SP, and the balancing
      losses' sums (2E + 2 fp32) all-reduced under SP; the experts' input and output collectives are the dense MLP's;
      shared experts add a dense MLP's;
    - CP: the balancing losses' sums all-reduced each forward pass;
    - DP (and TP under SP): the step's statistics, (E + 5) float64 per MoE layer, once a step.
    The dense MLP's own TP collectives are counted by the caller for every block."""
    m = cfg.model
    if not moe_blocks or m.moe is None:
        return []
    e, h, tp, cp, ep = s.element, m.hidden_size, layout.tensor, layout.context, layout.expert
    E, k, mb = m.moe.num_experts, m.moe.top_k, layout.accumulation
    sp = layout.sequence_parallel
    losses = bool(m.moe.aux_loss or m.moe.router_z_loss)
    sums = (2 * E + 2) * 4
    out: list[tuple[str, str, float, float]] = []
    per = mb * moe_blocks
    if ep > 1:
        out.append(("EP", "all-to-all", per * assignments(m, N) * h * e * (2 * forward_passes + 2),
                    per * (2 * forward_passes + 2)))
        out.append(("EP", "all-to-all", per * E * 8 * forward_passes, per * forward_passes))
    if tp > 1:
        if sp:
            out.append(("TP", "all-gather", per * N * k * (4 + 8) * forward_passes, per * 2 * forward_passes))  # weights, ids
            out.append(("TP", "reduce-scatter", per * N * k * 4, per))  # the weights' gradient
            out.append(("TP", "all-reduce", per * E * h * e, per))  # the router's gradient
            if losses:
                out.append(("TP", "all-reduce", per * sums * forward_passes, per * forward_passes))
        else:
            out.append(("TP", "all-reduce", per * N * k * 4, per))  # the routing weights' gradient
        if m.shared_ffn_size:  # a second MLP: its entry and exit (and their gradients), as the dense MLP's
            act = N * h * e * (forward_passes + 1)
            if sp:
                calls = per * (forward_passes + 1)
                out += [("TP", "all-gather", per * act, calls), ("TP", "reduce-scatter", per * act, calls)]
            else:
                out.append(("TP", "all-reduce", per * act, per * (forward_passes + 1)))
    if cp > 1 and losses:
        out.append(("CP", "all-reduce", per * sums * forward_passes, per * forward_passes))
    # The step's statistics (loads and the losses' sums, float64) summed over the replicas and, under SP, over TP.
    statistics = moe_blocks * (E + 5) * 8
    if layout.replicas > 1:
        out.append(("DP", "all-reduce", statistics, moe_blocks))
    if sp and tp > 1:
        out.append(("TP", "all-reduce", statistics, moe_blocks))
    return out


def expert_degrees(cfg: Config, replicas: int) -> list[int]:
    """The expert-parallel degrees `megalite plan --search` tries: divisors of the data x context replicas that
    split the experts evenly (1 for a dense model)."""
    m = cfg.model
    if m.moe is None:
        return [1]
    return [ep for ep in range(1, replicas + 1) if replicas % ep == 0 and m.moe.num_experts % ep == 0]
