"""The `megalite` command: parse arguments and call one function elsewhere.

Each subcommand lives in a module exposing `add_arguments(parser)` and `main(args) -> int`;
those modules keep heavy imports (torch, deepspeed, datasets) inside their functions so that
`megalite --help` and `megalite config check` stay fast on a login node.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megalite.errors import MegaliteError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("megalite.config_cli", "check or show a run configuration"),
    "prepare": ("megalite.data.prepare", "clean, tokenize and index a corpus (Megatron .bin/.idx)"),
    "train": ("megalite.engine.train_cli", "train a model with DeepSpeed"),
    "eval": ("megalite.evaluate", "loss, perplexity and accuracy of a checkpoint"),
    "generate": ("megalite.generate", "sample text from a checkpoint"),
    "convert": ("megalite.interop.convert_cli", "convert between Hugging Face and megalite checkpoints"),
    "checkpoint": ("megalite.engine.checkpoint_cli", "list a run's checkpoints, or verify one against its manifest"),
    "bench": ("megalite.kernels.bench_cli", "benchmark the kernels against the alternatives"),
    "preflight": ("megalite.engine.preflight", "check a cluster job before it starts"),
    "plan": ("megalite.engine.plan", "memory, communication and step time of a layout, or search for the best one"),
    "slurm": ("megalite.slurm_cli", "write (and submit) a SLURM batch script"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser; subcommands whose module is absent in this build are listed as unavailable."""
    parser = argparse.ArgumentParser(
        prog="megalite", description="megalite: pretrain GPT and Llama models with DeepSpeed, tensor parallelism and Triton kernels"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # not part of this build yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `megalite` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except MegaliteError as e:
        print(f"megalite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
