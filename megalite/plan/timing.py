"""Step time: GEMMs at a measured fraction of the device's peak, attention at megalite's measured flash-attention
throughput, memory-bound kernels at measured fractions of HBM bandwidth, the critical-path collectives at the links'
bandwidths; and the model FLOPs per token the training log's MFU and the plan's both count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from megalite.config import Config, Layout, count_parameters
from megalite.plan.communication import Collective, Zero3Traffic, transfer_seconds
from megalite.plan.devices import EFFICIENCY, Device
from megalite.plan.experts import active_mlp_matrices, moe_pointwise_bytes
from megalite.plan.layout import Settings
from megalite.plan.stages import Stage, layer_params, numel

# DeepSpeed's engines, measured by `megalite bench pipeline-engine` (kernels/results/pipeline-engine-cpu-2026-12-06,
# checked against the committed JSON by tests/test_plan_engines.py):
# - BF16_Optimizer.update_hp_grads, which folds the bf16 gradients into the fp32 copy after every micro-batch, is
#   exactly a cast to fp32 and an add per tensor (it takes 1.00x the time of the same on one flat tensor): 18 bytes
#   per parameter of memory traffic (the cast reads 2 and writes 4, the add reads 8 and writes 4), bandwidth-bound on
#   a GPU (on this CPU the conversion is not: 35 bytes' worth at copy speed); before each backward the pipeline
#   engine zeroes the bf16 gradients (a 2-byte write);
# - the PipelineEngine's own host work (instruction dispatch, buffers, the sends' bookkeeping) is 1.51 ms per step
#   of its schedule (median over 2 and 4 stages, 1 to 8 micro-batches), two steps per micro-batch. The device runs
#   behind the host, so it costs time only where a micro-batch's device work is shorter.
# - Its blocking sends cost nothing beyond the transfer: its TrainSchedule, simulated with sends that wait for their
#   receiver, takes 1F1B's (m + p - 1) slots, and the measured steps agree.
BF16_BOOKKEEPING_BYTES = (2 + 4) + (8 + 4) + 2.0
ENGINE_HOST_S_PER_MICRO_BATCH = 2 * 1.51e-3


def flops_per_token(cfg: Config, attended_keys: Optional[float] = None) -> float:
    """Training FLOPs per token: 6N + 12*L*d*K (d the attention width, heads x head_dim; N non-embedding parameters a token uses: for an MoE model the active
    ones, top_k routed experts, the shared experts and the router of each MoE layer; recompute excluded).

    K is the keys a token attends to, counted as PaLM does (the whole window, causal or not): the sequence
    length, or with packed-document masking the mean length of a token's document (`attended_keys`).
    """
    counts = count_parameters(cfg.model)
    n = counts["active"] - counts["embedding"]  # = non_embedding for a dense model
    m = cfg.model
    keys = cfg.data.seq_length if attended_keys is None else attended_keys
    return 6.0 * n + 12.0 * m.num_layers * m.num_heads * m.head_dim * keys  # heads x head_dim: the hidden size,
    # unless model.attention_head_dim sets another width


def attention_fraction(seq: int, head_dim: int, efficiency: Optional[dict] = None) -> float:
    """megalite's flash attention at `seq` tokens and `head_dim`, as a fraction of the peak (a device's measured table:
    `Device.efficiency`; the H200's by default)."""
    eff = EFFICIENCY if efficiency is None else efficiency
    table = eff["attention"][min(eff["attention"], key=lambda d: abs(d - head_dim))]
    keys = sorted(table)
    if seq <= keys[0]:
        value = table[keys[0]] * seq / keys[0]  # shorter sequences run proportionally slower (fewer blocks)
    elif seq >= keys[-1]:
        value = table[keys[-1]]
    else:
        lo = max(k for k in keys if k <= seq)
        hi = min(k for k in keys if k >= seq)
        w = 0.0 if hi == lo else math.log(seq / lo) / math.log(hi / lo)
        value = table[lo] * (1 - w) + table[hi] * w
    return value / eff["attention_peak"]


@dataclass
class StageTime:
    """Seconds for one micro-batch on one stage, by part, and the FLOPs it executes."""

    matmul: float
    attention: float
    memory_bound: float
    tp_comm: float
    pp_comm: float
    flops: float
    forward_share: float = 1 / 3  # of matmul + attention + memory-bound + TP: the forward pass's (recompute is backward)
    host: float = 0.0  # the pipeline engine's host work per micro-batch (DeepSpeed's at PP > 1): exposed when longer
    weight_grad: float = 0.0  # the blocks' weight-gradient matmuls (part of `matmul`): what ZB-H1 defers

    @property
    def compute(self) -> float:
        """The device's work of the micro-batch, pipeline transfers aside."""
        return self.matmul + self.attention + self.memory_bound + self.tp_comm

    @property
    def host_exposed(self) -> float:
        """Host time the device waits for: the engine's host work beyond the micro-batch's device work."""
        return max(0.0, self.host - self.compute - self.pp_comm)

    @property
    def total(self) -> float:
        return self.compute + self.pp_comm + self.host_exposed


def stage_time(cfg: Config, layout: Layout, stage: Stage, s: Settings, device: Device,
               comms: list[Collective]) -> StageTime:
    """One micro-batch's forward and backward on one GPU of `stage`."""
    m = cfg.model
    e, tp, cp = s.element, layout.tensor, layout.context
    h, T, B = m.hidden_size, cfg.data.seq_length, layout.micro_batch
    N = B * T // cp  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    heads, kvh, hd = m.num_heads // tp, m.kv_heads // tp, m.head_dim
    f_l, v_l = m.ffn_size // tp, m.padded_vocab_size // tp
    att_heads = heads // cp  # attention runs over the whole sequence with heads / cp per rank
    L = stage.blocks
    fwd = 2 if s.recompute else 1  # forward passes over each block
    peak = device.peak(s.precision)
    eff = device.efficiency
    block = layer_params(m, tp)["block"]
    matrices = sum(p.numel for p in block if p.decay)
    flops = 2 * N * matrices * (2 + fwd) * (L - stage.moe_blocks)
    if stage.moe_blocks:  # the router, top_k experts and the shared experts in place of the dense MLP
        attention = sum(p.numel for p in block if p.decay and not p.name.startswith("mlp."))
        flops += 2 * N * (attention + active_mlp_matrices(m, tp)) * (2 + fwd) * stage.moe_blocks
    # FP8 linears run their matmuls at the device's FP8 peak (rowwise_with_gw_hp: the weight gradient in the run's
    # precision); attention, the output layer and everything else at the run's (an MoE block's experts too)
    fp8_flops = 0.0
    if s.fp8_recipe:
        fp8 = [p for p in block if p.decay and s.fp8(p.name.rsplit(".", 1)[0])]
        fp8_dense = sum(p.numel for p in fp8)
        fp8_attention = sum(p.numel for p in fp8 if not p.name.startswith("mlp."))
        passes = 2 + fwd - (1 if s.fp8_recipe == "rowwise_with_gw_hp" else 0)
        fp8_flops = 2 * N * (fp8_dense * (L - stage.moe_blocks) + fp8_attention * stage.moe_blocks) * passes
    if stage.head:
        flops += 2 * N * v_l * h * (3 + (1 if s.loss_chunk_tokens else 0))
    matmul = (flops - fp8_flops) / (eff["matmul"] * peak)
    if fp8_flops:
        matmul += fp8_flops / (eff["matmul_fp8"] * device.peak("fp8"))
    weight_grad = 2 * N * matrices * L / (eff["matmul"] * peak)
    # the attention core's forward passes: a selective recompute (other stacks') runs it again in the backward
    core_fwd = fwd + (1 if s.recompute_attention and not s.recompute else 0)

    attention = 0.0
    scores = 0.0  # bytes of score-matrix traffic (materialized attention only)
    if s.attention == "materialized":  # QK^T and AV as matmuls over the whole T x T, softmax in memory
        att_flops = 4 * B * T * T * att_heads * hd * (2 + core_fwd) * L
        matmul += att_flops / (eff["matmul"] * peak)
        drop = m.attention_dropout > 0
        per_score = core_fwd * (4 * e + (2 * e + 1 if drop else 0)) + 7 * e + (2 * e + 1 if drop else 0)
        scores = B * att_heads * T * T * per_score * L
        flops += att_flops
    elif L:
        att_flops = 2 * B * T * T * att_heads * hd * (2.5 + core_fwd) * L  # causal: half of 4*B*H*T^2*D
        attention = att_flops / (attention_fraction(T, hd, eff) * peak)
        flops += att_flops

    # Memory-bound kernels: bytes read and written, per block and micro-batch.
    norm_fwd = 2 * 2 * Ns * h * e * fwd
    norm_bwd = 2 * 3 * Ns * h * e
    act = (2 if m.mlp == "gelu" else 5) * N * f_l * e * fwd + (3 if m.mlp == "gelu" else 8) * N * f_l * e
    residual = 2 * 3 * Ns * h * e * (fwd + 1)
    rope = 8 * N * (heads + kvh) * hd * e * (fwd + 1) if m.position == "rope" else 0
    bias = ((heads + 2 * kvh) * hd + h + f_l * (2 if m.mlp == "swiglu" else 1) + h) * N * e if m.bias else 0
    copy = 2 * N * heads * hd * e * (fwd + 1) if s.attention == "materialized" else 0
    dropout = 2 * (2 * Ns * h * e + Ns * h) * (fwd + 1) if m.hidden_dropout > 0 else 0
    pointwise = (act + residual + rope + bias + copy + dropout) * L + scores
    if stage.moe_blocks:  # the experts' activation over their assignments and the moves of rows to and from them
        pointwise += stage.moe_blocks * (moe_pointwise_bytes(m, layout, s, N, fwd) - act)
    tp_bytes = sum(c.bytes for c in comms if c.group in ("TP", "CP", "EP")) / layout.accumulation
    pointwise += 2 * tp_bytes  # megalite's collectives copy their input (clone, chunk, cat; the all-to-all's permutes)
    if s.fp8_recipe:
        pointwise += fp8_cast_bytes(m, s, N, tp, fwd) * L
    if stage.embedding:
        pointwise += 4 * Ns * h * e
    if stage.head:
        per_logit = 32 + e + 20 + e + (32 + e if s.loss_chunk_tokens else 0) + (8 if m.z_loss > 0 else 0)
        pointwise += N * v_l * per_logit + (2 * 2 + 3) * Ns * h * e
    hbm = device.hbm_tbps * 1e12
    memory_bound = (norm_fwd * L / (eff["norm_forward"] * hbm) + norm_bwd * L / (eff["norm_backward"] * hbm)
                    + pointwise / (eff["copy"] * hbm))
    # Context- and expert-parallel all-to-alls sit on the critical path like TP's collectives: charged with them.
    tp_comm = sum(transfer_seconds(c, device) for c in comms if c.group in ("TP", "CP", "EP")) / layout.accumulation
    if s.tp_overlap:  # hidden behind the GEMMs they feed or follow (other stacks'; megalite's collectives wait)
        tp_comm = max(0.0, tp_comm - matmul)
    pp_comm = sum(transfer_seconds(c, device) for c in comms if c.group == "PP") / layout.accumulation
    # the forward's share: one of the (2 + fwd) matmul passes (a recompute runs in the backward), of attention's
    # (2.5 + fwd) (flash backward = 2.5 forwards), of the memory-bound passes alike, and the forward's collectives
    compute = matmul + attention + memory_bound + tp_comm
    forward = (matmul + memory_bound) / (2 + fwd) + attention / (2.5 + fwd) + tp_comm / (fwd + 1)
    host = ENGINE_HOST_S_PER_MICRO_BATCH if layout.pipeline > 1 and s.engine == "deepspeed" else 0.0
    return StageTime(matmul, attention, memory_bound, tp_comm, pp_comm, flops, forward / compute if compute else 1 / 3,
                     host, weight_grad)


def fp8_cast_bytes(m: Any, s: Settings, N: int, tp: int, fwd: int) -> float:
    """HBM bytes of one block's FP8 casts per micro-batch: each cast reads the operand for its amax, reads it again to
    scale it in fp32 (written and read: 8 bytes) and writes the e4m3 result: 2e + 9 bytes per element. Tensorwise
    casts the input and weight once per forward and the output gradient once; the rowwise recipes cast input and
    weight again along the other dimension in the backward and the output gradient twice."""
    e = s.element
    heads, kvh, hd, f_l, h = m.num_heads // tp, m.kv_heads // tp, m.head_dim, m.ffn_size // tp, m.hidden_size
    shapes = {"attention.qkv": (h, (heads + 2 * kvh) * hd), "attention.proj": (heads * hd, h),
              "mlp.fc": (h, (2 if m.mlp == "swiglu" else 1) * f_l), "mlp.proj": (f_l, h)}  # (in, out) per rank
    once = s.fp8_recipe == "tensorwise"
    total = 0.0
    for name, (d_in, d_out) in shapes.items():
        if not s.fp8(name):
            continue
        inputs = N * d_in * (fwd + (0 if once else 1))
        weights = d_in * d_out * (fwd + (0 if once else 1))
        grads = N * d_out * (1 if once else 2)
        total += (inputs + weights + grads) * (2 * e + 9)
    return total


def zero3_exposed_seconds(t: StageTime, z3: Zero3Traffic, accumulation: int, s: Settings, device: Device,
                          overlap: bool = True) -> float:
    """Seconds of a step ZeRO-3's traffic adds. With `overlap`, as DeepSpeed's schedule lets it hide: its parameter
    coordinator, from the second step on, prefetches the next module's parameters (up to stage3_prefetch_bucket_size
    elements, at least one parameter) when it reaches a module, on a stream of their own, so a pass's gathers run
    under that pass's compute except the first module's, which nothing precedes; with overlap_comm (ZeRO-3's
    default) gradients are reduce-scattered during the backward on another stream, sharing the network with the
    backward's gathers. Exposed per micro-batch: the first module's gather, what the forward's gathers need beyond the
    forward, what the backward's gathers and reduce-scatters need beyond the backward; then the persistent
    parameters' gathers after the step. A prefetch bucket of 0 turns prefetching off: every gather waits. Without
    `overlap`: all of it (what the published multi-GPU FSDP runs show; docs/plan.md)."""
    if not overlap:
        return (accumulation * (z3.gathers * transfer_seconds(z3.one_pass, device) + transfer_seconds(z3.reduce, device))
                + transfer_seconds(z3.persistent, device))
    one_pass = transfer_seconds(z3.one_pass, device)
    reduce = transfer_seconds(z3.reduce, device)
    forward_compute = t.compute * t.forward_share
    backward_compute = t.compute - forward_compute
    backward_gathers = one_pass * (z3.gathers - 1)
    hidden_reduce = reduce if s.overlap_comm else 0.0
    if s.prefetch_bucket > 0 and z3.modules:
        first = one_pass / z3.modules
        forward = first + max(0.0, one_pass - first - forward_compute)
        backward = max(0.0, backward_gathers + hidden_reduce - backward_compute)
    else:
        forward = one_pass
        backward = backward_gathers + max(0.0, hidden_reduce - backward_compute)
    backward += reduce - hidden_reduce
    return accumulation * (forward + backward) + transfer_seconds(z3.persistent, device)


def optimizer_seconds(stage: Stage, layout: Layout, s: Settings, device: Device) -> float:
    """The optimizer step and its gradient bookkeeping: memory-bound passes over the states this GPU owns."""
    n = numel(stage.params)
    owned = n if s.path in ("none", "bf16_ddp", "fp16_optimizer") else n / layout.replicas
    per_owned = 28 + (6 if s.element != 4 else 0)  # Adam: read/write master and moments, read gradient; copy back
    if s.optimizer_state_bytes == 4:
        per_owned = 20
    traffic = owned * per_owned
    if s.path == "bf16_optimizer" and s.engine == "deepspeed":
        # BF16_Optimizer: bf16 gradients zeroed before and folded into fp32 after every micro-batch; norm, clip
        traffic += n * (BF16_BOOKKEEPING_BYTES * layout.accumulation + 12)
    elif s.path == "bf16_optimizer":  # Megatron: accumulated into fp32 by the weight-gradient GEMMs; norm and clip
        traffic += n * 12
    else:
        traffic += owned * 12
    return traffic / (device.efficiency["copy"] * device.hbm_tbps * 1e12)
