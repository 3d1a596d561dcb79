"""Runs a chain of 2-rank training jobs for the kill -9 tests, each resuming from what the last one left.

    python tests/helpers/ckpt_job.py ROOT OUT_DIR CHAIN_JSON [async]
    CHAIN_JSON: [[steps, fault_point_or_null(, subdir of ROOT)], ...]
    async: save with CheckpointManager.save_async (a background thread writes and commits while the next step
    trains; the job waits for the last one before it ends), so the faults fire in that thread.

Process tree: this runner (a child subreaper, so it reaps whatever a job leaves) imports torch and
DeepSpeed once, then for each job forks a job leader that starts a new session/process group and forks
the 2 ranks into it. A fault with MEGALITE_CKPT_FAULT_KILL=group SIGKILLs that whole group (leader and
both ranks at once), as a scheduler's kill -9 of the job would; if a rank fails on its own the leader
SIGKILLs the other. After each job the runner checks that every rank process is gone.
Each rank resumes (policy auto), trains to `steps` saving after every step, and writes
OUT_DIR/job<i>/rank<r>.json (resumed step, losses, resume report) before each save.
Results: OUT_DIR/results.json.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))  # tests/helpers/ -> the repository
PR_SET_CHILD_SUBREAPER = 36


def rank_main(root: str, record_dir: str, steps: int, background: bool = False) -> None:
    """Resume from ROOT if possible, then train up to `steps`, saving after every step."""
    import torch

    torch.set_num_threads(1)
    from megalite.checkpoint import CheckpointManager
    from tests.helpers.ckpt_common import MODEL, build_engine, seed_all, setup_deepspeed, train_step

    setup_deepspeed()
    rank = int(os.environ["RANK"])
    seed_all(1000 + rank)
    engine = build_engine(stage=1, seed=7)
    layout = {"tp": 1, "pp": 1, "dp": 2, "world_size": 2}
    mgr = CheckpointManager(root, keep=2, layout=layout, config={"model": MODEL}, background=background)
    path = mgr.find_resume("auto")
    start = mgr.load(engine, path)["client_state"]["consumed"] if path else 0
    record = {"resumed_from": start, "path": path, "report": mgr.resume_report, "losses": {}}
    out = os.path.join(record_dir, f"rank{rank}.json")
    for step in range(start + 1, steps + 1):
        record["losses"][step] = train_step(engine, step)
        with open(out, "w") as f:
            json.dump(record, f)
        if background:
            mgr.save_async(engine, step, {"consumed": step})
        else:
            mgr.save(engine, step, {"consumed": step})
    mgr.wait()


def job_leader(root: str, record_dir: str, steps: int, fault: str | None, background: bool = False) -> int:
    """In a new process group: fork 2 ranks, wait; if one fails, SIGKILL the other."""
    from tests.helpers.distributed import free_port

    os.setsid()
    port = free_port()
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                                  LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                  MEGALITE_CKPT_FAULT_KILL="group", MEGALITE_CKPT_FAULT_DIR=record_dir)
                os.environ.pop("MEGALITE_CKPT_FAULT", None)
                if fault:
                    os.environ["MEGALITE_CKPT_FAULT"] = fault
                rank_main(root, record_dir, steps, background)
            except BaseException:  # noqa: BLE001 - report and exit non-zero, never fall back into the leader
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    with open(os.path.join(record_dir, "pids.json"), "w") as f:
        json.dump(pids, f)
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        pid, status = os.wait()
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0:
            for other in pids:
                if other not in codes:
                    os.kill(other, signal.SIGKILL)
    return 0 if all(c == 0 for c in codes.values()) else 1


def _alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def run_chain(root: str, out_dir: str, chain: list, background: bool = False) -> list[dict]:
    """Run each job of the chain in turn; return what happened to each."""
    results = []
    base = root
    for i, (steps, fault, *sub) in enumerate(chain):
        root = os.path.join(base, sub[0]) if sub else base
        record_dir = os.path.join(out_dir, f"job{i}")
        os.makedirs(record_dir, exist_ok=True)
        t0 = time.monotonic()
        leader = os.fork()
        if leader == 0:
            code = 1
            try:
                code = job_leader(root, record_dir, steps, fault, background)
            finally:
                os._exit(code)
        status = None
        while time.monotonic() - t0 < 120:
            pid, st = os.waitpid(leader, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(st)
                break
            time.sleep(0.05)
        if status is None:  # a hang: kill the job so the chain (and the test) ends
            os.killpg(leader, signal.SIGKILL)
            status = os.waitstatus_to_exitcode(os.waitpid(leader, 0)[1])
            status = f"hung, killed ({status})"
        with open(os.path.join(record_dir, "pids.json")) as f:
            rank_pids = json.load(f)
        # The ranks were reparented to us (subreaper): reap them, then prove none is left.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            if not any(_alive(p) for p in rank_pids):
                break
            time.sleep(0.05)
        left = [p for p in rank_pids if _alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        records = {}
        for rank in range(2):
            path = os.path.join(record_dir, f"rank{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    records[rank] = json.load(f)
        tmp_files = sorted(
            os.path.relpath(os.path.join(d, fn), root)
            for d, _, fns in os.walk(root) for fn in fns if ".tmp-" in os.path.relpath(d, root)
        ) if os.path.isdir(root) else []
        results.append({"steps": steps, "fault": fault, "status": status, "leftover_pids": left, "tmp_files": tmp_files,
                        "records": records, "seconds": time.monotonic() - t0,
                        "markers": sorted(n for n in os.listdir(record_dir) if n.startswith("fault-")),
                        "dirs": sorted(os.listdir(root)) if os.path.isdir(root) else []})
    return results


def main() -> None:
    """Entry point: ROOT OUT_DIR CHAIN_JSON."""
    root, out_dir, chain = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    background = sys.argv[4:5] == ["async"]
    sys.path.insert(0, REPO)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Import the heavy modules once, before forking, so each job starts in a second (nothing runs yet).
    import deepspeed  # noqa: F401
    import deepspeed.comm  # noqa: F401
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import torch._dynamo  # noqa: F401

    import megalite.checkpoint  # noqa: F401
    import tests.helpers.ckpt_common  # noqa: F401

    results = run_chain(root, out_dir, chain, background)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
