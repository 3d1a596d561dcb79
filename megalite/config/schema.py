"""The run configuration's schema: typed sections, the DeepSpeed keys megalite knows, the optimizers and
schedules it builds, and the JSON Schema of a run file (`megalite config schema`).

A run is one JSON file with the sections `model`, `parallel`, `data`, `train` and `deepspeed`. What
DeepSpeed owns (batch sizes, precision, optimizer, scheduler, ZeRO, clipping) stays in the `deepspeed`
section under DeepSpeed's own keys. Loading is in `load.py`, the rules in `validate.py`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from megalite.config.layout import Layout
from megalite.dtypes import torch_dtype

# ----------------------------------------------------------------------------- sections


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for a longer context (Hugging Face's `rope_scaling` / `rope_parameters`).

    `linear` divides every frequency by `factor` (position interpolation). `llama3` (Llama 3.1+) divides
    only the low frequencies (wavelengths above original/low_freq_factor positions) by `factor`, keeps
    the high ones (wavelengths below original/high_freq_factor) and blends smoothly in between.
    """

    type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# FP8 training (model.fp8): the recipes (torchao's names) and the linears of each Transformer block that can run in
# float8. Embeddings, the output layer and norms always stay in the run's precision.
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FP8_LAYERS = ("attention.qkv", "attention.proj", "mlp.fc", "mlp.proj")


@dataclass
class Float8Config:
    """FP8 matmuls in the blocks' tensor-parallel linears, with dynamic scaling (megalite.parallel.fp8).

    `tensorwise`: one scale per tensor, e4m3 inputs and weights, e5m2 output gradients (the fastest). `rowwise`:
    one scale per row, e4m3 throughout, power-of-two scales. `rowwise_with_gw_hp`: rowwise, with the weight
    gradient computed in high precision (the most accurate). Master weights and optimizer state are unchanged.
    """

    recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "tensorwise"
    layers: list[str] = field(default_factory=lambda: list(FP8_LAYERS))


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers (`model.moe`): which layers route each token to `top_k` of `num_experts` expert
    FFNs, how the router scores and balances them, and whether an expert's capacity drops tokens.

    Layer i is an MoE layer when i >= `first_dense_layers` and (i - first_dense_layers + 1) is a multiple of
    `layer_interval` (Qwen's `decoder_sparse_step` convention); the other layers keep the dense MLP of
    `model.ffn_hidden_size`. Experts use `model.mlp`'s activation and have no biases.
    """

    num_experts: int
    top_k: int = 2
    ffn_hidden_size: Optional[int] = None  # each routed expert's FFN width; None: the model's ffn size
    # Shared experts (DeepSeek): dense FFNs every token passes through beside the routed ones, fused into one MLP of
    # shared_experts x shared_ffn_hidden_size units.
    shared_experts: int = 0
    shared_ffn_hidden_size: Optional[int] = None  # None: the routed experts' width
    first_dense_layers: int = 0
    layer_interval: int = 1
    # softmax: probabilities over all experts (Mixtral, Qwen, OLMoE); sigmoid: independent scores (DeepSeek-V3).
    router: Literal["softmax", "sigmoid"] = "softmax"
    normalize_top_k: bool = True  # rescale the chosen experts' weights to sum to 1 (before routed_scaling)
    routed_scaling: float = 1.0  # factor on the routed experts' combined output (DeepSeek-V3: 2.5)
    # A per-expert bias added to the scores when choosing the top-k only (never to the weights): DeepSeek-V3's
    # auxiliary-loss-free balancing. It is a buffer, updated after each optimizer step by bias_update_rate x
    # sign(mean load - load) of the step's global token counts (0: kept as loaded).
    expert_bias: bool = False
    bias_update_rate: float = 0.0
    aux_loss: float = 0.0  # coefficient of the Switch/GShard load-balancing loss E x sum_i f_i P_i, per MoE layer
    router_z_loss: float = 0.0  # coefficient of the router z-loss mean(logsumexp(router logits)^2), per MoE layer
    # None: dropless. A number c: each expert takes at most ceil(c x tokens x top_k / num_experts) of the tokens a
    # rank routes in one call, those of highest router score first (earlier tokens first on ties); the rest of
    # the assignments are dropped (the token keeps its residual, its other experts and the shared experts).
    capacity_factor: Optional[float] = None

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (from 0) routes through experts."""
        i = index - self.first_dense_layers
        return i >= 0 and (i + 1) % self.layer_interval == 0


@dataclass
class ModelConfig:
    """Shape of a decoder-only Transformer (GPT-2 or Llama family)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None  # None: multi-head attention (= num_heads)
    # Each attention head's width; None: hidden_size / num_heads. Set, the query and output projections are
    # num_heads x this wide (Qwen3-MoE-30B-A3B: 32 heads of 128 on a hidden size of 2048; Hugging Face's `head_dim`).
    attention_head_dim: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # None: 4*hidden (gelu) or Llama's 8/3*hidden rounded to 256 (swiglu)
    max_position_embeddings: int = 1024
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    bias: bool = True
    tied_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    activation_checkpointing: bool = False
    # > 0: the output layer and loss run this many tokens at a time, recomputed in the backward, so the logits
    # (and their fp32 softmax) never exist whole: a large vocabulary's biggest activation at the cost of one
    # more output matmul.
    loss_chunk_tokens: int = 0
    # PaLM's auxiliary z-loss coefficient (1e-4 is usual): adds z * logsumexp(logits)^2 per token while
    # training, keeping the logits' normaliser near 1; evaluation reports the plain cross-entropy.
    z_loss: float = 0.0
    # FP8 training of the blocks' linears (None: the run's precision throughout).
    fp8: Optional[Float8Config] = None
    # RMSNorm on queries and keys before RoPE: "head" normalises each head's vector with one weight of head_dim
    # shared by the heads (Qwen3); "projection" normalises the whole q and k projections of a token, with weights
    # of num_heads x head_dim and num_kv_heads x head_dim (OLMoE). None: no q/k norm.
    qk_norm: Optional[Literal["head", "projection"]] = None
    moe: Optional[MoEConfig] = None  # Mixture-of-Experts layers (None: every layer has the dense MLP)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.mlp == "swiglu":
            return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)
        return 4 * self.hidden_size

    @property
    def expert_ffn_size(self) -> int:
        """Each routed expert's FFN width (model.moe.ffn_hidden_size, else the dense ffn size)."""
        return (self.moe.ffn_hidden_size if self.moe and self.moe.ffn_hidden_size else None) or self.ffn_size

    @property
    def shared_ffn_size(self) -> int:
        """The width of the fused shared-experts MLP (0 without shared experts)."""
        if not self.moe or not self.moe.shared_experts:
            return 0
        return self.moe.shared_experts * (self.moe.shared_ffn_hidden_size or self.expert_ffn_size)

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` has experts instead of the dense MLP."""
        return self.moe is not None and self.moe.is_moe_layer(index)

    @property
    def num_moe_layers(self) -> int:
        """How many layers have experts: those `is_moe_layer` names, counted in closed form (the planner's search
        asks for every candidate layout; its cost must not grow with the depth)."""
        if self.moe is None or self.moe.layer_interval < 1:
            return 0
        return max(0, self.num_layers - self.moe.first_dense_layers) // self.moe.layer_interval

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to `make_vocab_size_divisible_by`; independent of the TP degree."""
        m = self.make_vocab_size_divisible_by
        return m * math.ceil(self.vocab_size / m)


@dataclass
class ParallelConfig:
    """Tensor, context and pipeline degrees; data parallelism is whatever the world size leaves."""

    tensor: int = 1
    pipeline: int = 1
    # Context parallelism (DeepSpeed-Ulysses): each sequence split into `context` contiguous chunks over a group of
    # ranks; attention all-to-alls to the whole sequence with heads / (tensor x context) heads per rank.
    context: int = 1
    # Expert parallelism: each MoE layer's experts split over `expert` ranks that are data (and context) replicas of
    # the dense weights; tokens travel to their experts by all-to-all (megalite.parallel.experts).
    expert: int = 1
    sequence_parallel: bool = False
    pipeline_partition: Literal["parameters", "uniform"] = "parameters"
    # The order in which each stage runs its micro-batches' passes (megalite.engine.pipeline_schedules): DeepSpeed's
    # 1F1B; zero-bubble ZB-H1 (weight gradients deferred to fill the bubble); DeepSpeed's DualPipeV (two chunks per
    # rank in a V). Not part of the training state: a checkpoint of one schedule resumes under any other.
    pipeline_schedule: Literal["1f1b", "zb-h1", "dualpipev"] = "1f1b"


@dataclass
class DataConfig:
    """Where training tokens come from (Megatron-format prefixes written by `megalite prepare`)."""

    prefixes: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None  # blending weights, one per prefix
    split: str = "949,50,1"
    seq_length: int = 1024
    cache_dir: Optional[str] = None
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    reset_attention_mask: bool = False  # attend only within documents (EOD-separated) of a packed sample
    num_workers: int = 0


@dataclass
class LoggingConfig:
    """Where metrics go besides the terminal."""

    metrics_file: Optional[str] = "metrics.jsonl"  # relative to train.output_dir
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    progress_bar: bool = True
    plot: bool = True
    profile_start_step: Optional[int] = None
    profile_end_step: Optional[int] = None


@dataclass
class EvalTasksConfig:
    """lm-evaluation-harness tasks run at each evaluation of a training run (needs the `eval` extra); each task's
    main metric is logged next to the validation loss."""

    tasks: list[str] = field(default_factory=list)  # harness task, group or tag names, e.g. ["hellaswag"]
    limit: Optional[int] = None  # at most this many examples per task (None: all)
    num_fewshot: Optional[int] = None  # None: each task's own default
    include_path: Optional[str] = None  # a folder of the user's own task YAMLs
    batch_size: int = 8


@dataclass
class TrainConfig:
    """The training loop: length, evaluation, checkpoints, resilience, logging."""

    steps: int = 100
    seed: int = 1234
    output_dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 100  # 0: only at the end
    eval_steps: int = 10
    checkpoint_interval: int = 0  # 0: only at the end
    checkpoint_dir: Optional[str] = None  # None: <output_dir>/checkpoints
    keep_checkpoints: int = 2
    # Write checkpoints in the background: training stalls only while the state is copied to host memory.
    # None (auto): on, except with NVMe offload (that state is not in memory to copy).
    checkpoint_async: Optional[bool] = None
    resume: Literal["auto", "must", "never"] = "auto"
    init_from: Optional[str] = None  # weights to start from: a Hugging Face directory or a megalite checkpoint
    # Resuming a checkpoint written with another global batch size: continue from its sample position, with the
    # schedule by step (refused unless set).
    allow_batch_change: bool = False
    kernels: Literal["auto", "torch", "triton", "apex"] = "auto"
    nonfinite: Literal["skip", "fail"] = "skip"
    max_consecutive_nonfinite: int = 5
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    collective_timeout_s: float = 600.0
    # Hangs and stragglers (megalite/engine/watchdog.py, stragglers.py; README "When a job hangs"). With one rank
    # both are off. A hang ends the job with exit code 79 after every live rank wrote its stacks.
    watchdog: bool = True  # the progress watchdog and the straggler report
    hang_timeout_s: Optional[float] = None  # no rank progressing this long in a step: a hang (None: 10x the slowest
    #   recent step, at least 120 s)
    hang_timeout_long_s: Optional[float] = None  # the same in set-up, the first step, checkpoints, evaluation
    #   (None: 0.9 x collective_timeout_s)
    straggler_margin: float = 0.2  # a rank computing this fraction more than its stage's median is slow ...
    straggler_windows: int = 2  # ... and is named after this many log windows in a row
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval_tasks: Optional[EvalTasksConfig] = None  # downstream tasks at each evaluation (None: none)


def nvme_offload(deepspeed: dict) -> bool:
    """Whether a DeepSpeed config swaps optimizer state or parameters to NVMe."""
    zero = deepspeed.get("zero_optimization") or {}
    return any((zero.get(key) or {}).get("device") == "nvme" for key in ("offload_optimizer", "offload_param"))


@dataclass
class Config:
    """A whole run. `deepspeed` is DeepSpeed's own JSON, resolved to a dict."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: dict = field(default_factory=dict)
    name: str = "megalite"
    source: Optional[str] = None  # the file it came from (informational)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict that `from_dict` turns back into an equal Config."""
        return dataclasses.asdict(self)

    def dp_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline * self.parallel.context)

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed.get("train_micro_batch_size_per_gpu", 1))

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.deepspeed.get("gradient_accumulation_steps", 1))

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.dp_size(world_size)

    @property
    def checkpoint_async(self) -> bool:
        """Whether checkpoints are written in the background (train.checkpoint_async, resolved)."""
        if self.train.checkpoint_async is not None:
            return self.train.checkpoint_async
        return not nvme_offload(self.deepspeed)

    @property
    def precision(self) -> str:
        """'bf16', 'fp16' or 'fp32': the DeepSpeed section that is enabled."""
        if self.deepspeed.get("bf16", {}).get("enabled"):
            return "bf16"
        if self.deepspeed.get("fp16", {}).get("enabled"):
            return "fp16"
        return "fp32"

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype the model's weights and activations use (torch is imported on use)."""
        return torch_dtype(self.precision)

    @property
    def zero_stage(self) -> int:
        """deepspeed.zero_optimization.stage (0 when absent; validate names a bad value, this never raises)."""
        zero = self.deepspeed.get("zero_optimization")
        stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
        return stage if isinstance(stage, int) and not isinstance(stage, bool) else 0

    @property
    def checkpoint_root(self) -> Path:
        """Where this run's checkpoints live: train.checkpoint_dir, else OUTPUT_DIR/checkpoints."""
        return Path(self.train.checkpoint_dir or Path(self.train.output_dir) / "checkpoints")

    def layout(self, world_size: int) -> Layout:
        """The run's layout at `world_size` (megalite.config.layout)."""
        return Layout.of(self, world_size)



# ----------------------------------------------------------------------------- DeepSpeed keys

# DeepSpeed silently ignores an unknown top-level key, so megalite checks them (DeepSpeed 0.19).
DEEPSPEED_TOP_LEVEL_KEYS = frozenset(
    """
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print
    optimizer scheduler fp16 bf16 bfloat16 amp torch_autocast data_types gradient_clipping prescale_gradients
    gradient_predivide_factor gradient_allreduce_op sparse_gradients zero_optimization zero_allow_untested_optimizer
    zero_force_ds_cpu_optimizer communication_data_type seq_parallel_communication_data_type activation_checkpointing
    aio flops_profiler wall_clock_breakdown memory_breakdown dump_state tensorboard wandb csv_monitor comet
    monitor_config elasticity pipeline checkpoint data_efficiency curriculum_learning compression_training
    autotuning dataloader_drop_last disable_allgather disable_python_gc vocabulary_size sparse_attention
    nebula timers comms_logger graph_harvesting use_data_before_expert_parallelism compile zero_quantized_weights
    zero_quantized_gradients eigenvalue progressive_layer_drop quantize_training weight_quantization
    hybrid_engine tensor_parallel
    """.split()
)
# Keys of the sections megalite reads itself; the rest DeepSpeed validates with pydantic at start.
DEEPSPEED_SECTION_KEYS = {
    "bf16": {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
             "bf16_optimizer_states"},
    "fp16": {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
    "optimizer": {"type", "params", "torch_adam", "adam_w_mode"},
    "scheduler": {"type", "params"},
    "data_types": {"grad_accum_dtype"},
}

# The one list of optimizers and learning-rate schedules megalite builds (engine/build.py), each with the
# `params` keys it honours. A key outside these is a configuration error, never silently ignored.
OPTIMIZERS: dict[str, frozenset[str]] = {
    "AdamW": frozenset({"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"}),
    "Adam": frozenset({"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"}),
    "SGD": frozenset({"lr", "momentum", "nesterov", "weight_decay", "dampening"}),
}
# DeepSpeed's three schedules take DeepSpeed's own parameters (deepspeed.runtime.lr_schedules, 0.19) and are built
# from DeepSpeed's classes; WarmupStableDecay and Constant are megalite's (formulas in the README).
_DEEPSPEED_WARMUP = {"warmup_num_steps", "warmup_type"}
SCHEDULERS: dict[str, frozenset[str]] = {
    "WarmupLR": frozenset(_DEEPSPEED_WARMUP | {"warmup_min_lr", "warmup_max_lr"}),
    "WarmupDecayLR": frozenset(_DEEPSPEED_WARMUP | {"warmup_min_lr", "warmup_max_lr", "total_num_steps"}),
    "WarmupCosineLR": frozenset(_DEEPSPEED_WARMUP | {"warmup_min_ratio", "cos_min_ratio", "total_num_steps"}),
    "WarmupStableDecay": frozenset({"warmup_num_steps", "warmup_min_ratio", "total_num_steps", "decay_num_steps",
                                    "decay_fraction", "min_ratio"}),
    "Constant": frozenset(),
}
DEEPSPEED_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
# The kind of value each of those parameters takes: "positive" / "nonnegative" / "unit" (in [0, 1]) finite
# numbers, "count" (an integer >= 0), "steps" (an integer > 0), "betas" (two numbers in [0, 1)), "bool",
# "warmup_type" ('log' or 'linear').
PARAMETER_KINDS: dict[str, str] = {
    "lr": "positive", "eps": "positive", "weight_decay": "nonnegative", "momentum": "nonnegative",
    "dampening": "nonnegative", "betas": "betas", "nesterov": "bool", "torch_adam": "bool", "adam_w_mode": "bool",
    "warmup_num_steps": "count", "total_num_steps": "steps", "decay_num_steps": "count",
    "warmup_min_ratio": "unit", "cos_min_ratio": "unit", "min_ratio": "unit", "decay_fraction": "unit",
    "warmup_min_lr": "nonnegative", "warmup_max_lr": "positive", "warmup_type": "warmup_type",
}
OPTIMIZER_TYPES = tuple(OPTIMIZERS)
SCHEDULER_TYPES = tuple(SCHEDULERS)



# ----------------------------------------------------------------------------- JSON Schema


def _json_type(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _json_type(args[0], defs)
        return {"anyOf": [inner, {"type": "null"}]} if len(args) < len(typing.get_args(tp)) else inner
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _json_type(typing.get_args(tp)[0], defs)}
    if dataclasses.is_dataclass(tp):
        return {"$ref": f"#/$defs/{_section_schema(tp, defs)}"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"no JSON Schema type for {tp!r}")  # a field type this function does not know yet


def _section_schema(cls: type, defs: dict[str, Any], required: bool = True) -> str:
    """Add `cls` to defs (fields with defaults optional; unknown keys refused); returns its name."""
    name = cls.__name__ if required else f"{cls.__name__}Overrides"
    if name in defs:
        return name
    defs[name] = {}  # placeholder against recursion
    hints = typing.get_type_hints(cls)
    props, needed = {}, []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        props[f.name] = _json_type(hints[f.name], defs)
        if f.default is not dataclasses.MISSING and isinstance(f.default, (bool, int, float, str)):
            props[f.name]["default"] = f.default
        if required and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            needed.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if cls.__doc__:
        schema["description"] = cls.__doc__.strip().splitlines()[0]
    if needed:
        schema["required"] = needed
    defs[name] = schema
    return name


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a run file as written by users: `model` may be a preset name or
    `{"preset": NAME, ...overrides}`, `deepspeed` a file name or DeepSpeed's own object."""
    defs: dict[str, Any] = {}
    top = _section_schema(Config, defs)
    overrides = defs[_section_schema(ModelConfig, defs, required=False)]
    overrides["properties"] = {"preset": {"type": "string"}, **overrides["properties"]}
    overrides["required"] = ["preset"]
    schema = dict(defs.pop(top))
    schema["properties"] = dict(schema["properties"])
    schema["properties"]["model"] = {"anyOf": [
        {"type": "string", "description": "a preset name from configs/models or a path"},
        {"$ref": "#/$defs/ModelConfigOverrides"},
        {"$ref": "#/$defs/ModelConfig"},
    ]}
    schema["properties"]["deepspeed"] = {"anyOf": [
        {"type": "string", "description": "a file in configs/deepspeed or a path"},
        {"type": "object", "propertyNames": {"enum": sorted(DEEPSPEED_TOP_LEVEL_KEYS)}},
    ]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "megalite run configuration",
            **schema, "$defs": defs}
