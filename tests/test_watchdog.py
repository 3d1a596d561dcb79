"""Hung and slow ranks (issue 28), with real `megalite train` processes over gloo, one per rank as srun starts them.

- A rank SIGSTOPped mid-step (2 ranks: rank 1 before its forward of step 3; 4 ranks: rank 2 before its backward of
  step 3), during a checkpoint save (rank 0, the store's host, after every shard of step 4 was written, before the
  manifest) and during set-up (rank 1 building the model): every other rank exits with EXIT_HUNG within the hang
  timeout plus a small bound, having written its stacks and flight-recorder trace into the run directory and one
  line naming the stopped rank and its host into its log; the last committed checkpoint stays intact and verified;
  a restart resumes it and continues with exactly the losses of an uninterrupted run.
- A rank slowed by a fixed sleep each step: the straggler report names it within two log windows, nobody else is
  flagged, and the run (hang timeout 2 s, sleeps of 0.5 s) finishes: a slow rank is not a hung one.

Timeouts come from the config (2 s in steps, 4 s in set-up, the first step and checkpoints) so the whole module takes
about a minute and a half on two cores.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalite.engine.signals import EXIT_HUNG
from tests.distributed import free_port
from tests.engine_utils import tiny_config, write_token_dataset

REPO = Path(__file__).resolve().parent.parent
STEP_TIMEOUT_S = 2.0
LONG_TIMEOUT_S = 8.0
EXIT_BOUND_S = 8.0  # after the timeout: polling, writing the diagnostics, waiting for the acknowledgements
STEPS = 8
HOST = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("watchdog")
    write_token_dataset(str(d / "tok"))
    return d


class Job:
    """`world` ranks of `megalite train CONFIG`, each its own process with srun's view of the world."""

    def __init__(self, data: Path, name: str, world: int, env: dict[int, dict[str, str]] | None = None,
                 **train) -> None:
        self.dir = data / name
        self.out = self.dir / "out"
        self.dir.mkdir(exist_ok=True)
        raw = tiny_config(str(data / "tok"), str(self.out), train={
            "steps": STEPS, "checkpoint_interval": 2, "checkpoint_async": False, "hang_timeout_s": STEP_TIMEOUT_S,
            "hang_timeout_long_s": LONG_TIMEOUT_S, **train})
        config = self.dir / "run.json"
        config.write_text(json.dumps(raw))
        port = free_port()
        self.procs, self.logs, self.exit_t = [], [], {}
        self.start_t = time.monotonic()
        for rank in range(world):
            log = self.dir / f"rank{rank}-{len(list(self.dir.glob(f'rank{rank}-*.log')))}.log"
            self.logs.append(log)
            rank_env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            OMP_NUM_THREADS="1", TORCH_FR_BUFFER_SIZE="200", MEGALITE_HANG_FAULT_DIR=str(self.dir),
                            MEGALITE_CKPT_FAULT_DIR=str(self.dir), **(env or {}).get(rank, {}))
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "megalite.cli", "train", str(config)],
                                                   cwd=REPO, env=rank_env, stdout=f, stderr=subprocess.STDOUT))

    def wait(self, ranks: list[int], timeout_s: float = 120.0) -> dict[int, int]:
        """Exit codes of `ranks` (recording when each exited); a rank still running at the deadline fails the test."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for r in ranks:
                if r not in self.exit_t and self.procs[r].poll() is not None:
                    self.exit_t[r] = time.monotonic()
            if all(r in self.exit_t for r in ranks):
                return {r: self.procs[r].returncode for r in ranks}
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"ranks {[r for r in ranks if r not in self.exit_t]} still running after {timeout_s:.0f} s:\n"
                    + "\n".join(self.log(r)[-3000:] for r in ranks))

    def wait_stopped(self, rank: int, marker: str, timeout_s: float = 90.0) -> float:
        """Wait until `rank` stopped itself at its fault point; returns the monotonic time it did."""
        path = self.dir / marker
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists() and _state(self.procs[rank].pid) == "T":
                # The marker's modification time (wall clock) tells when the rank stopped.
                return time.monotonic() - (time.time() - path.stat().st_mtime)
            if self.procs[rank].poll() is not None:
                pytest.fail(f"rank {rank} exited before its fault point:\n{self.log(rank)[-3000:]}")
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"rank {rank} never reached its fault point ({marker}):\n{self.log(rank)[-3000:]}")

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def _hang(job: Job, stopped: int, marker: str, live: list[int], timeout_s: float) -> dict:
    """The common checks of a hang: exit codes and times, the one log line, the files in the hang folder."""
    stopped_at = job.wait_stopped(stopped, marker)
    codes = job.wait(live)
    assert codes == {r: EXIT_HUNG for r in live}, {r: job.log(r)[-3000:] for r in live}
    for r in live:
        waited = job.exit_t[r] - stopped_at
        # Not before the timeout (the monitor waited), and not long after it.
        assert timeout_s - 1.0 < waited < timeout_s + EXIT_BOUND_S, (r, waited, job.log(r)[-2000:])
    assert _state(job.procs[stopped].pid) == "T", "the stopped rank must still be stopped"
    folders = list((job.out / "hangs").iterdir())
    assert len(folders) == 1, folders
    folder = folders[0]
    for r in live:
        lines = [line for line in job.log(r).splitlines() if "megalite: HANG" in line]
        assert len(lines) == 1, job.log(r)[-3000:]
        assert f"suspect: rank {stopped} on {HOST}" in lines[0] and f"exiting {EXIT_HUNG}" in lines[0], lines[0]
        assert str(folder) in lines[0], lines[0]
        stacks = (folder / f"rank{r}-stacks.txt").read_text()
        assert "Current thread" in stacks or "Thread 0x" in stacks
        assert "megalite/engine/trainer.py" in stacks, stacks  # the training thread's frames, where it waits
        verdict = json.loads((folder / f"rank{r}.json").read_text())["verdict"]
        assert [s["rank"] for s in verdict["suspects"]] == [stopped], verdict
        assert verdict["suspects"][0]["host"] == HOST and verdict["suspects"][0]["silent"], verdict
        trace = pickle.loads((folder / f"fr_trace_rank_{r}").read_bytes())
        assert trace["entries"] and all("gloo:" in e["profiling_name"] for e in trace["entries"]), trace.keys()
    assert not (folder / f"rank{stopped}-stacks.txt").exists()  # a stopped process writes nothing
    assert (folder / "suspect-hosts").read_text() == f"{HOST}\n"
    return {"folder": folder, "stopped_at": stopped_at}


def _verify(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "megalite.cli", "checkpoint", "verify", str(root)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout) if out.stdout.strip().startswith("{") else {"text": out.stdout}


@pytest.fixture(scope="module")
def straight(data) -> Job:
    """The uninterrupted run, with rank 1 sleeping 0.5 s before each forward: a straggler, never a hang."""
    job = Job(data, "straggler", 2, env={1: {"MEGALITE_HANG_FAULT": "forward", "MEGALITE_HANG_FAULT_RANK": "1",
                                             "MEGALITE_HANG_FAULT_ACTION": "sleep",
                                             "MEGALITE_HANG_FAULT_SLEEP_S": "0.5"}})
    assert job.wait([0, 1]) == {0: 0, 1: 0}, job.log(0)[-3000:] + job.log(1)[-3000:]
    return job


def test_slow_rank_is_named_within_two_windows_and_not_killed(straight):
    records = straight.records()
    windows = [r for r in records if r["kind"] == "stragglers"]
    assert [r["step"] for r in windows] == list(range(1, STEPS + 1))  # log_interval 1: a window per step
    assert all(r["slowest_rank"] == 1 and r["fastest_rank"] == 0 for r in windows[1:]), windows
    assert all(r["ratio"] > 2.0 for r in windows[1:]), [r["ratio"] for r in windows]
    # The waiting: rank 0 waits for rank 1's sleep in its collectives, rank 1 waits least.
    assert all(r["wait_s"][0] > 0.25 and r["wait_s"][1] < 0.1 for r in windows[1:]), windows
    assert windows[1]["flagged"] == [1] and all(r["flagged"] in ([], [1]) for r in windows)
    assert all(0 not in r["flagged"] for r in windows)
    warnings = [line for line in straight.log(0).splitlines() if "straggler: rank" in line]
    assert len(warnings) == 1 and "straggler: rank 1 on " + HOST in warnings[0], straight.log(0)[-3000:]
    assert "ending at step 2," in warnings[0] and "for 2 windows in a row" in warnings[0], warnings[0]
    assert not [line for line in straight.log(0).splitlines() if "straggler: rank 0" in line]
    assert not (straight.out / "hangs").exists()
    assert [r["exit_code"] for r in records if r["kind"] == "end"] == [0]


def test_rank_stopped_mid_step_is_named_and_the_run_resumes_exactly(data, straight):
    job = Job(data, "midstep", 2, env={1: {"MEGALITE_HANG_FAULT": "forward@3", "MEGALITE_HANG_FAULT_RANK": "1"}})
    try:
        hang = _hang(job, 1, "hang-fault-rank1", [0], STEP_TIMEOUT_S)
        # The checkpoint of step 2 was committed before the stop and is intact.
        assert (job.out / "checkpoints" / "latest").read_text().strip() == "step00000002"
        _verify(job.out / "checkpoints")
        records = job.records()
        (hang_record,) = [r for r in records if r["kind"] == "hang"]
        assert hang_record["suspects"][0]["rank"] == 1 and hang_record["exit_code"] == EXIT_HUNG
        assert hang_record["dir"] == str(hang["folder"])
        # SIGCONT: the stopped rank finds its peer gone and ends by itself, quickly.
        job.procs[1].send_signal(signal.SIGCONT)
        (code,) = job.wait([1], timeout_s=STEP_TIMEOUT_S + 30).values()
        assert code != 0, job.log(1)[-3000:]
    finally:
        job.kill()
    again = Job(data, "midstep", 2)
    assert again.wait([0, 1]) == {0: 0, 1: 0}, again.log(0)[-3000:]
    assert "resumed from" in again.log(0) and "step00000002 at step 2" in again.log(0)
    after = {s: loss for s, loss in _losses(again.records()).items() if s > 2}
    assert after == {s: loss for s, loss in _losses(straight.records()).items() if s > 2}


def test_store_host_stopped_during_a_checkpoint_save_is_named_by_the_others(data, straight):
    """Rank 0 hosts the rendezvous store: stopped, nothing answers; rank 1 decides alone, within the long timeout."""
    env = {0: {"MEGALITE_CKPT_FAULT": "before_manifest", "MEGALITE_CKPT_FAULT_RANK": "0",
               "MEGALITE_CKPT_FAULT_KILL": "stop", "MEGALITE_CKPT_FAULT_SKIP": "1"}}
    job = Job(data, "checkpoint", 2, env=env)
    try:
        _hang(job, 0, "fault-before_manifest-rank0", [1], LONG_TIMEOUT_S)
        line = next(line for line in job.log(1).splitlines() if "megalite: HANG" in line)
        assert "last seen in checkpoint after step 4" in line and "stopped answering" in line, line
        # Step 4's shards are written, its manifest is not: `latest` still names step 2, which verifies.
        root = job.out / "checkpoints"
        assert (root / "latest").read_text().strip() == "step00000002"
        assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")], sorted(os.listdir(root))
        _verify(root)
    finally:
        job.kill()  # what the batch script does to a rank that never exits
    again = Job(data, "checkpoint", 2)
    assert again.wait([0, 1]) == {0: 0, 1: 0}, again.log(0)[-3000:]
    assert "step00000002 at step 2" in again.log(0)
    after = {s: loss for s, loss in _losses(again.records()).items() if s > 2}
    assert after == {s: loss for s, loss in _losses(straight.records()).items() if s > 2}


def test_rank_stopped_in_set_up_and_four_ranks_mid_step(data):
    """Both jobs at once: one waits out its set-up timeout while the other trains."""
    setup = Job(data, "setup", 2, env={1: {"MEGALITE_HANG_FAULT": "building the model",
                                           "MEGALITE_HANG_FAULT_RANK": "1"}})
    four = Job(data, "four", 4, env={2: {"MEGALITE_HANG_FAULT": "backward@3", "MEGALITE_HANG_FAULT_RANK": "2"}})
    try:
        _hang(setup, 1, "hang-fault-rank1", [0], LONG_TIMEOUT_S)
        line = next(line for line in setup.log(0).splitlines() if "HANG" in line)
        assert "last seen in set-up (building the model)" in line, line
        hang = _hang(four, 2, "hang-fault-rank2", [0, 1, 3], STEP_TIMEOUT_S)
        line = next(line for line in four.log(3).splitlines() if "HANG" in line)
        assert "last seen in backward of step 3" in line, line
        stacks = (hang["folder"] / "rank3-stacks.txt").read_text()
        header = json.loads(stacks.splitlines()[0])
        # Rank 3 waits in DeepSpeed's gradient all-reduce at the end of its backward.
        assert header["waiting_in"] == "all_reduce" and header["where"] == "backward of step 3", header
    finally:
        setup.kill()
        four.kill()
