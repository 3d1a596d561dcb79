"""Who sets the pace: per-rank compute time and time spent waiting in collectives, over each log window.

A rank that is slower than the others (a throttled GPU, a bad link, a busy host) makes every other rank wait
for it in the next collective; the slow rank itself waits least (measured: with rank 1 sleeping 2 s per step,
rank 0 waits 2.0 s in the all_reduce and rank 1 0.002 s). So each rank measures, over a log window, its wall
time and the time its training thread spent inside `torch.distributed` collectives (the `CollectiveClock`);
compute = wall - waiting. One small all-gather per log window brings every rank's numbers to every rank;
rank 0 writes the slowest and fastest ranks and their ratio to `metrics.jsonl` (kind "stragglers") and warns
about a rank whose compute time exceeds the median of its pipeline stage by more than `train.straggler_margin`
(and by MIN_EXCESS_S) in `train.straggler_windows` consecutive windows.

What the clock sees: every collective called through `torch.distributed` (and DeepSpeed's comm layer, which
calls it) on the training thread, synchronous ones fully; an asynchronous call (`async_op=True`) counts its
launch only, and its wait shows as compute. On the CPU (gloo) the time inside a call is the waiting plus the
transfer. With NCCL a call returns once launched, so the clock records CUDA events around each call on the
current stream and reads them at the end of the window (this path has not been run on a GPU yet). Time inside
checkpoints and evaluation (`CollectiveClock.excluded`) counts neither as compute nor as waiting.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from megalite.distributed import all_gather_objects, is_distributed, world_size

# The torch.distributed entry points timed; the object collectives call the tensor ones (counted once).
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "all_gather_object", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
               "reduce_scatter_single", "_reduce_scatter_base", "reduce",
               "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "all_to_all",
               "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv")

# Per-rank lists in each metrics record up to this many ranks; beyond it, only the extremes and the median.
PER_RANK_LIMIT = 64
# A rank is slow only when it also exceeds its stage's median by this many seconds in the window: with windows of a
# few milliseconds (tiny CPU runs) a 20% difference is noise.
MIN_EXCESS_S = 0.05


class CollectiveClock:
    """Seconds the training thread spends inside torch.distributed collectives, by wrapping them (see module doc).

    `current` names the collective the training thread is inside right now (None outside one): the watchdog
    publishes it, so a hang report tells the ranks waiting in a collective from the one that never arrived.
    `calls` counts the collectives it finished: each is progress of every rank in it (the watchdog counts it, so a
    long evaluation or set-up that keeps communicating is not taken for a hang)."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.calls = 0
        self._main = threading.main_thread().ident
        self._seconds = 0.0
        self._excluded_s = 0.0
        self._excluding = 0
        self._depth = 0
        self._events: list[tuple[Any, Any]] = []
        self._cuda = False
        self._originals: list[tuple[Any, str, Any]] = []

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def install(self) -> None:
        """Wrap the collectives in torch.distributed (and the copies DeepSpeed's comm backend cached)."""
        import torch
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        if self.installed:
            return
        self._cuda = torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
        wrapped: dict[int, Any] = {}
        for module in (dist, c10d):
            for name in COLLECTIVES:
                fn = getattr(module, name, None)
                if fn is None or getattr(fn, "__megalite_clock__", None) is not None:
                    continue
                timed = wrapped.setdefault(id(fn), self._wrap(name, fn))
                self._originals.append((module, name, fn))
                setattr(module, name, timed)
        # DeepSpeed's torch backend looked these up once, when the process group started.
        cdb = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
        for attr in ("all_gather_function", "reduce_scatter_function"):
            fn = getattr(cdb, attr, None)
            if fn is not None and id(fn) in wrapped:
                self._originals.append((cdb, attr, fn))
                setattr(cdb, attr, wrapped[id(fn)])

    def uninstall(self) -> None:
        """Put the original functions back."""
        for owner, name, fn in reversed(self._originals):
            setattr(owner, name, fn)
        self._originals = []

    def _wrap(self, name: str, fn: Callable) -> Callable:
        clock = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if clock._depth or threading.get_ident() != clock._main:
                return fn(*args, **kwargs)
            clock._depth, clock.current = 1, name
            timing = not clock._excluding
            events = None
            if timing and clock._cuda:
                import torch

                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if events is not None:
                    events[1].record()
                    clock._events.append(events)
                elif timing:
                    clock._seconds += time.perf_counter() - start
                clock.calls += 1
                clock._depth, clock.current = 0, None

        timed.__megalite_clock__ = fn  # type: ignore[attr-defined]
        return timed

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Neither compute nor waiting inside: checkpoints and evaluation (their length is not a rank's pace)."""
        self._excluding += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._excluding -= 1
            if not self._excluding:
                self._excluded_s += time.perf_counter() - start

    def take(self) -> tuple[float, float]:
        """(seconds waited in collectives, seconds excluded) since the last call; resets both."""
        waited = self._seconds
        if self._events:
            self._events[-1][1].synchronize()
            waited += sum(start.elapsed_time(end) for start, end in self._events) / 1e3
            self._events = []
        excluded = self._excluded_s
        self._seconds = self._excluded_s = 0.0
        return waited, excluded


_clock: CollectiveClock | None = None


def collective_clock() -> CollectiveClock:
    """The process's clock, installed on first use."""
    global _clock
    if _clock is None:
        _clock = CollectiveClock()
    if not _clock.installed:
        _clock.install()
    return _clock


def release_clock() -> None:
    """Uninstall the clock (the end of a run)."""
    if _clock is not None:
        _clock.uninstall()


def host_name() -> str:
    """This rank's host as the scheduler names it (SLURM's node name), else the machine's short name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


class StragglerReport:
    """Every rank calls `window(step, sink)` at the same step (each log window); rank 0 logs and warns."""

    def __init__(self, margin: float, windows: int, device: Any, stage: int = 0) -> None:
        self.margin, self.windows, self.device, self.stage = margin, windows, device, stage
        self.clock = collective_clock()
        self.clock.take()
        self._start = time.perf_counter()
        self._hosts: list[str] | None = None
        self._stages: list[int] | None = None
        self._slow_for: dict[int, int] = {}  # rank -> consecutive windows above the margin
        self.flagged: list[int] = []  # ranks slow for `windows` windows in a row, as of the last window
        self._medians: list[float] = []

    def window(self, step: int, sink: Any = None) -> dict | None:
        """Close this window: gather (compute, wait) of every rank; returns the record (every rank), logs it on rank
        0. Collective: every rank must call it at the same step."""
        import torch
        import torch.distributed as dist

        now = time.perf_counter()
        waited, excluded = self.clock.take()
        wall = max(now - self._start - excluded, 0.0)
        compute = max(wall - waited, 0.0)
        if not is_distributed():
            self._start = time.perf_counter()
            return None
        if self._hosts is None:  # once: where each rank runs and its pipeline stage
            pairs = all_gather_objects((host_name(), self.stage))
            self._hosts, self._stages = [h for h, _ in pairs], [s for _, s in pairs]
        mine = torch.tensor([compute, waited], dtype=torch.float64, device=self.device)
        every = torch.empty(2 * dist.get_world_size(), dtype=torch.float64, device=self.device)
        # torch 2.13 names it all_gather_single (all_gather_into_tensor warns); torch 2.11 has only the old name.
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(every, mine)
        self.clock.take()  # the gather's own wait belongs to no window
        self._start = time.perf_counter()
        values = every.view(-1, 2).tolist()
        compute_all, wait_all = [c for c, _ in values], [w for _, w in values]
        record = self._record(step, compute_all, wait_all)
        if sink is not None:
            sink.log(record)
        if dist.get_rank() == 0:
            for rank in self.flagged:
                count = self._slow_for[rank]
                if count == self.windows or count % (10 * self.windows) == 0:  # when named, then now and then
                    print(f"megalite: warning: straggler: rank {rank} on {self._hosts[rank]} computed "
                          f"{compute_all[rank]:.3f} s and waited {wait_all[rank]:.3f} s in collectives in the window "
                          f"ending at step {step}, more than {100 * self.margin:.0f}% above the median of its pipeline "
                          f"stage ({self._medians[rank]:.3f} s) for {count} windows in a row: the other ranks wait "
                          "for it", file=sys.stderr, flush=True)
        return record

    def _record(self, step: int, compute: list[float], wait: list[float]) -> dict:
        """The metrics record of one window, and the persistence count of each slow rank."""
        assert self._hosts is not None and self._stages is not None
        world = len(compute)
        slowest = max(range(world), key=lambda r: compute[r])
        fastest = min(range(world), key=lambda r: compute[r])
        ratio = compute[slowest] / compute[fastest] if compute[fastest] > 0 else None
        self.flagged, self._medians = [], []
        for rank in range(world):
            peers = [compute[r] for r in range(world) if self._stages[r] == self._stages[rank]]
            median = statistics.median(peers)
            self._medians.append(median)
            if len(peers) > 1 and compute[rank] > max(median * (1.0 + self.margin), median + MIN_EXCESS_S):
                self._slow_for[rank] = self._slow_for.get(rank, 0) + 1
                if self._slow_for[rank] >= self.windows:
                    self.flagged.append(rank)
            else:
                self._slow_for.pop(rank, None)
        record = {
            "kind": "stragglers", "step": step,
            "slowest_rank": slowest, "slowest_host": self._hosts[slowest],
            "fastest_rank": fastest, "fastest_host": self._hosts[fastest],
            "ratio": ratio,
            "compute_s_max": compute[slowest], "compute_s_median": statistics.median(compute),
            "compute_s_min": compute[fastest],
            "wait_s_max": max(wait), "wait_s_min": min(wait),
            "flagged": list(self.flagged),
        }
        if world <= PER_RANK_LIMIT:
            record["compute_s"] = [round(c, 6) for c in compute]
            record["wait_s"] = [round(w, 6) for w in wait]
        return record


_report: StragglerReport | None = None


def start(cfg: Any, device: Any, stage: int) -> StragglerReport | None:
    """The run's straggler report (every rank; `stage` is this rank's pipeline stage, ranks are compared within
    their stage). None when train.watchdog is off or there is one rank."""
    global _report
    _report = None
    if cfg.train.watchdog and world_size() > 1:
        _report = StragglerReport(cfg.train.straggler_margin, cfg.train.straggler_windows, device, stage)
    return _report


def window(step: int, sink: Any = None) -> dict | None:
    """Close the running report's log window (collective: every rank at the same step); no-op when off."""
    return _report.window(step, sink) if _report is not None else None


def stop() -> None:
    """Forget the running report (megalite.engine.watchdog.stop calls it)."""
    global _report
    _report = None
