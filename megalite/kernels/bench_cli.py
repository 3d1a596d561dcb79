"""`megalite bench`: the kernel benchmark of the top-level `kernels/bench.py`, loaded from the checkout.

The benchmark lives beside its results in `kernels/`, outside the installed package; this module
finds it relative to the source tree (an editable install or a checkout on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

_BENCH = Path(__file__).resolve().parents[2] / "kernels" / "bench.py"


def _load() -> ModuleType:
    if not _BENCH.is_file():
        raise FileNotFoundError(
            f"megalite bench needs the source checkout's kernels/bench.py (looked for {_BENCH}); "
            "install megalite with `pip install -e .` from a checkout"
        )
    spec = importlib.util.spec_from_file_location("megalite_kernels_bench", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options on `parser`."""
    if _BENCH.is_file():
        _load().add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status."""
    return _load().main(args)
