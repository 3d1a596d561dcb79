"""A decoder-only Transformer (GPT-2 and Llama families) built from tensor-parallel layers.

Layout, said once: activations between blocks are (B, T, H), batch first. With sequence
parallelism they are (B, T/tp, H) -- each TP rank holds a contiguous chunk of the sequence --
between the row-parallel exit of one attention/MLP and the column-parallel entry of the next,
so norms, dropout and residual adds run on 1/tp of the tokens. Attention tensors are (B, heads, T, D).
Logits are this rank's vocabulary slice (B, T, Vp/tp) unless gathered. With context parallelism (a context
group of cp ranks) every T above is this rank's contiguous chunk T/cp of the sequence, except inside attention
(megalite.parallel.context) and in the document ids, which are the whole sequence's.

Attention and norms go through `megalite.kernels` only, so the kernel backend is one switch. The blocks' linears
run their matmuls in float8 where `model.fp8` lists them (`fp8_recipe`; the parallel layers do the rest).

Mixture-of-Experts: on the layers `model.moe` names, the block's MLP is an MoE block (megalite.model.moe: router,
routed experts split over an expert-parallel group, shared experts); the model learns of expert parallelism only
through the expert group it hands to that block's parallel layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from megalite import kernels
from megalite.config import ModelConfig, ParallelConfig, check_model
from megalite.errors import DataError
from megalite.model.moe import MoE
from megalite.parallel.context import ContextParallelAttention, context_chunk, context_parallel_mean, gather_context
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.fp8 import Float8Recipe
from megalite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_init,
    set_tensor_parallel_attributes,
)
from megalite.parallel.mappings import (
    Group,
    all_reduce_both_ways,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    group_rank,
    group_size,
    sync_grad_across_tensor_parallel,
)
from megalite.parallel.random import checkpoint, model_parallel_rng


def fp8_recipe(cfg: ModelConfig, layer: str) -> Optional[Float8Recipe]:
    """The FP8 recipe of the block linear `layer` ('attention.qkv', ...; model.fp8.layers), None when it runs in the
    run's precision."""
    if cfg.fp8 is None or layer not in cfg.fp8.layers:
        return None
    return Float8Recipe.named(cfg.fp8.recipe)


def _replicated(p: torch.nn.Parameter, init: str, std: float = 0.0) -> torch.nn.Parameter:
    set_tensor_parallel_attributes(p, False)
    set_init(p, init, std)
    return p


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm through megalite.kernels; replicated weights."""

    def __init__(self, cfg: ModelConfig, group: Group, sequence_parallel: bool, device=None, dtype=None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.kind, self.eps, self.group = cfg.norm, cfg.norm_eps, group
        # On sequence shards each rank's weight gradient covers only its tokens: sum it across TP.
        self.sequence_parallel = sequence_parallel and group_size(group) > 1
        self.weight = _replicated(torch.nn.Parameter(torch.empty(h, device=device, dtype=dtype)), "ones")
        self.weight.sequence_parallel = self.sequence_parallel
        if cfg.norm == "layernorm":
            self.bias = _replicated(torch.nn.Parameter(torch.empty(h, device=device, dtype=dtype)), "zeros")
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.sequence_parallel:
            w = sync_grad_across_tensor_parallel(w, self.group)
            b = sync_grad_across_tensor_parallel(b, self.group) if b is not None else None
        if self.kind == "layernorm":
            return kernels.layer_norm(x, w, b, self.eps)
        return kernels.rms_norm(x, w, self.eps)


def rope_frequencies(cfg: ModelConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """RoPE inverse frequencies (D/2,) in fp32 with `cfg.rope_scaling` applied, computed as Hugging Face does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    r = cfg.rope_scaling
    if r is None:
        return inv_freq
    if r.type == "linear":
        return inv_freq / r.factor
    # llama3: wavelengths longer than original/low_freq_factor positions are stretched by `factor`, those
    # shorter than original/high_freq_factor kept, and the band between interpolated.
    wavelength = 2 * math.pi / inv_freq
    original = r.original_max_position_embeddings
    smooth = (original / wavelength - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    blended = (1 - smooth) * inv_freq / r.factor + smooth * inv_freq
    stretched = torch.where(wavelength > original / r.low_freq_factor, inv_freq / r.factor, blended)
    return torch.where(wavelength < original / r.high_freq_factor, inv_freq, stretched)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, D) for rotate-half RoPE (the Hugging Face Llama convention)."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, D/2), fp32 like HF
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by the position tables."""
    return x * cos + _rotate_half(x) * sin


@dataclass
class KVCache:
    """Keys and values of past positions, one (k, v) pair per layer: (B, KVH/tp, max_len, D)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions filled (advanced by the model after the last layer)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


class QKNorm(torch.nn.Module):
    """RMSNorm of queries or keys before RoPE (model.qk_norm). 'head': over each head's vector, one weight of head_dim
    shared by the heads (Qwen3); 'projection': over the token's whole projection of `heads` heads, a weight per
    feature (OLMoE), split across TP like the heads (the sum of squares is added over the group)."""

    def __init__(self, cfg: ModelConfig, heads: int, group: Group, device=None, dtype=None) -> None:
        super().__init__()
        self.kind, self.eps, self.group = cfg.qk_norm, cfg.norm_eps, group
        self.tp = group_size(group)
        if self.kind == "head":
            self.weight = _replicated(torch.nn.Parameter(torch.empty(cfg.head_dim, device=device, dtype=dtype)), "ones")
        else:
            self.features = heads * cfg.head_dim
            local = self.features // self.tp
            self.weight = torch.nn.Parameter(torch.empty(local, device=device, dtype=dtype))
            set_tensor_parallel_attributes(self.weight, True, 0)
            set_init(self.weight, "ones")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, local heads, D)."""
        if self.kind == "head":
            # Every rank's heads use the one weight: its gradient is summed over the tensor-parallel group.
            w = sync_grad_across_tensor_parallel(self.weight, self.group) if self.tp > 1 else self.weight
            return kernels.rms_norm(x, w, self.eps)
        shape = x.shape
        xf = x.reshape(*shape[:2], -1).float()
        squares = all_reduce_both_ways(xf.pow(2).sum(-1, keepdim=True), self.group)
        y = xf * torch.rsqrt(squares / self.features + self.eps)
        return (self.weight * y.to(x.dtype)).view(shape)


class Attention(torch.nn.Module):
    """Causal self-attention, heads split across TP ranks (whole KV heads per rank); with a context group, over the
    whole sequence of which this rank holds a chunk."""

    def __init__(self, cfg: ModelConfig, group: Group, sequence_parallel: bool, device=None, dtype=None,
                 context_group: Group = None) -> None:
        super().__init__()
        tp = group_size(group)
        self.head_dim = cfg.head_dim
        self.heads, self.kv_heads = cfg.num_heads // tp, cfg.kv_heads // tp  # local
        q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2: scale residual-output projections
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, q + 2 * kv, bias=cfg.bias, group=group, sequence_parallel=sequence_parallel,
            segments=[q, kv, kv], init_std=cfg.init_std, fp8=fp8_recipe(cfg, "attention.qkv"), device=device,
            dtype=dtype,
        )
        self.proj = RowParallelLinear(
            q, cfg.hidden_size, bias=cfg.bias, group=group, sequence_parallel=sequence_parallel,
            init_std=out_std, fp8=fp8_recipe(cfg, "attention.proj"), device=device, dtype=dtype,
        )
        self.q_norm = self.k_norm = None
        if cfg.qk_norm is not None:
            self.q_norm = QKNorm(cfg, cfg.num_heads, group, device, dtype)
            self.k_norm = QKNorm(cfg, cfg.kv_heads, group, device, dtype)
        self.context = None  # attention over a sequence split across the context group
        if group_size(context_group) > 1:
            self.context = ContextParallelAttention(kernels.attention, context_group, self.heads, self.kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, T, (h + 2 kvh) * D), h/kvh local heads; T full even with sequence parallelism
        b, t, _ = qkv.shape
        d = self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k = q.view(b, t, self.heads, d), k.view(b, t, self.kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, h, T, D)
        k = k.transpose(1, 2)  # (B, kvh, T, D)
        v = v.view(b, t, self.kv_heads, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scale = 1.0 / math.sqrt(d)
        if cache is None:
            attend = kernels.attention if self.context is None else self.context
            y = attend(q, k, v, causal=True, scale=scale, document_ids=document_ids)
        else:
            y = self._cached(q, k, v, cache, layer, scale)
        y = y.transpose(1, 2).reshape(b, t, self.heads * d)  # (B, T, h*D)
        return self.proj(y)

    def _cached(self, q, k, v, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
        start, t = cache.length, q.shape[2]
        if start + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} + {t} do not fit")
        cache.keys[layer][:, :, start : start + t] = k
        cache.values[layer][:, :, start : start + t] = v
        keys = cache.keys[layer][:, :, : start + t]  # (B, kvh, start+T, D)
        values = cache.values[layer][:, :, : start + t]
        # The kernel aligns the causal mask bottom-right: new query i sees cached positions and itself.
        return kernels.attention(q, keys, values, causal=True, scale=scale)


class MLP(torch.nn.Module):
    """GELU (tanh approximation, as GPT-2) or SwiGLU feed-forward, hidden units split across TP (`ffn` of them: the
    model's ffn size unless given, as for an MoE block's shared experts)."""

    def __init__(self, cfg: ModelConfig, group: Group, sequence_parallel: bool, device=None, dtype=None,
                 ffn: Optional[int] = None) -> None:
        super().__init__()
        f = ffn or cfg.ffn_size
        self.swiglu = cfg.mlp == "swiglu"
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        # SwiGLU fuses gate and up projections as two blocks, each split across ranks.
        self.fc = ColumnParallelLinear(
            cfg.hidden_size, 2 * f if self.swiglu else f, bias=cfg.bias, group=group,
            sequence_parallel=sequence_parallel, segments=[f, f] if self.swiglu else None,
            init_std=cfg.init_std, fp8=fp8_recipe(cfg, "mlp.fc"), device=device, dtype=dtype,
        )
        self.proj = RowParallelLinear(
            f, cfg.hidden_size, bias=cfg.bias, group=group, sequence_parallel=sequence_parallel,
            init_std=out_std, fp8=fp8_recipe(cfg, "mlp.proj"), device=device, dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, f/tp) or (B, T, 2f/tp)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)  # (B, T, H) or (B, T/tp, H)


class Block(torch.nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); layer `index`'s MLP is an MoE block where
    `model.moe` says so (its experts split over `expert_group`; every rank holding all of them if
    `replicate_experts`)."""

    def __init__(self, cfg: ModelConfig, group: Group, sequence_parallel: bool, device=None, dtype=None,
                 context_group: Group = None, index: int = 0, expert_group: Group = None,
                 replicate_experts: bool = False, aux_loss_scale: float = 1.0) -> None:
        super().__init__()
        self.norm1 = Norm(cfg, group, sequence_parallel, device, dtype)
        self.attention = Attention(cfg, group, sequence_parallel, device, dtype, context_group)
        self.norm2 = Norm(cfg, group, sequence_parallel, device, dtype)
        if cfg.is_moe_layer(index):
            shared = MLP(cfg, group, sequence_parallel, device, dtype, cfg.shared_ffn_size) if cfg.shared_ffn_size \
                else None
            self.mlp: torch.nn.Module = MoE(cfg, group, sequence_parallel, device, dtype, context_group=context_group,
                                            expert_group=expert_group, replicate_experts=replicate_experts,
                                            shared=shared, layer=index, aux_loss_scale=aux_loss_scale)
        else:
            self.mlp = MLP(cfg, group, sequence_parallel, device, dtype)
        self.dropout = cfg.hidden_dropout
        # Dropout on sequence shards must differ per TP rank; on replicated activations it must not.
        self.split_rng = sequence_parallel and group_size(group) > 1

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        with model_parallel_rng(self.split_rng):
            return F.dropout(x, self.dropout, training=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: Optional[torch.Tensor] = None,
        sin: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        rope = (cos, sin) if cos is not None else None
        x = x + self._drop(self.attention(self.norm1(x), rope, cache, layer, document_ids))
        return x + self._drop(self.mlp(self.norm2(x)))


class Embedding(torch.nn.Module):
    """Token embedding (vocabulary-parallel) plus learned positions; dropout."""

    def __init__(self, cfg: ModelConfig, group: Group, sequence_parallel: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel and group_size(group) > 1
        self.word = VocabParallelEmbedding(
            cfg.padded_vocab_size, cfg.hidden_size, vocab_size=cfg.vocab_size, group=group,
            sequence_parallel=sequence_parallel, init_std=cfg.init_std, device=device, dtype=dtype,
        )
        self.max_positions = cfg.max_position_embeddings
        if cfg.position == "learned":
            self.position = torch.nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, device=device, dtype=dtype)
            _replicated(self.position.weight, "normal", cfg.init_std)
            self.position.weight.sequence_parallel = self.sequence_parallel
        else:
            self.position = None
        self.dropout = cfg.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids)  # (B, T, H), or (B, T/tp, H) reduce-scattered with sequence parallelism
        if self.position is not None:
            if self.sequence_parallel:
                chunk = x.shape[1]
                r = group_rank(self.group)
                position_ids = position_ids[:, r * chunk : (r + 1) * chunk]
                w = sync_grad_across_tensor_parallel(self.position.weight, self.group)
            else:
                w = self.position.weight
            x = x + F.embedding(position_ids, w)
        if self.training and self.dropout > 0.0:
            with model_parallel_rng(self.sequence_parallel):
                x = F.dropout(x, self.dropout, training=True)
        return x


class Transformer(torch.nn.Module):
    """The decoder-only language model holding this TP rank's shards (and, with a context group, working on this
    rank's chunk of each sequence)."""

    def __init__(
        self,
        cfg: ModelConfig,
        parallel: Optional[ParallelConfig] = None,
        group: Group = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        context_group: Group = None,
        context_grad_scale: float = 1.0,
        expert_group: Group = None,
        replicate_experts: bool = False,
        aux_loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelConfig()
        check_model(cfg, group_size(group), group_size(context_group))  # config owns the rules
        self.config, self.parallel_config, self.group = cfg, parallel, group
        self.context_group = context_group if group_size(context_group) > 1 else None
        # How the engine combines the context ranks' gradients: 1 when it sums them, cp when it averages them
        # (megalite.parallel.context; the engine's value: megalite.engine.build.context_grad_scale).
        self.context_grad_scale = context_grad_scale
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        sp = parallel.sequence_parallel and self.tp_size > 1
        self.sequence_parallel = sp
        self.embedding = Embedding(cfg, group, sp, device, dtype)
        # aux_loss_scale: the gradient the MoE blocks' balancing losses get (megalite.model.moe; the engine's value:
        # megalite.engine.moe.aux_loss_scale)
        self.layers = torch.nn.ModuleList(Block(cfg, group, sp, device, dtype, self.context_group, i, expert_group,
                                                replicate_experts, aux_loss_scale) for i in range(cfg.num_layers))
        self.final_norm = Norm(cfg, group, sp, device, dtype)
        if cfg.tied_embeddings:
            self.register_parameter("output", None)
        else:
            local = cfg.padded_vocab_size // self.tp_size
            self.output = torch.nn.Parameter(torch.empty(local, cfg.hidden_size, device=device, dtype=dtype))
            set_tensor_parallel_attributes(self.output, True, 0)
            set_init(self.output, "normal", cfg.init_std)

    # ---------------------------------------------------------------- pieces (also used by the pipeline)
    def output_weight(self) -> torch.Tensor:
        """This rank's (Vp/tp, H) output matrix (the token embedding when tied)."""
        return self.embedding.word.weight if self.output is None else self.output

    def positions(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor], start: int = 0) -> torch.Tensor:
        """Default position ids start..start+T-1, checked against the model's range."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=input_ids.device).unsqueeze(0).expand(b, t)
        if self.config.position == "learned" and t and int(position_ids.max()) >= self.max_positions:
            raise DataError(
                f"position {int(position_ids.max())} is beyond model.max_position_embeddings={self.max_positions}"
            )
        return position_ids

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def logits(self, h: torch.Tensor, gather: bool = False) -> torch.Tensor:
        """Final hidden states (B, T or T/tp, H) -> this rank's logits (B, T, Vp/tp), padding never predicted."""
        logits = lm_logits(h, self.output_weight(), self.config.vocab_size, self.group, self.sequence_parallel)
        return gather_from_tensor_parallel(logits, self.group) if gather else logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """fp32 mean cross-entropy over tokens with a nonzero mask (labels < 0 are ignored too), plus the
        z-loss term while training (model.z_loss)."""
        return lm_loss(logits, labels, loss_mask, self.config.vocab_size, self.group, training_z_loss(self.config.z_loss),
                       self.context_group, self.context_grad_scale)

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty cache for incremental decoding of up to `max_len` positions."""
        p = self.embedding.word.weight
        device, dtype = device or p.device, dtype or p.dtype
        kvh = self.config.kv_heads // self.tp_size
        shape = (batch_size, kvh, max_len, self.config.head_dim)
        n = self.config.num_layers
        return KVCache(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
        )

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        gather_logits: bool = False,
        start_pos: Optional[int] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss (fp32 scalar) when `labels` is given, else logits (B, T, Vp/tp), or (B, T, Vp) if gathered.

        With a context group every rank passes the whole sequence (every input (B, T)); the model keeps this rank's
        chunk, and returns the loss over all the sequence's tokens, or the whole sequence's logits. With `kv_cache`, positions continue from `kv_cache.length` (or `start_pos`, which rewinds the cache
        to that length first) and the cache is advanced by T. `document_ids` (B, T) confines attention to
        runs of equal ids (packed documents; data.reset_attention_mask).
        """
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if kv_cache is not None and self.sequence_parallel:
            raise ValueError("incremental decoding with a KV cache needs parallel.sequence_parallel off")
        if kv_cache is not None and self.context_group is not None:
            raise ValueError("incremental decoding with a KV cache runs at parallel.context=1")
        if document_ids is not None and (kv_cache is not None or tuple(document_ids.shape) != (b, t)):
            raise DataError(f"document_ids must be (batch, seq) = {(b, t)} and not used with a KV cache, got "
                            f"{tuple(document_ids.shape)}")
        cp = group_size(self.context_group)
        if t % cp or (self.sequence_parallel and (t // cp) % self.tp_size):
            raise DataError(f"sequence length {t} must be divisible by parallel.context={cp}"
                            + (f" x parallel.tensor={self.tp_size} with sequence parallelism" if self.sequence_parallel
                               else ""))
        if kv_cache is not None and start_pos is not None:
            if not 0 <= start_pos <= kv_cache.length:
                raise ValueError(f"start_pos {start_pos} is outside the cached 0..{kv_cache.length} positions")
            kv_cache.length = start_pos
        start = kv_cache.length if kv_cache is not None else 0
        position_ids = self.positions(input_ids, position_ids, start)
        if self.context_group is not None:  # this rank's chunk; attention sees the whole sequence's document ids
            input_ids, position_ids = context_chunk(input_ids, self.context_group), context_chunk(position_ids, self.context_group)
            labels = context_chunk(labels, self.context_group) if labels is not None else None
            loss_mask = context_chunk(loss_mask, self.context_group) if loss_mask is not None else None
        x = self.embedding(input_ids, position_ids)  # (B, T, H) or (B, T/tp, H)
        cos = sin = None
        if self.config.position == "rope":
            cos, sin = rope_cos_sin(position_ids, rope_frequencies(self.config, x.device), x.dtype)
        ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.layers):
            if ckpt:
                x = checkpoint(block, x, cos, sin, None, i, document_ids, dropout=self.config.hidden_dropout > 0)
            else:
                x = block(x, cos, sin, kv_cache, i, document_ids)
        if kv_cache is not None:
            kv_cache.length += t
        x = self.final_norm(x)
        if labels is not None and self.config.loss_chunk_tokens:
            return lm_loss_chunked(x, self.output_weight(), labels, loss_mask, self.config.vocab_size, self.group,
                                   self.sequence_parallel, self.config.loss_chunk_tokens,
                                   training_z_loss(self.config.z_loss), self.context_group, self.context_grad_scale)
        logits = self.logits(x, gather=gather_logits and labels is None)
        if labels is None:
            return logits if self.context_group is None else gather_context(logits, self.context_group)
        return self.loss(logits, labels, loss_mask)


def _head_input(h: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """(B, T or T/tp, H) -> (B, T, H) on every TP rank, with the backward that sums the ranks' partial grads."""
    if sequence_parallel and group_size(group) > 1:
        return gather_from_sequence_parallel(h, group, dim=1)  # backward reduce-scatters
    return copy_to_tensor_parallel(h, group)  # backward sums the partial input gradients


def _mask_padding(logits: torch.Tensor, vocab_size: int, group: Group) -> torch.Tensor:
    """This rank's logits with the padded vocabulary rows set to the lowest value: padding never wins."""
    local = logits.shape[-1]
    start = group_rank(group) * local
    if start + local > vocab_size:
        padded = torch.arange(start, start + local, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, torch.finfo(logits.dtype).min)
    return logits


def lm_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int, group: Group,
              sequence_parallel: bool) -> torch.Tensor:
    """(B, T or T/tp, H) hidden states -> (B, T, Vp/tp) logits of this rank's vocabulary rows; padding never wins."""
    return _mask_padding(F.linear(_head_input(h, group, sequence_parallel), weight), vocab_size, group)


def _token_mask(labels: torch.Tensor, loss_mask: Optional[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """fp32 weights of the tokens that count (labels < 0 never do); DataError for a label beyond the vocabulary."""
    mask = (labels >= 0).float() if loss_mask is None else loss_mask.float() * (labels >= 0).float()
    bad = (labels >= vocab_size) & (mask > 0)
    if bool(bad.any()):
        raise DataError(f"label {int(labels[bad].flatten()[0])} is outside the vocabulary (vocab_size={vocab_size})")
    return mask


def training_z_loss(z_loss: float) -> float:
    """The z-loss coefficient to apply now: it regularises training only, so evaluation (no gradients) reports
    the plain cross-entropy."""
    return z_loss if torch.is_grad_enabled() else 0.0


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor], vocab_size: int,
            group: Group, z_loss: float = 0.0, context_group: Group = None,
            context_grad_scale: float = 1.0) -> torch.Tensor:
    """fp32 mean cross-entropy (+ z_loss * lse^2) of vocab-parallel logits over tokens with a nonzero mask;
    labels < 0 are ignored. With a context group: over the tokens of every rank's chunk (each counted once)."""
    mask = _token_mask(labels, loss_mask, vocab_size)
    per_token = vocab_parallel_cross_entropy(logits, labels.clamp(min=0), group, z_loss)  # (B, T) fp32
    return context_parallel_mean((per_token * mask).sum(), mask.sum(), context_group, context_grad_scale)


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    vocab_size: int, group: Group, z_loss: float) -> torch.Tensor:
    logits = _mask_padding(F.linear(h, weight), vocab_size, group)  # (N, Vp/tp): one chunk only
    return (vocab_parallel_cross_entropy(logits, labels, group, z_loss) * mask).sum()


def lm_loss_chunked(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
                    vocab_size: int, group: Group, sequence_parallel: bool, chunk_tokens: int,
                    z_loss: float = 0.0, context_group: Group = None, context_grad_scale: float = 1.0) -> torch.Tensor:
    """`lm_loss(lm_logits(h, ...))` computed `chunk_tokens` tokens at a time, each chunk's logits recomputed in
    the backward: the (tokens, Vp/tp) logits and their fp32 softmax never exist whole (model.loss_chunk_tokens).
    """
    mask = _token_mask(labels, loss_mask, vocab_size)
    h = _head_input(h, group, sequence_parallel)
    h, labels, mask = h.reshape(-1, h.shape[-1]), labels.clamp(min=0).reshape(-1), mask.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_tokens):
        end = start + chunk_tokens
        # The collectives inside run again in the recompute, in the same order on every TP rank.
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss_sum, h[start:end], weight, labels[start:end], mask[start:end], vocab_size, group, z_loss,
            use_reentrant=False,
        )
    return context_parallel_mean(total, mask.sum(), context_group, context_grad_scale)
