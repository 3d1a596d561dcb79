"""Offline reshard of a real checkpoint (TP2 x PP2 -> TP1 x PP1 x DP4) against the time to save it.

    megalite bench reshard [--preset gpt2-355m] [--seq 128] [--root /tmp/reshard-bench] [--out DIR]

Trains one step of --preset at TP2 x PP2 (ZeRO-1, fp32, AdamW, 4 CPU processes over gloo) on random tokens and
saves it (the save time is the trainer's own `checkpoint` record), then runs `megalite checkpoint reshard` to
TP1 x PP1 x DP4 in a child process. Each rank reports its anonymous resident memory (RssAnon, sampled every 10 ms)
after building its engine and at its peak while the state is moved: resharding streams one parameter at a time, so
the difference should stay near the full state of the largest parameter (the tied embedding), far below the whole
training state, which no rank ever holds. The peak less the engine less the Adam moments of the rank's partition
(which the reshard creates: the finished shard) is the transient; the target is one parameter's full state.
Writes DIR/reshard.json.
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

TOKENS_PER_SAMPLE_MARGIN = 1  # samples are seq_length + 1 tokens


def _tokens(prefix: str, vocab: int, seq: int, samples: int) -> None:
    """Random documents exactly one sample long, with an end-of-document token (0), and the loader's manifest."""
    import numpy as np

    from megalite.data import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab < 2**16 else np.int32
    writer = IndexedDatasetWriter(prefix, dtype=dtype)
    for _ in range(samples):
        doc = rng.integers(1, vocab, size=seq + TOKENS_PER_SAMPLE_MARGIN - 1)
        writer.add_document(np.append(doc, 0).astype(dtype))
    writer.finalize()
    Path(f"{prefix}.json").write_text(json.dumps({"eod_token_id": 0, "bos_token_id": None, "vocab_size": vocab,
                                                  "num_documents": samples}))


def _offline_reshard(source: Path, target: Path, env: dict) -> dict:
    """`megalite checkpoint reshard` to TP1 x PP1 x DP4 in a fresh child; its wall time and every rank's report."""
    probe = ("import json, sys, time\n"
             "from megalite.engine.reshard_offline import reshard\n"
             "report = {}; t = time.perf_counter()\n"
             "reshard(sys.argv[1], sys.argv[2], 1, 1, 4, report=report)\n"
             "report['seconds'] = time.perf_counter() - t\n"
             "print(json.dumps(report))\n")
    out = subprocess.run([sys.executable, "-c", probe, str(source), str(target)], check=True, env=env,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megalite bench reshard", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-355m", help="model preset (configs/models/)")
    ap.add_argument("--seq", type=int, default=128, help="sequence length of the one training step")
    ap.add_argument("--root", default="/tmp/reshard-bench", help="work directory (removed before and after)")
    ap.add_argument("--out", default="out/bench-reshard", help="results folder (default: out/bench-reshard)")
    ap.add_argument("--keep", action="store_true", help="keep the source and target checkpoints under --root")
    args = ap.parse_args(argv)

    from megalite import config as C
    from megalite.checkpoint import resolve_checkpoint
    from megalite.config.derived import count_parameters
    from megalite.config.load import expand_references

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    raw = {
        "model": {"preset": args.preset},
        "parallel": {"tensor": 2, "pipeline": 2},
        "data": {"prefixes": [str(root / "tokens")], "split": "100,0,0", "seq_length": args.seq,
                 "cache_dir": str(root / "cache")},
        "train": {"steps": 1, "seed": 1, "output_dir": str(root / "source"), "log_interval": 1, "eval_interval": 0,
                  "checkpoint_interval": 1, "kernels": "torch", "logging": {"progress_bar": False, "plot": False},
                  "collective_timeout_s": 1800},
        "deepspeed": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": 1}},
    }
    raw = expand_references(raw, None)  # the preset, inlined
    cfg = C.from_dict(json.loads(json.dumps(raw)), world_size=4)
    _tokens(str(root / "tokens"), cfg.model.vocab_size, args.seq, samples=64)
    config_path = root / "source.json"
    config_path.write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    t0 = time.perf_counter()
    subprocess.run([torchrun, "--nproc_per_node", "4", "-m", "megalite.cli", "train", str(config_path)], check=True,
                   env=env)
    train_s = time.perf_counter() - t0
    records = [json.loads(line) for line in (root / "source" / "metrics.jsonl").read_text().splitlines()]
    save_s = next(r["seconds"] for r in records if r.get("kind") == "checkpoint")
    source = resolve_checkpoint(root / "source")
    params = count_parameters(cfg.model)["total"]

    target = root / "target"
    report = _offline_reshard(source, target, env)
    ranks = report["ranks"]
    shard = params * 4 + params * 12 // 4  # one DP4 ZeRO-1 rank: fp32 module + a quarter of master and moments
    largest = count_parameters(cfg.model)["embedding"]  # bounds the largest single parameter (tied vocab x hidden)
    extra = max(r["reshard_peak_bytes"] - r["engine_bytes"] for r in ranks)
    moments = params * 8 // 4  # the Adam moments of a DP4 rank's partition, created by the reshard (fp32)
    result = {
        "preset": args.preset, "parameters": params, "from": "TP2 x PP2 x DP1, ZeRO-1", "to": "TP1 x PP1 x DP4, ZeRO-1",
        "checkpoint_bytes": _dir_bytes(source), "training_state_bytes": params * 12,
        "train_one_step_and_save_s": round(train_s, 1), "save_s": round(save_s, 2),
        "reshard_s": round(report["seconds"], 1), "reshard_over_save": round(report["seconds"] / save_s, 2),
        "state_move_s": max(r["load_s"] for r in ranks), "target_save_s": max(r["save_s"] for r in ranks),
        "target_rank_shard_bytes": shard, "largest_parameter_state_bytes": largest * 12,
        "engine_bytes": max(r["engine_bytes"] for r in ranks),
        "reshard_peak_bytes": max(r["reshard_peak_bytes"] for r in ranks),
        "reshard_extra_bytes": extra, "partition_moments_bytes": moments,
        "transient_bytes": extra - moments,  # beyond the rank's own finished shard
        "transient_over_largest_parameter": round((extra - moments) / (largest * 12), 2),
        "reshard_peak_over_training_state": round(max(r["reshard_peak_bytes"] for r in ranks) / (params * 12), 2),
        "memory_note": "anonymous resident memory (RssAnon) sampled every 10 ms; the memory-mapped source pages are "
                       "page cache, not counted",
        "ranks": ranks,
    }
    print(json.dumps(result, indent=1))
    write_json(Path(args.out) / "reshard.json", result)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
