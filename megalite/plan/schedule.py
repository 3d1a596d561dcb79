"""The pipeline schedule: how many micro-batches a stage holds in flight, and how long a step keeps the slowest
stage busy. DeepSpeed's `TrainSchedule` (1F1B, one model chunk per stage) is the schedule megalite runs; another
schedule (interleaved 1F1B, zero bubble) is another set of these three functions."""

from __future__ import annotations


def in_flight(stage: int, stages: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage `stage` of `stages` holds at once: 1F1B's warm-up depth."""
    return min(stages - stage, micro_batches) if stages > 1 else 1


def step_slots(stages: int, micro_batches: int) -> int:
    """A step's length in micro-batch times of the slowest stage: m + p - 1."""
    return micro_batches + stages - 1


def bubble(stages: int, micro_batches: int) -> float:
    """The idle fraction of a step, (p - 1)/(m + p - 1)."""
    return (stages - 1) / step_slots(stages, micro_batches)
