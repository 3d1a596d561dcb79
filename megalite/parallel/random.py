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
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint

MODEL_PARALLEL_RNG = "model-parallel-rng"  # DeepSpeed's name for the stream


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's default generators from the one config seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# The model-parallel stream's seed, applied to the tracker when a dropout first needs it: a model without
# dropout never touches the tracker, so building and running it does not import DeepSpeed.
_pending_seed: int | None = None


def get_rng_tracker() -> Any:
    """DeepSpeed's model-parallel RNG tracker (one per process), seeded by the last `model_parallel_seed`."""
    global _pending_seed
    # DeepSpeed's own tracker, so that its pipeline activation checkpointing restores it (DeepSpeed is heavy:
    # imported when a dropout first draws from the stream).
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    if _pending_seed is not None:
        tracker.reset()
        tracker.add(MODEL_PARALLEL_RNG, _pending_seed)
        _pending_seed = None
    return tracker


def model_parallel_seed(seed: int, tp_rank: int = 0, pp_rank: int = 0) -> None:
    """Seed the default stream (same across TP) and the model-parallel stream (different per TP rank)."""
    global _pending_seed
    torch.manual_seed(seed + 100 * pp_rank)
    _pending_seed = seed + 2718 + 100 * pp_rank + tp_rank
    if "deepspeed" in sys.modules:
        # Training: seed now, before DeepSpeed's activation checkpointing first saves the tracker's states.
        get_rng_tracker()


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


def checkpoint(fn: Callable[..., torch.Tensor], *args: Any, dropout: bool = True) -> torch.Tensor:
    """Activation checkpointing whose recompute draws the same dropout masks in both RNG streams.

    `dropout=False` (no dropout inside `fn`) skips the model-parallel stream, which then has nothing to replay.
    """
    if not dropout:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
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
