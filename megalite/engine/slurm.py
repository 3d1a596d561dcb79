"""SLURM batch scripts from the shipped templates (`megalite/slurm/train-{srun,torchrun,deepspeed}.sbatch`).

The templates and their helpers (common.sh, rank.sh, node.sh) ship inside the package, so an installed
megalite writes scripts too; `render` fills in a template's `#SBATCH` lines and the environment that
finds the helpers, the virtual environment and the run config.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
TEMPLATES = PACKAGE / "slurm"
LAUNCHERS = ("srun", "torchrun", "deepspeed")


def source_checkout() -> Path | None:
    """The repository root when megalite runs from a source checkout (its `slurm/` beside the package)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "megalite").is_dir() else None


def set_directive(lines: list[str], option: str, value: str | None) -> list[str]:
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
    """The batch script text for `megalite slurm`'s arguments (launcher, nodes, gpus_per_node, time, ...)."""
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
        lines = set_directive(lines, option, value)

    argv = [str(config_path)] + [x for o in args.overrides for x in ("--set", o)]
    block = [
        f"# Written by `megalite slurm` on {datetime.datetime.now().isoformat(timespec='seconds')} from {template.name}",
        f"export MEGALITE_HOME={shlex.quote(str(source_checkout() or Path.cwd()))}",
        f"export MEGALITE_SLURM_DIR={shlex.quote(str(TEMPLATES))}",
        f"export MEGALITE_GPUS_PER_NODE={args.gpus_per_node}",
        f"export MEGALITE_PROCS_PER_NODE={ranks_per_node}",
    ]
    if sys.prefix != sys.base_prefix:  # the virtual environment this megalite runs in
        block.append(f"export MEGALITE_VENV=${{MEGALITE_VENV:-{shlex.quote(sys.prefix)}}}")
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
    lines = [f"# shellcheck source={TEMPLATES / 'common.sh'}" if line == "# shellcheck source=common.sh" else line
             for line in lines]
    return "\n".join(lines) + "\n"


