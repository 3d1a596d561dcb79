"""Checkpoint save, verify and load time on two ranks, synchronous against asynchronous saves.

    megalite bench checkpoint [--params-m 42] [--stage 1] [--steps 40] [--every 10] [--root /tmp/ckpt-bench]
                              [--out DIR]

Runs `torchrun --nproc_per_node 2` over an MLP of about --params-m million fp32 parameters with AdamW under
DeepSpeed ZeRO --stage, takes one step, then times on each rank: CheckpointManager.save (the synchronous stall),
find_resume (which hashes every file) and load; save_async's stall (the snapshot into host memory: the first,
which allocates it, and the second, which reuses it) and its background write and commit. Then three runs of --steps training steps side by side: without saving, saving every
--every steps synchronously, and asynchronously; steps/s of each. Writes DIR/checkpoint.json, prints one line per
rank.
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

BATCH = 32  # rows per step: enough compute that a step is not all optimizer


def _rank(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from megalite.checkpoint import CheckpointManager
    from megalite.launch import init_distributed

    init_distributed(300)
    width = 2048
    layers = max(1, round(args.params_m * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": args.stage},
           "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)

    def step() -> None:
        loss = engine(torch.randn(BATCH, width)).pow(2).mean()
        engine.backward(loss)
        engine.step()

    step()
    layout = {"world_size": dist.get_world_size(), "zero_stage": args.stage}
    mgr = CheckpointManager(f"{args.root}/sync", keep=2, layout=layout, background=True)
    dist.barrier()
    t0 = time.perf_counter()
    path = mgr.save(engine, 1, {"consumed": 1})
    t1 = time.perf_counter()
    found = mgr.find_resume("must")
    t2 = time.perf_counter()
    mgr.load(engine, found)
    t3 = time.perf_counter()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    dist.barrier()
    # The first snapshot allocates its host memory; later ones copy into the same buffers.
    first = mgr.save_async(engine, 2, {"consumed": 2})
    mgr.wait()
    dist.barrier()
    pending = mgr.save_async(engine, 3, {"consumed": 3})
    mgr.wait()
    result = {"rank": dist.get_rank(), "params": n_params, "zero_stage": args.stage, "bytes": size,
              "save_s": round(t1 - t0, 3), "verify_s": round(t2 - t1, 3), "load_s": round(t3 - t2, 3),
              "async_first_stall_s": round(first.snapshot_s, 3),
              "async_stall_s": round(pending.snapshot_s, 3), "async_write_s": round(pending.write_s or 0.0, 2),
              "snapshot_bytes": pending.snapshot_bytes,
              "async_stall_over_save": round(pending.snapshot_s / (t1 - t0), 3)}

    runs = {}
    for mode in ("none", "sync", "async"):
        shutil.rmtree(f"{args.root}/{mode}-run", ignore_errors=True)
        run_mgr = CheckpointManager(f"{args.root}/{mode}-run", keep=2, layout=layout, background=True)
        stalls = []
        dist.barrier()
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            step()
            if mode != "none" and i % args.every == 0:
                t = time.perf_counter()
                if mode == "sync":
                    run_mgr.save(engine, i, {"consumed": i})
                else:
                    run_mgr.save_async(engine, i, {"consumed": i})
                stalls.append(time.perf_counter() - t)
        run_mgr.wait()  # the run is over when its last checkpoint is committed
        seconds = time.perf_counter() - start
        runs[mode] = {"seconds": round(seconds, 3), "steps_per_s": round(args.steps / seconds, 3),
                      "stall_s": [round(x, 2) for x in stalls]}
    result["runs"] = runs
    result["async_over_sync_steps_per_s"] = round(runs["async"]["steps_per_s"] / runs["sync"]["steps_per_s"], 3)
    Path(args.result + f".rank{dist.get_rank()}").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run the two ranks, gather and write their timings."""
    ap = argparse.ArgumentParser(prog="megalite bench checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("--params-m", type=float, default=42.0)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40, help="training steps of each side-by-side run")
    ap.add_argument("--every", type=int, default=10, help="save every N steps in those runs")
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
                    str(args.params_m), "--stage", str(args.stage), "--steps", str(args.steps), "--every",
                    str(args.every), "--root", args.root, "--result", result],
                   check=True, env=env)
    ranks = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(2)]
    for r in ranks:
        print(json.dumps(r))
    write_json(Path(args.out) / "checkpoint.json", {"params_m": args.params_m, "stage": args.stage, "steps": args.steps,
                                                   "every": args.every, "ranks": ranks})
    shutil.rmtree(args.root, ignore_errors=True)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
