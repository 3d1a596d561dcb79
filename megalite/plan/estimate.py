"""The plan of one layout: memory, communication and time put together into a step time, throughput and MFU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megalite.config import Config, Layout
from megalite.errors import ConfigError
from megalite.plan import schedule
from megalite.plan.communication import Collective, communication, links, per_node, transfer_seconds, zero3_traffic
from megalite.plan.devices import Device, GiB
from megalite.plan.layout import PATH_NAMES, Settings, layout_of, settings
from megalite.plan.memory import ALLOWANCE_GIB, StageMemories, StageMemory, memory
from megalite.plan.stages import Stage
from megalite.plan.timing import StageTime, flops_per_token, optimizer_seconds, stage_time, zero3_exposed_seconds

VERDICT_MEGALITE = "does not fit as megalite runs it"


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
        """Model FLOPs utilisation against the device's peak in the run's precision (bf16 with FP8 too: the training
        log's MFU)."""
        return self.model_tflops_per_gpu * 1e12 / self.device.peak(self.settings.precision)

    @property
    def mfu_fp8_peak(self) -> Optional[float]:
        """With FP8: the same against the device's FP8 peak (None without FP8, or where the device has none)."""
        if not self.settings.fp8_recipe or "fp8" not in self.device.peak_tflops:
            return None
        return self.model_tflops_per_gpu * 1e12 / self.device.peak("fp8")

    @property
    def peak_memory(self) -> float:
        return self.worst_stage().total(self.allowance_gib)

    @property
    def fits(self) -> bool:
        """Whether the fullest stage fits as megalite (DeepSpeed 0.19) would run the layout, allowance included."""
        return self.peak_memory <= self.device.memory_gib * GiB

    @property
    def floor_memory(self) -> float:
        """The least any implementation of this layout holds on its fullest stage, in bytes (`memory.floor_memory`)."""
        fullest = self.memory.fullest() if isinstance(self.memory, StageMemories) else self.memory
        return max(sm.floor.allocated if sm.floor is not None else sm.allocated for sm in fullest)

    @property
    def verdict(self) -> str:
        """'fits'; 'does not fit' only when even the lower bound exceeds the device (certain); otherwise 'does not fit
        as megalite runs it': megalite would run out of memory, a leaner implementation of the same layout (Megatron's
        distributed optimizer, sequence-parallel inputs kept as shards, no buckets) might not."""
        if self.fits:
            return "fits"
        return "does not fit" if self.floor_memory > self.device.memory_gib * GiB else VERDICT_MEGALITE

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
            "deepspeed_path": PATH_NAMES[self.settings.path], "fits": self.fits, "verdict": self.verdict,
            "lower_bound_gib": self.floor_memory / GiB,
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
            **({"mfu_fp8_peak": self.mfu_fp8_peak} if self.settings.fp8_recipe else {}),
            "micro_batch_s": [dataclasses.asdict(t) | {"total": t.total} for t in self.times],
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def plan(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8, *,
         attention: Optional[str] = None, allowance_gib: float = ALLOWANCE_GIB,
         assume: Optional[dict[str, Any]] = None) -> Plan:
    """The cost model for `cfg` on `world_size` GPUs of `device`, `gpus_per_node` to a node. `cfg` must have passed
    `config.validate(cfg, world_size)`: the plan does not validate again (one validation per run).

    `attention` overrides the attention implementation ('materialized' models systems that store the T x T
    scores, such as Megatron-LM in 2021); by default it follows train.kernels. `assume` sets what the plan assumes of
    the implementation beyond the config (`Settings` fields: `assumed`), for other stacks' runs.
    """
    check_cluster(world_size, gpus_per_node)
    layout = layout_of(cfg, world_size)
    s = assumed(settings(cfg, attention), assume)
    return evaluate(cfg, layout, s, device, gpus_per_node, allowance_gib)


def assumed(s: Settings, assume: Optional[dict[str, Any]]) -> Settings:
    """`s` with the planner-only assumptions `assume` (Settings fields), each checked by name."""
    if not assume:
        return s
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(assume) - fields)
    if unknown:
        raise ConfigError(f"plan assumptions: unknown {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    return dataclasses.replace(s, **assume)


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
    if s.engine not in ("deepspeed", "megatron"):
        raise ConfigError(f"engine: {s.engine!r} is not one of deepspeed, megatron")
    if s.fp8_recipe and "fp8" not in device.peak_tflops:
        raise ConfigError(f"model.fp8: {device.name} has no FP8 units (compute capability 8.9 or newer needed)")
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
    seen: set[tuple] = set()
    optimizer_s = max(value[2] for value in by_kind.values())
    # Data-parallel traffic. ZeRO-1/2 with overlap_comm reduce their gradient buckets during the backward (all but
    # the last bucket's worth hides behind it). ZeRO-3's gathers and reduce-scatters overlap its compute as
    # DeepSpeed's prefetch and overlap_comm allow (timing.zero3_exposed_seconds). Everything else waits for the
    # backward to finish.
    dp_exposed = 0.0
    for st in sts:
        if st.kind not in by_kind or st.kind in seen:
            continue
        seen.add(st.kind)
        cs, t, _ = by_kind[st.kind]  # stages of one kind send the same
        exposed = 0.0
        for c in cs:
            seconds = transfer_seconds(c, device)
            if c.group in ("DP", "EDP") and c.kind == "all-reduce" and s.path == "zero" and s.overlap_comm:
                last_bucket = min(1.0, s.reduce_bucket * s.element / max(c.bytes, 1.0))
                seconds = max(seconds * last_bucket, seconds - 2 / 3 * m * (t.matmul + t.attention + t.memory_bound))
            if c.group == "DP" and s.path == "zero3":
                continue  # below, with its overlap
            if c.group in ("DP", "EDP", "tied embedding"):
                exposed += seconds
        if s.path == "zero3" and layout.replicas > 1:
            z3 = zero3_traffic(st, s, layout.replicas, links(layout, gpus_per_node)["DP"],
                               per_node(layout, gpus_per_node)["DP"])
            exposed += zero3_exposed_seconds(t, z3, m, s, device, s.zero3_overlap)
        dp_exposed = max(dp_exposed, exposed)
    step = pipeline_s + optimizer_s + dp_exposed
    tokens = cfg.micro_batch_size * m * layout.data * cfg.data.seq_length
    return Plan(cfg, layout, s, device, gpus_per_node, mem, comms, times, optimizer_s, dp_exposed, step, bubble,
                tokens, flops_per_token(cfg), allowance_gib, plan_notes(cfg, sts, s))


def plan_notes(cfg: Config, sts: list[Stage], s: Optional[Settings] = None) -> tuple[str, ...]:
    """Where the plan departs from what DeepSpeed would do, said in the reports."""
    notes = []
    if s is not None:
        if s.attention == "materialized":
            notes.append("attention is planned with a stored T x T softmax (other stacks'; megalite's kernels are "
                         "flash attention)")
        if s.recompute_attention:
            notes.append("selective recompute of the attention core is planned as other stacks run it; megalite has "
                         "none (model.activation_checkpointing recomputes whole blocks)")
        if s.tp_overlap:
            notes.append("tensor-parallel collectives are planned hidden behind their GEMMs as Megatron-Core overlaps "
                         "them; megalite's wait")
        if s.engine == "megatron":
            notes.append("planned as Megatron-LM runs it: no pipeline-engine host work, no per-micro-batch fp32 "
                         "gradient bookkeeping (megalite runs on DeepSpeed's engines, which have both)")
        if s.zero3_overlap:
            notes.append("ZeRO-3's traffic is planned hidden as far as DeepSpeed's prefetch allows; published "
                         "multi-GPU runs do not achieve it (docs/plan.md)")
        if s.sp_saved_input == "shard":
            notes.append("sequence-parallel layers are planned keeping their input's shard (Megatron's); megalite's "
                         "keep it gathered")
    if cfg.model.attention_dropout > 0:
        notes.append(f"model.attention_dropout={cfg.model.attention_dropout:g} is planned as other stacks run it "
                     "(flash attention keeps no dropout mask; a stored T x T softmax keeps one), but megalite cannot "
                     "train this config: its attention kernels have no dropout")
    if not all(st.exact for st in sts):
        notes.append(f"the {cfg.model.num_layers:,} layers are cut into pipeline stages in closed form, not by "
                     "DeepSpeed's partition_balanced, whose cost grows as layers^2 x stages (the heaviest stage within "
                     "0.2% of DeepSpeed's where both were computed; block counts may differ by a few)")
    return tuple(notes)
