"""The multi-process test harness itself (tests/helpers/distributed.py, `run_ranks`): results, tracebacks and hangs
all surface."""

from __future__ import annotations

import os
import time

import pytest

from tests.helpers.distributed import RankFailure, run_ranks


def _checks() -> dict:
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    return {"rank": rank, "world": world, "sum": t.item(), "gathered": [g.item() for g in gathered],
            "env_rank": int(os.environ["RANK"])}


def _fail_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")


def _hang_in_collective() -> None:
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: the collective timeout must fire
    else:
        time.sleep(8)  # outlives the 3 s collective timeout, then exits normally


@pytest.mark.parametrize("world", [2, 4])
def test_results_in_rank_order(world):
    results = run_ranks(_checks, world)
    total = world * (world + 1) / 2
    for rank, r in enumerate(results):
        assert r == {"rank": rank, "world": world, "sum": total, "gathered": [float(i) for i in range(world)],
                     "env_rank": rank}


def test_rank_traceback_reaches_the_test():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 raised.*ValueError: rank one is broken on purpose"):
        run_ranks(_fail_on_rank_one, 2)


def test_hang_becomes_failure_quickly():
    start = time.monotonic()
    with pytest.raises(RankFailure):
        run_ranks(_hang_in_collective, 2, timeout_s=20, collective_timeout_s=3)
    assert time.monotonic() - start < 40
