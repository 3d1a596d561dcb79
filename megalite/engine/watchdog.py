"""The progress watchdog: a hung rank is found, named and the job ended with EXIT_HUNG, instead of every rank
waiting in a collective until its timeout, with no word of who stopped.

Every rank runs a thread beside its training loop. The loop only marks where it is: `phase("forward")` at each
phase of a step, `step_done(step)` after each step, `during("checkpoint")` around checkpoints, evaluation and
resume (a decorator or a context manager); set-up marks each `megalite.distributed.agree` phase. Each mark is
two attribute writes on the loop's thread; the rest happens in the thread:

- it publishes this rank's record (step, phase, a progress counter: marks passed plus collectives finished, a
  heartbeat, the collective it is waiting in, host, pid) in the rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT that started the process
  group), every `poll_s`;
- on rank 0 (the monitor) it reads every rank's record; when no rank's progress counter has moved for the hang
  timeout, it writes a verdict naming the suspects: the ranks whose heartbeat stopped (a stopped, dead or
  starved process: it cannot write anything itself), else the ranks not waiting in a collective (the others
  wait for them), else the ranks at the lowest step;
- every rank that reads the verdict writes its Python stacks (all threads, faulthandler) and its flight-recorder
  trace (torch's `TORCH_FR_BUFFER_SIZE` ring of collectives) into `<output_dir>/hangs/<session>/`, prints one
  line naming the suspects and their hosts, and leaves with EXIT_HUNG (79), which the batch scripts requeue,
  excluding the named hosts where they can;
- when rank 0 itself is stopped, the store it hosts stops answering: the other ranks notice it (a store call
  without an answer, or rank 0's heartbeat standing still) and, once their own progress has stood still for
  their timeout, name rank 0 themselves.

The timeout: `train.hang_timeout_s` during steps (None: ten times the slowest of the last steps, at least
HANG_FLOOR_S), `train.hang_timeout_long_s` during set-up, the first step (compilation, warm-up), checkpoints
and evaluation (None: 0.9 x train.collective_timeout_s, so the watchdog speaks before a collective times out
naming nobody). A rank that is only slow keeps moving its counter and is never declared hung; the monitor
applies the longest timeout any rank currently asks for. With one rank there is nobody to wait for: off.

Store calls run on a helper thread and are waited for with a limit: a TCPStore client waits for an answer
from a stopped server without end (measured, torch 2.13), and the watchdog must never wait with it.

Fault injection for the tests (like megalite.checkpoint.faults): MEGALITE_HANG_FAULT=<phase>[@<step>],
MEGALITE_HANG_FAULT_RANK (default 0), MEGALITE_HANG_FAULT_ACTION=stop|sleep (SIGSTOP this process once,
MEGALITE_HANG_FAULT_SETTLE_S (default 1) seconds into the phase, after writing the marker `hang-fault-rank<r>`
into MEGALITE_HANG_FAULT_DIR (default the output directory); or sleep MEGALITE_HANG_FAULT_SLEEP_S seconds each
time the phase starts: a straggler).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import faulthandler
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megalite import distributed
from megalite.engine import stragglers
from megalite.engine.signals import EXIT_HUNG
from megalite.engine.stragglers import collective_clock, host_name, release_clock

HANG_FLOOR_S = 120.0  # the derived step timeout is never shorter
STEP_FACTOR = 10.0  # derived step timeout: this many times the slowest recent step
RECENT_STEPS = 50
LONG_FRACTION = 0.9  # derived long timeout: this fraction of train.collective_timeout_s
HANG_DIR_ENV = "MEGALITE_HANG_DIR"  # the batch scripts point it at a folder per job attempt
FAULT_ENV = "MEGALITE_HANG_FAULT"
PREFIX = "megalite/watchdog"


@dataclass
class Limits:
    """The watchdog's timing: step and long timeouts, polling interval, heartbeat staleness."""

    step_s: float | None  # None: derived from the measured step time
    long_s: float
    poll_s: float
    stale_s: float  # a heartbeat older than this: the process is not running
    store_wait_s: float  # a store call without an answer after this: the store is not answering

    @classmethod
    def of(cls, train: Any) -> Limits:
        """From the config's `train` section (validated: every timeout below the collective timeout)."""
        long_s = train.hang_timeout_long_s or LONG_FRACTION * train.collective_timeout_s
        shortest = min(train.hang_timeout_s or min(HANG_FLOOR_S, long_s), long_s)
        poll = min(5.0, max(0.05, shortest / 10.0))
        return cls(step_s=train.hang_timeout_s, long_s=long_s, poll_s=poll,
                   stale_s=min(max(4.0 * poll, 2.0), 0.5 * shortest), store_wait_s=max(2.0 * poll, 1.0))


class StoreChannel:
    """Store calls on a helper thread, each waited for at most `wait_s`: the caller never blocks longer.

    After a call without an answer the channel reports `stuck_since` until that call returns; after a network
    error (the store's host is gone) it is `dead` for good."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._store: Any = None
        self._calls: queue.Queue = queue.Queue()
        self._pending: dict | None = None
        self.stuck_since: float | None = None
        self.dead: str | None = None
        threading.Thread(target=self._serve, name="megalite-watchdog-store", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            try:
                if self._store is None:
                    self._store = self._connect()
                call["value"] = call["fn"](self._store)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                call["error"] = e
            call["done"].set()

    def call(self, fn: Callable[[Any], Any], wait_s: float) -> tuple[bool, Any]:
        """(True, value) or (False, why not)."""
        if self.dead:
            return False, self.dead
        if self._pending is not None:
            if not self._pending["done"].is_set():
                return False, f"no answer for {time.monotonic() - (self.stuck_since or 0):.1f} s"
            self._pending, self.stuck_since = None, None
        call = {"fn": fn, "done": threading.Event()}
        self._calls.put(call)
        if not call["done"].wait(wait_s):
            self._pending, self.stuck_since = call, time.monotonic()
            return False, f"no answer within {wait_s:.1f} s"
        if "error" in call:
            error = call["error"]
            if "Network" in type(error).__name__ or isinstance(error, (ConnectionError, OSError)):
                self.dead = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            return False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return True, call.get("value")


def store_address() -> tuple[str, int]:
    """Host and port of the rendezvous store: the default process group's TCPStore, else MASTER_ADDR/PORT."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        while hasattr(store, "underlying_store"):
            store = store.underlying_store
        if isinstance(store, dist.TCPStore):
            return store.host, store.port
    except (RuntimeError, ValueError, AttributeError):
        pass
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))


def connect_store(host: str, port: int, timeout_s: float = 60.0) -> Any:
    """A client connection of its own to the rendezvous store (not the process group's, which collectives use)."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def check_store(rank: int, wait_s: float = 30.0, address: tuple[str, int] | None = None) -> tuple[bool, str]:
    """Preflight: whether this rank reaches the watchdog's store (a write and a read back); (ok, what was seen)."""
    host, port = address or store_address()
    channel = StoreChannel(lambda: connect_store(host, port))
    key = f"{PREFIX}/preflight/r{rank}"
    t0 = time.perf_counter()
    ok, value = channel.call(lambda s: (s.set(key, str(rank)), s.get(key))[1], wait_s)
    if not ok:
        return False, (f"the rendezvous store at {host}:{port} did not answer rank {rank} ({value}); the watchdog "
                       "cannot see this rank's progress (check MASTER_ADDR/MASTER_PORT and firewalls)")
    if value != str(rank).encode():
        return False, f"the rendezvous store at {host}:{port} returned {value!r} for rank {rank}'s own key"
    return True, f"rendezvous store {host}:{port} reachable, round trip {1e3 * (time.perf_counter() - t0):.1f} ms"


class PhaseFault:
    """The test hook (see the module doc): stop or slow one rank when a phase starts."""

    def __init__(self, rank: int, default_dir: Path) -> None:
        spec = os.environ.get(FAULT_ENV, "")
        self.phase, _, step = spec.rpartition("@") if "@" in spec else (spec, "", "")
        self.step = int(step) if step else None
        self.active = bool(spec) and rank == int(os.environ.get(f"{FAULT_ENV}_RANK", "0"))
        self.action = os.environ.get(f"{FAULT_ENV}_ACTION", "stop")
        self.sleep_s = float(os.environ.get(f"{FAULT_ENV}_SLEEP_S", "1"))
        self.settle_s = float(os.environ.get(f"{FAULT_ENV}_SETTLE_S", "1"))
        self.marker = Path(os.environ.get(f"{FAULT_ENV}_DIR") or default_dir) / f"hang-fault-rank{rank}"

    def fire(self, phase: str, step: int) -> None:
        if phase != self.phase or (self.step is not None and step != self.step):
            return
        if self.action == "sleep":
            time.sleep(self.sleep_s)
            return
        self.active = False  # stop once: after SIGCONT the run goes on
        reached = time.time()  # this rank's last progress (the mark); the stop comes settle_s and the marker later
        time.sleep(self.settle_s)  # hung a moment into the phase: the watchdog has published where it is
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        with open(self.marker, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "phase": phase, "step": step, "reached": reached,
                                "time": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGSTOP)


class Watchdog:
    """One rank's watchdog (see the module doc). Use the module functions; `start` makes one."""

    def __init__(self, limits: Limits, rank: int, world: int, output_dir: Path, generation: int) -> None:
        self.limits, self.rank, self.world = limits, rank, world
        self.output_dir = Path(output_dir)
        self.host, self.pid = host_name(), os.getpid()
        self.prefix = f"{PREFIX}/{generation}"
        self.clock = collective_clock()
        # Written by the training thread only (a mark is two attribute writes, read by the watchdog thread).
        self.seq = 0
        self.phase_name = "set-up"
        self.step = 0  # the last finished step
        self.long_phases: list[str] = []  # the long phases entered (nested: a save that commits the previous one)
        self.first_step_done = False
        self.recent: collections.deque = collections.deque(maxlen=RECENT_STEPS)
        self._step_started = time.monotonic()
        self.fault = PhaseFault(rank, self.output_dir)
        # The watchdog thread's own state.
        self.beat = 0
        self.busy_s = 0.0  # wall time of its ticks (an upper bound of its CPU time; megalite bench watchdog)
        self.closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.verdict: dict | None = None
        host, port = store_address()
        self.store_at = f"{host}:{port}"
        self.channel = StoreChannel(lambda: connect_store(host, port))
        self.hang_dir = self._agree_hang_dir()
        self._seen: dict[int, dict] = {}  # monitor: rank -> {"progress", "beat", "progress_t", "beat_t", "record"}
        self._present: set[int] = set()
        self._own = {"progress": -1, "t": time.monotonic()}
        self._rank0: dict = {"beat": None, "t": time.monotonic()}
        self._publish()

    # ------------------------------------------------------------------ marks (training thread)
    def mark(self, phase: str) -> None:
        self.seq += 1
        self.phase_name = phase
        if self.fault.active:
            self.fault.fire(phase, self.step + 1)

    def finished_step(self, step: int) -> None:
        now = time.monotonic()
        self.recent.append(now - self._step_started)
        self._step_started = now
        self.step = step
        self.first_step_done = True
        self.seq += 1
        self.phase_name = "end"

    def enter_long(self, phase: str) -> None:
        self.long_phases.append(phase)
        self.mark(phase)

    def exit_long(self, phase: str) -> None:
        self.long_phases.pop()
        self.seq += 1
        self.phase_name = self.long_phases[-1] if self.long_phases else f"after {phase}"
        self._step_started = time.monotonic()  # a step's time does not include a checkpoint or an evaluation

    def timeout_s(self) -> float:
        """This rank's hang timeout now: long in set-up, the first step, checkpoints and evaluation."""
        if self.long_phases or not self.first_step_done:
            return self.limits.long_s
        if self.limits.step_s is not None:
            return self.limits.step_s
        slowest = max(self.recent) if self.recent else 0.0
        return min(self.limits.long_s, max(HANG_FLOOR_S, STEP_FACTOR * slowest))

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="megalite-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and tell the others this rank is done (a finished rank is not a hung one)."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.limits.store_wait_s)
        self._publish()

    def _run(self) -> None:
        while not self._stop.wait(self.limits.poll_s):
            start = time.perf_counter()
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - the watchdog must outlive its own bugs; say so once a tick
                print(f"megalite: watchdog (rank {self.rank}): {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.busy_s += time.perf_counter() - start

    def progress(self) -> int:
        """Marks passed plus collectives finished: it stands still only when the training thread does."""
        return self.seq + self.clock.calls

    def where(self) -> str:
        """Where the training thread is, in words: "forward of step 3", "checkpoint after step 4", "set-up (...)"."""
        if self.long_phases:
            return f"{self.phase_name} after step {self.step}" if self.first_step_done else f"{self.phase_name} (set-up)"
        if not self.first_step_done:
            return f"set-up ({self.phase_name})" if self.phase_name != "set-up" else "set-up"
        if self.phase_name == "end" or self.phase_name.startswith("after "):
            return f"{self.phase_name} of step {self.step}"
        return f"{self.phase_name} of step {self.step + 1}"

    def _record(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "beat": self.beat,
                "progress": self.progress(), "step": self.step, "phase": self.phase_name, "where": self.where(),
                "timeout_s": self.timeout_s(),
                "waiting_in": self.clock.current, "closed": self.closed, "time": time.time()}

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/rank/{rank}"

    def _publish(self) -> tuple[bool, Any]:
        text = json.dumps(self._record())
        return self.channel.call(lambda s: s.set(self._key(self.rank), text), self.limits.store_wait_s)

    def _agree_hang_dir(self) -> Path:
        """Where every rank writes its diagnostics: MEGALITE_HANG_DIR, else <output_dir>/hangs/<rank 0's start time>."""
        if os.environ.get(HANG_DIR_ENV):
            return Path(os.environ[HANG_DIR_ENV])
        key = f"{self.prefix}/session"
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if self.rank == 0:
            ok, _ = self.channel.call(lambda s: s.set(key, stamp), 60.0)
        else:
            ok, value = self.channel.call(lambda s: s.get(key), 60.0)
            stamp = value.decode() if ok else stamp
        if not ok:
            raise RuntimeError(f"the watchdog cannot reach the rendezvous store at {self.store_at}")
        return self.output_dir / "hangs" / stamp

    def _tick(self) -> None:
        self.beat += 1
        now = time.monotonic()
        progress = self.progress()
        if progress != self._own["progress"]:
            self._own = {"progress": progress, "t": now}
        published, why = self._publish()
        verdict = self._read_verdict() if published else None
        if verdict is None:
            verdict = self._monitor(now) if self.rank == 0 else self._follow(now, published, why)
        if verdict is not None and not self._stop.is_set():
            self._act(verdict)

    def _read_verdict(self) -> dict | None:
        key = f"{self.prefix}/verdict"
        ok, there = self.channel.call(lambda s: s.check([key]), self.limits.store_wait_s)
        if not (ok and there):
            return None
        ok, value = self.channel.call(lambda s: s.get(key), self.limits.store_wait_s)
        return json.loads(value) if ok else None

    def _monitor(self, now: float) -> dict | None:
        """Rank 0: read every record; a verdict when no rank progressed for the longest timeout any rank asks for."""
        for key, r in [(self._key(r), r) for r in range(self.world) if r not in self._present]:
            ok, there = self.channel.call(lambda s, k=key: s.check([k]), self.limits.store_wait_s)
            if ok and there:
                self._present.add(r)
        ranks = sorted(self._present)
        ok, values = self.channel.call(lambda s: s.multi_get([self._key(r) for r in ranks]), self.limits.store_wait_s)
        if not ok:
            return None
        for r, value in zip(ranks, values):
            rec = json.loads(value)
            seen = self._seen.get(r)
            if seen is None:
                seen = self._seen[r] = {"progress": rec["progress"], "beat": rec["beat"], "progress_t": now,
                                        "beat_t": now}
            if rec["progress"] != seen["progress"]:
                seen["progress"], seen["progress_t"] = rec["progress"], now
            if rec["beat"] != seen["beat"]:
                seen["beat"], seen["beat_t"] = rec["beat"], now
            seen["record"] = rec
        if not self._seen:
            return None
        last = max(s["progress_t"] for s in self._seen.values())
        open_ranks = [r for r in range(self.world) if not self._seen.get(r, {}).get("record", {}).get("closed")]
        if not open_ranks:
            return None
        timeout = max([self._seen[r]["record"]["timeout_s"] for r in open_ranks if r in self._seen]
                      + [self.timeout_s()])
        stalled = now - last
        if stalled <= timeout:
            return None
        return self._declare(self._suspects(now, open_ranks), stalled, timeout, "")

    def _suspects(self, now: float, open_ranks: list[int]) -> list[dict]:
        """The ranks the others wait for: silent ones, else those outside a collective, else the lowest step."""
        def describe(r: int, why: str, silent: bool = False) -> dict:
            rec = self._seen.get(r, {}).get("record") or {"host": "?", "pid": None, "where": "never started"}
            return {"rank": r, "host": rec["host"], "pid": rec["pid"], "where": rec["where"], "why": why,
                    "silent": silent}

        silent = [r for r in open_ranks if r not in self._seen or now - self._seen[r]["beat_t"] > self.limits.stale_s]
        if silent:
            return [describe(r, "its watchdog has not answered for "
                                f"{now - self._seen[r]['beat_t']:.1f} s: the process is stopped, dead or starved"
                             if r in self._seen else "its watchdog never started", silent=True) for r in silent]
        outside = [r for r in open_ranks if not self._seen[r]["record"]["waiting_in"]]
        if outside and len(outside) < len(open_ranks):
            return [describe(r, "alive but not in a collective, while the others wait in one") for r in outside]
        lowest = min(self._seen[r]["record"]["step"] for r in open_ranks)
        return [describe(r, "alive, at the lowest step") for r in open_ranks
                if self._seen[r]["record"]["step"] == lowest]

    def _follow(self, now: float, published: bool, why: str) -> dict | None:
        """Not rank 0: follow rank 0's verdict; name rank 0 when it stopped answering and this rank stands still."""
        if published:
            ok, value = self.channel.call(lambda s: s.get(self._key(0)), self.limits.store_wait_s)
            if ok:
                record = json.loads(value)
                if record["beat"] != self._rank0["beat"]:
                    self._rank0 = {"beat": record["beat"], "t": now, "record": record}

        rank0 = self._rank0.get("record") or {}
        timeout = max(self.timeout_s(), rank0.get("timeout_s", 0.0))
        own_stalled = now - self._own["t"]
        if own_stalled <= timeout:
            return None
        stuck = self.channel.stuck_since
        if self.channel.dead or (stuck is not None and now - stuck > timeout / 2):
            cause = (f"the rendezvous store it hosts ({self.store_at}) stopped answering ({why}): its process is "
                     "stopped, dead or starved")
        elif now - self._rank0["t"] > timeout:
            cause = (f"its watchdog has not answered for {now - self._rank0['t']:.1f} s: the process is stopped, dead "
                     "or starved")
        else:
            return None  # rank 0's monitor is alive and decides
        suspect = {"rank": 0, "host": rank0.get("host", self.store_at.rsplit(":", 1)[0]), "pid": rank0.get("pid"),
                   "where": rank0.get("where", "?"), "why": cause, "silent": True}
        return self._declare([suspect], own_stalled, timeout, f" (decided by rank {self.rank}: rank 0 is not answering)")

    def _declare(self, suspects: list[dict], stalled: float, timeout: float, note: str) -> dict:
        """Publish the verdict (the first one written wins: every rank then acts on the same one)."""
        live = [r for r in range(self.world) if r not in {s["rank"] for s in suspects if s["silent"]}]
        verdict = {"declared_by": self.rank, "time": time.time(), "stalled_s": round(stalled, 3),
                   "timeout_s": timeout, "suspects": suspects, "live_ranks": live, "dir": str(self.hang_dir),
                   "note": note}
        if not self.channel.dead:
            text = json.dumps(verdict)
            ok, value = self.channel.call(lambda s: s.compare_set(f"{self.prefix}/verdict", "", text),
                                          self.limits.store_wait_s)
            if ok:
                verdict = json.loads(value)
        return verdict

    # ------------------------------------------------------------------ after a verdict
    def _act(self, verdict: dict) -> None:
        """Write this rank's diagnostics, say the one line, and leave with EXIT_HUNG."""
        self.verdict = verdict
        folder = Path(verdict.get("dir") or self.hang_dir)
        try:
            self._write_diagnostics(folder, verdict)
            where = str(folder)
        except OSError as e:
            where = f"(could not write to {folder}: {e})"
        names = "; ".join(f"rank {s['rank']} on {s['host']}" + (f" (pid {s['pid']})" if s.get("pid") else "")
                          + f", last seen in {s['where']}: {s['why']}" for s in verdict["suspects"])
        print(f"megalite: HANG (rank {self.rank}, {self.host}): no rank made progress for {verdict['stalled_s']:.1f} s "
              f"(limit {verdict['timeout_s']:.1f} s){verdict.get('note', '')}; suspect: {names}; stacks and "
              f"flight-recorder traces: {where}; exiting {EXIT_HUNG}", file=sys.stderr, flush=True)
        if self.rank == 0:
            self._log_metrics(verdict, folder)
        # Leave together: a rank that left early would end the others' collectives with an error (exit 1) before
        # their watchdogs read the verdict, and rank 0 hosts the store the verdict is read from.
        self.channel.call(lambda s: s.add(f"{self.prefix}/acks", 1), self.limits.store_wait_s)
        self._wait_for_acks(len(verdict.get("live_ranks", [])))
        _exit(EXIT_HUNG)

    def _write_diagnostics(self, folder: Path, verdict: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        header = {"rank": self.rank, "host": self.host, "pid": self.pid, "where": self.where(),
                  "waiting_in": self.clock.current, "world_size": self.world,
                  "seconds_since_own_progress": round(time.monotonic() - self._own["t"], 3)}
        with open(folder / f"rank{self.rank}-stacks.txt", "w") as f:
            f.write(json.dumps(header) + "\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        trace = flight_recorder_trace()
        if trace is not None:
            (folder / f"fr_trace_rank_{self.rank}").write_bytes(trace)
        _atomic_write(folder / f"rank{self.rank}.json", json.dumps({"verdict": verdict, "this_rank": header},
                                                                  indent=1))
        hosts = sorted({s["host"] for s in verdict["suspects"] if s.get("host") and s["host"] != "?"})
        _atomic_write(folder / "suspect-hosts", "".join(f"{h}\n" for h in hosts))

    def _log_metrics(self, verdict: dict, folder: Path) -> None:
        """One "hang" record in metrics.jsonl (its own append: the loop's sink may be mid-call)."""
        metrics = self.output_dir / "metrics.jsonl"
        if not metrics.parent.is_dir():
            return
        record = {"kind": "hang", "step": self.step, "suspects": verdict["suspects"],
                  "stalled_s": verdict["stalled_s"], "timeout_s": verdict["timeout_s"], "dir": str(folder),
                  "exit_code": EXIT_HUNG}
        with contextlib.suppress(OSError), open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _wait_for_acks(self, expected: int) -> None:
        """Stay until every live rank has read the verdict (bounded: a rank may never read it)."""
        deadline = time.monotonic() + max(5.0, 4 * self.limits.poll_s + 2 * self.limits.store_wait_s)
        while time.monotonic() < deadline:
            ok, acks = self.channel.call(lambda s: s.add(f"{self.prefix}/acks", 0), self.limits.store_wait_s)
            if not ok or acks >= expected:
                return
            time.sleep(min(0.1, self.limits.poll_s))


def flight_recorder_trace() -> bytes | None:
    """torch's flight recorder of this process's collectives (pickled; empty without TORCH_FR_BUFFER_SIZE)."""
    try:
        import torch

        c10d = torch._C._distributed_c10d
        dump = getattr(c10d, "_dump_fr_trace", None) or getattr(c10d, "_dump_nccl_trace", None)
        return dump() if dump is not None else None
    except Exception:  # noqa: BLE001 - diagnostics are best effort: the stacks still get written
        return None


def summarize(folder: str | os.PathLike) -> str:
    """A hang folder in words: the verdict, then each rank's place, the collective it waits in and, from its
    flight-recorder trace, each process group's collective that did not complete (`python -m
    megalite.engine.watchdog DIR`). torch's own analyser (`torchfrtrace DIR`) reads NCCL traces; the gloo traces of
    torch 2.13 carry no process-group table, which it needs."""
    import pickle

    folder = Path(folder)
    lines = [f"hang folder {folder}"]
    verdicts = sorted(folder.glob("rank*.json"))
    verdict = json.loads(verdicts[0].read_text())["verdict"] if verdicts else None
    if verdict:
        lines.append(f"verdict (rank {verdict['declared_by']}): no progress for {verdict['stalled_s']:.1f} s (limit "
                     f"{verdict['timeout_s']:.1f} s)")
        lines += [f"  suspect rank {v['rank']} on {v['host']}, last seen in {v['where']}: {v['why']}"
                  for v in verdict["suspects"]]
    heads = [json.loads(p.read_text().splitlines()[0]) for p in folder.glob("rank*-stacks.txt")]
    world = max([h["world_size"] for h in heads], default=0)
    for rank in range(world):
        stacks = folder / f"rank{rank}-stacks.txt"
        if not stacks.exists():
            lines.append(f"rank {rank}: no diagnostics (a suspect that could not write, or a rank that left first)")
            continue
        head = json.loads(stacks.read_text().splitlines()[0])
        text = f"rank {rank} ({head['host']}, pid {head['pid']}): {head['where']}"
        text += f", waiting in {head['waiting_in']}" if head.get("waiting_in") else ", not in a collective"
        lines.append(text)
        trace = folder / f"fr_trace_rank_{rank}"
        if not trace.exists():
            continue
        dump = pickle.loads(trace.read_bytes())
        for pg, status in sorted(dump.get("pg_status", {}).items()):
            pending, done = status.get("last_enqueued_collective", -1), status.get("last_completed_collective", -1)
            if pending <= done:
                continue
            entry = next((e for e in dump["entries"] if str(e["pg_id"]) == pg and e["collective_seq_id"] == pending),
                         None)
            what = f"{entry['profiling_name']} {entry['input_sizes']}" if entry else "(no longer in the ring)"
            lines.append(f"  process group {pg}: collective {pending} {what} not completed (done up to {done})")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _exit(code: int) -> None:
    """Leave at once from the watchdog thread: the training thread is stuck in a collective and cannot be joined."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------- the loop's interface
_active: Watchdog | None = None
_generation = 0


def start(cfg: Any, rank: int, world: int) -> Watchdog | None:
    """Start this rank's watchdog (after the process group exists; every rank calls it). None when it is off
    (train.watchdog false, or a single rank). A watchdog still running from an earlier run in this process stops."""
    global _active, _generation
    stop()
    _generation += 1  # every rank starts its watchdogs in the same order: the same store keys
    if not cfg.train.watchdog or world <= 1:
        return None
    dog = Watchdog(Limits.of(cfg.train), rank, world, Path(cfg.train.output_dir), _generation)
    _active = dog
    distributed.set_phase_listener(phase)
    dog.start()
    return dog


def stop() -> None:
    """Stop the running watchdog and straggler report, if any (the end of a run, however it ends)."""
    global _active
    dog, _active = _active, None
    stragglers.stop()
    if dog is not None:
        distributed.set_phase_listener(None)
        dog.close()
    release_clock()


def phase(name: str) -> None:
    """Mark the start of a phase of the loop (data, forward, backward, optimizer step, ...)."""
    dog = _active
    if dog is not None:
        dog.mark(name)


def step_done(step: int) -> None:
    """Mark the end of optimizer step `step` (also measures the step time the derived timeout uses)."""
    dog = _active
    if dog is not None:
        dog.finished_step(step)


class during(contextlib.ContextDecorator):  # noqa: N801 - used as a decorator, like contextlib's
    """A long phase (checkpoint, evaluation, resume): the long timeout applies, and its time is neither compute
    nor waiting in the straggler report. A decorator or a context manager."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._entered: list[tuple[Watchdog | None, Any]] = []

    def __enter__(self) -> during:
        dog = _active
        excluded = collective_clock().excluded() if dog is not None else contextlib.nullcontext()
        excluded.__enter__()
        self._entered.append((dog, excluded))
        if dog is not None:
            dog.enter_long(self.name)
        return self

    def __exit__(self, *exc: object) -> bool:
        dog, excluded = self._entered.pop()
        if dog is not None:
            dog.exit_long(self.name)
        excluded.__exit__(None, None, None)
        return False


@contextlib.contextmanager
def watching(cfg: Any, rank: int, world: int) -> Iterator[Watchdog | None]:
    """`start` and `stop` around a block."""
    dog = start(cfg, rank, world)
    try:
        yield dog
    finally:
        stop()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m megalite.engine.watchdog HANG_FOLDER (see README, When a job hangs)")
    print(summarize(sys.argv[1]))
