"""When DeepSpeed's ZeRO-3 gathers each module's parameters, against when the module runs: the timeline the plan's
overlap model (`megalite.plan.timing.zero3_exposed_seconds`) assumes.

    megalite bench zero3 [--layers 8] [--width 256] [--steps 3] [--out kernels/results/zero3-cpu]

Two CPU processes over gloo train a stack of `--layers` linear layers of `--width` x `--width` under DeepSpeed's ZeRO-3
(nothing persistent), once per stage3_prefetch_bucket_size: 0 (prefetch off), one layer's elements, and DeepSpeed's
default (5e7, the whole model). Each rank records, for every layer and pass, when DeepSpeed's parameter coordinator
asked for that layer's parameters (its private `__all_gather_params`, wrapped) and when the layer's forward or
backward ran (module hooks, after DeepSpeed's own). For each layer after the first it reports whether its gather was
issued before the previous layer's compute ended (prefetched: it can run under that compute) or only after (it
waits). The plan assumes: with a bucket of at least one layer, every gather but the first module's of a pass is
prefetched; with 0, none. Writes DIR/zero3.json and DIR/zero3.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from megalite.bench import join_local_world, write_json


def _timeline(width: int, layers: int, bucket: int, steps: int) -> list[tuple[str, int, float]]:
    """The last step's events of a ZeRO-3 engine over `layers` linear layers: (kind, layer, time)."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_prefetch_bucket_size": bucket}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                      config=config)
    events: list[tuple[str, int, float]] = []
    owner = {id(p): i for i, layer in enumerate(model) for p in layer.parameters()}
    name = "_PartitionedParameterCoordinator__all_gather_params"
    original = getattr(PartitionedParameterCoordinator, name)

    def gathered(self: Any, params: Any, forward: bool) -> Any:
        now = time.perf_counter()
        events.extend(("gather", owner.get(id(p), -1), now) for p in params)
        return original(self, params, forward)

    def mark(kind: str, i: int) -> Any:
        return lambda *_: events.append((kind, i, time.perf_counter()))

    setattr(PartitionedParameterCoordinator, name, gathered)
    try:
        for i, layer in enumerate(model):
            layer.register_forward_pre_hook(mark("forward start", i))
            layer.register_forward_hook(mark("forward end", i))
            layer.register_full_backward_pre_hook(mark("backward start", i))
            layer.register_full_backward_hook(mark("backward end", i))
        x = torch.randn(4, width)
        for _ in range(steps):
            events.clear()
            engine.backward(engine(x).pow(2).mean())
            engine.step()
    finally:
        setattr(PartitionedParameterCoordinator, name, original)
    return list(events)


def _rank(rank: int, world: int, port: int, args: dict, results: Any) -> None:
    import torch.distributed as dist

    join_local_world(rank, world, port, timeout_s=120)
    out = {}
    width, layers = args["width"], args["layers"]
    buckets = (("off", 0), ("one layer", width * width), ("a quarter of the model", width * width * layers // 4),
               ("three eighths", width * width * layers * 3 // 8), ("half the model", width * width * layers // 2),
               ("default 5e7", int(5e7)))
    for label, bucket in buckets:
        out[label] = {"bucket": bucket, "events": _timeline(width, layers, bucket, args["steps"])}
    results.put(("ok", rank, out))
    dist.barrier()
    dist.destroy_process_group()


def prefetched(events: list, layers: int) -> dict:
    """Per pass, how many layers' gathers were issued before the layer computed just before them had ended. The
    forward runs layers 0..L-1, the backward L-1..0; a layer whose parameters are still there (not released after the
    forward) needs no gather in the backward."""
    out = {}
    for passname, order in (("forward", range(layers)), ("backward", range(layers - 1, -1, -1))):
        ends = {i: t for kind, i, t in events if kind == f"{passname} end"}
        starts = {i: t for kind, i, t in events if kind == f"{passname} start"}
        first_start = min(starts.values()) if starts else 0.0
        gathers: dict[int, float] = {}
        for kind, i, t in events:
            if kind == "gather" and i >= 0 and i not in gathers:
                in_pass = (t < max(ends.values(), default=0.0)) if passname == "forward" else t >= first_start - 1e-3
                if passname == "forward" and not in_pass:
                    continue
                if passname == "backward" and t < min((e for k, _, e in events if k == "forward end"),
                                                      default=0.0):
                    continue
                gathers[i] = t
        order = list(order)
        ahead = waited = 0
        for prev, layer in zip(order, order[1:]):
            if layer not in gathers:
                continue  # still resident: nothing to gather
            if prev in ends and gathers[layer] < ends[prev]:
                ahead += 1
            else:
                waited += 1
        out[passname] = {"gathered": len(gathers), "issued_ahead": ahead, "waited": waited}
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| prefetch bucket | forward: gathers issued before the previous layer ended (plan) | forward: after | "
             "backward: layers gathered again (plan) |", "|---|---|---|---|"]
    for r in rows:
        f, b = r["forward"], r["backward"]
        lines.append(f"| {r['label']} ({r['bucket']:,}) | {f['issued_ahead']} of {f['gathered']} ({r['plan']['ahead']}) "
                     f"| {f['waited']} | {b['gathered']} ({r['plan']['again']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megalite bench zero3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="out/bench-zero3")
    args = parser.parse_args(argv)
    from megalite.local_ranks import spawn_local_ranks

    settings = {"layers": args.layers, "width": args.width, "steps": args.steps}
    out, errors, codes = spawn_local_ranks(_rank, 2, settings)
    if errors or len(out) != 2:
        print("\n".join(errors) or f"exit codes {codes}", file=sys.stderr)
        return 1
    rows = []
    partitioned = args.width * args.width * args.layers
    for label, run in out[0].items():
        bucket = run["bucket"]
        # the plan's model (megalite.plan.communication.zero3_traffic): prefetched but the first; gathered again in
        # the backward: max(0, 1 - 2 x bucket / partitioned) of the layers
        plan = {"ahead": args.layers - 1 if bucket > 0 else 0,
                "again": round(args.layers * max(0.0, 1 - 2 * bucket / partitioned))}
        rows.append({"label": label, "bucket": bucket, "plan": plan, **prefetched(run["events"], args.layers)})
    folder = Path(args.out)
    write_json(folder / "zero3.json", {"settings": settings, "rows": rows,
                                       "events_rank0": {k: v["events"] for k, v in out[0].items()}})
    text = markdown(rows)
    (folder / "zero3.md").write_text(text)
    print(text)
    return 0
