"""What the hang watchdog and the straggler report cost: the training step with them on and off, side by side.

    megalite bench watchdog [--config configs/runs/demo-cpu.json] [--steps 40] [--rounds 3] [--nproc 2] [--out DIR]

Runs `torchrun --nproc_per_node N` three times per round, in a rotating order (so drifts of a shared machine hit
every mode alike): `on` (train.watchdog=true, torch's flight recorder on as the batch scripts set it,
TORCH_FR_BUFFER_SIZE=2000), `off` (train.watchdog=false, the recorder still on) and `bare` (both off); each with
the config's log interval (one straggler all-gather per window). Each run times its steps after a warm-up (wall,
and the process's CPU time over every thread, which a shared machine's load inflates far less); with the watchdog on
it also reads the CPU time of the watchdog's two threads from /proc and the wall time of its ticks.
Prints the median step of each mode, the ratios on/off (the watchdog and straggler report) and off/bare (the flight
recorder), the threads' CPU time per step, and the cost of the calls the training thread makes (a phase mark; a
collective through the clock's wrapper) measured in this process; writes DIR/watchdog.json. Needs the demo data
(`make demo` prepares it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from megalite.bench import write_json
from megalite.local_ranks import free_port

WARMUP = 5


def _thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc; 0 when unknown."""
    if native_id is None:
        return 0.0
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(args: argparse.Namespace) -> None:
    """One rank of one run: train the demo, time the steps, read the watchdog threads' CPU time."""
    from megalite import config
    from megalite.engine import watchdog
    from megalite.engine.trainer import Trainer

    overrides = [f"train.steps={args.steps}", "train.eval_interval=0", "train.resume=never",
                 f"train.output_dir={args.out}/{args.mode}", "train.logging.plot=false", "train.eval_steps=1",
                 "train.checkpoint_interval=0", f"train.watchdog={'true' if args.mode == 'on' else 'false'}",
                 *args.overrides]
    cfg = config.load(args.config, overrides)
    run = Trainer(cfg)
    dog = watchdog._active
    threads = [t.native_id for t in threading.enumerate() if t.name.startswith("megalite-watchdog")]
    times: list[float] = []
    cpu_times: list[float] = []  # the process's CPU time per step, every thread: what a loaded machine inflates least
    cpu: list[float] = []  # the threads' CPU time at the start and at the last step (they end with the run)
    original = run.train_step

    def timed(timer):  # noqa: ANN001
        start, start_cpu = time.perf_counter(), time.process_time()
        out = original(timer)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
        if len(times) == args.steps:
            cpu.append(sum(_thread_cpu_s(t) for t in threads))
        return out

    run.train_step = timed
    cpu.append(sum(_thread_cpu_s(t) for t in threads))
    start = time.perf_counter()
    run.train()
    wall = time.perf_counter() - start
    result = {"times": times, "cpu_times": cpu_times, "wall_s": wall, "threads": len(threads), "thread_cpu_s": cpu[-1] - cpu[0],
              "ticks": dog.beat if dog is not None else 0, "tick_busy_s": dog.busy_s if dog is not None else 0.0}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result))


def call_costs(repeats: int = 20000) -> dict[str, float]:
    """Microseconds per call, in this process: a phase mark with a watchdog running and without one, and an
    all_reduce of one float on a one-rank gloo group with and without the clock's wrapper."""
    import datetime

    import torch
    import torch.distributed as dist

    from megalite.engine import stragglers, watchdog
    from megalite.engine.watchdog import Limits, PhaseFault, Watchdog

    def per_call(fn) -> float:  # noqa: ANN001
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e6

    out = {"phase_mark_off_us": per_call(lambda: watchdog.phase("forward"))}
    dog = Watchdog.__new__(Watchdog)  # the marking half only: no thread, no store
    dog.seq, dog.phase_name, dog.step = 0, "set-up", 0
    dog.fault = PhaseFault.__new__(PhaseFault)
    dog.fault.active = False
    dog.limits = Limits(step_s=None, long_s=1.0, poll_s=1.0, stale_s=1.0, store_wait_s=1.0)
    watchdog._active = dog
    try:
        out["phase_mark_on_us"] = per_call(lambda: watchdog.phase("forward"))
    finally:
        watchdog._active = None
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        x = torch.ones(1)
        out["all_reduce_plain_us"] = per_call(lambda: dist.all_reduce(x))
        stragglers.collective_clock()
        out["all_reduce_clocked_us"] = per_call(lambda: dist.all_reduce(x))
        stragglers.release_clock()
    finally:
        dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    """`megalite bench watchdog [options]`."""
    parser = argparse.ArgumentParser(prog="megalite bench watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/runs/demo-cpu.json")
    parser.add_argument("--steps", type=int, default=40,
                        help=f"training steps a run (default 40); the first {WARMUP} are warm-up, not measured")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes, rotating (default 3)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both modes")
    parser.add_argument("--out", default="out/bench-watchdog", help="results folder (default: out/bench-watchdog)")
    parser.add_argument("--mode", choices=["on", "off", "bare", "calls"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps: must be more than the {WARMUP} warm-up steps, got {args.steps}")
    if args.mode == "calls":
        Path(args.result).write_text(json.dumps(call_costs()))
        return 0
    if args.mode:
        worker(args)
        return 0
    torchrun = str(Path(sys.executable).parent / "torchrun")
    base = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    recorder = os.environ.get("TORCH_FR_BUFFER_SIZE", "2000")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    modes = ("on", "off", "bare")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in modes[round_ % 3:] + modes[:round_ % 3]:
            result = f"{args.out}/{mode}-{round_}.json"
            extra = [a for kv in args.overrides for a in ("--set", kv)]
            env = dict(base, TORCH_FR_BUFFER_SIZE="0" if mode == "bare" else recorder)
            log = Path(f"{args.out}/{mode}-{round_}.log")  # the ranks' output, kept to say why a run failed
            with open(log, "w") as f:
                code = subprocess.run([torchrun, "--nproc_per_node", str(args.nproc), "--master_port",
                                       str(free_port()), "-m", "megalite.bench.watchdog", "--mode", mode,
                                       "--config", args.config, "--steps", str(args.steps), "--out", args.out,
                                       "--result", result, *extra], env=env, stdout=f,
                                      stderr=subprocess.STDOUT).returncode
            if code != 0:
                raise SystemExit(f"megalite bench watchdog: the {mode} run of round {round_} exited {code}; its "
                                 f"output: {log}\n{log.read_text(errors='replace')[-3000:]}")
            run = json.loads(Path(result).read_text())
            run["median_s"] = statistics.median(run["times"][WARMUP:])
            run["median_cpu_s"] = statistics.median(run["cpu_times"][WARMUP:])
            runs[mode].append(run)
            print(f"round {round_} {mode:4s}: median step {run['median_s'] * 1e3:.1f} ms, CPU "
                  f"{run['median_cpu_s'] * 1e3:.1f} ms over {len(run['times']) - WARMUP} steps", flush=True)
    medians = {mode: statistics.median(r["median_s"] for r in rs) for mode, rs in runs.items()}
    cpu_medians = {mode: statistics.median(r["median_cpu_s"] for r in rs) for mode, rs in runs.items()}
    watchdog_ratios = [on["median_s"] / off["median_s"] for on, off in zip(runs["on"], runs["off"])]
    recorder_ratios = [off["median_s"] / bare["median_s"] for off, bare in zip(runs["off"], runs["bare"])]
    steps = sum(len(r["times"]) for r in runs["on"])
    thread_cpu = sum(r["thread_cpu_s"] for r in runs["on"]) / steps
    tick_busy = sum(r["tick_busy_s"] for r in runs["on"]) / steps
    calls = {}
    for label, entries in (("recorder_on", recorder), ("recorder_off", "0")):  # read once per process by torch
        result = f"{args.out}/calls-{label}.json"
        subprocess.run([sys.executable, "-m", "megalite.bench.watchdog", "--mode", "calls", "--result", result],
                       check=True, env=dict(base, TORCH_FR_BUFFER_SIZE=entries))
        calls.update({f"{k}_{label}": v for k, v in json.loads(Path(result).read_text()).items()})
    print(f"median step: on {medians['on'] * 1e3:.1f} ms, off {medians['off'] * 1e3:.1f} ms, bare "
          f"{medians['bare'] * 1e3:.1f} ms")
    print(f"median CPU per step (rank 0, every thread): on {cpu_medians['on'] * 1e3:.1f} ms, off "
          f"{cpu_medians['off'] * 1e3:.1f} ms, bare {cpu_medians['bare'] * 1e3:.1f} ms; on/off "
          f"{cpu_medians['on'] / cpu_medians['off']:.4f}, off/bare {cpu_medians['off'] / cpu_medians['bare']:.4f}")
    print(f"watchdog + straggler report (on/off): {medians['on'] / medians['off']:.4f} (per round: "
          f"{', '.join(f'{r:.4f}' for r in watchdog_ratios)})")
    print(f"flight recorder (off/bare): {medians['off'] / medians['bare']:.4f} (per round: "
          f"{', '.join(f'{r:.4f}' for r in recorder_ratios)})")
    print(f"watchdog threads (rank 0): {thread_cpu * 1e3:.3f} ms CPU per step from /proc (10 ms resolution), its "
          f"ticks {tick_busy * 1e3:.3f} ms wall per step ({100 * tick_busy / medians['on']:.4f}% of a step)")
    print("per call (us): " + ", ".join(f"{k} {v:.2f}" for k, v in calls.items()))
    write_json(f"{args.out}/watchdog.json", {"config": args.config, "nproc": args.nproc, "steps": args.steps,
                                             "warmup": WARMUP, "rounds": args.rounds, "recorder_entries": recorder,
                                             "medians_s": medians, "cpu_medians_s": cpu_medians,
                                             "watchdog_ratio": medians["on"] / medians["off"],
                                             "watchdog_cpu_ratio": cpu_medians["on"] / cpu_medians["off"],
                                             "recorder_ratio": medians["off"] / medians["bare"],
                                             "watchdog_ratios": watchdog_ratios, "recorder_ratios": recorder_ratios,
                                             "thread_cpu_s_per_step": thread_cpu, "tick_busy_s_per_step": tick_busy,
                                             "call_costs_us": calls,
                                             "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
