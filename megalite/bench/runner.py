"""Dispatch `megalite bench [NAME] [options]` to one benchmark module's own `main(argv)`."""

from __future__ import annotations

import importlib

from megalite.bench import BENCHMARKS


def split_name(argv: list[str]) -> tuple[str, list[str]]:
    """(benchmark name, its arguments); without a name, the kernel benchmark. `eval-harness` is `eval_harness`."""
    if argv and argv[0].replace("-", "_") in BENCHMARKS:
        return argv[0].replace("-", "_"), argv[1:]
    return "kernels", argv


def run(argv: list[str]) -> int:
    """Run one benchmark with its own arguments; returns its exit status."""
    name, rest = split_name(argv)
    return int(importlib.import_module(f"megalite.bench.{name}").main(rest) or 0)
