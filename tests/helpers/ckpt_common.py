"""Shared pieces of the checkpoint tests: a tiny DeepSpeed-wrapped MLP, a training step that consumes
every RNG stream (python, numpy, torch via data and dropout), and a pickle payload for the safety test."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

MODEL = {"kind": "mlp", "d_in": 8, "hidden": 32, "d_out": 4}
BATCH = 4


def setup_deepspeed() -> Any:
    """Import DeepSpeed without the 40-100 s shm_comm JIT build (PLATFORM.md) and join the process group."""
    import logging
    from datetime import timedelta

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=30))
    return deepspeed


def seed_all(seed: int) -> None:
    """Seed every RNG stream the training step uses."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ds_config(stage: int) -> dict:
    """fp32 DeepSpeed config with a warmup scheduler whose state must survive a resume too."""
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                      "warmup_num_steps": 5}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(stage: int, seed: int) -> Any:
    """A 2-layer MLP with dropout, AdamW, wrapped by deepspeed.initialize at ZeRO `stage`."""
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(MODEL["d_in"], MODEL["hidden"]),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(MODEL["hidden"], MODEL["d_out"]),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
    return engine


def train_step(engine: Any, step: int) -> float:
    """One step whose batch depends on the data position `step` and on all three RNG streams."""
    x = torch.randn(BATCH, MODEL["d_in"])
    x = x + torch.from_numpy(np.random.standard_normal((BATCH, MODEL["d_in"])).astype(np.float32))
    target = torch.full((BATCH, MODEL["d_out"]), 0.1 * step + random.random())
    loss = torch.nn.functional.mse_loss(engine(x), target)
    engine.backward(loss)
    engine.step()
    return float(loss.item())


class Payload:
    """Pickles to `exec(code)`: unpickling it with weights_only=False creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def build_pipe_engine(seed: int) -> Any:
    """The same kind of MLP as a 2-stage DeepSpeed PipelineModule (one stage per rank), ZeRO-1."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    torch.manual_seed(seed)
    layers = [
        torch.nn.Linear(MODEL["d_in"], MODEL["hidden"]),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(MODEL["hidden"], MODEL["hidden"]),
        torch.nn.GELU(),
        torch.nn.Linear(MODEL["hidden"], MODEL["d_out"]),
    ]
    net = PipelineModule(layers=layers, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform")
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.01)
    cfg = dict(ds_config(1), train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    return engine


def pipe_step(engine: Any, step: int) -> float:
    """One pipeline train_batch of 2 micro-batches drawn from all three RNG streams."""
    batches = []
    for _ in range(2):
        x = torch.randn(2, MODEL["d_in"]) + torch.from_numpy(
            np.random.standard_normal((2, MODEL["d_in"])).astype(np.float32))
        batches.append((x, torch.full((2, MODEL["d_out"]), 0.1 * step + random.random())))
    return float(engine.train_batch(iter(batches)).item())
