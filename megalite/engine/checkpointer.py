"""The training loop's one checkpoint object: `resume()` once at the start, `save(step, last=...)` after every step.

It owns every checkpoint decision of a run, so the loop makes two calls and knows nothing else:
- when to save: every `train.checkpoint_interval` steps and at the last step; `last=True` also for the save before a
  preemption exit or the non-finite stop;
- the non-finite guard: weights that are not finite on some rank are never saved (the newest checkpoint stays);
- synchronous or background (`train.checkpoint_async`) saves: at most one in flight, committed before the next save,
  and always synchronous when `last`; a finished background save is logged at the next step without waiting;
- what to resume (megalite.checkpoint's verified choice) and how: DeepSpeed's own loader for this layout, the
  elastic restore (`megalite.engine.elastic.restore_resharded`, shared with the offline reshard) for another one.
Housekeeping (pruning, quarantine, `resume: never`) is the CheckpointManager's, which this object drives.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from megalite.checkpoint import CheckpointManager, manifest_layout, model_signature, read_manifest, run_identity
from megalite.checkpoint.commit import PendingSave
from megalite.checkpoint.reshard import TrainingState
from megalite.config import Config, Layout
from megalite.distributed import any_rank
from megalite.engine import watchdog
from megalite.engine.elastic import restore_resharded
from megalite.engine.metrics import MetricSink
from megalite.engine.moe import after_load
from megalite.engine.preflight import checkpoint_bytes
from megalite.errors import CheckpointError, ConfigError
from megalite.parallel.random import model_parallel_seed, seed_everything


class Checkpointer:
    """Resume and save for one training run (every call is collective: all ranks call it at the same step)."""

    def __init__(self, cfg: Config, world: int, engine: Any, schedule: Any, grid: Any, device: torch.device,
                 client_state: Callable[[], dict], sink: MetricSink, say: Callable[[str], None]) -> None:
        self.cfg, self.engine, self.schedule, self.grid, self.device = cfg, engine, schedule, grid, device
        self.client_state, self.sink, self.say = client_state, sink, say
        self.layout = cfg.layout(world)
        self.background = cfg.checkpoint_async
        self.store = CheckpointManager(
            str(cfg.checkpoint_root),
            keep=cfg.train.keep_checkpoints,
            layout=self.layout,
            config=cfg.to_dict(),
            model=model_signature(cfg.model),
            identity=run_identity(cfg),
            relayout=True,  # another layout is resharded (elastic resume), not refused
            background=self.background,
            # A background commit waits for the slowest rank's write, which may take far longer than a collective.
            background_timeout_s=max(3600.0, cfg.train.collective_timeout_s),
        )
        self.needed_bytes = checkpoint_bytes(cfg)  # checked against the free space before each save
        self._warned: PendingSave | None = None  # the failed background save already said

    # ------------------------------------------------------------------ resume
    def resume(self) -> dict | None:
        """Load the checkpoint train.resume asks for (verified on every rank) into the engine, resharding one of
        another layout; returns its client state (step, sampler, counters), or None to start fresh."""
        cfg = self.cfg
        path = self.store.find_resume(cfg.train.resume, expected_model=model_signature(cfg.model))
        if path is None:
            if self.store.moved_aside:
                self.say(f"train.resume=never: moved the checkpoints already in {self.store.root} to "
                         f"{self.store.moved_aside} (nothing deleted); starting fresh")
            elif cfg.train.resume != "never":
                self.say("no complete checkpoint to resume; starting fresh")
            return None
        saved = manifest_layout(read_manifest(path))  # model and run identity were checked by find_resume
        if saved.global_batch != self.layout.global_batch and not cfg.train.allow_batch_change:
            raise ConfigError(
                f"train.allow_batch_change: {path} was trained with a global batch of {saved.global_batch} samples, "
                f"this run's is {self.layout.global_batch}; keep the global batch (change micro-batch x accumulation "
                "x data parallel together), or set train.allow_batch_change=true to continue from its sample "
                "position with the schedule by step")
        changes = self.layout.changes(saved)
        if changes:
            client = self._restore_resharded(path, saved, changes)
        else:
            client = self.store.load(self.engine, path)["client_state"]
            after_load(self.engine)
        self.say(f"resumed from {path} at step {int(client['step'])}")
        return client

    def _restore_resharded(self, path: str, saved: Layout, changes: list[str]) -> dict:
        """Elastic resume: the checkpoint's training state cut for this layout, and fresh per-rank RNG streams."""
        t0 = time.perf_counter()
        source = TrainingState(path, verify=False)  # find_resume verified every file against the manifest
        client, restored = restore_resharded(self.engine, self.schedule, self.grid, source)
        # RNG streams are per rank and the ranks changed: re-seed every stream from the seed and the step.
        seed = self.cfg.train.seed + 1_000_003 * int(client["step"])
        seed_everything(seed)
        model_parallel_seed(seed, self.grid.get_tensor_model_parallel_rank(), self.grid.get_pipe_parallel_rank())
        self.say(f"elastic resume of {path}: layout {', '.join(changes)}; resharded {restored['parameters']} "
                 f"parameters with their optimizer state (step {restored['optimizer_step']}) and the schedule in "
                 f"{time.perf_counter() - t0:.1f} s")
        self.sink.log({"kind": "reshard", "step": int(client["step"]), "from": saved.to_manifest(),
                       "to": self.layout.to_manifest(), "changes": changes})
        return client

    # ------------------------------------------------------------------ save
    def due(self, step: int) -> bool:
        """Whether `step` is a checkpoint step: every train.checkpoint_interval steps, and the run's last step."""
        every = self.cfg.train.checkpoint_interval
        return bool(every and step % every == 0) or step == self.cfg.train.steps

    def save(self, step: int, *, last: bool = False) -> str | None:
        """Called after every step. Saves when the step is due, or when `last` (the run ends here: its last step, a
        preemption, the non-finite stop; or a background save failed), in the background when train.checkpoint_async
        and not `last`. A background save still in flight is committed first; if it failed, that is recorded and this
        step is saved synchronously instead. Returns the checkpoint directory when one was saved (a background one
        commits later), None otherwise."""
        if not (last or self.due(step)):
            self._poll(step)
            return None
        return self._save_now(step, last)

    @watchdog.during("checkpoint")  # a long phase: the watchdog allows it the long hang timeout
    def _save_now(self, step: int, last: bool) -> str | None:
        try:
            self.close(step)
        except CheckpointError as e:  # the same on every rank: the background commit shared its outcome
            self.say(f"step {step}: {e}; saving step {step} synchronously instead")
            self.sink.log({"kind": "checkpoint_failed", "step": step, "error": str(e)})
            last = True
        bad = self._first_nonfinite_parameter()
        (any_bad,) = any_rank([bad is not None], self.device)
        if any_bad:
            previous = self.store.latest_step()
            where, newest = bad or "on another rank", previous if previous is not None else "none"
            self.say(f"step {step}: NOT saving a checkpoint: the weights are not finite ({where}); the newest "
                     f"checkpoint stays step {newest}")
            self.sink.log({"kind": "checkpoint_skipped", "step": step, "reason": "non-finite weights"})
            return None
        if self.background and not last:
            pending = self.store.save_async(self.engine, step, self.client_state(), needed_bytes=self.needed_bytes)
            self.sink.log({"kind": "checkpoint", "step": step, "path": pending.path, "mode": "async",
                           "seconds": pending.snapshot_s, "snapshot_bytes": pending.snapshot_bytes})
            return pending.path
        t0 = time.perf_counter()
        path = self.store.save(self.engine, step, self.client_state(), needed_bytes=self.needed_bytes)
        self.sink.log({"kind": "checkpoint", "step": step, "path": path, "mode": "sync",
                       "seconds": time.perf_counter() - t0})
        return path

    @watchdog.during("checkpoint")
    def close(self, step: int) -> None:
        """Commit the background save in flight, if any (every rank at the same step: a failure raises everywhere)."""
        pending = self.store.in_flight
        if pending is None:
            return
        already_done = pending.done()
        self.store.wait()
        self._log_written(pending, step, waited_s=0.0 if already_done else pending.waited_s or 0.0)

    def _poll(self, step: int) -> None:
        """Log a background save that finished, without waiting. A failed one is left for `retry_failed`, which every
        rank calls at the same step once the step's agreement says some rank saw the failure (ranks see the thread
        finish at different steps)."""
        pending = self.store.in_flight
        if pending is not None and pending.done() and pending.outcome and pending.outcome[0] == "ok":
            self.store.wait()
            self._log_written(pending, step, waited_s=0.0)

    def failed_in_background(self) -> bool:
        """Whether the background save in flight has failed (this rank's view, no collective); said once, at once."""
        pending = self.store.in_flight
        failed = pending is not None and pending.done() and bool(pending.outcome) and pending.outcome[0] == "error"
        if failed and self._warned is not pending:
            self._warned = pending
            self.say(f"WARNING: the background save of step {pending.step} failed ({pending.outcome[1]}); saving the "
                     "current step synchronously at the end of this one")
        return failed


    def _log_written(self, pending: PendingSave, step: int, waited_s: float) -> None:
        self.sink.log({"kind": "checkpoint_written", "step": pending.step, "path": pending.path,
                       "write_seconds": pending.write_s, "waited_seconds": waited_s, "at_step": step})
        if waited_s > 1.0:
            self.say(f"step {step}: waited {waited_s:.1f} s for the background save of step {pending.step}")

    def _first_nonfinite_parameter(self) -> str | None:
        """The name of this rank's first parameter (its ZeRO-3 partition) holding a NaN or inf, else None."""
        for name, p in self.engine.module.named_parameters():
            local = getattr(p, "ds_tensor", None)
            tensor = local if local is not None and local.numel() else p
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                return name
        return None


def say_on_rank0(is_main: bool) -> Callable[[str], None]:
    """A `say` for the run's messages: rank 0 prints 'megalite: ...' to stderr, the others stay quiet."""

    def say(message: str) -> None:
        if is_main:
            print(f"megalite: {message}", file=sys.stderr, flush=True)

    return say
