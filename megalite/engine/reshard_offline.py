"""`megalite checkpoint reshard`: a checkpoint rewritten for another layout, without training.

The target world (tensor x context x pipeline x data processes, experts split over `expert` of the data x context
replicas) is started on this machine (CPU, gloo), each rank builds its
part of the target DeepSpeed engine, loads the source's full state one parameter at a time (the same code as an
elastic resume: `megalite.engine.elastic`) and the ranks save it through the commit protocol (manifest, hashes,
`latest`). The result is a complete checkpoint of the target layout that resumes with DeepSpeed's own loader; it
keeps the source's run identity, step, sample position, counters and schedule. No data is read.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megalite import launch
from megalite.checkpoint import CheckpointManager, model_signature, resolve_checkpoint
from megalite.checkpoint.reshard import TrainingState
from megalite.checkpoint.verify import verify_checkpoint
from megalite.config import Config, from_dict
from megalite.engine.build import build_engine
from megalite.engine.elastic import restore_resharded
from megalite.engine.moe import replicate_experts
from megalite.engine.preflight import checkpoint_bytes, existing_ancestor
from megalite.engine.strategy import strategy_for
from megalite.errors import CheckpointError, ConfigError
from megalite.local_ranks import spawn_local_ranks
from megalite.memory import rss_anon_bytes
from megalite.parallel import ProcessGrid


def target_config(source: Config, source_world: int, tensor: int, pipeline: int, data: int,
                  zero: int | None = None, context: int = 1, expert: int = 1) -> Config:
    """The source's config at the target layout, with the same global batch (micro-batch kept where it divides)."""
    raw = copy.deepcopy(source.to_dict())
    raw.pop("source", None)
    raw["parallel"]["tensor"], raw["parallel"]["pipeline"] = tensor, pipeline
    raw["parallel"]["context"], raw["parallel"]["expert"] = context, expert
    ds = raw["deepspeed"]
    if zero is not None:
        ds.setdefault("zero_optimization", {})["stage"] = zero
    batch = source.global_batch_size(source_world)
    micro = source.micro_batch_size
    if batch % (micro * data):
        micro = 1
    if batch % (micro * data):
        raise ConfigError(f"--data {data}: the global batch of {batch} samples is not divisible by {data} data-parallel "
                          "ranks")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = batch // (micro * data)
    ds.pop("train_batch_size", None)
    return from_dict(raw, world_size=tensor * pipeline * data * context)


def reshard(source: str | os.PathLike, out: str | os.PathLike, tensor: int, pipeline: int, data: int,
            zero: int | None = None, report: dict | None = None, context: int = 1, expert: int = 1) -> str:
    """Write the checkpoint `source` for the layout tensor x context x pipeline x data (ZeRO stage `zero`, default the
    source's; experts split over `expert` replicas) under the checkpoint root `out`; returns the new step directory. `report`, when given, receives each
    rank's phase times and peak resident memory (after building its engine, and at the end)."""
    step_dir = resolve_checkpoint(source)
    verify_checkpoint(step_dir)  # every file against its hash, before anything is deserialised
    src = TrainingState(step_dir, verify=False)
    world = tensor * pipeline * data * context
    cfg = target_config(src.config, src.layout.world, tensor, pipeline, data, zero, context, expert)
    out = Path(out).absolute()
    _refuse_overlap(out, step_dir.absolute(), src.config)
    if (out / "latest").exists() or any(out.glob("step*")):
        raise CheckpointError(f"{out}: already holds checkpoints; reshard into an empty directory")
    needed = checkpoint_bytes(cfg)
    free = shutil.disk_usage(existing_ancestor(out)).free
    if needed > free:
        raise CheckpointError(f"--out {out}: not enough free space: the resharded checkpoint needs about "
                              f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free there")
    ranks, failures, codes = spawn_local_ranks(_rank, world, str(step_dir), cfg.to_dict(), str(out))
    if report is not None:
        report["ranks"] = [ranks[r] for r in sorted(ranks)]
    if failures or any(codes):
        raise CheckpointError(f"reshard of {step_dir} to {out} failed (exit codes {codes}): " + "; ".join(failures))
    return str(resolve_checkpoint(out))


def _refuse_overlap(out: Path, step_dir: Path, source: Config) -> None:
    """--out must be neither inside nor around the source's step directory, checkpoint root or run directory: the
    output would become part of the run it came from (a resume would reject or pick it, `eval`/`generate`/`checkpoint
    list` of the run would read it instead of the run's newest step)."""
    root = step_dir.parent
    places = {"step directory": step_dir, "checkpoint root": root}
    run = Path(source.train.output_dir).absolute() if source.train.output_dir else None
    if root.name == "checkpoints":  # the default layout: RUN/checkpoints/stepN
        places["run directory"] = root.parent
    elif run is not None and root.is_relative_to(run):
        places["run directory"] = run
    overlaps = [(what, place) for what, place in places.items() if out == place] + [
        (what, place) for what, place in places.items() if out.is_relative_to(place) or place.is_relative_to(out)]
    if overlaps:
        what, place = overlaps[0]
        raise CheckpointError(f"--out {out}: {'is' if out == place else 'overlaps'} the source's {what} {place}; "
                              "write the resharded checkpoint to a directory outside the source run")


def _rank(rank: int, world: int, port: int, source: str, raw: dict, out: str, results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results.put(("report", rank, _reshard_rank(source, raw, out)))


class AnonymousMemory:
    """Peak anonymous resident memory (RssAnon: this process's own allocations, not the memory-mapped checkpoint
    pages the kernel can drop at will) per phase, sampled every 10 ms by a thread. Linux only; zeros elsewhere."""

    def __init__(self) -> None:
        self.peak, self.phase_peaks = 0, {}  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    now = staticmethod(rss_anon_bytes)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def end_phase(self, name: str) -> None:
        """Record the peak since the previous phase ended and the level now; the next phase starts from it."""
        level = self.now()
        self.phase_peaks[name] = max(self.peak, level)
        self.phase_peaks[f"{name}_end"] = level
        self.peak = level

    def close(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.phase_peaks


def _reshard_rank(source: str, raw: dict, out: str) -> dict:
    t0 = time.perf_counter()
    memory = AnonymousMemory()
    cfg = from_dict(raw)
    launch.init_distributed(timedelta(minutes=10).total_seconds())
    world = dist.get_world_size()
    grid = ProcessGrid(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline, context=cfg.parallel.context,
                       expert=cfg.parallel.expert, replicate_experts=replicate_experts(cfg))
    strategy = strategy_for(cfg, grid, launch.device())
    model = strategy.build_model().to(launch.device())
    model = model.to(cfg.torch_dtype)
    engine, schedule = build_engine(model, cfg, grid, world)
    built = time.perf_counter()
    memory.end_phase("build")
    src = TrainingState(source, verify=False)
    client, _ = restore_resharded(engine, schedule, grid, src)
    loaded = time.perf_counter()
    memory.end_phase("reshard")
    manager = CheckpointManager(out, keep=cfg.train.keep_checkpoints, layout=cfg.layout(world),
                                config=cfg.to_dict(), model=model_signature(cfg.model),
                                identity=src.manifest.get("run_identity"))
    manager.save(engine, int(client["step"]), client, needed_bytes=checkpoint_bytes(cfg))
    saved = time.perf_counter()
    memory.end_phase("save")
    dist.barrier()
    dist.destroy_process_group()
    anonymous = memory.close()
    return {"build_s": round(built - t0, 2), "load_s": round(loaded - built, 2), "save_s": round(saved - loaded, 2),
            "engine_bytes": anonymous["build_end"], "reshard_peak_bytes": anonymous["reshard"],
            "save_peak_bytes": anonymous["save"]}
