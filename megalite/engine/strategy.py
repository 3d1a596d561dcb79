"""How a step runs: one object per parallelism strategy, the only place dense and pipeline runs differ.

`DenseStrategy` drives DeepSpeed's engine micro-batch by micro-batch (forward, backward, step), with a
tensor-parallel `Transformer`. `PipelineStrategy` hands a step's micro-batches to DeepSpeed's pipeline
engine (`train_batch`), with the model as a `PipelineModule` of megalite's layer specs.

Every step ends with all ranks agreeing on "a loss or gradient was not finite" and on the loop's alerts (flags a
rank raises that every rank must act on at the same step: a preemption signal arrived, a background checkpoint
failed). The dense path carries them in the one small all-reduce it makes per micro-batch; the pipeline path makes
one at the end of its step. Agreeing at the same boundary is what lets every rank save, skip or stop together
instead of hanging in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megalite.config import Config
from megalite.distributed import any_rank
from megalite.engine import watchdog
from megalite.engine.build import context_grad_scale
from megalite.engine.metrics import StepTimer
from megalite.engine.moe import aux_loss_scale, collect_statistics, update_expert_biases
from megalite.engine.pipeline_schedules import dualpipev_eval_mean
from megalite.errors import MegaliteError
from megalite.model import build_model, load_full_state_dict, tensor_parallel_group
from megalite.model.pipeline import PipelineLoss, load_pipeline_state, pipeline_specs


@dataclass
class StepOutcome:
    """What one optimizer step did, agreed by every rank."""

    loss: float  # mean over the global batch; NaN when skipped
    skipped: bool  # a non-finite loss or gradient: parameters and optimizer state untouched
    alerts: tuple[bool, ...]  # each of the loop's alerts: raised on some rank before the step's end


class Strategy:
    """The model, the step and the evaluation loss of one kind of parallelism."""

    def __init__(self, cfg: Config, grid: Any, device: torch.device) -> None:
        self.cfg, self.grid, self.device = cfg, grid, device
        self.dp_size = grid.get_data_parallel_world_size()
        self.grad_norm: float | None = None  # set where DeepSpeed keeps none (ZeRO-0 fp32)
        # The MoE blocks' statistics of the last step, summed over the ranks (megalite.engine.moe.collect_statistics);
        # [] without MoE layers.
        self.moe_statistics: list[dict] = []

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def load_full_state(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a whole-model canonical state dict into this rank's shards (train.init_from)."""
        raise NotImplementedError

    def train_step(self, engine: Any, batches: Iterator[dict], timer: StepTimer,
                   alerts: Callable[[], tuple[bool, ...]]) -> StepOutcome:
        """One optimizer step; `alerts()` gives this rank's alert flags, read as late as the step allows."""
        raise NotImplementedError

    def eval_loss(self, engine: Any, batch: dict) -> float:
        raise NotImplementedError

    def eval_total(self, engine: Any, batches: Iterator[dict], count: int) -> float:
        """The sum of the evaluation losses of the next `count` micro-batches."""
        return sum(self.eval_loss(engine, next(batches)) for _ in range(count))

    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword inputs beyond ids and labels that the data options ask for."""
        out = {}
        if self.cfg.data.reset_position_ids:
            out["position_ids"] = batch["position_ids"]
        if self.cfg.data.reset_attention_mask:
            out["document_ids"] = batch["document_ids"]
        return out

    def after_step(self, engine: Any, skipped: bool) -> None:
        """The MoE blocks' statistics of the step (a collective over the replicas), and the expert-bias update when
        the step was applied."""
        self.moe_statistics = collect_statistics(engine.module, self.grid, self.cfg.parallel.sequence_parallel)
        if not skipped:
            update_expert_biases(engine.module, self.moe_statistics)

    def refused_by_deepspeed(self, engine: Any, skipped_before: int) -> bool:
        """DeepSpeed skipped the last optimizer step for a non-finite gradient norm. Under fp16 its skips are
        the loss scaler's normal search for a scale, not failures, so they are not counted."""
        return engine.skipped_steps > skipped_before and self.cfg.precision != "fp16"


class DenseStrategy(Strategy):
    """Tensor parallelism (and sequence parallelism) under DeepSpeed's ZeRO engine, data parallel around it."""

    def build_model(self) -> torch.nn.Module:
        scale = context_grad_scale(self.cfg)
        return build_model(self.cfg.model, self.cfg.parallel, self.grid, seed=self.cfg.train.seed,
                           context_grad_scale=scale, aux_loss_scale=aux_loss_scale(self.cfg, scale))

    def load_full_state(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_full_state_dict(model, state, tensor_parallel_group(self.grid))

    def train_step(self, engine: Any, batches: Iterator[dict], timer: StepTimer,
                   alerts: Callable[[], tuple[bool, ...]]) -> StepOutcome:
        losses = []
        skipped = False
        agreed = tuple(False for _ in alerts())
        ga = self.cfg.gradient_accumulation_steps
        timer.start()
        for micro in range(ga):
            watchdog.phase("data")
            batch = next(batches)
            timer.lap("data")
            if skipped:
                continue  # the data of a skipped step is consumed all the same
            watchdog.phase("forward")
            loss = engine(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                          **self.model_inputs(batch))
            timer.lap("forward")
            # One all-reduce per micro-batch carries every flag, so the step boundary needs no extra one.
            nonfinite, *raised = any_rank([not math.isfinite(loss.item()), *alerts()], self.device)
            agreed = tuple(a or r for a, r in zip(agreed, raised))
            if nonfinite:
                skipped = True
                if micro > 0:  # drop the gradients of the micro-batches already accumulated
                    engine.optimizer.zero_grad()
                    engine.micro_steps -= micro
                continue
            losses.append(loss.detach())
            watchdog.phase("backward")
            engine.backward(loss)
            timer.lap("backward")
            if micro == ga - 1 and self.clips_itself(engine):
                # DeepSpeed's ZeRO-0 keeps no norm and applies a non-finite step; megalite checks and clips here.
                self.grad_norm = global_grad_norm(engine.module.parameters(), self.grid)  # same on every rank
                if not math.isfinite(self.grad_norm):
                    engine.zero_grad()
                    engine.micro_steps -= micro
                    skipped = True
                    continue
                clip_gradients(engine.module.parameters(), self.grad_norm, self.cfg.deepspeed.get("gradient_clipping", 0))
            skipped_before = engine.skipped_steps
            watchdog.phase("optimizer step")
            engine.step()
            timer.lap("optimizer")
            if micro == ga - 1 and self.refused_by_deepspeed(engine, skipped_before):
                skipped = True  # ZeRO's optimizers refuse a step whose gradient norm is not finite
        self.after_step(engine, skipped)
        if skipped:
            return StepOutcome(float("nan"), True, agreed)
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean, group=self.grid.get_data_parallel_group())
        return StepOutcome(mean.item() / self.dp_size, False, agreed)

    def clips_itself(self, engine: Any) -> bool:
        """ZeRO-0 in fp32: DeepSpeed's optimizer wrapper keeps no gradient norm, so megalite computes it (to skip a
        non-finite step and to log it) and clips with it (engine.build turns DeepSpeed's clipping off there)."""
        return engine.zero_optimization_stage() == 0 and self.cfg.precision == "fp32"

    def eval_loss(self, engine: Any, batch: dict) -> float:
        return float(engine(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                            **self.model_inputs(batch)))


class PipelineStrategy(Strategy):
    """DeepSpeed's pipeline engine over megalite's layer specs (tensor parallelism inside each stage)."""

    def build_model(self) -> torch.nn.Module:
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.dualpipev import DualPipeVModule

        cfg = self.cfg
        scale = context_grad_scale(cfg)
        loss_fn = PipelineLoss(cfg.model, self.grid, scale)
        # DualPipeV: the layers cut into 2 x stages chunks in a V (megalite.engine.pipeline_schedules).
        module_class = DualPipeVModule if cfg.parallel.pipeline_schedule == "dualpipev" else PipelineModule
        model = module_class(
            layers=pipeline_specs(cfg.model, cfg.parallel, self.grid, seed=cfg.train.seed,
                                  aux_loss_scale=aux_loss_scale(cfg, scale)),
            topology=self.grid.topology,
            loss_fn=loss_fn,
            # "uniform": the same number of Transformer blocks per stage; "parameters": balance weights.
            partition_method="type:BlockPipe" if cfg.parallel.pipeline_partition == "uniform" else "parameters",
            activation_checkpoint_interval=1 if cfg.model.activation_checkpointing else 0,
            checkpointable_layers=["BlockPipe"],
        )
        loss_fn.bind(model)
        return model

    def load_full_state(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_pipeline_state(model, state, self.grid)

    def train_step(self, engine: Any, batches: Iterator[dict], timer: StepTimer,
                   alerts: Callable[[], tuple[bool, ...]]) -> StepOutcome:
        # train_batch runs forward, backward and the optimizer step in one call, so the skip hooks into
        # DeepSpeed's ZeRO-1 optimizer: it refuses a step whose gradient norm is not finite (fp32, and bf16
        # with bf16.check_grad_overflow, which megalite turns on) and counts it in engine.skipped_steps.
        timer.start()
        skipped_before = engine.skipped_steps
        watchdog.phase("pipeline step")
        loss = float(engine.train_batch(data_iter=self._micro_batches(batches)))
        timer.lap("pipeline")
        skipped = self.refused_by_deepspeed(engine, skipped_before)
        self.after_step(engine, skipped)
        if not math.isfinite(loss) and not skipped:
            raise MegaliteError(f"non-finite loss {loss} and DeepSpeed applied the step")
        return StepOutcome(float("nan") if skipped else loss, skipped, tuple(any_rank(alerts(), self.device)))

    def eval_loss(self, engine: Any, batch: dict) -> float:
        return float(engine.eval_batch(iter([self._pipeline_batch(batch)]), num_micro_batches=1))

    def eval_total(self, engine: Any, batches: Iterator[dict], count: int) -> float:
        if self.cfg.parallel.pipeline_schedule != "dualpipev":
            return super().eval_total(engine, batches, count)
        # DualPipeV evaluates at least 2 x stages micro-batches at a time (config.validate sees to it): all of them
        # in one pass through the V; DeepSpeed returns their mean.
        return dualpipev_eval_mean(engine, [self._pipeline_batch(next(batches)) for _ in range(count)]) * count

    def _pipeline_batch(self, b: dict) -> tuple:
        """((input_ids, position_ids[, document_ids]), (labels, loss_mask)) for the pipeline engine."""
        inputs = (b["input_ids"], b["position_ids"])
        if self.cfg.data.reset_attention_mask:
            inputs += (b["document_ids"],)
        return inputs, (b["labels"], b["loss_mask"])

    def _micro_batches(self, batches: Iterator[dict]) -> Iterator[tuple]:
        for _ in range(self.cfg.gradient_accumulation_steps):
            yield self._pipeline_batch(next(batches))


def strategy_for(cfg: Config, grid: Any, device: torch.device) -> Strategy:
    """The strategy of a run's layout."""
    return PipelineStrategy(cfg, grid, device) if cfg.parallel.pipeline > 1 else DenseStrategy(cfg, grid, device)


def global_grad_norm(parameters: Iterable[torch.nn.Parameter], grid: Any) -> float:
    """The L2 norm of the whole model's gradient: tensor-parallel shards summed over the TP group, replicated
    parameters counted once, accumulated in float64 (NaN when not finite).

    float64 because torch's CPU fp32 norm of a large tensor accumulates error with its size (relative 1e-5 at 1M
    elements, 4e-4 at 10M): DeepSpeed's ZeRO-0 clipping, which takes per-parameter fp32 norms, logged and clipped
    with a norm 1.5e-5 below the true one for the demo's embedding, and the runs drifted from ZeRO-1/3's.
    """
    tp_rank = grid.get_tensor_model_parallel_rank() if grid is not None else 0
    total = None
    for p in parameters:
        if p.grad is None or not (tp_rank == 0 or getattr(p, "tensor_model_parallel", False)):
            continue
        square = p.grad.detach().double().pow(2).sum()
        total = square if total is None else total + square
    if total is None:
        return 0.0
    if grid is not None and grid.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=grid.get_tensor_model_parallel_group())
    norm = float(total.sqrt())
    return norm if math.isfinite(norm) else float("nan")


def clip_gradients(parameters: Iterable[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    """Scale the gradients so that their global norm is at most `max_norm` (torch's and DeepSpeed's rule, with
    their 1e-6 guard); no-op for max_norm 0."""
    if max_norm and max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(coef)
