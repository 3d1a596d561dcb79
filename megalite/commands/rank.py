"""One rank of a batch job: the `megalite` command, then a quick exit with its code (slurm/rank.sh runs
`python -m megalite.commands.rank SUBCOMMAND ...`)."""

from __future__ import annotations

import traceback
from typing import NoReturn

from megalite import cli


def rank_main(argv: list[str] | None = None) -> NoReturn:
    """One rank under the batch scripts (`python -m megalite.commands.rank SUBCOMMAND ...`, see slurm/rank.sh):
    the `megalite` command, then a quick exit with its code (see megalite.launch.exit_now)."""
    try:
        code = int(cli.main(argv) or 0)
    except SystemExit as e:  # argparse errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like the interpreter would, then exit the same quick way
        traceback.print_exc()
        code = 1
    # Imported after the command: `megalite train` catches preemption signals before torch loads.
    from megalite.launch import exit_now

    exit_now(code)


if __name__ == "__main__":
    rank_main()
