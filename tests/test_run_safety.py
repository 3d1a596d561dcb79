"""Runs that must not lose or mix up work (issue 13): a fresh run in a directory of another run's checkpoints,
`latest` as the only notion of newest, quarantined corrupt checkpoints, non-finite weights never saved as the
"last good" ones, preemption during start-up, a full disk while saving, and the small messages around them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalite import config as C
from megalite.errors import ConfigError
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import tiny_config, write_token_dataset

REPO = Path(__file__).resolve().parent.parent


def _run(workdir: str, out: str, steps: int, **train) -> dict:
    """One Trainer run on every rank; returns its exit code, the report and the root's listing (rank 0's view)."""
    from megalite.checkpoint.paths import committed_steps
    from megalite.engine.signals import EXIT_PREEMPTED, PreemptedDuringSetUp
    from megalite.engine.trainer import Trainer

    raw = tiny_config(f"{workdir}/tok", out, train={"steps": steps, "checkpoint_interval": 1, **train})
    try:
        trainer = Trainer(C.from_dict(raw))
    except PreemptedDuringSetUp as e:  # every rank stopped at the same set-up phase, before anything was saved
        root = Path(out) / "checkpoints"
        return {"exit": EXIT_PREEMPTED, "stopped_at": str(e), "steps": [s for s, _ in committed_steps(root)]}
    said = io.StringIO()  # what the run prints (rank 0's "megalite: ..." lines), passed on afterwards
    try:
        with contextlib.redirect_stderr(said):
            code = trainer.train()
    finally:
        sys.stderr.write(said.getvalue())
    root = Path(trainer.checkpoints.store.root)
    return {"exit": code, "start": trainer.start_step, "report": trainer.checkpoints.store.resume_report,
            "said": [line for line in said.getvalue().splitlines() if line.startswith("megalite: ")],
            "losses": [r["loss"] for r in trainer.sink.records if r.get("kind") == "train"],
            "steps": [s for s, _ in trainer.checkpoints.store.committed_steps()],
            "entries": sorted(os.listdir(root)) if root.is_dir() else []}


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _identity_and_quarantine(workdir: str) -> dict:
    import torch.distributed as dist

    out: dict = {}
    run = f"{workdir}/run"
    # The sequence: a finished run (seed 1234) with checkpoints 2 and 4 ...
    out["old"] = _run(workdir, run, 4, seed=1234, checkpoint_interval=2)
    # ... a new run (seed 999) with resume: never in the same directory (its losses: those of a fresh run) ...
    out["never"] = _run(workdir, run, 3, seed=999, resume="never")
    out["fresh"] = _run(workdir, f"{workdir}/fresh", 3, seed=999)
    # ... then that run continues with resume: auto: it must resume its own step 3, not the old run's step 4.
    out["auto"] = _run(workdir, run, 6, seed=999)
    # The old run's settings over the new run's checkpoints: refused, naming the difference and what to do.
    try:
        _run(workdir, run, 8, seed=1234)
        out["foreign"] = "no error"
    except Exception as e:  # noqa: BLE001 - the message is the result
        out["foreign"] = str(e)

    # A corrupt newest checkpoint: rejected, quarantined (not counted toward keep), the older one resumed.
    q = f"{workdir}/quarantine"
    _run(workdir, q, 4, checkpoint_interval=2)
    if dist.get_rank() == 0:
        _flip_byte(Path(q) / "checkpoints" / "step00000004" / "ds" / "mp_rank_00_model_states.pt")
    dist.barrier()
    out["must"] = _run(workdir, q, 6, resume="must", checkpoint_interval=2)
    rejected = sorted(p for p in (Path(q) / "checkpoints").iterdir() if p.name.startswith("rejected-"))
    out["rejected"] = [(p.name, (p / "REJECTED.txt").read_text()) for p in rejected]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("safety")
    write_token_dataset(str(d / "tok"))
    return str(d)


@pytest.fixture(scope="module")
def identity(workdir) -> list[dict]:
    return run_ranks(_identity_and_quarantine, 2, workdir, timeout_s=400, collective_timeout_s=60)


def test_never_moves_another_runs_checkpoints_aside_and_auto_resumes_its_own(identity, workdir):
    superseded = [p for p in (Path(workdir) / "run" / "checkpoints").iterdir() if p.name.startswith("superseded-")]
    for rank, res in enumerate(identity):
        # The user is told, on one line, where the old checkpoints went (rank 0 speaks for the run).
        told = [line for line in res["never"]["said"] if "moved" in line]
        assert len(told) == (1 if rank == 0 else 0), res["never"]["said"]
        if rank == 0:
            assert f"to {superseded[0]} " in told[0] and "resume=never" in told[0], told
            assert not any("moved" in line for line in res["fresh"]["said"] + res["auto"]["said"])
        assert res["old"]["steps"] == [4, 2]
        never = res["never"]
        assert never["start"] == 0 and never["steps"] == [3, 2]
        assert never["losses"] == res["fresh"]["losses"]  # started from step 1, not from the old weights
        assert any("moved the checkpoints already in" in line for line in never["report"]), never["report"]
        auto = res["auto"]
        assert auto["start"] == 3, auto["report"]  # its own latest, never the old run's newer step 4
        assert auto["steps"] == [6, 5]
    assert len(superseded) == 1 and sorted(os.listdir(superseded[0])) == ["latest", "step00000002", "step00000004"]


def test_auto_refuses_another_runs_checkpoints(identity):
    for res in identity:
        message = res["foreign"]
        assert "a checkpoint of another run: seed is 999 there but 1234 in this run" in message, message
        assert "train.resume=never" in message and "train.init_from" in message


def test_corrupt_checkpoint_is_quarantined_and_never_counts_toward_keep(identity):
    for res in identity:
        must = res["must"]
        assert must["exit"] == 0 and must["start"] == 2, must["report"]
        # keep=2: the new steps 6 and 4; the verified step 2 stayed until newer ones were committed.
        assert must["steps"] == [6, 4]
        ((name, reason),) = res["rejected"]
        assert name.startswith("rejected-step00000004-") and "mp_rank_00_model_states.pt" in reason
        assert any("quarantined" in line for line in must["report"])


def test_latest_is_the_only_notion_of_newest(tmp_path):
    """A complete directory newer than the one `latest` names is ignored (a save killed before `latest` moved)."""
    from megalite.checkpoint.manager import CheckpointManager

    root = tmp_path / "root"
    for step in (2, 3):
        (root / f"step0000000{step}").mkdir(parents=True)
    (root / "latest").write_text("step00000002\n")
    plan = CheckpointManager(str(root))._plan()
    assert plan["candidates"] == [str(root / "step00000002")]
    assert any("ignoring" in note and "step00000003" in note for note in plan["notes"])


# ----------------------------------------------------------------------------- start-up signals, NaN weights


def _signal_during_startup(workdir: str) -> dict:
    """SIGTERM on rank 1 at each phase of set-up and resume: every rank exits 75 before its first step."""
    import torch.distributed as dist

    from megalite.checkpoint.manager import CheckpointManager
    from megalite.engine import trainer as T
    from megalite.engine.strategy import DenseStrategy

    out: dict = {}
    phases = {
        "preflight": (T, "run_preflight"),
        "data": (T, "build_datasets"),
        "model": (DenseStrategy, "build_model"),
        "engine": (T, "build_engine"),
        "resume": (CheckpointManager, "find_resume"),
    }
    for phase, (owner, name) in phases.items():
        real = getattr(owner, name)

        def signalled(*args, _real=real, **kwargs):
            if dist.get_rank() == 1:
                signal.raise_signal(signal.SIGTERM)  # megalite's handler only sets a flag
            return _real(*args, **kwargs)

        setattr(owner, name, signalled)
        try:
            out[phase] = _run(workdir, f"{workdir}/signal-{phase}", 3)
        finally:
            setattr(owner, name, real)
    return out


def test_preemption_during_startup_exits_75_without_saving(workdir):
    # A signal during a set-up phase stops every rank at the end of that phase, not after the whole set-up.
    stops = {"preflight": "preflight", "data": "building the data", "model": "building the model",
             "engine": "starting DeepSpeed"}
    for res in run_ranks(_signal_during_startup, 2, workdir, timeout_s=300, collective_timeout_s=60):
        for phase, r in res.items():
            assert r["exit"] == 75, (phase, r)
            assert r["steps"] == [], (phase, r)  # nothing new to save before the first step
            assert r.get("stopped_at") == stops.get(phase), (phase, r)  # resume: after set-up, before step 1


def test_nonfinite_optimizer_settings_are_config_errors():
    for change, fragment in ((("weight_decay", float("nan")), "weight_decay: expected a finite number, got nan"),
                             (("lr", float("inf")), "lr: expected a finite number, got inf"),
                             (("lr", "fast"), "lr: expected a finite number, got 'fast'"),
                             (("betas", [0.9, 1.5]), "betas: expected two numbers in [0, 1)"),
                             (("eps", -1.0), "eps: must be > 0, got -1.0"),
                             (("lrr", 0.1), "params.lrr: not a parameter megalite's AdamW uses (did you mean 'lr'?)")):
        raw = tiny_config("x", "y")
        raw["deepspeed"]["optimizer"]["params"][change[0]] = change[1]
        with pytest.raises(ConfigError, match=None) as e:
            C.from_dict(raw)
        assert fragment in str(e.value), str(e.value)
    for key, value, fragment in (("gradient_clipping", float("nan"), "gradient_clipping: must be a finite number"),
                                 ("scheduler", {"type": "WarmupDecayLR", "params": {"total_num_steps": -5}},
                                  "total_num_steps: expected an integer > 0, got -5"),
                                 ("scheduler", {"type": "WarmupCosineLR", "params": {"warmup_num_stps": 5}},
                                  "did you mean 'warmup_num_steps'")):
        raw = tiny_config("x", "y")
        raw["deepspeed"][key] = value
        with pytest.raises(ConfigError) as e:
            C.from_dict(raw)
        assert fragment in str(e.value), str(e.value)
    # The batch arithmetic is compared even when other problems are reported too.
    raw = tiny_config("x", "y")
    raw["deepspeed"]["train_batch_size"] = 6
    raw["train"]["keep_checkpoints"] = 1
    with pytest.raises(ConfigError) as e:
        C.from_dict(raw, world_size=2)
    assert "keep_checkpoints" in str(e.value) and "train_batch_size: 6 != micro 2" in str(e.value)


def _nan_weights(workdir: str) -> dict:
    """A step whose loss was finite but whose update made the weights NaN (here: injected after step 3's update):
    the periodic save of step 3 and exit 76's save after the skipped steps 4 and 5 must not write them."""
    import torch.distributed as dist

    from megalite.engine.trainer import Trainer

    raw = tiny_config(f"{workdir}/tok", f"{workdir}/nanweights",
                      train={"steps": 8, "checkpoint_interval": 1, "max_consecutive_nonfinite": 2})
    trainer = Trainer(C.from_dict(raw))
    original = trainer.train_step

    def step(timer):
        result = original(timer)
        if trainer.step == 2 and dist.get_rank() == 1:  # step 3 (the counter moves after train_step returns)
            with torch.no_grad():
                next(iter(trainer.engine.module.parameters())).fill_(float("nan"))
        return result

    trainer.train_step = step
    code = trainer.train()
    return {"exit": code, "steps": [s for s, _ in trainer.checkpoints.store.committed_steps()]}


def test_nonfinite_weights_are_never_saved_as_last_good(workdir, capfd):
    for res in run_ranks(_nan_weights, 2, workdir, timeout_s=200, collective_timeout_s=60):
        assert res["exit"] == 76
        assert res["steps"] == [2, 1], res  # step 2 (before the NaN) stays the newest; steps 3 and 5 not saved


# ----------------------------------------------------------------------------- a full disk while saving


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")


def _full_disk(workdir: str, disk: str) -> dict:
    """Checkpoints on a 25 MB disk; each is about 19 MB. The first save fits. The second is refused before
    anything is written (the estimate against the free space); with the estimate out of the way, the third runs
    into the full disk while DeepSpeed writes, on rank 0 only at ZeRO-0 (rank 1 writes nothing): in the background
    at step 1, then in the synchronous save of step 2 that follows a failed background save."""
    from megalite.engine import preflight
    from megalite.engine.trainer import Trainer

    preflight.check_disk = lambda cfg: []  # the test wants the saves themselves to meet the full disk
    out = {}
    for case in ("estimate", "write"):
        ckpt_dir = f"{disk}/{case}" if case == "write" else disk
        raw = tiny_config(f"{workdir}/tok", f"{workdir}/fulldisk-{case}", train={
            "steps": 3, "checkpoint_interval": 1, "checkpoint_dir": ckpt_dir, "keep_checkpoints": 5})
        raw["model"].update(hidden_size=256, num_layers=2)  # 1.6M parameters: 19 MB per fp32 ZeRO-0 checkpoint
        trainer = Trainer(C.from_dict(raw))
        if case == "write":
            trainer.checkpoints.needed_bytes = 0
        try:
            trainer.train()
            error = "no error"
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        entries = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
        latest = Path(ckpt_dir) / "latest"
        out[case] = {"error": error, "entries": entries,
                     "latest": latest.read_text().strip() if latest.exists() else None}
    return out


def test_full_disk_during_save_is_a_clear_error_and_leaves_nothing(workdir, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    _mount_tmpfs(disk, "25m")
    try:
        results = run_ranks(_full_disk, 2, workdir, str(disk), timeout_s=200, collective_timeout_s=60)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    for res in results:
        before = res["estimate"]
        assert before["error"].startswith("CheckpointError: checkpoint save of step 2"), before["error"]
        assert "not enough free space" in before["error"] and "MiB free on" in before["error"]
        assert before["latest"] == "step00000001" and "step00000001" in before["entries"]
        during = res["write"]
        # Step 1's background write met the full disk; step 2 was then saved synchronously (the run does not lose
        # another interval silently), met it too, and every rank raised.
        assert during["error"].startswith("CheckpointError: checkpoint save of step 2"), during["error"]
        assert "No space left on device" in during["error"] or "unexpected pos" in during["error"], during["error"]
        for r in (before, during):
            assert "`latest` are unchanged" in r["error"]
            assert not [e for e in r["entries"] if e.startswith(".tmp-")], r["entries"]  # nothing half written
        assert during["latest"] is None and during["entries"] == []


def test_loss_plot_on_a_full_disk_warns_and_leaves_nothing(tmp_path, capsys):
    from megalite.engine.metrics import plot_losses

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "tiny"
    _mount_tmpfs(disk, "64k")
    try:
        (disk / "filler").write_bytes(b"x" * (60 << 10))
        plot_losses([{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 200)], disk / "loss.png")
        left = sorted(os.listdir(disk))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert left == ["filler"]
    assert "could not write the loss plot" in capsys.readouterr().err


# ----------------------------------------------------------------------------- messages


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megalite.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, **kw)


def test_latest_must_name_a_directory_inside_the_root(tmp_path):
    root = tmp_path / "ckpt"
    (root / "step00000001").mkdir(parents=True)
    (root / "latest").write_text("../../..\n")
    for action in ("verify", "list"):
        out = _cli("checkpoint", action, str(root))
        assert out.returncode == 2 and "not a checkpoint directory name" in out.stderr, out.stderr


def test_sigint_ends_with_a_line_not_a_traceback(tmp_path):
    # The command says when it runs (a file), and only then comes Ctrl-C: a fixed delay could land in the imports
    # before it on a loaded machine, where a traceback is Python's right answer.
    running = tmp_path / "running"
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys\nfrom megalite import cli\n"
                             "import megalite.commands.config as c\n"
                             f"c.main = lambda a: (open({str(running)!r}, 'w').close(), time.sleep(60), 0)[2]\n"
                             "sys.exit(cli.main(['config', 'check', 'x.json']))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    import time

    deadline = time.monotonic() + 60
    while not running.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_stored_config_that_disagrees_with_the_weights_is_a_checkpoint_error(identity, workdir, tmp_path):
    from megalite.checkpoint.manifest import manifest_body_hash

    source = Path(workdir) / "quarantine" / "checkpoints" / "step00000006"
    copy = tmp_path / "ckpt" / "step00000006"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["model"]["num_layers"] = 3
    manifest["body_sha256"] = manifest_body_hash(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = _cli("eval", "--checkpoint", str(copy))
    assert out.returncode == 2 and "the stored config does not match the weights" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_root_without_latest_resolves_to_its_newest_checkpoint(identity, workdir, tmp_path):
    """eval/generate/convert find a checkpoint root without `latest` as train does (the newest complete one)."""
    from megalite.checkpoint import resolve_checkpoint

    root = tmp_path / "root"
    shutil.copytree(Path(workdir) / "quarantine" / "checkpoints", root)
    (root / "latest").unlink()
    assert resolve_checkpoint(root) == root / "step00000006"
    out = _cli("eval", "--checkpoint", str(root), "--max-samples", "2")
    assert out.returncode == 0 and "step00000006" in json.loads(out.stdout)["checkpoint"], out.stderr[-2000:]
