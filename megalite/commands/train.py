"""`megalite train CONFIG [--set KEY=VALUE ...]`."""

from __future__ import annotations

import argparse

from megalite.engine.signals import catch_preemption_early

HELP = "train a model with DeepSpeed"


def at_process_start() -> None:
    """Before anything else of the process (megalite.cli calls it first): a preemption signal during the slow imports
    and set-up must lead to a requeue (exit 75), not a dead job."""
    catch_preemption_early()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite train`."""
    parser.add_argument("config", help="run config JSON file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. train.steps=100 or parallel.tensor=2 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    """Load and validate the config for the launcher's world size (before any process group exists: a bad config
    fails fast on every rank), then train; the trainer does not validate it again."""
    from megalite import config
    from megalite.engine.trainer import train
    from megalite.launch import exit_now, world_size

    world = world_size()
    cfg = config.load(args.config, args.overrides, world_size=world)
    exit_now(train(cfg, validated_world=world))  # every file was closed by train(); skip the interpreter's finalisation
