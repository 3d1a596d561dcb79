"""Random streams for tensor parallelism, and activation checkpointing that replays them.

Two streams on the accelerator's default generator:
- the default stream, seeded `seed + 100 * pp_rank`: identical on every TP rank, used where
  activations are replicated across TP (hidden dropout without sequence parallelism);
- the model-parallel stream, DeepSpeed's `get_cuda_rng_tracker()` entry 'model-parallel-rng',
  seeded `seed + 2718 + 100 * pp_rank + tp_rank`: different per TP rank, used where activations are
  split across TP (attention dropout on head shards, any dropout on sequence shards).
Using DeepSpeed's tracker means DeepSpeed's own activation checkpointing (PipelineModule's) restores
it on recompute, as `checkpoint` below does for the plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

MODEL_PARALLEL_RNG = "model-parallel-rng"  # DeepSpeed's name for the stream


def get_rng_tracker() -> Any:
    """DeepSpeed's model-parallel RNG tracker (one per process)."""
    return get_cuda_rng_tracker()


def model_parallel_seed(seed: int, tp_rank: int = 0, pp_rank: int = 0) -> None:
    """Seed the default stream (same across TP) and the model-parallel stream (different per TP rank)."""
    torch.manual_seed(seed + 100 * pp_rank)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + 100 * pp_rank + tp_rank)


@contextlib.contextmanager
def model_parallel_rng(enabled: bool = True) -> Iterator[None]:
    """Draw from the per-TP-rank stream inside the block (seeded on first use if never seeded)."""
    if not enabled:
        yield
        return
    tracker = get_rng_tracker()
    if MODEL_PARALLEL_RNG not in tracker.get_states():
        # Unseeded (a test, a notebook): derive from the default stream so runs stay reproducible.
        tracker.add(MODEL_PARALLEL_RNG, int(torch.randint(0, 2**31 - 1, (1,)).item()) + 2718)
    with tracker.fork(MODEL_PARALLEL_RNG):
        yield


def checkpoint(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Activation checkpointing whose recompute draws the same dropout masks in both RNG streams."""
    # torch's checkpoint restores the default generators; the tracker's states we restore ourselves.
    saved: dict = {}

    def run(*inner: Any) -> torch.Tensor:
        tracker = get_rng_tracker()
        if not saved:
            saved["states"] = tracker.get_states()
            saved["set"] = True
            return fn(*inner)
        current = tracker.get_states()
        tracker.set_states(dict(saved["states"]))
        try:
            return fn(*inner)
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
