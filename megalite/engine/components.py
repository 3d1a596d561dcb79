"""The parts of a training run that decide for themselves when they act: evaluation (validation loss, and the
downstream tasks of `train.eval_tasks`), the metric window and the profiler. The trainer calls each
once per step; each knows its own interval."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalite.checkpoint.consolidate import run_tokenizer
from megalite.config import Config
from megalite.data import ResumableSampler, collate
from megalite.engine.downstream import (
    find_tasks,
    live_model_class,
    load_tasks,
    main_metrics,
    preserved_rng,
    require_lm_eval,
    run_tasks,
)
from megalite.engine.metrics import MetricSink, StepTimer
from megalite.errors import ConfigError, MegaliteError


class BatchStream:
    """Endless micro-batches for this DP rank from a ResumableSampler, epoch after epoch."""

    def __init__(self, dataset: Any, sampler: ResumableSampler, device: torch.device) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self._it: Iterator[list[int]] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.sampler)
        try:
            indices = next(self._it)
        except StopIteration:
            self._it = iter(self.sampler)  # next epoch
            indices = next(self._it)
        return collate([self.dataset[i] for i in indices], self.device)


class Evaluator:
    """Validation loss and perplexity every `train.eval_interval` steps and at the end (same on every rank)."""

    def __init__(self, cfg: Config, strategy: Any, valid_set: Any, dp_rank: int, dp_size: int,
                 device: torch.device) -> None:
        self.cfg, self.strategy, self.valid_set = cfg, strategy, valid_set
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_interval
        return bool(every and step % every == 0) or step == self.cfg.train.steps

    @torch.no_grad()
    def run(self, engine: Any) -> dict | None:
        """Mean loss over train.eval_steps micro-batches from the start of the validation split."""
        if self.valid_set is None:
            return None
        sampler = ResumableSampler(len(self.valid_set), self.dp_rank, self.dp_size, self.cfg.micro_batch_size,
                                   self.cfg.train.seed, shuffle=False)
        stream = BatchStream(self.valid_set, sampler, self.device)
        engine.eval()
        total = 0.0
        for _ in range(self.cfg.train.eval_steps):
            total += self.strategy.eval_loss(engine, next(stream))
        engine.train()
        mean = torch.tensor([total / self.cfg.train.eval_steps], dtype=torch.float64)
        dist.all_reduce(mean, group=self.strategy.grid.get_data_parallel_group())
        loss = mean.item() / self.dp_size
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class TaskEvaluator:
    """`train.eval_tasks`: lm-evaluation-harness tasks on the live model, at each evaluation (megalite.engine.downstream).

    The tasks are resolved and their data loaded at start, so an unknown task or missing data fails before step 1.
    Every rank takes part in a run (rank 0 drives the harness, the others serve its model calls); the model's
    train/eval mode and Python's, numpy's and torch's random states are left as they were (the harness seeds them).
    """

    def __init__(self, cfg: Config, is_main: bool) -> None:
        require_lm_eval()
        self.settings = cfg.train.eval_tasks
        self.seed = cfg.train.seed
        self.tokenizer, self.eod, self.bos = run_tokenizer(cfg)
        if self.eod is None:
            raise ConfigError("train.eval_tasks: the data's tokenizer has no end-of-document token, which the harness "
                              "needs as the end of text")
        self.manager, self.names = None, []
        if is_main:
            self.manager, self.names = find_tasks(self.settings.tasks, self.settings.include_path,
                                                  where="train.eval_tasks.tasks")
            load_tasks(self.manager, self.names)  # data problems now, not at the first evaluation

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """{"task/metric": score} of each task's main metric on rank 0, {} on the other ranks."""
        was_training = model.training
        model.eval()
        lm = live_model_class().for_model(model, self.tokenizer, self.eod, self.bos,
                                          batch_size=self.settings.batch_size, seed=self.seed)
        try:
            with preserved_rng():
                if not lm.calls.is_driver:
                    if not lm.calls.serve():
                        raise MegaliteError("train.eval_tasks failed on rank 0 (its error is reported there)")
                    return {}
                ok = False
                try:
                    results = run_tasks(lm, self.manager, self.names, num_fewshot=self.settings.num_fewshot,
                                        limit=self.settings.limit, bootstrap_iters=0)
                    ok = True
                finally:
                    lm.calls.close(ok)
                return main_metrics(results, self.names)
        finally:
            model.train(was_training)


class MetricWindow:
    """Training records every `train.logging` interval: loss, learning rate, gradient norm, throughput, MFU."""

    def __init__(self, cfg: Config, sink: MetricSink, timer: StepTimer, world: int, flops_per_token: float,
                 peak_tflops: float | None, is_main: bool) -> None:
        self.cfg, self.sink, self.timer, self.world, self.is_main = cfg, sink, timer, world, is_main
        self.flops_per_token, self.peak = flops_per_token, peak_tflops
        self.tokens_per_step = cfg.global_batch_size(world) * cfg.data.seq_length
        self._reset()

    def _reset(self) -> None:
        self.start, self.steps, self.losses = time.perf_counter(), 0, []

    def add(self, loss: float, skipped: bool) -> None:
        self.steps += 1
        if not skipped:
            self.losses.append(loss)

    def due(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps

    def flush(self, step: int, lr: float, grad_norm: float | None, loss_scale: float | None,
              nonfinite_skipped: int, quiet: bool) -> dict:
        """Log the window's record and start a new window."""
        elapsed = time.perf_counter() - self.start
        tflops = self.flops_per_token * self.tokens_per_step * self.steps / elapsed / self.world / 1e12
        record = {
            "kind": "train", "step": step,
            "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "tokens_per_s": self.tokens_per_step * self.steps / elapsed,
            "step_time_s": elapsed / self.steps,
            "breakdown_s": {k: v / self.steps for k, v in self.timer.pop().items()},
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "nonfinite_skipped": nonfinite_skipped,
            "memory_gb": memory_gb(),
        }
        self.sink.log(record)
        if self.is_main and not quiet:
            print(format_record(record), file=sys.stderr, flush=True)
        self._reset()
        return record


class ProfilerWindow:
    """A torch profiler trace of steps train.logging.profile_start_step..profile_end_step."""

    def __init__(self, cfg: Config, output_dir: Path) -> None:
        self.first, self.last = cfg.train.logging.profile_start_step, cfg.train.logging.profile_end_step
        self.output_dir = output_dir
        self._profiler: Any = None

    def before_step(self, step: int) -> None:
        if self.first is not None and step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            trace_dir = self.output_dir / "profile"
            trace_dir.mkdir(parents=True, exist_ok=True)
            self._profiler = torch.profiler.profile(
                activities=activities,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir),
                                                                         worker_name=f"rank{dist.get_rank()}"),
            )
            self._profiler.start()

    def after_step(self, step: int) -> None:
        if self._profiler is not None and step == self.last:
            self.close()

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None


def memory_gb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_record(r: dict) -> str:
    """One log line of a training record."""
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if r["grad_norm"] is not None:
        parts.append(f"grad_norm {r['grad_norm']:.3f}")
    parts += [f"{r['tokens_per_s']:.0f} tok/s", f"{r['step_time_s'] * 1000:.0f} ms/step",
              f"{r['tflops_per_device']:.3f} TFLOP/s/device"]
    if r["mfu"] is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    return "megalite: " + " | ".join(parts)
