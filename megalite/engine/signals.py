"""Preemption: a signal only sets a flag; the training loop agrees on it across ranks at a step boundary."""

from __future__ import annotations

import signal
import sys

# Exit codes a batch script can act on (slurm/ requeues on PREEMPTED and HUNG).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved at a step boundary, resume later
EXIT_NONFINITE = 76  # too many consecutive non-finite steps; last good state saved
EXIT_HUNG = 79  # no rank progressed for train.hang_timeout_s: stacks written, suspects named (engine/watchdog.py)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (configurable); read by the loop, never acted on inside the handler."""

    def __init__(self, signal_names: list[str]) -> None:
        self.received: str | None = None
        self._previous = {}
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.received = signal.Signals(signum).name
        print(f"megalite: received {self.received}; saving at the next step boundary", file=sys.stderr, flush=True)

    @property
    def is_set(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
