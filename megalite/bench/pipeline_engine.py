"""DeepSpeed's pipeline engine, measured: how its schedule spends a step, and its per-instruction host cost.

    megalite bench pipeline-engine [--stages 2 4] [--micro-batches 1 2 4 8] [--forward-ms 50 --backward-ms 150]
                                   [--steps 3] [--out kernels/results/pipeline-engine-cpu]

For each number of stages p: p CPU processes over gloo, one pipeline stage each (data parallelism 1), run DeepSpeed's
own `PipelineEngine` (`deepspeed.pipe.PipelineModule`, `TrainSchedule`, its blocking point-to-point sends) on a model
whose stages stand for device work of known length: each stage's layer sleeps `--forward-ms` in its forward and
`--backward-ms` in its backward (a sleep holds no CPU, so four stages on two cores keep exact times). Per micro-batch
count m it times `train_batch`, with transfers of 4 kB (which every transport buffers) and of 32 MiB (which none
does: the send waits for its receiver; NCCL's channel buffers are 4 MiB by default), and again with layers that do
not sleep: what is left is the engine's own cost (Python dispatch, buffers, the sends), its host overhead per step of
the schedule. The step is compared with

- 1F1B's (m + p - 1)(F + B), and what DeepSpeed's instruction streams give when simulated (`simulate`: every stage
  runs its TrainSchedule instructions in order, a receive waits for its send, and with rendezvous a send also waits
  for its receive): the same, whichever transfers, so its schedule adds nothing to 1F1B;
- a schedule in lockstep, 2(m + p - 1) max(F, B), which DeepSpeed's alternating steps might have suggested.

And BF16_Optimizer's fp32 gradient bookkeeping, which DeepSpeed runs after every micro-batch's backward
(`update_hp_grads`: each bf16 gradient cast to fp32 and added to the fp32 copy, `hp.add_(lp.to(fp32))`): its time on
this CPU against the same cast and add on one flat tensor (what is left is its per-tensor work) and against a plain
fp32 copy of as many parameters (bytes per parameter at copy speed; on this CPU the bf16 conversion is not
bandwidth-bound, so this overstates what a GPU moves: the cast reads 2 and writes 4 bytes, the add reads 8 and
writes 4). Writes DIR/pipeline_engine.json and DIR/pipeline_engine.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from megalite.bench import join_local_world, write_json

# The activation a stage sends: 16 x 64 fp32 (4 kB), which a transport buffers whole, and 2048 x 4096 fp32 (32 MiB),
# which no transport buffers (NCCL's channel buffers are 4 MiB by default; gloo's TCP socket a few): a send then
# waits for the receiver.
PAYLOADS = {"4 kB": (16, 64), "32 MiB": (2048, 4096)}
BOOKKEEPING_PARAMS = 32_000_000  # parameters whose fp32 bookkeeping is timed (128 MB in fp32: past the caches)


def _engine(p: int, m: int, forward_s: float, backward_s: float, bf16: bool = False, params: int = 64,
            hidden: int = 64) -> Any:
    """A p-stage DeepSpeed pipeline engine over sleeping layers, m micro-batches per step."""
    import deepspeed
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule

    class Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            time.sleep(forward_s)
            ctx.save_for_backward(x, w)
            return x * w[:hidden]

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            time.sleep(backward_s)
            gw = torch.zeros_like(w)
            gw[:hidden] = (grad * x).sum(dim=(0, 1))
            return grad * w[:hidden], gw

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(max(params, hidden)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return Sleep.apply(x, self.w.to(x.dtype))

    module = PipelineModule([LayerSpec(Stage) for _ in range(p)], num_stages=p,
                            loss_fn=lambda out, label: (out.float() - label).pow(2).mean(), partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": m, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 1 if bf16 else 0}, "bf16": {"enabled": bf16},
              **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
              "pipeline": {"activation_checkpoint_interval": 0}, "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-6)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def _batches(dtype: Any, tokens: int = 16, hidden: int = 64) -> Any:
    import torch

    x = torch.ones(1, tokens, hidden, dtype=dtype)
    while True:
        yield x, x.float()


def _timed_steps(engine: Any, steps: int, tokens: int, hidden: int) -> dict:
    """Median step time and, per instruction kind, the median seconds one dispatch takes on this rank."""
    import torch
    import torch.distributed as dist

    per_kind: dict[str, list[float]] = {}
    originals = dict(engine._INSTRUCTION_MAP)

    def timed(kind: str, fn: Any) -> Any:
        def run(self: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(self, **kwargs)
            per_kind.setdefault(kind, []).append(time.perf_counter() - start)
            return out
        return run

    engine._INSTRUCTION_MAP = {k: timed(k.__name__, v) for k, v in originals.items()}
    data = _batches(torch.float32, tokens, hidden)
    engine.train_batch(data)  # warm-up: first-step metadata exchange, buffers
    per_kind.clear()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        engine.train_batch(data)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "steps": times,
            "instructions": {k: {"count_per_step": len(v) / steps, "median_s": statistics.median(v)}
                             for k, v in per_kind.items()}}


def _bookkeeping(steps: int) -> dict:
    """BF16_Optimizer.update_hp_grads on this rank's BOOKKEEPING_PARAMS parameters against a copy of as many fp32."""
    import torch

    engine = _engine(1, 1, 0.0, 0.0, bf16=True, params=BOOKKEEPING_PARAMS)
    engine.train_batch(_batches(torch.bfloat16))
    opt = engine.optimizer
    for group in opt.bf16_groups:  # the step cleared them: give every bf16 parameter a gradient to fold in
        for param in group:
            param.grad = torch.ones_like(param)
    samples = []
    for _ in range(steps * 3):
        start = time.perf_counter()
        opt.update_hp_grads(clear_lp_grads=False)
        samples.append(time.perf_counter() - start)
    a, b = torch.empty(BOOKKEEPING_PARAMS), torch.empty(BOOKKEEPING_PARAMS)
    low = torch.ones(BOOKKEEPING_PARAMS, dtype=torch.bfloat16)
    copies, cast_adds = [], []
    for _ in range(steps * 3):
        start = time.perf_counter()
        b.copy_(a)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        b.add_(low.to(torch.float32))  # what update_hp_grads does per tensor, on one flat tensor
        cast_adds.append(time.perf_counter() - start)
    hp = statistics.median(samples)
    copy = statistics.median(copies)
    cast_add = statistics.median(cast_adds)
    return {"params": BOOKKEEPING_PARAMS, "update_hp_grads_s": hp, "fp32_copy_s": copy, "cast_add_s": cast_add,
            # a copy moves 8 bytes per element (read 4, write 4)
            "bytes_per_param_at_copy_speed": 8 * hp / copy,
            # update_hp_grads against the same cast and add on one flat tensor: its per-tensor work beyond them
            "update_hp_grads_over_cast_add": hp / cast_add}


def _rank(rank: int, world: int, port: int, args: dict, results: Any) -> None:
    import torch.distributed as dist

    join_local_world(rank, world, port, timeout_s=120)
    out: dict[str, Any] = {"runs": []}
    for m in ([] if args.get("bookkeeping") else args["micro_batches"]):
        for payload, (tokens, hidden) in PAYLOADS.items():
            for label, f, b in (("sleep", args["forward_ms"] / 1e3, args["backward_ms"] / 1e3),
                                ("idle", 0.0, 0.0)):
                engine = _engine(world, m, f, b, hidden=hidden)
                result = _timed_steps(engine, args["steps"], tokens, hidden)
                out["runs"].append({"micro_batches": m, "mode": label, "payload": payload, "forward_s": f,
                                    "backward_s": b, **result})
                del engine
    if args.get("bookkeeping"):
        out = {"bookkeeping": _bookkeeping(args["steps"])}
    results.put(("ok", rank, out))
    dist.barrier()
    dist.destroy_process_group()


def predictions(p: int, m: int, forward_s: float, backward_s: float) -> dict:
    """The step the two schedules predict for device work alone (no host cost, no transfer time)."""
    return {"one_f_one_b_s": (m + p - 1) * (forward_s + backward_s),
            "deepspeed_lockstep_s": 2 * (m + p - 1) * max(forward_s, backward_s)}


def simulate(stages: int, m: int, forward_s: float, backward_s: float, rendezvous: bool = False) -> float:
    """The step DeepSpeed's TrainSchedule takes when each stage runs its own instruction stream in order: a receive
    waits until its send was issued; with `rendezvous` a send also waits until its receive was posted (a transfer no
    buffer holds); compute takes `forward_s` or `backward_s`; everything else nothing."""
    from deepspeed.runtime.pipe import schedule

    streams = [[cmd for step in schedule.TrainSchedule(micro_batches=m, stages=stages, stage_id=s).steps()
                for cmd in step] for s in range(stages)]
    peer = {"SendActivation": (0, 1, "A"), "SendGrad": (0, -1, "G"), "RecvActivation": (-1, 0, "A"),
            "RecvGrad": (1, 0, "G")}
    arrivals: dict[tuple, list[float]] = {}  # (src, dst, kind, side) -> times, in order
    mine: dict[tuple[int, int], int] = {}  # (stage, position) -> index among this side's arrivals
    position, clock = [0] * stages, [0.0] * stages
    moved = True
    while moved:
        moved = False
        for s in range(stages):
            while position[s] < len(streams[s]):
                name = type(streams[s][position[s]]).__name__
                if name in peer:
                    a, b, kind = peer[name]
                    link = (s + a, s + b, kind)
                    side, other = ("send", "recv") if name.startswith("Send") else ("recv", "send")
                    if (s, position[s]) not in mine:
                        arrivals.setdefault((*link, side), []).append(clock[s])
                        mine[(s, position[s])] = len(arrivals[(*link, side)]) - 1
                    k = mine[(s, position[s])]
                    theirs = arrivals.get((*link, other), [])
                    if side == "recv" or rendezvous:
                        if len(theirs) <= k:
                            break  # waits for the other side
                        clock[s] = max(clock[s], theirs[k])
                elif name == "ForwardPass":
                    clock[s] += forward_s
                elif name == "BackwardPass":
                    clock[s] += backward_s
                position[s] += 1
                moved = True
    if any(position[s] < len(streams[s]) for s in range(stages)):
        raise RuntimeError("the simulated schedule deadlocked")
    return max(clock)


def summarise(stages: int, ranks: list[dict]) -> list[dict]:
    """One row per (micro-batches, payload): the slowest rank's step with sleeping layers and with idle ones (the
    engine's own cost: dispatch and transfers), and the schedules' predictions, idle step added."""
    runs = ranks[0]["runs"]
    rows = []
    for i, run in enumerate(runs):
        if run["mode"] != "sleep":
            continue
        idle = next(j for j, r in enumerate(runs) if r["mode"] == "idle" and r["micro_batches"] == run["micro_batches"]
                    and r["payload"] == run["payload"])
        m, f, b = run["micro_batches"], run["forward_s"], run["backward_s"]
        step = max(r["runs"][i]["step_s"] for r in ranks)
        idle_step = max(r["runs"][idle]["step_s"] for r in ranks)
        pred = predictions(stages, m, f, b)
        slots = 2 * (m + stages - 1)
        rows.append({"stages": stages, "micro_batches": m, "payload": run["payload"], "forward_ms": 1e3 * f,
                     "backward_ms": 1e3 * b, "step_s": step, "idle_step_s": idle_step, **pred, "slots": slots,
                     "deepspeed_simulated_s": simulate(stages, m, f, b, rendezvous=run["payload"] != "4 kB"),
                     "idle_s_per_slot": idle_step / slots,
                     "instructions_rank0": {"sleep": runs[i]["instructions"], "idle": runs[idle]["instructions"]}})
    return rows


def markdown(rows: list[dict], bookkeeping: dict | None) -> str:
    lines = ["| stages | micro-batches | sent per transfer | F ms | B ms | step s | engine alone (idle layers) s | "
             "1F1B + engine s | DeepSpeed's schedule simulated + engine s | lockstep + engine s | "
             "engine ms per schedule step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        idle = r["idle_step_s"]
        lines.append(f"| {r['stages']} | {r['micro_batches']} | {r['payload']} | {r['forward_ms']:.0f} | "
                     f"{r['backward_ms']:.0f} | {r['step_s']:.3f} | {idle:.3f} | {r['one_f_one_b_s'] + idle:.3f} | "
                     f"{r['deepspeed_simulated_s'] + idle:.3f} | {r['deepspeed_lockstep_s'] + idle:.3f} | "
                     f"{1e3 * r['idle_s_per_slot']:.2f} |")
    if bookkeeping:
        lines += ["", f"BF16_Optimizer.update_hp_grads over {bookkeeping['params']:,} parameters: "
                  f"{1e3 * bookkeeping['update_hp_grads_s']:.2f} ms; an fp32 copy of as many: "
                  f"{1e3 * bookkeeping['fp32_copy_s']:.2f} ms: {bookkeeping['bytes_per_param_at_copy_speed']:.1f} "
                  "bytes per parameter at copy speed; the same cast to fp32 and add on one flat tensor: "
                  f"{1e3 * bookkeeping['cast_add_s']:.2f} ms ({bookkeeping['update_hp_grads_over_cast_add']:.2f}x)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megalite bench pipeline-engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--forward-ms", type=float, default=50.0)
    parser.add_argument("--backward-ms", type=float, default=150.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="out/bench-pipeline-engine")
    args = parser.parse_args(argv)
    from megalite.local_ranks import spawn_local_ranks

    settings = {"stages": args.stages, "micro_batches": args.micro_batches, "forward_ms": args.forward_ms,
                "backward_ms": args.backward_ms, "steps": args.steps}
    rows = []
    for p in args.stages:
        out, errors, codes = spawn_local_ranks(_rank, p, settings)
        if errors or len(out) != p:
            print("\n".join(errors) or f"exit codes {codes}", file=sys.stderr)
            return 1
        rows += summarise(p, [out[r] for r in range(p)])
        print(markdown([r for r in rows if r["stages"] == p], None), flush=True)
    out, errors, codes = spawn_local_ranks(_rank, 1, {**settings, "bookkeeping": True})
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    bookkeeping = out[0]["bookkeeping"]
    folder = Path(args.out)
    write_json(folder / "pipeline_engine.json", {"settings": settings, "rows": rows, "bookkeeping": bookkeeping})
    text = markdown(rows, bookkeeping)
    (folder / "pipeline_engine.md").write_text(text)
    print(text)
    print(json.dumps({"written": str(folder)}))
    return 0
