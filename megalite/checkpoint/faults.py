"""Fault injection for the crash-safety tests: SIGKILL (or a write error) at a named point of the save protocol.

MEGALITE_CKPT_FAULT=<point> (see FAULT_POINTS), MEGALITE_CKPT_FAULT_RANK (default 0) and
MEGALITE_CKPT_FAULT_KILL=self|group|delay|error|stop (SIGKILL this process, or its whole process group; or sleep
MEGALITE_CKPT_FAULT_DELAY_S seconds there, a slow file system; or raise OSError(ENOSPC) there, a full disk; or
SIGSTOP this process, a hung rank, MEGALITE_CKPT_FAULT_SETTLE_S seconds (default 1) after reaching the point).
MEGALITE_CKPT_FAULT_SKIP=N lets the first N arrivals of this process pass; MEGALITE_CKPT_FAULT_TIMES=N acts at most
N times (default: every time). The rank that reaches the point writes the marker file fault-<point>-rank<r> into
MEGALITE_CKPT_FAULT_DIR (default the checkpoint root) and fsyncs it, so a test can prove the point was reached
(one JSON line: the pid, the point, when it was reached and when written).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time

from megalite.distributed import rank as global_rank

FAULT_POINTS = ("before_shards", "after_snapshot", "write_file", "between_shards", "before_manifest", "before_rename",
                "before_latest", "after_latest")
FAULT_ENV = "MEGALITE_CKPT_FAULT"
_arrivals: dict[str, int] = {}  # per fault setting, in this process


def fault(point: str, default_dir: str) -> None:
    """Test hook: at `point`, write a marker then SIGKILL this process or its process group."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted != point:
        return
    rank = global_rank()
    if rank != int(os.environ.get("MEGALITE_CKPT_FAULT_RANK", "0")):
        return
    setting = "|".join(os.environ.get(k, "") for k in (FAULT_ENV, "MEGALITE_CKPT_FAULT_SKIP", "MEGALITE_CKPT_FAULT_TIMES",
                                                          "MEGALITE_CKPT_FAULT_DIR"))
    arrival = _arrivals[setting] = _arrivals.get(setting, 0) + 1  # counted afresh for each setting
    skip = int(os.environ.get("MEGALITE_CKPT_FAULT_SKIP", "0"))
    times = os.environ.get("MEGALITE_CKPT_FAULT_TIMES")
    if arrival <= skip or (times is not None and arrival > skip + int(times)):
        return
    action = os.environ.get("MEGALITE_CKPT_FAULT_KILL", "self")
    reached = time.time()  # when the point was reached: a stop comes a settling moment (and the marker) later
    if action == "stop":  # hung a moment into the save (a watchdog publishes where its rank is every poll)
        time.sleep(float(os.environ.get("MEGALITE_CKPT_FAULT_SETTLE_S", "1")))
    marker_dir = os.environ.get("MEGALITE_CKPT_FAULT_DIR", default_dir)
    os.makedirs(marker_dir, exist_ok=True)
    marker = os.path.join(marker_dir, f"fault-{point}-rank{rank}")
    with open(marker, "w") as f:
        f.write(json.dumps({"pid": os.getpid(), "point": point, "reached": reached, "time": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if action == "delay":  # a slow file system: hold this point for MEGALITE_CKPT_FAULT_DELAY_S seconds
        time.sleep(float(os.environ.get("MEGALITE_CKPT_FAULT_DELAY_S", "2")))
        return
    if action == "error":  # a full disk at this point
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    if action == "stop":  # a hung rank (the watchdog's tests): frozen mid-save until SIGCONT
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action == "group":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

