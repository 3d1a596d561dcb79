"""The MFU denominator: each device's dense peak, looked up by the name torch reports (issue 14, item 13)."""

from __future__ import annotations

import pytest

from megalite.plan import DEVICES, peak_tflops_of


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


def test_the_device_table_entry_of_a_gpu_by_its_torch_name():
    """What the planner plans for on this machine (launch.local_gpu gives the name and memory)."""
    from megalite.plan import device_named

    assert device_named("NVIDIA H100 80GB HBM3", 79.6) is DEVICES["h100-sxm"]
    assert device_named("NVIDIA H100 PCIe", 79.6) is DEVICES["h100-pcie"]
    assert device_named("NVIDIA H200", 140.4) is DEVICES["h200"]
    assert device_named("NVIDIA A100-SXM4-80GB", 80.0) is DEVICES["a100-80g"]
    assert device_named("NVIDIA A100-SXM4-40GB", 40.0) is DEVICES["a100-40g"]
    assert device_named("NVIDIA GeForce RTX 4090", 24.0) is None
