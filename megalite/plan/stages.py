"""What each pipeline stage holds: every parameter tensor as one tensor-parallel rank holds it, and the layers
DeepSpeed gives each stage (its own partitioning algorithms, reproduced)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megalite.config import Config, ModelConfig


@dataclass(frozen=True)
class Param:
    """One parameter tensor as a TP rank holds it."""

    name: str
    numel: int
    decay: bool  # in the weight-decay group (matrices that are not embedding tables)


def layer_params(m: ModelConfig, tp: int) -> dict[str, list[Param]]:
    """Each kind of layer's parameters on one TP rank, as megalite's model allocates them."""
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
    embedding = [Param("embedding.word.weight", v_local * h, False)]
    if m.position == "learned":
        embedding.append(Param("embedding.position.weight", m.max_position_embeddings * h, False))
    head = [] if m.tied_embeddings else [Param("output", v_local * h, True)]
    return {"embedding": embedding, "block": block, "final_norm": norm("final_norm"), "head": head}


def numel(params: Any) -> int:
    """Elements of a list of parameters."""
    return sum(p.numel for p in params)


def pipeline_layers(m: ModelConfig, tp: int) -> list[tuple[str, list[Param]]]:
    """DeepSpeed's layer list (model/pipeline.py): embedding, blocks, final norm, output (tied: the embedding again)."""
    kinds = layer_params(m, tp)
    last = ("embedding", kinds["embedding"]) if m.tied_embeddings else ("head", kinds["head"])
    return ([("embedding", kinds["embedding"])] + [("block", kinds["block"])] * m.num_layers
            + [("final_norm", kinds["final_norm"]), last])


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

    @property
    def kind(self) -> tuple[int, bool, bool, int]:
        """Stages of the same kind hold the same layers: the same bytes per micro-batch and the same time."""
        return self.blocks, self.embedding, self.head, self.numel


_BOUNDS: dict[tuple, list[int]] = {}
_STAGES: dict[tuple, list[Stage]] = {}


def stages(cfg: Config, tp: int, pp: int) -> list[Stage]:
    """The stages as DeepSpeed partitions megalite's pipeline layers (parallel.pipeline_partition)."""
    m = cfg.model
    shape = (m.padded_vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.kv_heads, m.ffn_size,
             m.max_position_embeddings, m.norm, m.mlp, m.position, m.bias, m.tied_embeddings)
    key = (shape, cfg.parallel.pipeline_partition, tp, pp)
    if key not in _STAGES:
        _STAGES[key] = _partition(cfg, tp, pp)
    return _STAGES[key]


def _partition(cfg: Config, tp: int, pp: int) -> list[Stage]:
    layers = pipeline_layers(cfg.model, tp)
    if pp == 1:
        if cfg.model.tied_embeddings:
            layers = layers[:-1]  # without a pipeline the output layer is the embedding itself
        bounds = [0, len(layers)]
    else:
        uniform = cfg.parallel.pipeline_partition == "uniform"
        weights = [int(kind == "block") for kind, _ in layers] if uniform else [numel(ps) for _, ps in layers]
        key = (tuple(weights), pp)
        if key not in _BOUNDS:
            _BOUNDS[key] = partition_balanced(weights, pp)  # loop.py: "type:BlockPipe" or "parameters"
        bounds = _BOUNDS[key]
    out = []
    for s in range(pp):
        mine = layers[bounds[s]:bounds[s + 1]]
        params = tuple(p for _, ps in mine for p in ps)
        out.append(Stage(s, sum(kind == "block" for kind, _ in mine), bounds[s] == 0 and bool(mine),
                         bounds[s + 1] == len(layers) and bool(mine), params, numel(params)))
    return out
