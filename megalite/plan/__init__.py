"""`megalite plan`: memory, communication and step time of a layout, computed before it runs.

One cost model for `megalite plan`, preflight, the start of `train` and `config show`. It reads the run's own config
objects and `Layout` and counts FLOPs as the training log does (`flops_per_token`), so the plan and the log agree on
what a layout is. Pure arithmetic: it allocates nothing, talks to no other process and imports neither torch nor
DeepSpeed (the engine tells it which GPU a machine has). Plans are built from configs that passed `config.validate`
at the world size; the planner never validates again.

Memory, per GPU of each pipeline stage (`memory`):
- model states as DeepSpeed 0.19 holds them (which optimizer wrapper a config gets, which copies it keeps, how ZeRO
  divides them, the alignment padding it adds), checked against a running engine;
- activations per micro-batch, tensor by tensor as autograd saves them in megalite's model (checked with
  `torch.autograd.graph.saved_tensors_hooks`), times the micro-batches a stage holds in flight under the pipeline
  schedule (`schedule`);
- transient buffers (logits and loss, the recompute working set, DeepSpeed's buckets) and a stated allowance for
  what the caching allocator does not see (CUDA context, NCCL, fragmentation).

Communication per step (`communication`): bytes per collective kind on each GPU and the link (NVLink or network)
that carries it, from DeepSpeed's rank placement (TP ranks adjacent, then context, data, then pipeline).

Time (`timing`): GEMMs at a measured fraction of the device's peak, attention at megalite's measured flash-attention
throughput, memory-bound kernels at measured fractions of HBM bandwidth, collectives at the links' bandwidths, the
schedule's bubble. Every device constant and efficiency is in `devices` with its source; none is fitted to the
published throughputs the tests compare with.

The modules, in the order they build on each other: devices (the device table, peaks, efficiencies), layout (the
Layout and the Settings read from a config), experts (what an MoE layer holds, saves, sends and computes, with
expert parallelism), stages (parameters and pipeline partitioning), schedule (pipeline schedule), memory,
communication, timing, estimate (the `Plan` of one layout), search, report, summaries (what preflight, `train` and
`config show` print).
"""

from megalite.plan.communication import Collective, communication, links, transfer_seconds
from megalite.plan.devices import (
    DEVICE_ALIASES,
    DEVICE_EFFICIENCY,
    DEVICES,
    EFFICIENCY,
    EFFICIENCY_SOURCE,
    PEAK_TFLOPS,
    Device,
    GiB,
    device_named,
    get_device,
    peak_tflops_of,
)
from megalite.plan.estimate import Plan, evaluate, plan
from megalite.plan.layout import PATH_NAMES, Settings, layout_of, settings, with_layout
from megalite.plan.memory import (
    ALLOWANCE_GIB,
    FRAGMENTATION,
    MODEL_STATE_TERMS,
    StageMemory,
    activation_bytes,
    memory,
    model_state_bytes,
)
from megalite.plan.report import format_plan, format_search
from megalite.plan.search import Candidate, candidates, search, stderr_progress
from megalite.plan.stages import Param, Stage, layer_params, numel, partition_balanced, partition_uniform, stages
from megalite.plan.summaries import (
    LocalPlan,
    memory_breakdown,
    memory_plan,
    memory_summary,
    memory_warning,
    model_states_overflow,
    plan_locally,
    startup_report,
)
from megalite.plan.timing import StageTime, attention_fraction, flops_per_token, optimizer_seconds, stage_time

__all__ = [
    "ALLOWANCE_GIB", "Candidate", "Collective", "DEVICES", "DEVICE_ALIASES", "DEVICE_EFFICIENCY", "Device", "EFFICIENCY",
    "EFFICIENCY_SOURCE", "FRAGMENTATION", "GiB", "LocalPlan", "MODEL_STATE_TERMS", "PATH_NAMES", "PEAK_TFLOPS", "Param",
    "Plan", "Settings", "Stage", "StageMemory", "StageTime", "activation_bytes", "attention_fraction", "candidates",
    "communication", "device_named", "evaluate", "flops_per_token", "format_plan", "format_search", "get_device",
    "layer_params", "layout_of", "links", "memory", "memory_breakdown", "memory_plan", "memory_summary",
    "memory_warning", "model_state_bytes", "model_states_overflow", "numel", "optimizer_seconds",
    "partition_balanced", "partition_uniform", "peak_tflops_of", "plan", "plan_locally", "search", "settings",
    "stage_time", "stages", "startup_report", "stderr_progress", "transfer_seconds", "with_layout",
]
