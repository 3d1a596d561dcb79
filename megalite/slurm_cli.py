"""`megalite slurm CONFIG --nodes N --gpus-per-node G [--submit]`: a batch script from slurm/'s templates.

The templates are the repository's `slurm/train-{srun,torchrun,deepspeed}.sbatch`; this fills in
their `#SBATCH` lines and the environment (repository, config, ranks per node), validates the
config against the world size first, and with `--submit` hands the script to `sbatch`.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "slurm"
LAUNCHERS = ("srun", "torchrun", "deepspeed")


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


def _set_directive(lines: list[str], option: str, value: str | None) -> list[str]:
    """Replace `#SBATCH --option=...` (or its commented-out form); value None removes it; append if absent."""
    pattern = re.compile(rf"^(#\s*)?#SBATCH\s+--{re.escape(option)}(=|\s|$)")
    out, done = [], False
    for line in lines:
        if pattern.match(line):
            if value is not None and not done:
                out.append(f"#SBATCH --{option}={value}")
                done = True
            continue
        out.append(line)
    if value is not None and not done:
        last = max(i for i, line in enumerate(out) if line.startswith("#SBATCH"))
        out.insert(last + 1, f"#SBATCH --{option}={value}")
    return out


def render(args: argparse.Namespace, config_path: Path, ranks_per_node: int) -> str:
    """The batch script text for these arguments."""
    template = TEMPLATES / f"train-{args.launcher}.sbatch"
    lines = template.read_text().splitlines()
    tasks = ranks_per_node if args.launcher == "srun" else 1
    cpus = args.cpus_per_task
    if cpus is None and args.gpus_per_node == 0:
        cpus = 1 if args.launcher == "srun" else ranks_per_node
    directives: dict[str, str | None] = {
        "job-name": args.job_name,
        "nodes": str(args.nodes),
        "ntasks-per-node": str(tasks),
        "gpus-per-node": str(args.gpus_per_node) if args.gpus_per_node > 0 else None,
        "cpus-per-task": str(cpus) if cpus is not None else None,
        "signal": f"B:USR1@{args.signal_seconds}",
        "chdir": str(Path.cwd()),  # relative paths in the config resolve as they do here
    }
    if args.time:
        directives["time"] = args.time
    if args.partition:
        directives["partition"] = args.partition
    if args.account:
        directives["account"] = args.account
    if args.log:
        directives["output"] = str(Path(args.log).absolute())
    for option, value in directives.items():
        if value is None and option == "cpus-per-task":
            continue  # keep the template's value
        lines = _set_directive(lines, option, value)

    argv = [str(config_path)] + [x for o in args.overrides for x in ("--set", o)]
    block = [
        f"# Written by `megalite slurm` on {datetime.datetime.now().isoformat(timespec='seconds')} from {template.name}",
        f"export MEGALITE_HOME={shlex.quote(str(REPO))}",
        f"export MEGALITE_GPUS_PER_NODE={args.gpus_per_node}",
        f"export MEGALITE_PROCS_PER_NODE={ranks_per_node}",
    ]
    if args.preflight:
        block.append("export MEGALITE_PREFLIGHT=1")
    block += [
        "if [[ $# -eq 0 ]]; then",
        f"    set -- {' '.join(shlex.quote(a) for a in argv)}",
        "fi",
    ]
    anchor = next(i for i, line in enumerate(lines) if line.startswith(("# The job runs a copy", "MEGALITE_HOME=")))
    lines[anchor:anchor] = block + [""]
    # The script may live outside the repository: point shellcheck at the real helper.
    lines = [f"# shellcheck source={REPO / 'slurm' / 'common.sh'}" if line == "# shellcheck source=common.sh" else line
             for line in lines]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    """Validate, write the script, and submit it with --submit; prints the path (and sbatch's answer)."""
    from megalite import config
    from megalite.errors import ConfigError

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
    print(f"megalite slurm: wrote {out} ({args.launcher}, {args.nodes} nodes x {ranks_per_node} "
          f"{'GPUs' if args.gpus_per_node else 'CPU ranks'}, world size {args.nodes * ranks_per_node})")
    if not args.submit:
        print(f"submit with: sbatch {shlex.quote(str(out))}")
        return 0
    if shutil.which("sbatch") is None:
        print("megalite slurm: sbatch not found on PATH; submit the script on a SLURM login node", file=sys.stderr)
        return 1
    result = subprocess.run(["sbatch", *args.sbatch_arg, str(out)], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def rank_main(argv: list[str] | None = None) -> NoReturn:
    """One rank under the batch scripts (`python -m megalite.slurm_cli SUBCOMMAND ...`, see slurm/rank.sh):
    the `megalite` command, then a quick exit with its code (see megalite.engine.launch.exit_now)."""
    import traceback

    from megalite import cli
    from megalite.engine.launch import exit_now

    try:
        code = int(cli.main(argv) or 0)
    except SystemExit as e:  # argparse errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like the interpreter would, then exit the same quick way
        traceback.print_exc()
        code = 1
    exit_now(code)


if __name__ == "__main__":
    rank_main()
