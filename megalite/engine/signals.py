"""Preemption: a signal only sets a flag; the training loop agrees on it across ranks at a step boundary."""

from __future__ import annotations

import signal
import sys
from typing import Any

# Exit codes a batch script can act on (slurm/ requeues on PREEMPTED and HUNG).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved at a step boundary, resume later
EXIT_NONFINITE = 76  # too many consecutive non-finite steps; last good state saved
EXIT_HUNG = 79  # no rank progressed for train.hang_timeout_s: stacks written, suspects named (engine/watchdog.py)


DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptedDuringSetUp(Exception):
    """A preemption signal reached some rank before the first step: every rank stops at the same set-up phase (named
    by the message) and the run exits EXIT_PREEMPTED with nothing to save."""  # train.preemption_signals' default


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (configurable); read by the loop, never acted on inside the handler."""

    def __init__(self, signal_names: list[str] | tuple[str, ...]) -> None:
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self.handle_only(signal_names)

    def handle_only(self, signal_names: list[str] | tuple[str, ...]) -> None:
        """Handle exactly these signals from now on: the others get back the handler they had before (a signal
        already received stays received)."""
        wanted = {getattr(signal, name) for name in signal_names}
        for sig in [s for s in self._previous if s not in wanted]:
            signal.signal(sig, self._previous.pop(sig))
        for sig in wanted - set(self._previous):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.received = signal.Signals(signum).name
        print(f"megalite: received {self.received}; saving at the next step boundary", file=sys.stderr, flush=True)

    @property
    def is_set(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        global _early
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if _early is self:
            _early = None


_early: PreemptionFlag | None = None


def catch_preemption_early() -> PreemptionFlag:
    """The first thing `megalite train` does, before its slow imports (torch, DeepSpeed: seconds on a shared file
    system): catch the default preemption signals, so that one arriving during start-up leads to a requeue (exit 75)
    instead of killing the job. The run's flag takes this one over (`preemption_flag`)."""
    global _early
    if _early is None:
        _early = PreemptionFlag(DEFAULT_SIGNALS)
    return _early


def preemption_flag(signal_names: list[str]) -> PreemptionFlag:
    """The run's flag for train.preemption_signals: the one `catch_preemption_early` installed, now handling exactly
    these signals (one it caught before the configuration was known still counts), or a new one."""
    if _early is not None:
        _early.handle_only(signal_names)
        return _early
    return PreemptionFlag(signal_names)
