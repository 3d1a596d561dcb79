"""What each pipeline stage holds: every parameter tensor as one tensor-parallel rank holds it, and the layers
DeepSpeed gives each stage (its own partitioning algorithms, reproduced)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megalite.config import Config, ModelConfig
from megalite.plan.experts import experts_held, experts_split, moe_mlp_tensors


@dataclass(frozen=True)
class Param:
    """One parameter tensor as a TP rank holds it."""

    name: str
    numel: int
    decay: bool  # in the weight-decay group (matrices that are not embedding tables)
    expert: bool = False  # an expert weight split over the expert-parallel group (states over its replicas / ep)


def layer_params(m: ModelConfig, tp: int, experts: int = 0, split: bool = False) -> dict[str, list[Param]]:
    """Each kind of layer's parameters on one TP rank, as megalite's model allocates them; with model.moe also
    "moe_block", a layer whose MLP is an MoE block holding `experts` experts (split over an expert-parallel group when
    `split`: megalite.plan.experts)."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    q, kv = m.num_heads * d, m.kv_heads * d
    v_local = m.padded_vocab_size // tp
    qkv_local, fc_local = (q + 2 * kv) // tp, (2 * f if m.mlp == "swiglu" else f) // tp

    def norm(prefix: str) -> list[Param]:
        out = [Param(prefix + ".weight", h, False)]
        return out + ([Param(prefix + ".bias", h, False)] if m.norm == "layernorm" else [])

    def linear(prefix: str, rows: int, cols: int, bias: int) -> list[Param]:
        return [Param(prefix + ".weight", rows * cols, True)] + ([Param(prefix + ".bias", bias, False)] if m.bias else [])

    block = (norm("norm1") + linear("attention.qkv", qkv_local, h, qkv_local) + linear("attention.proj", h, q // tp, h)
             + norm("norm2") + linear("mlp.fc", fc_local, h, fc_local) + linear("mlp.proj", h, f // tp, h))
    if m.qk_norm == "head":  # one weight of head_dim each, replicated
        block += [Param("attention.q_norm.weight", d, False), Param("attention.k_norm.weight", d, False)]
    elif m.qk_norm == "projection":  # over the whole projections: each rank its heads' slice
        block += [Param("attention.q_norm.weight", q // tp, False), Param("attention.k_norm.weight", kv // tp, False)]
    embedding = [Param("embedding.word.weight", v_local * h, False)]
    if m.position == "learned":
        embedding.append(Param("embedding.position.weight", m.max_position_embeddings * h, False))
    head = [] if m.tied_embeddings else [Param("output", v_local * h, True)]
    kinds = {"embedding": embedding, "block": block, "final_norm": norm("final_norm"), "head": head}
    if m.moe is not None:
        attention = [p for p in block if not p.name.startswith("mlp.")]
        kinds["moe_block"] = attention + [Param(*t) for t in moe_mlp_tensors(m, tp, experts or m.moe.num_experts,
                                                                             split)]
    return kinds


def numel(params: Any) -> int:
    """Elements of a list of parameters."""
    return sum(p.numel for p in params)


def pipeline_layers(m: ModelConfig, tp: int, experts: int = 0, split: bool = False) -> list[tuple[str, list[Param]]]:
    """DeepSpeed's layer list (model/pipeline.py): embedding, blocks (MoE blocks where model.moe says), final norm,
    output (tied: the embedding again)."""
    kinds = layer_params(m, tp, experts, split)
    last = ("embedding", kinds["embedding"]) if m.tied_embeddings else ("head", kinds["head"])
    blocks = [("moe_block", kinds["moe_block"]) if m.is_moe_layer(i) else ("block", kinds["block"])
              for i in range(m.num_layers)]
    return [("embedding", kinds["embedding"])] + blocks + [("final_norm", kinds["final_norm"]), last]


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_balanced` (the linear partition problem) with the same results,
    tie-breaking included; its inner loop vectorised so that --search stays fast."""
    import numpy as np

    n = len(weights)
    if n <= parts:
        return partition_uniform(n, parts)
    prefix = np.zeros(n + 1)
    prefix[1:] = np.cumsum(weights)
    dp_max = np.full((n + 1, parts + 1), np.inf)
    dp_min = np.full((n + 1, parts + 1), np.inf)
    position = np.zeros((n + 1, parts + 1), dtype=int)
    dp_max[0, 0] = 0.0
    for i in range(1, n + 1):
        seg = prefix[i] - prefix[:i]  # the weight of items k..i-1, for every k < i
        for j in range(1, min(i, parts) + 1):
            hi = np.maximum(dp_max[:i, j - 1], seg)
            lo = np.minimum(dp_min[:i, j - 1], seg)
            cost = hi - lo
            # DeepSpeed takes each k whose cost is <= the best so far: the last one at the minimum wins.
            k = i - 1 - int(np.argmax((cost == cost.min())[::-1]))
            dp_max[i, j], dp_min[i, j], position[i, j] = hi[k], lo[k], k
    out = [n]
    for j in range(parts, 0, -1):
        out.append(int(position[out[-1], j]))
    return out[::-1]


def partition_uniform(items: int, parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_uniform`."""
    if items <= parts:
        return [min(p, items) for p in range(parts + 1)]
    chunk, residual = divmod(items, parts)
    bounds = [p * chunk for p in range(parts + 1)]
    for i in range(residual):
        for j in range(i + 1, parts + 1):
            bounds[j] += 1
    return bounds


@dataclass(frozen=True)
class Stage:
    """What one pipeline stage holds."""

    index: int
    blocks: int
    embedding: bool  # the first layer (token and position embeddings)
    head: bool  # final norm, output layer and loss
    params: tuple[Param, ...]
    numel: int = 0
    moe_blocks: int = 0  # of `blocks`, those whose MLP is an MoE block

    @property
    def kind(self) -> tuple[int, bool, bool, int, int]:
        """Stages of the same kind hold the same layers: the same bytes per micro-batch and the same time."""
        return self.blocks, self.embedding, self.head, self.numel, self.moe_blocks


_BOUNDS: dict[tuple, list[int]] = {}
_STAGES: dict[tuple, list[Stage]] = {}


def stages(cfg: Config, tp: int, pp: int) -> list[Stage]:
    """The stages as DeepSpeed partitions megalite's pipeline layers (parallel.pipeline_partition)."""
    m = cfg.model
    shape = (m.padded_vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.kv_heads, m.ffn_size,
             m.max_position_embeddings, m.norm, m.mlp, m.position, m.bias, m.tied_embeddings, m.head_dim, m.qk_norm)
    moe = None if m.moe is None else (repr(m.moe), m.expert_ffn_size, m.shared_ffn_size, experts_held(cfg),
                                      experts_split(cfg))
    key = (shape, moe, cfg.parallel.pipeline_partition, tp, pp)
    if key not in _STAGES:
        _STAGES[key] = _partition(cfg, tp, pp)
    return _STAGES[key]


def _partition(cfg: Config, tp: int, pp: int) -> list[Stage]:
    m = cfg.model
    layers = pipeline_layers(m, tp, experts_held(cfg), experts_split(cfg)) if m.moe else pipeline_layers(m, tp)
    if pp == 1:
        if cfg.model.tied_embeddings:
            layers = layers[:-1]  # without a pipeline the output layer is the embedding itself
        bounds = [0, len(layers)]
    else:
        uniform = cfg.parallel.pipeline_partition == "uniform"
        weights = [int(kind in ("block", "moe_block")) for kind, _ in layers] if uniform else \
            [numel(ps) for _, ps in layers]
        key = (tuple(weights), pp)
        if key not in _BOUNDS:
            _BOUNDS[key] = partition_balanced(weights, pp)  # loop.py: "type:BlockPipe" or "parameters"
        bounds = _BOUNDS[key]
    out = []
    for s in range(pp):
        mine = layers[bounds[s]:bounds[s + 1]]
        params = tuple(p for _, ps in mine for p in ps)
        out.append(Stage(s, sum(kind in ("block", "moe_block") for kind, _ in mine), bounds[s] == 0 and bool(mine),
                         bounds[s + 1] == len(layers) and bool(mine), params, numel(params),
                         sum(kind == "moe_block" for kind, _ in mine)))
    return out
