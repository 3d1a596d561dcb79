"""The `megalite` command: parse arguments and run one subcommand of `megalite.commands`.

Each subcommand runs with stdout redirected to stderr; its result alone goes to the real stdout
(`megalite.commands.output`), so a pipe or a redirect gets the result and no library log lines.
Errors megalite raises on purpose (bad configuration, data or checkpoint) print one message and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from megalite.commands import output
from megalite.errors import MegaliteError

# name -> module under megalite.commands (each has HELP, add_arguments(parser), main(args) -> int)
COMMANDS = {
    "config": "config",
    "prepare": "prepare",
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "convert": "convert",
    "checkpoint": "checkpoint",
    "bench": "bench",
    "preflight": "preflight",
    "plan": "plan",
    "slurm": "slurm",
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="megalite", description="megalite: pretrain GPT and Llama models with DeepSpeed, tensor parallelism and Triton kernels"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"megalite.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `megalite` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # a command that must act before the other modules load (train: signals)
        early = getattr(importlib.import_module(f"megalite.commands.{COMMANDS[argv[0]]}"), "at_process_start", None)
        if early is not None:
            early()
    parser = build_parser()
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # Each benchmark parses its own options (`megalite bench NAME --help` lists them).
        args = argparse.Namespace(command="bench", _module=importlib.import_module("megalite.commands.bench"),
                                  args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    output.set_result_stream(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return int(args._module.main(args) or 0)
    except MegaliteError as e:
        print(f"megalite {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; 130 is the shell's code for SIGINT
        print(f"megalite {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        output.set_result_stream(None)


if __name__ == "__main__":
    sys.exit(main())
