"""Elastic resume: a checkpoint of one layout continued on another, with its optimizer state.

The source's full training state is read one parameter at a time (`megalite.checkpoint.reshard.TrainingState`:
fp32 master weight, Adam moments or SGD momentum, step count), cut into this rank's tensor-parallel shard with the
model's own sharding description, and written into the running DeepSpeed engine: at ZeRO-1/2 and under the bf16
optimizer through DeepSpeed's parameter-fragment mapping (the same one `safe_set_full_fp32_param` uses), at ZeRO-3
into this rank's partition, at ZeRO-0 into the torch optimizer. DeepSpeed's universal checkpoint does not serve
here (0.19.8's `ds_to_universal` needs the client to describe every parameter's tensor-parallel pattern, and its
loader names parameters by module path, which differs between the dense model and the pipeline's layers);
megalite already knows how every parameter is sharded.

Experts split over an expert-parallel group (parallel.expert > 1 at ZeRO-1/2) are cut to this rank's experts before
its tensor-parallel slice (`shard_tensor` reads the split from the parameter), and DeepSpeed's fragment mapping of
their `moe` parameter groups puts each piece into this rank's partition over the expert-data-parallel ranks: any
expert-parallel degree and ZeRO stage reads any other. Buffers (the routers' expert bias) are copied whole.

Only one parameter's full state is held at a time, next to the rank's own shards.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megalite.checkpoint.reshard import ParameterState, TrainingState, moment_keys
from megalite.errors import CheckpointError
from megalite.model import tensor_parallel_group
from megalite.model.pipeline import canonical_buffers, canonical_parameters
from megalite.model.weights import load_buffers
from megalite.parallel.sharding import gather_experts, gather_tensor, shard_tensor


def load_training_state(engine: Any, grid: Any, source: TrainingState) -> dict[str, Any]:
    """Write `source`'s weights and optimizer state into `engine` (collective: every rank calls it). Returns what was
    restored: the optimizer step count and the number of parameters."""
    module = engine.module
    tp_rank = grid.get_tensor_model_parallel_rank()
    tp_size = grid.get_tensor_model_parallel_world_size()
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer (under ZeRO: over flat fp32 partitions)
    stage = engine.zero_optimization_stage()
    step = None
    count = 0
    _create_optimizer_state(engine, stage, inner)
    for name, param in canonical_parameters(module).items():
        state = source.parameter(name)
        count += 1
        step = state.step if state.step is not None else step
        # This rank's shard: its experts where they are split over an expert-parallel group, its tensor-parallel
        # slice (shard_tensor returns the full tensor itself for a parameter held whole).
        local = shard_tensor(state.fp32, param, tp_rank, tp_size)
        if tuple(local.shape) != tuple(getattr(param, "ds_shape", param.shape)):
            raise CheckpointError(f"{source.step_dir}: {name} has shard shape {tuple(local.shape)} here, the model "
                                  f"expects {tuple(getattr(param, 'ds_shape', param.shape))}")
        moments = {k: shard_tensor(v, param, tp_rank, tp_size) for k, v in state.moments.items()}
        _write_parameter(engine, stage, inner, param, local, moments)
        del state, local, moments  # before the next parameter is assembled: one full state at a time
    if step is not None:
        _set_step(inner, step)
    buffers = canonical_buffers(module)  # the routers' expert bias: the same on every rank
    if buffers:
        load_buffers(buffers, source.buffers())
    return {"optimizer_step": step, "parameters": count}


# ----------------------------------------------------------------------------- optimizer state


def _flat_partitions(engine: Any, stage: int) -> list[torch.Tensor]:
    """The fp32 tensors DeepSpeed's ZeRO optimizer hands the torch optimizer (its flat master partitions)."""
    optimizer = engine.optimizer
    if stage == 3:
        return list(optimizer.fp32_partitioned_groups_flat)
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):  # ZeRO-1/2, bf16 optimizer
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    raise CheckpointError(f"elastic resume does not know DeepSpeed's {type(optimizer).__name__}")


def _lp_groups(engine: Any) -> list[list[torch.nn.Parameter]]:
    optimizer = engine.optimizer
    for attr in ("bit16_groups", "bf16_groups"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    raise CheckpointError(f"elastic resume does not know DeepSpeed's {type(optimizer).__name__}")


def _new_state(inner: torch.optim.Optimizer, tensor: torch.Tensor) -> dict[str, Any]:
    """A zero optimizer state for `tensor` in the optimizer's own format (filled in below)."""
    state: dict[str, Any] = {key: torch.zeros_like(tensor, memory_format=torch.preserve_format)
                             for key in moment_keys(inner)}
    if not isinstance(inner, torch.optim.SGD):
        group = inner.param_groups[0]
        if type(inner).__name__ == "DeepSpeedCPUAdam":
            state["step"] = 0
        elif group.get("fused") or group.get("capturable"):
            state["step"] = torch.zeros((), dtype=torch.float32, device=tensor.device)
        else:
            state["step"] = torch.tensor(0.0)
    return state


def _create_optimizer_state(engine: Any, stage: int, inner: torch.optim.Optimizer) -> None:
    """Optimizers create their state at their first step; an elastic resume writes it before that."""
    if stage == 0:
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = _new_state(inner, p)
        return
    flats = _flat_partitions(engine, stage)
    for flat in flats:
        inner.state[flat] = _new_state(inner, flat)
    if stage in (1, 2):
        from deepspeed.utils import lazy_init_hp_params_optimizer_state  # DeepSpeed's fragment linkage

        for lp_group, flat in zip(_lp_groups(engine), flats):
            lazy_init_hp_params_optimizer_state(lp_group, flat, inner.state)


def _write_parameter(engine: Any, stage: int, inner: torch.optim.Optimizer, param: torch.nn.Parameter,
                     local: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    keys = moment_keys(inner)
    missing = [k for k in keys if k not in moments]
    if missing:
        raise CheckpointError(f"the checkpoint has no optimizer state {missing} for this optimizer "
                              f"({type(inner).__name__}); optimizer types must match")
    with torch.no_grad():
        if stage == 0:
            param.copy_(local.to(param.dtype))
            for key in keys:
                inner.state[param][key].copy_(moments[key])
            return
        if stage == 3:
            _write_zero3(engine, param, local, moments, keys)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        # ZeRO-1/2: every rank holds the whole module weight. Written here from the full fp32 weight (the cast
        # DeepSpeed's update_lp_params would do), so no all-gather of the module is needed afterwards.
        param.data.copy_(local.to(param.dtype))
        safe_set_full_fp32_param(param, local)
        for key in keys:
            safe_set_full_optimizer_state(param, moments[key], key)


def _write_zero3(engine: Any, param: torch.nn.Parameter, local: torch.Tensor, moments: dict[str, torch.Tensor],
                 keys: tuple[str, ...]) -> None:
    """This rank's ZeRO-3 partition of the weight (module and fp32 master) and its moments."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    safe_set_full_fp32_param(param, local)
    for key in keys:
        safe_set_full_optimizer_state(param, moments[key], key)
    partition = param.ds_tensor
    world = engine.optimizer._get_param_partition_world_size(param)
    rank = engine.optimizer._get_param_partition_rank(param)
    size = math.ceil(param.ds_numel / world)
    flat = local.flatten()
    start = size * rank
    piece = flat[start:start + size]
    partition.data.zero_()
    partition.data.narrow(0, 0, piece.numel()).copy_(piece.to(partition.dtype))


def _set_step(inner: torch.optim.Optimizer, step: float) -> None:
    for state in inner.state.values():
        if "step" not in state:
            continue
        if torch.is_tensor(state["step"]):
            state["step"].fill_(step)
        else:
            state["step"] = int(step)


def full_state_of(engine: Any, grid: Any) -> dict[str, ParameterState]:
    """The engine's whole training state by canonical name (collective; for tests and checks): every rank gets the
    full fp32 master weights and moments, gathered over data, tensor and expert parallelism."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # DeepSpeed's own gather

    stage = engine.zero_optimization_stage()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    keys = moment_keys(inner)
    group = tensor_parallel_group(grid)
    link_moments = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if stage < 3 and link_moments is not None and inner.state:
        # DeepSpeed (0.19.8) links the moment fragments once, right after the first parameter group's first step,
        # so the other groups' links stay empty for the whole run (and a loaded state has none): link them again.
        engine.optimizer._hp_optimizer_states_linked = False
        link_moments()
    out = {}
    for name, param in canonical_parameters(engine.module).items():
        if stage == 0 and getattr(param, "_hp_mapping", None) is None:  # plain fp32 ZeRO-0: the module is the master
            fp32 = param.detach().float()
            moments = {k: inner.state[param][k] for k in keys} if param in inner.state else {}
        else:
            fp32 = safe_get_full_fp32_param(param)
            moments = {k: safe_get_full_optimizer_state(param, k) for k in keys}
        # Tensor-parallel shards, then the experts of an expert-parallel group (split experts: each rank's own).
        out[name] = ParameterState(gather_experts(gather_tensor(fp32, param, group), param),
                                   {k: None if v is None else gather_experts(gather_tensor(v, param, group), param)
                                    for k, v in moments.items()})
    return out


def restore_schedule(schedule: Any, state: dict) -> None:
    """Put a learning-rate schedule at a saved position and set the learning rate it gives there."""
    if not state:
        return
    schedule.load_state_dict(state)
    if hasattr(schedule, "last_batch_iteration"):  # DeepSpeed's classes: re-step at the saved position
        schedule.step(schedule.last_batch_iteration)
    else:  # torch's LambdaLR
        for group, lr in zip(schedule.optimizer.param_groups, schedule.get_last_lr()):
            group["lr"] = lr


def restore_resharded(engine: Any, schedule: Any, grid: Any, source: TrainingState) -> tuple[dict, dict[str, Any]]:
    """A checkpoint of another layout continued in `engine` (collective): weights and optimizer state, the schedule's
    position and DeepSpeed's step counters. Returns the source's client state (step, sampler, counters) and what
    `load_training_state` restored. Elastic resume and the offline reshard both restore through this."""
    restored = load_training_state(engine, grid, source)
    ds_state = source.model_states()
    restore_schedule(schedule, ds_state.get("lr_scheduler") or {})
    for counter in ("global_steps", "global_samples", "skipped_steps"):
        if counter in ds_state:
            setattr(engine, counter, int(ds_state[counter]))
    manifest = source.manifest
    client = manifest.get("client_state") or manifest.get("client_state_per_rank", [{}])[0]
    return client, restored
