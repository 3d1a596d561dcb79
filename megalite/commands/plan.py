"""`megalite plan RUN.json --world-size N [--device D] [--search]`: memory, communication and step time per GPU
of a layout before it runs (the cost model is the megalite.plan package)."""

from __future__ import annotations

import argparse
import json
import math

from megalite.commands.output import emit
from megalite.errors import ConfigError
from megalite.plan import ALLOWANCE_GIB, DEVICES, format_plan, get_device, plan
from megalite.plan.command import search_output
from megalite.plan.inputs import load_for_plan

HELP = "memory, communication and step time of a layout, or search for the best one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite plan`."""
    parser.add_argument("config", help="run config JSON file")
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--device", default="h100-sxm", help=f"one of {', '.join(DEVICES)} (default h100-sxm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. parallel.tensor=4 (repeatable)")
    parser.add_argument("--search", action="store_true", help="plan every layout and print the best ten")
    parser.add_argument("--json", action="store_true", help="print JSON (with --search: every layout)")
    parser.add_argument("--top", type=int, default=10, help="rows of the --search table (default 10)")
    for name, what in (("peak-tflops", "dense peak TFLOP/s for the training dtype"),
                       ("memory-gib", "device memory in GiB"), ("hbm-tbps", "memory bandwidth in TB/s"),
                       ("intra-node-gbps", "per-GPU NVLink bandwidth each way, GB/s"),
                       ("inter-node-gbps", "per-GPU network bandwidth each way, GB/s")):
        parser.add_argument(f"--{name}", type=float, default=None, help=f"override the device table: {what}")
    parser.add_argument("--allowance-gib", type=float, default=ALLOWANCE_GIB,
                        help=f"fixed memory allowance for the CUDA context and NCCL (default {ALLOWANCE_GIB})")


def main(args: argparse.Namespace) -> int:
    """Load, plan, print. Bad input raises ConfigError (exit 2 through the CLI)."""
    problems = []
    for key in ("peak_tflops", "memory_gib", "hbm_tbps", "intra_node_gbps", "inter_node_gbps", "allowance_gib"):
        value = getattr(args, key)
        flag = "--" + key.replace("_", "-")
        if value is not None and not math.isfinite(value):
            problems.append(f"{flag}: must be a finite number, got {value}")
        elif value is not None and not (value > 0 or (key == "allowance_gib" and value == 0)):
            problems.append(f"{flag}: must be {'>= 0' if key == 'allowance_gib' else '> 0'}, got {value}")
    if args.top < 1:
        problems.append(f"--top: must be >= 1 (rows of the --search table), got {args.top}")
    if problems:
        raise ConfigError(problems)
    device = get_device(args.device).with_overrides(
        peak_tflops=args.peak_tflops, memory_gib=args.memory_gib, hbm_tbps=args.hbm_tbps,
        intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
    # the one validation (as planning allows it: --search from an invalid layout, attention dropout)
    inputs = load_for_plan(args.config, args.overrides, args.world_size, args.search)
    if args.search:
        emit(search_output(inputs, args.world_size, device, args.gpus_per_node, args.allowance_gib, args.top,
                           args.json, str(args.config)))
        return 0
    p = plan(inputs.cfg, args.world_size, device, args.gpus_per_node, allowance_gib=args.allowance_gib)
    emit(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p, str(args.config)))
    return 0
