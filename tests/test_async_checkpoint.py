"""Asynchronous checkpoints (train.checkpoint_async): training goes on while a background thread writes and commits.

Per layout (ZeRO 1-3, TP2, PP2; 2 ranks, fp32, gloo): a run saving asynchronously every 2 steps has the losses of a
run that does not save; its step-4 checkpoint, written in the background, resumes to the same losses. The snapshot
is isolated from later steps; at most one save is in flight; a preemption during a slow background write commits
it and then the current step. The kill -9 matrix of the asynchronous path is in tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from megalite import config as C
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import tiny_config, write_token_dataset

LAYOUTS = {
    "z1": {"deepspeed": {"zero_optimization": {"stage": 1}}},
    "z2": {"deepspeed": {"zero_optimization": {"stage": 2}}},
    "z3": {"deepspeed": {"zero_optimization": {"stage": 3}}},
    "tp2": {"parallel": {"tensor": 2}, "deepspeed": {"zero_optimization": {"stage": 1},
                                                     "train_micro_batch_size_per_gpu": 4}},
    # Pipelines last: DeepSpeed cannot build a plain engine in a process that has built a PipelineModule.
    "pp2": {"parallel": {"pipeline": 2}, "deepspeed": {"zero_optimization": {"stage": 1},
                                                       "train_micro_batch_size_per_gpu": 2,
                                                       "gradient_accumulation_steps": 2}},
}


def _trainer(workdir: str, name: str, layout: dict, steps: int, **train):
    from megalite.engine.trainer import Trainer

    raw = tiny_config(f"{workdir}/tok", f"{workdir}/{name}", train={"steps": steps, **train},
                      **json.loads(json.dumps(layout)))
    return Trainer(C.from_dict(raw))


def _records(trainer, kind: str) -> list[dict]:
    return [r for r in trainer.sink.records if r.get("kind") == kind]


def _run(workdir: str, name: str, layout: dict, steps: int, **train) -> dict:
    trainer = _trainer(workdir, name, layout, steps, **train)
    code = trainer.train()
    return {"exit": code, "start": trainer.start_step, "losses": [r["loss"] for r in _records(trainer, "train")],
            "saves": [(r["step"], r["mode"]) for r in _records(trainer, "checkpoint")],
            "written": [r["step"] for r in _records(trainer, "checkpoint_written")]}


def _layouts(workdir: str, names: list[str]) -> dict:
    import torch.distributed as dist

    out = {}
    for name in names:
        layout = LAYOUTS[name]
        ref = _run(workdir, f"{name}-ref", layout, 6, checkpoint_interval=0, checkpoint_async=False)
        bg = _run(workdir, f"{name}-async", layout, 6, checkpoint_interval=2, checkpoint_async=True)
        # As if the job had died after step 4's background save committed: step 6 never happened.
        if dist.get_rank() == 0:
            root = f"{workdir}/{name}-async/checkpoints"
            shutil.copytree(root, f"{workdir}/{name}-resume/checkpoints")
            shutil.rmtree(f"{workdir}/{name}-resume/checkpoints/step00000006")
            with open(f"{workdir}/{name}-resume/checkpoints/latest", "w") as f:
                f.write("step00000004\n")
        dist.barrier()
        resumed = _run(workdir, f"{name}-resume", layout, 6, checkpoint_interval=2, checkpoint_async=True,
                       resume="must")
        out[name] = {"ref": ref, "async": bg, "resumed": resumed}
    return out


def _isolation(workdir: str) -> dict:
    """Snapshot, then change every weight and moment before the background write: the files hold the snapshot.
    A second save while the first is in flight waits for it (at most one in flight)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megalite.checkpoint.reshard import TrainingState
    from megalite.engine.elastic import full_state_of
    from megalite.model.pipeline import canonical_parameters

    os.environ.update(MEGALITE_CKPT_FAULT="between_shards", MEGALITE_CKPT_FAULT_KILL="delay",
                      MEGALITE_CKPT_FAULT_DELAY_S="1", MEGALITE_CKPT_FAULT_DIR=f"{workdir}/markers")
    try:
        trainer = _trainer(workdir, "isolation", LAYOUTS["z1"], 2, checkpoint_interval=0, checkpoint_async=True)
        trainer.train()
        engine, grid = trainer.engine, trainer.grid
        before = full_state_of(engine, grid)
        first = trainer.checkpoints.store.save_async(engine, 100, trainer.client_state())
        returned_before_written = not first.done()
        for name, param in canonical_parameters(engine.module).items():  # what the next optimizer step would do
            safe_set_full_fp32_param(param, before[name].fp32 + 1.0)
            for key, value in before[name].moments.items():
                safe_set_full_optimizer_state(param, value + 1.0, key)
        after = full_state_of(engine, grid)
        second = trainer.checkpoints.store.save_async(engine, 101, trainer.client_state())
        first_done_when_second_started = first.done() and first.outcome == ("ok", first.path)
        trainer.checkpoints.store.wait()
    finally:
        for key in ("MEGALITE_CKPT_FAULT", "MEGALITE_CKPT_FAULT_KILL", "MEGALITE_CKPT_FAULT_DELAY_S",
                    "MEGALITE_CKPT_FAULT_DIR"):
            os.environ.pop(key, None)

    def worst(saved_path: str, expected: dict) -> float:
        saved, diff = TrainingState(saved_path), 0.0
        for name, state in expected.items():
            theirs = saved.parameter(name)
            diff = max(diff, float((theirs.fp32 - state.fp32).abs().max()))
            for key, value in state.moments.items():
                diff = max(diff, float((theirs.moments[key] - value).abs().max()))
        return diff

    return {"returned_before_written": returned_before_written, "first_done": first_done_when_second_started,
            "first_vs_before": worst(first.path, before), "second_vs_after": worst(second.path, after),
            "first_vs_after": worst(first.path, after), "snapshot_bytes": first.snapshot_bytes}


def _preempted(workdir: str) -> dict:
    """SIGUSR1 while step 2's background write is held up (a slow file system): the run commits it, saves step 3
    and exits 75."""
    os.environ.update(MEGALITE_CKPT_FAULT="before_manifest", MEGALITE_CKPT_FAULT_KILL="delay",
                      MEGALITE_CKPT_FAULT_DELAY_S="3", MEGALITE_CKPT_FAULT_DIR=f"{workdir}/markers-preempt")
    try:
        trainer = _trainer(workdir, "preempt", LAYOUTS["z1"], 6, checkpoint_interval=2, checkpoint_async=True)
        original = trainer.train_step
        signalled: dict = {}

        def step(timer):
            if trainer.step == 2:  # during step 3, while step 2 is being written
                signalled["at"] = time.perf_counter()
                os.kill(os.getpid(), signal.SIGUSR1)
            return original(timer)

        trainer.train_step = step
        code = trainer.train()
        seconds = time.perf_counter() - signalled["at"]
    finally:
        for key in ("MEGALITE_CKPT_FAULT", "MEGALITE_CKPT_FAULT_KILL", "MEGALITE_CKPT_FAULT_DELAY_S",
                    "MEGALITE_CKPT_FAULT_DIR"):
            os.environ.pop(key, None)
    root = f"{workdir}/preempt/checkpoints"
    return {"exit": code, "seconds_to_exit": seconds, "latest": open(f"{root}/latest").read().strip(),
            "dirs": sorted(d for d in os.listdir(root) if d.startswith("step")),
            "saves": [(r["step"], r["mode"]) for r in _records(trainer, "checkpoint")],
            "written": [(r["step"], r["waited_seconds"]) for r in _records(trainer, "checkpoint_written")]}


FAULT_KEYS = ("MEGALITE_CKPT_FAULT", "MEGALITE_CKPT_FAULT_KILL", "MEGALITE_CKPT_FAULT_RANK", "MEGALITE_CKPT_FAULT_SKIP",
              "MEGALITE_CKPT_FAULT_TIMES", "MEGALITE_CKPT_FAULT_DIR")


def _write_errors(workdir: str) -> dict:
    """A write error (ENOSPC) in rank 1's background writer, injected without root: once (the run warns, saves the next
    step synchronously and goes on) and for good (that save fails too: every rank raises, `latest` stays)."""
    from megalite.errors import CheckpointError

    out = {}
    for case, fault in (("once", {"MEGALITE_CKPT_FAULT_TIMES": "1"}), ("always", {"MEGALITE_CKPT_FAULT_SKIP": "1"})):
        os.environ.update(MEGALITE_CKPT_FAULT="write_file", MEGALITE_CKPT_FAULT_KILL="error",
                          MEGALITE_CKPT_FAULT_RANK="1", MEGALITE_CKPT_FAULT_DIR=f"{workdir}/markers-{case}", **fault)
        trainer = _trainer(workdir, f"write-error-{case}", LAYOUTS["z1"], 8, checkpoint_interval=2,
                           checkpoint_async=True)
        try:
            code, error = trainer.train(), None
        except CheckpointError as e:
            code, error = None, str(e)
        finally:
            for key in FAULT_KEYS:
                os.environ.pop(key, None)
        root = f"{workdir}/write-error-{case}/checkpoints"
        out[case] = {"exit": code, "error": error, "latest": open(f"{root}/latest").read().strip(),
                     "dirs": sorted(d for d in os.listdir(root) if d.startswith("step")),
                     "saves": [(r["step"], r["mode"]) for r in _records(trainer, "checkpoint")],
                     "failed": [r["step"] for r in _records(trainer, "checkpoint_failed")],
                     "steps": trainer.step}
    return out


def _launch(workdir: str) -> dict:
    out = _layouts(workdir, ["z1", "z2", "z3", "tp2"])
    out["isolation"] = _isolation(workdir)
    out["preempted"] = _preempted(workdir)
    out["write_errors"] = _write_errors(workdir)
    out.update(_layouts(workdir, ["pp2"]))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("async")
    write_token_dataset(str(d / "tok"))
    return run_ranks(_launch, 2, str(d), timeout_s=500, collective_timeout_s=90)[0] | {"workdir": str(d)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_async_saves_change_nothing_and_resume_exactly(results, layout):
    ref, bg, resumed = (results[layout][k] for k in ("ref", "async", "resumed"))
    assert ref["exit"] == bg["exit"] == resumed["exit"] == 0
    assert bg["saves"] == [(2, "async"), (4, "async"), (6, "sync")], bg["saves"]  # the end waits: sync
    assert sorted(bg["written"]) == [2, 4]
    assert bg["losses"] == ref["losses"]  # bit for bit: the snapshot does not disturb training
    assert resumed["start"] == 4
    assert resumed["losses"] == ref["losses"][4:]


def test_snapshot_is_isolated_from_later_changes(results):
    iso = results["isolation"]
    assert iso["returned_before_written"]  # the training thread got control back before the write finished
    assert iso["first_vs_before"] == 0.0  # step 100's files hold the state at its snapshot
    assert 0.99 < iso["first_vs_after"] < 1.01  # not the state changed afterwards (every value + 1)
    assert iso["second_vs_after"] == 0.0
    assert iso["first_done"]  # the second save waited for the first: one in flight
    assert iso["snapshot_bytes"] > 0


def test_preemption_during_a_background_write_commits_it_then_the_current_step(results):
    run = results["preempted"]
    assert run["exit"] == 75
    assert run["saves"] == [(2, "async"), (3, "sync")]
    (step, waited), = run["written"]
    assert step == 2 and waited > 0.5  # the preemption save waited for the slow background write
    assert run["latest"] == "step00000003" and run["dirs"] == ["step00000002", "step00000003"]
    from megalite.checkpoint.manager import verify_checkpoint

    for d in run["dirs"]:
        verify_checkpoint(os.path.join(results["workdir"], "preempt", "checkpoints", d))
    assert run["seconds_to_exit"] < 60


def test_a_failed_background_write_is_said_and_the_next_step_saved(results):
    once, always = results["write_errors"]["once"], results["write_errors"]["always"]
    # Step 2's write failed on rank 1: at the next step the ranks agree on it, record it and save that step
    # synchronously; the run then goes on saving in the background and ends with nothing lost.
    assert once["exit"] == 0 and once["steps"] == 8, once
    (failed,) = once["failed"]
    assert failed in (3, 4) and once["saves"][:2] == [(2, "async"), (failed, "sync")], once
    assert once["saves"][-1] == (8, "sync") and once["latest"] == "step00000008", once
    # For good: the synchronous save after the failure fails as well, on every rank (the run ends, exit 2), and the
    # last committed checkpoint stays what `latest` names.
    assert always["exit"] is None and "No space left on device" in always["error"], always
    assert always["latest"] == "step00000002" and always["dirs"] == ["step00000002"], always
    assert always["failed"] and always["steps"] < 8, always


def test_snapshot_buffers_are_reused_only_after_they_are_given_back():
    """A second snapshot copies into the first one's host tensors once they are given back (no new allocation);
    until then it allocates, so a snapshot being written is never overwritten."""
    import torch

    from megalite.checkpoint.snapshot import SnapshotBuffers, host_snapshot

    gen = torch.Generator().manual_seed(3)
    flat = torch.randn(1000, generator=gen)
    state = {"w": flat[:600].view(20, 30), "m": {"exp_avg": flat[600:].clone()}, "step": 7, "t": (flat[:5],)}
    buffers = SnapshotBuffers()
    original = state["w"].clone()
    first = host_snapshot(state, buffers=buffers)
    assert torch.equal(first["w"], state["w"]) and first["w"].data_ptr() != state["w"].data_ptr()
    assert first["w"].untyped_storage().nbytes() == 600 * 4  # compact: not the whole flat buffer
    flat.add_(1.0)
    second = host_snapshot(state, buffers=buffers)  # the first is not given back: fresh memory
    assert second["w"].data_ptr() != first["w"].data_ptr()
    assert torch.equal(first["w"], original) and torch.equal(second["w"], state["w"])  # each its own state
    buffers.give_back(first)
    assert buffers.nbytes == (600 + 400 + 5) * 4
    pointers = {first["w"].data_ptr(), first["m"]["exp_avg"].data_ptr(), first["t"][0].data_ptr()}
    flat.add_(1.0)
    third = host_snapshot(state, buffers=buffers)
    assert {third["w"].data_ptr(), third["m"]["exp_avg"].data_ptr(), third["t"][0].data_ptr()} == pointers
    assert torch.equal(third["w"], state["w"]) and torch.equal(third["m"]["exp_avg"], state["m"]["exp_avg"])
    assert third["step"] == 7 and buffers.nbytes == 0


def test_checkpoint_benchmark_runs(tmp_path):
    """`megalite bench checkpoint` end to end on a small model: both ranks report every figure the README quotes."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "megalite.bench", "checkpoint", "--params-m", "2", "--steps", "4",
                          "--every", "2", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ranks = json.loads((tmp_path / "out" / "checkpoint.json").read_text())["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    params = 2048 * 2048 + 2048  # --params-m 2 rounds to one Linear(2048, 2048) (the benchmark's width)
    for r in ranks:
        assert r["bytes"] > 2e6 * 12 and r["snapshot_bytes"] > 0 and r["save_s"] > 0 and r["async_stall_s"] > 0
        assert r["async_first_stall_s"] > 0 and r["async_write_s"] > 0
        assert len(r["runs"]["sync"]["stall_s"]) == len(r["runs"]["async"]["stall_s"]) == 2
        assert r["runs"]["none"]["stall_s"] == [] and r["runs"]["none"]["steps_per_s"] > 0
        assert r["params"] == params and r["zero_stage"] == 1
        # fp32 weights (4 bytes a parameter) + ZeRO-1's fp32 master copy and Adam's two moments (12), plus at most
        # 1 MB of manifest, metadata and DeepSpeed's conversion script
        assert 16 * params <= r["bytes"] <= 16 * params + 2**20, (r["bytes"], 16 * params)
        # The ratio the README quotes is the ratio of the reported figures: each of the three is rounded to 3
        # decimals, so the true stall and save lie within 0.0005 of what is reported and the reported ratio within
        # 0.0005 of the true one.
        half = 0.0005
        low = (r["async_stall_s"] - half) / (r["save_s"] + half) - half
        high = (r["async_stall_s"] + half) / (r["save_s"] - half) + half
        assert low <= r["async_stall_over_save"] <= high, (low, high, r)
        runs = r["runs"]
        # The reported speed ratio is that of the two reported speeds, rounded to 3 decimals.
        async_over_sync = runs["async"]["steps_per_s"] / runs["sync"]["steps_per_s"]
        assert abs(r["async_over_sync_steps_per_s"] - async_over_sync) <= half + 1e-9, r
        for mode in ("none", "sync", "async"):
            # steps/s is 4 steps over the true seconds, which lie within 0.0005 of the reported ones (3 decimals
            # each; a run of 4 small steps takes about 0.5 s, where 2 decimals alone could be 2% off).
            seconds, speed = runs[mode]["seconds"], runs[mode]["steps_per_s"]
            assert 4 / (seconds + half) - half <= speed <= 4 / (seconds - half) + half, (mode, runs[mode])
    # Each rank's snapshot holds what it writes: rank 0 the weights (4 bytes) and its half of the 12 bytes of
    # optimizer state, rank 1 its half: 10 and 6 bytes a parameter (plus a few bytes of scalars).
    by_rank = {r["rank"]: r["snapshot_bytes"] for r in ranks}
    assert 10 * params <= by_rank[0] <= 10 * params + 4096 and 6 * params <= by_rank[1] <= 6 * params + 4096, by_rank
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())  # removed after the run


def test_nvme_offload_turns_asynchronous_saves_off_and_refuses_them():
    """Offloaded-to-NVMe state lives in files DeepSpeed swaps, not in memory a snapshot could copy: unset means
    off there (on elsewhere), and an explicit true is a ConfigError naming the key."""
    from megalite.errors import ConfigError

    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/nvme"}}}
    assert C.from_dict(tiny_config("data", "out")).checkpoint_async is True
    assert C.from_dict(tiny_config("data", "out", deepspeed=nvme)).checkpoint_async is False
    assert C.from_dict(tiny_config("data", "out", train={"checkpoint_async": False})).checkpoint_async is False
    with pytest.raises(ConfigError, match=r"train\.checkpoint_async: true cannot be combined with NVMe offload"):
        C.from_dict(tiny_config("data", "out", deepspeed=nvme, train={"checkpoint_async": True}))
