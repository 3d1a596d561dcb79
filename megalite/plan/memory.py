"""Memory per GPU of each pipeline stage: model states as DeepSpeed 0.19 holds them, activations per micro-batch
tensor by tensor as megalite's model saves them (times the micro-batches a stage holds in flight), the transient
buffers of a step, and a stated allowance for what the caching allocator does not see."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, overload

from megalite.config import Config, Layout, kv_replication
from megalite.plan import schedule
from megalite.plan.devices import GiB
from megalite.plan.experts import moe_mlp_activation_bytes
from megalite.plan.layout import Settings
from megalite.plan.stages import Stage, decay_numel, expert_part, layer_params, numel, numel_at_most

# What the caching allocator does not count (torch.cuda.max_memory_allocated excludes it): the CUDA
# context and cuBLAS workspaces (about 0.5-1 GiB on Hopper), NCCL's communicator buffers, and the
# allocator's fragmentation. A stated allowance, not a measurement; --allowance-gib overrides the fixed part.
ALLOWANCE_GIB = 1.5
FRAGMENTATION = 0.05  # of the allocated peak

# The terms that are known exactly (unlike activations): a model whose states alone exceed a device cannot run.
MODEL_STATE_TERMS = ("parameters", "gradients", "fp32 gradients", "master weights", "optimizer states")


def model_state_bytes(params: Any, dp: int, s: Settings) -> dict[str, tuple[float, bool]]:
    """Parameters, gradients, master weights and optimizer states on one GPU, as DeepSpeed 0.19 holds them:
    name -> (bytes, built), `built` for the gradients that are created during the backward and freed after the
    optimizer step (the rest is held throughout). Offloaded terms are named `host: ...`.

    BF16_Optimizer (ZeRO-1, bf16, fp32 accumulation): full bf16 gradients (built) and full fp32 gradients
    (held), fp32 master and optimizer partitions. The ZeRO optimizer: ZeRO-1 builds the full gradients and
    reduces them into its fp32 partition at the accumulation boundary (it reduces in buckets during the backward,
    so above `reduce_bucket_size` elements its real peak is lower); ZeRO-2 builds only its partition. ZeRO-3
    partitions everything and keeps parameters of at most `stage3_param_persistence_threshold` elements whole
    besides. ZeRO-0 keeps whole copies. The flat decay and no-decay groups are padded to a multiple of
    2 x dp elements, as DeepSpeed aligns them.
    """
    decay = decay_numel(params)
    n = numel(params)
    e, g, k = s.element, s.grad_accum, s.optimizer_state_bytes
    padded = sum(-(-x // (2 * dp)) * 2 * dp for x in (decay, n - decay) if x)
    part = padded / dp
    out: dict[str, tuple[float, bool]]
    if s.path == "none":
        out = {"parameters": (e * n, False), "gradients": (g * n, True), "optimizer states": (k * n, False)}
    elif s.path in ("fp16_optimizer", "bf16_ddp"):  # FP16_Optimizer (bf16_ddp: the same in bf16); its fp32
        # gradient copy exists during the step only (a transient)
        out = {"parameters": (e * n, False), "gradients": (e * n, True), "master weights": (4 * n, False),
               "optimizer states": (k * n, False)}
    elif s.path == "bf16_optimizer":
        out = {"parameters": (e * padded, False), "gradients": (e * n, True), "fp32 gradients": (g * padded, False),
               "master weights": (4 * part, False), "optimizer states": (k * part, False)}
    elif s.path == "zero":
        grads = e * n if s.zero_stage == 1 else g * part  # ZeRO-1: the reduced partition replaces them
        out = {"parameters": (e * padded, False), "gradients": (grads, True), "master weights": (4 * part, False),
               "optimizer states": (k * part, False)}
    else:  # zero3
        persistent = numel_at_most(params, s.persistence_threshold)
        out = {"parameters": (e * (n / dp + persistent), False), "gradients": (g * n / dp, False),
               "master weights": (4 * n / dp, False), "optimizer states": (k * n / dp, False)}
    if s.offload_optimizer:
        for key in ("master weights", "optimizer states"):
            if key in out:
                out["host: " + key] = out.pop(key)
    return {key: (float(v), built) for key, (v, built) in out.items()}


def stage_model_state_bytes(params: Any, layout: Layout, s: Settings) -> dict[str, tuple[float, bool]]:
    """`model_state_bytes` of a stage's parameters: experts split over an expert-parallel group (ZeRO-1/2) are in
    DeepSpeed's `moe` parameter groups, partitioned over their expert-data-parallel ranks (replicas / ep, the ones
    holding the same experts), the other parameters over all replicas."""
    experts = expert_part(params)
    if not numel(experts):
        return model_state_bytes(params, layout.replicas, s)
    dense = model_state_bytes(expert_part(params, experts=False), layout.replicas, s)
    split = model_state_bytes(experts, layout.replicas // layout.expert, s)
    return {key: (dense.get(key, (0.0, built))[0] + split.get(key, (0.0, built))[0], built)
            for key, (_, built) in {**dense, **split}.items()}


def activation_bytes(cfg: Config, layout: Layout, stage: Stage, s: Settings) -> dict[str, float]:
    """What autograd saves for backward in one micro-batch on one GPU of `stage`, by part.

    Counted tensor by tensor as megalite's model saves them (parameters excluded, a storage shared by views
    counted once): each norm keeps its input and fp32 statistics; each linear its input (the norm output, or
    its sequence-gathered copy); attention the qkv output (held by the q/k/v views), RoPE's rotated q and k, the
    output and an fp32 log-sum-exp per head (flash attention: no T x T matrix); the MLP its pre- and
    post-activation (SwiGLU: the fused gate/up output, silu(gate) and the product); the loss an fp32 softmax
    over this rank's vocabulary slice, or with loss chunks only what the chunks are recomputed from.

    With context parallelism (cp ranks) every per-token term is this rank's chunk of B x T / cp tokens. Attention
    keeps what its all-to-alls deliver instead of the qkv output and RoPE's rotated q and k: q, k and v over the
    whole sequence with heads / cp each (kv heads replicated when fewer than cp), the same bytes as the chunk's
    q, k, v, and the projection keeps the output all-to-all's result; the document mask of the torch path stays
    T x T.
    """
    m, d = cfg.model, cfg.data
    e, tp, cp = s.element, layout.tensor, layout.context
    h, T, B = m.hidden_size, d.seq_length, layout.micro_batch
    N = B * T // cp  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    heads, kvh, hd, f_l = m.num_heads // tp, m.kv_heads // tp, m.head_dim, m.ffn_size // tp
    v_l = m.padded_vocab_size // tp
    mask = e if s.platform == "cpu" else 1  # dropout masks: CUDA's fused dropout keeps bytes, the CPU path floats
    norm = Ns * h * e + Ns * 4 * (2 if m.norm == "layernorm" else 1)
    if m.norm == "rmsnorm" and s.attention != "triton" and s.platform == "cpu":
        norm += Ns * h * (8 - e)  # torch's CPU rms_norm keeps the input and the normalised input in fp32
    rope = m.position == "rope"
    rope_tables = 2 * N * hd * e  # cos and sin, (B, 1, T / cp, D)
    pipelined = layout.pipeline > 1
    docs = d.reset_attention_mask

    # the column-parallel layers' input: with sequence parallelism megalite keeps it gathered, Megatron its shard
    col_in = Ns if s.sp_saved_input == "shard" else N
    # FP8 with the tensorwise recipe: an FP8 linear keeps its input's e4m3 cast (1 byte) instead of the input, and an
    # e4m3 copy of its weight; the rowwise recipes keep the input as it is (megalite.parallel.fp8)
    fp8_saves = {name: s.fp8(name) and s.fp8_saves_fp8 for name in
                 ("attention.qkv", "attention.proj", "mlp.fc", "mlp.proj")}
    qkv_in = 1 if fp8_saves["attention.qkv"] else e
    if cp == 1:
        attn = col_in * h * qkv_in + N * (heads + 2 * kvh) * hd * e  # qkv input, qkv output
        if rope:
            attn += N * (heads + kvh) * hd * e
    else:  # qkv input; the all-to-alls' q, k, v (kv heads replicated to a multiple of cp); the output all-to-all's
        # result, which the projection keeps (without CP its input is a view of the kernel's output)
        attn = col_in * h * qkv_in + N * (2 * heads + 2 * kvh * (kv_replication(kvh, cp) or 1)) * hd * e
        if fp8_saves["attention.proj"]:
            attn -= N * heads * hd * e  # the output all-to-all's result: the projection keeps its cast (below)
    if rope and pipelined:
        attn += rope_tables  # each pipeline block has its tables
    if s.attention == "materialized":  # the T x T softmax per head, with dropout its mask and output; the context
        drop = m.attention_dropout > 0
        if not s.recompute_attention:  # selective recompute rebuilds them in the backward from q, k, v
            attn += B * heads * T * T * (e + (mask + e if drop else 0))
        attn += N * heads * hd * (1 if fp8_saves["attention.proj"] else e)
    else:
        # the kernel's output (the projection's input), its fp32 log-sum-exp (rebuilt under selective recompute)
        attn += N * heads * hd * e + (0 if s.recompute_attention else N * heads * 4)
        if fp8_saves["attention.proj"] and cp == 1:
            attn += N * heads * hd  # the projection's e4m3 cast of it
    if fp8_saves["attention.proj"] and cp > 1:
        attn += N * heads * hd
    if docs:
        # int32 document bounds per token; SDPA gets the boolean mask and keeps it as an additive float mask
        attn += 2 * B * T * 4 if s.attention == "triton" else B * T * T * e  # the whole sequence's, with CP too
    # the fc input; the activation's input and the projection's input (GELU: fc output, gelu output; SwiGLU: the fused
    # gate/up output, silu(gate), the product)
    mlp = (col_in * h * (1 if fp8_saves["mlp.fc"] else e) + (3 if m.mlp == "swiglu" else 1) * N * f_l * e
           + N * f_l * (1 if fp8_saves["mlp.proj"] else e))
    layer = {"norms": 2 * norm, "attention": attn, "mlp": mlp}
    if any(fp8_saves.values()):  # the e4m3 weight copies, one per micro-batch
        weights = {"attention.qkv": (heads + 2 * kvh) * hd * h, "attention.proj": h * heads * hd,
                   "mlp.fc": (2 if m.mlp == "swiglu" else 1) * f_l * h, "mlp.proj": h * f_l}
        layer["FP8 weight copies"] = sum(weights[name] for name, kept in fp8_saves.items() if kept)
    if m.hidden_dropout > 0:
        layer["dropout masks"] = 2 * Ns * h * mask

    out: dict[str, float] = {}
    if s.recompute:  # each block keeps only its input; one block's activations are rebuilt at a time
        out["block inputs (recompute)"] = stage.blocks * Ns * h * e + (B * T * 8 if docs and stage.blocks else 0)
    else:
        for key, value in layer.items():
            out[key] = stage.blocks * value
        if stage.moe_blocks:  # MoE layers keep their router's and experts' tensors instead of the dense MLP's
            out["mlp"] -= stage.moe_blocks * mlp
            out["experts (MoE layers)"] = stage.moe_blocks * moe_mlp_activation_bytes(m, layout, s, N, Ns)
    if rope and not pipelined and stage.blocks:
        out["rope tables"] = rope_tables  # computed once per forward, shared by every block
    if stage.embedding:
        emb = N * 8 + (N if tp > 1 else 0)  # token ids (or this rank's local ids), the out-of-range mask
        if m.position == "learned":
            emb += (N if d.reset_position_ids else T) * 8  # position ids (otherwise an expanded arange)
        out["embedding"] = emb + (Ns * h * mask if m.hidden_dropout > 0 else 0)
    if stage.head:
        head = norm + N * h * e  # the final norm; the output layer's input
        if s.loss_chunk_tokens:
            head += N * 8 + N * 4  # labels and token weights the chunks are recomputed from
        else:
            head += N * v_l * 4 + N * (1 + 8 + 4)  # fp32 softmax; target mask, ids and weights
            if m.padded_vocab_size > m.vocab_size:
                head += v_l  # the boolean mask of padding rows (on the ranks whose slice has some)
        out["output layer and loss"] = head
    return {key: float(v) for key, v in out.items() if v}


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage, by term, and the peak they add up to.

    Terms come in three kinds: held throughout the step; `built` (gradients created in the backward, freed after
    the optimizer step); `transient: ...` (buffers that live for part of a step: `late` ones at the gradient
    reduction and the optimizer step, the others during a forward or backward). The peak is the larger of two
    moments: the end of a forward (every in-flight micro-batch's activations, plus the logits and loss buffers or
    a recompute working set, plus gradients kept from earlier micro-batches) and the end of the backward at the
    accumulation boundary (the last micro-batch's activations freed, every gradient built, the largest late
    transient allocated).
    """

    stage: int
    terms: dict[str, float]
    built: set[str]
    in_flight: int
    accumulation: int
    activations_per_micro_batch: dict[str, float]
    host: dict[str, float]
    late: frozenset[str] = frozenset()
    bucket_holds_gradients: bool = False
    # The least any implementation of this layout holds (`floor_terms`): a plan says "does not fit" for certain only
    # when this exceeds the device (see `floor_memory`).
    floor: StageMemory | None = None

    def _sum(self, keys: Any) -> float:
        return sum(self.terms[k] for k in keys)

    @functools.cached_property
    def allocated(self) -> float:
        """The caching allocator's peak (what torch.cuda.max_memory_allocated would show)."""
        transient = {k for k in self.terms if k.startswith("transient:")}
        bucket = transient & self.late
        held = set(self.terms) - transient - self.built
        one_micro = sum(self.activations_per_micro_batch.values())
        forward_end = (self._sum(held) + (self._sum(self.built) if self.accumulation > 1 else 0.0)
                       + max([self.terms[k] for k in transient - bucket] or [0.0]))
        buckets = max([self.terms[k] for k in bucket] or [0.0])
        built = self._sum(self.built)
        # ZeRO-2 copies gradients into its bucket and frees them, then reduces the bucket into the partition it
        # builds: bucket and partition do not coexist. Everything else holds its gradients while reducing.
        grads_and_bucket = max(built, buckets) if self.bucket_holds_gradients else built + buckets
        backward_end = self._sum(held) - one_micro + grads_and_bucket
        return max(forward_end, backward_end)

    def total(self, allowance_gib: float = ALLOWANCE_GIB) -> float:
        """The allocated peak plus fragmentation and the fixed allowance: what the device must have."""
        return self.allocated * (1 + FRAGMENTATION) + allowance_gib * GiB

    def biggest(self) -> tuple[str, float]:
        return max(self.terms.items(), key=lambda kv: kv[1])


class StageMemories(Sequence[StageMemory]):
    """The memory of every pipeline stage, each built when first read (a search ranks thousands of layouts of up to
    hundreds of stages by their fullest stage only). Stages of one kind (the same layers) differ only in the
    micro-batches they hold in flight, which never rise with the stage index under 1F1B, so the first stage of each
    kind is the fullest of its kind: `fullest()` are those, in stage order. Other schedules say which stages to
    consider (`candidates`: "ends", the first and last of each kind; "all")."""

    def __init__(self, stage_list: list[Stage], build: Callable[[Stage], StageMemory],
                 candidates: Optional[str] = None) -> None:
        self._stages, self._build = stage_list, build
        self._built: dict[int, StageMemory] = {}
        firsts: dict[tuple, int] = {}
        lasts: dict[tuple, int] = {}
        for st in stage_list:
            firsts.setdefault(st.kind, st.index)
            lasts[st.kind] = st.index
        picked = set(firsts.values()) | (set(lasts.values()) if candidates == "ends" else set())
        self._firsts = sorted(picked) if candidates != "all" else [st.index for st in stage_list]

    def __len__(self) -> int:
        return len(self._stages)

    @overload
    def __getitem__(self, index: int) -> StageMemory: ...

    @overload
    def __getitem__(self, index: slice) -> list[StageMemory]: ...

    def __getitem__(self, index: int | slice) -> StageMemory | list[StageMemory]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = range(len(self))[index]  # negative indices; IndexError past the end
        if i not in self._built:
            self._built[i] = self._build(self._stages[i])
        return self._built[i]

    def fullest(self) -> list[StageMemory]:
        """The first stage of each kind: among them is every stage a maximum over all stages would pick first."""
        return [self[i] for i in self._firsts]


def memory(cfg: Config, layout: Layout, s: Settings) -> StageMemories:
    """Per-GPU memory of every pipeline stage (each built when first read)."""
    m = cfg.model
    tp, pp, dp = layout.tensor, layout.pipeline, layout.replicas  # ZeRO partitions over data x context
    e = s.element
    N = layout.micro_batch * cfg.data.seq_length // layout.context  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    v_l = m.padded_vocab_size // tp
    per_layer = None
    by_kind: dict[tuple, tuple] = {}

    def build(st: Stage) -> StageMemory:
        nonlocal per_layer
        if st.kind not in by_kind:
            decay = decay_numel(st.params)
            persistent = numel_at_most(st.params, s.persistence_threshold)
            by_kind[st.kind] = (stage_model_state_bytes(st.params, layout, s), activation_bytes(cfg, layout, st, s),
                                st.numel, decay, persistent)
        states, per_micro, n_local, decay, persistent = by_kind[st.kind]
        terms = {k: v for k, (v, _) in states.items() if not k.startswith("host: ")}
        host = {k[6:]: v for k, (v, _) in states.items() if k.startswith("host: ")}
        built = {k for k, (_, b) in states.items() if b}
        name = cfg.parallel.pipeline_schedule
        in_flight = schedule.in_flight(st.index, pp, layout.accumulation, name)
        if name == "dualpipev" and pp > 1:  # two chunks, each with its own layers and micro-batches in flight
            per_chunk = [sum(activation_bytes(cfg, layout, c, s).values())
                         for c in schedule.chunk_stages(cfg, tp, pp, st.index)]
            terms["activations"] = schedule.peak_activation_bytes(name, pp, layout.accumulation, st.index, per_chunk)
        else:
            terms["activations"] = in_flight * sum(per_micro.values())
        deferred = schedule.deferred_weight_inputs(st.index, pp, layout.accumulation, name)
        if deferred:  # ZB-H1: what the W passes still to run keep
            terms["deferred weight-gradient inputs"] = deferred * schedule.weight_grad_input_bytes(cfg, layout, st, s)
        if pp > 1:
            # engine.pipe_buffers, one set per in-flight micro-batch (at least two): the int64 ids that travel with
            # the hidden states (the first stage also holds the token ids); the stage's output, which autograd does
            # not keep (the last stage's output is its logits, or with loss chunks the hidden states the loss keeps);
            # the last stage's labels and token weights. Plus one gradient receive buffer (_grad_layer_buf).
            whole = N * layout.context  # token ids, labels and document ids are the whole sequence's on each rank
            ids = N * 8 + (whole * 8 if cfg.data.reset_attention_mask else 0) + (whole * 8 if st.embedding else 0)
            if not st.head:
                output = Ns * m.hidden_size * e
            else:
                output = 0 if s.loss_chunk_tokens else N * v_l * e
            labels = whole * 12 if st.head else 0
            terms["pipeline buffers"] = float(max(2, in_flight) * (ids + output + labels)
                                              + Ns * m.hidden_size * e + N * 8)
        if st.head:
            if s.loss_chunk_tokens:  # one chunk's logits, their fp32 copy and softmax
                terms["transient: logits and loss"] = float(min(s.loss_chunk_tokens, N) * v_l * (e + 8))
            else:  # the logits and their fp32 copy in the forward; the fp32 gradient and its cast in the backward
                terms["transient: logits and loss"] = float(N * v_l * (4 + (e if e != 4 else 0)))
        if s.recompute and st.blocks:
            if per_layer is None:
                kept = dataclasses.replace(s, recompute=False)  # one block's activations, as without recompute
                kinds = [Stage(0, 1, False, False, ())] + ([Stage(0, 1, False, False, (), moe_blocks=1)] if m.moe else [])
                per_layer = max(sum(activation_bytes(cfg, layout, one, kept).values()) for one in kinds)
            terms["transient: recompute working set"] = float(per_layer)
        if s.path in ("none", "bf16_optimizer", "fp16_optimizer", "bf16_ddp"):
            # engine.buffered_allreduce_fallback flattens up to 5e8 gradient elements into one buffer, and casts it
            # to the communication dtype, to all-reduce it
            bucket = min(n_local, 500_000_000)
            terms["transient: gradient all-reduce bucket"] = float(bucket * (s.grad_accum + (e if e != s.grad_accum
                                                                                             else 0)))
        elif s.path == "zero":
            # contiguous_gradients: reduce_bucket_size elements (two with overlap_comm), whatever the model's size;
            # ZeRO-2's gradients are in it until they are reduced into the partition
            terms["transient: gradient reduce bucket"] = float(s.reduce_bucket * e * (2 if s.overlap_comm else 1))
        else:  # zero3: the reduce bucket is allocated whole at start; layers are gathered one or two at a time
            terms["ZeRO-3 reduce bucket"] = float(s.reduce_bucket * e)
            # gathered parameters stay live up to stage3_max_live_parameters elements, plus the prefetch bucket
            gathered = min(n_local - persistent, s.max_live_parameters) + min(s.prefetch_bucket, n_local - persistent)
            terms["transient: ZeRO-3 gathered parameters"] = float(gathered * e)
        if s.fp8_recipe and st.blocks:
            # a cast holds the operand scaled in fp32 and its e4m3 result (about 5 bytes an element) while it runs;
            # FP8 row-parallel layers at TP > 1 hold their fp32 output until it is reduced
            tp_, h_ = layout.tensor, m.hidden_size
            inputs = {"attention.qkv": N * h_, "attention.proj": N * m.num_heads // tp_ * m.head_dim,
                      "mlp.fc": N * h_, "mlp.proj": N * m.ffn_size // tp_}
            largest = max([inputs[name] for name in inputs if s.fp8(name)]
                          + [p.numel for p in layer_params(m, tp_)["block"] if s.fp8(p.name.rsplit(".", 1)[0])])
            rows = tp_ > 1 and any(s.fp8(name) for name in ("attention.proj", "mlp.proj"))
            terms["transient: FP8 casts"] = float(max(5 * largest, N * h_ * 4 if rows else 0))
        if s.path in ("fp16_optimizer", "bf16_ddp"):  # FP16_Optimizer flattens the gradients into fp32 for the step
            terms["transient: fp32 gradients at the step"] = float(4 * n_local)
        elif s.path == "zero3":
            # ZeRO-3 steps its partition one sub-group at a time (parameters of a group taken in order until their
            # partitions reach sub_group_size elements), flattening that sub-group's gradients into fp32
            largest = _largest_tensor(st.params)
            group = max(decay, n_local - decay) / dp
            terms["transient: fp32 gradients at the step"] = float(4 * min(group, s.sub_group_size
                                                                           + largest / dp))
        late = frozenset(k for k in terms if k.startswith("transient:") and ("bucket" in k or "at the step" in k))
        floor_activations = None
        if name == "dualpipev" and pp > 1:  # the bound's activations held as the estimate's, chunk by chunk
            lean = dataclasses.replace(s, sp_saved_input="shard")
            floor_activations = schedule.peak_activation_bytes(
                name, pp, layout.accumulation, st.index,
                [sum(activation_bytes(cfg, layout, c, lean).values()) for c in schedule.chunk_stages(cfg, tp, pp, st.index)])
        floor = floor_memory(cfg, layout, st, s, in_flight, floor_activations)
        return StageMemory(st.index, terms, built, in_flight, layout.accumulation, per_micro, host, late,
                           s.path == "zero" and s.zero_stage == 2, floor)

    ranks = schedule.rank_stages(cfg, tp, pp)
    name = cfg.parallel.pipeline_schedule
    # Which stages can be the fullest of their kind: under ZB-H1 the first or the last (activations in flight fall
    # with the stage index, deferred weight-gradient inputs rise), under DualPipeV any (each rank two chunks).
    fullest = None if name == "1f1b" else "ends" if name == "zb-h1" else "all"
    return StageMemories(ranks, build, fullest)



def _largest_tensor(params: Any) -> int:
    """Elements of the largest parameter tensor (a ParamSet is read by layer kind, not tensor by tensor)."""
    groups = getattr(params, "groups", None)
    if groups is not None:
        return max((p.numel for ps, _ in groups for p in ps), default=0)
    return max((p.numel for p in params), default=0)


def floor_memory(cfg: Config, layout: Layout, st: Stage, s: Settings, in_flight: int,
                 activations: Optional[float] = None) -> StageMemory:
    """The least any implementation of `layout` holds on one GPU of stage `st` at its peak (no allowance): a lower
    bound, for the plan to say "does not fit" only when it is certain.

    Model states as the leanest sharding the ZeRO stage allows: parameters and gradients in the training dtype
    (ZeRO-3: partitioned; ZeRO-2: gradients partitioned; ZeRO-1: whole, as Megatron's distributed optimizer and
    DeepSpeed's ZeRO-1/2 hold them, neither keeping BF16_Optimizer's full fp32 gradients), fp32 master weights (when
    the parameters are not fp32) and optimizer states partitioned from ZeRO-1 on. Activations as megalite's model
    saves them, with sequence parallelism keeping the column-parallel inputs' shards (Megatron's layers; megalite's
    keep them gathered), times the micro-batches the schedule holds in flight (`activations`: DualPipeV's peak over
    its two chunks, computed by the caller). Transients: the loss's logits (or one
    chunk's), one block's activations for a recompute, one layer's gathered parameters at ZeRO-3, one pipeline
    receive buffer; no gradient buckets and no fp32 copy of gradients at the step (an implementation can reduce and
    step in place)."""
    m = cfg.model
    e, k = s.element, s.optimizer_state_bytes
    dp, tp = layout.replicas, layout.tensor
    zero = s.zero_stage
    n = st.numel
    master = 4 if e != 4 else 0
    lean = dataclasses.replace(s, sp_saved_input="shard")
    terms = {"parameters": e * n / (dp if zero == 3 else 1), "gradients": e * n / (dp if zero >= 2 else 1)}
    if not s.offload_optimizer:
        terms["master weights"] = master * n / (dp if zero else 1)
        terms["optimizer states"] = k * n / (dp if zero else 1)
    per_micro = activation_bytes(cfg, layout, st, lean)
    terms["activations"] = in_flight * sum(per_micro.values()) if activations is None else activations
    N = layout.micro_batch * cfg.data.seq_length // layout.context
    Ns = N // tp if layout.sequence_parallel else N
    v_l = m.padded_vocab_size // tp
    if layout.pipeline > 1:
        terms["pipeline buffers"] = float(Ns * m.hidden_size * e)
    if st.head:
        chunk = min(s.loss_chunk_tokens, N) if s.loss_chunk_tokens else N
        terms["transient: logits and loss"] = float(chunk * v_l * (e + 4))
    if s.recompute and st.blocks:
        one = dataclasses.replace(lean, recompute=False)
        terms["transient: recompute working set"] = float(sum(activation_bytes(
            cfg, layout, Stage(0, 1, False, False, ()), one).values()))
    if zero == 3:
        kinds = layer_params(m, tp)
        layers = [kinds["block"]] + ([kinds["embedding"]] if st.embedding else []) + (
            [kinds["head"]] if st.head else [])
        terms["transient: ZeRO-3 gathered parameters"] = float(e * max(sum(p.numel for p in ps) for ps in layers))
    return StageMemory(st.index, {key: float(v) for key, v in terms.items()}, {"gradients"}, in_flight,
                       layout.accumulation, per_micro, {})
