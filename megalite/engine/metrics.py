"""Step timing, metric sinks (JSON Lines, TensorBoard, W&B) and loss plots. The model FLOPs per token and the
devices' peaks the MFU divides by are megalite.plan's (`flops_per_token`, `peak_tflops_of`): plan and log count alike."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megalite.config import Config
from megalite.errors import ConfigError, MegaliteError


class MetricsError(MegaliteError):
    """A metrics file cannot be written."""


def mean_document_length(samples: Any) -> float:
    """Token-weighted mean document length over samples with `document_ids` (sum of squared lengths / tokens):
    the keys a token attends to under packed-document masking."""
    squares, tokens = 0, 0
    for sample in samples:
        ids = sample["document_ids"]
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        squares += int((counts.long() ** 2).sum())
        tokens += ids.numel()
    if tokens == 0:
        raise ValueError("mean_document_length needs at least one token")
    return squares / tokens


class StepTimer:
    """Wall-clock breakdown of a step into named phases (data, forward, backward, optimizer)."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.totals: dict[str, float] = {}
        self._start = 0.0

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._start
        self._start = now

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out

    def _sync(self) -> None:
        if self.sync:
            torch.cuda.synchronize()


class MetricSink:
    """Writes metrics to JSON Lines, and to TensorBoard / W&B when configured (rank 0 only)."""

    def __init__(self, cfg: Config, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.records: list[dict] = []
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        log = cfg.train.logging
        if log.metrics_file:
            path = output_dir / log.metrics_file
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if log.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.logging.tensorboard_dir is set but the tensorboard package is not "
                                  "installed (pip install tensorboard), or unset it") from None
            self._tb = SummaryWriter(str(output_dir / log.tensorboard_dir))
        if log.wandb_project and log.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.logging.wandb_project is set but the wandb package is not installed "
                                  "(pip install wandb), or unset it") from None

            os.environ.setdefault("WANDB_MODE", log.wandb_mode)
            self._wandb = wandb.init(project=log.wandb_project, name=cfg.name, config=cfg.to_dict(),
                                     dir=str(output_dir))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        if self._file:
            try:
                self._file.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: say which file, as a MegaliteError every rank reports the same way
                raise MetricsError(f"train.logging.metrics_file: cannot write {self._file.name}: "
                                   f"{e.strerror or e}") from None
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb:
            for k, v in numbers.items():
                self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)
        if self._wandb:
            self._wandb.log({f"{record.get('kind', 'train')}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def plot_losses(records: list[dict], path: Path) -> None:
    """A PNG of training and validation loss against step, written whole or not at all (temporary file, rename).
    A failure (a full disk at the end of a run) is reported on stderr and does not fail the run."""
    import sys

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        _draw_losses(records, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"megalite: warning: could not write the loss plot {path}: {e.strerror or e}; the metrics are in "
              "metrics.jsonl", file=sys.stderr, flush=True)


def _draw_losses(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    valid = [(r["step"], r["loss"]) for r in records if r.get("kind") == "valid" and "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the training log's window and profiler
# torch and numpy are imported inside these functions: the planner (megalite plan) imports this module for its peak
# table and stays torch- and numpy-free.


class MoEWindow:
    """The MoE blocks' statistics over a log window, per layer (megalite.engine.moe.collect_statistics, every step):
    tokens routed to each expert, dropped assignments, and the balancing losses' values averaged over the steps that
    computed them (the aux loss is E x sum_i f_i P_i, 1 when perfectly balanced; not times its coefficient)."""

    def __init__(self) -> None:
        self.layers: dict[int, dict] = {}

    def add(self, statistics: list[dict]) -> None:
        for s in statistics:
            entry = self.layers.setdefault(s["layer"], {"tokens": None, "dropped": 0, "aux": [], "z": []})
            tokens = [int(t) for t in s["tokens_per_expert"].tolist()]
            entry["tokens"] = tokens if entry["tokens"] is None else [a + b for a, b in zip(entry["tokens"], tokens)]
            entry["dropped"] += int(s["dropped"])
            for key, value in (("aux", s["aux_loss"]), ("z", s["z_loss"])):
                if value is not None:
                    entry[key].append(float(value))

    def take(self) -> list[dict]:
        """Each layer's summary since the last call (max_load: the most loaded expert's tokens over the mean), then
        reset."""
        out = []
        for layer, e in sorted(self.layers.items()):
            tokens = e["tokens"] or []
            mean = sum(tokens) / len(tokens) if tokens else 0.0
            out.append({"layer": layer, "tokens_per_expert": tokens, "max_load": max(tokens) / mean if mean else None,
                        "dropped": e["dropped"], "aux_loss": sum(e["aux"]) / len(e["aux"]) if e["aux"] else None,
                        "z_loss": sum(e["z"]) / len(e["z"]) if e["z"] else None})
        self.layers = {}
        return out


def moe_fields(layers: list[dict]) -> dict[str, Any]:
    """The training record's MoE fields from every layer's window summary: the worst layer's max/mean load, the
    dropped assignments of all layers, the layers' mean aux and z losses (None when not computed), and the layers."""
    loads = [x["max_load"] for x in layers if x["max_load"] is not None]
    aux = [x["aux_loss"] for x in layers if x["aux_loss"] is not None]
    z = [x["z_loss"] for x in layers if x["z_loss"] is not None]
    return {"moe_max_load": max(loads) if loads else None, "moe_dropped": sum(x["dropped"] for x in layers),
            "moe_aux_loss": sum(aux) / len(aux) if aux else None, "moe_z_loss": sum(z) / len(z) if z else None,
            "moe_layers": layers}


class MetricWindow:
    """Training records every `train.logging` interval: loss, learning rate, gradient norm, throughput, MFU, and for
    MoE models the experts' loads, dropped assignments and balancing losses (`MoEWindow`). `join_stages` (pipeline
    runs) collects every stage's MoE layers at a flush (a collective: every rank flushes at the same steps)."""

    def __init__(self, cfg: Config, sink: MetricSink, timer: StepTimer, world: int, flops_per_token: float,
                 peak_tflops: float | None, is_main: bool,
                 join_stages: Callable[[list[dict]], list[dict]] | None = None,
                 peak_fp8_tflops: float | None = None) -> None:
        self.cfg, self.sink, self.timer, self.world, self.is_main = cfg, sink, timer, world, is_main
        # MFU against the peak of the run's precision; with model.fp8 also against the FP8 peak (its linears run
        # there, attention and the output layer do not: the truth is between the two)
        self.flops_per_token, self.peak, self.peak_fp8 = flops_per_token, peak_tflops, peak_fp8_tflops
        self.tokens_per_step = cfg.global_batch_size(world) * cfg.data.seq_length
        self.moe = MoEWindow() if cfg.model.moe is not None else None
        self.join_stages = join_stages
        self._reset()

    def _reset(self) -> None:
        self.start, self.steps, self.losses = time.perf_counter(), 0, []

    def add(self, loss: float, skipped: bool, moe_statistics: list[dict] | None = None) -> None:
        self.steps += 1
        if not skipped:
            self.losses.append(loss)
        if self.moe is not None and moe_statistics:
            self.moe.add(moe_statistics)

    def due(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps

    def flush(self, step: int, lr: float, grad_norm: float | None, loss_scale: float | None,
              nonfinite_skipped: int, quiet: bool) -> dict:
        """Log the window's record and start a new window."""
        import numpy as np

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
            "mfu_fp8_peak": tflops / self.peak_fp8 if self.peak_fp8 and self.cfg.model.fp8 else None,
            "nonfinite_skipped": nonfinite_skipped,
            "memory_gb": memory_gb(),
        }
        if self.moe is not None:
            layers = self.moe.take()
            if self.join_stages is not None:
                layers = self.join_stages(layers)
            record.update(moe_fields(layers))
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
            import torch
            import torch.distributed as dist

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
    import torch

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
    if r.get("mfu_fp8_peak") is not None:
        parts[-1] += f" ({100 * r['mfu_fp8_peak']:.1f}% of the FP8 peak)"
    if r.get("moe_max_load") is not None:
        parts.append(f"experts max/mean load {r['moe_max_load']:.2f}")
        parts.append(f"dropped {r['moe_dropped']}")
        for key, name in (("moe_aux_loss", "aux"), ("moe_z_loss", "z")):
            if r.get(key) is not None:
                parts.append(f"{name} {r[key]:.4f}")
    return "megalite: " + " | ".join(parts)
