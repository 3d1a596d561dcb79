"""Measure checkpoint save / verify / load time against a 30 s preemption grace period (not a test).

    .venv/bin/python tests/ckpt_bench.py [--params-m 42] [--stage 1] [--root /tmp/ckpt-bench]

Runs 2 gloo ranks (tests/distributed.py) on an MLP of about --params-m million fp32 parameters with
AdamW under DeepSpeed ZeRO --stage, takes one step, then times CheckpointManager.save, find_resume
(which hashes every file) and load. Prints one JSON line per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(root: str, params_m: float, stage: int) -> dict:
    import torch
    import torch.distributed as dist

    from megalite.engine.checkpoint import CheckpointManager
    from tests.ckpt_common import setup_deepspeed

    deepspeed = setup_deepspeed()
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    loss = engine(torch.randn(2, width)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    mgr = CheckpointManager(root, keep=2, layout={"world_size": dist.get_world_size(), "zero_stage": stage})
    dist.barrier()
    t0 = time.perf_counter()
    path = mgr.save(engine, 1, {"consumed": 1})
    t1 = time.perf_counter()
    found = mgr.find_resume("must")
    t2 = time.perf_counter()
    mgr.load(engine, found)
    t3 = time.perf_counter()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return {"rank": dist.get_rank(), "params": n_params, "zero_stage": stage, "bytes": size,
            "save_s": round(t1 - t0, 2), "verify_s": round(t2 - t1, 2), "load_s": round(t3 - t2, 2)}


def main() -> None:
    """Parse arguments, run the 2-rank benchmark, print the results."""
    from tests.distributed import run_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--params-m", type=float, default=42.0)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--root", default="/tmp/ckpt-bench")
    args = ap.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for res in run_ranks(_bench, 2, args.root, args.params_m, args.stage, timeout_s=600, collective_timeout_s=300):
        print(json.dumps(res))
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
