"""`megalite slurm CONFIG --nodes N --gpus-per-node G [--submit]`: write (and submit) a batch script."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from megalite import config
from megalite.commands.output import emit
from megalite.engine.slurm import LAUNCHERS, render
from megalite.errors import ConfigError

HELP = "write (and submit) a SLURM batch script"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite slurm`."""
    parser.add_argument("config", help="run config JSON file")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= ranks) per node; 0: CPU ranks")
    parser.add_argument("--procs-per-node", type=int, default=1, help="ranks per node when --gpus-per-node is 0")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="srun",
                        help="srun: one task per GPU (recommended); torchrun or deepspeed: one task per node")
    parser.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: the template's)")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="USR1 this many seconds before the time limit: save and requeue (default 300)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the template's)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--job-name", default="megalite")
    parser.add_argument("--log", default=None, help="job log file (default: megalite-%%x-%%j.out in the submit dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. train.steps=100 (repeatable)")
    parser.add_argument("--preflight", action="store_true", help="run `megalite preflight` on all ranks first")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra sbatch option for --submit, e.g. --sbatch-arg=--qos=high (repeatable)")
    parser.add_argument("-o", "--output", default=None,
                        help="where to write the script (default: <train.output_dir>/<job-name>-<launcher>.sbatch)")
    parser.add_argument("--submit", action="store_true", help="submit the script with sbatch")


def main(args: argparse.Namespace) -> int:
    """Validate, write the script, and submit it with --submit; prints the path (and sbatch's answer)."""
    if args.nodes < 1:
        raise ConfigError(f"--nodes: must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0 or args.procs_per_node < 1:
        raise ConfigError("--gpus-per-node must be >= 0 and --procs-per-node >= 1")
    ranks_per_node = args.gpus_per_node or args.procs_per_node
    config_path = Path(args.config).resolve()
    cfg = config.load(config_path, args.overrides, world_size=args.nodes * ranks_per_node)
    text = render(args, config_path, ranks_per_node)
    out = Path(args.output) if args.output else Path(cfg.train.output_dir) / f"{args.job_name}-{args.launcher}.sbatch"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o755)
    emit(f"megalite slurm: wrote {out} ({args.launcher}, {args.nodes} nodes x {ranks_per_node} "
          f"{'GPUs' if args.gpus_per_node else 'CPU ranks'}, world size {args.nodes * ranks_per_node})")
    if not args.submit:
        emit(f"submit with: sbatch {shlex.quote(str(out))}")
        return 0
    if shutil.which("sbatch") is None:
        print("megalite slurm: sbatch not found on PATH; submit the script on a SLURM login node", file=sys.stderr)
        return 1
    result = subprocess.run(["sbatch", *args.sbatch_arg, str(out)], capture_output=True, text=True)
    emit(result.stdout.rstrip("\n"))
    sys.stderr.write(result.stderr)
    return result.returncode
