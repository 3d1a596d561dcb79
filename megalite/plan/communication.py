"""Communication per step: the bytes one GPU hands to each kind of collective, per process group, as megalite and
DeepSpeed call them, in how many calls, the link each group crosses (from DeepSpeed's rank placement), and the time
they take: NCCL's own cost model (its `src/graph/tuning.cc`, 2.8), a latency per call growing with the ring's hops
plus the payload at the ring's bus bandwidth, which over the network is that of as many adapters as the group has
GPUs on each node (NCCL runs one ring per channel and spreads the channels' inter-node hops over the node's NICs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


# NCCL 2.8's latency model for its ring algorithm with the Simple protocol (what large collectives use), in seconds:
# a base latency per call, plus one hop latency per ring step, NVLink (or PCIe) hops inside a node and network hops
# between nodes (src/graph/tuning.cc: baseLat Ring/Simple 8.4 us; hwLat Ring/Simple NVLink 3.4, PCI 5.7, NET 9.6 us).
NCCL_BASE_LATENCY_S = 8.4e-6
NCCL_HOP_LATENCY_S = {"NVLink": 3.4e-6, "PCIe": 5.7e-6, "network": 9.6e-6}
# Collectives whose rings NCCL spreads over its channels, and so over every NIC of the group's GPUs on a node; an
# all-to-all or a point-to-point transfer leaves each GPU through its own adapter.
RING_KINDS = ("all-reduce", "all-gather", "reduce-scatter")


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
    calls: float = 1  # how many calls carry the payload (each pays NCCL's latency)
    per_node: int = 1  # the group's GPUs on each node: a network ring's traffic leaves through that many NICs


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


def per_node(layout: Layout, gpus_per_node: int) -> dict[str, int]:
    """How many of a group's GPUs share a node, from the same placement: a group whose consecutive members are
    `stride` ranks apart has gpus_per_node / stride of them on each node (at least one, at most the group)."""
    tp, dp, cp = layout.tensor, layout.data, layout.context

    def on_a_node(size: int, stride: int) -> int:
        return max(1, min(size, gpus_per_node // stride))

    return {"TP": on_a_node(tp, 1), "CP": on_a_node(cp, tp), "DP": on_a_node(cp * dp, tp),
            "EP": on_a_node(layout.expert, tp), "EDP": on_a_node(dp // layout.expert, tp * layout.expert),
            "PP": on_a_node(layout.pipeline, tp * cp * dp), "tied embedding": 1}


def communication(cfg: Config, layout: Layout, stage: Stage, s: Settings, gpus_per_node: int) -> list[Collective]:
    """Payload per step for one GPU of `stage`, per group and collective kind, as megalite and DeepSpeed call them, and
    in how many calls."""
    m = cfg.model
    tp, pp, dp, cp = layout.tensor, layout.pipeline, layout.replicas, layout.context
    e, h = s.element, m.hidden_size
    N = layout.micro_batch * cfg.data.seq_length // cp  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    mb = layout.accumulation
    where = links(layout, gpus_per_node)
    sp = layout.sequence_parallel
    out: dict[tuple[str, str], list[float]] = {}

    def add(group: str, kind: str, nbytes: float, calls: float) -> None:
        entry = out.setdefault((group, kind), [0.0, 0.0])
        entry[0] += nbytes
        entry[1] += calls

    act = N * h * e
    if tp > 1:
        fwd_passes = 2 if s.recompute else 1
        L = stage.blocks
        per_layer = 2 * fwd_passes + 2  # two per forward pass (attention and MLP), two in the backward
        if sp:  # column entry: all-gather (backward reduce-scatter); row exit: reduce-scatter (backward all-gather)
            add("TP", "all-gather", mb * L * act * per_layer, mb * L * per_layer)
            add("TP", "reduce-scatter", mb * L * act * per_layer, mb * L * per_layer)
            norm_params = h * (2 if m.norm == "layernorm" else 1)
            synced = 2 * norm_params + (2 * h if m.bias else 0)  # replicated weights with per-rank gradients
            tensors = 2 * (2 if m.norm == "layernorm" else 1) + (2 if m.bias else 0)  # one all-reduce each
            add("TP", "all-reduce", mb * L * synced * e, mb * L * tensors)
        else:  # row exit: all-reduce forward; column entry: all-reduce of the input gradient backward
            add("TP", "all-reduce", mb * L * act * per_layer, mb * L * per_layer)
        # FP8 row-parallel layers leave their matmul in fp32 and reduce it so (rounded once, after the sum): their
        # forward exits carry 4-byte elements; the rowwise recipes reduce the amaxes of operands split across the
        # ranks (megalite.parallel.fp8: per token and per weight row or column, MAX over the group)
        rows = sum(s.fp8(name) for name in ("attention.proj", "mlp.proj"))
        if rows and e < 4:
            add("TP", "reduce-scatter" if sp else "all-reduce", mb * L * fwd_passes * rows * act * (4 / e - 1), 0)
        if s.fp8_recipe in ("rowwise", "rowwise_with_gw_hp"):
            tokens = N  # the whole sequence's tokens: the column layers' output gradients arrive gathered
            for name in ("attention.qkv", "mlp.fc", "attention.proj", "mlp.proj"):
                if not s.fp8(name):
                    continue
                column = name in ("attention.qkv", "mlp.fc")
                passes = 1 if column else fwd_passes  # the column layer's input gradient, the row layer's forward
                vectors = [tokens] + ([h] if (not column or s.fp8_recipe == "rowwise") else [])
                add("TP", "all-reduce", mb * L * passes * 4 * sum(vectors), mb * L * passes * len(vectors))
        if stage.embedding:
            add("TP", "reduce-scatter" if sp else "all-reduce", mb * act, mb)
            if sp:
                add("TP", "all-gather", mb * act, mb)  # its backward
                if m.position == "learned":
                    add("TP", "all-reduce", mb * m.max_position_embeddings * h * e, mb)
        if stage.head:
            if sp:
                add("TP", "all-gather", mb * act, mb)
                add("TP", "reduce-scatter", mb * act, mb)
                add("TP", "all-reduce", mb * h * (2 if m.norm == "layernorm" else 1) * e,
                    mb * (2 if m.norm == "layernorm" else 1))
            else:
                add("TP", "all-reduce", mb * act, mb)
            ce = N * 4 * 3  # fp32 max, then (target logit, sum of exponentials) together
            chunks = -(-N // s.loss_chunk_tokens) if s.loss_chunk_tokens else 1
            # chunks recompute theirs in the backward
            add("TP", "all-reduce", mb * ce * (2 if s.loss_chunk_tokens else 1),
                mb * 2 * chunks * (2 if s.loss_chunk_tokens else 1))

    if cp > 1 and stage.blocks:
        # Ulysses: per block, q, k, v (kv heads replicated to a multiple of cp) and the output all-to-all forward (and
        # again in a recompute), their gradients backward. The loss adds two scalar all-reduces per micro-batch.
        heads, kvh = m.num_heads // tp, m.kv_heads // tp
        per_pass = N * (2 * heads + 2 * kvh * (kv_replication(kvh, cp) or 1)) * m.head_dim * e
        passes = (2 if s.recompute else 1) + 1
        add("CP", "all-to-all", mb * stage.blocks * per_pass * passes, mb * stage.blocks * 4 * passes)
    for group, kind, nbytes, calls in moe_collectives(cfg, layout, s, N, stage.moe_blocks, 2 if s.recompute else 1):
        add(group, kind, nbytes, calls)
    n_local = numel(stage.params)
    experts = expert_part(stage.params)
    if numel(experts):  # split experts: their own ZeRO groups over the expert-data-parallel ranks (replicas / ep)
        n_local -= numel(experts)
        edp = dp // layout.expert
        if edp > 1:  # reduced and gathered as the dense weights are (s.path is bf16_optimizer or zero here)
            calls = -(-numel(experts) // (500_000_000 if s.path == "bf16_optimizer" else s.reduce_bucket))
            add("EDP", "all-reduce", numel(experts) * e, calls)
            add("EDP", "all-gather", -(-numel(experts) // (2 * edp)) * 2 * edp * e, 1)
    if dp > 1:
        decay = decay_numel(stage.params) - decay_numel(experts)
        padded = sum(-(-x // (2 * dp)) * 2 * dp for x in (decay, n_local - decay) if x)
        groups = sum(1 for x in (decay, n_local - decay) if x)
        # Gradients travel in DeepSpeed's communication dtype, the model's dtype by default. ZeRO-1/2 all-reduce
        # their gradient buckets (use_multi_rank_bucket_allreduce, on by default) and then all-gather the updated
        # partitions, as BF16_Optimizer does; ZeRO-0 only all-reduces. Buckets: the engine's fallback all-reduce
        # flattens up to 5e8 elements at a time, the ZeRO optimizer reduce_bucket_size; the partitions are gathered
        # per parameter group, 5e8 elements at a time (allgather_bucket_size).
        fallback = -(-n_local // 500_000_000)
        gathered = sum(-(-x // 500_000_000) for x in (decay, n_local - decay) if x)
        if s.path in ("none", "fp16_optimizer", "bf16_ddp"):
            add("DP", "all-reduce", n_local * e, fallback)
        elif s.path in ("bf16_optimizer", "zero"):
            buckets = fallback if s.path == "bf16_optimizer" else -(-n_local // s.reduce_bucket)
            add("DP", "all-reduce", n_local * e, buckets)
            add("DP", "all-gather", padded * e, max(groups, gathered))
        else:  # zero3: gradients reduce-scattered every micro-batch; small persistent parameters gathered once, after
            # the step; the rest for the forward and partly again for the backward (zero3_traffic)
            z3 = zero3_traffic(stage, s, dp, where["DP"], 1)
            gathers = z3.gathers
            add("DP", "all-gather", mb * gathers * z3.one_pass.bytes + z3.persistent.bytes,
                mb * gathers * z3.one_pass.calls + z3.persistent.calls)
            add("DP", "reduce-scatter", mb * z3.reduce.bytes, mb * z3.reduce.calls)
    if pp > 1:
        boundary = Ns * h * e
        sends = point_to_point_links(cfg.parallel.pipeline_schedule, stage.index, pp)
        # position ids (this rank's chunk) and document ids (the whole sequence's) travel along
        ids = N * 8 + (N * cp * 8 if cfg.data.reset_attention_mask else 0)
        add("PP", "send/recv", mb * sends * (2 * boundary + ids), mb * sends * (2 + 1))
        if m.tied_embeddings and (stage.embedding or stage.head) and not (stage.embedding and stage.head):
            # (DualPipeV's rank 0 holds both ends: one module, nothing to reduce)
            grad = s.grad_accum if s.path == "bf16_optimizer" else e  # BF16_Optimizer reduces its fp32 copy
            add("tied embedding", "all-reduce", m.padded_vocab_size // tp * h * grad, 1)
    nodes = per_node(layout, gpus_per_node)
    result = []
    for (group, kind), (nbytes, calls) in out.items():
        ranks = {"TP": tp, "CP": cp, "DP": dp, "EP": layout.expert, "EDP": dp // layout.expert, "PP": 2,
                 "tied embedding": 2}[group]
        result.append(Collective(group, kind, nbytes, ranks, where[group], calls, nodes.get(group, 1)))
    return result


def _count(params: Any, keep: Any) -> int:
    """How many parameter tensors `keep` accepts (a ParamSet read by layer kind)."""
    groups = getattr(params, "groups", None)
    if groups is None:
        return sum(1 for p in params if keep(p))
    return sum(sum(1 for p in ps if keep(p)) * count for ps, count in groups)


def zero3_modules(stage: Stage, s: Settings) -> int:
    """Modules of the stage holding a partitioned parameter (above the persistence threshold)."""
    groups = getattr(stage.params, "groups", None)
    if groups is None:
        groups = [((p,), 1) for p in stage.params]
    return sum(len({p.name.rsplit(".", 1)[0] for p in ps if p.numel > s.persistence_threshold}) * count
               for ps, count in groups)


@dataclass
class Zero3Traffic:
    """ZeRO-3's traffic on one GPU of a stage, by what it overlaps with: one pass's gathers of the partitioned
    parameters (`gathers` passes per micro-batch), the persistent parameters' gathers after the step, one
    micro-batch's gradient reduce-scatters."""

    one_pass: Collective
    gathers: float  # passes of gathers per micro-batch: the forward's and the share the backward gathers again
    persistent: Collective
    reduce: Collective
    modules: int


def zero3_traffic(stage: Stage, s: Settings, dp: int, link: str, on_a_node: int) -> Zero3Traffic:
    """ZeRO-3's collectives for `stage` (see `communication`): the partitioned parameters gathered for the forward and
    partly again for the backward; persistent ones once per step, one call per tensor; gradients reduce-scattered per
    reduce bucket.

    What the backward gathers again, measured (`megalite bench zero3`, 8 equal layers, 2 ranks): DeepSpeed keeps a
    layer from its forward to its backward only when its prefetch scans reached the layer's backward use while it was
    still gathered, which covers the last 2 x stage3_prefetch_bucket_size elements of the forward: a bucket of one,
    two, three and four of the eight layers kept two, four, six and all eight (none without prefetch). So the
    backward gathers max(0, 1 - 2 x bucket / partitioned) of the partitioned parameters again, and all of them when
    they exceed stage3_max_reuse_distance. A recomputed layer's backward reuses its recompute's gather."""
    e = s.element
    n_local = numel(stage.params)
    persistent = numel_at_most(stage.params, s.persistence_threshold)
    partitioned = n_local - persistent
    again = 1.0 if partitioned > s.max_reuse_distance else max(0.0, 1 - 2 * s.prefetch_bucket / max(partitioned, 1))
    gathers = 1 + again
    modules = zero3_modules(stage, s)
    one_pass = Collective("DP", "all-gather", partitioned * e, dp, link, zero3_calls_per_pass(stage, s, partitioned),
                          on_a_node)
    after_step = Collective("DP", "all-gather", persistent * e, dp, link,
                            _count(stage.params, lambda p: p.numel <= s.persistence_threshold), on_a_node)
    reduce = Collective("DP", "reduce-scatter", n_local * e, dp, link, -(-n_local // s.reduce_bucket), on_a_node)
    return Zero3Traffic(one_pass, gathers, after_step, reduce, modules)


def zero3_calls_per_pass(stage: Stage, s: Settings, partitioned: int) -> int:
    """All-gathers ZeRO-3 issues for one pass over the stage's partitioned parameters. DeepSpeed's parameter
    coordinator gathers a module's parameters when the module is reached unless they are already in flight, and from
    the second step on prefetches, in one coalesced call per module reached, the next parameters of its trace up to
    stage3_prefetch_bucket_size elements (at least one parameter): one call per module when modules are larger than
    the bucket, the first module's and then one per bucket when they are smaller."""
    modules = zero3_modules(stage, s)
    if not modules:
        return 0
    if s.prefetch_bucket <= 0:
        return modules
    return min(modules, 1 + -(-partitioned // s.prefetch_bucket))


def bus_bandwidth(c: Collective, device: Device) -> float:
    """Bytes per second each GPU moves in `c`: its NVLink, or over the network the NICs its ring's channels use (one
    per GPU of the group on a node, for the ring collectives), never more than NVLink feeds them; capped where
    NCCL's model caps the device (`Device.collective_cap_gbps`)."""
    if c.link not in ("NVLink", "network"):
        raise ValueError(f"unknown link {c.link!r}")
    if c.link == "NVLink":
        gbps = device.intra_node_gbps
    else:
        nics = c.per_node if c.kind in RING_KINDS else 1
        gbps = min(device.intra_node_gbps, nics * device.inter_node_gbps)
    if device.collective_cap_gbps:
        gbps = min(gbps, device.collective_cap_gbps)
    return gbps * 1e9


def latency_seconds(c: Collective, device: Device) -> float:
    """NCCL's latency of one call of `c` (ring, Simple protocol): a base latency plus a hop latency per ring step, the
    steps between nodes at the network's hop latency (an all-reduce runs its ring twice). An all-to-all and a send
    are point-to-point: one hop per peer, one for a send."""
    n = c.ranks
    if n == 1:
        return 0.0
    nodes = -(-n // max(1, c.per_node)) if c.link == "network" else 1
    inside = NCCL_HOP_LATENCY_S[device.intra_node_link]
    if c.kind == "send/recv":
        return NCCL_BASE_LATENCY_S + (NCCL_HOP_LATENCY_S["network"] if c.link == "network" else inside)
    steps, between = n - 1, nodes - 1
    if c.kind == "all-reduce":
        steps, between = 2 * steps, 2 * between
    return NCCL_BASE_LATENCY_S + (steps - between) * inside + between * NCCL_HOP_LATENCY_S["network"]


def transfer_seconds(c: Collective, device: Device) -> float:
    """Seconds of `c`: its calls' latency plus the payload x bus factor at the bus bandwidth (NCCL's cost model)."""
    if c.ranks == 1:
        bus_factor(c.kind, 1)  # an unknown kind is an error even here
        return 0.0
    return c.calls * latency_seconds(c, device) + c.bytes * bus_factor(c.kind, c.ranks) / bus_bandwidth(c, device)
