"""Step time: GEMMs at a measured fraction of the device's peak, attention at megalite's measured flash-attention
throughput, memory-bound kernels at measured fractions of HBM bandwidth, the critical-path collectives at the links'
bandwidths; and the model FLOPs per token the training log's MFU and the plan's both count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megalite.config import Config, Layout, count_parameters
from megalite.plan.communication import Collective, transfer_seconds
from megalite.plan.devices import EFFICIENCY, Device
from megalite.plan.experts import active_mlp_matrices, moe_pointwise_bytes
from megalite.plan.layout import Settings
from megalite.plan.stages import Stage, layer_params, numel


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


def attention_fraction(seq: int, head_dim: int) -> float:
    """megalite's flash attention at `seq` tokens and `head_dim`, as a fraction of the peak (measured table)."""
    table = EFFICIENCY["attention"][min(EFFICIENCY["attention"], key=lambda d: abs(d - head_dim))]
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
    return value / EFFICIENCY["attention_peak"]


@dataclass
class StageTime:
    """Seconds for one micro-batch on one stage, by part, and the FLOPs it executes."""

    matmul: float
    attention: float
    memory_bound: float
    tp_comm: float
    pp_comm: float
    flops: float
    weight_grad: float = 0.0  # the blocks' weight-gradient matmuls (part of `matmul`): what ZB-H1 defers

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.memory_bound + self.tp_comm + self.pp_comm


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
    block = layer_params(m, tp)["block"]
    matrices = sum(p.numel for p in block if p.decay)
    flops = 2 * N * matrices * (2 + fwd) * (L - stage.moe_blocks)
    if stage.moe_blocks:  # the router, top_k experts and the shared experts in place of the dense MLP
        attention = sum(p.numel for p in block if p.decay and not p.name.startswith("mlp."))
        flops += 2 * N * (attention + active_mlp_matrices(m, tp)) * (2 + fwd) * stage.moe_blocks
    if stage.head:
        flops += 2 * N * v_l * h * (3 + (1 if s.loss_chunk_tokens else 0))
    matmul = flops / (EFFICIENCY["matmul"] * peak)
    weight_grad = 2 * N * matrices * L / (EFFICIENCY["matmul"] * peak)

    attention = 0.0
    scores = 0.0  # bytes of score-matrix traffic (materialized attention only)
    if s.attention == "materialized":  # QK^T and AV as matmuls over the whole T x T, softmax in memory
        att_flops = 4 * B * T * T * att_heads * hd * (2 + fwd) * L
        matmul += att_flops / (EFFICIENCY["matmul"] * peak)
        drop = m.attention_dropout > 0
        per_score = fwd * (4 * e + (2 * e + 1 if drop else 0)) + 7 * e + (2 * e + 1 if drop else 0)
        scores = B * att_heads * T * T * per_score * L
        flops += att_flops
    elif L:
        att_flops = 2 * B * T * T * att_heads * hd * (2.5 + fwd) * L  # causal: half the 4*B*H*T^2*D of full attention
        attention = att_flops / (attention_fraction(T, hd) * peak)
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
    if stage.embedding:
        pointwise += 4 * Ns * h * e
    if stage.head:
        per_logit = 32 + e + 20 + e + (32 + e if s.loss_chunk_tokens else 0) + (8 if m.z_loss > 0 else 0)
        pointwise += N * v_l * per_logit + (2 * 2 + 3) * Ns * h * e
    hbm = device.hbm_tbps * 1e12
    memory_bound = (norm_fwd * L / (EFFICIENCY["norm_forward"] * hbm) + norm_bwd * L / (EFFICIENCY["norm_backward"] * hbm)
                    + pointwise / (EFFICIENCY["copy"] * hbm))
    # Context- and expert-parallel all-to-alls sit on the critical path like TP's collectives: charged with them.
    tp_comm = sum(transfer_seconds(c, device) for c in comms if c.group in ("TP", "CP", "EP")) / layout.accumulation
    pp_comm = sum(transfer_seconds(c, device) for c in comms if c.group == "PP") / layout.accumulation
    return StageTime(matmul, attention, memory_bound, tp_comm, pp_comm, flops, weight_grad)


def optimizer_seconds(stage: Stage, layout: Layout, s: Settings, device: Device) -> float:
    """The optimizer step and its gradient bookkeeping: memory-bound passes over the states this GPU owns."""
    n = numel(stage.params)
    owned = n if s.path in ("none", "bf16_ddp", "fp16_optimizer") else n / layout.replicas
    per_owned = 28 + (6 if s.element != 4 else 0)  # Adam: read/write master and moments, read gradient; copy back
    if s.optimizer_state_bytes == 4:
        per_owned = 20
    traffic = owned * per_owned
    if s.path == "bf16_optimizer":  # bf16 gradients added into fp32 every micro-batch; norm and clip over all
        traffic += n * (10 * layout.accumulation + 12)
    else:
        traffic += owned * 12
    return traffic / (EFFICIENCY["copy"] * device.hbm_tbps * 1e12)
