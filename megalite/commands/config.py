"""`megalite config check|show|schema`: validate or resolve a run file without GPUs or a process group."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megalite import config
from megalite.commands.output import emit
from megalite.errors import ConfigError

HELP = "check or show a run configuration, or write the JSON Schema of run files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite config`."""
    parser.add_argument("action", choices=["check", "show", "schema"],
                        help="check: validate; show: print the resolved config; schema: print or write the JSON Schema")
    parser.add_argument("config", nargs="?", help="run config JSON file (check, show); output file (schema, optional)")
    parser.add_argument("--world-size", type=int, default=None, help="number of processes (default: tensor x context x pipeline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. train.steps=100 (repeatable)")


def main(args: argparse.Namespace) -> int:
    """Run the action; an invalid config prints every problem and gives exit code 2."""
    if args.action == "schema":
        text = json.dumps(config.json_schema(), indent=2)
        if args.config:
            Path(args.config).write_text(text + "\n")
        else:
            emit(text)
        return 0
    if not args.config:
        raise ConfigError(f"megalite config {args.action}: give the run config file")
    try:
        cfg = config.load(args.config, args.overrides, world_size=args.world_size)
    except ConfigError as e:
        emit(f"{args.config}: INVALID\n{e}")
        return 2
    world = args.world_size or cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context
    derived = config.summary(cfg, world)
    if args.action == "check":
        emit(
            f"{args.config}: OK - {derived['parameters'] / 1e6:.1f}M parameters, world {world} = "
            f"TP{derived['tensor_parallel']} x CP{derived['context_parallel']} x PP{derived['pipeline_parallel']} x "
            f"DP{derived['data_parallel']}"
            f"{', experts over EP' + str(derived['expert_parallel']) if derived['expert_parallel'] > 1 else ''}, "
            f"global batch {derived['global_batch_size']} ({derived['tokens_per_step']} tokens/step), "
            f"{derived['precision']}, ZeRO-{derived['zero_stage']}"
        )
    else:
        resolved = cfg.to_dict()
        resolved["deepspeed"] = config.resolve_deepspeed(cfg, world)
        derived["memory_per_gpu"] = _memory_per_gpu(cfg, world)
        emit(json.dumps({"config": resolved, "derived": derived}, indent=2))
    return 0


def _memory_per_gpu(cfg: config.Config, world: int) -> dict:
    """The plan's memory terms of the fullest stage, on this machine's GPU when the device table knows it, else on an
    H100 SXM."""
    from megalite.launch import local_gpu  # asks torch, on use
    from megalite.plan import DEVICES, device_named, memory_breakdown, memory_plan

    gpu = local_gpu()
    device = (device_named(*gpu) if gpu else None) or DEVICES["h100-sxm"]
    try:
        return memory_breakdown(memory_plan(cfg, world, device))
    except ConfigError as e:
        return {"error": str(e)}
