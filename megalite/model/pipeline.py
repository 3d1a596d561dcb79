"""The same model as DeepSpeed pipeline layers: LayerSpec/TiedLayerSpec lists for a PipelineModule.

Layers, in order: embedding, one per block, final norm, output head (with tied embeddings the head is
a TiedLayerSpec of the embedding under the key 'embed', so DeepSpeed keeps the two copies equal and sums
their gradients). Between stages flows the tuple (hidden (B, T or T/tp, H), position_ids (B, T)); the
head returns this rank's logits (B, T, Vp/tp) and `PipelineLoss` turns them into the fp32 mean loss.

Each layer initialises itself from the canonical parameter names (`layers.{i}.…`), so a pipeline built
with the same seed holds exactly the weights of `build_model` at any PP and TP degree.

    specs = pipeline_specs(model_cfg, parallel_cfg, grid, seed)
    module = PipelineModule(specs, topology=grid.topology, loss_fn=PipelineLoss(model_cfg, grid),
                            partition_method="type:BlockPipe")
Batches are ((input_ids, position_ids), (labels, loss_mask)); position_ids may be omitted (input_ids alone).

With context parallelism every rank of a context group gets the whole sequence's batch; the embedding keeps this
rank's chunk of ids and positions (the hidden states and positions between stages are the chunk's, the document
ids the whole sequence's) and the loss keeps the chunk's labels and mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from megalite.config import ModelConfig, ParallelConfig, check_model
from megalite.model import context_parallel_group, expert_parallel_group, replicate_experts, tensor_parallel_group
from megalite.model.transformer import (
    Block,
    Embedding,
    Norm,
    lm_logits,
    lm_loss,
    lm_loss_chunked,
    rope_cos_sin,
    rope_frequencies,
    training_z_loss,
)
from megalite.model.weights import (
    initialize_parameters,
    load_buffers,
    load_full_tensors,
    model_buffers,
    set_init,
    set_tensor_parallel_attributes,
)
from megalite.parallel.context import context_chunk
from megalite.parallel.mappings import group_size

# (hidden, position_ids) or (hidden, position_ids, document_ids): what passes between pipeline stages.
Activations = tuple[torch.Tensor, ...]
HEAD = "output"  # the untied head's one parameter, under the whole model's name


class _Canonical:
    """Mixin: map this layer's parameter names to the whole model's names (its prefix is its entry of
    `layer_order`)."""

    canonical_prefix = ""

    def canonical_name(self, name: str) -> str:
        return _whole_model_name(self.canonical_prefix, name)


class EmbeddingPipe(_Canonical, Embedding):
    """First stage: (input_ids[, position_ids[, document_ids]]) -> (hidden, position_ids[, document_ids])."""

    canonical_prefix = "embedding."

    def __init__(self, cfg: ModelConfig, sp: bool, grid: Any, seed: int) -> None:
        group = tensor_parallel_group(grid)
        self.context_group = context_parallel_group(grid)
        check_model(cfg, group_size(group), group_size(self.context_group))
        super().__init__(cfg, group, sp)
        self.max_positions = cfg.max_position_embeddings
        self.loss_chunk_tokens = cfg.loss_chunk_tokens
        initialize_parameters(self, seed, group, self.canonical_name)

    def forward(self, inputs: Union[torch.Tensor, tuple]) -> Union[Activations, torch.Tensor]:  # type: ignore[override]
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            # The tied output head on the last stage: hidden states in, this rank's logits out. The same module
            # serves both ends (rather than a TiedLayerSpec forward_fn) because DeepSpeed saves and loads only
            # layers that are modules: a forward_fn layer's weights would silently be left out of checkpoints.
            # With model.loss_chunk_tokens the loss function applies the head itself, chunk by chunk.
            return inputs if self.loss_chunk_tokens else tied_head_forward(self, inputs)
        ids, pos, *docs = (inputs, None) if isinstance(inputs, torch.Tensor) else inputs
        b, t = ids.shape
        if pos is None:
            pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
        ids, pos = context_chunk(ids, self.context_group), context_chunk(pos, self.context_group)
        return (super().forward(ids, pos), pos, *docs)


class BlockPipe(_Canonical, Block):
    """One Transformer block on (hidden, position_ids[, document_ids])."""

    def __init__(self, cfg: ModelConfig, sp: bool, grid: Any, seed: int, index: int,
                 aux_loss_scale: float = 1.0) -> None:
        group = tensor_parallel_group(grid)
        super().__init__(cfg, group, sp, context_group=context_parallel_group(grid), index=index,
                         expert_group=expert_parallel_group(grid), replicate_experts=replicate_experts(grid),
                         aux_loss_scale=aux_loss_scale)
        self.canonical_prefix = f"layers.{index}."
        self.rope_config = cfg if cfg.position == "rope" else None
        initialize_parameters(self, seed, group, self.canonical_name)

    def forward(self, inputs: Activations) -> Activations:  # type: ignore[override]
        x, pos, *docs = inputs
        cos = sin = None
        if self.rope_config is not None:
            cos, sin = rope_cos_sin(pos, rope_frequencies(self.rope_config, x.device), x.dtype)
        return (super().forward(x, cos, sin, None, 0, docs[0] if docs else None), pos, *docs)


class FinalNormPipe(_Canonical, Norm):
    """(hidden, position_ids[, document_ids]) -> normalised hidden."""

    canonical_prefix = "final_norm."

    def __init__(self, cfg: ModelConfig, sp: bool, grid: Any, seed: int) -> None:
        group = tensor_parallel_group(grid)
        super().__init__(cfg, group, sp)
        initialize_parameters(self, seed, group, self.canonical_name)

    def forward(self, inputs: Activations) -> torch.Tensor:  # type: ignore[override]
        return super().forward(inputs[0])


class HeadPipe(_Canonical, torch.nn.Module):
    """Untied output projection: hidden -> this rank's logits (B, T, Vp/tp)."""

    canonical_prefix = HEAD

    def __init__(self, cfg: ModelConfig, sp: bool, grid: Any, seed: int) -> None:
        super().__init__()
        self.group, self.vocab_size = tensor_parallel_group(grid), cfg.vocab_size
        self.sequence_parallel = sp and group_size(self.group) > 1
        local = cfg.padded_vocab_size // group_size(self.group)
        self.weight = torch.nn.Parameter(torch.empty(local, cfg.hidden_size))
        self.loss_chunk_tokens = cfg.loss_chunk_tokens
        set_tensor_parallel_attributes(self.weight, True, 0)
        set_init(self.weight, "normal", cfg.init_std)
        initialize_parameters(self, seed, self.group, self.canonical_name)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.loss_chunk_tokens:  # the loss function applies this head itself, chunk by chunk
            return h
        return lm_logits(h, self.weight, self.vocab_size, self.group, self.sequence_parallel)


def tied_head_forward(embedding: EmbeddingPipe, h: torch.Tensor) -> torch.Tensor:
    """The output projection through the (tied) token embedding on the last stage."""
    return lm_logits(h, embedding.word.weight, embedding.word.vocab_size, embedding.group,
                     embedding.sequence_parallel)


class PipelineLoss:
    """loss_fn for PipelineModule: (logits shard, labels or (labels, loss_mask)) -> fp32 mean loss.

    With model.loss_chunk_tokens the last stage hands over hidden states instead, and the loss applies
    the output layer chunk by chunk (`lm_loss_chunked`); `bind(module)` tells it where that layer is.
    """

    def __init__(self, cfg: ModelConfig, grid: Any = None, context_grad_scale: float = 1.0) -> None:
        self.vocab_size, self.group = cfg.vocab_size, tensor_parallel_group(grid)
        self.context_group = context_parallel_group(grid)
        # How the engine combines the context ranks' gradients: 1 when it sums them, cp when it averages them
        # (megalite.parallel.context; the engine's value: megalite.engine.build.context_grad_scale).
        self.context_grad_scale = context_grad_scale
        self.loss_chunk_tokens, self.z_loss = cfg.loss_chunk_tokens, cfg.z_loss
        self.head: Optional[Union[HeadPipe, EmbeddingPipe]] = None
        self.__name__ = "PipelineLoss"

    def bind(self, module: torch.nn.Module) -> None:
        """Find this stage's output layer (the untied head, or the tied embedding at the last stage)."""
        for sub in module.modules():
            if isinstance(sub, (HeadPipe, EmbeddingPipe)):
                self.head = sub  # the last one: on the last stage, its head

    def __call__(self, outputs: torch.Tensor, labels: Union[torch.Tensor, tuple]) -> torch.Tensor:
        mask: Optional[torch.Tensor] = None
        if not isinstance(labels, torch.Tensor):
            labels, mask = labels[0], labels[1]
        labels = context_chunk(labels, self.context_group)
        mask = context_chunk(mask, self.context_group) if mask is not None else None
        z_loss = training_z_loss(self.z_loss)
        cp = {"context_group": self.context_group, "context_grad_scale": self.context_grad_scale}
        if not self.loss_chunk_tokens:
            return lm_loss(outputs, labels, mask, self.vocab_size, self.group, z_loss, **cp)
        if self.head is None:
            raise RuntimeError("PipelineLoss with loss_chunk_tokens needs bind(pipeline_module) before use")
        weight = self.head.weight if isinstance(self.head, HeadPipe) else self.head.word.weight
        return lm_loss_chunked(outputs, weight, labels, mask, self.vocab_size, self.group,
                               self.head.sequence_parallel, self.loss_chunk_tokens, z_loss, **cp)


def layer_order(cfg: ModelConfig) -> list[str]:
    """The pipeline's layers in order, each as the canonical name prefix of its parameters: 'embedding.',
    'layers.0.', ..., 'final_norm.', then HEAD (untied) or 'embedding.' again (the tied copy on the last
    stage, whose weight is the embedding's). The one description of layer order: `pipeline_specs` builds
    from it and checkpoint consolidation reads DeepSpeed's per-layer files by it."""
    last = "embedding." if cfg.tied_embeddings else HEAD
    return ["embedding.", *(f"layers.{i}." for i in range(cfg.num_layers)), "final_norm.", last]


def pipeline_specs(
    cfg: ModelConfig, parallel_cfg: Optional[ParallelConfig] = None, grid: Any = None, seed: int = 1234,
    aux_loss_scale: float = 1.0,
) -> list:
    """LayerSpec/TiedLayerSpec list of the model for `deepspeed.pipe.PipelineModule` (`aux_loss_scale`: the MoE
    blocks' balancing-loss gradient, as in megalite.model.transformer.Transformer)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # DeepSpeed's own pipeline types: needed only here

    sp = bool(parallel_cfg and parallel_cfg.sequence_parallel)
    specs: list = []
    for prefix in layer_order(cfg):
        if prefix == "embedding." and cfg.tied_embeddings:
            specs.append(TiedLayerSpec("embed", EmbeddingPipe, cfg, sp, grid, seed, tied_weight_attr=["word.weight"]))
        elif prefix == "embedding.":
            specs.append(LayerSpec(EmbeddingPipe, cfg, sp, grid, seed))
        elif prefix.startswith("layers."):
            specs.append(LayerSpec(BlockPipe, cfg, sp, grid, seed, int(prefix.split(".")[1]), aux_loss_scale))
        elif prefix == "final_norm.":
            specs.append(LayerSpec(FinalNormPipe, cfg, sp, grid, seed))
        else:
            specs.append(LayerSpec(HeadPipe, cfg, sp, grid, seed))
    return specs


TIED_EMBEDDING = "tied_modules.embed."  # DeepSpeed's name of the TiedLayerSpec "embed" in a PipelineModule


def _whole_model_name(prefix: str, name: str) -> str:
    """A layer's parameter under the whole model's name: its `layer_order` prefix, then its own name (the untied head
    has one parameter, the whole model's HEAD)."""
    return HEAD if prefix == HEAD else prefix + name


def canonical_name(name: str, cfg: ModelConfig) -> str:
    """The whole model's name of the parameter a PipelineModule of `cfg` calls `name` (its state dict and DeepSpeed's
    optimizer files use these names): layer i's parameters (`{i}.…`) take `layer_order(cfg)[i]` as prefix, the tied
    embedding's (`tied_modules.embed.…`) 'embedding.'."""
    if name.startswith(TIED_EMBEDDING):
        return "embedding." + name[len(TIED_EMBEDDING):]
    index, _, rest = name.partition(".")
    return _whole_model_name(layer_order(cfg)[int(index)], rest)


def canonical_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under the whole model's names: a pipeline stage's layers map theirs (the tied
    embedding once), a Transformer's already are.

    With tied embeddings the last stage holds a copy of the whole embedding module; only its `word.weight`
    is used (and kept equal by DeepSpeed), so take `embedding.position.weight` from stage 0.
    """
    out: dict[str, torch.nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, _Canonical):
            for name, p in sub.named_parameters():
                out.setdefault(sub.canonical_name(name), p)
    return out or dict(module.named_parameters())


def canonical_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's persistent buffers (the routers' expert bias) under the whole model's names, like
    `canonical_parameters`."""
    out: dict[str, torch.Tensor] = {}
    for sub in module.modules():
        if isinstance(sub, _Canonical):
            for name, b in model_buffers(sub, sub.canonical_name).items():
                out.setdefault(name, b)
    if any(isinstance(sub, _Canonical) for sub in module.modules()):
        return out
    return model_buffers(module)


@torch.no_grad()
def load_pipeline_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], grid: Any = None) -> None:
    """Copy a full canonical state dict (e.g. `load_hf_state`'s, read lazily) into this stage's shards, and the
    buffers it holds."""
    params, buffers = canonical_parameters(module), canonical_buffers(module)
    missing = [name for name in [*params, *buffers] if name not in state]
    if missing:
        raise KeyError(f"state dict lacks {missing}")
    load_full_tensors(params, state, tensor_parallel_group(grid))
    load_buffers(buffers, state)
