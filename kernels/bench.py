#!/usr/bin/env python3
"""The kernel benchmark, from a checkout: the same as `megalite bench kernels [options]` (megalite/bench/kernels.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing megalite

from megalite.bench.kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
