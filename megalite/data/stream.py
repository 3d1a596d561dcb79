"""Endless micro-batches of a dataset for one data-parallel rank (the training loop's and the evaluator's input)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megalite.data.dataset import collate
from megalite.data.sampler import ResumableSampler


class BatchStream:
    """Endless micro-batches for this DP rank from a ResumableSampler, epoch after epoch."""

    def __init__(self, dataset: Any, sampler: ResumableSampler, device: torch.device) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self._it: Iterator[list[int]] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.sampler)
        try:
            indices = next(self._it)
        except StopIteration:
            self._it = iter(self.sampler)  # next epoch
            indices = next(self._it)
        return collate([self.dataset[i] for i in indices], self.device)
