"""Checkpoint save, verify and load time on two ranks, against the usual 30 s preemption grace period.

    megalite bench checkpoint [--params-m 42] [--stage 1] [--root /tmp/ckpt-bench] [--out DIR]

Runs `torchrun --nproc_per_node 2` over an MLP of about --params-m million fp32 parameters with AdamW under
DeepSpeed ZeRO --stage, takes one step, then times CheckpointManager.save, find_resume (which hashes
every file) and load on each rank. Writes DIR/checkpoint.json and prints one line per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megalite.bench import write_json


def _rank(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from megalite.checkpoint import CheckpointManager
    from megalite.engine.launch import init_distributed

    init_distributed(300)
    width = 2048
    layers = max(1, round(args.params_m * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    loss = engine(torch.randn(2, width)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    mgr = CheckpointManager(args.root, keep=2, layout={"world_size": dist.get_world_size(), "zero_stage": args.stage})
    dist.barrier()
    t0 = time.perf_counter()
    path = mgr.save(engine, 1, {"consumed": 1})
    t1 = time.perf_counter()
    found = mgr.find_resume("must")
    t2 = time.perf_counter()
    mgr.load(engine, found)
    t3 = time.perf_counter()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    result = {"rank": dist.get_rank(), "params": n_params, "zero_stage": args.stage, "bytes": size,
              "save_s": round(t1 - t0, 2), "verify_s": round(t2 - t1, 2), "load_s": round(t3 - t2, 2)}
    Path(args.result + f".rank{dist.get_rank()}").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run the two ranks, gather and write their timings."""
    ap = argparse.ArgumentParser(prog="megalite bench checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("--params-m", type=float, default=42.0)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--root", default="/tmp/ckpt-bench", help="checkpoint directory (removed before and after)")
    ap.add_argument("--out", default="out/bench-checkpoint", help="results folder (default: out/bench-checkpoint)")
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.result:
        _rank(args)
        return 0
    shutil.rmtree(args.root, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = str(Path(args.out) / "rank-times")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "megalite.bench.checkpoint", "--params-m",
                    str(args.params_m), "--stage", str(args.stage), "--root", args.root, "--result", result],
                   check=True, env=env)
    ranks = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(2)]
    for r in ranks:
        print(json.dumps(r))
    write_json(Path(args.out) / "checkpoint.json", {"params_m": args.params_m, "stage": args.stage, "ranks": ranks})
    shutil.rmtree(args.root, ignore_errors=True)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
