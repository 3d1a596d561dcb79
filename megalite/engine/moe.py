"""Mixture-of-Experts under DeepSpeed's engines: where expert weights live at each ZeRO stage, what DeepSpeed is
told, the balancing losses' gradient scale, and the statistics and bias update after each optimizer step.

Where expert weights live (`replicate_experts`), by ZeRO stage, with expert parallelism ep > 1:
- ZeRO-1 and ZeRO-2: each rank holds its experts only. The parameters carry DeepSpeed's MoE marks
  (`allreduce=False`, `group_name`; megalite.parallel.experts), the optimizer gets DeepSpeed's MoE parameter groups
  (`split_params_into_different_moe_groups_for_optimizer`), and DeepSpeed's ZeRO-1/2 optimizer, built with
  `has_moe_layers`, reduce-scatters and partitions those groups over the expert-data-parallel ranks (the groups the
  process grid registered under DeepSpeed's name). Its gradient arithmetic: every gradient is divided by the
  data-parallel size (data x context over context) and the expert groups are summed over their expert-data-parallel
  ranks, which together hold every replica's contribution to an expert: the replicas' mean, as for dense weights.
  DeepSpeed's engine sets `has_moe_layers` only when it finds its own `deepspeed.moe.layer.MoE` class in the model,
  so `deepspeed_sees_experts` shows it a parameterless stand-in of that class while `deepspeed.initialize` runs,
  and turns the engine's flag off again afterwards: the engine then saves checkpoints in its dense format (the
  model-states file of data-parallel rank 0 holds that rank's experts; the ZeRO files every rank's partitions,
  experts included) instead of its MoE format, which expects its own MoE module classes.
- ZeRO-0 and ZeRO-3: every rank holds every expert, and expert parallelism splits only the computation (each rank
  runs its experts' slice for the tokens of its expert group). To DeepSpeed they are dense weights: the gradient of
  an expert is zero on the ranks that do not run it, so the ordinary data-parallel mean over all replicas gives
  the same gradient. ZeRO-3 partitions them over all data x context replicas itself (the state per rank is what
  ZeRO over the expert-data-parallel ranks would give, total / replicas), gathers a layer's every expert for its
  forward and backward, and reduce-scatters every expert's gradient: ep times the expert traffic of a partition
  over the expert-data-parallel group (DeepSpeed's native MoE refuses ZeRO-3; its AutoEP partitioning there is tied
  to its AutoEP layer and refuses context parallelism). At ZeRO-0 every replica holds every weight and optimizer
  state by definition; DeepSpeed's engine would split expert gradients out of its data-parallel all-reduce only
  for its own MoE class (`has_moe_layers`), and its MoE checkpoint format needs those classes, so experts stay
  dense weights there: expert memory is not divided by ep, and the all-reduce carries every expert's gradient.

The balancing losses' gradient (megalite.model.moe) is injected with the factor the LM loss's gradient carries:
1 / gradient-accumulation steps (DeepSpeed divides each micro-batch's loss by them) times the context gradient
scale (where DeepSpeed averages over context ranks instead of summing: megalite.engine.build.context_grad_scale).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist

from megalite.config import Config
from megalite.model.moe import MoE
from megalite.parallel.experts import expert_shard


def replicate_experts(cfg: Config) -> bool:
    """Whether every rank holds every expert's weights (module docstring: ZeRO-0 and ZeRO-3)."""
    return cfg.zero_stage in (0, 3)


def moe_blocks(model: torch.nn.Module) -> list[MoE]:
    """The MoE blocks of a model (or of a pipeline stage), in order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def has_split_experts(model: torch.nn.Module) -> bool:
    """Whether some parameters hold only this rank's experts (DeepSpeed must reduce them over their group)."""
    return any(expert_shard(p) is not None for p in model.parameters())


def moe_parameter_groups(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with split expert weights in groups of their own, as DeepSpeed's MoE support wants
    them (`moe: True`, named after the expert group): DeepSpeed's own splitter, after naming megalite's groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"megalite_group_{i}", **g} for i, g in enumerate(groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


def _stand_in_class() -> type:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertsStandIn(DeepSpeedMoE):
        """Parameterless: makes DeepSpeed's engine see MoE layers (`has_moe_layers`) while it builds its optimizer."""

        def __init__(self, num_experts: int) -> None:
            torch.nn.Module.__init__(self)  # not DeepSpeed's layer: none of its parameters or groups
            self.num_experts = num_experts

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # megalite's process grid made and registered the expert groups

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a stand-in for DeepSpeed's engine set-up; never run")

    return ExpertsStandIn


STAND_IN_NAME = "deepspeed_moe_stand_in"


@contextlib.contextmanager
def deepspeed_sees_experts(model: torch.nn.Module) -> Iterator[None]:
    """While the body runs (`deepspeed.initialize`), a model with split experts holds a stand-in of DeepSpeed's MoE
    class, so the engine builds its ZeRO optimizer with `has_moe_layers` (module docstring). Nothing otherwise."""
    blocks = moe_blocks(model)
    if not blocks or not has_split_experts(model):
        yield
        return
    model.add_module(STAND_IN_NAME, _stand_in_class()(blocks[0].moe.num_experts))
    try:
        yield
    finally:
        del model._modules[STAND_IN_NAME]


def after_initialize(engine: Any) -> None:
    """Turn the engine's MoE flag off once its optimizer is built: checkpoints keep the dense format (module
    docstring); ZeRO-1/2 keep their MoE groups."""
    if getattr(engine, "has_moe_layers", False):
        engine.has_moe_layers = False


def after_load(engine: Any) -> None:
    """After DeepSpeed loads a checkpoint of split experts into the same layout: its dense-format model-states file
    holds data-parallel rank 0's experts, which it copied into every rank's expert weights; the ZeRO-1/2 optimizer
    restored each rank's own fp32 partitions. Copy those back into the weights (DeepSpeed's `update_lp_params`, its
    post-step all-gather), so the first step after a resume computes with this rank's experts."""
    if has_split_experts(engine.module) and hasattr(engine.optimizer, "update_lp_params"):
        engine.optimizer.update_lp_params()


def aux_loss_scale(cfg: Config, context_grad_scale: float) -> float:
    """The factor on the LM loss's gradient, for the balancing losses (module docstring)."""
    return context_grad_scale / cfg.gradient_accumulation_steps


def collect_statistics(model: torch.nn.Module, grid: Any, sequence_parallel: bool) -> list[dict]:
    """Every MoE block's statistics since the last call, summed over the ranks that route different tokens (data x
    context replicas, and tensor-parallel ranks under sequence parallelism): per block its layer index,
    tokens_per_expert (E,) and dropped (assignments), and the mean aux and z losses over the micro-batches (None
    when not computed). A pipeline stage reports its own blocks only (`MoEWindow` joins the stages). One
    all-reduce, the step's one read from the device; a collective over those groups."""
    blocks = moe_blocks(model)
    if not blocks:
        return []
    taken = [b.take_statistics() for b in blocks]
    device = next(model.parameters()).device
    names = MoE.STATISTICS
    flat = torch.cat([torch.cat([t["tokens_per_expert"].to(device, torch.float64),
                                 torch.stack([t[name].to(device, torch.float64) for name in names])]) for t in taken])
    if grid is not None:
        dist.all_reduce(flat, group=grid.dp_proc_group)
        if sequence_parallel and grid.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(flat, group=grid.get_tensor_model_parallel_group())
    flat = flat.cpu()
    out, offset = [], 0
    for block in blocks:
        e = block.moe.num_experts
        tokens = flat[offset:offset + e]
        values = dict(zip(names, flat[offset + e:offset + e + len(names)].tolist()))
        offset += e + len(names)
        n = values["loss_forwards"]
        out.append({"layer": block.layer, "tokens_per_expert": tokens.round().long(),
                    "dropped": int(round(values["dropped"])),
                    "aux_loss": values["aux_loss_sum"] / n if n else None,
                    "z_loss": values["z_loss_sum"] / n if n else None})
    return out


def stage_joiner(grid: Any) -> Optional[Callable[[list[dict]], list[dict]]]:
    """For a pipeline run, a function that joins every stage's per-layer MoE summaries, by layer (a collective over
    the pipeline group); None without a pipeline."""
    if grid is None or grid.get_pipe_parallel_world_size() == 1:
        return None

    def join(layers: list[dict]) -> list[dict]:
        parts: list = [None] * grid.get_pipe_parallel_world_size()
        dist.all_gather_object(parts, layers, group=grid.get_pipe_parallel_group())
        return sorted((x for part in parts for x in part), key=lambda x: x["layer"])

    return join


def update_expert_biases(model: torch.nn.Module, statistics: list[dict]) -> None:
    """DeepSeek-V3's bias update of every block with an expert bias, from `collect_statistics`'s global loads."""
    for block, stats in zip(moe_blocks(model), statistics):
        block.update_bias(stats["tokens_per_expert"], block.moe.bias_update_rate)
