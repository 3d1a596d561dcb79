"""`megalite bench moe` in its smoke mode: the figures it reports are recomputed here from its own measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_moe_smoke(tmp_path):
    """Rows for the grouped and looped MoE block and the dense MLP; FLOPs from the shapes (the MoE block: the router
    and top_k SwiGLU experts per token; the dense MLP: top_k x F units), TFLOP/s = FLOPs / time, the ratios = time
    ratios, the balanced router's equal loads (tokens x top_k / experts each), grouped and looped experts giving the
    same outputs and gradients, and the markdown table saying what the JSON says."""
    out = subprocess.run([sys.executable, "-m", "megalite.bench", "moe", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    written = json.loads((tmp_path / "moe-bench.json").read_text())
    assert written["run"]["commit"] and written["device"] == "cpu"
    s = written["shape"]
    assert (s["tokens"], s["hidden"], s["ffn"], s["experts"], s["top_k"], s["dtype"]) == (96, 32, 16, 8, 2, "float32")
    rows = {r["name"]: r for r in written["rows"]}
    assert list(rows) == ["moe grouped", "moe loop", "dense"]  # the CPU runs torch._grouped_mm in fp32
    expert = 3 * 32 * 16
    want = {"moe grouped": 6 * 96 * (8 * 32 + 2 * expert), "moe loop": 6 * 96 * (8 * 32 + 2 * expert),
            "dense": 6 * 96 * 2 * expert}
    for name, r in rows.items():
        assert r["ms"] > 0 and r["flops"] == want[name], r
        assert abs(r["tflops"] * 1e9 * r["ms"] / r["flops"] - 1) < 1e-9, r
    ratios = written["ratios"]
    assert abs(ratios["moe grouped / dense"] - rows["moe grouped"]["ms"] / rows["dense"]["ms"]) < 1e-12
    assert abs(ratios["moe loop / dense"] - rows["moe loop"]["ms"] / rows["dense"]["ms"]) < 1e-12
    assert abs(ratios["loop / grouped"] - rows["moe loop"]["ms"] / rows["moe grouped"]["ms"]) < 1e-12
    assert written["tokens_per_expert"] == [96 * 2 // 8] * 8
    assert written["grouped_vs_loop_max_diff"] < 1e-5
    table = (tmp_path / "moe-bench.md").read_text()
    for name, r in rows.items():
        assert f"| {name} | {r['ms']:.2f} | {r['tflops']:.3f} | {r['ms'] / rows['dense']['ms']:.2f}x |" in table
    assert f"loop / grouped: {ratios['loop / grouped']:.2f}x" in table
