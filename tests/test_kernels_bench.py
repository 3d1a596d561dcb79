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
    check_reported_figures(meta, rows, (out / "results.md").read_text())


MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # flash-attention's convention: the backward is 2.5 forwards


def visible_pairs(lengths: list[int], causal: bool) -> int:
    """(query, key) pairs attention computes over one packed row, counted from the mask itself."""
    import torch

    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    return int(mask.sum())


def check_reported_figures(meta: dict, rows: list[dict], markdown: str) -> None:
    """Each figure against what the smoke run measured: the shapes and dtype it ran, FLOPs and bytes of each shape
    recomputed here, throughput = work / time, fractions of the reported peaks, speedups = time ratios, and the
    markdown cells equal to the JSON rows."""
    from megalite.bench.kernels import document_lengths

    assert meta["dtype"] == "float32" and meta["device"] == "cpu (Triton interpreter)"  # smoke on the CPU: fp32
    assert meta["peaks"]["matmul_shape"] == 512 and meta["peaks"]["copy_bytes"] == 16 * 2**20
    timed = [r for r in rows if r.get("ms")]
    assert {r["op"] for r in timed} == {"attention", "attention_docs", "layer_norm", "rms_norm"}
    ours = {(r["op"], json.dumps(r["shape"], sort_keys=True), r["mode"]): r for r in timed if r["impl"] == "megalite"}
    for r in timed:
        shape, mode = r["shape"], r["mode"]
        if r["op"] == "attention":
            assert {k: v for k, v in shape.items() if k != "causal"} == {"batch": 1, "heads": 2, "seq": 40,
                                                                         "head_dim": 32}, r
            full = visible_pairs([shape["seq"]], causal=False)  # T^2, counted from the mask
            pairs = full / 2 if shape["causal"] else full  # the stated convention: half the square when causal
            flops = 4 * shape["batch"] * shape["heads"] * pairs * shape["head_dim"] * MODE_FACTOR[mode]
        elif r["op"] == "attention_docs":
            lengths = document_lengths(shape["seq"], smoke=True)
            assert sum(lengths) == shape["seq"] == 40 and len(lengths) == shape["documents"], (lengths, r)
            flops = 4 * shape["batch"] * shape["heads"] * visible_pairs(lengths, shape["causal"]) * shape["head_dim"]
            flops *= MODE_FACTOR[mode]
        else:  # norms: bytes each input read once, each output written once (fp32, 4 bytes), fp32 statistics
            assert shape == {"rows": 16, "width": 1000}, r
            rows_, n = shape["rows"], shape["width"]
            params = 2 if r["op"] == "layer_norm" else 1  # weight (and bias)
            stats = rows_ * 4 * (2 if r["op"] == "layer_norm" else 1)  # mean and rstd, or rstd
            forward = 4 * (rows_ * n * 2 + params * n) + stats
            backward = 4 * (rows_ * n * 3 + 2 * params * n) + stats
            moved = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]
            assert abs(r["gbps"] * r["ms"] * 1e6 / moved - 1) < 1e-9, (r, moved)
            assert abs(r["frac_peak"] - r["gbps"] / meta["peaks"]["copy_gbps"]) < 1e-12, r
            flops = None
        if flops is not None:
            assert abs(r["tflops"] * r["ms"] * 1e9 / flops - 1) < 1e-9, (r, flops)
            assert abs(r["frac_peak"] - r["tflops"] / meta["peaks"]["matmul_tflops"]) < 1e-12, r
        mine = ours[(r["op"], json.dumps(shape, sort_keys=True), mode)]
        if r["impl"] != "megalite":
            assert abs(r["ours_speedup"] - r["ms"] / mine["ms"]) < 1e-12, r
        value = r.get("tflops", r.get("gbps"))
        cell = f"{value:.4g} ({r['frac_peak']:.1%})" + (f" [{r['ours_speedup']:.2f}x]" if "ours_speedup" in r else "")
        assert cell in markdown, (cell, r)


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
