"""Local rank processes are supervised (issue 30 item 13): a rank that dies ends the others within seconds, naming
it, instead of leaving them in a 10-minute rendezvous; a parent that is killed (SIGKILL, SIGTERM, Ctrl-C) leaves no
rank behind that could commit output later. With real processes: `megalite.local_ranks.spawn_local_ranks` under a
small parent script, and the real `megalite checkpoint reshard` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent

# The parent: spawn_local_ranks over one of the targets below; prints its answer as JSON.
PARENT = """
import json, sys
from megalite.local_ranks import spawn_local_ranks
import tests.test_local_ranks as t
values, failures, codes = spawn_local_ranks(getattr(t, sys.argv[1]), 2, *sys.argv[2:])
print(json.dumps({"values": values, "failures": failures, "codes": codes}))
"""


def _dies_before_joining(rank: int, world: int, port: int, folder: str, results) -> None:  # noqa: ANN001
    """Rank 0 enters the rendezvous, where it would wait 10 minutes for rank 1; rank 1 is killed first."""
    joining = Path(folder, "rank0-joining")
    if rank == 1:
        while not joining.exists():
            time.sleep(0.02)
        time.sleep(0.5)  # rank 0 is inside init_process_group now
        os.kill(os.getpid(), signal.SIGKILL)
    import torch.distributed as dist

    joining.write_text("")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    results.put(("ok", rank, "joined"))


def _commits_later(rank: int, world: int, port: int, folder: str, results) -> None:  # noqa: ANN001
    """Says it started, then 'commits' 2 s after every rank started (a rank that outlives its parent would). Counted
    from the last start, when the test signals the parent: a rank that started first (by a second under load) would
    otherwise leave the parent less than 2 s to stop it."""
    Path(folder, f"started-{rank}").write_text(str(os.getpid()))
    while len(list(Path(folder).glob("started-*"))) < world:
        time.sleep(0.01)
    time.sleep(2)
    Path(folder, f"committed-{rank}").write_text("")
    results.put(("ok", rank, "committed"))


def _raises(rank: int, world: int, port: int, folder: str, results) -> None:  # noqa: ANN001
    """Rank 1 fails on a bug (its target catches nothing); rank 0 waits to be stopped."""
    if rank == 1:
        {}["missing key " + Path(folder).name]
    time.sleep(60)


def _env(tmp: Path | None = None) -> dict:
    """The children's environment; TMPDIR `tmp` keeps what a SIGKILLed parent cannot remove (its results folder)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return env if tmp is None else {**env, "TMPDIR": str(tmp)}


def _rank_processes(parent: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in parent.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _wait_until(condition, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def test_a_dead_rank_ends_every_rank_within_seconds(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", PARENT, "_dies_before_joining", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env=_env())
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.splitlines()[-1])
    assert answer["values"] == {}, answer
    assert answer["codes"][1] == -signal.SIGKILL and answer["codes"][0] < 0, answer  # rank 0 was stopped
    failures = answer["failures"]
    assert failures[0].startswith("rank 1 (pid ") and "killed by SIGKILL" in failures[0], failures
    assert failures[1] == "rank 0 stopped after rank 1 failed", failures
    assert (tmp_path / "rank0-joining").exists()
    # Spawning and importing only (2.4 s idle, 7 s beside 4 busy processes on 2 cores): rank 0 alone would wait 10
    # minutes.
    assert seconds < 60, seconds


def test_an_exception_in_a_rank_is_reported_by_the_parent(tmp_path):
    """A rank's exception reaches the parent as its failure, with the end of its traceback (the target catches
    nothing itself); a megalite error (bad input) by its message alone."""
    from megalite.errors import ConfigError
    from megalite.local_ranks import failure_message

    out = subprocess.run([sys.executable, "-c", PARENT, "_raises", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.splitlines()[-1])
    assert answer["values"] == {} and answer["codes"][1] == 1 and answer["codes"][0] < 0, answer
    failure, stopped = answer["failures"]
    assert failure.startswith("rank 1 (pid ") and f"KeyError: 'missing key {tmp_path.name}'" in failure, failure
    assert "Traceback" in failure and "in _raises" in failure and stopped == "rank 0 stopped after rank 1 failed"
    assert failure_message(ConfigError("train.steps: must be > 0, got -1")) == \
        "ConfigError: train.steps: must be > 0, got -1"


def test_a_killed_parent_leaves_no_rank_behind(tmp_path):
    for how in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        folder = tmp_path / how.name
        folder.mkdir()
        parent = subprocess.Popen([sys.executable, "-c", PARENT, "_commits_later", str(folder)], cwd=REPO,
                                  env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _wait_until(lambda f=folder: len(list(f.glob("started-*"))) == 2, 60, "both ranks to start")
            started = time.monotonic()
            ranks = _rank_processes(psutil.Process(parent.pid))
            assert len(ranks) == 2, ranks
            parent.send_signal(how)
            gone, alive = psutil.wait_procs(ranks, timeout=30)  # at once, unless they outlive their parent
            assert not alive, (how.name, alive)
            parent.wait(timeout=10)
        finally:
            parent.kill()
            parent.wait()
        time.sleep(max(0.0, started + 3 - time.monotonic()))  # past the moment a surviving rank would commit
        assert not list(folder.glob("committed-*")), how.name


def test_the_reshard_command_fails_fast_naming_a_dead_rank(tmp_path):
    """`megalite checkpoint reshard` into TP2: one of its two ranks is killed while it starts up; the command ends
    within seconds, naming that rank, with no rank left and no checkpoint committed."""
    from tests.helpers.engine_utils import tiny_config, write_token_dataset

    write_token_dataset(str(tmp_path / "tok"))
    (tmp_path / "run.json").write_text(json.dumps(tiny_config(str(tmp_path / "tok"), str(tmp_path / "run"),
                                                              train={"steps": 1, "checkpoint_interval": 1})))
    trained = subprocess.run([sys.executable, "-m", "megalite.cli", "train", str(tmp_path / "run.json")],
                             capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "out"
    command = subprocess.Popen([sys.executable, "-m", "megalite.cli", "checkpoint", "reshard", str(tmp_path / "run"),
                                "--out", str(out), "--tensor", "2", "--pipeline", "1", "--data", "1"],
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        me = psutil.Process(command.pid)
        _wait_until(lambda: len(_rank_processes(me)) == 2, 120, "the reshard's two ranks")
        ranks = _rank_processes(me)
        time.sleep(2)  # into their imports and set-up
        victim = ranks[1]
        victim.kill()
        killed = time.monotonic()
        stdout, stderr = command.communicate(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        command.kill()
        command.wait()
    assert command.returncode == 2, stderr[-3000:]
    # 1 s idle, 5 s beside 4 busy processes on 2 cores (the other rank, stopped in its imports, may take the 3 s
    # grace before SIGKILL): the other rank would wait 10 minutes in the rendezvous.
    assert seconds < 60, seconds
    assert f"(pid {victim.pid}): killed by SIGKILL" in stderr and "stopped after rank" in stderr, stderr[-3000:]
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert not alive, alive
    assert not (out / "latest").exists() and not list(out.glob("step*")), sorted(os.listdir(out))
