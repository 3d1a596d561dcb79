"""Activation memory per rank of one long-sequence micro-batch under context parallelism (parallel.context = c).

    megalite bench context [--seq 8192] [--contexts 1 2 4] [--backward] [--out out/bench-context]

For each c: c CPU processes over gloo (`ProcessGrid(context=c)`), each building the same small Llama-family model
(hidden 256, 4 layers, 8 query and 4 key/value heads, SwiGLU 768, RoPE, vocabulary 8192, untied) and running one
micro-batch of 1 x seq tokens (the loss, torch kernels): every rank holds seq / c tokens outside attention and runs
attention over the whole sequence with 8 / c heads. Per rank it reports the bytes autograd saves for the backward
(`torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded), the peak growth of resident
anonymous memory during the forward (or forward + backward with --backward; glibc told to return every block
over 1 MiB, so freed memory leaves), the time, and `megalite plan`'s activation estimate for the same layout.
Writes DIR/context.json.

    megalite bench context --plan-longest [--preset gpt3-1.3b] [--device h200]

prints instead `megalite plan`'s longest sequence of one micro-batch that fits, for the preset at c = 1 on one GPU
and at c = 8 on eight (bf16, ZeRO-1, activation recompute, 4096-token loss chunks, megalite's attention kernel,
model.max_position_embeddings raised to the sequence): arithmetic only, no GPU needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from megalite.bench import join_local_world, write_json

MODEL = {"vocab_size": 8192, "hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
         "ffn_hidden_size": 768, "norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False,
         "tied_embeddings": False, "make_vocab_size_divisible_by": 128}


def run_config(seq: int, context: int) -> Any:
    """The run config of one measurement (also what the plan is asked about)."""
    from megalite import config as C

    raw = {"model": {**MODEL, "max_position_embeddings": seq}, "parallel": {"context": context},
           "data": {"prefixes": ["unused"], "seq_length": seq},
           "train": {"kernels": "torch"},
           "deepspeed": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}}}
    return C.from_dict(raw, world_size=context)


def _rank(rank: int, world: int, port: int, seq: int, backward: bool, results: Any) -> None:
    import torch
    import torch.distributed as dist

    join_local_world(rank, world, port, threads=max(1, (os.cpu_count() or 1) // world), timeout_s=1800)
    from megalite import kernels
    from megalite.memory import count_saved_bytes, peak_anon_growth
    from megalite.model import build_model
    from megalite.parallel import ProcessGrid

    kernels.set_backend("torch")
    cfg = run_config(seq, world)
    grid = ProcessGrid(context=world) if world > 1 else None
    model = build_model(cfg.model, cfg.parallel, grid, seed=1)
    model.train()
    ids = torch.randint(1, cfg.model.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    saved = None

    def step() -> float:
        nonlocal saved
        with count_saved_bytes(model) as saved:
            loss = model(ids, labels=ids)
        if backward:
            loss.backward()
        return float(loss)

    dist.barrier()
    t0 = time.perf_counter()
    growth, loss = peak_anon_growth(step)
    seconds = time.perf_counter() - t0
    results.put(("ok", rank, {"saved_bytes": saved.bytes, "peak_growth_bytes": growth,
                              "seconds": round(seconds, 2), "loss": loss}))
    dist.barrier()
    dist.destroy_process_group()


def measure(seq: int, context: int, backward: bool) -> list[dict]:
    """Every rank's figures for one context-parallel degree."""
    from megalite.local_ranks import spawn_local_ranks

    out, errors, codes = spawn_local_ranks(_rank, context, seq, backward)
    if errors or len(out) != context:
        raise RuntimeError(f"context {context}: " + ("; ".join(errors) or f"exit codes {codes}"))
    return [out[r] for r in range(context)]


def planned_activation_bytes(seq: int, context: int) -> float:
    """`megalite plan`'s activations of one micro-batch on one rank (CPU kernels) for the same layout."""
    from megalite import plan as P

    cfg = run_config(seq, context)
    layout = P.layout_of(cfg, context)
    stage = P.stages(cfg, 1, 1)[0]
    return sum(P.activation_bytes(cfg, layout, stage, P.settings(cfg, platform="cpu")).values())


def plan_longest(preset: str, device_name: str, context: int) -> dict:
    """The longest sequence (a multiple of 1024 x context) whose one micro-batch fits on `context` GPUs at CP `context`,
    by the plan."""
    from megalite import config as C
    from megalite import plan as P

    device = P.get_device(device_name)

    def fits(seq: int) -> tuple[bool, float]:
        raw = {"model": {"preset": preset, "max_position_embeddings": seq, "activation_checkpointing": True,
                         "loss_chunk_tokens": 4096},
               "parallel": {"context": context}, "data": {"prefixes": ["unused"], "seq_length": seq},
               "train": {"kernels": "triton"},
               "deepspeed": {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                             "zero_optimization": {"stage": 1}}}
        cfg = C.from_dict(C.expand_references(raw, None), world_size=context)
        p = P.plan(cfg, context, device, gpus_per_node=8)
        return p.fits, p.peak_memory / P.GiB

    unit = 1024 * context
    lo, hi = 0, unit
    while fits(hi)[0]:
        lo, hi = hi, hi * 2
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        lo, hi = (mid, hi) if fits(mid)[0] else (lo, mid)
    return {"preset": preset, "device": device.name, "context": context, "gpus": context, "longest_seq": lo,
            "memory_gib_at_longest": round(fits(lo)[1], 1) if lo else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megalite bench context", description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192, help="sequence length of the micro-batch (default 8192)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4], help="context-parallel degrees")
    ap.add_argument("--backward", action="store_true", help="also run the backward (peak of forward + backward)")
    ap.add_argument("--out", default="out/bench-context", help="results folder (default: out/bench-context)")
    ap.add_argument("--plan-longest", action="store_true", help="print the plan's longest sequence at c = 1 and 8")
    ap.add_argument("--preset", default="gpt3-1.3b", help="model preset for --plan-longest")
    ap.add_argument("--device", default="h200", help="device of the plan for --plan-longest")
    args = ap.parse_args(argv)
    if args.plan_longest:
        print(json.dumps([plan_longest(args.preset, args.device, c) for c in (1, 8)], indent=1))
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "1048576"  # children: freed blocks over 1 MiB go back to the system
    rows = []
    for c in args.contexts:
        ranks = measure(args.seq, c, args.backward)
        rows.append({"context": c, "tokens_per_rank": args.seq // c,
                     "saved_bytes_per_rank": max(r["saved_bytes"] for r in ranks),
                     "peak_growth_bytes_per_rank": max(r["peak_growth_bytes"] for r in ranks),
                     "planned_bytes_per_rank": planned_activation_bytes(args.seq, c),
                     "seconds": max(r["seconds"] for r in ranks), "loss": ranks[0]["loss"], "ranks": ranks})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ranks"}), flush=True)
    base = rows[0]
    for row in rows:
        row["saved_vs_first"] = round(row["saved_bytes_per_rank"] / base["saved_bytes_per_rank"], 3)
        row["peak_vs_first"] = round(row["peak_growth_bytes_per_rank"] / max(1, base["peak_growth_bytes_per_rank"]), 3)
        row["plan_over_saved"] = round(row["planned_bytes_per_rank"] / row["saved_bytes_per_rank"], 3)
    result = {"seq": args.seq, "model": MODEL, "micro_batch": 1, "backward": args.backward, "kernels": "torch",
              "rows": rows}
    print(json.dumps([{k: v for k, v in r.items() if k != "ranks"} for r in rows], indent=1))
    write_json(Path(args.out) / "context.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
