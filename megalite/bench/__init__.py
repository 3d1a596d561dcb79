"""Every benchmark megalite has, one way to run them: `megalite bench NAME [options]`.

    kernels     the Triton kernels against SDPA's backends, flash-attn, torch's and apex's norms (default)
    model       a whole training step of a preset model, megalite's kernels against the torch backend (MFU)
    overhead    megalite's training step against a hand-written DDP loop of the same model and data
    init        building and initialising a preset model on the CPU
    prepare     `megalite prepare` throughput and memory at several corpus sizes and worker counts
    checkpoint  checkpoint save, verify and load time on two ranks
    reshard     offline reshard of a TP2 x PP2 checkpoint to DP4: time and peak memory against saving it
    eval-harness loglikelihood requests/s of the lm-evaluation-harness model against the harness's HF backend
    context     activation memory per rank of one 8k-token micro-batch at context parallelism 1, 2, 4
    moe         the MoE layer against a dense MLP of the same active parameters, grouped against looped experts
    watchdog    the training step with the hang watchdog and straggler report on and off, alternating
    pipeline    step time and idle fraction per rank of the pipeline schedules on a synthetic pipeline, against the plan
    pipeline-engine  DeepSpeed's PipelineEngine per-instruction host cost and BF16_Optimizer's per-micro-batch fp32
                gradient bookkeeping (CPU ranks, sleeping layers)
    zero3       when DeepSpeed's ZeRO-3 gathers each layer against when the layer runs (prefetch on CPU ranks)

Each writes JSON with the git commit and the machine (`run_info`) into its --out folder.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

BENCHMARKS = ("kernels", "model", "overhead", "init", "prepare", "checkpoint", "reshard", "eval_harness", "context",
              "moe", "watchdog", "pipeline", "pipeline_engine", "zero3")
PACKAGE = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """HEAD of the source checkout, with '+dirty' when it has changes; MEGALITE_COMMIT or 'unknown' otherwise."""
    root = PACKAGE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # an installed package, or a copied tree without .git
        return os.environ.get("MEGALITE_COMMIT", "unknown")


def run_info() -> dict[str, Any]:
    """Where and when a benchmark ran: commit, machine, device, versions."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.node()}",
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def join_local_world(rank: int, world: int, port: int, threads: int = 1, timeout_s: float = 600.0) -> None:
    """Start one rank of `megalite.local_ranks.spawn_local_ranks`'s processes: the launcher's environment for it,
    torch's CPU threads, and the process group as training starts it (`megalite.launch.init_distributed`: gloo
    through DeepSpeed, without the JIT build of DeepSpeed's CPU comm op)."""
    import torch

    from megalite.launch import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    init_distributed(timeout_s)


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write a benchmark's result with `run_info()` under the key "run"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run_info(), **result}, indent=1) + "\n")
    return path
