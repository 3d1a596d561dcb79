"""Hung and slow ranks (issue 28), with real `megalite train` processes over gloo, one per rank as srun starts them.

- A rank SIGSTOPped mid-step (2 ranks: rank 1 in its forward of step 3; 4 ranks: rank 2 in its backward of step 3),
  during a checkpoint save (rank 0, the store's host, after every shard of step 4 was written, before the manifest)
  and during set-up (rank 1 building the model): every other rank exits with EXIT_HUNG within the hang timeout plus
  a small bound, having written its stacks and flight-recorder trace into the run directory and one line naming
  the stopped rank and its host into its log; the last committed checkpoint stays intact and verified; a restart
  resumes it and continues with exactly the losses of an uninterrupted run.
- A rank slowed by a fixed sleep each step: the straggler report names it within two log windows, nobody else is
  flagged, and the run (hang timeout 3 s, sleeps of 0.5 s) finishes: a slow rank is not a hung one.

Timeouts come from the config (3 s in steps; 20 s in set-up, the first step and checkpoints, which a loaded 2-core
machine needs for DeepSpeed's start). The jobs run in three lanes side by side, so the waits overlap.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megalite.engine.signals import EXIT_HUNG
from tests.helpers.distributed import free_port
from tests.helpers.engine_utils import tiny_config, write_token_dataset

REPO = Path(__file__).resolve().parent.parent
STEP_TIMEOUT_S = 3.0
LONG_TIMEOUT_S = 20.0  # DeepSpeed's start took 9 s with three lanes on a 2-core machine at load 20
EXIT_BOUND_S = 8.0  # after the timeout: polling, writing the diagnostics, waiting for the acknowledgements
STEPS = 8
HOST = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


class Job:
    """`world` ranks of `megalite train CONFIG`, each its own process with srun's view of the world."""

    def __init__(self, data: Path, name: str, world: int, env: dict[int, dict[str, str]] | None = None) -> None:
        self.dir = data / name
        self.out = self.dir / "out"
        self.dir.mkdir(exist_ok=True)
        raw = tiny_config(str(data / "tok"), str(self.out), train={
            "steps": STEPS, "checkpoint_interval": 2, "checkpoint_async": False, "hang_timeout_s": STEP_TIMEOUT_S,
            "hang_timeout_long_s": LONG_TIMEOUT_S})
        config = self.dir / "run.json"
        config.write_text(json.dumps(raw))
        port = free_port()
        self.procs, self.logs, self.exit_t = [], [], {}
        attempt = len(list(self.dir.glob("rank0-*.log")))
        for rank in range(world):
            log = self.dir / f"rank{rank}-{attempt}.log"
            self.logs.append(log)
            rank_env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            OMP_NUM_THREADS="1", TORCH_FR_BUFFER_SIZE="200", MEGALITE_HANG_FAULT_DIR=str(self.dir),
                            MEGALITE_CKPT_FAULT_DIR=str(self.dir), **(env or {}).get(rank, {}))
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "megalite.cli", "train", str(config)],
                                                   cwd=REPO, env=rank_env, stdout=f, stderr=subprocess.STDOUT))

    def wait(self, ranks: list[int], timeout_s: float = 150.0) -> dict[int, int | None]:
        """Exit codes of `ranks` (None: still running at the deadline), recording when each exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(r in self.exit_t for r in ranks):
            for r in ranks:
                if r not in self.exit_t and self.procs[r].poll() is not None:
                    self.exit_t[r] = time.monotonic()
            time.sleep(0.05)
        return {r: self.procs[r].returncode if r in self.exit_t else None for r in ranks}

    def wait_stopped(self, rank: int, marker: str, timeout_s: float = 120.0) -> tuple[float, float] | None:
        """When `rank` reached its fault point and when it stopped itself there (monotonic times), None if it never
        did."""
        path = self.dir / marker
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.procs[rank].poll() is None:
            if path.exists() and _state(self.procs[rank].pid) == "T":
                # The marker is written just before the stop: its modification time (wall clock) is the stop. It
                # records when the point was reached, the rank's last progress: a settling second (default) before
                # the stop, more on a loaded machine (the sleep's overshoot, the marker's fsync).
                reached = json.loads(path.read_text())["reached"]
                return tuple(time.monotonic() - (time.time() - t) for t in (reached, path.stat().st_mtime))
            time.sleep(0.05)
        return None

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


def _observe_hang(job: Job, stopped: int, marker: str, live: list[int]) -> dict:
    """Wait for a hang to play out and keep what the checks need (the stopped rank is left stopped)."""
    reached_at, stopped_at = job.wait_stopped(stopped, marker) or (None, None)
    codes = job.wait(live) if stopped_at is not None else {}
    folders = sorted((job.out / "hangs").iterdir()) if (job.out / "hangs").is_dir() else []
    # Taken now, while the rank is still stopped: once continued it may write its own report into the folder.
    stopped_wrote = [f.name for f in folders if (f / f"rank{stopped}-stacks.txt").exists()]
    return {"stopped_at": stopped_at, "stopped_wrote": stopped_wrote, "codes": codes, "logs": {r: job.log(r) for r in range(len(job.procs))},
            "waited": {r: job.exit_t[r] - stopped_at for r in codes if r in job.exit_t},
            "since_reached": {r: job.exit_t[r] - reached_at for r in codes if r in job.exit_t},
            "state": _state(job.procs[stopped].pid), "folders": folders, "records": job.records(),
            "stopped": stopped, "live": live}


def _latest(job: Job) -> dict:
    """`latest` of the run's checkpoints, the temporary folders beside it, and whether it verifies."""
    from megalite.checkpoint.manager import verify_checkpoint

    root = job.out / "checkpoints"
    latest = (root / "latest").read_text().strip()
    try:
        verify_checkpoint(str(root / latest))
        verified = "ok"
    except Exception as e:  # noqa: BLE001 - the message is the finding
        verified = f"{type(e).__name__}: {e}"
    return {"latest": latest, "verified": verified, "tmp": [p.name for p in root.iterdir() if p.name.startswith(".")]}


def _straggler_lane(data: Path) -> dict:
    """The uninterrupted run (rank 1 sleeping 0.5 s in each forward), then a rank stopped mid-step and the resume."""
    out: dict = {}
    straight = Job(data, "straggler", 2, env={1: {"MEGALITE_HANG_FAULT": "forward", "MEGALITE_HANG_FAULT_RANK": "1",
                                                  "MEGALITE_HANG_FAULT_ACTION": "sleep",
                                                  "MEGALITE_HANG_FAULT_SLEEP_S": "0.5"}})
    out["straight"] = {"codes": straight.wait([0, 1]), "records": straight.records(), "log": straight.log(0),
                       "hangs": (straight.out / "hangs").exists()}
    job = Job(data, "midstep", 2, env={1: {"MEGALITE_HANG_FAULT": "forward@3", "MEGALITE_HANG_FAULT_RANK": "1"}})
    try:
        out["hang"] = _observe_hang(job, 1, "hang-fault-rank1", [0])
        out["hang"]["checkpoint"] = _latest(job)
        # SIGCONT: the stopped rank finds its peer gone and ends by itself, quickly.
        job.procs[1].send_signal(signal.SIGCONT)
        out["continued"] = job.wait([1], timeout_s=STEP_TIMEOUT_S + 40)[1]
    finally:
        job.kill()
    again = Job(data, "midstep", 2)
    out["resumed"] = {"codes": again.wait([0, 1]), "records": again.records(), "log": again.log(0)}
    return out


def _checkpoint_lane(data: Path) -> dict:
    """Rank 0, the store's host, stopped during the save of step 4; then the restart."""
    out: dict = {}
    env = {0: {"MEGALITE_CKPT_FAULT": "before_manifest", "MEGALITE_CKPT_FAULT_RANK": "0",
               "MEGALITE_CKPT_FAULT_KILL": "stop", "MEGALITE_CKPT_FAULT_SKIP": "1"}}
    job = Job(data, "checkpoint", 2, env=env)
    try:
        out["hang"] = _observe_hang(job, 0, "fault-before_manifest-rank0", [1])
        out["hang"]["checkpoint"] = _latest(job)
    finally:
        job.kill()  # what the batch script does to a rank that never exits
    again = Job(data, "checkpoint", 2)
    out["resumed"] = {"codes": again.wait([0, 1]), "records": again.records(), "log": again.log(0)}
    return out


def _setup_lane(data: Path) -> dict:
    """A rank stopped while building the model; then 4 ranks, rank 2 stopped in its backward of step 3."""
    out: dict = {}
    setup = Job(data, "setup", 2, env={1: {"MEGALITE_HANG_FAULT": "building the model",
                                           "MEGALITE_HANG_FAULT_RANK": "1"}})
    try:
        out["setup"] = _observe_hang(setup, 1, "hang-fault-rank1", [0])
    finally:
        setup.kill()
    four = Job(data, "four", 4, env={2: {"MEGALITE_HANG_FAULT": "backward@3", "MEGALITE_HANG_FAULT_RANK": "2"}})
    try:
        out["four"] = _observe_hang(four, 2, "hang-fault-rank2", [0, 1, 3])
    finally:
        four.kill()
    return out


@pytest.fixture(scope="module")
def lanes(tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("watchdog")
    write_token_dataset(str(data / "tok"))
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(fn, data) for name, fn in (("straggler", _straggler_lane),
                                                                ("checkpoint", _checkpoint_lane),
                                                                ("setup", _setup_lane))}
        return {name: f.result() for name, f in futures.items()}


def _check_hang(obs: dict, timeout_s: float, where: str) -> dict:
    """Every live rank: EXIT_HUNG within the timeout plus the bound, one line naming the stopped rank, its stacks
    and flight-recorder trace; the stopped rank still stopped and silent. Returns the verdict."""
    stopped, live = obs["stopped"], obs["live"]
    assert obs["stopped_at"] is not None, f"rank {stopped} never reached its fault point:\n{obs['logs'][stopped][-3000:]}"
    assert obs["codes"] == {r: EXIT_HUNG for r in live}, {r: obs["logs"][r][-3000:] for r in live}
    for r in live:
        # Not before the timeout after the stopped rank's last progress, when it reached its fault point (from the
        # stop, a settling second later, it was 2.3 s of a 3 s timeout here and 19.2 s of a 20 s one, where rank 1
        # decides alone from its own progress, which may stand still while rank 0 finishes the save), less a slack
        # that still tells the step timeout from the long one; and not long after the stop.
        waited = (obs["since_reached"][r], obs["waited"][r])
        slack = max(1.0, 0.15 * timeout_s)
        assert timeout_s - slack < waited[0] and waited[1] < timeout_s + EXIT_BOUND_S, (r, waited,
                                                                                         obs["logs"][r][-2000:])
    assert obs["state"] == "T", "the stopped rank must still be stopped"
    assert len(obs["folders"]) == 1, obs["folders"]
    folder = obs["folders"][0]
    verdict = None
    for r in live:
        lines = [line for line in obs["logs"][r].splitlines() if "megalite: HANG" in line]
        assert len(lines) == 1, obs["logs"][r][-3000:]
        assert f"suspect: rank {stopped} on {HOST}" in lines[0] and f"exiting {EXIT_HUNG}" in lines[0], lines[0]
        assert f"last seen in {where}:" in lines[0] and str(folder) in lines[0], lines[0]
        stacks = (folder / f"rank{r}-stacks.txt").read_text()
        assert "megalite/engine/trainer.py" in stacks, stacks  # the training thread's frames, where it waits
        verdict = json.loads((folder / f"rank{r}.json").read_text())["verdict"]
        assert [(s["rank"], s["host"], s["silent"]) for s in verdict["suspects"]] == [(stopped, HOST, True)], verdict
        trace = pickle.loads((folder / f"fr_trace_rank_{r}").read_bytes())
        assert trace["entries"] and all(e["profiling_name"].startswith("gloo:") for e in trace["entries"])
    assert obs["stopped_wrote"] == [], obs["stopped_wrote"]  # a stopped process writes nothing
    assert (folder / "suspect-hosts").read_text() == f"{HOST}\n"
    return verdict


def _check_resumed(resumed: dict, straight: dict) -> None:
    assert resumed["codes"] == {0: 0, 1: 0}, resumed["log"][-3000:]
    assert "step00000002 at step 2" in resumed["log"], resumed["log"][-3000:]
    after = {s: loss for s, loss in _losses(resumed["records"]).items() if s > 2}
    assert sorted(after) == list(range(3, STEPS + 1))
    assert after == {s: loss for s, loss in _losses(straight["records"]).items() if s > 2}


def test_slow_rank_is_named_within_two_windows_and_not_killed(lanes):
    straight = lanes["straggler"]["straight"]
    assert straight["codes"] == {0: 0, 1: 0} and not straight["hangs"], straight["log"][-3000:]
    windows = [r for r in straight["records"] if r["kind"] == "stragglers"]
    assert [r["step"] for r in windows] == list(range(1, STEPS + 1))  # log_interval 1: a window per step
    table = [(r["step"], r["compute_s"], r["wait_s"], r["flagged"]) for r in windows]
    assert all(r["slowest_rank"] == 1 and r["fastest_rank"] == 0 and r["ratio"] > 1.5 for r in windows[1:]), table
    # The waiting: rank 0 waits for rank 1's sleep in its collectives, rank 1 waits least.
    assert all(r["wait_s"][1] < r["wait_s"][0] for r in windows[1:]), table
    assert sum(r["wait_s"][0] for r in windows) > 0.5 * 0.5 * STEPS, table  # rank 0 waited out most of the sleeps
    assert windows[1]["flagged"] == [1] and all(r["flagged"] in ([], [1]) for r in windows), table
    warnings = [line for line in straight["log"].splitlines() if "straggler: rank" in line]
    assert len(warnings) == 1 and "straggler: rank 1 on " + HOST in warnings[0], straight["log"][-3000:]
    assert "ending at step 2," in warnings[0] and "for 2 windows in a row" in warnings[0], warnings[0]
    assert [r["exit_code"] for r in straight["records"] if r["kind"] == "end"] == [0]


def test_rank_stopped_mid_step_is_named_and_the_run_resumes_exactly(lanes):
    lane = lanes["straggler"]
    hang = lane["hang"]
    _check_hang(hang, STEP_TIMEOUT_S, "forward of step 3")
    assert hang["checkpoint"] == {"latest": "step00000002", "verified": "ok", "tmp": []}
    (record,) = [r for r in hang["records"] if r["kind"] == "hang"]
    assert record["suspects"][0]["rank"] == 1 and record["exit_code"] == EXIT_HUNG
    assert record["dir"] == str(hang["folders"][0])
    assert lane["continued"] not in (None, 0), "after SIGCONT the stopped rank must end, with a failure"
    _check_resumed(lane["resumed"], lane["straight"])


def test_store_host_stopped_during_a_checkpoint_save_is_named_by_the_others(lanes):
    """Rank 0 hosts the rendezvous store: stopped, nothing answers; rank 1 decides alone, within the long timeout."""
    lane = lanes["checkpoint"]
    hang = lane["hang"]
    verdict = _check_hang(hang, LONG_TIMEOUT_S, "checkpoint after step 4")
    assert "stopped answering" in verdict["suspects"][0]["why"] and verdict["declared_by"] == 1, verdict
    # Step 4's shards are written, its manifest is not: `latest` still names step 2, which verifies.
    checkpoint = hang["checkpoint"]
    assert checkpoint["latest"] == "step00000002" and checkpoint["verified"] == "ok", checkpoint
    assert [name for name in checkpoint["tmp"] if "step00000004" in name], checkpoint
    _check_resumed(lane["resumed"], lanes["straggler"]["straight"])


def test_rank_stopped_in_set_up_is_named(lanes):
    _check_hang(lanes["setup"]["setup"], LONG_TIMEOUT_S, "set-up (building the model)")


def test_four_ranks_name_the_one_stopped_mid_step(lanes):
    hang = lanes["setup"]["four"]
    _check_hang(hang, STEP_TIMEOUT_S, "backward of step 3")
    header = json.loads((hang["folders"][0] / "rank3-stacks.txt").read_text().splitlines()[0])
    # Rank 3 waits in DeepSpeed's gradient all-reduce at the end of its backward.
    assert header["waiting_in"] == "all_reduce" and header["where"] == "backward of step 3", header
    from megalite.engine.watchdog import summarize

    summary = summarize(hang["folders"][0]).splitlines()
    assert "suspect rank 2 on " + HOST + ", last seen in backward of step 3" in summary[2], summary
    assert summary.count("rank 2: no diagnostics (a suspect that could not write, or a rank that left first)") == 1
    pending = [line for line in summary if "not completed" in line]
    # The three live ranks wait in the same gloo all-reduce of the gradients (29,696 parameters), none completed.
    assert len(pending) == 3 and len({line.split(": ", 1)[1] for line in pending}) == 1, summary
    assert "gloo:all_reduce [[29696]]" in pending[0], summary


# ----------------------------------------------------------------------------- the parts, in this process


def test_hang_settings_are_validated():
    from megalite import config as C
    from megalite.errors import ConfigError

    for train, fragment in (
            ({"hang_timeout_s": 60}, "train.hang_timeout_s: 60.0 s must be below train.collective_timeout_s=60"),
            ({"hang_timeout_long_s": 90}, "train.hang_timeout_long_s: 90.0 s must be below"),
            ({"hang_timeout_s": -1}, "train.hang_timeout_s: expected a number of seconds > 0"),
            ({"hang_timeout_s": 10, "hang_timeout_long_s": 5}, "train.hang_timeout_s: 10.0 s exceeds train."
                                                               "hang_timeout_long_s=5.0 s"),
            ({"straggler_margin": 0}, "train.straggler_margin: expected a fraction > 0"),
            ({"straggler_windows": 0}, "train.straggler_windows: expected an integer >= 1")):
        with pytest.raises(ConfigError) as e:
            C.from_dict(tiny_config("x", "y", train=train))
        assert fragment in str(e.value), str(e.value)
    C.from_dict(tiny_config("x", "y", train={"hang_timeout_s": 5, "hang_timeout_long_s": 50, "watchdog": False}))


def test_timeouts_derive_from_the_collective_timeout_and_the_step_time():
    from megalite.config import TrainConfig
    from megalite.engine.watchdog import HANG_FLOOR_S, Limits

    default = Limits.of(TrainConfig())
    assert default.step_s is None and default.long_s == pytest.approx(0.9 * 600)  # before the collective's 600 s
    assert default.poll_s == 5.0 and default.stale_s < HANG_FLOOR_S / 2
    short = Limits.of(TrainConfig(hang_timeout_s=3.0, hang_timeout_long_s=20.0, collective_timeout_s=60.0))
    assert (short.step_s, short.long_s) == (3.0, 20.0)
    assert short.poll_s == pytest.approx(0.3) and short.stale_s == 1.5  # half the shortest timeout at most


def test_store_check_reaches_a_store_and_names_one_that_does_not_answer():
    import datetime

    import torch.distributed as dist

    from megalite.engine.watchdog import check_store

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, world_size=1, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=5))
    ok, message = check_store(3, wait_s=10, address=("127.0.0.1", port))
    assert ok and message.startswith(f"rendezvous store 127.0.0.1:{port} reachable, round trip"), message
    assert server.get("megalite/watchdog/preflight/r3") == b"3"
    closed = free_port()
    ok, message = check_store(3, wait_s=1, address=("127.0.0.1", closed))
    assert not ok and f"the rendezvous store at 127.0.0.1:{closed} did not answer rank 3" in message, message


def test_straggler_rule_compares_within_a_stage_and_needs_persistence():
    from megalite.engine.stragglers import StragglerReport

    report = StragglerReport.__new__(StragglerReport)
    report.margin, report.windows, report._slow_for = 0.2, 2, {}
    report._hosts, report._stages = ["a", "a", "b", "b"], [0, 0, 1, 1]  # 2 pipeline stages of 2 ranks
    # Stage 1 computes more (the last stage's loss): not a straggler; rank 1 is, within stage 0.
    first = report._record(10, [1.0, 2.0, 3.0, 3.1], [2.0, 1.0, 0.1, 0.0])
    assert first["flagged"] == [] and first["slowest_rank"] == 3 and first["fastest_rank"] == 0
    assert first["ratio"] == pytest.approx(3.1)
    assert report._record(20, [1.0, 2.0, 3.0, 3.1], [2.0, 1.0, 0.1, 0.0])["flagged"] == [1]  # the second window
    assert report._record(30, [1.0, 1.01, 3.0, 3.1], [0, 0, 0, 0])["flagged"] == []  # caught up: count reset
    assert report._slow_for == {}
    # A window of milliseconds: 50% above the median is still noise below MIN_EXCESS_S.
    for step in (40, 50):
        assert report._record(step, [0.010, 0.015, 0.03, 0.03], [0, 0, 0, 0])["flagged"] == []
