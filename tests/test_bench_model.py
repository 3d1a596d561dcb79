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
    r = results[0]
    assert r["exit"] == 0 and r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
    assert r["mfu"] is None and "CPU" in r["peak"]  # no peak table on CPU: MFU is not invented
    # The smoke shape: tiny-gpt, sequence 64, micro-batch 2 on one process; 3 steps, the first one warm-up.
    assert (written["model"], written["seq"], written["micro_batch"], r["steps_timed"]) == ("tiny-gpt", 64, 2, 2)
    tokens = 2 * 64  # per step: micro-batch x sequence (one process, no accumulation)
    assert abs(r["tokens_per_s"] * r["step_s"] / tokens - 1) < 1e-9, r
    # FLOPs per token, 6N + 12*L*d*T (Kaplan/PaLM: N the parameters outside the embeddings), with N counted on
    # the model itself rather than by megalite's formula.
    from megalite import config
    from megalite.model import build_model

    model = build_model(config.model_config_from_dict(config.expand_references({"model": "tiny-gpt"}, None)["model"]),
                        seed=1)
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embedding."))
    flops_per_token = 6 * n + 12 * 4 * 256 * 64  # tiny-gpt: 4 layers of width 256
    assert abs(r["tflops"] * 1e12 / (r["tokens_per_s"] * flops_per_token) - 1) < 1e-9, (r, n)
    row = (f"| torch | - | {r['step_s'] * 1000:.0f} ms | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | n/a | - | "
           "1.00x vs torch |")
    assert row in (tmp_path / "model-bench.md").read_text()


def test_the_benchmark_is_never_stopped_by_the_disk_check(monkeypatch, tmp_path):
    """The model benchmark saves no checkpoint, so the preflight's free-disk check (3 x 17 GB for gpt3-1.3b) must not
    stop it: on a full disk the check fails for a training run and passes, saying why, in a benchmark worker."""
    import shutil
    from collections import namedtuple

    from megalite import config
    from megalite.bench import model as bench_model
    from megalite.engine import preflight
    from tests.helpers.engine_utils import tiny_config

    cfg = config.from_dict(tiny_config(str(tmp_path / "data"), str(tmp_path / "run")))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    monkeypatch.setattr(preflight, "check_disk", preflight.check_disk)  # restored after the test
    assert not preflight.check_disk(cfg)[0].ok
    bench_model.never_saving()
    checks = preflight.run_checks(cfg, 1, 0, collective=False, env={})
    disk = [c for c in checks if c.name == "disk"]
    assert len(disk) == 1 and disk[0].ok and "saves no checkpoint" in disk[0].message, disk
