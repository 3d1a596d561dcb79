"""The accelerators the plan knows: each one's datasheet constants with their sources, the dense peaks the training
log's MFU divides by, and the achievable fractions of those figures megalite measured.

A new device is one `DEVICES` entry (and its peaks in `PEAK_TFLOPS`); a new dtype's peak (FP8) one column of
`PEAK_TFLOPS`; a device's own efficiency one entry of `DEVICE_EFFICIENCY` with its source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megalite.errors import ConfigError

GiB = 2**30

# Dense peak TFLOP/s per device for the training dtype (vendor datasheets, without sparsity), matched in this
# order against the device name without spaces: the H100 PCIe ("NVIDIA H100 PCIe") and NVL cards have lower
# peaks than the SXM module ("NVIDIA H100 80GB HBM3"), so they come before the plain "H100". The training log's
# MFU (engine.metrics) and the plan's devices both read this one table.
# "fp8": the dense e4m3 peak where the device has FP8 tensor cores (half the datasheets' "with sparsity" figure).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "fp8": 1979.0},
    "H100PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0, "fp8": 1513.0},
    "H100NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0, "fp8": 1671.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6, "fp8": 733.0},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4, "fp8": 2615.0},
}


def peak_tflops_of(name: Optional[str], precision: str) -> tuple[Optional[float], str]:
    """The peak of the device called `name` (as torch reports it; None: a CPU) for a dtype, and where it came from."""
    if name is None:
        return None, "CPU: no peak table (MFU not reported)"
    compact = name.replace(" ", "").lower()
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in compact:
            peak = peaks.get(precision)
            if peak is None:
                return None, f"{name}: no {precision} peak (MFU not reported)"
            return peak, f"{name}: {peak} TFLOP/s dense {precision}"
    return None, f"{name}: not in megalite's peak table (MFU not reported)"


# Achievable fractions of the datasheet figures, per device (each device's own where one is published or measured;
# none is fitted to the published throughputs in the tests). The base set was measured by megalite itself on one H200
# with `make gpu-check` (kernels/results/h200-2026-11-30, kernels/README.md "Latest GPU figures"); the other devices
# take their matmul fractions from published measurements and the H200's fractions for what nobody has published.
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
    # FP8 (e4m3) matmuls: 1453.4 of 1979 TFLOP/s on an H200 SXM (Stas Bekman's "Maximum Achievable Matmul FLOPS"
    # table, ml-engineering/compute/accelerator/README.md, torch 2.7.1 + CUDA 12.8); megalite has not measured FP8.
    "matmul_fp8": 1453.4 / 1979.0,
}
EFFICIENCY_SOURCE = "measured on one H200 by `make gpu-check`, kernels/results/h200-2026-11-30"


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
    intra_node_link: str = "NVLink"  # NVLink | PCIe: NCCL's hop latency inside a node differs
    collective_cap_gbps: float = 0.0  # NCCL's own cap on a ring's bus bandwidth for this GPU (0: none)
    # achievable fractions of the peaks (the keys of EFFICIENCY): this device's own, sources in `sources`
    efficiency: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(EFFICIENCY))

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
_A100_NCCL = "NCCL's tuning model caps a ring's bus bandwidth on compute capability 8.0 at 235 GB/s (src/graph/tuning.cc)"
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
        intra_node_link="PCIe",
    ),
    "a100-80g": Device(
        "NVIDIA A100 SXM 80GB", dict(PEAK_TFLOPS["A100"]), 80.0, 2.039, 300.0, 25.0,
        (("peak_tflops", "NVIDIA A100 datasheet: 312 TFLOPS dense BF16/FP16, 19.5 FP32"),
         ("memory_gib", "80 GB HBM2e; the driver reports 81920 MiB = 80.0 GiB"),
         ("hbm_tbps", "NVIDIA A100 datasheet (80GB SXM): 2.039 TB/s"),
         ("intra_node_gbps", "NVLink 3: 600 GB/s per GPU both directions (A100 datasheet), 300 GB/s each way"),
         ("inter_node_gbps", "one 200 Gb/s HDR adapter per GPU (DGX A100): 25 GB/s each way"),
         ("collective_cap_gbps", _A100_NCCL)),
        collective_cap_gbps=235.0,
    ),
    "a100-40g": Device(
        "NVIDIA A100 SXM 40GB", dict(PEAK_TFLOPS["A100"]), 40.0, 1.555, 300.0, 25.0,
        (("peak_tflops", "NVIDIA A100 datasheet: 312 TFLOPS dense BF16/FP16, 19.5 FP32"),
         ("memory_gib", "40 GB HBM2; the driver reports 40960 MiB = 40.0 GiB"),
         ("hbm_tbps", "NVIDIA A100 datasheet (40GB SXM): 1.555 TB/s"),
         ("intra_node_gbps", "NVLink 3: 600 GB/s per GPU both directions, 300 GB/s each way"),
         ("inter_node_gbps", "one 200 Gb/s HDR adapter per GPU (DGX A100): 25 GB/s each way"),
         ("collective_cap_gbps", _A100_NCCL)),
        collective_cap_gbps=235.0,
    ),
}
DEVICE_ALIASES = {"h100": "h100-sxm", "a100": "a100-80g"}

_BEKMAN = "Stas Bekman's ml-engineering \"Maximum Achievable Matmul FLOPS comparison table\" (mamf-finder.py)"
_FROM_H200 = "megalite's H200 fractions (kernels/results/h200-2026-11-30): not measured on this device"
# Per device: the fractions that differ from the H200's, and where each fraction of the device comes from (shown in
# the report's "constants of" lines).
DEVICE_EFFICIENCY: dict[str, tuple[dict[str, float], tuple[tuple[str, str], ...]]] = {
    "h200": ({}, (("efficiency matmul", f"788 of 989 TFLOP/s bf16, 8192^3, {EFFICIENCY_SOURCE}"),
                  ("efficiency matmul_fp8", f"1453.4 of 1979 TFLOP/s e4m3, {_BEKMAN}, torch 2.7.1+cu128"),
                  ("efficiency copy, norms, attention", EFFICIENCY_SOURCE))),
    "h100-sxm": ({"matmul": 794.5 / 989.0, "matmul_fp8": 1402.6 / 1979.0},
                 (("efficiency matmul", f"794.5 of 989 TFLOP/s bf16, {_BEKMAN}, torch 2.7.0+cu126"),
                  ("efficiency matmul_fp8", f"1402.6 of 1979 TFLOP/s e4m3, {_BEKMAN}, torch 2.7.0+cu126"),
                  ("efficiency copy, norms, attention", _FROM_H200))),
    "h100-pcie": ({"matmul": 499.5 / 756.0, "matmul_fp8": 1402.6 / 1979.0},
                  (("efficiency matmul", "499.5 of 756 TFLOP/s bf16, mamf-finder.py as reported in mag-/gpu_benchmark's "
                    "README (CUDA 12.1)"),
                   ("efficiency matmul_fp8", "the H100 SXM's fraction (no PCIe FP8 figure published)"),
                   ("efficiency copy, norms, attention", _FROM_H200))),
    "a100-80g": ({"matmul": 271.2 / 312.0},
                 (("efficiency matmul", f"271.2 of 312 TFLOP/s bf16 (A100 SXM), {_BEKMAN}, torch 2.6.0+cu126"),
                  ("efficiency copy, norms, attention", _FROM_H200))),
    "a100-40g": ({"matmul": 271.2 / 312.0},
                 (("efficiency matmul", f"271.2 of 312 TFLOP/s bf16 (A100 SXM), {_BEKMAN}, torch 2.6.0+cu126"),
                  ("efficiency copy, norms, attention", _FROM_H200))),
}


def _with_efficiency(key: str, device: Device) -> Device:
    own, sources = DEVICE_EFFICIENCY[key]
    return dataclasses.replace(device, efficiency={**EFFICIENCY, **own}, sources=device.sources + sources)


DEVICES = {key: _with_efficiency(key, device) for key, device in DEVICES.items()}


def get_device(name: str) -> Device:
    """The device table entry for `name` (case-insensitive, e.g. h200, h100-sxm, a100-80g)."""
    key = DEVICE_ALIASES.get(name.lower(), name.lower())
    if key not in DEVICES:
        raise ConfigError(f"--device: unknown device {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def device_named(name: str, memory_gib: float) -> Optional[Device]:
    """The table entry for a GPU as torch names it, with its total memory in GiB (which tells the A100s apart);
    None for a GPU the table does not know."""
    compact = name.upper().replace(" ", "")
    if "H200" in compact:
        return DEVICES["h200"]
    if "H100" in compact:
        return DEVICES["h100-pcie" if "PCIE" in compact else "h100-sxm"]
    if "A100" in compact:
        return DEVICES["a100-80g" if memory_gib > 60 else "a100-40g"]
    return None
