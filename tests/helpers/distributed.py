"""The one multi-process harness every distributed test uses.

`run_ranks(fn, world_size, *args)` spawns `world_size` processes, joins them into a gloo
process group with a short collective timeout, runs `fn(*args)` on each and returns the
per-rank results in rank order. Any rank's exception is re-raised in the test with every
failing rank's traceback; a rank that neither finishes nor fails before the wall-clock
limit turns the whole launch into a failure (all ranks are killed), never a hang.

`fn` must be importable (defined at module level) because ranks are spawned, not forked.
Run several checks inside one `fn`: each launch costs seconds on a 2-core machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailure(AssertionError):
    """One or more ranks raised or hung."""


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    collective_timeout_s: float,
    init_process_group: bool,
    env: dict[str, str],
    results: mp.Queue,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # world_size ranks share 2 cores
        if init_process_group:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout_s)
            )
        value = fn(*args)
        # Plain pickle: the queue's own pickler would pass tensors as shared-memory handles that die with us.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 180.0,
    collective_timeout_s: float = 30.0,
    init_process_group: bool = True,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo ranks; return their results in rank order."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, fn, args, collective_timeout_s, init_process_group, env or {}, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
                outcome[rank] = (status, value)
            except queue.Empty:
                # A rank that died without reporting (segfault, os._exit) is a failure too.
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                if dead and all(p.exitcode is not None for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    errors = [f"--- rank {r} raised:\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcome]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        errors.append(f"--- ranks {missing} did not finish within {timeout_s:.0f}s (exit codes {codes})")
    if errors:
        raise RankFailure("\n".join(errors))
    return [pickle.loads(outcome[r][1]) for r in range(world_size)]
