"""The MFU denominator: each device's dense peak, looked up by the name torch reports (issue 14, item 13)."""

from __future__ import annotations

import pytest

from megalite.engine.metrics import peak_tflops_of
from megalite.engine.plan import DEVICES


@pytest.mark.parametrize("name,precision,want", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 PCIe", "fp32", 51.0),
    ("NVIDIA H100 NVL", "bf16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_by_device_name(name, precision, want):
    peak, note = peak_tflops_of(name, precision)
    assert peak == want, note
    assert name in note


def test_the_planner_and_the_metrics_agree_on_peaks():
    for key, torch_name in (("h100-sxm", "NVIDIA H100 80GB HBM3"), ("h100-pcie", "NVIDIA H100 PCIe"),
                            ("h200", "NVIDIA H200")):
        for precision in ("bf16", "fp32"):
            assert peak_tflops_of(torch_name, precision)[0] == DEVICES[key].peak_tflops[precision], (key, precision)
