"""The slurm/ batch scripts against a real two-node SLURM (tests/helpers/slurm_cluster.py), on CPU.

All jobs are submitted at once (two run side by side: one CPU per node each) and every test
waits for its own: srun (with preflight), torchrun and the deepspeed launcher each train over
both nodes, evaluate and exit 0; a fourth job, written by `megalite slurm --submit`, is sent
USR1, saves, requeues itself, resumes and ends with the same final loss as the uninterrupted run.
Three more jobs, whose ranks only exit with a given code (MEGALITE_COMMAND replaces the megalite CLI;
seconds each), take the scripts' other ends: a failing rank (1) and too many non-finite steps (76)
are never requeued, and a job that keeps being preempted (75) is requeued MEGALITE_MAX_RESTARTS times.
The last job (two ranks on one node) hangs: rank 1 stops itself (SIGSTOP) mid-step; rank 0's watchdog names
it and exits 79, the step is ended, the job requeues itself held while a helper job excludes the hung node,
and the next attempt resumes on the other node and finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.engine_utils import tiny_config, write_token_dataset
from tests.helpers.slurm_cluster import NODE_IFNAME, REQUIRE_ENV, SlurmCluster, ensure_installed, unavailable

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
HELPERS = sorted((REPO / "slurm").glob("*.sh"))
STEPS = 200  # ~10 ms each: long enough for a signal to land mid-run, short enough for CI
JOB_TIMEOUT_S = 240
MAX_RESTARTS = 2  # for the job whose ranks always exit 75


@dataclass
class Job:
    """A submitted job: its id, log file and run directory."""

    id: str
    log: Path
    output_dir: Path


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster()
    reason = c.start()
    if reason:
        unavailable(f"no SLURM cluster: {reason}")
    yield c
    c.stop()


def _job_env(cluster: SlurmCluster) -> dict[str, str]:
    return dict(cluster.env(), MEGALITE_HOME=str(REPO), MEGALITE_GPUS_PER_NODE="0", MEGALITE_PROCS_PER_NODE="1",
                MEGALITE_IFNAME=NODE_IFNAME, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))


def _write_config(work: Path, name: str) -> Path:
    raw = tiny_config(str(work / "data"), str(work / f"run-{name}"), train={"steps": STEPS})
    path = work / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def _sbatch(cluster: SlurmCluster, work: Path, script: Path, name: str, env: dict[str, str]) -> Job:
    cfg = _write_config(work, name)
    log = work / f"{name}.log"
    # The #SBATCH lines ask for GPUs; the command line overrides them for a CPU run over both nodes.
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=10", f"--output={log}", f"--chdir={work}", f"--job-name={name}", str(script), str(cfg)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"sbatch failed: {r.stderr}")
    return Job(r.stdout.strip().split(";")[0], log, work / f"run-{name}")


def _submit_generated(cluster: SlurmCluster, work: Path, name: str, env: dict[str, str]) -> Job:
    cfg = _write_config(work, name)
    log = work / f"{name}.log"
    cmd = [sys.executable, "-m", "megalite.cli", "slurm", str(cfg), "--nodes", "2", "--gpus-per-node", "0",
           "--time", "10", "--job-name", name, "--log", str(log), "-o", str(work / f"{name}.sbatch"), "--submit"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=work)
    m = re.search(r"Submitted batch job (\d+)", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"megalite slurm --submit failed ({r.returncode}): {r.stdout}\n{r.stderr}")
    return Job(m.group(1), log, work / f"run-{name}")


# MEGALITE_COMMAND for the exit-code jobs: rank N exits with the N-th of MEGALITE_TEST_EXIT_CODES, at once.
FAKE_RANK = """#!/bin/bash
read -r -a codes <<<"$MEGALITE_TEST_EXIT_CODES"
rank=${RANK:-${SLURM_PROCID:-0}}
echo "fake rank $rank of restart ${SLURM_RESTART_COUNT:-0} on $(hostname): $* -> exit ${codes[$rank]}" >&2
exit "${codes[$rank]}"
"""


def _fake_rank_env(work: Path, env: dict[str, str], codes: str, **extra: str) -> dict[str, str]:
    fake = work / "fake-rank.sh"
    if not fake.exists():
        fake.write_text(FAKE_RANK)
        fake.chmod(0o755)
    return dict(env, MEGALITE_COMMAND=str(fake), MEGALITE_TEST_EXIT_CODES=codes, **extra)


# MEGALITE_COMMAND of the hang job: in the first attempt rank 1 stops itself before its forward of HANG_AT_STEP.
HANG_RANK = """#!/bin/bash
if [[ ${SLURM_RESTART_COUNT:-0} -eq 0 ]]; then
    export MEGALITE_HANG_FAULT=forward@$MEGALITE_TEST_HANG_AT MEGALITE_HANG_FAULT_RANK=1
fi
exec python -m megalite.commands.rank "$@"
"""
HANG_STEPS, HANG_AT_STEP, HANG_CHECKPOINTS = 30, 10, 4


def _submit_hang(cluster: SlurmCluster, work: Path, env: dict[str, str]) -> Job:
    """Two ranks on one node (so the other node is free to exclude it), rank 1 hung in attempt 0."""
    name = "hang"
    raw = tiny_config(str(work / "data"), str(work / f"run-{name}"), train={
        "steps": HANG_STEPS, "checkpoint_interval": HANG_CHECKPOINTS, "hang_timeout_s": 3,
        "hang_timeout_long_s": 20})
    cfg = work / f"{name}.json"
    cfg.write_text(json.dumps(raw))
    wrapper = work / "hang-rank.sh"
    wrapper.write_text(HANG_RANK)
    wrapper.chmod(0o755)
    log = work / f"{name}.log"
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=10", f"--output={log}", f"--chdir={work}", f"--job-name={name}",
           str(REPO / "slurm/train-srun.sbatch"), str(cfg)]
    job_env = dict(env, MEGALITE_PROCS_PER_NODE="2", MEGALITE_COMMAND=str(wrapper), MEGALITE_HANG_GRACE="3",
                   MEGALITE_TEST_HANG_AT=str(HANG_AT_STEP), MEGALITE_EVAL="0")
    r = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"sbatch failed: {r.stderr}")
    return Job(r.stdout.strip().split(";")[0], log, work / f"run-{name}")


@pytest.fixture(scope="module")
def jobs(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    work = tmp_path_factory.mktemp("slurm")
    write_token_dataset(str(work / "data"))
    env = _job_env(cluster)
    submitted = {
        # The longest job (train, save, requeue, resume) first; then the exit-code jobs, which take seconds.
        "preempt": _submit_generated(cluster, work, "preempt", env),
        # Rank 1 fails while rank 0 reports a preemption: the failure decides, nothing is requeued.
        "fail1": _sbatch(cluster, work, REPO / "slurm/train-srun.sbatch", "fail1", _fake_rank_env(work, env, "75 1")),
        # torchrun reports a worker's non-zero exit as 1: the job must still end with the ranks' own 76.
        "nonfinite": _sbatch(cluster, work, REPO / "slurm/train-torchrun.sbatch", "nonfinite",
                             _fake_rank_env(work, env, "76 76")),
        "max_restarts": _sbatch(cluster, work, REPO / "slurm/train-srun.sbatch", "max_restarts",
                                _fake_rank_env(work, env, "75 75", MEGALITE_MAX_RESTARTS=str(MAX_RESTARTS))),
        "srun": _sbatch(cluster, work, REPO / "slurm/train-srun.sbatch", "srun", dict(env, MEGALITE_PREFLIGHT="1")),
        "torchrun": _sbatch(cluster, work, REPO / "slurm/train-torchrun.sbatch", "torchrun", env),
        "deepspeed": _sbatch(cluster, work, REPO / "slurm/train-deepspeed.sbatch", "deepspeed", env),
        # Last: it needs a whole node, and the scheduler starts jobs in order.
        "hang": _submit_hang(cluster, work, env),
    }
    return submitted


def _job_info(cluster: SlurmCluster, job: Job) -> dict[str, str]:
    out = cluster.scontrol("show", "job", "-o", job.id, check=False)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _log(job: Job) -> str:
    return job.log.read_text(errors="replace") if job.log.exists() else "(no log yet)"


def _wait(cluster: SlurmCluster, job: Job, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Poll (sbatch --wait backs off to 30 s between polls) until the job is done for good."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = _job_info(cluster, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job.id], env=cluster.env(), capture_output=True, timeout=30)
    pytest.fail(f"job {job.id} not done after {timeout_s:.0f} s: {info.get('JobState')}\n{_log(job)[-4000:]}")


def _final_train_loss(output_dir: Path) -> float:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    assert train and train[-1]["step"] == STEPS, f"last train record: {train[-1] if train else None}"
    return train[-1]["loss"]


def _eval_result(log: str) -> dict:
    results = [json.loads(line) for line in log.splitlines() if line.startswith('{"checkpoint"')]
    assert results, "no `megalite eval` output in the job log"
    return results[-1]


def _check_success(cluster: SlurmCluster, job: Job) -> str:
    info = _wait(cluster, job)
    log = _log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert info["NodeList"] == "n[1-2]"
    assert "nodes=2 ranks/node=1 world=2" in log
    assert "2 of 2 ranks reported: 2 done" in log
    result = _eval_result(log)
    assert result["checkpoint"].endswith(f"step{STEPS:08d}") and result["tokens"] > 0
    return log


def test_scripts_pass_shellcheck(tmp_path: Path) -> None:
    if not shutil.which("shellcheck"):
        reason = ensure_installed()
        if not shutil.which("shellcheck"):
            unavailable(f"no shellcheck: {reason}")
    from megalite.commands import slurm as slurm_cli
    from megalite.engine.slurm import render

    parser = argparse.ArgumentParser()
    slurm_cli.add_arguments(parser)
    generated = []
    for launcher in slurm_cli.LAUNCHERS:  # the scripts `megalite slurm` writes, too
        args = parser.parse_args(["x.json", "--nodes", "4", "--gpus-per-node", "8", "--launcher", launcher,
                                  "--partition", "gpu", "--set", "train.steps=5"])
        path = tmp_path / f"{launcher}.sbatch"
        path.write_text(render(args, tmp_path / "x.json", 8))
        generated.append(path)
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS + HELPERS + generated)], capture_output=True,
                       text=True, cwd=REPO / "slurm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(SCRIPTS) == 3


def test_preemption_saves_requeues_and_resumes(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["preempt"]
    metrics = job.output_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    # The first train record means the ranks' signal handlers are installed.
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        info = _job_info(cluster, job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{info}\n{_log(job)}"
        assert time.monotonic() < deadline, f"no training after {JOB_TIMEOUT_S} s\n{_log(job)}"
        time.sleep(0.1)
    # What #SBATCH --signal=B:USR1@N does near the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=cluster.env(), check=True, timeout=30)
    info = _wait(cluster, job)
    log = _log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    restarts = [int(n) for n in re.findall(r"SLURM_RESTART_COUNT=(\d+)", log)]
    assert restarts[0] == 0 and max(restarts) >= 1 and int(info["Restarts"]) >= 1, log[-4000:]
    assert "received SIGUSR1: forwarding it to every rank" in log
    assert "2 of 2 ranks reported: 0 done, 2 preempted" in log
    assert re.search(r"requeueing job \d+ \(restart 1\)", log)
    saved = re.search(r"resumed from \S+step(\d+) at step (\d+)", log)
    assert saved and 0 < int(saved.group(2)) < STEPS, log[-4000:]
    _eval_result(log)
    baseline = jobs["srun"]
    _wait(cluster, baseline)
    assert _final_train_loss(job.output_dir) == pytest.approx(_final_train_loss(baseline.output_dir), rel=1e-6, abs=0)


def test_srun_script_with_preflight(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    log = _check_success(cluster, jobs["srun"])
    assert "preflight: PASSED on 2 ranks" in log
    assert re.search(r"preflight ok   collective: all_reduce of .* across 2 ranks \(gloo\).*GB/s", log), log[-3000:]
    assert re.search(r"preflight ok   watchdog store: rendezvous store 10\.77\.0\.1:\d+ reachable", log), log[-3000:]


def test_torchrun_script(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    _check_success(cluster, jobs["torchrun"])
    _wait(cluster, jobs["srun"])
    assert _final_train_loss(jobs["torchrun"].output_dir) == pytest.approx(
        _final_train_loss(jobs["srun"].output_dir), rel=1e-6, abs=0)


def test_deepspeed_launcher_script(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    log = _check_success(cluster, jobs["deepspeed"])
    assert "--node_rank=0" in log and "--node_rank=1" in log  # each node ran its own launcher (no ssh)
    assert _final_train_loss(jobs["deepspeed"].output_dir) == pytest.approx(
        _final_train_loss(jobs["srun"].output_dir), rel=1e-6, abs=0)


def _rank_exit_codes(job: Job) -> dict[int, list[str]]:
    """What slurm/rank.sh left per attempt (SLURM_RESTART_COUNT): each rank's exit code, rank 0 first."""
    attempts = sorted((job.output_dir / "slurm" / job.id).glob("attempt-*"), key=lambda d: int(d.name.split("-")[1]))
    return {int(d.name.split("-")[1]): [(d / f"rank-{r}.rc").read_text().strip() for r in range(2)] for d in attempts}


def _check_not_requeued(cluster: SlurmCluster, job: Job, code: int) -> str:
    info = _wait(cluster, job)
    log = _log(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{code}:0", f"{info}\n{log[-4000:]}"
    assert info["Restarts"] == "0", f"{info}\n{log[-4000:]}"
    assert re.findall(r"SLURM_RESTART_COUNT=(\d+)", log) == ["0"], log[-4000:]  # one attempt only
    assert f"training failed with exit code {code}: not requeueing" in log, log[-4000:]
    assert "requeueing job" not in log
    # Each rank ran what MEGALITE_COMMAND named, with the arguments `megalite` would get, on its own node.
    ran = sorted(re.findall(rf"fake rank (\d) of restart 0 on (n\d): train \S+/{job.log.stem}\.json -> exit", log))
    assert ran == [("0", "n1"), ("1", "n2")], log[-4000:]
    return log


def test_failing_rank_is_not_requeued(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    log = _check_not_requeued(cluster, jobs["fail1"], 1)
    assert "2 of 2 ranks reported: 0 done, 1 preempted, first failure 1" in log
    assert _rank_exit_codes(jobs["fail1"]) == {0: ["75", "1"]}


def test_nonfinite_exit_is_not_requeued_under_torchrun(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    log = _check_not_requeued(cluster, jobs["nonfinite"], 76)
    # torchrun turned the workers' 76 into 1; the ranks' own codes decide.
    assert "step exit code 1; 2 of 2 ranks reported: 0 done, 0 preempted, first failure 76" in log, log[-4000:]
    assert _rank_exit_codes(jobs["nonfinite"]) == {0: ["76", "76"]}


def test_requeues_stop_at_max_restarts(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["max_restarts"]
    info = _wait(cluster, job)
    log = _log(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", f"{info}\n{log[-4000:]}"
    assert info["Restarts"] == str(MAX_RESTARTS), f"{info}\n{log[-4000:]}"
    assert re.findall(r"SLURM_RESTART_COUNT=(\d+)", log) == [str(n) for n in range(MAX_RESTARTS + 1)], log[-4000:]
    requeued = re.findall(rf"preempted and saved: requeueing job {job.id} \(restart (\d+)\)", log)
    assert requeued == [str(n) for n in range(1, MAX_RESTARTS + 1)], log[-4000:]
    assert (f"preempted, but restart {MAX_RESTARTS} reached MEGALITE_MAX_RESTARTS={MAX_RESTARTS}: not requeueing"
            in log), log[-4000:]
    assert _rank_exit_codes(job) == {n: ["75", "75"] for n in range(MAX_RESTARTS + 1)}


# A forced start failure in a pytest of its own: the cluster fixture must skip, or fail under the switch.
FORCED_START_FAILURE = """
import sys
import pytest
import tests.helpers.slurm_cluster as harness
harness.SlurmCluster.start = lambda self, timeout_s=60.0: "forced start failure (test)"
sys.exit(pytest.main(["-q", "-rsE", "-p", "no:cacheprovider", "tests/test_slurm.py::test_torchrun_script"]))
"""


def test_required_switch_turns_a_missing_cluster_into_a_failure() -> None:
    base = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    runs = {required: subprocess.Popen([sys.executable, "-c", FORCED_START_FAILURE], cwd=REPO, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env=dict(base, **({REQUIRE_ENV: "1"} if required else {})))
            for required in (False, True)}
    out = {required: proc.communicate(timeout=120)[0] for required, proc in runs.items()}
    assert runs[False].returncode == 0 and "1 skipped" in out[False], out[False]
    assert "no SLURM cluster: forced start failure (test)" in out[False]
    assert runs[True].returncode == 1 and "1 error" in out[True], out[True]
    assert f"no SLURM cluster: forced start failure (test) ({REQUIRE_ENV}=1: the SLURM tests must run" in out[True]


def test_ci_runs_make_test_with_the_switch(tmp_path: Path) -> None:
    """.ci/run -> `make test` -> pytest gets MEGALITE_REQUIRE_SLURM=1 (a stand-in venv records what pytest would)."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("no make: .ci/run needs it")
    venv, bin_dir, record = tmp_path / "venv", tmp_path / "bin", tmp_path / "pytest-call"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    scripts = {venv / "bin/python": f'#!/bin/sh\necho "{REQUIRE_ENV}=${REQUIRE_ENV} $*" >{record}\n',
               venv / "bin/ruff": "#!/bin/sh\n",
               bin_dir / "make": f'#!/bin/sh\nexec {make} "$@" VENV={venv}\n'}
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(0o755)
    (venv / ".installed").touch()  # newer than the lock file: no install
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    r = subprocess.run([str(REPO / ".ci/run")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert record.read_text().split() == [f"{REQUIRE_ENV}=1", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]


def test_cluster_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.helpers.slurm_cluster as harness

    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    cluster = SlurmCluster()
    assert "needs root" in (cluster.start() or "")
    cluster.stop()  # nothing was started or locked: a no-op
    assert cluster._lock is None


def test_hung_rank_requeues_without_its_node_and_finishes(cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["hang"]
    # Submitted last, it queues behind the module's training jobs, then runs two attempts (hang found, node excluded,
    # resumed): 277 s on a loaded 2-core machine. Its sbatch --time=10 ends it at 10 minutes in any case.
    info = _wait(cluster, job, timeout_s=600)
    log = _log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-5000:]}"
    assert int(info["Restarts"]) == 1, f"{info}\n{log[-5000:]}"
    # Attempt 0: rank 0 named rank 1 and its node, exited 79; the stopped rank 1 was ended with its step.
    assert "1 of 2 ranks reported: 0 done, 0 preempted, 1 hung" in log, log[-5000:]
    assert _rank_exit_codes_of(job, 0) == {0: "79", 1: None}
    hang_dir = job.output_dir / "slurm" / job.id / "attempt-0" / "hang"
    (hung_node,) = (hang_dir / "suspect-hosts").read_text().split()
    assert hung_node in ("n1", "n2")
    lines = [line for line in log.splitlines() if "megalite: HANG (rank 0" in line]
    assert len(lines) == 1 and f"suspect: rank 1 on {hung_node}" in lines[0], log[-5000:]
    assert f"last seen in forward of step {HANG_AT_STEP}" in lines[0] and str(hang_dir) in lines[0], lines[0]
    assert (hang_dir / "rank0-stacks.txt").exists() and (hang_dir / "fr_trace_rank_0").exists()
    assert f"hang: the watchdog named host(s) {hung_node}" in log, log[-5000:]
    assert re.search(rf"helper job \d+ excludes {hung_node}, then releases it", log), log[-5000:]
    # The helper excluded the node; attempt 1 ran on the other one and resumed the last checkpoint.
    other = "n2" if hung_node == "n1" else "n1"
    assert info["ExcNodeList"] == hung_node and info["NodeList"] == other, info
    helper_log = (job.output_dir / "slurm" / job.id / "attempt-0" / "exclude-helper.log").read_text()
    assert f"job {job.id}: excluded {hung_node}" in helper_log and "released" in helper_log, helper_log
    last = HANG_AT_STEP - 1 - (HANG_AT_STEP - 1) % HANG_CHECKPOINTS
    assert f"step{last:08d} at step {last}" in log, log[-5000:]
    records = [json.loads(line) for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["suspects"][0]["rank"] for r in records if r["kind"] == "hang"] == [1]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == HANG_STEPS
    assert _rank_exit_codes_of(job, 1) == {0: "0", 1: "0"}


def _rank_exit_codes_of(job: Job, attempt: int) -> dict[int, str | None]:
    folder = job.output_dir / "slurm" / job.id / f"attempt-{attempt}"
    return {r: (folder / f"rank-{r}.rc").read_text().strip() if (folder / f"rank-{r}.rc").exists() else None
            for r in range(2)}
