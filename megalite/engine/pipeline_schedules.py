"""Pipeline schedules on DeepSpeed's pipeline engine (`parallel.pipeline_schedule`).

- `1f1b`: DeepSpeed's `PipelineEngine` with its `TrainSchedule`, as `deepspeed.initialize` builds it.
- `zb-h1`: zero bubble (Qi et al. 2024, "ZB-H1"). Each backward pass is split into an input-gradient pass I, which the
  previous stage waits for, and a weight-gradient pass W, which nobody waits for; stage s keeps its W passes s
  micro-batches behind, and the deferred W passes fill the end of the step where 1F1B's earlier stages sit idle. The
  bubble drops from (p - 1)(F + I + W) to (p - 1)(F + I - W) at 1F1B's peak activation memory. `ZeroBubbleEngine`
  is a `PipelineEngine` that megalite constructs itself (`deepspeed.initialize` only picks DeepSpeed's own two
  engines); it extends the instruction map with `InputGradPass` and `WeightGradPass` and runs
  `ZeroBubbleH1Schedule`, whose pass order is `megalite.plan.schedule.rank_order` (the planner simulates the same
  order). The deferral itself lives in megalite's linears (`megalite.parallel.deferred`): in an I pass they queue
  their weight-gradient matmul with what it needs; the W pass runs the queue and hands the gradients to DeepSpeed's
  optimizer as its own backward would (into `.grad`; for BF16_Optimizer into its fp32 gradients). Norms,
  embeddings, biases, routers and experts keep their gradients in the I pass. Sends do not block (a stage that
  finished an I pass must not wait for its neighbour to leave a W pass); receives do, as in DeepSpeed.
- `dualpipev`: DeepSpeed's own `DualPipeVModule` and `DualPipeVEngine` (the module class decides the engine):
  2 x p chunks in a V, chunk r and 2p - 1 - r on rank r, so rank 0 holds the embedding and the loss (a tied
  embedding is one module there). It keeps weight gradients inside the backward. Its limits are DeepSpeed's: at
  least 2 x p micro-batches (training and evaluation), no partitioned activations or gradients (megalite turns
  them off), static shapes and no boolean tensors between stages (megalite sends hidden states, int64 positions
  and document ids, always of the same shapes).

Interleaved 1F1B (Megatron's virtual stages: chunks r, r + p, r + 2p, ... on rank r) is not offered: it does not
fit DeepSpeed 0.19.8's pipeline engine without a third engine. `PipelineModule` builds one contiguous range of
layers per rank (`_partition_layers`/`_build`), and only `DualPipeVModule` builds two, in a V; the base engine keeps
one receive buffer and one shape exchange per direction (`pipe_recv_buf`, `first_output_send`), while interleaving
sends activations of v chunks down the same link and from the last rank back to rank 0 (where `p2p.send` allows
the wrap but the engine's `is_first_stage`/`is_last_stage` decide data loading and the loss per rank, not per
chunk); and its order needs every exchange batched as in DualPipeV's `CommitP2P` to avoid deadlock with blocking
sends. DualPipeV is DeepSpeed's virtual-stage schedule, and megalite runs it.

Checkpoints do not depend on the schedule: DeepSpeed names layer files by the layer's global index, and the
optimizer state by parameter name; a resume between DualPipeV's V placement and the others' contiguous one goes
through the elastic restore (megalite.engine.checkpointer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from megalite.parallel.deferred import STORE, accumulate_into
from megalite.plan.schedule import rank_order


class InputGradPass(ds_schedule.BufferOpInstruction):
    """The backward of micro-batch `micro_batch` for its input gradients only; the linears queue their weight
    gradients for its `WeightGradPass`."""


class WeightGradPass(ds_schedule.PipeInstruction):
    """The weight gradients queued by micro-batch `micro_batch`'s `InputGradPass`."""


class ZeroBubbleH1Schedule(ds_schedule.PipeSchedule):
    """ZB-H1's instructions for one stage: `rank_order('zb-h1', ...)` with its transfers and buffers."""

    def num_pipe_buffers(self) -> int:
        # A micro-batch holds its buffer from its forward to its input-gradient pass: at most p - s of them.
        return max(2, min(self.stages - self.stage_id, self.micro_batches))

    def steps(self):
        first, last = self.is_first_stage, self.is_last_stage
        for kind, j, _ in rank_order("zb-h1", self.stages, self.micro_batches, self.stage_id):
            buffer = self._buffer_idx(j)
            if kind == "F":
                cmds = [] if first else [ds_schedule.RecvActivation(buffer)]
                if first or last:
                    cmds.append(ds_schedule.LoadMicroBatch(buffer))
                cmds.append(ds_schedule.ForwardPass(buffer))
                if not last:
                    cmds.append(ds_schedule.SendActivation(buffer))
            elif kind == "I":
                cmds = [] if last else [ds_schedule.RecvGrad(buffer)]
                cmds.append(InputGradPass(buffer, micro_batch=j))
                if not first:
                    cmds.append(ds_schedule.SendGrad(buffer))
            else:
                cmds = [WeightGradPass(micro_batch=j)]
            yield cmds
        yield [ds_schedule.ReduceTiedGrads(), ds_schedule.ReduceGrads(), ds_schedule.OptimizerStep()]


class ZeroBubbleEngine(PipelineEngine):
    """DeepSpeed's pipeline engine running ZB-H1: input-gradient and weight-gradient passes, non-blocking sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sends: list[tuple[Any, torch.Tensor]] = []
        super().__init__(*args, **kwargs)
        if self.is_pipe_partitioned or self.is_grad_partitioned:
            raise RuntimeError("ZB-H1 sends whole activations: deepspeed.pipeline.pipe_partitioned and "
                               "grad_partitioned must be false (megalite.engine.build sets them)")
        self._bf16_index: dict[int, tuple[int, int]] = {}
        if self.using_bf16_optimizer:
            for i, group in enumerate(self.optimizer.bf16_groups):
                for j, param in enumerate(group):
                    self._bf16_index[id(param)] = (i, j)

    def _train_schedule(self) -> ZeroBubbleH1Schedule:
        return ZeroBubbleH1Schedule(micro_batches=self.micro_batches, stages=self.num_stages, stage_id=self.stage_id)

    def _exec_schedule(self, pipe_schedule: Any) -> None:
        STORE.clear()  # nothing left over from a step that failed part-way
        try:
            super()._exec_schedule(pipe_schedule)
        finally:
            self._wait_for_sends()
        if STORE.pending:
            raise RuntimeError(f"ZB-H1: weight-gradient passes of micro-batches {STORE.pending} never ran")

    # ------------------------------------------------------------------ passes
    def _exec_input_grad_pass(self, buffer_id: int, micro_batch: int) -> None:
        received = self.grad_layer
        if not self.is_last_stage():
            # DeepSpeed receives every gradient into one buffer, and the deferred weight gradients keep what the
            # backward hands the linears (a residual branch passes the received tensor itself): give it a copy.
            self.grad_layer = received.clone() if torch.is_tensor(received) else [g.clone() for g in received]
        try:
            with STORE.deferring(micro_batch):
                self._exec_backward_pass(buffer_id)
        finally:
            self.grad_layer = received  # the receive buffer, for the next RecvGrad

    def _exec_weight_grad_pass(self, micro_batch: int) -> None:
        """The deferred weight gradients of `micro_batch`, added where DeepSpeed's optimizer reads gradients. Under
        BF16_Optimizer this goes through its public steps, as the engine's own backward does: clear the bf16
        gradients, set the deferred ones, add every bf16 gradient into the fp32 ones (one pass over the stage's
        gradients per W pass)."""
        work = STORE.pop(micro_batch)
        optimizer = self.optimizer
        if not self.using_bf16_optimizer:  # ZeRO-1 (fp32): gradients accumulate in .grad until ReduceGrads
            for param, grad in work:
                accumulate_into(param, grad)
            return
        if self._config.bfloat16_config.immediate_grad_update:  # its hooks move each gradient to fp32 at once
            for param, grad in work:
                accumulate_into(param, grad)
                optimizer.accumulate_hp_grads_and_remove_lp(param, *self._bf16_index[id(param)])
            return
        # As the engine's own backward: clear the bf16 gradients, compute, add them all into the fp32 ones.
        optimizer.clear_lp_grads()
        for param, grad in work:
            accumulate_into(param, grad)
        optimizer.update_hp_grads(clear_lp_grads=False)

    # ------------------------------------------------------------------ non-blocking sends
    def _isend(self, tensor: torch.Tensor, stage: int) -> None:
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, self.grid.stage_to_global(stage)), tensor))

    def _wait_for_sends(self) -> None:
        sends, self._sends = self._sends, []
        for work, _ in sends:
            work.wait()

    def _exec_send_activations(self, buffer_id: int) -> None:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        if self.first_output_send:  # shapes once, as DeepSpeed does (a blocking exchange)
            self.first_output_send = False
            self._send_tensor_meta(outputs, self.next_stage)
        for tensor in outputs if isinstance(outputs, tuple) else (outputs,):
            self._isend(tensor, self.next_stage)

    def _exec_send_grads(self, buffer_id: int) -> None:
        inputs = self.pipe_buffers["inputs"][buffer_id]
        for tensor in inputs if isinstance(inputs, tuple) else (inputs,):
            if tensor.is_floating_point():
                if tensor.grad is None:
                    raise RuntimeError("ZB-H1: an input of this stage received no gradient")
                self._isend(tensor.grad, self.prev_stage)
        self.pipe_buffers["inputs"][buffer_id] = None

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        InputGradPass: _exec_input_grad_pass,
        WeightGradPass: _exec_weight_grad_pass,
        ds_schedule.SendActivation: _exec_send_activations,
        ds_schedule.SendGrad: _exec_send_grads,
    }


def initialize_engine(engine_class: type, model: Any, optimizer: Any, lr_scheduler: Any, config: dict) -> Any:
    """`deepspeed.initialize`'s pipeline branch with `engine_class` (a PipelineEngine) as the engine class:
    `ZeroBubbleEngine`, which `deepspeed.initialize` cannot pick, or a subclass of an engine (the pipeline bench's
    timed ones)."""
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig

    deepspeed.zero.partition_parameters.shutdown_init_context()
    ds_comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)
    mpu = model.mpu()
    config_class = DeepSpeedConfig(config, mpu)
    deepspeed.set_optimizer_flags(config_class, model)
    engine = engine_class(args=None, model=model, optimizer=optimizer, model_parameters=None,
                          training_data=None, lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=False,
                          collate_fn=None, config=config, config_class=config_class)
    deepspeed.zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine


def dualpipev_eval_mean(engine: Any, micro_batches: list) -> float:
    """The mean loss of `micro_batches` (at least 2 x stages) evaluated in one pass through DualPipeV's V.

    DeepSpeed 0.19.8's DualPipeVEngine files a micro-batch's labels and its turn-around on the last rank under
    `buffer + engine.micro_batches` (the training count), while its evaluation schedule numbers the buffers by the
    evaluation's count: any other count than the training one reads an empty buffer. The engine's count is the
    evaluation's for the duration of the pass."""
    training = engine.micro_batches
    engine.micro_batches = len(micro_batches)
    try:
        return float(engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches)))
    finally:
        engine.micro_batches = training
