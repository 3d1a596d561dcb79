"""`megalite preflight CONFIG`: cluster checks before a long job, on every rank of it or on a login node.

Run it on every rank of the job (e.g. `srun megalite preflight run.json`) to test the network; on a login
node (`megalite preflight run.json --world-size 16`) it checks what it can.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from megalite.commands.output import emit
from megalite.errors import ConfigError

HELP = "check a cluster job before it starts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite preflight`."""
    parser.add_argument("config", help="run config JSON file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. train.steps=100 (repeatable)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="intended number of ranks when run as a single process (e.g. on a login node)")
    parser.add_argument("--collective-mb", type=float, default=4.0, help="all_reduce size in MB (default 4)")
    parser.add_argument("--min-bandwidth", type=float, default=0.0, metavar="GB/S",
                        help="fail when the all_reduce bus bandwidth is below this (default: report only)")
    parser.add_argument("--no-collective", action="store_true", help="skip the all_reduce")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON (rank 0)")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout in seconds (default 120)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _launched_world() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            # SLURM_NTASKS alone (no srun step) is the allocation, not ranks of this command.
            if key == "SLURM_NTASKS" and "SLURM_STEP_ID" not in os.environ:
                continue
            return int(os.environ[key])
    return 1


def main(args: argparse.Namespace) -> int:
    """Load the config, join the other ranks if launched as several, check, print; 0 when all pass."""
    from megalite import config
    from megalite.engine.preflight import run_checks

    launched = _launched_world()
    try:
        cfg = config.load(args.config, args.overrides)
    except ConfigError as e:
        print(f"megalite preflight: {args.config}: INVALID\n{e}", file=sys.stderr)
        return 2
    rank, world = 0, args.world_size or cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context
    distributed = launched > 1
    if distributed:
        from megalite import launch

        rank, world = launch.init_distributed(args.timeout)
    try:
        checks = run_checks(cfg, world, rank, collective=distributed and not args.no_collective,
                            collective_mb=args.collective_mb, min_bandwidth_gbps=args.min_bandwidth)
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    failed = [c for c in checks if not c.ok]
    _report(checks, rank, world, args.json)
    return 2 if failed else 0


def _report(checks: list, rank: int, world: int, as_json: bool) -> None:
    failed = [c for c in checks if not c.ok]
    if as_json:
        if rank == 0:
            emit(json.dumps({"ok": not failed, "world_size": world, "checks": [dataclasses.asdict(c) for c in checks]}))
        return
    if rank == 0:
        for c in checks:
            emit(f"preflight {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.message}")
        emit(f"preflight: {'PASSED' if not failed else f'FAILED ({len(failed)} problems)'} on {world} ranks")
    else:
        # Other ranks only speak about their own problems (a node's GPUs, its disk).
        for c in failed:
            if c.name != "ranks":
                print(f"preflight FAIL rank {rank} {c.name}: {c.message}", file=sys.stderr, flush=True)
