"""A data-parallel batch sampler whose whole state is one number: the global count of samples consumed.

The global order is an endless stream: epoch e is a permutation of range(num_samples) drawn from
(seed, e), epochs back to back. Each micro-batch step takes the next `dp_size * micro_batch_size`
samples of the stream, and DP rank r gets slice [r*mbs, (r+1)*mbs) of them. Because the stream does
not depend on dp_size, resuming from `consumed_samples` at any dp_size continues exactly where the
run stopped: every sample is seen exactly once per epoch, with no drop at epoch ends (the micro-batch
that crosses an epoch end takes its tail from the next epoch).

Note for loaders that prefetch (torch DataLoader workers): the sampler counts what it has yielded,
which can run ahead of what training consumed. Save `state_dict(consumed_samples=N)` with the count
the training loop actually used.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from megalite.errors import DataError


class ResumableSampler:
    """Yields lists of dataset indices, one micro-batch for this DP rank per step."""

    def __init__(
        self,
        num_samples: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        consumed_samples: int = 0,
    ):
        if num_samples < 1:
            raise DataError(f"sampler: num_samples {num_samples} must be positive (is the dataset empty?)")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"sampler: dp_rank {dp_rank} is not in range for dp_size {dp_size}")
        if seed < 0:
            raise DataError(f"sampler: seed {seed} must be non-negative")
        if micro_batch_size < 1:
            raise DataError(f"sampler: micro_batch_size {micro_batch_size} must be positive")
        self.num_samples = int(num_samples)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.consumed_samples = int(consumed_samples)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def global_batch(self) -> int:
        """Samples consumed by all DP ranks together per micro-batch step."""
        return self.dp_size * self.micro_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next sample belongs to."""
        return self.consumed_samples // self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch, 0x73616D70]))  # stream "samp"
                self._perm = rng.permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def indices_at(self, start: int, count: int) -> list[int]:
        """Dataset indices at global stream positions [start, start + count)."""
        out: list[int] = []
        pos = start
        while pos < start + count:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(start + count - pos, self.num_samples - offset)
            out.extend(int(i) for i in self._order(epoch)[offset : offset + take])
            pos += take
        return out

    def __len__(self) -> int:
        """Micro-batches left until the current epoch's last sample has been handed out."""
        end = (self.epoch + 1) * self.num_samples
        return -(-(end - self.consumed_samples) // self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        end = (self.epoch + 1) * self.num_samples
        while self.consumed_samples < end:
            start = self.consumed_samples + self.dp_rank * self.micro_batch_size
            batch = self.indices_at(start, self.micro_batch_size)
            self.consumed_samples += self.global_batch
            yield batch

    def state_dict(self, consumed_samples: int | None = None) -> dict:
        """JSON-serialisable state; pass the count training really consumed when a loader prefetches."""
        consumed = self.consumed_samples if consumed_samples is None else int(consumed_samples)
        return {
            "consumed_samples": consumed,
            "epoch": consumed // self.num_samples,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state, also at another dp_size or micro-batch size (consumed is global)."""
        try:
            consumed, num_samples = int(state["consumed_samples"]), int(state["num_samples"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"sampler state {state!r}: missing or bad consumed_samples/num_samples") from e
        if num_samples != self.num_samples:
            raise DataError(
                f"sampler state was saved for {num_samples} samples per epoch, this dataset has {self.num_samples}; "
                "the data or split changed since the checkpoint"
            )
        self.consumed_samples = consumed
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._perm_epoch = -1
