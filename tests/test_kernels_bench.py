"""The benchmark harness in smoke mode (tiny sizes on the CPU through Triton's interpreter)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_results(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run(
        [sys.executable, str(REPO / "kernels" / "bench.py"), "--smoke", "--out", str(out)],
        check=True, env=env, timeout=300, cwd=REPO,
    )  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["smoke"] and meta["commit"] and meta["device"]
    assert meta["peaks"]["matmul_tflops"] > 0 and meta["peaks"]["copy_gbps"] > 0
    for op in ("attention", "layer_norm", "rms_norm", "attention_docs"):
        impls = {r["impl"] for r in rows if r["op"] == op and r.get("ms")}
        assert "megalite" in impls and len(impls) >= 2, (op, impls)
        modes = {r["mode"] for r in rows if r["op"] == op and r["impl"] == "megalite"}
        assert modes == {"fwd", "bwd", "fwd+bwd"}
    assert any("ours_speedup" in r for r in rows)
    docs = [r for r in rows if r["op"] == "attention_docs" and r.get("tflops")]
    assert all(r["shape"]["documents"] >= 1 for r in docs)
    assert "| megalite |" in (out / "results.md").read_text().replace("| shape | mode ", "")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_cli_dispatches_to_the_benchmark():
    """`megalite bench [kernels] OPTIONS` reaches the kernel benchmark's own parser; other names their modules."""
    from megalite.bench import BENCHMARKS
    from megalite.bench.runner import split_name

    name, rest = split_name(["--smoke", "--ops", "rms_norm", "--out", "x"])
    assert name == "kernels" and rest == ["--smoke", "--ops", "rms_norm", "--out", "x"]
    from megalite.bench import kernels

    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    parsed = parser.parse_args(rest)
    assert parsed.smoke and parsed.ops == "rms_norm" and callable(kernels.main)
    assert split_name(["model", "--smoke"]) == ("model", ["--smoke"])
    import importlib

    for bench in BENCHMARKS:
        assert callable(importlib.import_module(f"megalite.bench.{bench}").main), bench
