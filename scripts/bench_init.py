#!/usr/bin/env python3
"""Time building (and initialising) a preset model on the CPU: `python scripts/bench_init.py [PRESET]`.

Set LOCAL_WORLD_SIZE=N to see the thread count that N ranks per node would each get.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite import config  # noqa: E402
from megalite.model import build_model, weights  # noqa: E402


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "llama-1b"
    cfg = config.model_config_from_dict(config.expand_references({"model": preset}, None)["model"], preset)
    t0 = time.perf_counter()
    model = build_model(cfg, seed=1)
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {n / 1e9:.2f}B parameters, {weights._init_threads()} init threads, build_model {seconds:.1f} s")


if __name__ == "__main__":
    main()
