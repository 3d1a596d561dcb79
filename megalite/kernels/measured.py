"""Measured tables: which implementation of an op is fastest on a device, per shape class (issue 24).

`megalite bench kernels --table DIR` writes one JSON table per device (`tables/<device>.json`, from that run's
rows, merged with the table already there); the tables committed in `megalite/kernels/tables/` are what the `auto`
backend follows (`megalite.kernels._resolve`, the one place where the backend is chosen). A table holds, per op,
dtype, mode (fwd, or fwd+bwd when gradients are wanted) and shape class (attention: head dim, causal or not,
packed documents or not; a sequence length; norms: a row width), the implementation that measured fastest among
those whose output agreed with megalite's (the benchmark checks), with every measured time.

A call is covered when its op, dtype, mode and class have entries and its length (width) lies within the measured
ones: it gets the winner of the nearest measured length (on a log scale). Anything else is not covered and the
backend behaves as without a table. This module imports neither torch nor triton.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TABLES = Path(__file__).resolve().parent / "tables"
OURS = "megalite"
# What `auto` can run in place of megalite's kernels, per benchmark op (flex-attention needs torch.compile and a
# block mask per batch, so it is measured but never chosen).
SELECTABLE = {
    "attention": (OURS, "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"),
    "attention_docs": (OURS, "sdpa-dense-mask"),
    "layer_norm": (OURS, "torch", "apex"),
    "rms_norm": (OURS, "torch", "apex"),
}
CLASS_KEYS = {"attention": ("head_dim", "causal"), "attention_docs": ("head_dim", "causal"), "layer_norm": (),
              "rms_norm": ()}
MODES = ("fwd", "fwd+bwd")  # what a call asks for: no gradient, or the backward after the forward
SIZE_KEY = {"attention": "seq", "attention_docs": "seq", "layer_norm": "width", "rms_norm": "width"}


def device_slug(name: str) -> str:
    """A file name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Entry:
    """The winner of one measured shape: op, dtype, mode, class (head dim, causal) and size (seq or width)."""

    op: str
    dtype: str
    mode: str
    klass: tuple
    size: int
    winner: str
    times_ms: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    def label(self) -> str:
        names = dict(zip(CLASS_KEYS[self.op], self.klass))
        parts = [self.op, self.dtype]
        if "head_dim" in names:
            parts.append(f"d{names['head_dim']}" + (" causal" if names["causal"] else ""))
        return " ".join(parts + [self.mode])


@dataclass
class Table:
    """A device's measured winners and where they were measured (commit, versions, date)."""

    device: str
    measured: dict[str, Any]
    entries: list[Entry]

    def winner(self, op: str, dtype: str, mode: str, size: int, **klass: Any) -> str | None:
        """The implementation measured fastest for this call, or None where the table does not cover it."""
        key = tuple(klass.get(k) for k in CLASS_KEYS[op])
        same = [e for e in self.entries if e.op == op and e.dtype == dtype and e.mode == mode and e.klass == key]
        if not same or size <= 0:
            return None
        sizes = [e.size for e in same]
        if not min(sizes) <= size <= max(sizes):
            return None
        return min(same, key=lambda e: (abs(math.log2(e.size) - math.log2(size)), -e.size)).winner

    def describe(self) -> list[str]:
        """One line per class whose winners are not all megalite's (sizes grouped), then a count of the rest."""
        groups: dict[tuple, list[Entry]] = {}
        for e in sorted(self.entries, key=lambda e: (e.op, e.dtype, e.klass, e.mode, e.size)):
            groups.setdefault((e.op, e.dtype, e.klass, e.mode), []).append(e)
        lines, ours = [], 0
        for group in groups.values():
            others = [e for e in group if e.winner != OURS]
            ours += len(group) - len(others)
            if others:
                unit = SIZE_KEY[group[0].op]
                picks = ", ".join(f"{e.size}: {e.winner} ({_ratio(e)})" for e in others)
                lines.append(f"{group[0].label()}, {unit} {picks}")
        lines.append(f"{ours} other measured shapes: megalite")
        return lines


def _ratio(e: Entry) -> str:
    ours, best = e.times_ms.get(OURS), e.times_ms.get(e.winner)
    return f"{ours / best:.2f}x faster than megalite" if ours and best else "megalite not measured"


def load(device: str, directory: Path | None = None) -> Table | None:
    """The table for a device name (in `directory`, default TABLES), or None when there is none."""
    path = Path(directory or TABLES) / f"{device_slug(device)}.json"
    if not path.exists():
        return None
    return from_json(json.loads(path.read_text()))


def from_json(data: dict[str, Any]) -> Table:
    entries = [Entry(e["op"], e["dtype"], e["mode"], tuple(e["class"]), int(e["size"]), e["winner"],
                     dict(e.get("times_ms", {}))) for e in data["entries"]]
    return Table(data["device"], dict(data.get("measured", {})), entries)


def to_json(table: Table) -> dict[str, Any]:
    return {"device": table.device, "measured": table.measured, "entries": [
        {"op": e.op, "dtype": e.dtype, "mode": e.mode, "class": list(e.klass), "size": e.size, "winner": e.winner,
         "times_ms": e.times_ms} for e in table.entries]}


def build(rows: list[dict[str, Any]], meta: dict[str, Any]) -> Table:
    """The table of one benchmark run (`megalite.bench.kernels` rows): per op, shape and mode, the fastest selectable
    implementation among those not marked incorrect (`mismatch`) and not failed."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        op = r["op"]
        if op not in SELECTABLE or r.get("mode") not in MODES or not r.get("ms") or r.get("mismatch") is not None:
            continue
        if r["impl"] not in SELECTABLE[op]:
            continue
        shape = r["shape"]
        klass = tuple(shape[k] for k in CLASS_KEYS[op])
        groups.setdefault((op, r["mode"], klass, int(shape[SIZE_KEY[op]])), {})[r["impl"]] = float(r["ms"])
    entries = [Entry(op, meta["dtype"], mode, klass, size, min(times, key=times.get), times)
               for (op, mode, klass, size), times in sorted(groups.items()) if OURS in times]
    measured = {k: meta.get(k) for k in ("commit", "date", "torch", "triton", "cuda", "machine")}
    return Table(meta["device"], measured, entries)


def merge(old: Table | None, new: Table) -> Table:
    """`new`'s entries replace `old`'s for the same op, dtype, mode, class and size; the rest of `old` stays."""
    if old is None or old.device != new.device:
        return new
    fresh = {(e.op, e.dtype, e.mode, e.klass, e.size) for e in new.entries}
    kept = [e for e in old.entries if (e.op, e.dtype, e.mode, e.klass, e.size) not in fresh]
    measured = dict(new.measured)
    if kept:  # where the kept entries were measured (one level: an older "earlier" is dropped)
        measured["earlier"] = {k: v for k, v in old.measured.items() if k != "earlier"}
    return Table(new.device, measured, kept + new.entries)


def write(table: Table, directory: Path) -> Path:
    """Merge `table` into `directory/<device>.json` and write it; returns the path."""
    path = Path(directory) / f"{device_slug(table.device)}.json"
    old = from_json(json.loads(path.read_text())) if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(merge(old, table)), indent=1) + "\n")
    return path
