"""Communication per step: the bytes one GPU hands to each kind of collective, per process group, as megalite and
DeepSpeed call them, the link each group crosses (from DeepSpeed's rank placement), and the time they take at the
links' bandwidths."""

from __future__ import annotations

from dataclasses import dataclass

from megalite.config import Config, Layout, kv_replication
from megalite.plan.devices import Device
from megalite.plan.experts import moe_collectives
from megalite.plan.layout import Settings
from megalite.plan.schedule import point_to_point_links
from megalite.plan.stages import Stage, decay_numel, expert_part, numel, numel_at_most

# Bytes each rank sends (and receives) per byte of a collective's payload over the slowest link of its ring: the
# bus-bandwidth factors of NCCL's algorithms (nccl-tests, doc/PERFORMANCE.md). The payload is the all-gather's
# output, the reduce-scatter's input, the all-reduce's buffer, all of an all-to-all's input, a send's tensor.
BUS_FACTORS = {
    "all-reduce": lambda n: 2 * (n - 1) / n,  # a reduce-scatter, then an all-gather
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,  # the 1/n addressed to itself stays
    "send/recv": lambda n: 1.0,  # point to point: the whole tensor crosses
}


def bus_factor(kind: str, n: int) -> float:
    """Bytes each of `n` ranks moves per byte of payload in collective `kind`; 0 for one rank (nothing leaves the
    GPU). An unknown kind is an error, never silently charged as some other collective."""
    if kind not in BUS_FACTORS:
        raise ValueError(f"unknown collective kind {kind!r}; known: {', '.join(BUS_FACTORS)}")
    if n < 1:
        raise ValueError(f"a collective over {n} ranks")
    return 0.0 if n == 1 else BUS_FACTORS[kind](n)


@dataclass
class Collective:
    """The payload one GPU hands to one kind of collective in one step, and where it goes."""

    group: str  # TP | CP | DP (data x context: the ZeRO group) | EP (experts) | EDP (their ZeRO group) | PP | tied embedding
    kind: str  # a key of BUS_FACTORS: all-reduce | all-gather | reduce-scatter | all-to-all | send/recv
    bytes: float  # sum of the tensors handed to the calls (all-gather: output size; reduce-scatter: input size)
    ranks: int
    link: str  # NVLink | network


def links(layout: Layout, gpus_per_node: int) -> dict[str, str]:
    """Which link each group's traffic crosses, from DeepSpeed's placement (model, then data, then pipe axis; context
    ranks inside the data axis, next to the tensor-parallel ones)."""
    tp, dp, cp = layout.tensor, layout.data, layout.context
    g = gpus_per_node
    ep = layout.expert  # expert-parallel groups: ep consecutive replicas; expert-data-parallel: across all replicas
    return {"TP": "NVLink" if tp <= g else "network", "CP": "NVLink" if tp * cp <= g else "network",
            "DP": "NVLink" if tp * cp * dp <= g else "network", "EP": "NVLink" if tp * ep <= g else "network",
            "EDP": "NVLink" if tp * cp * dp <= g else "network",
            "PP": "NVLink" if layout.world <= g else "network",
            "tied embedding": "NVLink" if layout.world <= g else "network"}


def communication(cfg: Config, layout: Layout, stage: Stage, s: Settings, gpus_per_node: int) -> list[Collective]:
    """Payload per step for one GPU of `stage`, per group and collective kind, as megalite and DeepSpeed call them."""
    m = cfg.model
    tp, pp, dp, cp = layout.tensor, layout.pipeline, layout.replicas, layout.context
    e, h = s.element, m.hidden_size
    N = layout.micro_batch * cfg.data.seq_length // cp  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    mb = layout.accumulation
    where = links(layout, gpus_per_node)
    sp = layout.sequence_parallel
    out: dict[tuple[str, str], float] = {}

    def add(group: str, kind: str, nbytes: float) -> None:
        out[(group, kind)] = out.get((group, kind), 0.0) + nbytes

    act = N * h * e
    if tp > 1:
        fwd_passes = 2 if s.recompute else 1
        L = stage.blocks
        if sp:  # column entry: all-gather (backward reduce-scatter); row exit: reduce-scatter (backward all-gather)
            add("TP", "all-gather", mb * L * act * (2 * fwd_passes + 2))
            add("TP", "reduce-scatter", mb * L * act * (2 * fwd_passes + 2))
            norm_params = h * (2 if m.norm == "layernorm" else 1)
            synced = 2 * norm_params + (2 * h if m.bias else 0)  # replicated weights with per-rank gradients
            add("TP", "all-reduce", mb * L * synced * e)
        else:  # row exit: all-reduce forward; column entry: all-reduce of the input gradient backward
            add("TP", "all-reduce", mb * L * act * (2 * fwd_passes + 2))
        if stage.embedding:
            add("TP", "reduce-scatter" if sp else "all-reduce", mb * act)
            if sp:
                add("TP", "all-gather", mb * act)  # its backward
                if m.position == "learned":
                    add("TP", "all-reduce", mb * m.max_position_embeddings * h * e)
        if stage.head:
            if sp:
                add("TP", "all-gather", mb * act)
                add("TP", "reduce-scatter", mb * act)
                add("TP", "all-reduce", mb * h * (2 if m.norm == "layernorm" else 1) * e)
            else:
                add("TP", "all-reduce", mb * act)
            ce = N * 4 * 3  # fp32 max, then (target logit, sum of exponentials) together
            add("TP", "all-reduce", mb * ce * (2 if s.loss_chunk_tokens else 1))  # chunks recompute theirs

    if cp > 1 and stage.blocks:
        # Ulysses: per block, q, k, v (kv heads replicated to a multiple of cp) and the output all-to-all forward (and
        # again in a recompute), their gradients backward. The loss adds two scalar all-reduces per micro-batch.
        heads, kvh = m.num_heads // tp, m.kv_heads // tp
        per_pass = N * (2 * heads + 2 * kvh * (kv_replication(kvh, cp) or 1)) * m.head_dim * e
        add("CP", "all-to-all", mb * stage.blocks * per_pass * ((2 if s.recompute else 1) + 1))
    for group, kind, nbytes in moe_collectives(cfg, layout, s, N, stage.moe_blocks, 2 if s.recompute else 1):
        add(group, kind, nbytes)
    n_local = numel(stage.params)
    experts = expert_part(stage.params)
    if numel(experts):  # split experts: their own ZeRO groups over the expert-data-parallel ranks (replicas / ep)
        n_local -= numel(experts)
        edp = dp // layout.expert
        if edp > 1:  # reduced and gathered as the dense weights are (s.path is bf16_optimizer or zero here)
            add("EDP", "all-reduce", numel(experts) * e)
            add("EDP", "all-gather", -(-numel(experts) // (2 * edp)) * 2 * edp * e)
    if dp > 1:
        decay = decay_numel(stage.params) - decay_numel(experts)
        padded = sum(-(-x // (2 * dp)) * 2 * dp for x in (decay, n_local - decay) if x)
        # Gradients travel in DeepSpeed's communication dtype, the model's dtype by default. ZeRO-1/2 all-reduce
        # their gradient buckets (use_multi_rank_bucket_allreduce, on by default) and then all-gather the updated
        # partitions, as BF16_Optimizer does; ZeRO-0 only all-reduces.
        if s.path in ("none", "fp16_optimizer", "bf16_ddp"):
            add("DP", "all-reduce", n_local * e)
        elif s.path in ("bf16_optimizer", "zero"):
            add("DP", "all-reduce", n_local * e)
            add("DP", "all-gather", padded * e)
        else:  # zero3: gradients reduce-scattered every micro-batch; small persistent parameters gathered once, after
            # the step; the rest once per micro-batch when the stage's parameters fit within
            # stage3_max_reuse_distance (kept from forward to backward), otherwise twice: for the forward, and for
            # the backward (a recomputed layer's backward follows its recompute at once and reuses that gather)
            persistent = numel_at_most(stage.params, s.persistence_threshold)
            gathers = 1 if n_local - persistent <= s.max_reuse_distance else 2
            add("DP", "all-gather", (mb * gathers * (n_local - persistent) + persistent) * e)
            add("DP", "reduce-scatter", mb * n_local * e)
    if pp > 1:
        boundary = Ns * h * e
        sends = point_to_point_links(cfg.parallel.pipeline_schedule, stage.index, pp)
        # position ids (this rank's chunk) and document ids (the whole sequence's) travel along
        ids = N * 8 + (N * cp * 8 if cfg.data.reset_attention_mask else 0)
        add("PP", "send/recv", mb * sends * (2 * boundary + ids))
        if m.tied_embeddings and (stage.embedding or stage.head) and not (stage.embedding and stage.head):
            # (DualPipeV's rank 0 holds both ends: one module, nothing to reduce)
            grad = s.grad_accum if s.path == "bf16_optimizer" else e  # BF16_Optimizer reduces its fp32 copy
            add("tied embedding", "all-reduce", m.padded_vocab_size // tp * h * grad)
    result = []
    for (group, kind), nbytes in out.items():
        ranks = {"TP": tp, "CP": cp, "DP": dp, "EP": layout.expert, "EDP": dp // layout.expert, "PP": 2,
                 "tied embedding": 2}[group]
        result.append(Collective(group, kind, nbytes, ranks, where[group]))
    return result


def transfer_seconds(c: Collective, device: Device) -> float:
    """Seconds of `c` at its link's bandwidth per GPU and direction: payload x bus factor / bandwidth."""
    if c.link not in ("NVLink", "network"):
        raise ValueError(f"unknown link {c.link!r}")
    bandwidth = (device.intra_node_gbps if c.link == "NVLink" else device.inter_node_gbps) * 1e9
    return c.bytes * bus_factor(c.kind, c.ranks) / bandwidth
