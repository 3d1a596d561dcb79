"""Values derived from a validated config: the resolved DeepSpeed dict, parameter counts, the summary
that `megalite config show` prints and a run logs at start."""

from __future__ import annotations

import copy

from megalite.config.schema import Config, ModelConfig


def resolve_deepspeed(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed dict handed to deepspeed.initialize, with the batch arithmetic filled in."""
    ds = copy.deepcopy(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.global_batch_size(world_size)
    return ds


def count_parameters(m: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of the megalite model for this shape, computed without allocating.

    `active` counts what one token uses: the dense weights and, in each MoE layer, the router, top_k routed experts
    and the shared experts (what MFU counts for an MoE model); for a dense model it equals `total`.
    """
    h, f, layers, v = m.hidden_size, m.ffn_size, m.num_layers, m.padded_vocab_size
    q, kv = m.num_heads * m.head_dim, m.kv_heads * m.head_dim
    norm = h * (2 if m.norm == "layernorm" else 1)
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) + h if m.bias else 0)
    attn += {"head": 2 * m.head_dim, "projection": q + kv}.get(m.qk_norm or "", 0)

    def mlp(width: int, bias: bool) -> int:
        n = (3 * h * width) if m.mlp == "swiglu" else (2 * h * width)
        return n + ((2 * width if m.mlp == "swiglu" else width) + h if bias else 0)

    block = attn + 2 * norm
    moe_layers = m.num_moe_layers
    total_layers = active_layers = (layers - moe_layers) * (block + mlp(f, m.bias))
    if moe_layers:
        moe = m.moe
        expert = mlp(m.expert_ffn_size, False)  # experts have no biases
        shared = mlp(m.shared_ffn_size, m.bias) if m.shared_ffn_size else 0
        router = moe.num_experts * h
        total_layers += moe_layers * (block + router + moe.num_experts * expert + shared)
        active_layers += moe_layers * (block + router + moe.top_k * expert + shared)
    embedding = v * h
    positions = m.max_position_embeddings * h if m.position == "learned" else 0
    output = 0 if m.tied_embeddings else v * h
    non_embedding = total_layers + norm
    return {
        "total": non_embedding + embedding + positions + output,
        "non_embedding": non_embedding,
        "embedding": embedding + positions + output,
        "active": active_layers + norm + embedding + positions + output,
    }


def summary(cfg: Config, world_size: int) -> dict:
    """Derived values shown by `megalite config show` and logged at start."""
    counts = count_parameters(cfg.model)
    gb = cfg.global_batch_size(world_size)
    return {
        "world_size": world_size,
        "data_parallel": cfg.dp_size(world_size),
        "tensor_parallel": cfg.parallel.tensor,
        "context_parallel": cfg.parallel.context,
        "expert_parallel": cfg.parallel.expert,
        "pipeline_parallel": cfg.parallel.pipeline,
        "pipeline_schedule": cfg.parallel.pipeline_schedule,  # the order of the stages' passes (not saved state)
        # Global ranks: TP innermost (adjacent ranks), then CP, then DP, then PP (megalite.parallel.grid).
        "rank_order": "tensor, context, data, pipeline (innermost first)",
        "global_batch_size": gb,
        "tokens_per_step": gb * cfg.data.seq_length,
        "padded_vocab_size": cfg.model.padded_vocab_size,
        "parameters": counts["total"],
        "non_embedding_parameters": counts["non_embedding"],
        "active_parameters": counts["active"],
        "precision": cfg.precision,
        "fp8": cfg.model.fp8.recipe if cfg.model.fp8 else None,  # the FP8 recipe of the blocks' linears
        "zero_stage": cfg.zero_stage,
    }
