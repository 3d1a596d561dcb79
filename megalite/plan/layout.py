"""What is planned: the run's `Layout` (megalite.config's one layout value) and `Settings`, the DeepSpeed, kernel and
model choices the cost model reads from a config besides the layout (activation recompute and loss chunking among
them: the search varies those too, but nothing outside the planner records them as part of a layout).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

from megalite.config import Config, Layout
from megalite.config.validate import zero0_precision_error
from megalite.dtypes import precision_bytes
from megalite.errors import ConfigError


def layout_of(cfg: Config, world_size: int) -> Layout:
    """The layout `cfg` describes at `world_size`. It does not validate: the config must have passed
    `config.validate(cfg, world_size)` (every command that plans does so once); a world size the degrees do not
    divide is refused here all the same, because nothing the plan computes from it would mean anything."""
    if world_size <= 0:
        raise ConfigError(f"--world-size: must be > 0, got {world_size}")
    layout = cfg.layout(world_size)
    if layout.world != world_size:
        p = cfg.parallel
        model_parallel = p.tensor * p.context * p.pipeline
        degrees = f"parallel.tensor x parallel.context x parallel.pipeline = {p.tensor} x {p.context} x {p.pipeline}"
        if world_size < model_parallel:
            raise ConfigError(f"world size {world_size} is too small: {degrees} needs at least {model_parallel} GPUs "
                              "(a multiple of it)")
        raise ConfigError(f"world size {world_size} is not divisible by {degrees}")
    return layout


def with_layout(cfg: Config, layout: Layout, recompute: bool, loss_chunk_tokens: int,
                pipeline_schedule: Optional[str] = None) -> Config:
    """A copy of `cfg` laid out as `layout`, with activation recompute, loss chunking and (when given) the pipeline
    schedule as given (same model, data and settings otherwise)."""
    new = copy.copy(cfg)
    new.parallel = dataclasses.replace(cfg.parallel, tensor=layout.tensor, pipeline=layout.pipeline,
                                       sequence_parallel=layout.sequence_parallel, context=layout.context,
                                       expert=layout.expert,
                                       pipeline_schedule=pipeline_schedule or cfg.parallel.pipeline_schedule)
    new.model = dataclasses.replace(cfg.model, activation_checkpointing=recompute, loss_chunk_tokens=loss_chunk_tokens)
    ds = dict(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch
    ds["gradient_accumulation_steps"] = layout.accumulation
    ds.pop("train_batch_size", None)
    ds["zero_optimization"] = {**(ds.get("zero_optimization") or {}), "stage": layout.zero_stage}
    new.deepspeed = ds
    return new


@dataclass(frozen=True)
class Settings:
    """The DeepSpeed, kernel and model choices the cost model needs, read from a Config (DeepSpeed 0.19 defaults)."""

    precision: str
    element: int  # bytes of a parameter / activation element
    grad_accum: int  # bytes of an accumulated gradient element
    zero_stage: int
    path: str  # the DeepSpeed wrapper holding model states: none | bf16_ddp | fp16_optimizer | bf16_optimizer | zero | zero3
    optimizer: str
    optimizer_state_bytes: int  # per parameter (Adam: two fp32 moments)
    reduce_bucket: int  # elements
    overlap_comm: bool
    persistence_threshold: int  # ZeRO-3: parameters this small stay whole on every rank
    sub_group_size: int  # ZeRO-3: the optimizer steps its partition this many elements at a time
    prefetch_bucket: int  # ZeRO-3, elements
    max_live_parameters: int  # ZeRO-3: gathered elements kept before releasing
    max_reuse_distance: int  # ZeRO-3: a gathered parameter used again within this many elements is kept
    offload_optimizer: bool
    attention: str  # triton | torch (megalite's kernels) | materialized (other systems: a T x T score matrix)
    platform: str = "cuda"  # cuda | cpu: where torch's own kernels run (they keep different tensors)
    recompute: bool = False  # model.activation_checkpointing: each block's activations rebuilt in the backward
    loss_chunk_tokens: int = 0  # model.loss_chunk_tokens: the output layer and loss computed in chunks (0: whole)
    # What a column-parallel layer keeps of its sequence-gathered input under sequence parallelism: megalite's keeps
    # the gathered input ("gathered"); Megatron-LM keeps its shard and gathers it again in the backward ("shard").
    sp_saved_input: str = "gathered"
    # ZeRO-3's gathers and reduce-scatters hidden behind compute as far as DeepSpeed's prefetch and overlap_comm allow
    # (True), or charged in full (False: what published multi-GPU FSDP runs show; `megalite plan --zero3-overlap`)
    zero3_overlap: bool = False
    # Planner-only assumptions for other stacks' runs (megalite has neither): selective recompute of the attention
    # core (Korthikanti et al. 2022: scores, softmax, dropout and the product with V rebuilt in the backward from the
    # saved q, k, v), and tensor-parallel collectives hidden behind the GEMMs next to them (Megatron-Core's
    # userbuffer overlap).
    recompute_attention: bool = False
    tp_overlap: bool = False
    # The engine that runs the micro-batches: "deepspeed" (megalite's: DeepSpeed's engines, with the PipelineEngine's
    # host cost per micro-batch at PP > 1 and BF16_Optimizer's fp32 gradient bookkeeping after each micro-batch) or
    # "megatron" (Megatron-LM's: neither; its fused weight-gradient GEMMs accumulate into fp32 directly).
    engine: str = "deepspeed"
    # model.fp8: the recipe ("" without FP8) and which block linears run their matmuls in float8
    fp8_recipe: str = ""
    fp8_layers: tuple[str, ...] = ()

    def describe(self, layout: Layout) -> str:
        """The layout's line with the choices the plan adds, e.g. '..., bf16, recompute, loss chunks of 4096'."""
        extra = (["recompute"] if self.recompute else []) + (
            [f"loss chunks of {self.loss_chunk_tokens}"] if self.loss_chunk_tokens else []) + (
            [f"FP8 {self.fp8_recipe} ({', '.join(self.fp8_layers)})"] if self.fp8_recipe else []) + (
            ["attention recomputed (selective)"] if self.recompute_attention else []) + (
            ["TP communication overlapped"] if self.tp_overlap else []) + (
            ["Megatron-LM's engine"] if self.engine == "megatron" else [])
        return ", ".join([layout.describe()] + extra)

    def fp8(self, layer: str) -> bool:
        """Whether the block linear `layer` ('attention.qkv', ...) runs its matmuls in float8."""
        return bool(self.fp8_recipe) and layer in self.fp8_layers

    @property
    def fp8_saves_fp8(self) -> bool:
        """The recipe keeps its forward's float8 input and weight for the backward (tensorwise: the same casts serve
        both); the rowwise recipes cast along other dimensions there and keep the high-precision input."""
        return self.fp8_recipe == "tensorwise"


PATH_NAMES = {"none": "torch optimizer, no ZeRO wrapper", "bf16_ddp": "FP16_Optimizer in bf16 (bf16 gradients)",
              "fp16_optimizer": "FP16_Optimizer", "bf16_optimizer": "BF16_Optimizer",
              "zero": "DeepSpeedZeroOptimizer (ZeRO-1/2)", "zero3": "DeepSpeedZeroOptimizer_Stage3"}


def settings(cfg: Config, attention: Optional[str] = None, platform: str = "cuda") -> Settings:
    """DeepSpeed's choices for `cfg`: its optimizer wrapper (engine._do_optimizer_sanity_check), dtypes, buckets."""
    ds = cfg.deepspeed
    precision = cfg.precision
    element = precision_bytes(precision)
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if accum is None:  # megalite asks DeepSpeed for fp32 accumulation with bf16 (engine.build.deepspeed_dict)
        accum = "fp32" if precision in ("bf16", "fp32") else precision
    grad_accum = precision_bytes(str(accum), "deepspeed.data_types.grad_accum_dtype")
    zero = ds.get("zero_optimization") or {}
    stage = cfg.zero_stage
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    opt = ds.get("optimizer") or {}
    kind = opt.get("type", "AdamW")
    momentum = float((opt.get("params") or {}).get("momentum", 0.9))
    state_bytes = 8 if kind in ("Adam", "AdamW") else (4 if momentum else 0)
    if stage > 0:
        if precision == "bf16" and grad_accum == 4 and stage == 1 and not offload:
            path = "bf16_optimizer"
        else:
            path = "zero3" if stage == 3 else "zero"
    elif element == grad_accum:
        path = {"fp32": "none", "bf16": "bf16_ddp", "fp16": "fp16_optimizer"}[precision]
    else:
        raise ConfigError(zero0_precision_error(precision, str(accum)) or (
            f"deepspeed.zero_optimization.stage: 0 with {precision} parameters and {accum} gradient accumulation is "
            "refused by DeepSpeed 0.19.8 ('unsupported mix of model_dtype and grad_accum_dtype'); use stage 1"))
    if attention is None:
        attention = "torch" if cfg.train.kernels in ("torch", "apex") else "triton"
    if attention not in ("triton", "torch", "materialized"):
        raise ConfigError(f"attention: {attention!r} is not one of triton, torch, materialized")
    return Settings(
        precision=precision, element=element, grad_accum=grad_accum, zero_stage=stage, path=path, optimizer=kind,
        optimizer_state_bytes=state_bytes, reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 1e5)),
        sub_group_size=int(zero.get("sub_group_size", 1e9)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
        max_live_parameters=int(zero.get("stage3_max_live_parameters", 1e9)),
        max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1e9)), offload_optimizer=offload,
        attention=attention, platform=platform, recompute=cfg.model.activation_checkpointing,
        loss_chunk_tokens=cfg.model.loss_chunk_tokens,
        fp8_recipe=cfg.model.fp8.recipe if cfg.model.fp8 else "",
        fp8_layers=tuple(cfg.model.fp8.layers) if cfg.model.fp8 else (),
    )
