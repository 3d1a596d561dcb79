"""An installed (non-editable) megalite works without its source tree: presets, the SLURM templates and the
kernel benchmark ship inside the wheel."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH: a source tree on it would be imported instead of the installed wheel."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRITON_INTERPRET="1", DS_ACCELERATOR="cpu")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding the megalite wheel; its dependencies come from this environment's
    site-packages through a .pth line (its own .pth files, the editable install's among them, are not read)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("megalite-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=_clean_env())
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()] or [sysconfig.get_paths()["purelib"]]
    (purelib / "megalite-test-deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert install.returncode == 0, install.stderr[-2000:]
    return venv


def _run(venv: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "megalite"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=_clean_env())


def test_installed_wheel_runs_without_the_source_tree(installed: Path, tmp_path: Path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import megalite; print(megalite.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True, env=_clean_env()).stdout.strip()
    assert str(installed) in where and str(REPO) not in where, where

    run = tmp_path / "run.json"  # a preset model and a shipped DeepSpeed file, both found by name
    run.write_text(json.dumps({"model": "tiny-gpt", "deepspeed": "zero1",
                               "data": {"prefixes": ["data/x"], "seq_length": 64},
                               "train": {"output_dir": str(tmp_path / "out")}}))
    check = _run(installed, tmp_path, "config", "check", str(run), "--world-size", "2")
    assert check.returncode == 0 and ": OK - " in check.stdout, check.stdout + check.stderr

    script = tmp_path / "job.sbatch"
    slurm = _run(installed, tmp_path, "slurm", str(run), "--nodes", "2", "--gpus-per-node", "0", "-o", str(script))
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr
    text = script.read_text()
    slurm_dir = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("export MEGALITE_SLURM_DIR="))
    assert str(installed) in slurm_dir and (Path(slurm_dir) / "common.sh").is_file(), slurm_dir
    assert "#SBATCH --nodes=2" in text

    bench = _run(installed, tmp_path, "bench", "--smoke", "--ops", "rms_norm", "--out", str(tmp_path / "bench"))
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert {r["impl"] for r in rows if r["op"] == "rms_norm" and r.get("ms")} >= {"megalite", "torch"}
