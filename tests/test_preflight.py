"""Preflight: each check fails with a message naming the fix; the collective runs on every rank."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from megalite import config
from megalite.commands import preflight as preflight_cli
from megalite.engine import preflight
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import tiny_config


def _cfg(tmp_path: Path, **sections) -> config.Config:
    raw = tiny_config(str(tmp_path / "data"), str(tmp_path / "run"), **sections)
    return config.from_dict(raw)


def _problems(checks: list[preflight.Check]) -> list[str]:
    return [c.message for c in checks if not c.ok]


def test_layout_and_batch_arithmetic(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, parallel={"tensor": 2, "pipeline": 1}, model={"num_heads": 4})
    ok = preflight.check_layout(cfg, 4)
    assert not _problems(ok)
    assert "world size 4 = tensor 2 x pipeline 1 x data 2" in ok[0].message
    assert "global batch 4 = micro 2 x gradient accumulation 1 x data parallel 2" in ok[1].message
    bad = _problems(preflight.check_layout(cfg, 3))
    assert any("world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1" in m for m in bad)
    cfg = _cfg(tmp_path, deepspeed={"train_batch_size": 6})
    bad = _problems(preflight.check_layout(cfg, 2))
    assert any("deepspeed.train_batch_size: 6 != micro 2" in m and "= 4" in m for m in bad)


def test_precision_and_gpus_on_cpu(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, deepspeed={"fp16": {"enabled": True}})
    bad = _problems(preflight.check_devices(cfg, env={}))
    assert any("fp16 training is not supported on CPU" in m and "bf16 or fp32" in m for m in bad)
    cfg = _cfg(tmp_path, deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    assert not _problems(preflight.check_devices(cfg, env={}))
    # A job that asked for GPUs but whose torch sees none (CPU build, no driver, no allocation).
    bad = _problems(preflight.check_devices(cfg, env={"MEGALITE_GPUS_PER_NODE": "8"}))
    assert any("MEGALITE_GPUS_PER_NODE=8 but torch sees no GPU" in m for m in bad)


def test_gpus_per_node_against_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    cfg = _cfg(tmp_path, deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    env = {"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_PROCID": "3", "SLURM_NODEID": "1", "LOCAL_RANK": "3"}
    bad = _problems(preflight.check_devices(cfg, env=env))
    assert any("8 ranks on this node but 4 GPUs visible" in m and "--ntasks-per-node=4" in m for m in bad)
    assert any("H200 has no bf16 support" in m for m in bad)
    env = {"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0", "RANK": "4"}
    assert not _problems(preflight.check_devices(_cfg(tmp_path), env=env))


def test_tasks_per_node_notation() -> None:
    assert preflight.expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert preflight.expand_tasks_per_node("1") == [1]
    assert preflight.local_world_size({"LOCAL_SIZE": "2"}) == 2  # the deepspeed launcher
    assert preflight.local_world_size({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1",
                                       "SLURM_PROCID": "2"}) == 1
    # RANK from another launcher: srun's count is of launchers, not ranks.
    assert preflight.local_world_size({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_PROCID": "0", "RANK": "5"}) is None


def test_disk_space_against_checkpoint_estimate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    size = preflight.checkpoint_bytes(cfg)
    # The estimate against real checkpoints' bytes (ZeRO 0-3, fp32 and bf16) is tested in tests/test_engine.py.
    assert not _problems(preflight.check_disk(cfg))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - size, size))
    bad = _problems(preflight.check_disk(cfg))  # keep 2 + 1 in flight, none there yet
    assert bad and "train.checkpoint_dir" in bad[0] and "lower train.keep_checkpoints" in bad[0]


def test_checkpoint_dir_under_a_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.write_text("a file where a folder of the path should be")
    with pytest.raises(NotADirectoryError):  # what the first save would meet
        (notes / "ck").mkdir(parents=True)
    for ckpt_dir in (notes / "ck", notes):
        problems = _problems(preflight.check_disk(_cfg(tmp_path, train={"checkpoint_dir": str(ckpt_dir)})))
        assert problems == [f"train.checkpoint_dir: cannot create {ckpt_dir}: {notes} is a file, not a directory"]


def test_unwritable_checkpoint_dir(tmp_path: Path) -> None:
    """A folder this user cannot write: mode 0500, or for root (whom modes do not stop) a read-only mount."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    as_root = os.geteuid() == 0
    if as_root:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(locked)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"root but cannot mount a read-only tmpfs: {r.stderr.strip()}")
    try:
        with pytest.raises(OSError):  # the folder is really unwritable for this user
            (locked / "probe").mkdir()
        cfg = _cfg(tmp_path, train={"checkpoint_dir": str(locked / "ck")})
        problems = _problems(preflight.check_disk(cfg))
    finally:
        if as_root:
            subprocess.run(["umount", str(locked)], check=False)
    assert problems == [f"train.checkpoint_dir: cannot create or write {locked / 'ck'} ({locked} is not writable)"]


def _ranks_preflight(raw: dict, fail_rank: int | None) -> list[str]:
    import torch.distributed as dist

    cfg = config.from_dict(raw)
    rank = dist.get_rank()
    if rank == fail_rank:
        cfg.deepspeed["fp16"] = {"enabled": True}  # this rank alone has a problem
    return preflight.run_preflight(cfg, dist.get_world_size(), rank, collective_mb=0.25)


def test_collective_and_agreement_across_ranks(tmp_path: Path) -> None:
    raw = tiny_config(str(tmp_path / "data"), str(tmp_path / "run"))
    assert run_ranks(_ranks_preflight, 2, raw, None) == [[], []]
    problems = run_ranks(_ranks_preflight, 2, raw, 1)
    assert any("fp16" in p for p in problems[1])
    assert problems[0] == ["preflight ranks: preflight failed on rank(s) 1; see their messages"]


def _ranks_collective() -> list:
    import torch.distributed as dist

    return preflight.check_collective(dist.get_world_size(), 0.25) + preflight.check_collective(
        dist.get_world_size(), 0.25, min_bandwidth_gbps=1e9)


def test_collective_bandwidth_threshold() -> None:
    for fine, too_slow in run_ranks(_ranks_collective, 2):
        assert fine.ok and "bus bandwidth" in fine.message and "across 2 ranks (gloo)" in fine.message
        assert not too_slow.ok and "below the required" in too_slow.message


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_config(str(tmp_path / "data"), str(tmp_path / "run"))))
    parser = argparse.ArgumentParser()
    preflight_cli.add_arguments(parser)
    assert preflight_cli.main(parser.parse_args([str(path), "--world-size", "2"])) == 0
    out = capsys.readouterr().out
    assert "preflight: PASSED on 2 ranks" in out and "world size 2 = tensor 1 x pipeline 1 x data 2" in out
    args = parser.parse_args([str(path), "--world-size", "2", "--json", "--set", "deepspeed.fp16.enabled=true"])
    assert preflight_cli.main(args) == 2
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not report["ok"] and any(c["name"] == "precision" and not c["ok"] for c in report["checks"])
    path.write_text("{}")
    assert preflight_cli.main(parser.parse_args([str(path)])) == 2
    assert "INVALID" in capsys.readouterr().err


def test_model_states_that_cannot_fit_fail_preflight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in the model's size (hidden 100000: 480B parameters) is a memory failure naming the parameter count,
    not a disk-space shortage, once the device is known; a model that fits passes."""
    from megalite import launch

    monkeypatch.setattr(launch, "local_gpu", lambda: ("NVIDIA H100 80GB HBM3", 79.6))  # an H100 SXM
    run = Path(__file__).resolve().parent.parent / "configs" / "runs" / "demo-cpu.json"
    typo = config.load(run, ["model.hidden_size=100000", "model.num_heads=4"])
    (check,) = preflight.check_memory(typo, 2, env={})
    assert not check.ok and "the model states alone need" in check.message and "B parameters" in check.message
    (ok,) = preflight.check_memory(config.load(run), 2, env={})
    assert ok.ok, ok.message
