"""One training run: set-up (process grid, data, model, DeepSpeed engine), then a short loop over steps.

Set-up phases that can fail on some ranks only end with an agreement (`megalite.distributed.agree`), so
every rank raises the failing rank's error instead of the others waiting in the next collective. The
preemption handler is installed first, before anything slow: a signal during set-up or resume makes the
run exit 75 (requeue) before its first step, with nothing new to save. Every checkpoint decision is the
`Checkpointer`'s (megalite.engine.checkpointer): the loop calls `resume()` once and `save(step, last=...)` after
every step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megalite import kernels, launch
from megalite.checkpoint import model_signature, resolve_checkpoint
from megalite.checkpoint.consolidate import load_full_weights
from megalite.config import Config, ModelConfig, summary, validate
from megalite.data import BatchStream, ResumableSampler, build_datasets
from megalite.data.prepare import manifest_tokenizer
from megalite.distributed import agree, any_rank
from megalite.engine import signals, stragglers, watchdog
from megalite.engine.build import build_engine
from megalite.engine.checkpointer import Checkpointer, say_on_rank0
from megalite.engine.evaluation import Evaluator, TaskEvaluator
from megalite.engine.metrics import (
    MetricSink,
    MetricWindow,
    ProfilerWindow,
    StepTimer,
    mean_document_length,
    plot_losses,
)
from megalite.engine.moe import replicate_experts, stage_joiner
from megalite.engine.preflight import plan_this_run, run_preflight
from megalite.engine.strategy import strategy_for
from megalite.errors import CheckpointError, ConfigError, MegaliteError
from megalite.interop.hf import load_hf_state
from megalite.parallel import ProcessGrid
from megalite.parallel.random import seed_everything
from megalite.plan import flops_per_token, startup_report


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

    def __init__(self, cfg: Config, validated_world: int | None = None) -> None:
        """`validated_world`: the world size `cfg` was validated for already (`megalite train` validates at load,
        with the launcher's world size); the set-up validates it again only for another world size."""
        self.cfg = cfg
        self.validated_world = validated_world
        # First: a signal during the slow set-up below must lead to a requeue, not a dead job (`megalite train` caught
        # the default signals already, before its imports; this takes that flag over).
        self.preemption = signals.preemption_flag(cfg.train.preemption_signals)
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
        self._phase("configuration", self._check_config)
        self.local_plan = plan_this_run(cfg, self.world)  # the run's one plan: preflight, start-up report, MFU peak
        # collective: every rank gets every problem
        problems = self._phase("preflight", run_preflight, cfg, self.world, self.rank, validated=True,
                               local=self.local_plan)
        if problems:
            raise ConfigError(problems)
        kernels.set_backend(cfg.train.kernels)
        seed_everything(cfg.train.seed)

        self.grid = ProcessGrid(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                                context=cfg.parallel.context, expert=cfg.parallel.expert,
                                replicate_experts=replicate_experts(cfg))
        self.dp_rank, self.dp_size = self.grid.get_data_parallel_rank(), self.grid.get_data_parallel_world_size()
        self.strategy = strategy_for(cfg, self.grid, self.device)
        self._phase("building the data", self._build_data)
        self.model = self._phase("building the model", self._build_model)
        self.engine, self.schedule = self._phase("starting DeepSpeed", build_engine, self.model, cfg, self.grid,
                                                 self.world)
        self.sink = self._phase("opening the metric sinks", MetricSink, cfg, self.output_dir, self.is_main)
        self._say = say_on_rank0(self.is_main)
        self.checkpoints = Checkpointer(cfg, self.world, self.engine, self.schedule, self.grid, self.device,
                                        self.client_state, self.sink, self._say)
        self.evaluator = Evaluator(cfg, self.strategy, self.valid_set, self.dp_rank, self.dp_size, self.device)
        self.profiler = ProfilerWindow(cfg, self.output_dir)
        self.timer = StepTimer(sync=self.device.type == "cuda")
        self.step = 0
        # The global count of samples this run has consumed: the one data position, saved with every checkpoint (the
        # sampler is only positioned from it). Skipped steps consume their batches too.
        self.consumed_samples = 0
        self.start_step = 0  # where this process began: 0, or the step it resumed at
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.preempted = False  # agreed by every rank at the last step boundary
        self.save_failed = False  # a background checkpoint failed on some rank (agreed at the last step boundary)
        self._progress: Any = None  # a tqdm bar on an interactive rank 0
        self.task_evaluator = None  # train.eval_tasks: the harness's tasks at each evaluation
        if cfg.train.eval_tasks is not None:
            self.task_evaluator = self._phase("loading train.eval_tasks", TaskEvaluator, cfg, self.is_main)

    def _phase(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One set-up phase on every rank: a failure on any rank raises on all (`agree`); then, when a preemption
        signal reached any rank, every rank stops here (nothing to save yet: the job is requeued at once instead of
        finishing a set-up that may take minutes)."""
        result = agree(name, fn, *args, **kwargs)
        (signalled,) = any_rank([self.preemption.is_set], self.device)
        if signalled:
            raise signals.PreemptedDuringSetUp(name)
        return result

    def _check_config(self) -> None:
        if self.world != self.validated_world:
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
        return model.to(cfg.torch_dtype)

    # ------------------------------------------------------------------ checkpoints
    def client_state(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(consumed_samples=self.consumed_samples),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def _save_last_good(self) -> None:
        """Exit 76's save. Skipped steps never reach the optimizer, so the weights are those of the last good step
        (and the step count includes the skipped steps, so a resume does not replay their batches), unless a step
        that looked finite made them non-finite: then `save` keeps the previous checkpoint."""
        reason = (f"{self.consecutive_nonfinite} consecutive non-finite step(s) at step {self.step} "
                  f"(train.nonfinite={self.cfg.train.nonfinite!r}, max_consecutive_nonfinite="
                  f"{self.cfg.train.max_consecutive_nonfinite})")
        if self.checkpoints.save(self.step, last=True) is None:
            self._say(f"{reason}; the weights were not saved (see above); exiting {signals.EXIT_NONFINITE}")
        else:
            self._say(f"{reason}; saved the last good weights as step {self.step}; exiting {signals.EXIT_NONFINITE}")

    @watchdog.during("resume")
    def resume(self) -> None:
        """Continue from the checkpoint train.resume asks for, if any (collective): step, data position, counters."""
        state = self.checkpoints.resume()
        if state is None:
            return
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.consumed_samples = int(state["sampler"]["consumed_samples"])
        self.sampler.load_state_dict(state["sampler"])
        self.batches = BatchStream(self.train_set, self.sampler, self.device)

    # ------------------------------------------------------------------ the loop
    def train_step(self, timer: StepTimer) -> tuple[float, bool]:
        """One optimizer step over gradient_accumulation micro-batches; returns (mean loss, skipped). The step also
        agrees on the loop's alerts: a preemption signal, a background checkpoint that failed."""
        outcome = self.strategy.train_step(self.engine, self.batches, timer, self._alerts)
        self.preempted, self.save_failed = outcome.alerts
        return outcome.loss, outcome.skipped

    def _alerts(self) -> tuple[bool, bool]:
        return self.preemption.is_set, self.checkpoints.failed_in_background()

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
                window.add(loss, skipped, self.strategy.moe_statistics)
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
                    self.checkpoints.save(self.step, last=True)
                    self._say(f"preempted: saved step {self.step}, exiting {signals.EXIT_PREEMPTED} to be requeued")
                    exit_code = signals.EXIT_PREEMPTED
                    break
                # After a failed background save, this step is saved now, synchronously (free space checked first),
                # rather than losing another interval; if that fails too, every rank raises and the run ends (exit 2).
                self.checkpoints.save(self.step, last=self.step == cfg.train.steps or self.save_failed)
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
        peak, peak_note = self.local_plan.peak_tflops(cfg.precision)
        if self.is_main:
            info = summary(cfg, self.world)
            print(f"megalite: {json.dumps(info)}", file=sys.stderr, flush=True)
            for line in startup_report(self.local_plan):
                print(f"megalite: {line}", file=sys.stderr, flush=True)  # the plan's memory per GPU
            self.sink.log({"kind": "start", "step": self.step, **info, "peak": peak_note})
            if cfg.train.logging.progress_bar and sys.stderr.isatty():
                from tqdm import tqdm

                self._progress = tqdm(total=cfg.train.steps, initial=self.step, unit="step", dynamic_ncols=True)
        peak_fp8 = self.local_plan.peak_tflops("fp8")[0] if cfg.model.fp8 else None  # MFU against both peaks
        return MetricWindow(cfg, self.sink, self.timer, self.world, flops_per_token(cfg, attended), peak,
                            self.is_main, join_stages=stage_joiner(self.grid), peak_fp8_tflops=peak_fp8)

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
        self.checkpoints.close(self.step)  # every exit path above saved synchronously; this is a safety net
        if self.is_main:
            self.sink.log({"kind": "end", "step": self.step, "exit_code": exit_code})
            if self.cfg.train.logging.plot:
                plot_losses(self.sink.records, self.output_dir / "loss.png")
        self.sink.close()
        return exit_code

    def _grad_norm(self) -> float | None:
        if self.strategy.grad_norm is not None:
            return self.strategy.grad_norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def _loss_scale(self) -> float | None:
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return float(scale) if isinstance(scale, (int, float)) else None


def train(cfg: Config, validated_world: int | None = None) -> int:
    """Build and run; every rank returns the same exit code (`validated_world`: as for `Trainer`)."""
    try:
        return Trainer(cfg, validated_world).train()
    except signals.PreemptedDuringSetUp as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"megalite: preempted during set-up ({e}): exiting {signals.EXIT_PREEMPTED} to be requeued",
                  file=sys.stderr, flush=True)
        return signals.EXIT_PREEMPTED
    except MegaliteError as e:
        print(f"megalite train (rank {os.environ.get('RANK', '?')}): error: {e}", file=sys.stderr, flush=True)
        return signals.EXIT_CONFIG
