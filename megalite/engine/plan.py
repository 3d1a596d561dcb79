"""`megalite plan`: memory, communication and step time of a layout, computed before it runs.

One cost model for `megalite plan`, `preflight`, the start of `train` and `config show`. It reads the
run's own config objects and counts FLOPs with the training log's formula (`metrics.flops_per_token`),
so the plan and the log agree on what a layout is. Pure arithmetic: it allocates nothing and talks to no
other process; importing it imports neither torch nor DeepSpeed (`local_device` asks torch which GPU this is,
and config validation checks DeepSpeed's ZeRO keys when DeepSpeed is installed).

Memory, per GPU of each pipeline stage:
- model states as DeepSpeed 0.19 holds them (which optimizer wrapper a config gets, which copies it
  keeps, how ZeRO divides them, the alignment padding it adds), checked against a running engine;
- activations per micro-batch, tensor by tensor as autograd saves them in megalite's model (checked
  with `torch.autograd.graph.saved_tensors_hooks`), times the micro-batches a stage holds in flight
  under DeepSpeed's 1F1B schedule;
- transient buffers (logits and loss, the recompute working set, DeepSpeed's buckets) and a stated
  allowance for what the caching allocator does not see (CUDA context, NCCL, fragmentation).

Communication per step: bytes per collective kind on each GPU and the link (NVLink or network) that
carries it, from DeepSpeed's rank placement (TP ranks adjacent, then data, then pipeline).

Time: GEMMs at a measured fraction of the device's peak, attention at megalite's measured flash-attention
throughput, memory-bound kernels at measured fractions of HBM bandwidth, collectives at the links'
bandwidths, the 1F1B bubble (p - 1)/(m + p - 1). Every constant is in `DEVICES` / `EFFICIENCY` with its
source; none is fitted to the published throughputs the tests compare with.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional

from megalite.config import Config, ModelConfig, context_errors, count_parameters, kv_replication, validate
from megalite.engine.metrics import PEAK_TFLOPS, flops_per_token
from megalite.errors import ConfigError

GiB = 2**30

# ----------------------------------------------------------------------------- devices and efficiencies


@dataclass(frozen=True)
class Device:
    """One accelerator model and its node: every constant the plan uses, each with its source."""

    name: str
    peak_tflops: dict[str, float]  # dense, per dtype (bf16/fp16/fp32 with TF32 off)
    memory_gib: float  # what the driver reports as total memory
    hbm_tbps: float  # memory bandwidth, TB/s (1e12)
    intra_node_gbps: float  # per GPU and direction, GB/s (1e9): NVLink, or PCIe without it
    inter_node_gbps: float  # per GPU and direction, GB/s: the GPU's network adapter
    sources: tuple[tuple[str, str], ...] = ()

    def peak(self, precision: str) -> float:
        return self.peak_tflops[precision] * 1e12

    def with_overrides(self, **values: float) -> Device:
        """A copy with some constants replaced (command-line overrides); the source says so."""
        changed = {k: v for k, v in values.items() if v is not None}
        if not changed:
            return self
        peak = changed.pop("peak_tflops", None)
        out = dataclasses.replace(self, **changed)
        if peak is not None:
            out = dataclasses.replace(out, peak_tflops={k: peak for k in self.peak_tflops})
            changed["peak_tflops"] = peak
        notes = tuple((k, f"overridden on the command line: {v}") for k, v in changed.items())
        return dataclasses.replace(out, sources=self.sources + notes)


_NVL4 = "NVLink 4: 900 GB/s per GPU both directions together (NVIDIA H100/H200 datasheets), 450 GB/s each way"
_NDR = "one 400 Gb/s NDR adapter per GPU (DGX H100/H200 reference design): 50 GB/s each way"
# Peaks come from the one table the training log's MFU uses (engine/metrics.py), so plan and log agree.
DEVICES: dict[str, Device] = {
    "h200": Device(
        "NVIDIA H200 SXM", dict(PEAK_TFLOPS["H200"]), 140.4, 4.8, 450.0, 50.0,
        (("peak_tflops", "NVIDIA H200 datasheet: 989 TFLOPS dense BF16/FP16 (1979 with sparsity), 67 FP32"),
         ("memory_gib", "141 GB HBM3e; the driver reports 143771 MiB = 140.4 GiB"),
         ("hbm_tbps", "NVIDIA H200 datasheet: 4.8 TB/s"),
         ("intra_node_gbps", _NVL4), ("inter_node_gbps", _NDR)),
    ),
    "h100-sxm": Device(
        "NVIDIA H100 SXM", dict(PEAK_TFLOPS["H100"]), 79.6, 3.35, 450.0, 50.0,
        (("peak_tflops", "NVIDIA H100 datasheet (SXM): 989 TFLOPS dense BF16/FP16, 67 FP32"),
         ("memory_gib", "80 GB HBM3; the driver reports 81559 MiB = 79.6 GiB"),
         ("hbm_tbps", "NVIDIA H100 datasheet (SXM): 3.35 TB/s"),
         ("intra_node_gbps", _NVL4), ("inter_node_gbps", _NDR)),
    ),
    "h100-pcie": Device(
        "NVIDIA H100 PCIe", dict(PEAK_TFLOPS["H100PCIe"]), 79.6, 2.0, 64.0, 50.0,
        (("peak_tflops", "NVIDIA H100 datasheet (PCIe): 756 TFLOPS dense BF16/FP16, 51 FP32"),
         ("memory_gib", "80 GB HBM2e; 81559 MiB = 79.6 GiB"),
         ("hbm_tbps", "NVIDIA H100 datasheet (PCIe): 2.0 TB/s"),
         ("intra_node_gbps", "PCIe Gen5 x16: 128 GB/s both directions, 64 GB/s each way (no NVLink bridge)"),
         ("inter_node_gbps", _NDR)),
    ),
    "a100-80g": Device(
        "NVIDIA A100 SXM 80GB", dict(PEAK_TFLOPS["A100"]), 80.0, 2.039, 300.0, 25.0,
        (("peak_tflops", "NVIDIA A100 datasheet: 312 TFLOPS dense BF16/FP16, 19.5 FP32"),
         ("memory_gib", "80 GB HBM2e; the driver reports 81920 MiB = 80.0 GiB"),
         ("hbm_tbps", "NVIDIA A100 datasheet (80GB SXM): 2.039 TB/s"),
         ("intra_node_gbps", "NVLink 3: 600 GB/s per GPU both directions (A100 datasheet), 300 GB/s each way"),
         ("inter_node_gbps", "one 200 Gb/s HDR adapter per GPU (DGX A100): 25 GB/s each way")),
    ),
    "a100-40g": Device(
        "NVIDIA A100 SXM 40GB", dict(PEAK_TFLOPS["A100"]), 40.0, 1.555, 300.0, 25.0,
        (("peak_tflops", "NVIDIA A100 datasheet: 312 TFLOPS dense BF16/FP16, 19.5 FP32"),
         ("memory_gib", "40 GB HBM2; the driver reports 40960 MiB = 40.0 GiB"),
         ("hbm_tbps", "NVIDIA A100 datasheet (40GB SXM): 1.555 TB/s"),
         ("intra_node_gbps", "NVLink 3: 600 GB/s per GPU both directions, 300 GB/s each way"),
         ("inter_node_gbps", "one 200 Gb/s HDR adapter per GPU (DGX A100): 25 GB/s each way")),
    ),
}
DEVICE_ALIASES = {"h100": "h100-sxm", "a100": "a100-80g"}

# Achievable fractions of the datasheet figures. All measured by megalite itself on one H200 with
# `make gpu-check` (kernels/results/h200-2026-11-30, kernels/README.md "Latest GPU figures"); none is
# fitted to the published throughputs in the tests. The same fractions are applied to every device.
EFFICIENCY: dict[str, Any] = {
    # bf16 8192^3 matmul: 788 TFLOP/s of the 989 datasheet peak.
    "matmul": 788.0 / 989.0,
    # device-to-device copy: 4.22 TB/s of the 4.8 datasheet bandwidth (element-wise kernels).
    "copy": 4.22 / 4.8,
    # megalite's fused LayerNorm/RMSNorm, width 4096: forward 1.8-2.6 TB/s (middle 2.2), backward
    # 0.85-1.15 TB/s (middle 1.0), of 4.8 (torch's own norms measured alike: forward 1.6-3.2, backward 1.0-1.1).
    "norm_forward": 2.2 / 4.8,
    "norm_backward": 1.0 / 4.8,
    # megalite's Triton flash attention, forward + backward, causal, TFLOP/s by sequence length, of 989.
    "attention": {128: {512: 85, 1024: 151, 2048: 223, 4096: 272, 8192: 311, 16384: 341},
                  64: {512: 88, 1024: 110, 2048: 153, 4096: 225, 8192: 254, 16384: 269}},
    "attention_peak": 989.0,
}
EFFICIENCY_SOURCE = "measured on one H200 by `make gpu-check`, kernels/results/h200-2026-11-30"

# What the caching allocator does not count (torch.cuda.max_memory_allocated excludes it): the CUDA
# context and cuBLAS workspaces (about 0.5-1 GiB on Hopper), NCCL's communicator buffers, and the
# allocator's fragmentation. A stated allowance, not a measurement; --allowance-gib overrides the fixed part.
ALLOWANCE_GIB = 1.5
FRAGMENTATION = 0.05  # of the allocated peak


def get_device(name: str) -> Device:
    """The device table entry for `name` (case-insensitive, e.g. h200, h100-sxm, a100-80g)."""
    key = DEVICE_ALIASES.get(name.lower(), name.lower())
    if key not in DEVICES:
        raise ConfigError(f"--device: unknown device {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def local_device() -> Optional[Device]:
    """The table entry for this machine's first GPU, or None (no GPU, or one not in the table)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name().upper().replace(" ", "")
        total = torch.cuda.get_device_properties(0).total_memory / GiB
    except Exception:  # noqa: BLE001 - no driver: no device
        return None
    if "H200" in name:
        return DEVICES["h200"]
    if "H100" in name:
        return DEVICES["h100-pcie" if "PCIE" in name else "h100-sxm"]
    if "A100" in name:
        return DEVICES["a100-80g" if total > 60 else "a100-40g"]
    return None


# ----------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """How a run is laid out: the degrees and switches the cost model varies."""

    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    micro_batch: int
    accumulation: int
    sequence_parallel: bool
    recompute: bool
    loss_chunk_tokens: int
    context: int = 1  # context parallelism: each sequence split over this many ranks (Ulysses)

    @property
    def world(self) -> int:
        return self.tensor * self.pipeline * self.data * self.context

    @property
    def replicas(self) -> int:
        """Ranks holding the same weights, over which ZeRO partitions and gradients reduce: data x context."""
        return self.data * self.context

    def describe(self) -> str:
        parts = [f"TP{self.tensor}{'+SP' if self.sequence_parallel else ''}", f"PP{self.pipeline}",
                 f"DP{self.data}", f"ZeRO-{self.zero_stage}", f"micro-batch {self.micro_batch} x {self.accumulation}"]
        if self.context > 1:
            parts.insert(1, f"CP{self.context}")
        if self.recompute:
            parts.append("recompute")
        if self.loss_chunk_tokens:
            parts.append(f"loss chunks of {self.loss_chunk_tokens}")
        return ", ".join(parts)


def layout_of(cfg: Config, world_size: int) -> Layout:
    """The layout `cfg` describes at `world_size`; ConfigError naming any value that does not divide."""
    if world_size <= 0:
        raise ConfigError(f"--world-size: must be > 0, got {world_size}")
    # Names the parallel degree or batch setting that does not divide. Attention dropout, which megalite's kernels
    # refuse, is no layout rule: the plan also models the published runs of stacks that had it.
    validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_dropout=0.0)), world_size)
    p = cfg.parallel
    return Layout(
        tensor=p.tensor, pipeline=p.pipeline, data=cfg.dp_size(world_size),
        zero_stage=int((cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0)),
        micro_batch=cfg.micro_batch_size, accumulation=cfg.gradient_accumulation_steps,
        sequence_parallel=p.sequence_parallel and p.tensor > 1, recompute=cfg.model.activation_checkpointing,
        loss_chunk_tokens=cfg.model.loss_chunk_tokens, context=p.context,
    )


def with_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of `cfg` laid out as `layout` (same model, data and settings otherwise)."""
    new = copy.copy(cfg)
    new.parallel = dataclasses.replace(cfg.parallel, tensor=layout.tensor, pipeline=layout.pipeline,
                                       sequence_parallel=layout.sequence_parallel, context=layout.context)
    new.model = dataclasses.replace(cfg.model, activation_checkpointing=layout.recompute,
                                    loss_chunk_tokens=layout.loss_chunk_tokens)
    ds = dict(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch
    ds["gradient_accumulation_steps"] = layout.accumulation
    ds.pop("train_batch_size", None)
    ds["zero_optimization"] = {**(ds.get("zero_optimization") or {}), "stage": layout.zero_stage}
    new.deepspeed = ds
    return new


def _dtype_bytes(name: str, key: str) -> int:
    sizes = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
    if name not in sizes:
        raise ConfigError(f"{key}: unknown dtype {name!r}; valid: fp32, bf16, fp16")
    return sizes[name]


@dataclass(frozen=True)
class Settings:
    """The DeepSpeed and kernel choices the cost model needs, read from a Config (DeepSpeed 0.19 defaults)."""

    precision: str
    element: int  # bytes of a parameter / activation element
    grad_accum: int  # bytes of an accumulated gradient element
    zero_stage: int
    path: str  # the DeepSpeed wrapper holding model states: none | bf16_ddp | fp16_optimizer | bf16_optimizer | zero | zero3
    optimizer: str
    optimizer_state_bytes: int  # per parameter (Adam: two fp32 moments)
    reduce_bucket: int  # elements
    overlap_comm: bool
    persistence_threshold: int  # ZeRO-3: parameters this small stay whole on every rank
    prefetch_bucket: int  # ZeRO-3, elements
    max_live_parameters: int  # ZeRO-3: gathered elements kept before releasing
    max_reuse_distance: int  # ZeRO-3: a gathered parameter used again within this many elements is kept
    offload_optimizer: bool
    attention: str  # triton | torch (megalite's kernels) | materialized (other systems: a T x T score matrix)
    platform: str = "cuda"  # cuda | cpu: where torch's own kernels run (they keep different tensors)


PATH_NAMES = {"none": "torch optimizer, no ZeRO wrapper", "bf16_ddp": "bf16 without ZeRO",
              "fp16_optimizer": "FP16_Optimizer", "bf16_optimizer": "BF16_Optimizer",
              "zero": "DeepSpeedZeroOptimizer (ZeRO-1/2)", "zero3": "DeepSpeedZeroOptimizer_Stage3"}


def settings(cfg: Config, attention: Optional[str] = None, platform: str = "cuda") -> Settings:
    """DeepSpeed's choices for `cfg`: its optimizer wrapper (engine._do_optimizer_sanity_check), dtypes, buckets."""
    ds = cfg.deepspeed
    precision = cfg.precision
    element = 4 if precision == "fp32" else 2
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if accum is None:  # megalite asks DeepSpeed for fp32 accumulation with bf16 (engine.build.deepspeed_dict)
        accum = "fp32" if precision in ("bf16", "fp32") else precision
    grad_accum = _dtype_bytes(str(accum), "deepspeed.data_types.grad_accum_dtype")
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    opt = ds.get("optimizer") or {}
    kind = opt.get("type", "AdamW")
    momentum = float((opt.get("params") or {}).get("momentum", 0.9))
    state_bytes = 8 if kind in ("Adam", "AdamW") else (4 if momentum else 0)
    if stage > 0:
        if precision == "bf16" and grad_accum == 4 and stage == 1 and not offload:
            path = "bf16_optimizer"
        else:
            path = "zero3" if stage == 3 else "zero"
    elif element == grad_accum:
        path = {"fp32": "none", "bf16": "bf16_ddp", "fp16": "fp16_optimizer"}[precision]
    else:
        raise ConfigError(
            f"deepspeed.zero_optimization.stage: 0 with {precision} parameters and {accum} gradient accumulation is "
            "refused by DeepSpeed 0.19 ('unsupported mix of model_dtype and grad_accum_dtype'); use stage 1"
        )
    if attention is None:
        attention = "torch" if cfg.train.kernels in ("torch", "apex") else "triton"
    if attention not in ("triton", "torch", "materialized"):
        raise ConfigError(f"attention: {attention!r} is not one of triton, torch, materialized")
    return Settings(
        precision=precision, element=element, grad_accum=grad_accum, zero_stage=stage, path=path, optimizer=kind,
        optimizer_state_bytes=state_bytes, reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 1e5)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
        max_live_parameters=int(zero.get("stage3_max_live_parameters", 1e9)),
        max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1e9)), offload_optimizer=offload,
        attention=attention, platform=platform,
    )


# ----------------------------------------------------------------------------- parameters and stages


@dataclass(frozen=True)
class Param:
    """One parameter tensor as a TP rank holds it."""

    name: str
    numel: int
    decay: bool  # in the weight-decay group (matrices that are not embedding tables)


def layer_params(m: ModelConfig, tp: int) -> dict[str, list[Param]]:
    """Each kind of layer's parameters on one TP rank, as megalite's model allocates them."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    q, kv = m.num_heads * d, m.kv_heads * d
    v_local = m.padded_vocab_size // tp
    qkv_local, fc_local = (q + 2 * kv) // tp, (2 * f if m.mlp == "swiglu" else f) // tp

    def norm(prefix: str) -> list[Param]:
        out = [Param(prefix + ".weight", h, False)]
        return out + ([Param(prefix + ".bias", h, False)] if m.norm == "layernorm" else [])

    def linear(prefix: str, rows: int, cols: int, bias: int) -> list[Param]:
        return [Param(prefix + ".weight", rows * cols, True)] + ([Param(prefix + ".bias", bias, False)] if m.bias else [])

    block = (norm("norm1") + linear("attention.qkv", qkv_local, h, qkv_local) + linear("attention.proj", h, q // tp, h)
             + norm("norm2") + linear("mlp.fc", fc_local, h, fc_local) + linear("mlp.proj", h, f // tp, h))
    embedding = [Param("embedding.word.weight", v_local * h, False)]
    if m.position == "learned":
        embedding.append(Param("embedding.position.weight", m.max_position_embeddings * h, False))
    head = [] if m.tied_embeddings else [Param("output", v_local * h, True)]
    return {"embedding": embedding, "block": block, "final_norm": norm("final_norm"), "head": head}


def _numel(params: Any) -> int:
    return sum(p.numel for p in params)


def pipeline_layers(m: ModelConfig, tp: int) -> list[tuple[str, list[Param]]]:
    """DeepSpeed's layer list (model/pipeline.py): embedding, blocks, final norm, output (tied: the embedding again)."""
    kinds = layer_params(m, tp)
    last = ("embedding", kinds["embedding"]) if m.tied_embeddings else ("head", kinds["head"])
    return ([("embedding", kinds["embedding"])] + [("block", kinds["block"])] * m.num_layers
            + [("final_norm", kinds["final_norm"]), last])


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_balanced` (the linear partition problem) with the same results,
    tie-breaking included; its inner loop vectorised so that --search stays fast."""
    import numpy as np

    n = len(weights)
    if n <= parts:
        return partition_uniform(n, parts)
    prefix = np.zeros(n + 1)
    prefix[1:] = np.cumsum(weights)
    dp_max = np.full((n + 1, parts + 1), np.inf)
    dp_min = np.full((n + 1, parts + 1), np.inf)
    position = np.zeros((n + 1, parts + 1), dtype=int)
    dp_max[0, 0] = 0.0
    for i in range(1, n + 1):
        seg = prefix[i] - prefix[:i]  # the weight of items k..i-1, for every k < i
        for j in range(1, min(i, parts) + 1):
            hi = np.maximum(dp_max[:i, j - 1], seg)
            lo = np.minimum(dp_min[:i, j - 1], seg)
            cost = hi - lo
            # DeepSpeed takes each k whose cost is <= the best so far: the last one at the minimum wins.
            k = i - 1 - int(np.argmax((cost == cost.min())[::-1]))
            dp_max[i, j], dp_min[i, j], position[i, j] = hi[k], lo[k], k
    out = [n]
    for j in range(parts, 0, -1):
        out.append(int(position[out[-1], j]))
    return out[::-1]


def partition_uniform(items: int, parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_uniform`."""
    if items <= parts:
        return [min(p, items) for p in range(parts + 1)]
    chunk, residual = divmod(items, parts)
    bounds = [p * chunk for p in range(parts + 1)]
    for i in range(residual):
        for j in range(i + 1, parts + 1):
            bounds[j] += 1
    return bounds


@dataclass(frozen=True)
class Stage:
    """What one pipeline stage holds."""

    index: int
    blocks: int
    embedding: bool  # the first layer (token and position embeddings)
    head: bool  # final norm, output layer and loss
    params: tuple[Param, ...]
    numel: int = 0

    @property
    def kind(self) -> tuple[int, bool, bool, int]:
        """Stages of the same kind hold the same layers: the same bytes per micro-batch and the same time."""
        return self.blocks, self.embedding, self.head, self.numel


_BOUNDS: dict[tuple, list[int]] = {}
_STAGES: dict[tuple, list[Stage]] = {}


def stages(cfg: Config, tp: int, pp: int) -> list[Stage]:
    """The stages as DeepSpeed partitions megalite's pipeline layers (parallel.pipeline_partition)."""
    m = cfg.model
    shape = (m.padded_vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.kv_heads, m.ffn_size,
             m.max_position_embeddings, m.norm, m.mlp, m.position, m.bias, m.tied_embeddings)
    key = (shape, cfg.parallel.pipeline_partition, tp, pp)
    if key not in _STAGES:
        _STAGES[key] = _partition(cfg, tp, pp)
    return _STAGES[key]


def _partition(cfg: Config, tp: int, pp: int) -> list[Stage]:
    layers = pipeline_layers(cfg.model, tp)
    if pp == 1:
        if cfg.model.tied_embeddings:
            layers = layers[:-1]  # without a pipeline the output layer is the embedding itself
        bounds = [0, len(layers)]
    else:
        uniform = cfg.parallel.pipeline_partition == "uniform"
        weights = [int(kind == "block") for kind, _ in layers] if uniform else [_numel(ps) for _, ps in layers]
        key = (tuple(weights), pp)
        if key not in _BOUNDS:
            _BOUNDS[key] = partition_balanced(weights, pp)  # loop.py: "type:BlockPipe" or "parameters"
        bounds = _BOUNDS[key]
    out = []
    for s in range(pp):
        mine = layers[bounds[s]:bounds[s + 1]]
        params = tuple(p for _, ps in mine for p in ps)
        out.append(Stage(s, sum(kind == "block" for kind, _ in mine), bounds[s] == 0 and bool(mine),
                         bounds[s + 1] == len(layers) and bool(mine), params, _numel(params)))
    return out


# ----------------------------------------------------------------------------- memory


def model_state_bytes(params: Any, dp: int, s: Settings) -> dict[str, tuple[float, bool]]:
    """Parameters, gradients, master weights and optimizer states on one GPU, as DeepSpeed 0.19 holds them:
    name -> (bytes, built), `built` for the gradients that are created during the backward and freed after the
    optimizer step (the rest is held throughout). Offloaded terms are named `host: ...`.

    BF16_Optimizer (ZeRO-1, bf16, fp32 accumulation): full bf16 gradients (built) and full fp32 gradients
    (held), fp32 master and optimizer partitions. The ZeRO optimizer: ZeRO-1 builds the full gradients and
    reduces them into its fp32 partition at the accumulation boundary (it reduces in buckets during the backward,
    so above `reduce_bucket_size` elements its real peak is lower); ZeRO-2 builds only its partition. ZeRO-3
    partitions everything and keeps parameters of at most `stage3_param_persistence_threshold` elements whole
    besides. ZeRO-0 keeps whole copies. The flat decay and no-decay groups are padded to a multiple of
    2 x dp elements, as DeepSpeed aligns them.
    """
    decay = sum(p.numel for p in params if p.decay)
    n = _numel(params)
    e, g, k = s.element, s.grad_accum, s.optimizer_state_bytes
    padded = sum(-(-x // (2 * dp)) * 2 * dp for x in (decay, n - decay) if x)
    part = padded / dp
    out: dict[str, tuple[float, bool]]
    if s.path == "none":
        out = {"parameters": (e * n, False), "gradients": (g * n, True), "optimizer states": (k * n, False)}
    elif s.path == "bf16_ddp":
        out = {"parameters": (e * n, False), "gradients": (e * n, True), "optimizer states": (k / 2 * n, False)}
    elif s.path == "fp16_optimizer":  # its fp32 gradient copy exists during the step only (a transient)
        out = {"parameters": (e * n, False), "gradients": (e * n, True), "master weights": (4 * n, False),
               "optimizer states": (k * n, False)}
    elif s.path == "bf16_optimizer":
        out = {"parameters": (e * padded, False), "gradients": (e * n, True), "fp32 gradients": (g * padded, False),
               "master weights": (4 * part, False), "optimizer states": (k * part, False)}
    elif s.path == "zero":
        grads = e * n if s.zero_stage == 1 else g * part  # ZeRO-1: the reduced partition replaces them
        out = {"parameters": (e * padded, False), "gradients": (grads, True), "master weights": (4 * part, False),
               "optimizer states": (k * part, False)}
    else:  # zero3
        persistent = sum(p.numel for p in params if p.numel <= s.persistence_threshold)
        out = {"parameters": (e * (n / dp + persistent), False), "gradients": (g * n / dp, False),
               "master weights": (4 * n / dp, False), "optimizer states": (k * n / dp, False)}
    if s.offload_optimizer:
        for key in ("master weights", "optimizer states"):
            if key in out:
                out["host: " + key] = out.pop(key)
    return {key: (float(v), built) for key, (v, built) in out.items()}


def activation_bytes(cfg: Config, layout: Layout, stage: Stage, s: Settings) -> dict[str, float]:
    """What autograd saves for backward in one micro-batch on one GPU of `stage`, by part.

    Counted tensor by tensor as megalite's model saves them (parameters excluded, a storage shared by views
    counted once): each norm keeps its input and fp32 statistics; each linear its input (the norm output, or
    its sequence-gathered copy); attention the qkv output (held by the q/k/v views), RoPE's rotated q and k, the
    output and an fp32 log-sum-exp per head (flash attention: no T x T matrix); the MLP its pre- and
    post-activation (SwiGLU: the fused gate/up output, silu(gate) and the product); the loss an fp32 softmax
    over this rank's vocabulary slice, or with loss chunks only what the chunks are recomputed from.

    With context parallelism (cp ranks) every per-token term is this rank's chunk of B x T / cp tokens. Attention
    keeps what its all-to-alls deliver instead of the qkv output and RoPE's rotated q and k: q, k and v over the
    whole sequence with heads / cp each (kv heads replicated when fewer than cp), the same bytes as the chunk's
    q, k, v, and the projection keeps the output all-to-all's result; the document mask of the torch path stays
    T x T.
    """
    m, d = cfg.model, cfg.data
    e, tp, cp = s.element, layout.tensor, layout.context
    h, T, B = m.hidden_size, d.seq_length, layout.micro_batch
    N = B * T // cp  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    heads, kvh, hd, f_l = m.num_heads // tp, m.kv_heads // tp, m.head_dim, m.ffn_size // tp
    v_l = m.padded_vocab_size // tp
    mask = e if s.platform == "cpu" else 1  # dropout masks: CUDA's fused dropout keeps bytes, the CPU path floats
    norm = Ns * h * e + Ns * 4 * (2 if m.norm == "layernorm" else 1)
    if m.norm == "rmsnorm" and s.attention != "triton" and s.platform == "cpu":
        norm += Ns * h * (8 - e)  # torch's CPU rms_norm keeps the input and the normalised input in fp32
    rope = m.position == "rope"
    rope_tables = 2 * N * hd * e  # cos and sin, (B, 1, T / cp, D)
    pipelined = layout.pipeline > 1
    docs = d.reset_attention_mask

    if cp == 1:
        attn = N * h * e + N * (heads + 2 * kvh) * hd * e  # qkv input, qkv output
        if rope:
            attn += N * (heads + kvh) * hd * e
    else:  # qkv input; the all-to-alls' q, k, v (kv heads replicated to a multiple of cp); the output all-to-all's
        # result, which the projection keeps (without CP its input is a view of the kernel's output)
        attn = N * h * e + N * (2 * heads + 2 * kvh * (kv_replication(kvh, cp) or 1)) * hd * e
    if rope and pipelined:
        attn += rope_tables  # each pipeline block has its tables
    if s.attention == "materialized":  # the T x T softmax per head, with dropout its mask and output; the context
        drop = m.attention_dropout > 0
        attn += B * heads * T * T * (e + (mask + e if drop else 0)) + N * heads * hd * e
    else:
        attn += N * heads * hd * e + N * heads * 4  # output, fp32 log-sum-exp
    if docs:
        # int32 document bounds per token; SDPA gets the boolean mask and keeps it as an additive float mask
        attn += 2 * B * T * 4 if s.attention == "triton" else B * T * T * e  # the whole sequence's, with CP too
    mlp = N * h * e + (4 if m.mlp == "swiglu" else 2) * N * f_l * e
    layer = {"norms": 2 * norm, "attention": attn, "mlp": mlp}
    if m.hidden_dropout > 0:
        layer["dropout masks"] = 2 * Ns * h * mask

    out: dict[str, float] = {}
    if layout.recompute:  # each block keeps only its input; one block's activations are rebuilt at a time
        out["block inputs (recompute)"] = stage.blocks * Ns * h * e + (B * T * 8 if docs and stage.blocks else 0)
    else:
        for key, value in layer.items():
            out[key] = stage.blocks * value
    if rope and not pipelined and stage.blocks:
        out["rope tables"] = rope_tables  # computed once per forward, shared by every block
    if stage.embedding:
        emb = N * 8 + (N if tp > 1 else 0)  # token ids (or this rank's local ids), the out-of-range mask
        if m.position == "learned":
            emb += (N if d.reset_position_ids else T) * 8  # position ids (otherwise an expanded arange)
        out["embedding"] = emb + (Ns * h * mask if m.hidden_dropout > 0 else 0)
    if stage.head:
        head = norm + N * h * e  # the final norm; the output layer's input
        if layout.loss_chunk_tokens:
            head += N * 8 + N * 4  # labels and token weights the chunks are recomputed from
        else:
            head += N * v_l * 4 + N * (1 + 8 + 4)  # fp32 softmax; target mask, ids and weights
            if m.padded_vocab_size > m.vocab_size:
                head += v_l  # the boolean mask of padding rows (on the ranks whose slice has some)
        out["output layer and loss"] = head
    return {key: float(v) for key, v in out.items() if v}


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage, by term, and the peak they add up to.

    Terms come in three kinds: held throughout the step; `built` (gradients created in the backward, freed after
    the optimizer step); `transient: ...` (buffers that live for part of a step: `late` ones at the gradient
    reduction and the optimizer step, the others during a forward or backward). The peak is the larger of two
    moments: the end of a forward (every in-flight micro-batch's activations, plus the logits and loss buffers or
    a recompute working set, plus gradients kept from earlier micro-batches) and the end of the backward at the
    accumulation boundary (the last micro-batch's activations freed, every gradient built, the largest late
    transient allocated).
    """

    stage: int
    terms: dict[str, float]
    built: set[str]
    in_flight: int
    accumulation: int
    activations_per_micro_batch: dict[str, float]
    host: dict[str, float]
    late: frozenset[str] = frozenset()
    bucket_holds_gradients: bool = False

    def _sum(self, keys: Any) -> float:
        return sum(self.terms[k] for k in keys)

    @functools.cached_property
    def allocated(self) -> float:
        """The caching allocator's peak (what torch.cuda.max_memory_allocated would show)."""
        transient = {k for k in self.terms if k.startswith("transient:")}
        bucket = transient & self.late
        held = set(self.terms) - transient - self.built
        one_micro = sum(self.activations_per_micro_batch.values())
        forward_end = (self._sum(held) + (self._sum(self.built) if self.accumulation > 1 else 0.0)
                       + max([self.terms[k] for k in transient - bucket] or [0.0]))
        buckets = max([self.terms[k] for k in bucket] or [0.0])
        built = self._sum(self.built)
        # ZeRO-2 copies gradients into its bucket and frees them, then reduces the bucket into the partition it
        # builds: bucket and partition do not coexist. Everything else holds its gradients while reducing.
        grads_and_bucket = max(built, buckets) if self.bucket_holds_gradients else built + buckets
        backward_end = self._sum(held) - one_micro + grads_and_bucket
        return max(forward_end, backward_end)

    def total(self, allowance_gib: float = ALLOWANCE_GIB) -> float:
        """The allocated peak plus fragmentation and the fixed allowance: what the device must have."""
        return self.allocated * (1 + FRAGMENTATION) + allowance_gib * GiB

    def biggest(self) -> tuple[str, float]:
        return max(self.terms.items(), key=lambda kv: kv[1])


def memory(cfg: Config, layout: Layout, s: Settings) -> list[StageMemory]:
    """Per-GPU memory of every pipeline stage."""
    m = cfg.model
    tp, pp, dp = layout.tensor, layout.pipeline, layout.replicas  # ZeRO partitions over data x context
    e = s.element
    N = layout.micro_batch * cfg.data.seq_length // layout.context  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    v_l = m.padded_vocab_size // tp
    per_layer = None
    out = []
    by_kind: dict[tuple, tuple] = {}
    for st in stages(cfg, tp, pp):
        if st.kind not in by_kind:
            decay = sum(p.numel for p in st.params if p.decay)
            persistent = sum(p.numel for p in st.params if p.numel <= s.persistence_threshold)
            by_kind[st.kind] = (model_state_bytes(st.params, dp, s), activation_bytes(cfg, layout, st, s),
                                st.numel, decay, persistent)
        states, per_micro, n_local, decay, persistent = by_kind[st.kind]
        terms = {k: v for k, (v, _) in states.items() if not k.startswith("host: ")}
        host = {k[6:]: v for k, (v, _) in states.items() if k.startswith("host: ")}
        built = {k for k, (_, b) in states.items() if b}
        in_flight = min(pp - st.index, layout.accumulation) if pp > 1 else 1  # DeepSpeed's TrainSchedule
        terms["activations"] = in_flight * sum(per_micro.values())
        if pp > 1:
            # engine.pipe_buffers, one set per in-flight micro-batch (at least two): the int64 ids that travel with
            # the hidden states (the first stage also holds the token ids); the stage's output, which autograd does
            # not keep (the last stage's output is its logits, or with loss chunks the hidden states the loss keeps);
            # the last stage's labels and token weights. Plus one gradient receive buffer (_grad_layer_buf).
            whole = N * layout.context  # token ids, labels and document ids are the whole sequence's on each rank
            ids = N * 8 + (whole * 8 if cfg.data.reset_attention_mask else 0) + (whole * 8 if st.embedding else 0)
            if not st.head:
                output = Ns * m.hidden_size * e
            else:
                output = 0 if layout.loss_chunk_tokens else N * v_l * e
            labels = whole * 12 if st.head else 0
            terms["pipeline buffers"] = float(max(2, in_flight) * (ids + output + labels)
                                              + Ns * m.hidden_size * e + N * 8)
        if st.head:
            if layout.loss_chunk_tokens:  # one chunk's logits, their fp32 copy and softmax
                terms["transient: logits and loss"] = float(min(layout.loss_chunk_tokens, N) * v_l * (e + 8))
            else:  # the logits and their fp32 copy in the forward; the fp32 gradient and its cast in the backward
                terms["transient: logits and loss"] = float(N * v_l * (4 + (e if e != 4 else 0)))
        if layout.recompute and st.blocks:
            if per_layer is None:
                one = dataclasses.replace(layout, recompute=False)
                per_layer = sum(activation_bytes(cfg, one, Stage(0, 1, False, False, ()), s).values())
            terms["transient: recompute working set"] = float(per_layer)
        if s.path in ("none", "bf16_optimizer", "fp16_optimizer", "bf16_ddp"):
            # engine.buffered_allreduce_fallback flattens up to 5e8 gradient elements into one buffer, and casts it
            # to the communication dtype, to all-reduce it
            bucket = min(n_local, 500_000_000)
            terms["transient: gradient all-reduce bucket"] = float(bucket * (s.grad_accum + (e if e != s.grad_accum
                                                                                             else 0)))
        elif s.path == "zero":
            # contiguous_gradients: reduce_bucket_size elements (two with overlap_comm), whatever the model's size;
            # ZeRO-2's gradients are in it until they are reduced into the partition
            terms["transient: gradient reduce bucket"] = float(s.reduce_bucket * e * (2 if s.overlap_comm else 1))
        else:  # zero3: the reduce bucket is allocated whole at start; layers are gathered one or two at a time
            terms["ZeRO-3 reduce bucket"] = float(s.reduce_bucket * e)
            # gathered parameters stay live up to stage3_max_live_parameters elements, plus the prefetch bucket
            gathered = min(n_local - persistent, s.max_live_parameters) + min(s.prefetch_bucket, n_local - persistent)
            terms["transient: ZeRO-3 gathered parameters"] = float(gathered * e)
        if s.path == "fp16_optimizer":  # FP16_Optimizer flattens the gradients into fp32 for the step
            terms["transient: fp32 gradients at the step"] = float(4 * n_local)
        elif s.path == "zero3":  # ZeRO-3 flattens a parameter group's gradient partition into fp32 for the step
            terms["transient: fp32 gradients at the step"] = float(4 * max(decay, n_local - decay) / dp)
        late = frozenset(k for k in terms if k.startswith("transient:") and ("bucket" in k or "at the step" in k))
        out.append(StageMemory(st.index, terms, built, in_flight, layout.accumulation, per_micro, host, late,
                               s.path == "zero" and s.zero_stage == 2))
    return out


# ----------------------------------------------------------------------------- communication


def _ring(kind: str, n: int) -> float:
    """Bytes each rank moves per byte of payload in NCCL's ring algorithms."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if kind == "all-reduce" else (n - 1) / n if kind in ("all-gather", "reduce-scatter",
                                                                                 "all-to-all") else 1.0


@dataclass
class Collective:
    """The payload one GPU hands to one kind of collective in one step, and where it goes."""

    group: str  # TP | CP | DP (data x context: the ZeRO group) | PP | tied embedding
    kind: str  # all-reduce | all-gather | reduce-scatter | send/recv
    bytes: float  # sum of the tensors handed to the calls (all-gather: output size; reduce-scatter: input size)
    ranks: int
    link: str  # NVLink | network


def links(layout: Layout, gpus_per_node: int) -> dict[str, str]:
    """Which link each group's traffic crosses, from DeepSpeed's placement (model, then data, then pipe axis; context
    ranks inside the data axis, next to the tensor-parallel ones)."""
    tp, dp, cp = layout.tensor, layout.data, layout.context
    g = gpus_per_node
    return {"TP": "NVLink" if tp <= g else "network", "CP": "NVLink" if tp * cp <= g else "network",
            "DP": "NVLink" if tp * cp * dp <= g else "network",
            "PP": "NVLink" if layout.world <= g else "network",
            "tied embedding": "NVLink" if layout.world <= g else "network"}


def communication(cfg: Config, layout: Layout, stage: Stage, s: Settings, gpus_per_node: int) -> list[Collective]:
    """Payload per step for one GPU of `stage`, per group and collective kind, as megalite and DeepSpeed call them."""
    m = cfg.model
    tp, pp, dp, cp = layout.tensor, layout.pipeline, layout.replicas, layout.context
    e, h = s.element, m.hidden_size
    N = layout.micro_batch * cfg.data.seq_length // cp  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    mb = layout.accumulation
    where = links(layout, gpus_per_node)
    sp = layout.sequence_parallel
    out: dict[tuple[str, str], float] = {}

    def add(group: str, kind: str, nbytes: float) -> None:
        out[(group, kind)] = out.get((group, kind), 0.0) + nbytes

    act = N * h * e
    if tp > 1:
        fwd_passes = 2 if layout.recompute else 1
        L = stage.blocks
        if sp:  # column entry: all-gather (backward reduce-scatter); row exit: reduce-scatter (backward all-gather)
            add("TP", "all-gather", mb * L * act * (2 * fwd_passes + 2))
            add("TP", "reduce-scatter", mb * L * act * (2 * fwd_passes + 2))
            norm_params = h * (2 if m.norm == "layernorm" else 1)
            synced = 2 * norm_params + (2 * h if m.bias else 0)  # replicated weights with per-rank gradients
            add("TP", "all-reduce", mb * L * synced * e)
        else:  # row exit: all-reduce forward; column entry: all-reduce of the input gradient backward
            add("TP", "all-reduce", mb * L * act * (2 * fwd_passes + 2))
        if stage.embedding:
            add("TP", "reduce-scatter" if sp else "all-reduce", mb * act)
            if sp:
                add("TP", "all-gather", mb * act)  # its backward
                if m.position == "learned":
                    add("TP", "all-reduce", mb * m.max_position_embeddings * h * e)
        if stage.head:
            if sp:
                add("TP", "all-gather", mb * act)
                add("TP", "reduce-scatter", mb * act)
                add("TP", "all-reduce", mb * h * (2 if m.norm == "layernorm" else 1) * e)
            else:
                add("TP", "all-reduce", mb * act)
            ce = N * 4 * 3  # fp32 max, then (target logit, sum of exponentials) together
            add("TP", "all-reduce", mb * ce * (2 if layout.loss_chunk_tokens else 1))  # chunks recompute theirs

    if cp > 1 and stage.blocks:
        # Ulysses: per block, q, k, v (kv heads replicated to a multiple of cp) and the output all-to-all forward (and
        # again in a recompute), their gradients backward. The loss adds two scalar all-reduces per micro-batch.
        heads, kvh = m.num_heads // tp, m.kv_heads // tp
        per_pass = N * (2 * heads + 2 * kvh * (kv_replication(kvh, cp) or 1)) * m.head_dim * e
        add("CP", "all-to-all", mb * stage.blocks * per_pass * ((2 if layout.recompute else 1) + 1))
    n_local = _numel(stage.params)
    if dp > 1:
        decay = sum(p.numel for p in stage.params if p.decay)
        padded = sum(-(-x // (2 * dp)) * 2 * dp for x in (decay, n_local - decay) if x)
        # Gradients travel in DeepSpeed's communication dtype, the model's dtype by default. ZeRO-1/2 all-reduce
        # their gradient buckets (use_multi_rank_bucket_allreduce, on by default) and then all-gather the updated
        # partitions, as BF16_Optimizer does; ZeRO-0 only all-reduces.
        if s.path in ("none", "fp16_optimizer", "bf16_ddp"):
            add("DP", "all-reduce", n_local * e)
        elif s.path in ("bf16_optimizer", "zero"):
            add("DP", "all-reduce", n_local * e)
            add("DP", "all-gather", padded * e)
        else:  # zero3: gradients reduce-scattered every micro-batch; small persistent parameters gathered once, after
            # the step; the rest once per micro-batch when the stage's parameters fit within
            # stage3_max_reuse_distance (kept from forward to backward), otherwise twice: for the forward, and for
            # the backward (a recomputed layer's backward follows its recompute at once and reuses that gather)
            persistent = sum(p.numel for p in stage.params if p.numel <= s.persistence_threshold)
            gathers = 1 if n_local - persistent <= s.max_reuse_distance else 2
            add("DP", "all-gather", (mb * gathers * (n_local - persistent) + persistent) * e)
            add("DP", "reduce-scatter", mb * n_local * e)
    if pp > 1:
        boundary = Ns * h * e
        sends = (0 if stage.index == pp - 1 else 1) + (0 if stage.index == 0 else 1)
        # position ids (this rank's chunk) and document ids (the whole sequence's) travel along
        ids = N * 8 + (N * cp * 8 if cfg.data.reset_attention_mask else 0)
        add("PP", "send/recv", mb * sends * (2 * boundary + ids))
        if m.tied_embeddings and (stage.embedding or stage.head):
            grad = s.grad_accum if s.path == "bf16_optimizer" else e  # BF16_Optimizer reduces its fp32 copy
            add("tied embedding", "all-reduce", m.padded_vocab_size // tp * h * grad)
    result = []
    for (group, kind), nbytes in out.items():
        ranks = {"TP": tp, "CP": cp, "DP": dp, "PP": 2, "tied embedding": 2}[group]
        result.append(Collective(group, kind, nbytes, ranks, where[group]))
    return result


def transfer_seconds(c: Collective, device: Device) -> float:
    bandwidth = (device.intra_node_gbps if c.link == "NVLink" else device.inter_node_gbps) * 1e9
    return c.bytes * _ring(c.kind, c.ranks) / bandwidth


# ----------------------------------------------------------------------------- time


def _attention_fraction(seq: int, head_dim: int) -> float:
    table = EFFICIENCY["attention"][min(EFFICIENCY["attention"], key=lambda d: abs(d - head_dim))]
    keys = sorted(table)
    if seq <= keys[0]:
        value = table[keys[0]] * seq / keys[0]  # shorter sequences run proportionally slower (fewer blocks)
    elif seq >= keys[-1]:
        value = table[keys[-1]]
    else:
        lo = max(k for k in keys if k <= seq)
        hi = min(k for k in keys if k >= seq)
        w = 0.0 if hi == lo else math.log(seq / lo) / math.log(hi / lo)
        value = table[lo] * (1 - w) + table[hi] * w
    return value / EFFICIENCY["attention_peak"]


@dataclass
class StageTime:
    """Seconds for one micro-batch on one stage, by part, and the FLOPs it executes."""

    matmul: float
    attention: float
    memory_bound: float
    tp_comm: float
    pp_comm: float
    flops: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.memory_bound + self.tp_comm + self.pp_comm


def stage_time(cfg: Config, layout: Layout, stage: Stage, s: Settings, device: Device,
               comms: list[Collective]) -> StageTime:
    """One micro-batch's forward and backward on one GPU of `stage`."""
    m = cfg.model
    e, tp, cp = s.element, layout.tensor, layout.context
    h, T, B = m.hidden_size, cfg.data.seq_length, layout.micro_batch
    N = B * T // cp  # this rank's tokens
    Ns = N // tp if layout.sequence_parallel else N
    heads, kvh, hd = m.num_heads // tp, m.kv_heads // tp, m.head_dim
    f_l, v_l = m.ffn_size // tp, m.padded_vocab_size // tp
    att_heads = heads // cp  # attention runs over the whole sequence with heads / cp per rank
    L = stage.blocks
    fwd = 2 if layout.recompute else 1  # forward passes over each block
    peak = device.peak(s.precision)
    matrices = sum(p.numel for p in layer_params(m, tp)["block"] if p.decay)
    flops = 2 * N * matrices * (2 + fwd) * L
    if stage.head:
        flops += 2 * N * v_l * h * (3 + (1 if layout.loss_chunk_tokens else 0))
    matmul = flops / (EFFICIENCY["matmul"] * peak)

    attention = 0.0
    scores = 0.0  # bytes of score-matrix traffic (materialized attention only)
    if s.attention == "materialized":  # QK^T and AV as matmuls over the whole T x T, softmax in memory
        att_flops = 4 * B * T * T * att_heads * hd * (2 + fwd) * L
        matmul += att_flops / (EFFICIENCY["matmul"] * peak)
        drop = m.attention_dropout > 0
        per_score = fwd * (4 * e + (2 * e + 1 if drop else 0)) + 7 * e + (2 * e + 1 if drop else 0)
        scores = B * att_heads * T * T * per_score * L
        flops += att_flops
    elif L:
        att_flops = 2 * B * T * T * att_heads * hd * (2.5 + fwd) * L  # causal: half the 4*B*H*T^2*D of full attention
        attention = att_flops / (_attention_fraction(T, hd) * peak)
        flops += att_flops

    # Memory-bound kernels: bytes read and written, per block and micro-batch.
    norm_fwd = 2 * 2 * Ns * h * e * fwd
    norm_bwd = 2 * 3 * Ns * h * e
    act = (2 if m.mlp == "gelu" else 5) * N * f_l * e * fwd + (3 if m.mlp == "gelu" else 8) * N * f_l * e
    residual = 2 * 3 * Ns * h * e * (fwd + 1)
    rope = 8 * N * (heads + kvh) * hd * e * (fwd + 1) if m.position == "rope" else 0
    bias = ((heads + 2 * kvh) * hd + h + f_l * (2 if m.mlp == "swiglu" else 1) + h) * N * e if m.bias else 0
    copy = 2 * N * heads * hd * e * (fwd + 1) if s.attention == "materialized" else 0
    dropout = 2 * (2 * Ns * h * e + Ns * h) * (fwd + 1) if m.hidden_dropout > 0 else 0
    pointwise = (act + residual + rope + bias + copy + dropout) * L + scores
    tp_bytes = sum(c.bytes for c in comms if c.group in ("TP", "CP")) / layout.accumulation
    pointwise += 2 * tp_bytes  # megalite's collectives copy their input (clone, chunk, cat; the all-to-all's permutes)
    if stage.embedding:
        pointwise += 4 * Ns * h * e
    if stage.head:
        per_logit = 32 + e + 20 + e + (32 + e if layout.loss_chunk_tokens else 0) + (8 if m.z_loss > 0 else 0)
        pointwise += N * v_l * per_logit + (2 * 2 + 3) * Ns * h * e
    hbm = device.hbm_tbps * 1e12
    memory_bound = (norm_fwd * L / (EFFICIENCY["norm_forward"] * hbm) + norm_bwd * L / (EFFICIENCY["norm_backward"] * hbm)
                    + pointwise / (EFFICIENCY["copy"] * hbm))
    # Context-parallel all-to-alls sit on the critical path like TP's collectives: charged with them.
    tp_comm = sum(transfer_seconds(c, device) for c in comms if c.group in ("TP", "CP")) / layout.accumulation
    pp_comm = sum(transfer_seconds(c, device) for c in comms if c.group == "PP") / layout.accumulation
    return StageTime(matmul, attention, memory_bound, tp_comm, pp_comm, flops)


def optimizer_seconds(stage: Stage, layout: Layout, s: Settings, device: Device) -> float:
    """The optimizer step and its gradient bookkeeping: memory-bound passes over the states this GPU owns."""
    n = _numel(stage.params)
    owned = n if s.path in ("none", "bf16_ddp", "fp16_optimizer") else n / layout.replicas
    per_owned = 28 + (6 if s.element != 4 else 0)  # Adam: read/write master and moments, read gradient; copy back
    if s.optimizer_state_bytes == 4:
        per_owned = 20
    traffic = owned * per_owned
    if s.path == "bf16_optimizer":  # bf16 gradients added into fp32 every micro-batch; norm and clip over all
        traffic += n * (10 * layout.accumulation + 12)
    else:
        traffic += owned * 12
    return traffic / (EFFICIENCY["copy"] * device.hbm_tbps * 1e12)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Everything `megalite plan` reports for one layout."""

    cfg: Config
    layout: Layout
    settings: Settings
    device: Device
    gpus_per_node: int
    memory: list[StageMemory]
    comms: list[list[Collective]]  # per stage
    times: list[StageTime]  # per stage, one micro-batch
    optimizer_s: float
    dp_exposed_s: float
    step_s: float
    bubble: float
    tokens_per_step: int
    model_flops_per_token: float
    allowance_gib: float = ALLOWANCE_GIB

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
        return max(sm.total(self.allowance_gib) for sm in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.device.memory_gib * GiB

    def worst_stage(self) -> StageMemory:
        return max(self.memory, key=lambda sm: sm.total(self.allowance_gib))

    def to_dict(self) -> dict:
        """A JSON-serialisable summary."""
        return {
            "layout": dataclasses.asdict(self.layout), "device": self.device.name, "precision": self.settings.precision,
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
        }


def plan(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8, *,
         attention: Optional[str] = None, allowance_gib: float = ALLOWANCE_GIB) -> Plan:
    """The cost model for `cfg` on `world_size` GPUs of `device`, `gpus_per_node` to a node.

    `attention` overrides the attention implementation ('materialized' models systems that store the T x T
    scores, such as Megatron-LM in 2021); by default it follows train.kernels.
    """
    problems = []
    if gpus_per_node <= 0:
        problems.append(f"--gpus-per-node: must be > 0, got {gpus_per_node}")
    elif world_size > gpus_per_node and world_size % gpus_per_node:
        problems.append(f"--world-size: {world_size} is not a multiple of --gpus-per-node {gpus_per_node} "
                        "(whole nodes)")
    if problems:
        raise ConfigError(problems)
    layout = layout_of(cfg, world_size)
    s = settings(cfg, attention)
    return _evaluate(cfg, layout, s, device, gpus_per_node, allowance_gib)


def _evaluate(cfg: Config, layout: Layout, s: Settings, device: Device, gpus_per_node: int,
              allowance_gib: float) -> Plan:
    if s.precision not in device.peak_tflops:
        raise ConfigError(f"precision {s.precision!r} has no peak for {device.name}")
    mem = memory(cfg, layout, s)
    sts = stages(cfg, layout.tensor, layout.pipeline)
    by_kind: dict[tuple, tuple[list[Collective], StageTime, float]] = {}
    for st in sts:
        if st.kind not in by_kind:
            cs = communication(cfg, layout, st, s, gpus_per_node)
            by_kind[st.kind] = (cs, stage_time(cfg, layout, st, s, device, cs),
                                optimizer_seconds(st, layout, s, device))
    comms = [by_kind[st.kind][0] for st in sts]
    times = [by_kind[st.kind][1] for st in sts]
    m, p = layout.accumulation, layout.pipeline
    slowest = max(t.total for t in times)
    bubble = (p - 1) / (m + p - 1)
    pipeline_s = (m + p - 1) * slowest
    optimizer_s = max(value[2] for value in by_kind.values())
    # Data-parallel traffic. ZeRO-1/2 with overlap_comm reduce their gradient buckets during the backward (all but
    # the last bucket's worth hides behind it). ZeRO-3's per-layer gathers and reduce-scatters are charged in full:
    # the first version of this model let its prefetch hide them and over-predicted the ZeRO-3 rows of Narayanan
    # et al. (2021), Table 2, by 40-55% (docs/plan.md says so). Everything else waits for the backward to finish.
    dp_exposed = 0.0
    for cs, t in zip(comms, times):
        exposed = 0.0
        for c in cs:
            seconds = transfer_seconds(c, device)
            if c.group == "DP" and c.kind == "all-reduce" and s.path == "zero" and s.overlap_comm:
                last_bucket = min(1.0, s.reduce_bucket * s.element / max(c.bytes, 1.0))
                seconds = max(seconds * last_bucket, seconds - 2 / 3 * m * (t.matmul + t.attention + t.memory_bound))
            if c.group in ("DP", "tied embedding"):
                exposed += seconds
        dp_exposed = max(dp_exposed, exposed)
    step = pipeline_s + optimizer_s + dp_exposed
    tokens = cfg.micro_batch_size * m * layout.data * cfg.data.seq_length
    return Plan(cfg, layout, s, device, gpus_per_node, mem, comms, times, optimizer_s, dp_exposed, step, bubble,
                tokens, flops_per_token(cfg), allowance_gib)


# ----------------------------------------------------------------------------- search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Config, world_size: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of `world_size` GPUs with the config's global batch: TP (within a node, dividing heads, KV
    heads, FFN and vocabulary), sequence parallelism, PP, ZeRO stage (as DeepSpeed allows it), micro-batch and
    accumulation, recompute on/off, chunked loss on/off."""
    m = cfg.model
    base = layout_of(cfg, world_size)
    global_batch = base.micro_batch * base.accumulation * base.data
    cp = base.context  # the search keeps the config's context-parallel degree
    chunk = m.loss_chunk_tokens or 4096
    precision = cfg.precision
    accum = settings(cfg).grad_accum
    out = []
    for tp in _divisors(min(world_size // cp, gpus_per_node)):
        if any(x % tp for x in (m.num_heads, m.kv_heads, m.ffn_size, m.padded_vocab_size)):
            continue
        if context_errors(m, tp, cp, cfg.data.seq_length):
            continue
        for pp in _divisors(world_size // (tp * cp)):
            if pp > m.num_layers:
                continue
            dp = world_size // (tp * pp * cp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            if pp > 1:
                zeros = [1]  # DeepSpeed refuses ZeRO-2/3 with a pipeline; megalite refuses ZeRO-0
            else:
                zeros = [z for z in (0, 1, 2, 3) if z or (4 if precision == "fp32" else 2) == accum]
            for micro in _divisors(per_replica):
                if (cfg.data.seq_length // cp) % tp:
                    continue
                for zero, rec, chunked in itertools.product(zeros, (False, True), (False, True)):
                    for sp in ((False, True) if tp > 1 else (False,)):
                        out.append(Layout(tp, pp, dp, zero, micro, per_replica // micro, sp, rec,
                                          chunk if chunked else 0, cp))
    return out


def search(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8,
           allowance_gib: float = ALLOWANCE_GIB) -> list[Plan]:
    """Every candidate layout, planned, ranked: layouts that fit first, by predicted tokens/s."""
    plans = []
    for layout in candidate_layouts(cfg, world_size, gpus_per_node):
        new = with_layout(cfg, layout)
        try:
            s = settings(new)
        except ConfigError:
            continue
        plans.append(_evaluate(new, layout, s, device, gpus_per_node, allowance_gib))
    # Throughput to 4 significant digits, then the least memory: of layouts the model cannot tell apart in speed
    # (micro-batch sizes, which it does not charge for), the one with the most headroom first.
    plans.sort(key=lambda p: (not p.fits, -float(f"{p.tokens_per_s:.4g}"), p.peak_memory))
    return plans


# ----------------------------------------------------------------------------- reports


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _bytes(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _shown_stages(p: Plan) -> list[int]:
    worst = p.worst_stage().stage
    picks = sorted({0, len(p.memory) - 1, worst})
    return picks


def format_plan(p: Plan, source: str = "") -> str:
    """The human-readable report of one plan."""
    lay, s, dev = p.layout, p.settings, p.device
    world = lay.world
    nodes = max(1, world // p.gpus_per_node)
    lines = [f"megalite plan{': ' + source if source else ''}",
             f"cluster: {world} x {dev.name} ({nodes} node{'s' if nodes > 1 else ''} of "
             f"{min(world, p.gpus_per_node)}), {dev.memory_gib:.1f} GiB each",
             f"layout:  {lay.describe()}",
             f"         global batch {lay.micro_batch * lay.accumulation * lay.data} x {p.cfg.data.seq_length} tokens; "
             f"{s.precision}, {s.optimizer}; DeepSpeed holds model states in {PATH_NAMES[s.path]}"]
    shown = _shown_stages(p)
    header = "".join(f"{'stage ' + str(i):>10}" for i in shown)
    lines += ["", f"memory per GPU (GiB)                      {header}"]
    keys: list[str] = []
    for i in shown:
        for k in p.memory[i].terms:
            if k not in keys:
                keys.append(k)
    for k in keys:
        row = "".join(f"  {_gib(p.memory[i].terms.get(k, 0.0))}" for i in shown)
        label = k if k != "activations" else "activations (all in flight)"
        lines.append(f"  {label:<40}{row}")
    lines.append(f"  {'micro-batches in flight':<40}" + "".join(f"  {p.memory[i].in_flight:8d}" for i in shown))
    lines.append(f"  {'allocated peak':<40}" + "".join(f"  {_gib(p.memory[i].allocated)}" for i in shown))
    lines.append(f"  {'+ allowance ' + str(p.allowance_gib) + ' GiB + ' + str(int(FRAGMENTATION * 100)) + '%':<40}"
                 + "".join(f"  {_gib(p.memory[i].total(p.allowance_gib) - p.memory[i].allocated)}" for i in shown))
    lines.append(f"  {'total':<40}" + "".join(f"  {_gib(p.memory[i].total(p.allowance_gib))}" for i in shown))
    lines.append(f"  {'headroom on ' + f'{dev.memory_gib:.1f} GiB':<40}"
                 + "".join(f"  {_gib(dev.memory_gib * GiB - p.memory[i].total(p.allowance_gib))}" for i in shown))
    host = p.memory[0].host
    if host:
        lines.append("  offloaded to host memory: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in host.items()))
    worst = p.worst_stage()
    detail = ", ".join(f"{k} {v / GiB:.2f}" if v >= 0.005 * GiB else f"{k} <0.01"
                       for k, v in worst.activations_per_micro_batch.items())
    lines.append(f"  activations of one micro-batch on stage {worst.stage} (GiB): {detail}")
    if not p.fits:
        name, value = worst.biggest()
        lines.append(f"  DOES NOT FIT: stage {worst.stage} needs {worst.total(p.allowance_gib) / GiB:.1f} GiB of "
                     f"{dev.memory_gib:.1f}; the biggest term is {name} ({value / GiB:.1f} GiB)")

    lines += ["", "communication per step, per GPU (stage with the most traffic)",
              f"  {'group':<16}{'collective':<16}{'payload':>12}{'ranks':>7}  {'link':<8}{'time':>10}"]
    busiest = max(range(len(p.comms)), key=lambda i: sum(transfer_seconds(c, dev) for c in p.comms[i]))
    for c in sorted(p.comms[busiest], key=lambda c: -c.bytes):
        lines.append(f"  {c.group:<16}{c.kind:<16}{_bytes(c.bytes):>12}{c.ranks:>7}  {c.link:<8}"
                     f"{transfer_seconds(c, dev) * 1e3:>8.1f} ms")
    if not p.comms[busiest]:
        lines.append("  (none: a single GPU)")
    lines.append("  TP and PP transfers are on the critical path; DP traffic waits for the backward, except ZeRO-1/2's "
                 "gradient buckets with overlap_comm")

    t = max(p.times, key=lambda t: t.total)
    m = lay.accumulation
    lines += ["", "time per step (slowest stage, per micro-batch x (m + p - 1), plus optimizer and DP)",
              f"  matmul {t.matmul * 1e3:.1f} ms, attention {t.attention * 1e3:.1f} ms, memory-bound "
              f"{t.memory_bound * 1e3:.1f} ms, {'TP+CP' if lay.context > 1 else 'TP'} {t.tp_comm * 1e3:.1f} ms, "
              f"PP {t.pp_comm * 1e3:.1f} ms "
              f"= {t.total * 1e3:.1f} ms per micro-batch",
              f"  pipeline bubble (p - 1)/(m + p - 1) = {lay.pipeline - 1}/{m + lay.pipeline - 1} = {p.bubble:.1%}; "
              f"optimizer {p.optimizer_s * 1e3:.1f} ms; exposed DP {p.dp_exposed_s * 1e3:.1f} ms",
              f"  step {p.step_s:.3f} s: {p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / world:,.0f} per GPU), "
              f"{p.model_tflops_per_gpu:.0f} model TFLOP/s per GPU, MFU {p.mfu:.1%} of {dev.peak_tflops[s.precision]:.0f}",
              "  (model FLOPs as the training log counts them: 6N + 12*L*d*T per token; the time model charges "
              "the output layer, recompute and attention as executed)",
              "", f"constants of {dev.name}:"] + [f"  {k}: {v}" for k, v in dev.sources] + [
              f"efficiencies ({EFFICIENCY_SOURCE}): matmul {EFFICIENCY['matmul']:.3f} of peak, copy "
              f"{EFFICIENCY['copy']:.3f} of HBM bandwidth, norms {EFFICIENCY['norm_forward']:.2f} forward and "
              f"{EFFICIENCY['norm_backward']:.2f} backward, flash attention {_attention_fraction(p.cfg.data.seq_length, p.cfg.model.head_dim):.3f}"
              f" at {p.cfg.data.seq_length} tokens"]
    return "\n".join(lines)


def format_search(plans: list[Plan], limit: int = 10) -> str:
    """The best `limit` layouts as a table."""
    fitting = [p for p in plans if p.fits]
    cp = plans[0].layout.context if plans else 1
    lines = [f"{len(plans)} layouts planned, {len(fitting)} fit in memory; the best {min(limit, len(fitting))} by "
             "predicted throughput" + (f" (all at the config's context parallelism {cp})" if cp > 1 else "") + ":",
             "| rank | TP | SP | PP | DP | ZeRO | micro x acc | recompute | loss chunks | memory GiB | step s | "
             "tokens/s/GPU | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rank, p in enumerate(fitting[:limit], 1):
        lay = p.layout
        lines.append(f"| {rank} | {lay.tensor} | {'yes' if lay.sequence_parallel else 'no'} | {lay.pipeline} | "
                     f"{lay.data} | {lay.zero_stage} | {lay.micro_batch} x {lay.accumulation} | "
                     f"{'yes' if lay.recompute else 'no'} | {lay.loss_chunk_tokens or 'no'} | {p.peak_memory / GiB:.1f} | "
                     f"{p.step_s:.3f} | {p.tokens_per_s / lay.world:,.0f} | {p.mfu:.1%} |")
    if not fitting:
        lines.append("| - | no layout fits in memory | | | | | | | | | | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- other commands' summaries


def _memory_plan(cfg: Config, world_size: int, device: Device, gpus_per_node: int) -> Plan:
    return plan(cfg, world_size, device, min(gpus_per_node, world_size) if world_size <= gpus_per_node
                else gpus_per_node)


MODEL_STATE_TERMS = ("parameters", "gradients", "fp32 gradients", "master weights", "optimizer states")


def model_states_overflow(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8) -> Optional[str]:
    """A message when the model states alone (weights, gradients, master weights, optimizer states: known exactly,
    unlike activations) of the fullest stage exceed `device`'s memory: a certain out-of-memory, often a typo in the
    model's size. None when they fit."""
    p = _memory_plan(cfg, world_size, device, gpus_per_node)
    worst = max(p.memory, key=lambda sm: sum(sm.terms.get(k, 0.0) for k in MODEL_STATE_TERMS))
    states = sum(worst.terms.get(k, 0.0) for k in MODEL_STATE_TERMS)
    if states <= device.memory_gib * GiB:
        return None
    params = count_parameters(cfg.model)["total"]
    return (f"the model states alone need {states / GiB:.1f} GiB per GPU ({params / 1e9:.3g}B parameters at "
            f"{p.layout.describe()}) but {device.name} has {device.memory_gib:.1f} GiB: check the model's size "
            "(model.hidden_size, num_layers, vocab_size) or shard it further (`megalite plan --search`)")


def memory_summary(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8) -> str:
    """One line for preflight, `train` start-up and `config show`: the plan's memory per GPU on `device`."""
    p = _memory_plan(cfg, world_size, device, gpus_per_node)
    worst = p.worst_stage()
    name, value = worst.biggest()
    where = f" (stage {worst.stage} of {len(p.memory)})" if len(p.memory) > 1 else ""
    return (f"plan: {worst.total(p.allowance_gib) / GiB:.1f} GiB per GPU{where} of {device.memory_gib:.1f} GiB on "
            f"{device.name}; biggest term {name} {value / GiB:.1f} GiB")


def memory_warning(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8) -> Optional[str]:
    """A warning naming the biggest term when the plan's memory per GPU exceeds `device`'s; None when it fits."""
    p = _memory_plan(cfg, world_size, device, gpus_per_node)
    if p.fits:
        return None
    worst = p.worst_stage()
    name, value = worst.biggest()
    return (f"the plan needs {worst.total(p.allowance_gib) / GiB:.1f} GiB per GPU on stage {worst.stage} but "
            f"{device.name} has {device.memory_gib:.1f} GiB; the biggest term is {name} ({value / GiB:.1f} GiB): "
            "see `megalite plan` for the breakdown and `megalite plan --search` for layouts that fit")


def startup_report(cfg: Config, world_size: int, gpus_per_node: Optional[int] = None) -> list[str]:
    """What `megalite train` prints at start: the memory summary for this machine's GPU and any warning
    (nothing without a GPU megalite's device table knows, or when the plan cannot model the config)."""
    device = local_device()
    if device is None:
        return []
    per_node = gpus_per_node or world_size
    try:
        warning = memory_warning(cfg, world_size, device, per_node)
        return [memory_summary(cfg, world_size, device, per_node)] + ([f"warning: {warning}"] if warning else [])
    except Exception as e:  # noqa: BLE001 - an estimate never stops a run; it says why it is missing
        return [f"plan: not available for this config ({e})"]


def memory_breakdown(cfg: Config, world_size: int, device: Optional[Device] = None, gpus_per_node: int = 8) -> dict:
    """The plan's memory terms of the fullest stage in GiB, for `config show` (this machine's GPU, else H100 SXM)."""
    device = device or local_device() or DEVICES["h100-sxm"]
    try:
        p = _memory_plan(cfg, world_size, device, gpus_per_node)
    except ConfigError as e:
        return {"error": str(e)}
    worst = p.worst_stage()
    return {"device": device.name, "stage": worst.stage, "total_gib": round(worst.total(p.allowance_gib) / GiB, 3),
            "allocated_gib": round(worst.allocated / GiB, 3), "fits": p.fits,
            "terms_gib": {k: round(v / GiB, 3) for k, v in worst.terms.items()}}


# ----------------------------------------------------------------------------- CLI
