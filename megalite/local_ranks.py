"""Rank processes started on this machine, under supervision (`megalite checkpoint reshard`, `bench context`).

`spawn_local_ranks` starts a world of processes over a free port and watches every one of them:
- when a rank fails (an error it reports, a crash, a kill), the others are stopped at once instead of waiting
  in a collective for the store's timeout (10 minutes), and the failure names the rank and its pid;
- the ranks die with the parent: each asks the kernel for SIGKILL when the parent goes (Linux PR_SET_PDEATHSIG;
  elsewhere a thread watching the parent's pid), before it imports anything heavy, and checks that its parent is
  still the process that started it. The parent also stops them on an exception of its own (Ctrl-C) and, where
  SIGTERM would otherwise kill it outright, on SIGTERM. A killed command so leaves no rank behind that could
  commit its output later.

Results travel as small files (written under a temporary name, then renamed), not through a pipe: a rank killed
in the middle of reporting can never leave the parent blocked on half a message.

This module imports neither torch nor DeepSpeed, so that a rank process is tied to its parent before it starts
importing them (seconds).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from megalite.errors import MegaliteError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RankResults:
    """Where ranks put `(kind, rank, value)` records (kind "error" for a failure): one file per record."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._count = 0

    def put(self, record: tuple[str, int, Any]) -> None:
        """Write one record (complete or not at all)."""
        self._count += 1
        path = os.path.join(self.folder, f"{os.getpid()}-{self._count:06d}.pkl")
        with open(f"{path}.tmp", "wb") as f:
            pickle.dump(record, f)
        os.replace(f"{path}.tmp", path)

    def read(self) -> list[tuple[str, int, Any]]:
        """Every complete record, in the order each rank wrote them."""
        out = []
        for name in sorted(n for n in os.listdir(self.folder) if n.endswith(".pkl")):
            with open(os.path.join(self.folder, name), "rb") as f:
                out.append(pickle.load(f))
        return out


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid`, its parent, ends (at once, whatever this process is doing)."""
    tied = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            tied = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            tied = False
    if not tied:
        def watch() -> None:
            while os.getppid() == parent_pid:
                threading.Event().wait(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent ended before the tie was made
        os._exit(1)


def _rank_main(payload: bytes, parent_pid: int, rank: int, world: int, port: int, results: RankResults) -> None:
    die_with_parent(parent_pid)
    try:
        target, args = pickle.loads(payload)  # imports the target's module (torch, DeepSpeed) only now
        target(rank, world, port, *args, results)
    except SystemExit as e:
        if e.code not in (0, None):
            results.put(("error", rank, f"exited with code {e.code}"))
        raise
    except BaseException as e:  # noqa: BLE001 - every failure reaches the parent as this rank's error
        results.put(("error", rank, failure_message(e)))
        sys.exit(1)


def failure_message(error: BaseException) -> str:
    """A rank's failure as the parent reports it: megalite's own errors (bad input, a checkpoint that cannot be
    used) by their message, anything else with the end of its traceback."""
    import traceback

    message = f"{type(error).__name__}: {error}"
    if isinstance(error, MegaliteError):
        return message
    return f"{message}\n{''.join(traceback.format_exception(error))[-2000:]}"


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop(procs: list, grace_s: float) -> None:
    """SIGTERM each process still running, then SIGKILL what is left after `grace_s`; wait for all."""
    from multiprocessing.connection import wait

    alive = [p for p in procs if p.exitcode is None]
    for p in alive:
        p.terminate()
    wait([p.sentinel for p in alive], timeout=grace_s)
    for p in alive:
        if p.exitcode is None:
            p.kill()
    for p in alive:
        p.join()


class _SigtermAsExit:
    """While active, SIGTERM raises SystemExit(143) in the main thread (so that cleanup runs), where it would
    otherwise end the process outright; left alone where the program handles SIGTERM itself."""

    def __enter__(self) -> _SigtermAsExit:
        self.previous = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def spawn_local_ranks(target: Callable[..., None], world: int, *args: Any,
                      grace_s: float = 3.0) -> tuple[dict[int, Any], list[str], list[int | None]]:
    """Run `target(rank, world, port, *args, results)` in `world` spawned processes on this machine (a free port
    for their process group) and supervise them until all have ended. Each rank puts `(kind, rank, value)` on
    `results`, kind "error" for a failure (an exception `target` raises is put there for it, with
    `failure_message`). When a rank fails, the others are stopped (SIGTERM, SIGKILL after
    `grace_s`). Returns the other values by rank, the failures ("rank R (pid P): ...", and the ranks stopped
    because of them), and the exit codes. `target` and `args` must pickle; call from the thread that outlives
    the ranks (the kernel ends them when the thread that started them ends)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="megalite-ranks-")
    results = RankResults(folder)
    payload = pickle.dumps((target, args))
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(payload, os.getpid(), r, world, port, results), name=f"rank {r}")
             for r in range(world)]
    failed: list[int] = []
    try:
        with _SigtermAsExit():
            try:
                for p in procs:
                    p.start()
                running = set(range(world))
                while running and not failed:
                    wait([procs[r].sentinel for r in running], timeout=1.0)
                    for r in sorted(running):
                        if procs[r].exitcode is not None:
                            running.discard(r)
                            if procs[r].exitcode != 0:
                                failed.append(r)
            finally:  # a failed rank, or an exception here (Ctrl-C, SIGTERM): no rank outlives this call
                stopped = [r for r, p in enumerate(procs) if p.pid is not None and p.exitcode is None]
                _stop([p for p in procs if p.pid is not None], grace_s)
        records = results.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    values: dict[int, Any] = {}
    reported: dict[int, str] = {}
    for kind, rank, value in records:
        if kind == "error":
            reported.setdefault(rank, str(value))
        else:
            values[rank] = value
    codes = [p.exitcode for p in procs]
    failures = [f"rank {r} (pid {procs[r].pid}): {reported.get(r, _exit_reason(codes[r]))}"
                for r in sorted(set(failed) | set(reported))]
    if stopped:
        failures.append(f"rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} stopped after "
                        f"rank {failed[0] if failed else '?'} failed")
    return values, failures, codes
