"""`make gpu-check` (kernels/gpu_check.sh) dry-run on the CPU (issue 24): its arguments, the stages it runs at toy
size (--smoke), the files it hands the device tool ($OUT: at most 8, plain names, one level, under 16 MiB), the
measured table, issue 24's before/after summary, and --import, which files a returned $OUT under kernels/results.
The GPU stages themselves (precompile, model) are tested elsewhere: tests/test_kernels_resources.py and
tests/test_bench_model.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "kernels" / "gpu_check.sh"


def run(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "OUT"}  # OUT only where a test sets it
    full.update({"PYTHON": sys.executable, "PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(["bash", str(cwd / "kernels" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument --bogus"),
    (["--budget", "soon"], "--budget needs whole seconds"),
    (["--only", "tests,coffee"], "--only takes a comma-separated subset"),
    (["--out"], "--out needs a folder"),
    (["--import", "/nonexistent/folder"], "--import needs the folder"),
])
def test_bad_arguments_exit_2_saying_why(args, message):
    out = run(*args, timeout=60)
    assert out.returncode == 2 and message in out.stderr and "--smoke" in out.stderr, out.stderr


def test_an_unrelated_output_folder_is_never_deleted(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    out = run("--smoke", "--out", str(tmp_path), timeout=60)
    assert out.returncode == 2 and "not an earlier gpu-check's folder" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_smoke_run_packs_results_for_the_device_tool(tmp_path):
    device_out, results = tmp_path / "OUT", tmp_path / "results"
    device_out.mkdir()
    out = run("--smoke", "--only", "tests,bench", "--out", str(results), env={"OUT": str(device_out)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "== precompile for sm_90: not asked for" in log and "== model: not asked for" in log
    files = sorted(p.name for p in device_out.iterdir())
    assert files == sorted(["gpu-check.log", "summary.md", "results.json", "results-fp16.json", "table.json",
                            "extras.tar.gz"]), files  # resources-device and model-bench: their stages did not run
    for p in device_out.iterdir():  # the device tool's limits: 8 plain files, 16 MiB each
        assert p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size < 16 * 2**20, p
    # the measured table: for every op, shape and mode, the fastest correct implementation auto may run
    # (on the CPU both runs are fp32, so the second run's shapes replace the first's in the merged table)
    results_rows = [r for name in ("results.json", "results-fp16.json")
                    for r in json.loads((device_out / name).read_text())["rows"]]
    table = json.loads((device_out / "table.json").read_text())
    assert table["device"] == "cpu (Triton interpreter)" and table["entries"]
    for e in table["entries"]:
        assert e["winner"] == min(e["times_ms"], key=e["times_ms"].get) and "megalite" in e["times_ms"], e
        measured = {r["ms"] for r in results_rows if r["op"] == e["op"] and r["impl"] == "megalite"
                    and r["mode"] == e["mode"] and r["shape"].get("seq", r["shape"].get("width")) == e["size"]}
        assert e["times_ms"]["megalite"] in measured, (e, measured)
    assert {e["op"] for e in table["entries"]} == {"attention", "attention_docs", "layer_norm", "rms_norm"}
    assert {e["mode"] for e in table["entries"]} == {"fwd", "fwd+bwd"}
    assert {e["dtype"] for e in table["entries"]} == {"float32"}  # the interpreter runs fp32 whatever was asked
    summary = (device_out / "summary.md").read_text()
    assert "| attention fwd+bwd, d128, causal, seq 4096 | 273.7 TFLOP/s | cuDNN SDPA 451.8 | 0.61 |" in summary
    assert "| gpt3-1.3b training step, 1 GPU | MFU 38.4% (379 TFLOP/s) |" in summary and "smoke" in summary
    assert "after: megalite" in summary and "Goals (issue 24):" in summary
    listing = subprocess.run(["tar", "-tzf", str(device_out / "extras.tar.gz")], capture_output=True, text=True).stdout
    assert "./results.md" in listing and "./tests-variants.xml" in listing and "./fp16/results.md" in listing

    # --import files the returned folder under kernels/results/<device>-<date> and the table where auto reads it
    tree = tmp_path / "checkout"
    (tree / "kernels").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "kernels")
    imported = run("--import", str(device_out), cwd=tree, timeout=60)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    filed = list((tree / "kernels" / "results").iterdir())
    assert len(filed) == 1 and filed[0].name.startswith("cpu-triton-interpreter-")
    assert (filed[0] / "summary.md").exists() and (filed[0] / "results.md").exists()
    assert json.loads((tree / "megalite/kernels/tables/cpu-triton-interpreter.json").read_text()) == table
