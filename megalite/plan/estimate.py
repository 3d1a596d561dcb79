"""The plan of one layout: memory, communication and time put together into a step time, throughput and MFU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megalite.config import Config, Layout
from megalite.errors import ConfigError
from megalite.plan import schedule
from megalite.plan.communication import Collective, communication, transfer_seconds
from megalite.plan.devices import Device, GiB
from megalite.plan.layout import PATH_NAMES, Settings, layout_of, settings
from megalite.plan.memory import ALLOWANCE_GIB, StageMemories, StageMemory, memory
from megalite.plan.stages import Stage
from megalite.plan.timing import StageTime, flops_per_token, optimizer_seconds, stage_time


@dataclass
class Plan:
    """Everything `megalite plan` reports for one layout."""

    cfg: Config
    layout: Layout
    settings: Settings
    device: Device
    gpus_per_node: int
    memory: StageMemories  # a sequence: every stage's, built when read
    comms: list[list[Collective]]  # per stage
    times: list[StageTime]  # per stage, one micro-batch
    optimizer_s: float
    dp_exposed_s: float
    step_s: float
    bubble: float
    tokens_per_step: int
    model_flops_per_token: float
    allowance_gib: float = ALLOWANCE_GIB
    notes: tuple[str, ...] = ()  # what the plan could not model as megalite or DeepSpeed would run it

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def model_tflops_per_gpu(self) -> float:
        return self.model_flops_per_token * self.tokens_per_step / self.step_s / self.layout.world / 1e12

    @property
    def mfu(self) -> float:
        return self.model_tflops_per_gpu * 1e12 / self.device.peak(self.settings.precision)

    @property
    def peak_memory(self) -> float:
        return self.worst_stage().total(self.allowance_gib)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.device.memory_gib * GiB

    def worst_stage(self) -> StageMemory:
        """The fullest stage (the first of them on a tie)."""
        fullest = self.memory.fullest() if isinstance(self.memory, StageMemories) else self.memory
        return max(fullest, key=lambda sm: sm.total(self.allowance_gib))

    def to_dict(self) -> dict:
        """A JSON-serialisable summary."""
        return {
            "layout": {**dataclasses.asdict(self.layout), "recompute": self.settings.recompute,
                       "loss_chunk_tokens": self.settings.loss_chunk_tokens,
                       "pipeline_schedule": self.cfg.parallel.pipeline_schedule},
            "device": self.device.name, "precision": self.settings.precision,
            "deepspeed_path": PATH_NAMES[self.settings.path], "fits": self.fits,
            "memory_gib": [{"stage": sm.stage, "total": sm.total(self.allowance_gib) / GiB,
                            "allocated": sm.allocated / GiB, "in_flight": sm.in_flight,
                            "terms": {k: v / GiB for k, v in sm.terms.items()},
                            "host": {k: v / GiB for k, v in sm.host.items()},
                            "activations_per_micro_batch": {k: v / GiB for k, v in
                                                            sm.activations_per_micro_batch.items()}}
                           for sm in self.memory],
            "communication": [[{**dataclasses.asdict(c), "seconds": transfer_seconds(c, self.device)} for c in cs]
                              for cs in self.comms],
            "step_s": self.step_s, "bubble": self.bubble, "optimizer_s": self.optimizer_s,
            "dp_exposed_s": self.dp_exposed_s, "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_per_gpu": self.tokens_per_s / self.layout.world,
            "model_tflops_per_gpu": self.model_tflops_per_gpu, "mfu": self.mfu,
            "micro_batch_s": [dataclasses.asdict(t) | {"total": t.total} for t in self.times],
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def plan(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8, *,
         attention: Optional[str] = None, allowance_gib: float = ALLOWANCE_GIB) -> Plan:
    """The cost model for `cfg` on `world_size` GPUs of `device`, `gpus_per_node` to a node. `cfg` must have passed
    `config.validate(cfg, world_size)`: the plan does not validate again (one validation per run).

    `attention` overrides the attention implementation ('materialized' models systems that store the T x T
    scores, such as Megatron-LM in 2021); by default it follows train.kernels.
    """
    check_cluster(world_size, gpus_per_node)
    layout = layout_of(cfg, world_size)
    s = settings(cfg, attention)
    return evaluate(cfg, layout, s, device, gpus_per_node, allowance_gib)


def check_cluster(world_size: int, gpus_per_node: int) -> None:
    """Whole nodes of a positive size (ConfigError naming the flag)."""
    if gpus_per_node <= 0:
        raise ConfigError(f"--gpus-per-node: must be > 0, got {gpus_per_node}")
    if world_size > gpus_per_node and world_size % gpus_per_node:
        raise ConfigError(f"--world-size: {world_size} is not a multiple of --gpus-per-node {gpus_per_node} "
                          "(whole nodes)")


def evaluate(cfg: Config, layout: Layout, s: Settings, device: Device, gpus_per_node: int,
             allowance_gib: float = ALLOWANCE_GIB) -> Plan:
    """The plan of `cfg` laid out as `layout` with `s` (every plan, and every layout `--search` ranks, is built here)."""
    if s.precision not in device.peak_tflops:
        raise ConfigError(f"precision {s.precision!r} has no peak for {device.name}")
    mem = memory(cfg, layout, s)
    sts = schedule.rank_stages(cfg, layout.tensor, layout.pipeline)
    by_kind: dict[tuple, tuple[list[Collective], StageTime, float]] = {}
    for st in sts:
        if st.kind not in by_kind:
            cs = communication(cfg, layout, st, s, gpus_per_node)
            by_kind[st.kind] = (cs, stage_time(cfg, layout, st, s, device, cs),
                                optimizer_seconds(st, layout, s, device))
    comms = [by_kind[st.kind][0] for st in sts]
    times = [by_kind[st.kind][1] for st in sts]
    m, p = layout.accumulation, layout.pipeline
    slowest = max((t for _, t, _ in by_kind.values()), key=lambda t: t.total)
    # The schedule's step, every rank taking the slowest one's forward, input- and weight-gradient passes.
    passes = schedule.split_passes(slowest, s.recompute)
    timeline = schedule.step_seconds(cfg.parallel.pipeline_schedule, p, m, passes)
    pipeline_s, bubble = timeline.step, timeline.bubble
    optimizer_s = max(value[2] for value in by_kind.values())
    # Data-parallel traffic. ZeRO-1/2 with overlap_comm reduce their gradient buckets during the backward (all but
    # the last bucket's worth hides behind it). ZeRO-3's per-layer gathers and reduce-scatters are charged in full:
    # the first version of this model let its prefetch hide them and over-predicted the ZeRO-3 rows of Narayanan
    # et al. (2021), Table 2, by 40-55% (docs/plan.md says so). Everything else waits for the backward to finish.
    dp_exposed = 0.0
    for cs, t, _ in by_kind.values():  # stages of one kind send the same
        exposed = 0.0
        for c in cs:
            seconds = transfer_seconds(c, device)
            if c.group in ("DP", "EDP") and c.kind == "all-reduce" and s.path == "zero" and s.overlap_comm:
                last_bucket = min(1.0, s.reduce_bucket * s.element / max(c.bytes, 1.0))
                seconds = max(seconds * last_bucket, seconds - 2 / 3 * m * (t.matmul + t.attention + t.memory_bound))
            if c.group in ("DP", "EDP", "tied embedding"):
                exposed += seconds
        dp_exposed = max(dp_exposed, exposed)
    step = pipeline_s + optimizer_s + dp_exposed
    tokens = cfg.micro_batch_size * m * layout.data * cfg.data.seq_length
    return Plan(cfg, layout, s, device, gpus_per_node, mem, comms, times, optimizer_s, dp_exposed, step, bubble,
                tokens, flops_per_token(cfg), allowance_gib, plan_notes(cfg, sts))


def plan_notes(cfg: Config, sts: list[Stage]) -> tuple[str, ...]:
    """Where the plan departs from what DeepSpeed would do, said in the reports."""
    notes = []
    if cfg.model.attention_dropout > 0:
        notes.append(f"model.attention_dropout={cfg.model.attention_dropout:g} is planned as other stacks run it "
                     "(flash attention keeps no dropout mask; a stored T x T softmax keeps one), but megalite cannot "
                     "train this config: its attention kernels have no dropout")
    if not all(st.exact for st in sts):
        notes.append(f"the {cfg.model.num_layers:,} layers are cut into pipeline stages in closed form, not by "
                     "DeepSpeed's partition_balanced, whose cost grows as layers^2 x stages (the heaviest stage within "
                     "0.2% of DeepSpeed's where both were computed; block counts may differ by a few)")
    return tuple(notes)
