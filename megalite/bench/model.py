"""Model FLOPs utilisation of a whole training step, megalite's Triton kernels against the torch backend.

    megalite bench model --out DIR                 # GPU: gpt3-1.3b, bf16, seq 2048, one device
    megalite bench model --fp8 tensorwise --out DIR  # ... and the first backend again with model.fp8
    megalite bench model --smoke --out DIR         # CPU: a tiny model, proves the harness works

Each kernel backend runs in its own process (`megalite.engine.trainer.Trainer`, world of one, synthetic
tokens) for a few steps; the first steps are warm-up (compilation, autotuning). MFU uses megalite's
own FLOP count (6N + 12*L*d*T per token) and its per-device peak table: against the bf16 peak, and for an FP8
run also against the FP8 peak (its block linears run at that peak, attention and the output layer at bf16's).
Writes model-bench.json and prints a markdown table with the speedup of each backend over `torch` and of the
FP8 run over the same backend in bf16.
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

import numpy as np

from megalite.bench import PACKAGE, write_json
from megalite.config.schema import FP8_RECIPES


def synthetic_data(prefix: Path, vocab: int, tokens: int) -> None:
    """Random documents in Megatron format with the manifest megalite's loader reads."""
    from megalite.data import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(str(prefix), dtype=np.uint16 if vocab < 65500 else np.int32)
    done = 0
    while done < tokens:
        n = int(rng.integers(512, 4096))
        doc = rng.integers(1, vocab, n)
        writer.add_document(np.append(doc, 0))
        done += n + 1
    writer.finalize()
    Path(f"{prefix}.json").write_text(json.dumps({"eod_token_id": 0, "bos_token_id": None, "vocab_size": vocab}))


def never_saving() -> None:
    """This process trains without saving (a benchmark): the preflight's free-disk check for checkpoints, which
    gpt3-1.3b's (keep_checkpoints + 1) x 17 GB could fail on a GPU machine's disk although nothing is written, is
    replaced by a passing check that says why (the H200 run of 2026-11-30 lost its torch-backend figure to it)."""
    from megalite.engine import preflight

    preflight.check_disk = lambda cfg: [preflight.Check("disk", True, "not checked: the benchmark saves no checkpoint")]


def worker(args: argparse.Namespace) -> None:
    """One backend: train, time each step, write the result."""
    from megalite import config
    from megalite.engine.trainer import Trainer
    from megalite.plan import flops_per_token

    raw = json.loads(args.worker_config)
    cfg = config.from_dict(config.expand_references(raw, None))
    never_saving()  # with the save below disabled, the disk check has nothing to protect
    run = Trainer(cfg)
    times: list[float] = []
    original = run.train_step

    def timed(timer):  # noqa: ANN001
        sync = getattr(__import__("torch").cuda, "synchronize", None) if run.device.type == "cuda" else None
        start = time.perf_counter()
        out = original(timer)
        if sync:
            sync()
        times.append(time.perf_counter() - start)
        return out

    run.train_step = timed
    run.checkpoints.save = lambda step, last=False: None  # the final checkpoint (17 GB for 1.3B with AdamW) would fill the GPU machine's disk
    code = run.train()
    steady = times[args.warmup:] or times
    step_s = statistics.median(steady)
    tokens = cfg.global_batch_size(1) * cfg.data.seq_length
    tflops = flops_per_token(cfg) * tokens / step_s / 1e12
    peak, note = run.local_plan.peak_tflops(cfg.precision)  # this GPU's peak, as the training log's MFU
    fp8 = cfg.model.fp8.recipe if cfg.model.fp8 else None
    # The FP8 peak: "fp8" in megalite.plan.PEAK_TFLOPS (None, said so, where the table has none).
    peak_fp8, note_fp8 = run.local_plan.peak_tflops("fp8") if fp8 else (None, None)
    memory = None
    import torch

    if torch.cuda.is_available():
        memory = torch.cuda.max_memory_allocated() / 2**30
        if fp8 and peak_fp8 is None:
            note_fp8 = f"{torch.cuda.get_device_name()}: no FP8 peak in megalite's peak table (MFU against it not reported)"
    Path(args.result).write_text(json.dumps({
        "kernels": cfg.train.kernels, "fp8": fp8, "exit": code, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "tflops": tflops, "mfu": tflops / peak if peak else None, "peak": note,
        "mfu_fp8_peak": tflops / peak_fp8 if peak_fp8 else None, "peak_fp8": note_fp8, "steps_timed": len(steady),
        "memory_gb": memory,
    }))


def table(results: list[dict], title: str) -> list[str]:
    """The markdown table of the runs: speedup of each bf16 run over torch's, of an FP8 run over its backend's bf16
    run; MFU against the bf16 peak and, for FP8 runs, the FP8 peak (each named in the JSON)."""
    def ok(r: dict) -> bool:
        return "step_s" in r

    base = next((r for r in results if r.get("kernels") == "torch" and not r.get("fp8") and ok(r)), None)
    lines = [title, "", "| kernels | fp8 | step | tokens/s | TFLOP/s | MFU (bf16 peak) | MFU (FP8 peak) | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        fp8 = r.get("fp8") or "-"
        if not ok(r):
            lines.append(f"| {r['kernels']} | {fp8} | error: {r['error'][:80]} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        mfu8 = f"{100 * r['mfu_fp8_peak']:.1f}%" if r.get("mfu_fp8_peak") else ("n/a" if r.get("fp8") else "-")
        if r.get("fp8"):
            same = next((b for b in results if b.get("kernels") == r["kernels"] and not b.get("fp8") and ok(b)), None)
            speed = f"{same['step_s'] / r['step_s']:.2f}x vs {r['kernels']} bf16" if same else "n/a"
        else:
            speed = f"{base['step_s'] / r['step_s']:.2f}x vs torch" if base else "n/a"
        lines.append(f"| {r['kernels']} | {fp8} | {r['step_s'] * 1000:.0f} ms | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.1f} | {mfu} | {mfu8} | {speed} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`megalite bench model [options]`."""
    parser = argparse.ArgumentParser(prog="megalite bench model", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt3-1.3b", help="a preset in configs/models/")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--kernels", nargs="+", default=["triton", "torch"])
    parser.add_argument("--fp8", default=None, choices=FP8_RECIPES,
                        help="also run the first --kernels backend with model.fp8 of this recipe (bf16 and FP8 side by side)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, fp32, torch kernels")
    parser.add_argument("--out", default="out/bench-model")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per backend")
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_config:
        worker(args)
        return 0
    if args.smoke:
        args.model, args.seq, args.micro_batch, args.steps, args.warmup, args.kernels = "tiny-gpt", 64, 2, 3, 1, ["torch"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from megalite import config

    model = config.expand_references({"model": args.model}, None)["model"]
    model["max_position_embeddings"] = max(model.get("max_position_embeddings", 0), args.seq)
    prefix = out / "synthetic"
    synthetic_data(prefix, int(model["vocab_size"]), tokens=(args.steps + 2) * args.micro_batch * (args.seq + 1) * 2)
    precision = {} if args.smoke else {"bf16": {"enabled": True}}
    results = []
    variants = [(kernels, None) for kernels in args.kernels] + ([(args.kernels[0], args.fp8)] if args.fp8 else [])
    for kernels, fp8 in variants:
        label = f"{kernels}-fp8" if fp8 else kernels
        raw = {
            "model": {**model, "fp8": {"recipe": fp8}} if fp8 else model,
            "data": {"prefixes": [str(prefix)], "split": "1,0,0", "seq_length": args.seq},
            "train": {"steps": args.steps, "output_dir": str(out / f"run-{label}"), "kernels": kernels,
                      "eval_interval": 0, "resume": "never", "log_interval": args.steps, "checkpoint_interval": 0,
                      "keep_checkpoints": 2, "logging": {"plot": False, "progress_bar": False}},
            "deepspeed": {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_clipping": 1.0,
                          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}},
                          "zero_optimization": {"stage": 1}, **precision},
        }
        result = out / f"result-{label}.json"
        env = {**os.environ, "PYTHONPATH": f"{PACKAGE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        try:
            proc = subprocess.run([sys.executable, "-m", "megalite.bench.model", "--worker-config", json.dumps(raw), "--result",
                                   str(result), "--warmup", str(args.warmup)], env=env, timeout=args.timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            results.append({"kernels": kernels, "fp8": fp8, "error": f"timed out after {args.timeout:.0f}s"})
            continue
        (out / f"log-{label}.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not result.exists():
            results.append({"kernels": kernels, "fp8": fp8, "error": f"exit {proc.returncode}: {proc.stderr[-400:]}"})
            continue
        results.append(json.loads(result.read_text()))
    write_json(out / "model-bench.json", {"model": args.model, "seq": args.seq, "micro_batch": args.micro_batch,
                                          "results": results})
    lines = table(results, f"model {args.model}, seq {args.seq}, micro-batch {args.micro_batch}, "
                           f"{'fp32 CPU smoke' if args.smoke else 'bf16'}, ZeRO-1, one device")
    (out / "model-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("step_s" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
