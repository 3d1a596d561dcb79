"""`megalite bench [NAME] [options]`: run one of megalite's benchmarks (default: the kernel benchmark)."""

from __future__ import annotations

import argparse

from megalite.bench import BENCHMARKS

HELP = f"run a benchmark: {', '.join(BENCHMARKS)} (default kernels); `megalite bench NAME --help` for its options"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite bench`: the benchmark's name, then its own options."""
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="[NAME] ...",
                        help=f"one of {', '.join(BENCHMARKS)} (default kernels), then that benchmark's options")


def main(args: argparse.Namespace) -> int:
    """Dispatch to the benchmark's own main(argv)."""
    from megalite.bench.runner import run

    return run(list(args.args))
