"""Failures the training loop must survive: preemption signals, non-finite losses, a failing rank,
and exact resume through megalite's checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megalite import config as C
from megalite.engine.signals import EXIT_NONFINITE, EXIT_PREEMPTED
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import tiny_config, write_token_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("reliability")
    write_token_dataset(str(d / "tok"))
    return str(d)


def _param_checksum(run) -> str:
    """A digest of every bit of this rank's training state: the module's parameters and the optimizer's tensors
    (its parameters, the fp32 master partitions under ZeRO, and their Adam moments)."""
    import hashlib

    h = hashlib.sha256()

    def add(t: torch.Tensor) -> None:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    for p in run.engine.module.parameters():
        add(p)
    opt = run.engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps a torch optimizer holding the fp32 partitions
    for group in inner.param_groups:
        for p in group["params"]:
            add(p)
            for value in inner.state.get(p, {}).values():
                if torch.is_tensor(value):
                    add(value)
    return h.hexdigest()


def _full_weights(run) -> dict[str, torch.Tensor]:
    from megalite.model import full_state_dict, tensor_parallel_group

    return {k: v.detach().clone() for k, v in full_state_dict(run.engine.module, tensor_parallel_group(run.grid)).items()}


def _train(workdir: str, name: str, steps: int, hook=None, **sections) -> dict:
    """One Run; `hook(run, step_about_to_run)` may act before each step. Returns what the test needs, with the token
    rows of every sample this rank read for training ("samples")."""
    from megalite.data import BatchStream
    from megalite.engine.trainer import Trainer

    train = {"steps": steps, **sections.pop("train", {})}
    raw = tiny_config(f"{workdir}/tok", f"{workdir}/{name}", train=train, **sections)
    # A schedule whose every step has a learning rate > 0 (DeepSpeed's cosine warm-up gives the first step 0), so
    # "the weights changed" tells an applied step from a skipped one.
    raw["deepspeed"]["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 2, "warmup_min_lr": 0.002,
                                                                    "warmup_max_lr": 0.01, "warmup_type": "linear"}}
    cfg = C.from_dict(raw)
    run = Trainer(cfg)
    trace: list[dict] = []
    last_good: dict = {}
    original = run.train_step

    def traced(timer):
        if hook is not None:
            hook(run, run.step + 1)
        before = _param_checksum(run)
        loss, skipped = original(timer)
        trace.append({"step": run.step + 1, "loss": loss, "skipped": skipped, "before": before,
                      "after": _param_checksum(run)})
        if not skipped and run.cfg.parallel.pipeline == 1:
            last_good["weights"] = _full_weights(run)
        return loss, skipped

    run.train_step = traced
    samples: list[list[int]] = []
    next_batch = BatchStream.__next__

    def recorded(stream):  # the samples training reads (the evaluator has its own stream: not counted)
        batch = next_batch(stream)
        if stream is run.batches:
            samples.extend(batch["input_ids"].tolist())
        return batch

    BatchStream.__next__ = recorded
    try:
        code = run.train()
    finally:
        BatchStream.__next__ = next_batch
    metrics = Path(run.output_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    saved_equal = None
    steps = [s for s, _ in run.checkpoints.store.committed_steps()]
    if code == EXIT_NONFINITE and steps and "weights" in last_good:  # the "last good" save against the weights
        from megalite.checkpoint.consolidate import load_full_weights

        _, saved, _ = load_full_weights(run.checkpoints.store.root)
        saved_equal = all(torch.equal(saved[k], v.float()) for k, v in last_good["weights"].items())
    return {"exit": code, "trace": trace, "step": run.step, "skipped": run.nonfinite_skipped,
            # optimizer steps applied (DeepSpeed counts a step it refused in both numbers)
            "global_steps": run.engine.global_steps - run.engine.skipped_steps,
            "checkpoints": steps, "nonfinite_logged": [r["step"] for r in records if r.get("kind") == "nonfinite"],
            "saved_equals_last_good": saved_equal,
            "signal": run.preemption.received,  # the signal this rank's handler caught, if any
            "samples": samples}


def _nan_on_rank_one(at_steps: set[int]):
    def hook(run, step):
        if torch.distributed.get_rank() == 1 and step in at_steps and not getattr(run, "_nan_hooked", False):
            run._nan_hooked = True
            run._nan_handle = run.engine.module.register_forward_hook(lambda m, i, out: out * float("nan"))
        elif getattr(run, "_nan_hooked", False) and step not in at_steps:
            run._nan_handle.remove()
            run._nan_hooked = False
    return hook


def _nan_grad_on_rank_one(at_step: int):
    def hook(run, step):
        if torch.distributed.get_rank() == 1 and step == at_step:
            weight = next(p for p in run.engine.module.parameters() if p.ndim == 2)
            handle = weight.register_hook(lambda g: g * float("nan"))
            run._grad_handle = handle
        elif getattr(run, "_grad_handle", None) is not None:
            run._grad_handle.remove()
            run._grad_handle = None
    return hook


def _signal_rank_one_at(step_to_signal: int, sig: signal.Signals):
    def hook(run, step):
        if torch.distributed.get_rank() == 1 and step == step_to_signal:
            signal.raise_signal(sig)  # handled by megalite: sets the flag only (the default would kill)
    return hook


# Which preemption signal each stop-and-resume case sends: SIGTERM (scancel, preemption) and SIGUSR1 (the
# batch scripts' warning before the time limit) take the same path; each is covered by dense and parallel cases.
STOP_SIGNALS = {1: signal.SIGTERM, 2: signal.SIGUSR1, 3: signal.SIGTERM, "tp2": signal.SIGUSR1, "pp2": signal.SIGTERM}


def _failure_scenarios(workdir: str) -> dict:
    out = {}
    # A NaN loss on one rank at step 3: every rank skips that step, weights and optimizer untouched.
    out["skip"] = _train(workdir, "skip", 5, _nan_on_rank_one({3}), train={"nonfinite": "skip"})
    # A finite loss whose gradient is not finite (on rank 1 only), at ZeRO-0 (megalite's check) and ZeRO-2
    # (DeepSpeed's optimizer refuses it): skipped on every rank just the same.
    for stage in (0, 2):
        out[f"grad_skip{stage}"] = _train(workdir, f"grad-skip{stage}", 5, _nan_grad_on_rank_one(3),
                                          deepspeed={"zero_optimization": {"stage": stage}})
    # Policy fail: the first non-finite step saves the last good weights (as step 3) and exits 76.
    out["fail"] = _train(workdir, "fail", 5, _nan_on_rank_one({3}), train={"nonfinite": "fail"})
    # Skip, but the NaN persists: after max_consecutive_nonfinite steps, save and exit 76.
    out["persist"] = _train(workdir, "persist", 8, _nan_on_rank_one({3, 4, 5, 6, 7, 8}),
                            train={"nonfinite": "skip", "max_consecutive_nonfinite": 2})
    # A rank that fails while building the data: every rank ends with its error, fast.
    import megalite.engine.trainer as dataset_module  # where the trainer looks build_datasets up

    real = dataset_module.build_datasets

    def broken(*args, **kwargs):
        if torch.distributed.get_rank() == 1:
            raise OSError("disk on fire (injected)")
        return real(*args, **kwargs)

    dataset_module.build_datasets = broken
    start = time.monotonic()
    try:
        _train(workdir, "broken", 3)
        out["broken"] = "no error"
    except Exception as e:  # noqa: BLE001
        out["broken"] = f"{type(e).__name__}: {e}"
    finally:
        dataset_module.build_datasets = real
    out["broken_seconds"] = time.monotonic() - start
    # SIGTERM or SIGUSR1 (STOP_SIGNALS) to rank 1 only at step 3: all ranks save at step 3 and exit 75; a resume
    # finishes the run with the same losses as an uninterrupted one (exact resume, RNG and data position included).
    for stage in (1, 2, 3):
        ds = {"zero_optimization": {"stage": stage}}
        straight = _train(workdir, f"straight{stage}", 6, deepspeed=ds, model={"hidden_dropout": 0.1})
        stopped = _train(workdir, f"resumed{stage}", 6, _signal_rank_one_at(3, STOP_SIGNALS[stage]), deepspeed=ds,
                         model={"hidden_dropout": 0.1})
        resumed = _train(workdir, f"resumed{stage}", 6, deepspeed=ds, model={"hidden_dropout": 0.1})
        out[f"zero{stage}"] = {"straight": straight, "stopped": stopped, "resumed": resumed}
    # The same for tensor parallelism and for the pipeline engine (pipeline runs last: DeepSpeed cannot build a
    # plain engine in a process that has built a PipelineModule).
    for name, parallel in (("tp2", {"tensor": 2}), ("pp2", {"pipeline": 2})):
        ds = {"zero_optimization": {"stage": 1}}
        straight = _train(workdir, f"straight-{name}", 6, deepspeed=ds, parallel=parallel, model={"hidden_dropout": 0.1})
        stopped = _train(workdir, f"resumed-{name}", 6, _signal_rank_one_at(3, STOP_SIGNALS[name]), deepspeed=ds,
                         parallel=parallel, model={"hidden_dropout": 0.1})
        resumed = _train(workdir, f"resumed-{name}", 6, deepspeed=ds, parallel=parallel, model={"hidden_dropout": 0.1})
        out[name] = {"straight": straight, "stopped": stopped, "resumed": resumed}
    # A step skipped for a NaN (rank 1, step 3), a preemption save at step 4 and a resume: the data position counts the
    # skipped step's batch as read, so the resumed run reads neither it again nor skips any other.
    nan_then_stop = _nan_on_rank_one({3})

    def nan_and_signal(run, step):
        nan_then_stop(run, step)
        _signal_rank_one_at(4, signal.SIGTERM)(run, step)

    out["skip_resume"] = {"straight": _train(workdir, "skip-straight", 6, _nan_on_rank_one({3})),
                          "stopped": _train(workdir, "skip-resume", 6, nan_and_signal),
                          "resumed": _train(workdir, "skip-resume", 6)}
    # A NaN on the last pipeline stage: train_batch runs the whole step, DeepSpeed's ZeRO-1 refuses it.
    out["pp_skip"] = _train(workdir, "pp-skip", 5, _nan_on_rank_one({3}), train={"nonfinite": "skip"},
                            parallel={"pipeline": 2}, deepspeed={"zero_optimization": {"stage": 1}})
    return out


def test_failures_on_one_rank_reach_every_rank(workdir):
    results = run_ranks(_failure_scenarios, 2, workdir, timeout_s=500, collective_timeout_s=60)
    for rank, r in enumerate(results):
        skip = r["skip"]
        assert skip["exit"] == 0 and skip["skipped"] == 1 and skip["step"] == 5
        assert skip["global_steps"] == 4, "the skipped step must not reach the optimizer"
        third = skip["trace"][2]
        # A skipped step leaves every bit of the state as it was: weights, master weights and Adam moments.
        assert third["skipped"] and third["after"] == third["before"], "state changed in a skipped step"
        assert all(t["after"] != t["before"] for t in skip["trace"] if not t["skipped"])
        if rank == 0:
            assert skip["nonfinite_logged"] == [3], "the skip must be in metrics.jsonl"
        if rank == 0:
            assert all(t["loss"] == t["loss"] for t in skip["trace"] if not t["skipped"])  # finite after the skip

        for stage in (0, 2):
            g = r[f"grad_skip{stage}"]
            assert g["exit"] == 0 and g["skipped"] == 1 and g["global_steps"] == 4, (stage, g)
            assert g["trace"][2]["skipped"] and g["trace"][2]["after"] == g["trace"][2]["before"], stage
            if rank == 0:
                assert all(math.isfinite(t["loss"]) for i, t in enumerate(g["trace"]) if i != 2)
        fail = r["fail"]
        assert fail["exit"] == EXIT_NONFINITE and fail["step"] == 3 and fail["checkpoints"] == [3]
        assert fail["global_steps"] == 2 and fail["trace"][-1]["after"] == fail["trace"][-1]["before"]
        assert fail["saved_equals_last_good"] is True  # the saved weights are exactly those after step 2
        persist = r["persist"]
        assert persist["exit"] == EXIT_NONFINITE and persist["skipped"] == 2 and persist["checkpoints"] == [4]
        assert persist["global_steps"] == 2 and persist["saved_equals_last_good"] is True
        if rank == 0:
            assert fail["nonfinite_logged"] == [3] and persist["nonfinite_logged"] == [3, 4]

        pp_skip = r["pp_skip"]
        assert pp_skip["exit"] == 0 and pp_skip["skipped"] == 1 and pp_skip["global_steps"] == 4
        assert pp_skip["trace"][2]["skipped"] and pp_skip["trace"][2]["after"] == pp_skip["trace"][2]["before"]
        for stage in (1, 2, 3, "tp2", "pp2"):
            case = r[f"zero{stage}"] if isinstance(stage, int) else r[stage]
            assert case["stopped"]["exit"] == EXIT_PREEMPTED and case["stopped"]["step"] == 3
            assert case["stopped"]["checkpoints"] == [3]
            # Rank 1 caught the signal; rank 0 caught none and stopped at the same boundary (the agreement).
            assert case["stopped"]["signal"] == (STOP_SIGNALS[stage].name if rank == 1 else None), stage
            assert case["straight"]["signal"] is None and case["resumed"]["signal"] is None
            assert case["resumed"]["exit"] == 0 and case["resumed"]["step"] == 6
            assert [t["step"] for t in case["resumed"]["trace"]] == [4, 5, 6]
            if rank == 0:
                straight = [t["loss"] for t in case["straight"]["trace"]]
                joined = [t["loss"] for t in case["stopped"]["trace"] + case["resumed"]["trace"]]
                assert joined == straight, f"ZeRO-{stage}: resumed losses differ: {joined} vs {straight}"

        skip_resume = r["skip_resume"]
        straight, stopped, resumed = (skip_resume[k] for k in ("straight", "stopped", "resumed"))
        assert stopped["exit"] == EXIT_PREEMPTED and stopped["step"] == 4 and stopped["skipped"] == 1
        assert resumed["exit"] == 0 and [t["step"] for t in resumed["trace"]] == [5, 6]
        # Every sample the straight run read, read exactly once across the stop and the resume.
        assert stopped["samples"] + resumed["samples"] == straight["samples"], "the data position after a skip"
        if rank == 0:
            joined = [t["loss"] for t in stopped["trace"] + resumed["trace"]]
            straight_losses = [t["loss"] for t in straight["trace"]]
            assert [x for x in joined if x == x] == [x for x in straight_losses if x == x]  # NaN: the skipped step
            assert math.isnan(joined[2]) and math.isnan(straight_losses[2])

        assert "disk on fire (injected)" in r["broken"], r["broken"]
        assert "rank" in r["broken"] or rank == 1
        assert r["broken_seconds"] < 30


def _cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megalite.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **popen)


def test_resume_must_with_nothing_exits_nonzero(workdir, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_config(f"{workdir}/tok", str(tmp_path / "out"), train={"resume": "must"})))
    out = _cli("train", str(path))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "resume" in out.stderr and "must" in out.stderr


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_sigterm_to_torchrun_saves_and_leaves_no_orphans(workdir, tmp_path):
    """SIGTERM to torchrun reaches both workers, which save at a step boundary; nothing is left running."""
    out_dir = tmp_path / "torchrun-run"
    path = tmp_path / "torchrun.json"
    path.write_text(json.dumps(tiny_config(f"{workdir}/tok", str(out_dir), train={"steps": 500})))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
                             "megalite.cli", "train", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    end = [r for r in records if r["kind"] == "end"]
    assert end and end[0]["exit_code"] == EXIT_PREEMPTED, output[-3000:]
    saved = [r for r in records if r["kind"] == "checkpoint"]
    assert saved and saved[-1]["step"] == end[0]["step"] < 500
    time.sleep(1)
    assert not _processes_mentioning(str(path)), "orphaned worker processes"


def _free_port() -> int:
    from tests.helpers.distributed import free_port

    return free_port()


def test_missing_metrics_package_is_a_clear_error_on_every_rank(workdir, tmp_path):
    """TensorBoard asked for but not installed: exit 2 with the key named, not a hang of the other rank."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_config(f"{workdir}/tok", str(tmp_path / "out"),
                                           train={"logging": {"tensorboard_dir": "tb"}})))
    torchrun = Path(sys.executable).parent / "torchrun"
    start = time.monotonic()
    out = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
                          "megalite.cli", "train", str(path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode != 0
    assert out.stderr.count("train.logging.tensorboard_dir") >= 2, out.stderr[-3000:]  # both ranks say why
    assert time.monotonic() - start < 120


def _catching_sigterm(pids: list[int]) -> list[int]:
    """The Python processes among `pids` that catch SIGTERM (a handler installed: bit 15 of SigCgt)."""
    found = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if comm.startswith("python") and caught >> (signal.SIGTERM - 1) & 1:
            found.append(pid)
    return found


def _start_and_signal(command: list[str], delay_s: float, env: dict, ranks_of: str | None = None) -> subprocess.Popen:
    """Start `command` in its own process group and send SIGTERM `delay_s` after it ran its first line (megalite
    catches the signal from there on; before it, the interpreter is still starting and death by the signal is
    Python's answer): to the process; or, with `ranks_of` (a launcher's config path), `delay_s` after both of its
    Python ranks ran theirs, to the whole group (as `scancel` signals every process of a job step)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    if ranks_of is None:
        # About 0.03 s after the start on an idle machine, 0.3 s beside 4 busy processes on 2 cores: a fixed delay
        # from the start could land before it.
        while not _catching_sigterm([proc.pid]) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        return proc
    # Until both Python ranks run their first line. Only the ranks count: the shells trap TERM too, and the deepspeed
    # launcher's own Python process (launch.py, whose command line carries the config path) catches it as well.
    def ranks() -> list[int]:
        return sorted(set(_processes_mentioning(ranks_of)) & set(_processes_mentioning("megalite.commands.rank")))

    while len(_catching_sigterm(ranks())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGTERM)
    return proc


def test_preemption_at_any_moment_of_startup_requeues(workdir, tmp_path):
    """SIGTERM from the first moments of `megalite train` (imports, set-up, resume) to its first steps: exit 75 (the
    batch scripts requeue it), never death by the signal (143). Plain `megalite train` at several moments after its
    first line; under torchrun and the deepspeed launcher (each rank through slurm/rank.sh, as the batch scripts run them)
    the signal goes to every process, as scancel sends it, 0.1 s after the ranks' first line."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}  # rank.sh runs `python` from PATH
    runs: dict[str, tuple[subprocess.Popen, Path | None]] = {}
    for delay in (0.3, 1.5, 3.0):
        path = tmp_path / f"plain-{delay}.json"
        path.write_text(json.dumps(tiny_config(f"{workdir}/tok", str(tmp_path / f"plain-{delay}"),
                                               train={"steps": 1000})))
        runs[f"plain@{delay}s"] = (_start_and_signal([sys.executable, "-m", "megalite.cli", "train", str(path)],
                                                     delay, env), None)
    rank_sh = REPO / "megalite" / "slurm" / "rank.sh"
    launchers = {
        "torchrun": [str(bindir / "torchrun"), "--nproc-per-node", "2", "--max-restarts", "0", "--master-port",
                     str(_free_port()), "--no-python", str(rank_sh)],
        "deepspeed": [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--no_python",
                      "--no_local_rank", str(rank_sh)],
    }
    for name, launcher in launchers.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(tiny_config(f"{workdir}/tok", str(tmp_path / name), train={"steps": 1000})))
        state = tmp_path / f"{name}-state"
        state.mkdir()
        runs[name] = (_start_and_signal([*launcher, "train", str(path)], 0.1, {**env, "MEGALITE_STATE_DIR": str(state)},
                                        ranks_of=str(path)), state)
    for name, (proc, state) in runs.items():
        output, _ = proc.communicate(timeout=180)
        if state is None:
            assert proc.returncode == EXIT_PREEMPTED, (name, proc.returncode, output[-3000:])
        else:  # a launcher's own code is not the ranks' (torchrun reports 75 as 1): each rank leaves its own
            deadline = time.monotonic() + 60  # the deepspeed runner dies of the signal; its ranks finish on their own
            while len(list(state.glob("rank-*.rc"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            codes = sorted(int(p.read_text()) for p in state.glob("rank-*.rc"))
            assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], (name, codes, output[-3000:])
