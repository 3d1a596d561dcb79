"""Time building (and initialising) a preset model on the CPU: `megalite bench init [PRESET] [--out DIR]`.

Set LOCAL_WORLD_SIZE=N to see the thread count that N ranks per node would each get.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from megalite import config
from megalite.bench import write_json
from megalite.model import build_model, weights


def main(argv: list[str] | None = None) -> int:
    """Build the preset once, print and write the time."""
    parser = argparse.ArgumentParser(prog="megalite bench init", description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="llama-1b", help="a preset in configs/models (default llama-1b)")
    parser.add_argument("--out", default="out/bench-init", help="results folder (default: out/bench-init)")
    args = parser.parse_args(argv)
    cfg = config.model_config_from_dict(config.expand_references({"model": args.preset}, None)["model"], args.preset)
    t0 = time.perf_counter()
    model = build_model(cfg, seed=1)
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    threads = weights.init_threads()
    print(f"{args.preset}: {n / 1e9:.2f}B parameters, {threads} init threads, build_model {seconds:.1f} s")
    write_json(Path(args.out) / f"init-{args.preset}.json", {"preset": args.preset, "parameters": n,
                                                            "init_threads": threads, "seconds": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
