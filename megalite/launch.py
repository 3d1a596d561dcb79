"""Rank discovery and process-group start-up for every launcher megalite supports.

The `deepspeed` launcher and torchrun set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; `srun` sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, which are mapped here; a plain `python`/`megalite`
process without any of them becomes a world of one on localhost.

Training, inference (megalite.generate, the lm-evaluation-harness model) and the benchmarks all start their
processes here, and it imports nothing of megalite's but the torch-free megalite.local_ranks (for a free port), so
it sits at the base of the package beside megalite.distributed (torch and DeepSpeed are imported on use, so a rank's entry point, `python -m megalite.commands.rank`, imports
`exit_now` cheaply).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import NoReturn

from megalite.local_ranks import free_port


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist such as `n[1-2],m3` (scontrol is not needed for the common forms)."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, _, rest = head.partition("[")
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def discover_environment() -> dict[str, str]:
    """Fill RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from whichever launcher ran us."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def world_size() -> int:
    """The number of ranks the launcher started, from its environment, before any process group exists (what
    `init_distributed` will report: `megalite train` validates its config for it at load)."""
    return int(discover_environment()["WORLD_SIZE"])


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Start the process group (NCCL on CUDA, gloo otherwise) through DeepSpeed; returns (rank, world)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    discover_environment()
    if not torch.cuda.is_available():
        # DeepSpeed otherwise JIT-builds its shared-memory comm op (40-100 s) on first init.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(seconds=timeout_s),
            auto_mpi_discovery=False,
        )
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:  # noqa: F821
    """This rank's device."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_gpu() -> tuple[str, float] | None:
    """This process's GPU as torch names it and its total memory in GiB; None without one (no GPU, no driver).
    The one question the planner (megalite.plan, which imports no torch) and the MFU peak need answered."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
        return torch.cuda.get_device_name(index), torch.cuda.get_device_properties(index).total_memory / 2**30
    except Exception:  # noqa: BLE001 - no usable driver: no GPU
        return None


def exit_now(code: int) -> NoReturn:
    """Leave a rank's process at once with `code`, after tearing down the process group.

    After a finished distributed run, interpreter finalisation was seen to abort a rank ("terminate
    called without an active exception", exit 134, no Python frame) under srun, torchrun and the
    deepspeed launcher alike, turning a clean exit 0 or 75 into a failure that a batch script would
    misread. So: destroy the process group, flush what Python buffers, and leave with os._exit.
    """
    import logging
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - teardown must not mask the run's own exit code
            print(f"megalite: destroy_process_group failed: {e}", file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
