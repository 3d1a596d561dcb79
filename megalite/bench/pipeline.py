"""Pipeline schedules measured: step time and idle fraction per rank of 1F1B, ZB-H1 and DualPipeV against the plan.

    megalite bench pipeline [--stages 2 4] [--micro-batches 4 8 16] [--schedules 1f1b zb-h1 dualpipev]
                            [--forward-ms 40] [--input-ms 40] [--weight-ms 40] [--steps 3] [--out out/bench-pipeline]

A synthetic pipeline whose passes take a controlled time: p CPU processes over gloo, each a pipeline stage of two
`SleepLayer`s under megalite's own engines (DeepSpeed's PipelineEngine for 1F1B, megalite's ZeroBubbleEngine for
ZB-H1, DeepSpeed's DualPipeVEngine for DualPipeV, where each of the 2p chunks is one layer). A layer sleeps half the
stage's time in its forward, its input-gradient pass and its weight-gradient pass (the weight-gradient sleep queued
for ZB-H1's W pass like megalite's linears' matmuls, `megalite.parallel.deferred`). Sleeping rather than computing
keeps the passes' times what they are told to be with more processes than cores. Per rank and step: the step's wall
time (`train_batch`, after one unmeasured step) and the time spent in the passes; idle = 1 - busy / step. The plan's
figures are `megalite.plan.schedule.simulate` of the same order, with the nominal pass times and with the pass times
measured (the engine's work inside a pass included). What the measured idle time has beyond the plan's is the
engines' own: their instructions between passes, 1F1B's blocking sends and DualPipeV's batched transfers, which wait
until the neighbour posts its receive (the plan lets sends go without waiting; ZB-H1's engine does).
Writes DIR/pipeline.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from megalite.bench import join_local_world, write_json

SCHEDULES = ("1f1b", "zb-h1", "dualpipev")
WIDTH = 8  # features of the synthetic activations


def _sleep_layer_class() -> type:
    """`SleepLayer` (built on first use: torch is imported only in the ranks)."""
    import torch

    from megalite.parallel.deferred import STORE

    busy = {"seconds": 0.0}

    def sleep(seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        busy["seconds"] += time.perf_counter() - start

    class _Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, times):
            sleep(times[0])
            ctx.times, ctx.param = times, weight
            ctx.save_for_backward(x)
            return x * weight

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            sleep(ctx.times[1])

            def weight_grad() -> torch.Tensor:
                sleep(ctx.times[2])
                return (dy * x).sum(0)

            dw = None
            if STORE.collecting:
                STORE.defer(ctx.param, weight_grad)
            else:
                dw = weight_grad()
            return dy * ctx.param, dw, None

    class SleepLayer(torch.nn.Module):
        """x -> x * w, sleeping `times` = (forward, input-gradient, weight-gradient) seconds in its passes."""

        def __init__(self, times: tuple[float, float, float]) -> None:
            super().__init__()
            self.times = times
            self.weight = torch.nn.Parameter(torch.ones(WIDTH))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _Sleep.apply(x, self.weight, self.times)

    SleepLayer.busy = busy
    return SleepLayer


def _timed(engine_class: type) -> type:
    """A subclass of a pipeline engine that records when each compute instruction of a step runs."""
    from deepspeed.runtime.pipe import schedule as ds_schedule

    from megalite.engine.pipeline_schedules import InputGradPass, WeightGradPass

    kinds = {ds_schedule.ForwardPass: "F", ds_schedule.BackwardPass: "B", InputGradPass: "I", WeightGradPass: "W"}

    def timed(kind: str, run: Any) -> Any:
        def instruction(self: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            run(self, **kwargs)
            self.passes.append((kind, start, time.perf_counter()))
        return instruction

    return type(f"Timed{engine_class.__name__}", (engine_class,), {
        "passes": [],
        "_INSTRUCTION_MAP": {k: timed(kinds[k], v) if k in kinds else v
                             for k, v in engine_class._INSTRUCTION_MAP.items()},
    })


def measure_schedules(stages: int, micro_batches: list[int], schedules: list[str], pass_ms: tuple[float, float, float],
                      steps: int) -> list[dict[str, Any]]:
    """On every rank of an initialised gloo world (its size a multiple of `stages`): each schedule at each number of
    micro-batches, `steps` measured steps after one warm-up. Per step: the wall time of `train_batch`, the span of
    its pipeline (from the common start to the last pass to end on any rank of the pipeline), this rank's time in
    passes, and the plan's step and idle fractions for the nominal pass times and for the pass times measured."""
    import torch
    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine, DualPipeVModule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from megalite.engine.pipeline_schedules import ZeroBubbleEngine, initialize_engine
    from megalite.parallel import ProcessGrid
    from megalite.plan.schedule import simulate

    SleepLayer = _sleep_layer_class()
    grid = ProcessGrid(pipeline=stages)
    stage = grid.get_stage_id()
    per_layer = tuple(ms / 2 / 1000 for ms in pass_ms)  # two layers a stage
    engines = {"1f1b": PipelineEngine, "zb-h1": ZeroBubbleEngine, "dualpipev": DualPipeVEngine}
    rows = []
    for name in schedules:
        first = max(micro_batches) if name == "dualpipev" else micro_batches[0]
        module_class = DualPipeVModule if name == "dualpipev" else PipelineModule
        model = module_class(layers=[LayerSpec(SleepLayer, per_layer) for _ in range(2 * stages)],
                             topology=grid.topology, loss_fn=_loss, partition_method="uniform")
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": first,
                  "steps_per_print": 10**9, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0, "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
        engine = initialize_engine(_timed(engines[name]), model, torch.optim.SGD(model.parameters(), lr=1e-3), None,
                                   config)
        chunk = 2 if name == "dualpipev" else 1  # DualPipeV's chunks: half a stage each
        for m in micro_batches:
            if name == "dualpipev" and m < 2 * stages:
                continue
            engine.set_train_batch_size(m * grid.get_data_parallel_world_size())
            data = iter([(torch.ones(1, WIDTH), torch.zeros(1, WIDTH)) for _ in range(m * (steps + 1))])
            engine.train_batch(data_iter=data)  # warm-up: buffers, shape exchange
            step_s = span_s = busy_s = 0.0
            durations: dict[str, list[float]] = {}
            for _ in range(steps):
                dist.barrier(group=grid.get_pipe_parallel_group())
                engine.passes.clear()
                start = time.perf_counter()
                engine.train_batch(data_iter=data)
                step_s += time.perf_counter() - start
                end = torch.tensor([max(e for _, _, e in engine.passes) - start], dtype=torch.float64)
                dist.all_reduce(end, op=dist.ReduceOp.MAX, group=grid.get_pipe_parallel_group())
                span_s += float(end)
                busy_s += sum(e - b for _, b, e in engine.passes)
                for kind, b, e in engine.passes:
                    durations.setdefault(kind, []).append(e - b)
            mean = {k: sum(v) / len(v) for k, v in durations.items()}
            # (F, I, W) per chunk, nominal and as measured (a backward without the split counts as I)
            nominal = simulate(name, stages, m, tuple(ms / 1000 / chunk for ms in pass_ms))
            measured = (mean["F"], mean.get("I", mean.get("B", 0.0)), mean.get("W", 0.0))
            calibrated = simulate(name, stages, m, measured)
            rows.append({"schedule": name, "stages": stages, "micro_batches": m, "rank": dist.get_rank(),
                         "stage": stage, "step_s": step_s / steps, "span_s": span_s / steps,
                         "busy_s": busy_s / steps, "idle": 1 - busy_s / span_s,
                         "pass_s": measured,
                         "planned_step_s": nominal.step, "planned_idle": nominal.idle(stage),
                         "calibrated_span_s": calibrated.step, "calibrated_idle": calibrated.idle(stage)})
        del engine, model
    return rows


def _loss(outputs: Any, labels: Any) -> Any:
    return (outputs - labels).pow(2).mean()


def _rank(rank: int, world: int, port: int, stages: int, micro_batches: list[int], schedules: list[str],
          pass_ms: tuple[float, float, float], steps: int, results: Any) -> None:
    import torch.distributed as dist

    join_local_world(rank, world, port, timeout_s=600)
    rows = measure_schedules(stages, micro_batches, schedules, pass_ms, steps)
    results.put(("ok", rank, rows))
    dist.barrier()
    dist.destroy_process_group()


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (schedule, stages, micro-batches): the step (the slowest rank's), the pipeline's span, each stage's
    idle fraction of the span, measured and planned (with the nominal and with the measured pass times)."""
    out = []
    keys = sorted({(r["stages"], r["micro_batches"], SCHEDULES.index(r["schedule"])) for r in rows})
    for stages, m, index in keys:
        mine = [r for r in rows if (r["stages"], r["micro_batches"], r["schedule"]) == (stages, m, SCHEDULES[index])]
        by_stage = {r["stage"]: r for r in sorted(mine, key=lambda r: -r["rank"])}  # the first replica's ranks
        ordered = [by_stage[s] for s in sorted(by_stage)]
        out.append({"schedule": SCHEDULES[index], "stages": stages, "micro_batches": m,
                    "step_ms": round(1000 * max(r["step_s"] for r in mine), 1),
                    "span_ms": round(1000 * max(r["span_s"] for r in mine), 1),
                    "planned_span_ms": round(1000 * mine[0]["planned_step_s"], 1),
                    "calibrated_span_ms": round(1000 * max(r["calibrated_span_s"] for r in mine), 1),
                    "pass_ms": [round(1000 * x, 2) for x in ordered[0]["pass_s"]],
                    "idle": [round(r["idle"], 3) for r in ordered],
                    "planned_idle": [round(r["planned_idle"], 3) for r in ordered],
                    "calibrated_idle": [round(r["calibrated_idle"], 3) for r in ordered]})
    return out


def markdown(lines: list[dict[str, Any]]) -> str:
    """The table of the README's pipeline section."""
    out = ["| p | m | schedule | step ms | pipeline ms: measured, planned (nominal / measured passes) | "
           "idle per rank: measured | planned (measured passes) |", "|---|---|---|---|---|---|---|"]
    for r in lines:
        out.append(f"| {r['stages']} | {r['micro_batches']} | {r['schedule']} | {r['step_ms']:.0f} | "
                   f"{r['span_ms']:.0f}, {r['planned_span_ms']:.0f} / {r['calibrated_span_ms']:.0f} | "
                   f"{', '.join(f'{x:.0%}' for x in r['idle'])} | "
                   f"{', '.join(f'{x:.0%}' for x in r['calibrated_idle'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megalite bench pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="pipeline stages (one process each)")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16], help="micro-batches per step")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--forward-ms", type=float, default=40.0, help="a stage's forward pass (default 40 ms)")
    ap.add_argument("--input-ms", type=float, default=40.0, help="a stage's input-gradient pass (default 40 ms)")
    ap.add_argument("--weight-ms", type=float, default=40.0, help="a stage's weight-gradient pass (default 40 ms)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per point (after one warm-up)")
    ap.add_argument("--out", default="out/bench-pipeline", help="results folder (default: out/bench-pipeline)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megalite.local_ranks import spawn_local_ranks

    pass_ms = (args.forward_ms, args.input_ms, args.weight_ms)
    rows: list[dict[str, Any]] = []
    for stages in args.stages:
        out, errors, codes = spawn_local_ranks(_rank, stages, stages, args.micro_batches, args.schedules, pass_ms,
                                               args.steps)
        if errors or len(out) != stages:
            raise RuntimeError(f"{stages} stages: " + ("; ".join(errors) or f"exit codes {codes}"))
        rows += [row for r in range(stages) for row in out[r]]
    lines = summarise(rows)
    print(markdown(lines))
    write_json(Path(args.out) / "pipeline.json", {"pass_ms": pass_ms, "steps": args.steps, "summary": lines,
                                                 "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
