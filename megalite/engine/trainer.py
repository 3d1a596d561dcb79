"""One training run: set-up (process grid, data, model, DeepSpeed engine), then a short loop over steps.

Set-up phases that can fail on some ranks only end with an agreement (`megalite.distributed.agree`), so
every rank raises the failing rank's error instead of the others waiting in the next collective. The
preemption handler is installed first, before anything slow: a signal during set-up or resume makes the
run exit 75 (requeue) before its first step, with nothing new to save.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megalite import kernels
from megalite.checkpoint import MANIFEST, CheckpointManager, model_signature, resolve_checkpoint, run_identity
from megalite.checkpoint.consolidate import load_full_weights
from megalite.checkpoint.reshard import TrainingState
from megalite.config import Config, ModelConfig, summary, validate
from megalite.data import ResumableSampler, build_datasets
from megalite.data.prepare import manifest_tokenizer
from megalite.distributed import agree, any_rank
from megalite.engine import launch, signals, stragglers, watchdog
from megalite.engine.build import build_engine
from megalite.engine.components import (
    BatchStream,
    Checkpointer,
    Evaluator,
    MetricWindow,
    ProfilerWindow,
    TaskEvaluator,
)
from megalite.engine.elastic import load_training_state, restore_schedule
from megalite.engine.metrics import (
    MetricSink,
    StepTimer,
    device_peak_tflops,
    flops_per_token,
    mean_document_length,
    plot_losses,
)
from megalite.engine.plan import startup_report
from megalite.engine.preflight import checkpoint_bytes, run_preflight
from megalite.engine.strategy import strategy_for
from megalite.errors import CheckpointError, ConfigError, MegaliteError
from megalite.interop.hf import load_hf_state
from megalite.parallel import ProcessGrid
from megalite.parallel.random import model_parallel_seed


def seed_everything(seed: int) -> None:
    """Python, numpy and torch generators from the one config seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_layout(cfg: Config, world: int) -> dict:
    """The layout a checkpoint records: the parallel degrees, ZeRO stage, compute precision and global batch."""
    p = cfg.parallel
    zero = cfg.deepspeed.get("zero_optimization") or {}
    return {"tensor": p.tensor, "pipeline": p.pipeline, "context": p.context, "data": cfg.dp_size(world),
            "world_size": world,
            "zero_stage": int(zero.get("stage", 0)), "precision": cfg.precision,
            "global_batch": cfg.global_batch_size(world)}


# What makes two layouts the same for DeepSpeed's own loader; any difference is resharded (elastic resume).
LAYOUT_KEYS = ("tensor", "pipeline", "context", "data", "zero_stage", "precision")
LAYOUT_DEFAULTS = {"context": 1}  # layouts recorded before context parallelism existed


def layout_changes(saved: dict, mine: dict) -> list[str]:
    """The differences between a checkpoint's layout and this run's, in words ([] when DeepSpeed can load it)."""
    saved = {**LAYOUT_DEFAULTS, **saved}
    return [f"{key} {saved[key]} -> {mine[key]}" for key in LAYOUT_KEYS
            if key in saved and saved[key] != mine.get(key)]


def initial_state(path: str, model: ModelConfig) -> Any:
    """train.init_from: the canonical full weights of a megalite checkpoint (any layout) or a Hugging Face
    directory, after checking that they fit `model` (the same fields a resume compares)."""
    try:
        resolve_checkpoint(path)
        is_checkpoint = True
    except CheckpointError:
        is_checkpoint = False
    if is_checkpoint:
        source_cfg, state, _ = load_full_weights(path)
        source_model = source_cfg.model
    else:
        source_model, state = load_hf_state(path, model.make_vocab_size_divisible_by)
    mine, theirs = model_signature(model), model_signature(source_model)
    for key, want in mine.items():
        if theirs[key] != want:
            raise ConfigError(f"train.init_from: {path} has model.{key}={theirs[key]!r} but the config says {want!r}")
    return state


class Trainer:
    """Everything built for one run; `train()` drives it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # First: a signal during the slow set-up below must lead to a requeue, not a dead job.
        self.preemption = signals.PreemptionFlag(cfg.train.preemption_signals)
        try:
            self._set_up()
        except BaseException:
            self.preemption.restore()
            watchdog.stop()
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        self.rank, self.world = launch.init_distributed(cfg.train.collective_timeout_s)
        watchdog.start(cfg, self.rank, self.world)  # hung ranks named from here on (set-up included)
        self.is_main = self.rank == 0
        self.device = launch.device()
        self.output_dir = Path(cfg.train.output_dir)
        agree("configuration", self._check_config)
        problems = run_preflight(cfg, self.world, self.rank)  # collective: every rank gets every problem
        if problems:
            raise ConfigError(problems)
        kernels.set_backend(cfg.train.kernels)
        seed_everything(cfg.train.seed)

        self.grid = ProcessGrid(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                                context=cfg.parallel.context)
        self.dp_rank, self.dp_size = self.grid.get_data_parallel_rank(), self.grid.get_data_parallel_world_size()
        self.strategy = strategy_for(cfg, self.grid, self.device)
        agree("building the data", self._build_data)
        self.model = agree("building the model", self._build_model)
        self.engine, self.schedule = agree("starting DeepSpeed", build_engine, self.model, cfg, self.grid, self.world)
        self.checkpoints = CheckpointManager(
            cfg.train.checkpoint_dir or str(self.output_dir / "checkpoints"),
            keep=cfg.train.keep_checkpoints,
            layout=run_layout(cfg, self.world),
            config=cfg.to_dict(),
            model=model_signature(cfg.model),
            identity=run_identity(cfg),
            relayout=True,  # another layout is resharded (elastic resume), not refused
            background=cfg.checkpoint_async,
            # A background commit waits for the slowest rank's write, which may take far longer than a collective.
            background_timeout_s=max(3600.0, cfg.train.collective_timeout_s),
        )
        self.checkpointer = Checkpointer(cfg, self.checkpoints)
        self.checkpoint_estimate = checkpoint_bytes(cfg)  # checked against the free space before each save
        self.evaluator = Evaluator(cfg, self.strategy, self.valid_set, self.dp_rank, self.dp_size, self.device)
        self.profiler = ProfilerWindow(cfg, self.output_dir)
        self.timer = StepTimer(sync=self.device.type == "cuda")
        self.step = 0
        self.consumed_samples = 0  # the global count of samples this run has consumed (the sampler's position)
        self.start_step = 0  # where this process began: 0, or the step it resumed at
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.preempted = False  # agreed by every rank at the last step boundary
        self._progress: Any = None  # a tqdm bar on an interactive rank 0
        self.sink = agree("opening the metric sinks", MetricSink, cfg, self.output_dir, self.is_main)
        self.task_evaluator = None  # train.eval_tasks: the harness's tasks at each evaluation
        if cfg.train.eval_tasks is not None:
            self.task_evaluator = agree("loading train.eval_tasks", TaskEvaluator, cfg, self.is_main)

    def _check_config(self) -> None:
        validate(self.cfg, self.world)  # the world-size rules, now that it is known
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_set, self.valid_set, _ = build_datasets(
            prefixes=cfg.data.prefixes, weights=cfg.data.weights, split=cfg.data.split,
            seq_length=cfg.data.seq_length, seed=cfg.train.seed, cache_dir=cfg.data.cache_dir,
            num_samples=(None, None, 0),  # training never reads the test split: a tiny one is not an error here
            reset_position_ids=cfg.data.reset_position_ids, eod_mask_loss=cfg.data.eod_mask_loss,
            reset_attention_mask=cfg.data.reset_attention_mask, vocab_size=cfg.model.vocab_size,
        )
        if self.train_set is None:
            raise ConfigError(f"data.split: {cfg.data.split!r} leaves no training samples")
        self.sampler = ResumableSampler(len(self.train_set), self.dp_rank, self.dp_size, cfg.micro_batch_size,
                                        cfg.train.seed)
        self.batches = BatchStream(self.train_set, self.sampler, self.device)
        if self.is_main:  # keep the data's tokenizer with the run, so eval/generate/convert find it
            source = manifest_tokenizer(cfg.data.prefixes[0])
            if source and Path(source).is_file():
                (self.output_dir / "tokenizer.json").write_bytes(Path(source).read_bytes())

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        model = self.strategy.build_model()
        if cfg.train.init_from:
            self.strategy.load_full_state(model, initial_state(cfg.train.init_from, cfg.model))
        model = model.to(self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        return model.to(dtype) if dtype is not None else model

    # ------------------------------------------------------------------ checkpoints
    def client_state(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(consumed_samples=self.consumed_samples),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    @watchdog.during("checkpoint")
    def save(self, background: bool = False) -> str | None:
        """Save and commit the checkpoint of this step, unless the weights are not finite on some rank: a checkpoint
        of NaN weights is never useful and would become the one a resume picks, so it is skipped (and said).

        `background`: snapshot the state into host memory and let a background thread write and commit it
        (train.checkpoint_async); otherwise return once committed. Either way a save still in flight is committed
        first, so at most one is in flight and they commit in order."""
        self._finish_background_save()
        bad = self._first_nonfinite_parameter()
        (any_bad,) = any_rank([bad is not None], self.device)
        if any_bad:
            previous = self.checkpoints.latest_step()
            where, newest = bad or "on another rank", previous if previous is not None else "none"
            self._say(f"step {self.step}: NOT saving a checkpoint: the weights are not finite ({where}); the newest "
                      f"checkpoint stays step {newest}")
            self.sink.log({"kind": "checkpoint_skipped", "step": self.step, "reason": "non-finite weights"})
            return None
        if background:
            pending = self.checkpoints.save_async(self.engine, self.step, self.client_state(),
                                                  needed_bytes=self.checkpoint_estimate)
            self.sink.log({"kind": "checkpoint", "step": self.step, "path": pending.path, "mode": "async",
                           "seconds": pending.snapshot_s, "snapshot_bytes": pending.snapshot_bytes})
            return pending.path
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.engine, self.step, self.client_state(), needed_bytes=self.checkpoint_estimate)
        self.sink.log({"kind": "checkpoint", "step": self.step, "path": path, "mode": "sync",
                       "seconds": time.perf_counter() - t0})
        return path

    @watchdog.during("checkpoint")
    def _finish_background_save(self) -> None:
        """Commit the background save in flight, if any (every rank at the same step: a failure raises everywhere)."""
        pending = self.checkpoints.in_flight
        if pending is None:
            return
        already_done = pending.done()
        self.checkpoints.wait()
        self._log_written(pending, waited_s=0.0 if already_done else pending.waited_s or 0.0)

    def _poll_background_save(self) -> None:
        """Log a background save that finished, without waiting. A failed one is left for the next save, which every
        rank reaches at the same step (ranks see the thread finish at different steps)."""
        pending = self.checkpoints.in_flight
        if pending is not None and pending.done() and pending.outcome and pending.outcome[0] == "ok":
            self.checkpoints.wait()
            self._log_written(pending, waited_s=0.0)

    def _log_written(self, pending: Any, waited_s: float) -> None:
        self.sink.log({"kind": "checkpoint_written", "step": pending.step, "path": pending.path,
                       "write_seconds": pending.write_s, "waited_seconds": waited_s, "at_step": self.step})
        if waited_s > 1.0:
            self._say(f"step {self.step}: waited {waited_s:.1f} s for the background save of step {pending.step}")

    def _save_last_good(self) -> None:
        """Exit 76's save. Skipped steps never reach the optimizer, so the weights are those of the last good step
        (and the step count includes the skipped steps, so a resume does not replay their batches), unless a step
        that looked finite made them non-finite: then `save` keeps the previous checkpoint."""
        reason = (f"{self.consecutive_nonfinite} consecutive non-finite step(s) at step {self.step} "
                  f"(train.nonfinite={self.cfg.train.nonfinite!r}, max_consecutive_nonfinite="
                  f"{self.cfg.train.max_consecutive_nonfinite})")
        if self.save() is None:
            self._say(f"{reason}; the weights were not saved (see above); exiting {signals.EXIT_NONFINITE}")
        else:
            self._say(f"{reason}; saved the last good weights as step {self.step}; exiting {signals.EXIT_NONFINITE}")

    def _first_nonfinite_parameter(self) -> str | None:
        """The name of this rank's first parameter (its ZeRO-3 partition) holding a NaN or inf, else None."""
        for name, p in self.engine.module.named_parameters():
            local = getattr(p, "ds_tensor", None)
            tensor = local if local is not None and local.numel() else p
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                return name
        return None

    @watchdog.during("resume")
    def resume(self) -> None:
        """Load the checkpoint train.resume asks for (collective), restoring step, sampler and counters; a checkpoint
        of another layout (parallel degrees, ZeRO stage, precision) is resharded into this one."""
        path = self.checkpoints.find_resume(self.cfg.train.resume, expected_model=model_signature(self.cfg.model))
        if path is None:
            if self.is_main and self.cfg.train.resume != "never":
                print("megalite: no complete checkpoint to resume; starting fresh", file=sys.stderr, flush=True)
            return
        saved = _manifest_layout(path)  # model shape and optimizer type were checked by find_resume (run identity)
        mine = run_layout(self.cfg, self.world)
        if saved.get("global_batch", mine["global_batch"]) != mine["global_batch"] and not self.cfg.train.allow_batch_change:
            raise ConfigError(
                f"train.allow_batch_change: {path} was trained with a global batch of {saved['global_batch']} samples, "
                f"this run's is {mine['global_batch']}; keep the global batch (change micro-batch x accumulation x data "
                "parallel together), or set train.allow_batch_change=true to continue from its sample position with "
                "the schedule by step")
        changes = layout_changes(saved, mine)
        if changes:
            state = self._resume_elastic(path, saved, changes)
        else:
            state = self.checkpoints.load(self.engine, path)["client_state"]
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.sampler.load_state_dict(state["sampler"])
        self.consumed_samples = self.sampler.consumed_samples
        self.batches = BatchStream(self.train_set, self.sampler, self.device)
        self._say(f"resumed from {path} at step {self.step}")

    def _resume_elastic(self, path: str, saved: dict, changes: list[str]) -> dict:
        """Reshard a checkpoint of another layout into this engine: weights, optimizer state, schedule position;
        returns its client state (step, sampler, counters)."""
        t0 = time.perf_counter()
        source = TrainingState(path, verify=False)  # find_resume verified every file against the manifest
        restored = load_training_state(self.engine, self.grid, source)
        ds_state = source.model_states()
        restore_schedule(self.schedule, ds_state.get("lr_scheduler") or {})
        for counter in ("global_steps", "global_samples", "skipped_steps"):
            if counter in ds_state:
                setattr(self.engine, counter, int(ds_state[counter]))
        client = source.manifest.get("client_state") or source.manifest.get("client_state_per_rank", [{}])[0]
        # RNG streams are per rank and the ranks changed: re-seed every stream from the seed and the step.
        seed = self.cfg.train.seed + 1_000_003 * int(client["step"])
        seed_everything(seed)
        model_parallel_seed(seed, self.grid.get_tensor_model_parallel_rank(),
                            self.grid.get_pipe_parallel_rank())
        self._say(f"elastic resume of {path}: layout {', '.join(changes)}; resharded {restored['parameters']} "
                  f"parameters with their optimizer state (step {restored['optimizer_step']}) and the schedule in "
                  f"{time.perf_counter() - t0:.1f} s")
        self.sink.log({"kind": "reshard", "step": int(client["step"]), "from": saved, "to": run_layout(self.cfg, self.world),
                       "changes": changes})
        return client

    # ------------------------------------------------------------------ the loop
    def train_step(self, timer: StepTimer) -> tuple[float, bool]:
        """One optimizer step over gradient_accumulation micro-batches; returns (mean loss, skipped)."""
        outcome = self.strategy.train_step(self.engine, self.batches, timer, self.preemption.is_set)
        self.preempted = outcome.preempted
        return outcome.loss, outcome.skipped

    def train(self) -> int:
        """Run to train.steps (or a preemption / failure); returns the process exit code."""
        cfg = self.cfg
        try:
            self.resume()
            self.start_step = self.step
            (signalled,) = any_rank([self.preemption.is_set], self.device)
            if signalled:  # during set-up or resume: nothing new to save, so requeue at once
                self._say(f"preempted before step {self.step + 1}: exiting {signals.EXIT_PREEMPTED} to be requeued")
                return self._finish(signals.EXIT_PREEMPTED)
            window = self._start_metrics()
            stragglers.start(cfg, self.device, self.grid.get_pipe_parallel_rank())  # windows as the metrics'
            exit_code = signals.EXIT_OK
            while self.step < cfg.train.steps:
                self.profiler.before_step(self.step + 1)
                loss, skipped = self.train_step(self.timer)
                self.step += 1
                watchdog.step_done(self.step)
                self.consumed_samples += self.cfg.global_batch_size(self.world)  # skipped steps consume data too
                self.profiler.after_step(self.step)
                window.add(loss, skipped)
                if skipped:
                    self.nonfinite_skipped += 1
                    self.consecutive_nonfinite += 1
                    self.sink.log({"kind": "nonfinite", "step": self.step, "skipped_total": self.nonfinite_skipped})
                    if cfg.train.nonfinite == "fail" or self.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                        self._save_last_good()
                        exit_code = signals.EXIT_NONFINITE
                        break
                else:
                    self.consecutive_nonfinite = 0
                if window.due(self.step):
                    window.flush(self.step, self.schedule.get_last_lr()[0], self._grad_norm(), self._loss_scale(),
                                 self.nonfinite_skipped, quiet=self._progress is not None)
                    stragglers.window(self.step, self.sink)  # one small all-gather per log window
                self._advance_progress(loss)
                if self.evaluator.due(self.step):
                    self._evaluate()
                if self.preempted:
                    self.save()
                    self._say(f"preempted: saved step {self.step}, exiting {signals.EXIT_PREEMPTED} to be requeued")
                    exit_code = signals.EXIT_PREEMPTED
                    break
                if self.checkpointer.due(self.step):
                    self.save(background=self.cfg.checkpoint_async and self.step < cfg.train.steps)
                else:
                    self._poll_background_save()
            return self._finish(exit_code)
        finally:
            watchdog.stop()
            self.preemption.restore()
            self.profiler.close()
            if self._progress is not None:
                self._progress.close()

    def _start_metrics(self) -> MetricWindow:
        cfg = self.cfg
        attended = None
        if cfg.data.reset_attention_mask:  # documents shorten attention: count it from the first samples
            attended = mean_document_length(self.train_set[i] for i in range(min(64, len(self.train_set))))
        peak, peak_note = device_peak_tflops(cfg.precision)
        if self.is_main:
            info = summary(cfg, self.world)
            print(f"megalite: {json.dumps(info)}", file=sys.stderr, flush=True)
            for line in startup_report(cfg, self.world, int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None):
                print(f"megalite: {line}", file=sys.stderr, flush=True)  # the plan's memory per GPU
            self.sink.log({"kind": "start", "step": self.step, **info, "peak": peak_note})
            if cfg.train.logging.progress_bar and sys.stderr.isatty():
                from tqdm import tqdm

                self._progress = tqdm(total=cfg.train.steps, initial=self.step, unit="step", dynamic_ncols=True)
        return MetricWindow(cfg, self.sink, self.timer, self.world, flops_per_token(cfg, attended), peak,
                            self.is_main)

    def _advance_progress(self, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(loss=f"{loss:.3f}")

    @watchdog.during("evaluation")
    def _evaluate(self) -> None:
        result = self.evaluator.run(self.engine)
        if result:
            self.sink.log({"kind": "valid", "step": self.step, **result})
            self._say(f"step {self.step} validation loss {result['loss']:.4f} perplexity {result['perplexity']:.2f}")
        if self.task_evaluator is not None:
            t0 = time.perf_counter()
            scores = self.task_evaluator.run(self.engine.module)  # every rank; the scores on rank 0
            if self.is_main:
                self.sink.log({"kind": "eval_tasks", "step": self.step, **scores,
                               "seconds": time.perf_counter() - t0})
                self._say(f"step {self.step} tasks " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    def _finish(self, exit_code: int) -> int:
        self._finish_background_save()  # every exit path above saved synchronously; this is a safety net
        if self.is_main:
            self.sink.log({"kind": "end", "step": self.step, "exit_code": exit_code})
            if self.cfg.train.logging.plot:
                plot_losses(self.sink.records, self.output_dir / "loss.png")
        self.sink.close()
        return exit_code

    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"megalite: {message}", file=sys.stderr, flush=True)

    def _grad_norm(self) -> float | None:
        if self.strategy.grad_norm is not None:
            return self.strategy.grad_norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def _loss_scale(self) -> float | None:
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return float(scale) if isinstance(scale, (int, float)) else None


def _manifest_layout(path: str) -> dict:
    """The layout a (verified) checkpoint's manifest records."""
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        return json.load(f).get("layout", {})


def train(cfg: Config) -> int:
    """Build and run; every rank returns the same exit code."""
    try:
        return Trainer(cfg).train()
    except MegaliteError as e:
        print(f"megalite train (rank {os.environ.get('RANK', '?')}): error: {e}", file=sys.stderr, flush=True)
        return signals.EXIT_CONFIG
