"""megalite's training step against a plain PyTorch loop (DDP + AdamW) of the same model, data, batch
and process count, side by side in one run.

    megalite bench overhead [--config configs/runs/demo-cpu.json] [--steps 30] [--nproc 2] [--out DIR]

Runs `torchrun --nproc_per_node N` twice (plain, then megalite), times steps after a warm-up, and
prints both medians and the ratio (and writes DIR/overhead.json). Needs the demo data (`make demo`
prepares it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megalite.bench import write_json

WARMUP = 5


def plain(cfg, steps: int) -> list[float]:  # noqa: ANN001
    """A hand-written DDP loop: the alternative a user would write without megalite."""
    import torch
    import torch.distributed as dist

    from megalite.data import ResumableSampler, build_datasets
    from megalite.model import build_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg.model, None, None, seed=cfg.train.seed)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = cfg.deepspeed["optimizer"]["params"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": params["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=params["lr"], betas=tuple(params["betas"]))
    train_set, _, _ = build_datasets(cfg.data.prefixes, None, cfg.data.split, cfg.data.seq_length, cfg.train.seed)
    sampler = iter(ResumableSampler(len(train_set), rank, world, cfg.micro_batch_size, cfg.train.seed))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        items = [train_set[i] for i in next(sampler)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        loss = ddp(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.get("gradient_clipping", 1.0))
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def megalite_steps(cfg, steps: int) -> list[float]:  # noqa: ANN001
    """The same through megalite's Trainer (DeepSpeed engine, metrics, agreement all-reduces)."""
    from megalite.engine.trainer import Trainer

    run = Trainer(cfg)
    times = []
    original = run.train_step

    def timed(timer):  # noqa: ANN001
        start = time.perf_counter()
        out = original(timer)
        times.append(time.perf_counter() - start)
        return out

    run.train_step = timed
    run.train()
    return times


def worker(args: argparse.Namespace) -> None:
    from megalite import config

    overrides = [f"train.steps={args.steps}", "train.eval_interval=0", "train.resume=never",
                 f"train.output_dir={args.out}/{args.mode}", "train.logging.plot=false",
                 "train.log_interval=1000000", "train.eval_steps=1", *args.overrides]
    cfg = config.load(args.config, overrides)
    times = plain(cfg, args.steps) if args.mode == "plain" else megalite_steps(cfg, args.steps)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(times))


def main(argv: list[str] | None = None) -> int:
    """`megalite bench overhead [options]`."""
    parser = argparse.ArgumentParser(prog="megalite bench overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/runs/demo-cpu.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both loops, e.g. deepspeed.zero_optimization.stage=0")
    parser.add_argument("--out", default="out/bench-overhead", help="results folder (default: out/bench-overhead)")
    parser.add_argument("--mode", choices=["plain", "megalite"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        worker(args)
        return 0
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    medians = {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for mode in ("plain", "megalite"):
        result = f"{args.out}/{mode}-times.json"
        extra = [a for kv in args.overrides for a in ("--set", kv)]
        subprocess.run([torchrun, "--nproc_per_node", str(args.nproc), "-m", "megalite.bench.overhead", "--mode", mode,
                        "--config", args.config, "--steps", str(args.steps), "--out", args.out, "--result", result,
                        *extra], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times = json.loads(Path(result).read_text())[WARMUP:]
        medians[mode] = statistics.median(times)
        print(f"{mode:9s} median step {medians[mode] * 1000:.1f} ms over {len(times)} steps")
    ratio = medians["megalite"] / medians["plain"]
    print(f"megalite / plain PyTorch step time: {ratio:.3f} ({(ratio - 1) * 100:+.1f}% overhead)")
    write_json(Path(args.out) / "overhead.json", {"config": args.config, "overrides": args.overrides,
                                                  "nproc": args.nproc, "steps": args.steps, "warmup": WARMUP,
                                                  "median_step_s": medians, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
