"""Host memory measurements shared by the benchmarks, the offline reshard's report and the tests.

torch's CPU allocations are invisible to tracemalloc, so resident memory comes from /proc (Linux; 0 elsewhere).
RssAnon counts a process's own allocations and not file pages (memory-mapped checkpoints), which the kernel can
drop at will.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory in bytes (0 where /proc/self/status has no RssAnon)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_anon_growth(fn: Callable[[], Any], interval_s: float = 0.001) -> tuple[int, Any]:
    """The largest growth of anonymous memory over its level at the call while `fn()` runs (sampled by a thread
    every `interval_s`), and what `fn` returned."""
    base, peak, done = rss_anon_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], rss_anon_bytes() - base)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss_anon_bytes() - base)
    return peak[0], result


class SavedBytes:
    """The distinct storages autograd saved for backward inside `count_saved_bytes`, parameters excluded."""

    def __init__(self, parameter_storages: set[int]) -> None:
        self._parameters = parameter_storages
        self._storages: dict[int, int] = {}

    def pack(self, t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._parameters:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())


@contextlib.contextmanager
def count_saved_bytes(model: Any) -> Iterator[SavedBytes]:
    """Count what autograd saves for backward while the block runs (each storage once, `model`'s parameters
    excluded): the activation memory of a forward."""
    import torch

    counter = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter


def saved_activation_bytes(model: Any, forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves during `forward()` (the model's parameters excluded)."""
    with count_saved_bytes(model) as counter:
        forward()
    return counter.bytes
