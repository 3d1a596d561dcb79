"""Every configuration rule that needs no hardware, in one place.

`validate` checks a whole run (and, given the world size, the layout and batch arithmetic);
`model_errors` checks a model shape at a tensor-parallel degree and is what the model itself asks
before it is built, so `megalite config check` and model construction can never disagree. Rules
never use `assert`, so they hold under `python -O`; all problems are raised together.
"""

from __future__ import annotations

import math
from typing import Any

from megalite.config.convert import not_one_of, suggest
from megalite.config.schema import (
    DEEPSPEED_SCHEDULERS,
    DEEPSPEED_SECTION_KEYS,
    DEEPSPEED_TOP_LEVEL_KEYS,
    FP8_LAYERS,
    OPTIMIZER_TYPES,
    OPTIMIZERS,
    PARAMETER_KINDS,
    SCHEDULER_TYPES,
    SCHEDULERS,
    Config,
    EvalTasksConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    nvme_offload,
)
from megalite.errors import ConfigError, shown


def _positive(errors: list[str], key: str, value: Any, allow_zero: bool = False) -> None:
    """Record `key` unless `value` is a finite number > 0 (>= 0 with allow_zero); types are checked elsewhere."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        errors.append(f"{key}: must be a finite number, got {shown(value)}")
    elif value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {shown(value)}")


def _model_number_errors(m: ModelConfig) -> list[str]:
    """Ranges of the model's numbers (the shape rules assume them)."""
    errors: list[str] = []
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings",
                "make_vocab_size_divisible_by"):
        _positive(errors, f"model.{key}", getattr(m, key))
    for key in ("num_kv_heads", "ffn_hidden_size", "attention_head_dim"):
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
    return errors


def rope_scaling_errors(m: ModelConfig) -> list[str]:
    """Problems with `model.rope_scaling` (also checked where a model is built outside a run)."""
    r = m.rope_scaling
    if r is None:
        return []
    errors = []
    if m.position != "rope":
        errors.append(f"model.rope_scaling: needs model.position='rope', got {shown(m.position)}")
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


def model_errors(m: ModelConfig, tensor: int = 1) -> list[str]:
    """The shape rules of a model at tensor-parallel degree `tensor` (numbers already known positive)."""
    errors = []
    if m.hidden_size % m.num_heads and m.attention_head_dim is None:
        errors.append(f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads={m.num_heads} (or set "
                      "model.attention_head_dim)")
    if m.num_heads % m.kv_heads:
        errors.append(f"model.num_kv_heads: {m.kv_heads} does not divide model.num_heads={m.num_heads}")
    if m.num_heads % tensor:
        errors.append(f"model.num_heads: {m.num_heads} is not divisible by parallel.tensor={tensor}")
    if m.kv_heads % tensor:
        errors.append(
            f"model.num_kv_heads: {m.kv_heads} is not divisible by parallel.tensor={tensor} "
            "(each tensor-parallel rank needs whole key/value heads)"
        )
    if m.ffn_size % tensor:
        errors.append(f"model.ffn_hidden_size: {m.ffn_size} is not divisible by parallel.tensor={tensor}")
    if m.padded_vocab_size % tensor:
        errors.append(
            f"model.make_vocab_size_divisible_by: padded vocabulary {m.padded_vocab_size} is not divisible by "
            f"parallel.tensor={tensor}; use a multiple of {tensor}"
        )
    if m.position == "rope" and m.head_dim % 2:
        errors.append(f"model.position: rope needs an even head dimension, got {m.head_dim}")
    errors.extend(rope_scaling_errors(m))
    errors.extend(fp8_errors(m))
    errors.extend(moe_errors(m, tensor))
    if m.attention_dropout > 0:
        errors.append(
            f"model.attention_dropout: {m.attention_dropout} is not supported (megalite.kernels.attention has no "
            "dropout); set it to 0.0"
        )
    return errors


# ----------------------------------------------------------------------------- FP8 (model.fp8)
_FP8_NEVER = {"embedding": "embeddings stay", "output": "the output layer stays", "norm": "norms stay"}


def fp8_errors(m: ModelConfig) -> list[str]:
    """Problems with `model.fp8` in the model alone (`fp8_precision_errors` adds the run's precision; the hardware
    rule, a CUDA device of compute capability 8.9 or newer, is preflight's)."""
    f = m.fp8
    if f is None or not isinstance(f.layers, list):
        return []
    errors = []
    if not f.layers:
        errors.append(f"model.fp8.layers: empty; list some of {', '.join(FP8_LAYERS)} or set model.fp8 to null")
    for i, name in enumerate(f.layers):
        never = next((what for key, what in _FP8_NEVER.items() if isinstance(name, str) and key in name), None)
        if never:
            errors.append(f"model.fp8.layers[{i}]: {name!r}: {never} in the run's precision; FP8 runs the blocks' "
                          f"linears: {', '.join(FP8_LAYERS)}")
        elif name not in FP8_LAYERS:
            errors.append(not_one_of(f"model.fp8.layers[{i}]", name, FP8_LAYERS, quote=True))
        elif f.layers.index(name) != i:
            errors.append(f"model.fp8.layers[{i}]: {name!r} is listed twice")
    return errors


def fp8_precision_errors(m: ModelConfig, precision: str) -> list[str]:
    """`model.fp8` against the run's precision: bf16 or fp32 activations, not fp16."""
    if m.fp8 is None or precision != "fp16":
        return []
    return ["model.fp8: not available with deepspeed.fp16.enabled: the FP8 recipes (torchao's) scale every tensor "
            "themselves around bf16 or fp32 activations, and fp16 with DeepSpeed's loss scaler on top is untested "
            "(DeepSpeed refuses fp16 on the CPU, where megalite's FP8 tests run); use deepspeed.bf16"]


# ----------------------------------------------------------------------------- Mixture-of-Experts (model.moe, parallel.expert)


def moe_errors(m: ModelConfig, tensor: int = 1) -> list[str]:
    """The rules of `model.moe` (and the q/k norm) for a model at tensor-parallel degree `tensor`."""
    e: MoEConfig | None = m.moe
    if e is None:
        return []
    errors: list[str] = []
    _positive(errors, "model.moe.num_experts", e.num_experts)
    _positive(errors, "model.moe.layer_interval", e.layer_interval)
    _positive(errors, "model.moe.routed_scaling", e.routed_scaling)
    for key in ("shared_experts", "first_dense_layers"):
        _positive(errors, f"model.moe.{key}", getattr(e, key), allow_zero=True)
    for key in ("aux_loss", "router_z_loss", "bias_update_rate"):
        _positive(errors, f"model.moe.{key}", getattr(e, key), allow_zero=True)
    for key in ("ffn_hidden_size", "shared_ffn_hidden_size", "capacity_factor"):
        if getattr(e, key) is not None:
            _positive(errors, f"model.moe.{key}", getattr(e, key))
    if errors:  # the rules below divide and compare with these numbers
        return errors
    if not 1 <= e.top_k <= e.num_experts:
        errors.append(f"model.moe.top_k: must be between 1 and model.moe.num_experts={e.num_experts}, got {e.top_k}")
    if not any(m.is_moe_layer(i) for i in range(m.num_layers)):
        errors.append(f"model.moe: no layer has experts with first_dense_layers={e.first_dense_layers} and "
                      f"layer_interval={e.layer_interval} among model.num_layers={m.num_layers}")
    if e.bias_update_rate > 0 and not e.expert_bias:
        errors.append(f"model.moe.bias_update_rate: {e.bias_update_rate} updates the per-expert routing bias, which "
                      "needs model.moe.expert_bias=true")
    if m.expert_ffn_size % tensor:
        errors.append(f"model.moe.ffn_hidden_size: the experts' {m.expert_ffn_size} units are not divisible by "
                      f"parallel.tensor={tensor} (experts are tensor-parallel like the dense MLP)")
    if m.shared_ffn_size % tensor:
        errors.append(f"model.moe.shared_ffn_hidden_size: the shared experts' {m.shared_ffn_size} units "
                      f"(shared_experts x width) are not divisible by parallel.tensor={tensor}")
    return errors


def expert_parallel_errors(cfg: Config, world_size: int | None = None) -> list[str]:
    """The rules of `parallel.expert` (expert parallelism) and of MoE training for a run; with the world size, the
    replica count."""
    p, m, ds = cfg.parallel, cfg.model, cfg.deepspeed
    fp16 = isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") is True
    if m.moe is not None and fp16 and (m.moe.aux_loss or m.moe.router_z_loss):
        return ["model.moe: the balancing losses (aux_loss, router_z_loss) with deepspeed.fp16 are refused: their "
                "gradient is injected with the LM loss's factor, which under fp16 includes DeepSpeed's dynamic loss "
                "scale, and that path is untested (fp16 does not run on the CPU test machines); use bf16"]
    ep = p.expert
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        return [f"parallel.expert: must be an integer > 0, got {ep!r}"]
    if ep == 1:
        return []
    errors = []
    if m.moe is None:
        return [f"parallel.expert: {ep} splits experts over ranks, but the model has none (set model.moe)"]
    if isinstance(m.moe.num_experts, int) and m.moe.num_experts > 0 and m.moe.num_experts % ep:
        errors.append(f"model.moe.num_experts: {m.moe.num_experts} experts cannot be split evenly over "
                      f"parallel.expert={ep} ranks")
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    stage = cfg.zero_stage
    if stage in (1, 2) and zero.get("reduce_scatter", True) is False:
        errors.append(f"deepspeed.zero_optimization.reduce_scatter: false is refused with parallel.expert={ep} at "
                      f"ZeRO-{stage}: DeepSpeed's ZeRO-1/2 reduce expert gradients over the expert-data-parallel "
                      "ranks only on the reduce-scatter path (its MoE support asserts it); leave it true")
    if stage == 2 and zero.get("contiguous_gradients", True) is False:
        errors.append(f"deepspeed.zero_optimization.contiguous_gradients: false is refused with parallel.expert={ep} "
                      "at ZeRO-2 (DeepSpeed's MoE support asserts contiguous gradients there); leave it true")
    if world_size is not None and isinstance(p.tensor, int) and isinstance(p.pipeline, int) and p.tensor > 0 \
            and p.pipeline > 0 and world_size % (p.tensor * p.pipeline) == 0:
        replicas = world_size // (p.tensor * p.pipeline)
        if replicas % ep:
            errors.append(f"parallel.expert: {ep} does not divide the {replicas} data x context replicas of the dense "
                          f"weights (world size {world_size} / (parallel.tensor x parallel.pipeline = {p.tensor} x "
                          f"{p.pipeline})); expert-parallel ranks are such replicas")
    return errors


def kv_replication(kv_heads: int, context: int) -> int | None:
    """Copies of each (tensor-parallel rank's) key/value head that context parallelism's all-to-all needs: 1 when
    the heads split evenly over the context ranks, context / kv_heads when fewer heads than ranks divide them (each
    head is replicated, Megatron's rule; DeepSpeed's own layer refuses fewer heads than ranks), None otherwise."""
    if kv_heads % context == 0:
        return 1
    if context % kv_heads == 0:
        return context // kv_heads
    return None


def context_errors(m: ModelConfig, tensor: int, context: int, seq_length: int | None = None,
                   sequence_parallel: bool = False) -> list[str]:
    """The rules of context parallelism (`parallel.context`) for a model at tensor-parallel degree `tensor`."""
    if context == 1:
        return []
    errors = []
    if m.num_heads % (tensor * context):
        errors.append(f"model.num_heads: {m.num_heads} is not divisible by parallel.tensor x parallel.context = "
                      f"{tensor} x {context} (each context rank attends with whole query heads)")
    if m.kv_heads % tensor == 0 and kv_replication(m.kv_heads // tensor, context) is None:
        errors.append(
            f"model.num_kv_heads: {m.kv_heads} key/value heads ({m.kv_heads // tensor} per tensor-parallel rank) "
            f"cannot be spread over parallel.context={context}: per tensor-parallel rank they must be a multiple of "
            "it, or divide it (then each is replicated over context / kv_heads ranks)")
    if seq_length is not None:
        unit = context * tensor if sequence_parallel and tensor > 1 else context
        if seq_length % unit:
            what = "parallel.context x parallel.tensor (sequence parallelism)" if unit != context else "parallel.context"
            errors.append(f"data.seq_length: {seq_length} is not divisible by {what} = {unit} (every rank holds an "
                          "equal contiguous chunk of each sequence)")
    return errors


def check_model(m: ModelConfig, tensor: int = 1, context: int = 1) -> None:
    """Raise ConfigError with every shape rule `m` breaks at tensor-parallel degree `tensor` (and context-parallel
    degree `context`)."""
    errors = _model_number_errors(m)
    if not errors:
        errors = model_errors(m, tensor) + context_errors(m, tensor, context)
    if errors:
        raise ConfigError(errors)


def eval_tasks_errors(e: EvalTasksConfig | None, parallel: ParallelConfig) -> list[str]:
    """Problems with `train.eval_tasks` that need no harness (task names are checked against the harness's own
    index when the run starts)."""
    if e is None:
        return []
    errors = []
    if not isinstance(e.tasks, list) or not e.tasks:
        errors.append("train.eval_tasks.tasks: give at least one lm-evaluation-harness task name, e.g. [\"hellaswag\"]")
    else:
        errors += [f"train.eval_tasks.tasks[{i}]: empty task name" for i, name in enumerate(e.tasks)
                   if isinstance(name, str) and not name.strip()]
    if e.limit is not None:
        _positive(errors, "train.eval_tasks.limit", e.limit)
    if e.num_fewshot is not None:
        _positive(errors, "train.eval_tasks.num_fewshot", e.num_fewshot, allow_zero=True)
    _positive(errors, "train.eval_tasks.batch_size", e.batch_size)
    if parallel.pipeline > 1:
        errors.append(f"train.eval_tasks: not available with parallel.pipeline={parallel.pipeline} (the harness runs the "
                      "whole model on each tensor-parallel group); evaluate the saved checkpoint with `megalite eval "
                      "--tasks`")
    if parallel.context > 1:
        errors.append(f"train.eval_tasks: not available with parallel.context={parallel.context} (the harness's "
                      "requests have any length and generation uses the KV cache, which runs at context 1); "
                      "evaluate the saved checkpoint with `megalite eval --tasks`, which reads it at any layout")
    if parallel.sequence_parallel and parallel.tensor > 1:
        errors.append("train.eval_tasks: not available with parallel.sequence_parallel at parallel.tensor="
                      f"{parallel.tensor} (the harness's requests have any length, and generation uses the KV cache, "
                      "which sequence parallelism does not); evaluate the saved checkpoint with `megalite eval --tasks`")
    return errors


def pipeline_schedule_errors(cfg: Config) -> list[str]:
    """The rules of `parallel.pipeline_schedule` (megalite.engine.pipeline_schedules has the schedules), and of
    DeepSpeed's partitioned pipeline transfers."""
    p, t, ds = cfg.parallel, cfg.train, cfg.deepspeed
    name, key = p.pipeline_schedule, "parallel.pipeline_schedule"
    if not isinstance(p.pipeline, int) or not isinstance(p.tensor, int):
        return []
    if name != "1f1b" and p.pipeline == 1:
        return [f"{key}: {name!r} orders the passes of a pipeline's stages, and parallel.pipeline=1 has one stage; "
                "leave it '1f1b' or set parallel.pipeline > 1"]
    errors = []
    section = ds.get("pipeline") if isinstance(ds.get("pipeline"), dict) else {}
    for flag in ("pipe_partitioned", "grad_partitioned"):
        if section.get(flag) is not True or p.pipeline == 1:
            continue
        if name == "dualpipev":
            errors.append(f"deepspeed.pipeline.{flag}: true is refused with {key}='dualpipev': DeepSpeed's DualPipeV "
                          "engine does not support it; leave it unset (megalite turns it off)")
        elif name == "zb-h1":
            errors.append(f"deepspeed.pipeline.{flag}: true is refused with {key}='zb-h1': its engine sends whole "
                          "activations and gradients without blocking; leave it unset (megalite turns it off)")
        elif p.sequence_parallel and p.tensor > 1:
            errors.append(f"deepspeed.pipeline.{flag}: true is refused with parallel.sequence_parallel: DeepSpeed "
                          "would send each tensor-parallel rank a slice of the tensor and all-gather the slices on "
                          "the next stage, but sequence-parallel activations differ per rank (each its own tokens); "
                          "leave it unset (megalite turns it off)")
    stages = p.pipeline
    if name == "zb-h1" and cfg.precision == "fp16":
        errors.append(f"{key}: 'zb-h1' is refused with fp16: its deferred weight-gradient pass hands DeepSpeed the "
                      "gradients for the fp32 and bf16 optimizers only (the fp16 loss scaler's and fp32-accumulation "
                      "paths are not wired to it, and fp16 cannot be tested on the CPU machines); use bf16")
    if name == "dualpipev":
        why = "each rank holds two of the 2 x parallel.pipeline chunks of DualPipeV's V"
        if cfg.gradient_accumulation_steps < 2 * stages:
            errors.append(f"deepspeed.gradient_accumulation_steps: DualPipeV needs at least 2 x parallel.pipeline = "
                          f"{2 * stages} micro-batches per step, got {cfg.gradient_accumulation_steps} ({why}; "
                          "DeepSpeed asserts it)")
        if isinstance(cfg.model.num_layers, int) and cfg.model.num_layers < 2 * stages:
            errors.append(f"model.num_layers: {cfg.model.num_layers} blocks cannot fill the {2 * stages} chunks of "
                          f"DualPipeV at parallel.pipeline={stages} ({why})")
        if isinstance(t.eval_steps, int) and t.eval_steps < 2 * stages:
            errors.append(f"train.eval_steps: DualPipeV evaluates train.eval_steps micro-batches in one pass through "
                          f"its V and needs at least 2 x parallel.pipeline = {2 * stages}, got {t.eval_steps}")
    return errors


def _validate_deepspeed(ds: dict, errors: list[str]) -> None:
    for key, value in ds.items():
        if key not in DEEPSPEED_TOP_LEVEL_KEYS:
            errors.append(
                f"deepspeed.{shown(key, quote=False)}: unknown DeepSpeed key{suggest(key, DEEPSPEED_TOP_LEVEL_KEYS)} "
                "(DeepSpeed would silently ignore it)"
            )
            continue
        allowed = DEEPSPEED_SECTION_KEYS.get(key)
        if allowed is not None:
            if not isinstance(value, dict):
                errors.append(f"deepspeed.{key}: expected an object, got {shown(value)}")
                continue
            for sub in value:
                if sub not in allowed:
                    errors.append(f"deepspeed.{key}.{shown(sub, quote=False)}: unknown key{suggest(sub, allowed)}; "
                                  f"valid: {sorted(allowed)}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            v = ds[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                errors.append(f"deepspeed.{key}: must be a positive integer, got {shown(v)}")
    if "gradient_clipping" in ds:
        v = ds["gradient_clipping"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            errors.append(f"deepspeed.gradient_clipping: must be a finite number >= 0 (0: no clipping), got {shown(v)}")
    _validate_component(ds, "optimizer", OPTIMIZERS, OPTIMIZER_TYPES, errors)
    _validate_component(ds, "scheduler", SCHEDULERS, SCHEDULER_TYPES, errors)
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        errors.append(f"deepspeed.zero_optimization: expected an object, got {shown(zero)}")
    else:
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            errors.append(f"deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {shown(stage)}")
        _validate_zero_keys(zero, errors)
    for prec in ("bf16", "fp16"):
        section = ds.get(prec)
        if isinstance(section, dict) and "enabled" in section and not isinstance(section["enabled"], bool):
            errors.append(f"deepspeed.{prec}.enabled: expected true or false, got {shown(section['enabled'])}")
    if isinstance(ds.get("bf16"), dict) and isinstance(ds.get("fp16"), dict):
        if ds["bf16"].get("enabled") and ds["fp16"].get("enabled"):
            errors.append("deepspeed: bf16.enabled and fp16.enabled are both true; choose one")


def _validate_component(ds: dict, section: str, registry: dict[str, frozenset[str]], names: tuple[str, ...],
                        errors: list[str]) -> None:
    """`deepspeed.optimizer` / `deepspeed.scheduler`: a known type and only the parameters megalite honours."""
    spec = ds.get(section)
    if spec is None:
        return
    if not isinstance(spec, dict):
        errors.append(f"deepspeed.{section}: expected an object, got {shown(spec)}")
        return
    kind = spec.get("type")
    if kind not in registry:
        errors.append(not_one_of(f"deepspeed.{section}.type", kind, names))
        return
    params = spec.get("params", {})
    if not isinstance(params, dict):
        errors.append(f"deepspeed.{section}.params: expected an object, got {shown(params)}")
        return
    allowed = registry[kind]
    for key in params:
        if key not in allowed:
            hint = suggest(key, allowed)
            listed = ", ".join(sorted(allowed)) or "none"
            errors.append(f"deepspeed.{section}.params.{shown(key, quote=False)}: not a parameter megalite's {kind} "
                          f"uses{hint}; "
                          f"valid: {listed}")
        else:
            _check_parameter(errors, f"deepspeed.{section}.params.{key}", PARAMETER_KINDS[key], params[key])
    if kind in DEEPSPEED_SCHEDULERS and params.get("warmup_num_steps", 1000) == 0:
        errors.append(f"deepspeed.scheduler.params.warmup_num_steps: DeepSpeed's {kind} needs at least 1 warm-up "
                      "step (it warms up over max(2, warmup_num_steps)); use Constant or WarmupStableDecay without one")


def _check_parameter(errors: list[str], key: str, kind: str, value: Any) -> None:
    """One optimizer or schedule parameter against its kind (schema.PARAMETER_KINDS)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if kind == "bool":
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {shown(value)}")
    elif kind == "warmup_type":
        if value not in ("log", "linear"):
            errors.append(not_one_of(key, value, ("log", "linear"), quote=True))
    elif kind == "betas":
        if not (isinstance(value, list) and len(value) == 2 and all(number(b) and 0 <= b < 1 for b in value)):
            errors.append(f"{key}: expected two numbers in [0, 1), e.g. [0.9, 0.95], got {shown(value)}")
    elif kind in ("count", "steps"):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if kind == "steps" else 0):
            errors.append(f"{key}: expected an integer {'> 0' if kind == 'steps' else '>= 0'}, got {shown(value)}")
    elif not number(value):
        errors.append(f"{key}: expected a finite number, got {shown(value)}")
    elif kind == "positive" and value <= 0:
        errors.append(f"{key}: must be > 0, got {shown(value)}")
    elif kind == "nonnegative" and value < 0:
        errors.append(f"{key}: must be >= 0, got {shown(value)}")
    elif kind == "unit" and not 0 <= value <= 1:
        errors.append(f"{key}: must be in [0, 1], got {shown(value)}")


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
            errors.append(f"deepspeed.zero_optimization.{shown(key, quote=False)}: unknown key{suggest(key, known)}")


def zero0_precision_error(precision: str, grad_accum_dtype: str | None) -> str | None:
    """Why ZeRO-0 cannot train `precision` weights accumulating gradients in `grad_accum_dtype` (None: megalite's
    default, fp32 for bf16), or None. DeepSpeed 0.19.8 wraps ZeRO-0 by dtype pair (engine._do_optimizer_sanity_check):
    equal dtypes get FP16_Optimizer (no wrapper in fp32); bf16 weights with fp32 accumulation get only
    'unsupported mix of model_dtype and grad_accum_dtype' at initialize."""
    if precision != "bf16" or grad_accum_dtype not in (None, "fp32", "float32"):
        return None
    return ("deepspeed.zero_optimization.stage: ZeRO-0 with bf16 is refused: DeepSpeed 0.19.8 has no ZeRO-0 path for "
            "bf16 weights with fp32 gradient accumulation (megalite's default for bf16; it raises 'unsupported mix of "
            "model_dtype and grad_accum_dtype'). Use stage 1 (DeepSpeed's BF16_Optimizer: fp32 gradients and master "
            "weights, the optimizer state split over the replicas), or set deepspeed.data_types.grad_accum_dtype to "
            '"bf16" to accumulate and all-reduce gradients in bf16 (DeepSpeed\'s FP16_Optimizer in bf16, GPU only)')


def watchdog_errors(t: TrainConfig) -> list[str]:
    """The hang watchdog and straggler report (megalite/engine/watchdog.py): every hang timeout must end before a
    collective times out, or the waiting ranks fail with the collective's error naming nobody."""
    errors: list[str] = []
    collective = t.collective_timeout_s if _number(t.collective_timeout_s) else None
    for key in ("hang_timeout_s", "hang_timeout_long_s"):
        value = getattr(t, key)
        if value is None:
            continue
        if not _number(value) or not value > 0:
            errors.append(f"train.{key}: expected a number of seconds > 0 (or null: derived), got {value!r}")
        elif collective is not None and value >= collective:
            errors.append(f"train.{key}: {value} s must be below train.collective_timeout_s={collective} s: a rank "
                          "waiting in a collective gives up at that timeout, naming nobody, before the watchdog "
                          "names the hung rank; lower it or raise collective_timeout_s")
    step, long = t.hang_timeout_s, t.hang_timeout_long_s
    if _number(step) and _number(long) and step > long:
        errors.append(f"train.hang_timeout_s: {step} s exceeds train.hang_timeout_long_s={long} s (the timeout of "
                      "set-up, checkpoints and evaluation, which take longer than a step)")
    if not _number(t.straggler_margin) or not t.straggler_margin > 0:
        errors.append(f"train.straggler_margin: expected a fraction > 0 (0.2: 20% above the median), got "
                      f"{t.straggler_margin!r}")
    if not isinstance(t.straggler_windows, int) or isinstance(t.straggler_windows, bool) or t.straggler_windows < 1:
        errors.append(f"train.straggler_windows: expected an integer >= 1, got {t.straggler_windows!r}")
    if not isinstance(t.watchdog, bool):
        errors.append(f"train.watchdog: expected true or false, got {t.watchdog!r}")
    return errors


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Every hardware-independent rule; raises one ConfigError listing all problems."""
    errors: list[str] = []
    m, p, d, t, ds = cfg.model, cfg.parallel, cfg.data, cfg.train, cfg.deepspeed

    errors.extend(_model_number_errors(m))
    for key in ("tensor", "pipeline", "context"):
        _positive(errors, f"parallel.{key}", getattr(p, key))
    _positive(errors, "data.seq_length", d.seq_length)
    # The shape and layout rules below divide by these numbers: they run only with sane ones (every other rule
    # still runs, so all problems are reported at once).
    numbers_ok = not errors
    _positive(errors, "data.num_workers", d.num_workers, allow_zero=True)
    for key in ("steps", "log_interval", "eval_steps", "max_consecutive_nonfinite", "collective_timeout_s"):
        _positive(errors, f"train.{key}", getattr(t, key))
    for key in ("eval_interval", "checkpoint_interval"):
        _positive(errors, f"train.{key}", getattr(t, key), allow_zero=True)
    if isinstance(t.keep_checkpoints, int) and t.keep_checkpoints < 2:
        errors.append(f"train.keep_checkpoints: must be >= 2 (one may be mid-write), got {t.keep_checkpoints}")
    if t.checkpoint_async is True and isinstance(ds, dict) and nvme_offload(ds):
        errors.append("train.checkpoint_async: true cannot be combined with NVMe offload (deepspeed "
                      "zero_optimization.offload_*.device 'nvme'): that state is swapped to disk, not held in memory "
                      "to snapshot; set it to false or leave it unset")
    for sig in t.preemption_signals if isinstance(t.preemption_signals, list) else []:
        if sig not in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
            errors.append(not_one_of("train.preemption_signals", sig, ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")))
    errors.extend(watchdog_errors(t))
    if numbers_ok:
        errors.extend(model_errors(m, p.tensor))  # model.fp8's own rules among them
        if isinstance(ds, dict) and all(isinstance(ds.get(k, {}), dict) for k in ("bf16", "fp16")):
            errors.extend(fp8_precision_errors(m, cfg.precision))
        errors.extend(context_errors(m, p.tensor, p.context, d.seq_length, p.sequence_parallel))
        if m.num_layers < p.pipeline:
            errors.append(f"model.num_layers: {m.num_layers} layers cannot fill parallel.pipeline={p.pipeline} stages")
    if numbers_ok and d.seq_length > m.max_position_embeddings:
        errors.append(
            f"data.seq_length: {d.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}"
        )
    if not d.prefixes:
        errors.append("data.prefixes: no training data given; run `megalite prepare` and list its output prefix")
    if d.weights is not None and len(d.weights) != len(d.prefixes):
        errors.append(f"data.weights: {len(d.weights)} weights for {len(d.prefixes)} prefixes")
    if d.weights is not None and any(w < 0 for w in d.weights):
        errors.append(f"data.weights: weights must be >= 0, got {shown(d.weights)}")
    split = d.split.replace("/", ",").split(",")
    try:
        parts = [float(s) for s in split]
        if len(parts) != 3 or any(x < 0 for x in parts) or parts[0] <= 0:
            raise ValueError
    except ValueError:
        errors.append(f"data.split: {shown(d.split)} must be three non-negative numbers with train > 0, e.g. '949,50,1'")
    errors.extend(eval_tasks_errors(t.eval_tasks, p))
    errors.extend(expert_parallel_errors(cfg, world_size if numbers_ok else None))
    if numbers_ok:
        errors.extend(pipeline_schedule_errors(cfg))
    if (t.logging.profile_start_step is None) != (t.logging.profile_end_step is None):
        errors.append("train.logging.profile_start_step and profile_end_step must be given together")
    elif t.logging.profile_start_step is not None and t.logging.profile_end_step <= t.logging.profile_start_step:
        errors.append("train.logging.profile_end_step must be after profile_start_step")

    _validate_deepspeed(ds, errors)
    stage = cfg.zero_stage
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
    accum = ds["data_types"].get("grad_accum_dtype") if isinstance(ds.get("data_types"), dict) else None
    if stage == 0 and (message := zero0_precision_error(cfg.precision, accum)):
        errors.append(message)
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    if isinstance(p.context, int) and p.context > 1 and stage == 3 and zero.get("reduce_scatter", True) is False:
        errors.append(
            "deepspeed.zero_optimization.reduce_scatter: false is refused with parallel.context > 1 at ZeRO-3: "
            "DeepSpeed 0.19.8 then averages gradients over the context ranks in some buckets and sums them in others "
            "(by bucket size); leave it true (megalite.engine.build.context_grad_scale)")
    if "train_micro_batch_size_per_gpu" not in ds:
        errors.append("deepspeed.train_micro_batch_size_per_gpu: required (megalite sizes its data loader by it)")

    if world_size is not None and numbers_ok:
        if world_size <= 0:
            errors.append(f"world size: must be > 0, got {world_size}")
        elif world_size < p.tensor * p.pipeline * p.context:
            degrees = ("parallel.tensor x parallel.pipeline", f"{p.tensor} x {p.pipeline}") if p.context == 1 else (
                "parallel.tensor x parallel.context x parallel.pipeline", f"{p.tensor} x {p.context} x {p.pipeline}")
            errors.append(f"world size {world_size} is too small: {degrees[0]} = {degrees[1]} needs at least "
                          f"{p.tensor * p.pipeline * p.context} GPUs (a multiple of it)")
        elif world_size % (p.tensor * p.pipeline * p.context):
            if p.context == 1:
                errors.append(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
                              f"{p.tensor} x {p.pipeline}")
            else:
                errors.append(f"world size {world_size} is not divisible by parallel.tensor x parallel.context x "
                              f"parallel.pipeline = {p.tensor} x {p.context} x {p.pipeline}")
        elif "train_batch_size" in ds and all(
            isinstance(ds.get(k, 1), int) and not isinstance(ds.get(k, 1), bool) and ds.get(k, 1) > 0
            for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
        ):
            expected = cfg.global_batch_size(world_size)
            if ds["train_batch_size"] != expected:
                errors.append(
                    f"deepspeed.train_batch_size: {ds['train_batch_size']} != micro "
                    f"{cfg.micro_batch_size} x gradient_accumulation {cfg.gradient_accumulation_steps} x data "
                    f"parallel {cfg.dp_size(world_size)} = {expected}"
                )
    if errors:
        raise ConfigError(errors)


