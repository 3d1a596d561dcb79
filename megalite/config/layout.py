"""The run's layout: how one run's processes and batch are split, as one value.

Every part of megalite that needs a layout takes a `Layout`: the trainer (what a checkpoint records, whether a
resume must reshard), the checkpoint manifest, the offline reshard, the planner and the commands. A new axis
(experts, a pipeline schedule) is one field here, its manifest key and, when it changes how the training state
is split, one entry of `STATE_AXES`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the class only; no import cycle at run time
    from megalite.config.schema import Config

# The axes that decide how the training state is split into files. A checkpoint whose value differs on any of them
# cannot be read by DeepSpeed's own loader and is resharded (elastic resume); the others (micro-batch split,
# sequence parallelism) change nothing on disk.
STATE_AXES = ("tensor", "pipeline", "context", "expert", "data", "zero_stage", "precision", "layer_placement")


@dataclass(frozen=True)
class Layout:
    """Parallel degrees, ZeRO stage, micro-batch split and precision of one run (world = product of the degrees)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1  # expert parallelism: experts split over this many of the data x context replicas
    data: int = 1
    zero_stage: int = 0
    micro_batch: int = 1  # samples per micro-batch per data-parallel rank
    accumulation: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 | fp16
    sequence_parallel: bool = False  # only meaningful at tensor > 1
    # Which pipeline stage holds which layers: "contiguous" stages (1F1B, ZB-H1) or DualPipeV's "V" (each rank a chunk
    # from the front and one from the back). The schedule itself is not training state; the placement is.
    layer_placement: str = "contiguous"

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> Layout:
        """The layout `cfg` describes at `world_size` (unchecked: config.validate says what does not divide)."""
        p = cfg.parallel
        return cls(tensor=p.tensor, pipeline=p.pipeline, context=p.context, expert=p.expert,
                   data=cfg.dp_size(world_size),
                   zero_stage=cfg.zero_stage, micro_batch=cfg.micro_batch_size,
                   accumulation=cfg.gradient_accumulation_steps, precision=cfg.precision,
                   sequence_parallel=bool(p.sequence_parallel and p.tensor > 1),
                   layer_placement="V" if p.pipeline > 1 and p.pipeline_schedule == "dualpipev" else "contiguous")

    # ------------------------------------------------------------------ derived
    @property
    def world(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data

    @property
    def replicas(self) -> int:
        """Ranks holding the same weights, over which ZeRO partitions and gradients reduce: data x context."""
        return self.data * self.context

    @property
    def experts_split(self) -> bool:
        """Whether each expert's weights live on some ranks only (expert parallelism at ZeRO-1/2; ZeRO-0 and ZeRO-3 keep
        every expert on every rank and split only the computation: megalite.engine.moe)."""
        return self.expert > 1 and self.zero_stage in (1, 2)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step."""
        return self.micro_batch * self.accumulation * self.data

    # ------------------------------------------------------------------ comparison
    def changes(self, saved: Layout) -> list[str]:
        """How the training state of `saved` must be resharded to this layout, in words ([] when DeepSpeed's own
        loader reads it)."""
        return [f"{axis} {getattr(saved, axis)} -> {getattr(self, axis)}" for axis in STATE_AXES
                if getattr(saved, axis) != getattr(self, axis)]

    def with_(self, **axes: Any) -> Layout:
        """A copy with some axes changed."""
        return replace(self, **axes)

    # ------------------------------------------------------------------ the manifest's "layout" entry
    def to_manifest(self) -> dict[str, Any]:
        """The manifest's "layout" object: every field, plus world size and global batch for readers."""
        return {**asdict(self), "world_size": self.world, "global_batch": self.global_batch}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> Layout:
        """The layout a manifest records. Manifests written before a field existed get its default (context 1); ones
        without the micro-batch split (before it was recorded) read as one micro-batch of the global batch."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in entry.items() if k in known}
        if "micro_batch" not in values and "global_batch" in entry:
            values["micro_batch"] = max(1, int(entry["global_batch"]) // max(1, int(values.get("data", 1))))
        return cls(**values)

    def describe(self) -> str:
        """One line, e.g. 'TP2+SP, CP2, PP1, DP4, ZeRO-1, micro-batch 2 x 8, bf16'."""
        parts = [f"TP{self.tensor}{'+SP' if self.sequence_parallel else ''}", f"PP{self.pipeline}", f"DP{self.data}",
                 f"ZeRO-{self.zero_stage}", f"micro-batch {self.micro_batch} x {self.accumulation}", self.precision]
        if self.context > 1:
            parts.insert(1, f"CP{self.context}")
        if self.expert > 1:
            parts.insert(-3, f"EP{self.expert}")
        if self.layer_placement != "contiguous":
            parts.insert(-3, f"{self.layer_placement} placement")
        return ", ".join(parts)
