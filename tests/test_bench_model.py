"""The whole-model benchmark (`megalite bench model`) runs and reports, in its CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_model_smoke(tmp_path):
    """The smoke run, and `--fp8`: the same backend again with FP8 linears, side by side."""
    out = subprocess.run([sys.executable, "-m", "megalite.bench", "model", "--smoke", "--fp8", "tensorwise", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    written = json.loads((tmp_path / "model-bench.json").read_text())
    assert written["run"]["commit"] and written["run"]["machine"]
    results = written["results"]
    assert [(r["kernels"], r["fp8"]) for r in results] == [("torch", None), ("torch", "tensorwise")]
    for r in results:
        assert r["exit"] == 0 and r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None and "CPU" in r["peak"]  # no peak table on CPU: MFU is not invented
    assert results[1]["mfu_fp8_peak"] is None and "CPU" in results[1]["peak_fp8"]
    table = (tmp_path / "model-bench.md").read_text()
    assert "| torch | - |" in table and "| torch | tensorwise |" in table and "x vs torch bf16 |" in table
