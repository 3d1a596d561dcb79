"""`megalite config check|show`: validate a run file without GPUs or a process group."""

from __future__ import annotations

import argparse
import json

from megalite import config as cfg_mod
from megalite.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite config`."""
    parser.add_argument("action", choices=["check", "show"], help="check: validate; show: print the resolved config")
    parser.add_argument("config", help="run config JSON file")
    parser.add_argument("--world-size", type=int, default=None, help="number of processes (default: tensor x pipeline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. train.steps=100 (repeatable)")


def main(args: argparse.Namespace) -> int:
    """Run the check or show action; errors are printed and give exit code 2."""
    try:
        cfg = cfg_mod.load(args.config, args.overrides, world_size=args.world_size)
    except ConfigError as e:
        print(f"{args.config}: INVALID\n{e}")
        return 2
    world = args.world_size or cfg.parallel.tensor * cfg.parallel.pipeline
    derived = cfg_mod.summary(cfg, world)
    if args.action == "check":
        print(
            f"{args.config}: OK - {derived['parameters'] / 1e6:.1f}M parameters, world {world} = "
            f"TP{derived['tensor_parallel']} x PP{derived['pipeline_parallel']} x DP{derived['data_parallel']}, "
            f"global batch {derived['global_batch_size']} ({derived['tokens_per_step']} tokens/step), "
            f"{derived['precision']}, ZeRO-{derived['zero_stage']}"
        )
    else:
        resolved = cfg.to_dict()
        resolved["deepspeed"] = cfg_mod.resolve_deepspeed(cfg, world)
        from megalite.engine.plan import memory_breakdown  # issue 16: the plan's memory per GPU

        derived["memory_per_gpu"] = memory_breakdown(cfg, world)
        print(json.dumps({"config": resolved, "derived": derived}, indent=2))
    return 0
