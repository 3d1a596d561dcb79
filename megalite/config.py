"""The one place for configuration: typed sections, loading, overrides, validation.

A run is one JSON file with the sections `model`, `parallel`, `data`, `train` and `deepspeed`.
`model` is inline, a preset name from `configs/models/`, a path, or `{"preset": NAME, ...overrides}`.
`deepspeed` is inline or the path of a DeepSpeed JSON (relative paths resolve against the run
file, then the repository's `configs/deepspeed/`). What DeepSpeed owns (batch sizes, precision,
optimizer, scheduler, ZeRO, clipping) stays in the `deepspeed` section under DeepSpeed's own keys.

Every problem is collected and raised together as one `ConfigError`; validation never uses
`assert`, so it holds under `python -O`. Checks that need hardware run at training start.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from megalite.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


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


@dataclass
class ModelConfig:
    """Shape of a decoder-only Transformer (GPT-2 or Llama family)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None  # None: multi-head attention (= num_heads)
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

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.mlp == "swiglu":
            return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)
        return 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to `make_vocab_size_divisible_by`; independent of the TP degree."""
        m = self.make_vocab_size_divisible_by
        return m * math.ceil(self.vocab_size / m)


@dataclass
class ParallelConfig:
    """Tensor and pipeline degrees; data parallelism is whatever the world size leaves."""

    tensor: int = 1
    pipeline: int = 1
    sequence_parallel: bool = False
    pipeline_partition: Literal["parameters", "uniform"] = "parameters"


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
    resume: Literal["auto", "must", "never"] = "auto"
    init_from: Optional[str] = None  # weights to start from: a Hugging Face directory or a megalite checkpoint
    kernels: Literal["auto", "torch", "triton", "apex"] = "auto"
    nonfinite: Literal["skip", "fail"] = "skip"
    max_consecutive_nonfinite: int = 5
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    collective_timeout_s: float = 600.0
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
        return world_size // (self.parallel.tensor * self.parallel.pipeline)

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed.get("train_micro_batch_size_per_gpu", 1))

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.deepspeed.get("gradient_accumulation_steps", 1))

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.dp_size(world_size)

    @property
    def precision(self) -> str:
        if self.deepspeed.get("bf16", {}).get("enabled"):
            return "bf16"
        if self.deepspeed.get("fp16", {}).get("enabled"):
            return "fp16"
        return "fp32"


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
OPTIMIZER_TYPES = ("AdamW", "Adam", "SGD")
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "WarmupStableDecay", "Constant")


# ----------------------------------------------------------------------------- typed conversion


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    options = [str(o) for o in options]
    same_but_case = [o for o in options if o.lower() == str(name).lower()]
    close = same_but_case or difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _not_one_of(key: str, value: Any, choices: typing.Sequence[str], quote: bool = False) -> str:
    """The message for a value outside a fixed set, with a did-you-mean when one is close."""
    listed = ", ".join(map(repr, choices)) if quote else ", ".join(choices)
    hint = _suggest(value, choices) if isinstance(value, str) else ""
    return f"{key}: {value!r} is not one of {listed}{hint}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " | null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; record problems under `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            errors.append(_not_one_of(key, value, choices, quote=True))
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return value
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected an object, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.append(f"{key}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in this file, not in the input


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from a dict, reporting unknown/missing keys and wrong types."""
    if not isinstance(raw, dict):
        errors.append(f"{prefix}: expected an object, got {type(raw).__name__} {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"{prefix}.{key}: unknown key{_suggest(str(key), fields)}; valid: {', '.join(fields)}")
            continue
        kwargs[key] = _convert(value, hints[key], f"{prefix}.{key}", errors)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}.{name}: required key is missing ({_type_name(hints[name])})")
            kwargs[name] = None
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable with errors already recorded
        errors.append(f"{prefix}: {e}")
        return None


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _resolve_file(ref: str, base: Path | None, subdir: str) -> Path:
    """A config reference: a path (absolute or relative to the run file), or a name in configs/<subdir>."""
    candidates = []
    p = Path(ref)
    if p.is_absolute():
        return p
    if base is not None:
        candidates.append(base / p)
    candidates.append(Path.cwd() / p)
    name = ref if ref.endswith(".json") else ref + ".json"
    candidates.append(CONFIGS_DIR / subdir / name)
    candidates.append(CONFIGS_DIR / subdir / Path(name).name)
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def list_presets(subdir: str) -> list[str]:
    """Names of the JSON files shipped under configs/<subdir>."""
    return sorted(p.stem for p in (CONFIGS_DIR / subdir).glob("*.json"))


def _expand_references(raw: dict, base: Path | None) -> dict:
    """Replace a model preset and a DeepSpeed file reference by their contents."""
    raw = copy.deepcopy(raw)
    model = raw.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if isinstance(model, dict) and "preset" in model:
        ref = model.pop("preset")
        if not isinstance(ref, str):
            raise ConfigError(f"model.preset: expected a preset name or path, got {ref!r}")
        path = _resolve_file(ref, base, "models")
        if not path.is_file():
            hint = _suggest(Path(ref).stem, list_presets("models"))
            raise ConfigError(
                f"model.preset: no preset {ref!r} (looked for {path}){hint}; shipped: {', '.join(list_presets('models'))}"
            )
        preset = _read_json(path, "model.preset")
        if not isinstance(preset, dict):
            raise ConfigError(f"model.preset: {path} must hold a JSON object")
        preset.update(model)
        model = preset
    if model is not None:
        raw["model"] = model
    ds = raw.get("deepspeed")
    if isinstance(ds, str):
        path = _resolve_file(ds, base, "deepspeed")
        if not path.is_file():
            raise ConfigError(f"deepspeed: DeepSpeed config file not found: {ds!r} (looked for {path})")
        raw["deepspeed"] = _read_json(path, "deepspeed")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (['a','b','c'], VALUE); VALUE is JSON when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key segment in {key!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw (reference-expanded) config dict."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parts[: i + 1])} is {child!r}, not an object")
            node = child
        node[parts[-1]] = value
    return raw


def from_dict(raw: Any, world_size: int | None = None, source: str | None = None) -> Config:
    """Build and validate a Config from a dict whose references are already expanded."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source or 'config'}: the top level must be a JSON object, got {type(raw).__name__}")
    errors: list[str] = []
    cfg = _build(Config, raw, "config", errors)
    if errors:
        raise ConfigError([f"{source}: {e}" if source else e for e in errors])
    cfg.source = source if source is not None else cfg.source
    validate(cfg, world_size)
    return cfg


def model_config_from_dict(raw: Any, source: str = "model") -> ModelConfig:
    """A ModelConfig alone (a saved model's config.json), with the same type checks as a run's `model`."""
    errors: list[str] = []
    cfg = _build(ModelConfig, raw, source, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def load(path: str | os.PathLike, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Load a run config file, apply `--set` overrides, validate. Raises ConfigError."""
    path = Path(path)
    raw = _read_json(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    raw = _expand_references(raw, path.parent)
    raw = apply_overrides(raw, overrides or [])
    raw.pop("source", None)
    return from_dict(raw, world_size=world_size, source=str(path))


# ----------------------------------------------------------------------------- validation


def _positive(errors: list[str], key: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # type errors are reported elsewhere
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def rope_scaling_errors(m: ModelConfig) -> list[str]:
    """Problems with `model.rope_scaling` (also checked where a model is built outside a run)."""
    r = m.rope_scaling
    if r is None:
        return []
    errors = []
    if m.position != "rope":
        errors.append(f"model.rope_scaling: needs model.position='rope', got {m.position!r}")
    if not r.factor > 0:
        errors.append(f"model.rope_scaling.factor: must be > 0, got {r.factor}")
    if r.type == "llama3":
        if not 0 < r.low_freq_factor < r.high_freq_factor:
            errors.append(f"model.rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                          f"{r.low_freq_factor} and {r.high_freq_factor}")
        if r.original_max_position_embeddings <= 0:
            errors.append("model.rope_scaling.original_max_position_embeddings: must be > 0, got "
                          f"{r.original_max_position_embeddings}")
    return errors


def _validate_deepspeed(ds: dict, errors: list[str]) -> None:
    for key, value in ds.items():
        if key not in DEEPSPEED_TOP_LEVEL_KEYS:
            errors.append(
                f"deepspeed.{key}: unknown DeepSpeed key{_suggest(key, DEEPSPEED_TOP_LEVEL_KEYS)} "
                "(DeepSpeed would silently ignore it)"
            )
            continue
        allowed = DEEPSPEED_SECTION_KEYS.get(key)
        if allowed is not None:
            if not isinstance(value, dict):
                errors.append(f"deepspeed.{key}: expected an object, got {value!r}")
                continue
            for sub in value:
                if sub not in allowed:
                    errors.append(f"deepspeed.{key}.{sub}: unknown key{_suggest(sub, allowed)}; valid: {sorted(allowed)}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            v = ds[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                errors.append(f"deepspeed.{key}: must be a positive integer, got {v!r}")
    if "gradient_clipping" in ds:
        v = ds["gradient_clipping"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            errors.append(f"deepspeed.gradient_clipping: must be a number >= 0, got {v!r}")
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        otype = opt.get("type")
        if otype not in OPTIMIZER_TYPES:
            errors.append(_not_one_of("deepspeed.optimizer.type", otype, OPTIMIZER_TYPES))
        params = opt.get("params", {})
        if not isinstance(params, dict):
            errors.append(f"deepspeed.optimizer.params: expected an object, got {params!r}")
        elif "lr" in params:
            _positive(errors, "deepspeed.optimizer.params.lr", params["lr"])
    sched = ds.get("scheduler")
    if isinstance(sched, dict) and sched.get("type") not in SCHEDULER_TYPES:
        errors.append(_not_one_of("deepspeed.scheduler.type", sched.get("type"), SCHEDULER_TYPES))
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        errors.append(f"deepspeed.zero_optimization: expected an object, got {zero!r}")
    else:
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            errors.append(f"deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
        _validate_zero_keys(zero, errors)
    for prec in ("bf16", "fp16"):
        section = ds.get(prec)
        if isinstance(section, dict) and "enabled" in section and not isinstance(section["enabled"], bool):
            errors.append(f"deepspeed.{prec}.enabled: expected true or false, got {section['enabled']!r}")
    if isinstance(ds.get("bf16"), dict) and isinstance(ds.get("fp16"), dict):
        if ds["bf16"].get("enabled") and ds["fp16"].get("enabled"):
            errors.append("deepspeed: bf16.enabled and fp16.enabled are both true; choose one")


def _validate_zero_keys(zero: dict, errors: list[str]) -> None:
    """Unknown zero_optimization keys, checked against DeepSpeed's own pydantic model when importable."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # noqa: BLE001 - a login node may lack deepspeed; DeepSpeed checks again at start
        return
    known = set(DeepSpeedZeroConfig.model_fields)
    known |= {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    for key in zero:
        if key not in known:
            errors.append(f"deepspeed.zero_optimization.{key}: unknown key{_suggest(key, known)}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Every hardware-independent rule; raises one ConfigError listing all problems."""
    errors: list[str] = []
    m, p, d, t, ds = cfg.model, cfg.parallel, cfg.data, cfg.train, cfg.deepspeed

    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings",
                "make_vocab_size_divisible_by"):
        _positive(errors, f"model.{key}", getattr(m, key))
    for key in ("num_kv_heads", "ffn_hidden_size"):
        if getattr(m, key) is not None:
            _positive(errors, f"model.{key}", getattr(m, key))
    _positive(errors, "model.loss_chunk_tokens", m.loss_chunk_tokens, allow_zero=True)
    _positive(errors, "model.z_loss", m.z_loss, allow_zero=True)
    for key in ("norm_eps", "init_std", "rope_theta"):
        _positive(errors, f"model.{key}", getattr(m, key))
    for key in ("hidden_dropout", "attention_dropout"):
        v = getattr(m, key)
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            errors.append(f"model.{key}: must be in [0, 1), got {v}")
    for key in ("tensor", "pipeline"):
        _positive(errors, f"parallel.{key}", getattr(p, key))
    _positive(errors, "data.seq_length", d.seq_length)
    _positive(errors, "data.num_workers", d.num_workers, allow_zero=True)
    for key in ("steps", "log_interval", "eval_steps", "max_consecutive_nonfinite", "collective_timeout_s"):
        _positive(errors, f"train.{key}", getattr(t, key))
    for key in ("eval_interval", "checkpoint_interval"):
        _positive(errors, f"train.{key}", getattr(t, key), allow_zero=True)
    if isinstance(t.keep_checkpoints, int) and t.keep_checkpoints < 2:
        errors.append(f"train.keep_checkpoints: must be >= 2 (one may be mid-write), got {t.keep_checkpoints}")
    for sig in t.preemption_signals if isinstance(t.preemption_signals, list) else []:
        if sig not in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
            errors.append(_not_one_of("train.preemption_signals", sig, ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")))
    if errors:  # the shape rules below assume sane numbers
        raise ConfigError(errors)

    if m.hidden_size % m.num_heads:
        errors.append(f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_heads % m.kv_heads:
        errors.append(f"model.num_kv_heads: {m.kv_heads} does not divide model.num_heads={m.num_heads}")
    if m.num_heads % p.tensor:
        errors.append(f"model.num_heads: {m.num_heads} is not divisible by parallel.tensor={p.tensor}")
    if m.kv_heads % p.tensor:
        errors.append(
            f"model.num_kv_heads: {m.kv_heads} is not divisible by parallel.tensor={p.tensor} "
            "(each tensor-parallel rank needs whole key/value heads)"
        )
    if m.ffn_size % p.tensor:
        errors.append(f"model.ffn_hidden_size: {m.ffn_size} is not divisible by parallel.tensor={p.tensor}")
    if m.padded_vocab_size % p.tensor:
        errors.append(
            f"model.make_vocab_size_divisible_by: padded vocabulary {m.padded_vocab_size} is not divisible by "
            f"parallel.tensor={p.tensor}; use a multiple of {p.tensor}"
        )
    if m.position == "rope" and m.head_dim % 2:
        errors.append(f"model.position: rope needs an even head dimension, got {m.head_dim}")
    errors.extend(rope_scaling_errors(m))
    if m.num_layers < p.pipeline:
        errors.append(f"model.num_layers: {m.num_layers} layers cannot fill parallel.pipeline={p.pipeline} stages")
    if d.seq_length > m.max_position_embeddings:
        errors.append(
            f"data.seq_length: {d.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}"
        )
    if d.weights is not None and len(d.weights) != len(d.prefixes):
        errors.append(f"data.weights: {len(d.weights)} weights for {len(d.prefixes)} prefixes")
    if d.weights is not None and any(w < 0 for w in d.weights):
        errors.append(f"data.weights: weights must be >= 0, got {d.weights}")
    split = d.split.replace("/", ",").split(",")
    try:
        parts = [float(s) for s in split]
        if len(parts) != 3 or any(x < 0 for x in parts) or parts[0] <= 0:
            raise ValueError
    except ValueError:
        errors.append(f"data.split: {d.split!r} must be three non-negative numbers with train > 0, e.g. '949,50,1'")
    if p.sequence_parallel and p.tensor == 1:
        pass  # harmless: sequence parallelism is a no-op without tensor parallelism
    if (t.logging.profile_start_step is None) != (t.logging.profile_end_step is None):
        errors.append("train.logging.profile_start_step and profile_end_step must be given together")
    elif t.logging.profile_start_step is not None and t.logging.profile_end_step <= t.logging.profile_start_step:
        errors.append("train.logging.profile_end_step must be after profile_start_step")

    _validate_deepspeed(ds, errors)
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds.get("zero_optimization"), dict) else 0
    if p.pipeline > 1 and stage in (2, 3):
        errors.append(
            f"deepspeed.zero_optimization.stage: ZeRO-{stage} cannot be combined with parallel.pipeline={p.pipeline} "
            "(DeepSpeed refuses it); use ZeRO-1 (stage 1) with pipeline parallelism"
        )
    if p.pipeline > 1 and stage == 0:
        errors.append(
            f"deepspeed.zero_optimization.stage: ZeRO-0 with parallel.pipeline={p.pipeline} is refused: DeepSpeed's "
            "ZeRO-0 pipeline path miscounts the gradient norm of replicated and tied weights and cannot skip "
            "non-finite steps; use ZeRO-1 (stage 1)"
        )
    if "train_micro_batch_size_per_gpu" not in ds:
        errors.append("deepspeed.train_micro_batch_size_per_gpu: required (megalite sizes its data loader by it)")

    if world_size is not None:
        if world_size <= 0:
            errors.append(f"world size: must be > 0, got {world_size}")
        elif world_size % (p.tensor * p.pipeline):
            errors.append(
                f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
                f"{p.tensor} x {p.pipeline}"
            )
        elif "train_batch_size" in ds and not errors:
            expected = cfg.global_batch_size(world_size)
            if ds["train_batch_size"] != expected:
                errors.append(
                    f"deepspeed.train_batch_size: {ds['train_batch_size']} != micro "
                    f"{cfg.micro_batch_size} x gradient_accumulation {cfg.gradient_accumulation_steps} x data "
                    f"parallel {cfg.dp_size(world_size)} = {expected}"
                )
    if errors:
        raise ConfigError(errors)


# ----------------------------------------------------------------------------- derived values


def resolve_deepspeed(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed dict handed to deepspeed.initialize, with the batch arithmetic filled in."""
    ds = copy.deepcopy(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.global_batch_size(world_size)
    return ds


def count_parameters(m: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of the megalite model for this shape, computed without allocating."""
    h, f, layers, v = m.hidden_size, m.ffn_size, m.num_layers, m.padded_vocab_size
    kv = m.kv_heads * m.head_dim
    norm = h * (2 if m.norm == "layernorm" else 1)
    attn = h * (h + 2 * kv) + h * h + ((h + 2 * kv) + h if m.bias else 0)
    mlp = (3 * h * f) if m.mlp == "swiglu" else (2 * h * f)
    if m.bias:
        mlp += (2 * f if m.mlp == "swiglu" else f) + h
    block = attn + mlp + 2 * norm
    embedding = v * h
    positions = m.max_position_embeddings * h if m.position == "learned" else 0
    output = 0 if m.tied_embeddings else v * h
    non_embedding = layers * block + norm
    return {
        "total": non_embedding + embedding + positions + output,
        "non_embedding": non_embedding,
        "embedding": embedding + positions + output,
    }


def summary(cfg: Config, world_size: int) -> dict:
    """Derived values shown by `megalite config show` and logged at start."""
    counts = count_parameters(cfg.model)
    gb = cfg.global_batch_size(world_size)
    return {
        "world_size": world_size,
        "data_parallel": cfg.dp_size(world_size),
        "tensor_parallel": cfg.parallel.tensor,
        "pipeline_parallel": cfg.parallel.pipeline,
        "global_batch_size": gb,
        "tokens_per_step": gb * cfg.data.seq_length,
        "padded_vocab_size": cfg.model.padded_vocab_size,
        "parameters": counts["total"],
        "non_embedding_parameters": counts["non_embedding"],
        "precision": cfg.precision,
        "zero_stage": cfg.deepspeed.get("zero_optimization", {}).get("stage", 0),
    }
