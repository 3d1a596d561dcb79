"""DeepSpeed wiring: optimizer and schedule from the config, then `deepspeed.initialize`.

megalite builds the optimizer and learning-rate schedule itself from the `deepspeed` section's
`optimizer` and `scheduler` entries (DeepSpeed's own keys), because DeepSpeed's config `"Adam"`
silently means AdamW and its fused optimizers need a long JIT build. The mapping is explicit:
AdamW = decoupled weight decay, Adam = L2 penalty, SGD = momentum. Norms, biases and embeddings
get no weight decay.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from megalite.config import DEEPSPEED_SCHEDULERS, OPTIMIZERS, SCHEDULERS, Config, resolve_deepspeed
from megalite.engine.moe import after_initialize, deepspeed_sees_experts, has_split_experts, moe_parameter_groups
from megalite.engine.pipeline_schedules import ZeroBubbleEngine, initialize_engine
from megalite.errors import ConfigError
from megalite.model.weights import parameter_groups


def offloads_optimizer(ds: dict) -> bool:
    """Whether the DeepSpeed config moves optimizer state and step to the CPU (or NVMe)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def build_optimizer(model: torch.nn.Module, spec: dict, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD from DeepSpeed's `optimizer` entry: torch's fused kernels on CUDA, DeepSpeed's
    vectorised CPU Adam when the step is offloaded (DeepSpeed requires it there; built on first use)."""
    kind = spec.get("type", "AdamW")
    if kind not in OPTIMIZER_BUILDERS:
        raise ConfigError(f"deepspeed.optimizer.type: {kind!r} is not one of {', '.join(OPTIMIZERS)}")
    params = dict(spec.get("params", {}))
    lr = float(params.pop("lr", 1e-3))
    groups = parameter_groups(model, float(params.pop("weight_decay", 0.0)))
    if has_split_experts(model):  # experts held per rank: DeepSpeed's MoE groups (megalite.engine.moe)
        groups = moe_parameter_groups(groups)
    params.pop("torch_adam", None)  # DeepSpeed's switches for its own Adam; megalite always builds torch's
    params.pop("adam_w_mode", None)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    try:
        return OPTIMIZER_BUILDERS[kind](groups, lr, params, on_cuda, offload)
    except TypeError as e:
        raise ConfigError(f"deepspeed.optimizer.params: {e}") from None


def _adam(decoupled: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(groups: list[dict], lr: float, params: dict, on_cuda: bool, offload: bool) -> torch.optim.Optimizer:
        args = {}
        if "betas" in params:
            args["betas"] = tuple(params.pop("betas"))
        if "eps" in params:
            args["eps"] = float(params.pop("eps"))
        if params:
            raise ConfigError(f"deepspeed.optimizer.params: unsupported keys {sorted(params)} for Adam/AdamW")
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # DeepSpeed's op, built on first use

            try:
                return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=decoupled, **args)
            except Exception as e:  # noqa: BLE001 - the JIT build of the op failed: say so at start-up
                raise ConfigError(
                    "deepspeed.zero_optimization.offload_optimizer: DeepSpeed's CPU Adam (the optimizer an offloaded "
                    f"Adam/AdamW step needs) could not be built on this machine: {type(e).__name__}: {e}. It is "
                    "compiled on first use and needs a C++ compiler and ninja; or train without offload_optimizer"
                ) from None
        # Adam: weight decay is an L2 term added to the gradient; AdamW: decoupled weight decay.
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return cls(groups, lr=lr, fused=on_cuda or None, **args)

    return build


def _sgd(groups: list[dict], lr: float, params: dict, on_cuda: bool, offload: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=float(params.pop("momentum", 0.9)),
                           nesterov=bool(params.pop("nesterov", False)), **params)


# One builder per name of config.OPTIMIZERS (tests/test_engine.py checks the two lists are the same).
OPTIMIZER_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": _adam(decoupled=True), "Adam": _adam(decoupled=False), "SGD": _sgd,
}


def build_schedule(optimizer: torch.optim.Optimizer, spec: dict | None, total_steps: int) -> Any:
    """The learning-rate schedule of DeepSpeed's `scheduler` entry, stepped once after every optimizer step.

    WarmupLR, WarmupDecayLR and WarmupCosineLR are DeepSpeed's own classes with DeepSpeed's parameters and
    defaults (warmup_type 'log', WarmupDecayLR's warmup_max_lr 0.001, ...), so a DeepSpeed config means here what
    it means in DeepSpeed; `total_num_steps` defaults to train.steps. WarmupStableDecay and Constant are megalite's
    (`lr_multiplier`, formulas in the README).
    """
    spec = spec or {"type": "Constant"}
    kind = spec.get("type", "Constant")
    params = dict(spec.get("params", {}))
    if kind in DEEPSPEED_SCHEDULERS:
        from deepspeed.runtime import lr_schedules  # DeepSpeed's classes (DeepSpeed is imported by now anyway)

        if kind != "WarmupLR":
            params.setdefault("total_num_steps", total_steps)
        return getattr(lr_schedules, kind)(optimizer, **params)
    if kind not in SCHEDULES:
        raise ConfigError(f"deepspeed.scheduler.type: {kind!r} is not one of {', '.join(SCHEDULERS)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(spec, total_steps))


def lr_multiplier(spec: dict, total_steps: int) -> Callable[[int], float]:
    """megalite's own schedules as a function s -> multiplier of the base learning rate, where s is the number of
    optimizer steps already taken (the first step uses s = 0)."""
    kind = spec.get("type", "Constant")
    if kind not in SCHEDULES:
        raise ConfigError(f"deepspeed.scheduler.type: {kind!r} has no megalite formula (one of {', '.join(SCHEDULES)})")
    return SCHEDULES[kind](spec.get("params", {}), total_steps)


def _constant(p: dict, total_steps: int) -> Callable[[int], float]:
    return lambda s: 1.0


def _warmup_stable_decay(p: dict, total_steps: int) -> Callable[[int], float]:
    warmup = int(p.get("warmup_num_steps", 0))
    start = float(p.get("warmup_min_ratio", 0.0))
    total = int(p.get("total_num_steps", total_steps))
    floor = float(p.get("min_ratio", 0.0))
    decay = int(p.get("decay_num_steps", round(float(p.get("decay_fraction", 0.1)) * total)))

    def wsd(s: int) -> float:
        if s < warmup:
            return start + (1.0 - start) * (s + 1) / warmup
        if s < total - decay:
            return 1.0
        return floor + (1.0 - floor) * max(0.0, (total - s) / max(1, decay))

    return wsd


# megalite's own schedules; DeepSpeed's are its classes (config.DEEPSPEED_SCHEDULERS). Together they are
# config.SCHEDULERS (tests/test_engine.py checks it).
SCHEDULES: dict[str, Callable[[dict, int], Callable[[int], float]]] = {
    "Constant": _constant, "WarmupStableDecay": _warmup_stable_decay,
}


def context_grad_scale(cfg: Config) -> float:
    """The factor on each context rank's loss gradient that makes DeepSpeed's gradient reduction come out as the
    gradient of the whole micro-batch's loss (megalite.parallel.context).

    DeepSpeed sums the context ranks' gradients and averages over data-parallel replicas (it divides by the
    sequence-data-parallel size over the sequence-parallel size) at ZeRO-0, ZeRO-1/2 and in ZeRO-3's contiguous
    path: factor 1. Two places average over data x context instead, so the factor is the context size there: the
    pipeline engine (it knows no context group; its data axis holds the data x context ranks), and ZeRO-3's
    reduce-scatter path (DeepSpeed 0.19.8 `__avg_scatter_grads`, taken with `reduce_scatter: true`, the default,
    or a bucket larger than `reduce_bucket_size`: it never multiplies back by the sequence-parallel size; megalite
    refuses `reduce_scatter: false` with context parallelism at ZeRO-3 so that the path is always this one).
    Measured: tests/test_context_parallel.py holds every case to the one-process loop.
    """
    cp = cfg.parallel.context
    if cp > 1 and (cfg.parallel.pipeline > 1 or cfg.zero_stage == 3):
        return float(cp)
    return 1.0


def deepspeed_dict(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's config without the entries megalite turns into objects itself."""
    ds = resolve_deepspeed(cfg, world_size)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10**9)  # megalite logs; DeepSpeed's own print is noise
    if cfg.parallel.pipeline > 1 and cfg.parallel.context > 1:
        # DeepSpeed's pipeline engine knows no context group: its data axis holds data x context ranks, each of which
        # it counts as a data-parallel replica in its batch arithmetic (the context ranks of one replica read the same
        # samples; megalite.parallel.grid).
        ds["train_batch_size"] *= cfg.parallel.context
    p = cfg.parallel
    if p.pipeline > 1 and (p.pipeline_schedule != "1f1b" or (p.sequence_parallel and p.tensor > 1)):
        # DeepSpeed's partitioned activations (its default with tensor parallelism) send each tensor-parallel rank
        # a 1/tp slice of the tensor and all-gather it on the other side: right for activations every TP rank
        # holds alike, wrong for sequence-parallel ones (each rank's are its own tokens: 1F1B trained on a mix of
        # the ranks' slices). ZB-H1's non-blocking sends and DeepSpeed's DualPipeV move whole tensors. validate
        # refuses these set to true.
        ds.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
    if cfg.precision == "bf16":
        # Gradients accumulate and reduce in fp32; fp32 master weights and optimizer state. A step whose
        # gradient norm is not finite is skipped by DeepSpeed itself (the pipeline engine relies on it).
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds["bf16"].setdefault("check_grad_overflow", True)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.zero_stage == 0 and cfg.precision == "fp32" and cfg.parallel.pipeline == 1:
        # megalite clips at ZeRO-0 itself, with its float64 global norm (engine.strategy.DenseStrategy).
        ds["gradient_clipping"] = 0.0
    if cfg.zero_stage == 3:
        # Full weights in the model-states file at every save: `convert`, `eval` and `generate` read them there.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    opt_type = cfg.deepspeed.get("optimizer", {}).get("type", "AdamW")
    if opt_type == "SGD" and cfg.zero_stage > 0:
        ds["zero_allow_untested_optimizer"] = True
        if offloads_optimizer(ds):
            ds["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed has no CPU SGD: torch's runs on the CPU
    return ds


def build_engine(model: torch.nn.Module, cfg: Config, grid: Any, world_size: int) -> tuple[Any, Any]:
    """`deepspeed.initialize` (or the pipeline engine for a PipelineModule) with megalite's optimizer."""
    import deepspeed

    spec = copy.deepcopy(cfg.deepspeed.get("optimizer", {"type": "AdamW", "params": {"lr": 1e-3}}))
    optimizer = build_optimizer(model, spec, offload=offloads_optimizer(cfg.deepspeed))
    schedule = build_schedule(optimizer, cfg.deepspeed.get("scheduler"), cfg.train.steps)
    is_pipeline = cfg.parallel.pipeline > 1
    ds_config = deepspeed_dict(cfg, world_size)
    if cfg.parallel.context > 1 and cfg.zero_stage == 3:
        partition_over_replicas(model, ds_config, grid)
    with deepspeed_sees_experts(model):  # ZeRO-1/2 reduce split experts over their group (megalite.engine.moe)
        if is_pipeline and cfg.parallel.pipeline_schedule == "zb-h1":  # an engine deepspeed.initialize cannot pick
            engine = initialize_engine(ZeroBubbleEngine, model, optimizer, schedule, ds_config)
            schedule = engine.lr_scheduler
        else:  # DeepSpeed's engines; a DualPipeVModule gets its DualPipeVEngine
            engine, optimizer, _, schedule = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                lr_scheduler=schedule,
                config=ds_config,
                mpu=None if is_pipeline else grid,  # a PipelineModule brings its own topology
                dist_init_required=False,
            )
    after_initialize(engine)
    return engine, schedule


def partition_over_replicas(model: torch.nn.Module, ds_config: dict, grid: Any) -> None:
    """ZeRO-3 with context parallelism: partition the parameters over data x context ranks before DeepSpeed does.

    DeepSpeed 0.19.8's ZeRO-3 partitions a model's parameters over `mpu.get_data_parallel_group()` (the data ranks
    only) but reduce-scatters their gradients and keeps the optimizer's partitions over the sequence-data-parallel
    group (data x context): the two disagree, and the gradients come out wrong without an error (the mismatch
    DeepSpeed issue 6582 reports as a size error). Partitioning the parameters here, with DeepSpeed's own
    `zero.Init` over the sequence-data-parallel group, makes DeepSpeed keep them as they are (it converts only
    parameters that are not partitioned yet), so every ZeRO-3 structure uses the one group.
    """
    import deepspeed

    deepspeed.zero.Init(module=model, data_parallel_group=grid.get_sequence_data_parallel_group(),
                        config_dict_or_path=ds_config, mpu=grid)
