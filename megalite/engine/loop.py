"""One training run: process grid, data, model, DeepSpeed engine, then the step loop.

Per step every rank takes part in one small all-reduce that carries two flags: "a preemption
signal arrived" and "a loss was not finite". Agreeing on them at the same step boundary is what
lets every rank save, skip or stop together instead of hanging in a collective.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalite import kernels
from megalite.config import Config, summary, validate
from megalite.engine import launch, signals
from megalite.engine.build import build_engine
from megalite.engine.metrics import (
    MetricSink,
    StepTimer,
    device_peak_tflops,
    flops_per_token,
    mean_document_length,
    plot_losses,
)
from megalite.errors import ConfigError, MegaliteError


def seed_everything(seed: int) -> None:
    """Python, numpy and torch generators from the one config seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BatchStream:
    """Endless micro-batches for this DP rank from a ResumableSampler, epoch after epoch."""

    def __init__(self, dataset: Any, sampler: Any, device: torch.device) -> None:
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
        from megalite.data import collate

        return collate([self.dataset[i] for i in indices], self.device)


class RankFailed(MegaliteError):
    """Another rank (or this one) failed in a phase every rank had to finish."""


def agreed(phase: str, fn: Any, *args: Any) -> Any:
    """Run `fn(*args)` on every rank, then agree: if any rank raised, every rank raises, naming the ranks."""
    mine: Exception | None = None
    result = None
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - shared with every rank below, then raised everywhere
        mine = e
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if mine is None else f"{type(mine).__name__}: {mine}")
    failed: dict[str, list[int]] = {}
    for rank, message in enumerate(messages):
        if message:
            failed.setdefault(message, []).append(rank)
    if not failed:
        return result
    if mine is not None and isinstance(mine, MegaliteError) and len(failed) == 1:
        raise mine  # the same error everywhere it happened: keep its own type and message
    text = "; ".join(f"ranks {ranks}: {message}" for message, ranks in failed.items())
    raise RankFailed(f"{phase} failed on other ranks: {text}") from mine


class Run:
    """Everything built for one run; `train()` drives it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rank, self.world = launch.init_distributed(cfg.train.collective_timeout_s)
        self.is_main = self.rank == 0
        self.device = launch.device()
        self.output_dir = Path(cfg.train.output_dir)
        # Each phase that can fail on some ranks only ends with an agreement, so that every rank raises the
        # failing rank's error instead of the others waiting in the next collective until the timeout.
        agreed("configuration", self._check_config)
        from megalite.engine.preflight import run_preflight

        problems = run_preflight(cfg, self.world, self.rank)  # collective: every rank gets every problem
        if problems:
            raise ConfigError(problems)
        kernels.set_backend(cfg.train.kernels)
        seed_everything(cfg.train.seed)

        from megalite.parallel import ProcessGrid

        self.grid = ProcessGrid(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline)
        self.dp_rank, self.dp_size = self.grid.get_data_parallel_rank(), self.grid.get_data_parallel_world_size()
        agreed("building the data", self._build_data)
        self.model = agreed("building the model", self._build_model)
        self.engine, self.schedule = agreed("starting DeepSpeed", build_engine, self.model, cfg, self.grid, self.world)
        from megalite.engine.checkpoint import CheckpointManager

        self.checkpoints = CheckpointManager(
            cfg.train.checkpoint_dir or str(self.output_dir / "checkpoints"),
            keep=cfg.train.keep_checkpoints,
            layout=self.layout(),
            config=cfg.to_dict(),
            model=self.model_signature(),
        )
        self.preempted_agreed = False  # a preemption flag all ranks have seen in this step's all-reduce
        self.precision_is_fp32 = cfg.precision == "fp32"
        self._grad_norm: float | None = None
        self.step = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.sink = agreed("opening the metric sinks", MetricSink, cfg, self.output_dir, self.is_main)

    def _check_config(self) -> None:
        validate(self.cfg, self.world)  # the world-size rules, now that it is known
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))

    # ------------------------------------------------------------------ set-up
    def model_signature(self) -> dict:
        """The model fields a checkpoint must match to be resumed by this run."""
        m = self.cfg.model
        return {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
                "kv_heads": m.kv_heads, "ffn_size": m.ffn_size, "padded_vocab_size": m.padded_vocab_size,
                "norm": m.norm, "mlp": m.mlp, "position": m.position, "tied_embeddings": m.tied_embeddings}

    def layout(self) -> dict:
        return {"tensor": self.cfg.parallel.tensor, "pipeline": self.cfg.parallel.pipeline,
                "data": self.world // (self.cfg.parallel.tensor * self.cfg.parallel.pipeline),
                "world_size": self.world}

    def _build_data(self) -> None:
        from megalite.data import ResumableSampler, build_datasets

        cfg = self.cfg
        if not cfg.data.prefixes:
            raise ConfigError("data.prefixes: no training data given; run `megalite prepare` and list its prefix")
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
        if self.is_main:
            self._copy_tokenizer()

    def _copy_tokenizer(self) -> None:
        """Keep the data's tokenizer with the run, so eval/generate/convert find it."""
        import shutil

        from megalite.data.prepare import manifest_tokenizer

        source = manifest_tokenizer(self.cfg.data.prefixes[0])
        if source and Path(source).is_file():
            shutil.copyfile(source, self.output_dir / "tokenizer.json")

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16 if cfg.precision == "fp16" else None
        if cfg.parallel.pipeline > 1:
            from deepspeed.pipe import PipelineModule

            from megalite.model.pipeline import PipelineLoss, pipeline_specs

            loss_fn = PipelineLoss(cfg.model, self.grid)
            model = PipelineModule(
                layers=pipeline_specs(cfg.model, cfg.parallel, self.grid, seed=cfg.train.seed),
                topology=self.grid.topology,
                loss_fn=loss_fn,
                # "uniform": the same number of Transformer blocks per stage; "parameters": balance weights.
                partition_method="type:BlockPipe" if cfg.parallel.pipeline_partition == "uniform" else "parameters",
                activation_checkpoint_interval=1 if cfg.model.activation_checkpointing else 0,
                checkpointable_layers=["BlockPipe"],
            )
            loss_fn.bind(model)
        else:
            from megalite.model import build_model

            model = build_model(cfg.model, cfg.parallel, self.grid, seed=cfg.train.seed)
        if cfg.train.init_from:
            self._load_initial_weights(model, cfg.train.init_from)
        model = model.to(self.device)
        return model.to(dtype) if dtype is not None else model

    def _load_initial_weights(self, model: torch.nn.Module, path: str) -> None:
        """train.init_from: the weights of a Hugging Face directory, or of a megalite checkpoint of any layout
        (TP, PP, ZeRO stage, DP size), sharded for this rank's TP/PP position; the optimizer starts fresh."""
        from megalite.engine.consolidate import load_full_weights, resolve_checkpoint
        from megalite.errors import CheckpointError

        try:
            resolve_checkpoint(path)
            is_checkpoint = True
        except CheckpointError:
            is_checkpoint = False
        if is_checkpoint:
            source_cfg, state, _ = load_full_weights(path)
            source_model = source_cfg.model
        else:
            from megalite.interop.hf import load_hf_state

            source_model, state = load_hf_state(path, self.cfg.model.make_vocab_size_divisible_by)
        mine = self.cfg.model
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size", "norm", "mlp",
                    "position", "bias", "tied_embeddings", "padded_vocab_size"):
            if getattr(source_model, key) != getattr(mine, key):
                raise ConfigError(f"train.init_from: {path} has model.{key}={getattr(source_model, key)!r} but the "
                                  f"config says {getattr(mine, key)!r}")
        if self.cfg.parallel.pipeline > 1:
            from megalite.model.pipeline import load_pipeline_state

            load_pipeline_state(model, state, self.grid)
        else:
            from megalite.model import load_full_state_dict, tensor_parallel_group

            load_full_state_dict(model, state, tensor_parallel_group(self.grid))

    # ------------------------------------------------------------------ checkpoints
    def client_state(self) -> dict:
        consumed = self.step * self.cfg.global_batch_size(self.world)
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(consumed_samples=consumed),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def save(self) -> str:
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.engine, self.step, self.client_state())
        self.log({"kind": "checkpoint", "step": self.step, "path": path, "seconds": time.perf_counter() - t0})
        return path

    def maybe_resume(self) -> None:
        path = self.checkpoints.find_resume(self.cfg.train.resume, expected_model=self.model_signature())
        if path is None:
            if self.is_main and self.cfg.train.resume != "never":
                print("megalite: no complete checkpoint to resume; starting fresh", file=sys.stderr, flush=True)
            return
        state = self.checkpoints.load(self.engine, path)["client_state"]
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.sampler.load_state_dict(state["sampler"])
        self.batches = BatchStream(self.train_set, self.sampler, self.device)
        if self.is_main:
            print(f"megalite: resumed from {path} at step {self.step}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ one step
    def _agree(self, local_nonfinite: bool, preempted: bool) -> tuple[bool, bool]:
        flags = torch.tensor([float(local_nonfinite), float(preempted)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def train_step(self, timer: StepTimer) -> tuple[float, bool]:
        """One optimizer step over gradient_accumulation micro-batches; returns (mean loss, skipped)."""
        if self.cfg.parallel.pipeline > 1:
            # train_batch runs forward, backward and the optimizer step in one call, so the skip hooks into
            # DeepSpeed's ZeRO-1 optimizer: it refuses a step whose gradient norm is not finite (fp32, and bf16
            # with bf16.check_grad_overflow, which megalite turns on) and counts it in engine.skipped_steps.
            timer.start()
            skipped_before = self.engine.skipped_steps
            loss = float(self.engine.train_batch(data_iter=self._pipeline_iter()))
            timer.lap("pipeline")
            skipped = self._refused_by_deepspeed(skipped_before)
            if not math.isfinite(loss) and not skipped:
                raise MegaliteError(f"step {self.step + 1}: non-finite loss {loss} and DeepSpeed applied the step")
            return (float("nan"), True) if skipped else (loss, False)
        losses = []
        skipped = False
        ga = self.cfg.gradient_accumulation_steps
        timer.start()
        for micro in range(ga):
            batch = next(self.batches)
            timer.lap("data")
            if skipped:
                continue  # the data of a skipped step is consumed all the same
            loss = self.engine(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                               **self._model_inputs(batch))
            timer.lap("forward")
            # One all-reduce per micro-batch carries both flags, so the step boundary needs no extra one.
            nonfinite, preempted = self._agree(not math.isfinite(loss.item()), self.preemption.is_set)
            self.preempted_agreed |= preempted
            if nonfinite:
                skipped = True
                if micro > 0:  # drop the gradients of the micro-batches already accumulated
                    self.engine.optimizer.zero_grad()
                    self.engine.micro_steps -= micro
                continue
            losses.append(loss.detach())
            self.engine.backward(loss)
            timer.lap("backward")
            if micro == ga - 1 and self.engine.zero_optimization_stage() == 0 and self.precision_is_fp32:
                # DeepSpeed clips at ZeRO-0 fp32 but keeps no norm and applies a non-finite step: check it here.
                self._grad_norm = self._stage0_grad_norm()  # global (DP-reduced, TP-aware): same on every rank
                if self._grad_norm is None or not math.isfinite(self._grad_norm):
                    self.engine.zero_grad()
                    self.engine.micro_steps -= micro
                    skipped = True
                    continue
            skipped_before = self.engine.skipped_steps
            self.engine.step()
            timer.lap("optimizer")
            if micro == ga - 1 and self._refused_by_deepspeed(skipped_before):
                skipped = True  # ZeRO's optimizers refuse a step whose gradient norm is not finite
        if skipped:
            return float("nan"), True
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean, group=self.grid.get_data_parallel_group())
        return mean.item() / self.dp_size, False

    def _refused_by_deepspeed(self, skipped_before: int) -> bool:
        """DeepSpeed skipped the last optimizer step for a non-finite gradient norm. Under fp16 its skips are
        the loss scaler's normal search for a scale, not failures, so they are not counted."""
        return self.engine.skipped_steps > skipped_before and self.cfg.precision != "fp16"

    def _stage0_grad_norm(self) -> float:
        """The global gradient norm, NaN when it is not finite (DeepSpeed's helper reports that as -1)."""
        from deepspeed.runtime.utils import get_flattened_grad_norm, is_invalid_grad_norm

        norm = float(get_flattened_grad_norm(list(self.engine.module.parameters()), mpu=self.grid))
        return float("nan") if is_invalid_grad_norm(norm) else norm

    def _model_inputs(self, batch: dict) -> dict:
        """The model's keyword inputs beyond ids and labels that the data options ask for."""
        out = {}
        if self.cfg.data.reset_position_ids:
            out["position_ids"] = batch["position_ids"]
        if self.cfg.data.reset_attention_mask:
            out["document_ids"] = batch["document_ids"]
        return out

    def _pipeline_batch(self, b: dict) -> tuple:
        """((input_ids, position_ids[, document_ids]), (labels, loss_mask)) for the pipeline engine."""
        inputs = (b["input_ids"], b["position_ids"])
        if self.cfg.data.reset_attention_mask:
            inputs += (b["document_ids"],)
        return inputs, (b["labels"], b["loss_mask"])

    def _pipeline_iter(self) -> Iterator[tuple]:
        for _ in range(self.cfg.gradient_accumulation_steps):
            yield self._pipeline_batch(next(self.batches))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean validation loss and perplexity over train.eval_steps micro-batches (same on every rank)."""
        if self.valid_set is None:
            return None
        from megalite.data import ResumableSampler

        sampler = ResumableSampler(len(self.valid_set), self.dp_rank, self.dp_size, self.cfg.micro_batch_size,
                                   self.cfg.train.seed, shuffle=False)
        stream = BatchStream(self.valid_set, sampler, self.device)
        self.engine.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for _ in range(self.cfg.train.eval_steps):
            if self.cfg.parallel.pipeline > 1:
                loss = self.engine.eval_batch(iter([self._pipeline_batch(next(stream))]), num_micro_batches=1)
            else:
                b = next(stream)
                loss = self.engine(b["input_ids"], labels=b["labels"], loss_mask=b["loss_mask"], **self._model_inputs(b))
            total += float(loss)
            count += 1
        self.engine.train()
        mean = torch.tensor([total.item() / count], dtype=torch.float64)
        dist.all_reduce(mean, group=self.grid.get_data_parallel_group())
        loss = mean.item() / self.dp_size
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ the loop
    def log(self, record: dict) -> None:
        self.sink.log(record)

    def train(self) -> int:
        """Run to train.steps (or a preemption / failure); returns the process exit code."""
        cfg = self.cfg
        self.maybe_resume()
        flag = self.preemption = signals.PreemptionFlag(cfg.train.preemption_signals)
        timer = StepTimer(sync=self.device.type == "cuda")
        tokens_per_step = cfg.global_batch_size(self.world) * cfg.data.seq_length
        attended = None
        if cfg.data.reset_attention_mask:  # documents shorten attention: count it from the first samples
            attended = mean_document_length(self.train_set[i] for i in range(min(64, len(self.train_set))))
        flops_token = flops_per_token(cfg, attended)
        peak, peak_note = device_peak_tflops(cfg.precision)
        if self.is_main:
            info = summary(cfg, self.world)
            print(f"megalite: {json.dumps(info)}", file=sys.stderr, flush=True)
            from megalite.engine.plan import startup_report  # issue 16: the plan's memory per GPU at start-up

            for line in startup_report(cfg, self.world, int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None):
                print(f"megalite: {line}", file=sys.stderr, flush=True)
            self.log({"kind": "start", "step": self.step, **info, "peak": peak_note})
        bar = _progress(cfg, self.step, self.is_main)
        window_start, window_steps, window_losses = time.perf_counter(), 0, []
        exit_code = signals.EXIT_OK
        profiler = None
        try:
            while self.step < cfg.train.steps:
                if cfg.train.logging.profile_start_step == self.step + 1:
                    profiler = _start_profiler(self.output_dir)
                loss, skipped = self.train_step(timer)
                self.step += 1
                if profiler is not None and cfg.train.logging.profile_end_step == self.step:
                    profiler.stop()
                    profiler = None
                if skipped:
                    self.nonfinite_skipped += 1
                    self.consecutive_nonfinite += 1
                    self.log({"kind": "nonfinite", "step": self.step, "skipped_total": self.nonfinite_skipped})
                    if cfg.train.nonfinite == "fail" or self.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                        # The weights are the last good ones (skipped steps never reach the optimizer); the
                        # step count includes the skipped steps, so a resume does not replay their batches.
                        self.save()
                        exit_code = signals.EXIT_NONFINITE
                        break
                else:
                    self.consecutive_nonfinite = 0
                    window_losses.append(loss)
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                if cfg.parallel.pipeline > 1:
                    _, preempted = self._agree(False, flag.is_set)
                else:
                    preempted, self.preempted_agreed = self.preempted_agreed, False
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    tflops = flops_token * tokens_per_step * window_steps / elapsed / self.world / 1e12
                    record = {
                        "kind": "train", "step": self.step,
                        "loss": float(np.mean(window_losses)) if window_losses else float("nan"),
                        "lr": self.schedule.get_last_lr()[0],
                        "grad_norm": _grad_norm(self.engine) if self._grad_norm is None else self._grad_norm,
                        "loss_scale": _loss_scale(self.engine),
                        "tokens_per_s": tokens_per_step * window_steps / elapsed,
                        "step_time_s": elapsed / window_steps,
                        "breakdown_s": {k: v / window_steps for k, v in timer.pop().items()},
                        "tflops_per_device": tflops,
                        "mfu": tflops / peak if peak else None,
                        "nonfinite_skipped": self.nonfinite_skipped,
                        "memory_gb": _memory_gb(),
                    }
                    self.log(record)
                    if self.is_main and bar is None:
                        print(_format(record), file=sys.stderr, flush=True)
                    window_start, window_steps, window_losses = time.perf_counter(), 0, []
                eval_now = cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0
                if eval_now or self.step == cfg.train.steps:
                    result = self.evaluate()
                    if result:
                        self.log({"kind": "valid", "step": self.step, **result})
                        if self.is_main:
                            print(f"megalite: step {self.step} validation loss {result['loss']:.4f} "
                                  f"perplexity {result['perplexity']:.2f}", file=sys.stderr, flush=True)
                if preempted:
                    self.save()
                    exit_code = signals.EXIT_PREEMPTED
                    break
                ck = cfg.train.checkpoint_interval
                if (ck and self.step % ck == 0) or self.step == cfg.train.steps:
                    self.save()
        finally:
            flag.restore()
            if bar is not None:
                bar.close()
            if profiler is not None:
                profiler.stop()
        if self.is_main:
            self.log({"kind": "end", "step": self.step, "exit_code": exit_code})
            if cfg.train.logging.plot:
                plot_losses(self.sink.records, self.output_dir / "loss.png")
        self.sink.close()
        return exit_code


def _progress(cfg: Config, start: int, is_main: bool):
    if not (is_main and cfg.train.logging.progress_bar and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)


def _start_profiler(output_dir: Path):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trace_dir = output_dir / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    prof = torch.profiler.profile(
        activities=activities,
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir), worker_name=f"rank{dist.get_rank()}"),
    )
    prof.start()
    return prof


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def _loss_scale(engine: Any) -> float | None:
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float)) else None


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _format(r: dict) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if r["grad_norm"] is not None:
        parts.append(f"grad_norm {r['grad_norm']:.3f}")
    parts += [f"{r['tokens_per_s']:.0f} tok/s", f"{r['step_time_s'] * 1000:.0f} ms/step",
              f"{r['tflops_per_device']:.3f} TFLOP/s/device"]
    if r["mfu"] is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    return "megalite: " + " | ".join(parts)


def train(cfg: Config) -> int:
    """Build and run; every rank returns the same exit code."""
    try:
        run = Run(cfg)
        return run.train()
    except MegaliteError as e:
        print(f"megalite train (rank {os.environ.get('RANK', '?')}): error: {e}", file=sys.stderr, flush=True)
        return signals.EXIT_CONFIG
