"""Peak memory of a call, measured from /proc (torch's CPU allocations are invisible to tracemalloc)."""

from __future__ import annotations


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def peak_anon_growth(fn) -> tuple[int, object]:
    """Largest growth of this process's anonymous memory while `fn` runs (sampled every millisecond)."""
    import threading
    import time

    base, peak, done = rss_anon_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_bytes() - base)
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return peak[0], result
