"""Process-group helpers every layer uses: who this rank is, object collectives, and agreement.

The rule that keeps a failing job from hanging lives here: a phase that can fail on some ranks only
(reading data, building a model, writing a checkpoint) runs through `agree`, which shares every rank's
outcome, so either every rank continues or every rank raises naming the ranks that failed. Without a
process group (one process) every helper is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from megalite.errors import MegaliteError

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is global rank 0, the rank that writes shared files and prints results."""
    return rank() == 0


def broadcast_object(obj: T, src: int = 0, group: Any = None) -> T:
    """Rank `src`'s `obj` on every rank (of `group`, default all; `src` is a global rank)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj: T, group: Any = None) -> list[T]:
    """Every rank's `obj`, in rank order (of `group`, default all)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def scatter_objects(objs: Sequence[Any] | None, src: int = 0) -> Any:
    """Rank `src`'s objs[r] on rank r (other ranks pass None)."""
    if not is_distributed():
        return objs[0] if objs is not None else None
    out: list[Any] = [None]
    dist.scatter_object_list(out, list(objs) if rank() == src else None, src=src)
    return out[0]


def any_rank(flags: Sequence[bool], device: torch.device | None = None) -> list[bool]:
    """For each flag, whether it is set on any rank (one small all-reduce)."""
    if not is_distributed():
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


_phase_listener: Callable[[str], None] | None = None


def set_phase_listener(listener: Callable[[str], None] | None) -> None:
    """Call `listener(phase)` as each `agree` phase starts (the watchdog's progress marks of set-up); None: none."""
    global _phase_listener
    _phase_listener = listener


class RankFailed(MegaliteError):
    """A phase every rank had to finish failed on some ranks."""


def agree(phase: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on every rank, then agree: if any rank raised, every rank raises, naming the failed ranks.

    The same MegaliteError on every rank that failed is re-raised as itself (its type and message); other
    cases become RankFailed listing each distinct error with its ranks.
    """
    mine: Exception | None = None
    result = None
    if _phase_listener is not None:
        _phase_listener(phase)
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - shared with every rank below, then raised everywhere
        mine = e
    if not is_distributed():
        if mine is not None:
            raise mine
        return result  # type: ignore[return-value]
    messages = all_gather_objects(None if mine is None else f"{type(mine).__name__}: {mine}")
    failed: dict[str, list[int]] = {}
    for r, message in enumerate(messages):
        if message:
            failed.setdefault(message, []).append(r)
    if not failed:
        return result  # type: ignore[return-value]
    if mine is not None and isinstance(mine, MegaliteError) and len(failed) == 1:
        raise mine
    text = "; ".join(f"ranks {ranks}: {message}" for message, ranks in failed.items())
    raise RankFailed(f"{phase} failed on other ranks: {text}") from mine

