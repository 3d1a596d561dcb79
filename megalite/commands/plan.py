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
    assumptions = parser.add_argument_group(
        "what the plan assumes of the implementation (to plan other stacks' runs; megalite's own by default)")
    assumptions.add_argument("--attention", choices=("triton", "torch", "materialized"), default=None,
                             help="the attention implementation: megalite's kernels (default: as train.kernels) or "
                                  "a stored T x T softmax (Megatron-LM 2021, BLOOM)")
    assumptions.add_argument("--recompute-attention", action="store_true",
                             help="selective recompute of the attention core (Korthikanti et al. 2022; megalite has "
                                  "none)")
    assumptions.add_argument("--tp-overlap", action="store_true",
                             help="tensor-parallel collectives hidden behind their GEMMs (Megatron-Core; megalite's "
                                  "wait)")
    assumptions.add_argument("--sp-keeps-shard", action="store_true",
                             help="sequence-parallel layers keep their input's shard and gather it again in the "
                                  "backward (Megatron's; megalite's keep it gathered)")
    assumptions.add_argument("--engine", choices=("deepspeed", "megatron"), default=None,
                             help="deepspeed (default, megalite's): the pipeline engine's host work per micro-batch "
                                  "and BF16_Optimizer's fp32 gradient bookkeeping after each; megatron: Megatron-LM's "
                                  "runs, without them")
    assumptions.add_argument("--zero3-overlap", action="store_true",
                             help="hide ZeRO-3's gathers and reduce-scatters behind compute as far as DeepSpeed's "
                                  "prefetch and overlap_comm allow (default: charged in full)")


def assumptions_of(args: argparse.Namespace) -> dict:
    """The command line's planner-only assumptions as `Settings` fields (megalite.plan.estimate.assumed)."""
    assume: dict = {}
    if args.attention:
        assume["attention"] = args.attention
    if args.engine:
        assume["engine"] = args.engine
    for flag in ("recompute_attention", "tp_overlap", "zero3_overlap"):
        if getattr(args, flag):
            assume[flag] = True
    if args.sp_keeps_shard:
        assume["sp_saved_input"] = "shard"
    return assume


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
    assume = assumptions_of(args)
    if args.search:
        emit(search_output(inputs, args.world_size, device, args.gpus_per_node, args.allowance_gib, args.top,
                           args.json, str(args.config), assume))
        return 0
    p = plan(inputs.cfg, args.world_size, device, args.gpus_per_node, allowance_gib=args.allowance_gib, assume=assume)
    emit(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p, str(args.config)))
    return 0
