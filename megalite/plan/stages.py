"""What each pipeline stage holds: every parameter tensor as one tensor-parallel rank holds it, and the layers
DeepSpeed gives each stage (its own partitioning algorithms, reproduced).

A stage's parameters are kept as each layer kind's tensors with a repeat count (`ParamSet`), and the stages are cut
from the layer counts, so planning a layout costs the same at 100 or 100,000 layers. DeepSpeed's balanced
partitioning is a dynamic programme whose cost grows as layers^2 x stages: it is reproduced exactly up to
`EXACT_PARTITION_WORK`, beyond which (a thousand layers and more) `partition_blocks` cuts the stages in closed form
instead and the plan says so (`Stage.exact`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ParamSet:
    """Parameter tensors with repeats: each layer kind's tensors once, with the number of such layers. Sums cost the
    same at any depth; iterating yields every tensor (a list of 12 x layers `Param`s, for small models and tests)."""

    groups: tuple[tuple[tuple[Param, ...], int], ...] = ()

    def __iter__(self) -> Iterator[Param]:
        for params, count in self.groups:
            for _ in range(count):
                yield from params

    def __len__(self) -> int:
        return sum(len(params) * count for params, count in self.groups)

    @functools.cached_property
    def numel(self) -> int:
        return sum(sum(p.numel for p in params) * count for params, count in self.groups)

    @functools.cached_property
    def decay_numel(self) -> int:
        return sum(sum(p.numel for p in params if p.decay) * count for params, count in self.groups)

    def numel_at_most(self, threshold: float) -> int:
        """Elements of the tensors of at most `threshold` elements each (ZeRO-3's persistent parameters)."""
        return sum(sum(p.numel for p in params if p.numel <= threshold) * count for params, count in self.groups)


def numel(params: Iterable[Param]) -> int:
    """Elements of a list of parameters."""
    return params.numel if isinstance(params, ParamSet) else sum(p.numel for p in params)


def decay_numel(params: Iterable[Param]) -> int:
    """Elements of the parameters in the weight-decay group."""
    return params.decay_numel if isinstance(params, ParamSet) else sum(p.numel for p in params if p.decay)


def numel_at_most(params: Iterable[Param], threshold: float) -> int:
    """Elements of the parameters of at most `threshold` elements each."""
    if isinstance(params, ParamSet):
        return params.numel_at_most(threshold)
    return sum(p.numel for p in params if p.numel <= threshold)


def pipeline_layers(m: ModelConfig, tp: int, experts: int = 0, split: bool = False) -> list[tuple[str, list[Param]]]:
    """DeepSpeed's layer list (model/pipeline.py): embedding, blocks (MoE blocks where model.moe says), final norm,
    output (tied: the embedding again)."""
    return [(kind, params) for kind, params, count in _layer_runs(m, tp, experts, split) for _ in range(count)]


BLOCK_KINDS = ("block", "moe_block")


def _layer_runs(m: ModelConfig, tp: int, experts: int = 0, split: bool = False) -> list[tuple[str, list[Param], int]]:
    """`pipeline_layers` as runs of identical layers: (kind, parameters, how many in a row)."""
    kinds = layer_params(m, tp, experts, split)
    last = ("embedding", kinds["embedding"]) if m.tied_embeddings else ("head", kinds["head"])
    return ([("embedding", kinds["embedding"], 1)] + _block_runs(m, kinds)
            + [("final_norm", kinds["final_norm"], 1), (*last, 1)])


def _block_runs(m: ModelConfig, kinds: dict[str, list[Param]]) -> list[tuple[str, list[Param], int]]:
    """The blocks as runs: dense, or model.moe's pattern (the first dense layers, then every layer_interval-th an MoE
    block), consecutive layers of a kind merged into one run."""
    if m.moe is None:
        return [("block", kinds["block"], m.num_layers)]
    first, every = min(m.moe.first_dense_layers, m.num_layers), m.moe.layer_interval
    pattern = [("block", every - 1), ("moe_block", 1)] * ((m.num_layers - first) // every) + \
        [("block", (m.num_layers - first) % every)]
    runs: list[tuple[str, list[Param], int]] = []
    for kind, n in [("block", first)] + pattern:
        if not n:
            continue
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], runs[-1][2] + n)
        else:
            runs.append((kind, kinds[kind], n))
    return runs


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_balanced` (the linear partition problem) with the same results,
    tie-breaking included; vectorised over k and the part count so that --search stays fast. Its cost grows as
    len(weights)^2 x parts (see `EXACT_PARTITION_WORK`)."""
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
        top = min(i, parts)
        seg = (prefix[i] - prefix[:i])[:, None]  # the weight of items k..i-1, for every k < i
        hi = np.maximum(dp_max[:i, :top], seg)  # column j - 1 serves part count j
        lo = np.minimum(dp_min[:i, :top], seg)
        cost = hi - lo
        # DeepSpeed takes each k whose cost is <= the best so far: the last one at the minimum wins.
        k = i - 1 - np.argmax((cost == cost.min(axis=0))[::-1], axis=0)
        columns = np.arange(top)
        dp_max[i, 1:top + 1], dp_min[i, 1:top + 1] = hi[k, columns], lo[k, columns]
        position[i, 1:top + 1] = k
    out = [n]
    for j in range(parts, 0, -1):
        out.append(int(position[out[-1], j]))
    return out[::-1]


# Up to this many (layers^2 x stages) the stages are DeepSpeed's own partition_balanced (about 0.1 s each here; a
# search runs one per tensor-parallel degree and stage count); beyond it, weight-balanced boundaries. Every shipped
# and published model is far below: 126 layers over 16 stages is 2.6e5, 200 layers over 128 stages 5.1e6.
EXACT_PARTITION_WORK = 10**7


def partition_blocks(embedding: float, block: float, blocks: int, final_norm: float, last: float,
                     parts: int) -> list[int]:
    """Stage boundaries over the layer list [embedding, `blocks` x block, final norm, last] (their weights), for
    layer counts where DeepSpeed's partition_balanced would take too long, in time independent of `blocks`.

    The same objective as DeepSpeed's (the least spread between the heaviest and the lightest stage) over the
    partitions its results have: the embedding with b0 blocks, then stages of equal blocks (the first ones one more),
    then bl blocks with the final norm and the last layer. b0 and bl are tried near where the first and last stages
    weigh what a middle stage does; ties go to the smaller heaviest stage, the fewest blocks in any stage, a fuller
    first stage. Against partition_balanced on 1,478 random layer lists of 10-300 layers over 2-32 stages
    (tests/test_plan_inputs.py checks a sample), 91% were identical, the heaviest stage was never more than 0.2%
    heavier and no stage held more blocks than DeepSpeed's fullest."""
    if parts == 1:
        return [0, blocks + 3]
    middles = parts - 2
    unit = block or 1e-300
    if parts == 2:
        centre = (blocks * block + final_norm + last - embedding) / (2 * unit)
        pairs = {(b0, blocks - b0) for b0 in {min(max(x, 0), blocks) for x in
                                               range(math.floor(centre) - 2, math.ceil(centre) + 3)} | {0, blocks}}
    else:
        # the middle stages' block count q when the first, the last, both or neither stage also holds blocks
        centres = [(blocks + (embedding + final_norm + last) / unit) / parts,
                   (blocks + (final_norm + last) / unit) / (parts - 1), (blocks + embedding / unit) / (parts - 1),
                   blocks / middles]
        near = {q for c in centres for q in range(max(0, math.floor(c) - 2), math.ceil(c) + 3)}
        firsts = {min(max(x, 0), blocks - middles) for q in near
                  for x in (math.floor(q - embedding / unit), math.ceil(q - embedding / unit))} | {0}
        lasts = {max(x, 0) for q in near
                 for x in (math.floor(q - (final_norm + last) / unit), math.ceil(q - (final_norm + last) / unit))}
        pairs = {(b0, min(bl, blocks - middles - b0)) for b0 in firsts for bl in lasts | {0}}
    best: tuple = ()
    for b0, bl in pairs:
        base, extra = divmod(blocks - b0 - bl, middles) if middles else (0, 0)
        middle = ([base] + ([base + 1] if extra else [])) if middles else []
        weights = [embedding + b0 * block, bl * block + final_norm + last] + [x * block for x in middle]
        key = (max(weights) - min(weights), max(weights), max([b0, bl] + middle), -b0, bl)
        if not best or key < best[0]:
            best = (key, b0, bl)
    _, b0, bl = best
    bounds = [0, 1 + b0]
    base, extra = divmod(blocks - b0 - bl, middles) if middles else (0, 0)
    for i in range(middles):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds + [blocks + 3]


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
    params: ParamSet | tuple[Param, ...]
    numel: int = 0
    exact: bool = True  # False: cut by partition_blocks, not by DeepSpeed's own partitioning (too slow)
    moe_blocks: int = 0  # of `blocks`, those whose MLP is an MoE block

    @property
    def kind(self) -> tuple[int, bool, bool, int, int]:
        """Stages of the same kind hold the same layers: the same bytes per micro-batch and the same time."""
        return self.blocks, self.embedding, self.head, self.numel, self.moe_blocks


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


@functools.lru_cache(maxsize=256)
def _balanced_bounds(weights: tuple[int, ...], parts: int) -> tuple[int, ...]:
    return tuple(partition_balanced(list(weights), parts))


def moe_layers_before(m: ModelConfig, layers: int) -> int:
    """MoE layers among the first `layers` layers (model.moe's rule in closed form: layer i has experts when
    i >= first_dense_layers and (i - first_dense_layers + 1) is a multiple of layer_interval)."""
    if m.moe is None:
        return 0
    return max(0, layers - m.moe.first_dense_layers) // m.moe.layer_interval


def _partition(cfg: Config, tp: int, pp: int) -> list[Stage]:
    m = cfg.model
    kinds = layer_params(m, tp, experts_held(cfg), experts_split(cfg)) if m.moe else layer_params(m, tp)
    last = kinds["embedding"] if m.tied_embeddings else kinds["head"]
    with_last = not (pp == 1 and m.tied_embeddings)  # without a pipeline the output layer is the embedding itself
    blocks = m.num_layers
    count = blocks + 2 + with_last  # embedding, blocks, final norm[, output]
    exact = True
    if pp == 1:
        bounds: tuple[int, ...] | list[int] = (0, count)
    else:
        if cfg.parallel.pipeline_partition == "uniform":  # loop.py: "type:BlockPipe" or "parameters"
            w_embedding = w_final = w_last = 0
            w_dense = w_moe = 1
        else:
            w_embedding, w_final, w_last = numel(kinds["embedding"]), numel(kinds["final_norm"]), numel(last)
            w_dense, w_moe = numel(kinds["block"]), numel(kinds.get("moe_block", ()))
        if count * count * pp <= EXACT_PARTITION_WORK:
            weights = ((w_embedding,) + tuple(w_moe if m.is_moe_layer(i) else w_dense for i in range(blocks))
                       + (w_final, w_last))
            bounds = _balanced_bounds(weights, pp)
        else:  # blocks of one weight (an MoE pattern with dense layers among its blocks: their mean weight)
            moe = moe_layers_before(m, blocks)
            block = (w_dense * (blocks - moe) + w_moe * moe) / blocks
            bounds, exact = partition_blocks(w_embedding, block, blocks, w_final, w_last, pp), False
    out = []
    for s in range(pp):
        lo, hi = bounds[s], bounds[s + 1]
        # The stage's layers are [lo, hi): blocks [a, b) of the model's; each kind's tensors once with their count.
        a, b = min(max(lo - 1, 0), blocks), min(max(hi - 1, 0), blocks)
        moe = moe_layers_before(m, b) - moe_layers_before(m, a)
        counts = [(kinds["embedding"], int(lo == 0 < hi)), (kinds["block"], b - a - moe),
                  (kinds.get("moe_block", []), moe), (kinds["final_norm"], int(lo <= blocks + 1 < hi)),
                  (last, int(with_last and lo <= blocks + 2 < hi))]
        held = ParamSet(tuple((tuple(params), n) for params, n in counts if n and params))
        out.append(Stage(s, b - a, lo == 0 < hi, hi == count and hi > lo, held, held.numel, exact, moe))
    return out


def expert_part(params: Iterable[Param], experts: bool = True) -> ParamSet:
    """The expert weights split over an expert-parallel group among `params` (with `experts=False`, the others), as
    a ParamSet (their own ZeRO groups: megalite.plan.memory)."""
    groups = params.groups if isinstance(params, ParamSet) else ((tuple(params), 1),)
    kept = ((tuple(p for p in ps if p.expert == experts), n) for ps, n in groups)
    return ParamSet(tuple((ps, n) for ps, n in kept if ps))
