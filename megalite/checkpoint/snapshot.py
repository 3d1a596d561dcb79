"""Host-memory snapshots of checkpoint state, for asynchronous saves.

A snapshot must not share memory with anything the next optimizer step changes: every tensor is copied (CUDA
tensors into pinned host memory, so the copy is one DMA and a later `torch.save` reads host memory). The copy is
compact per tensor, like DeepSpeed's own `clone_tensors_for_torch_save`: a view into a flat buffer becomes a tensor
of its own elements, so the files hold the same values in no more bytes. The same tensor object reached twice is
copied once, so aliases inside one state dict stay aliases.

The host buffers are kept from one snapshot to the next (`SnapshotBuffers`): a rank's checkpoint has the same
tensors at every save, and copying into memory already mapped (and pinned) costs a fraction of allocating it
again, whose page faults (or cudaHostAlloc) dominated the stall. The price is that one copy of the rank's
checkpoint state stays in host memory between saves, as in torch.distributed.checkpoint's cached staging.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

_IMMUTABLE = (int, float, bool, str, bytes, type(None), complex, torch.dtype, torch.device, torch.Size)


def _unique_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors inside nested dicts, lists and tuples, each tensor object once."""
    seen: dict[int, torch.Tensor] = {}

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            seen.setdefault(id(o), o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return list(seen.values())


def snapshot_bytes(obj: Any) -> int:
    """The tensor bytes a snapshot of `obj` holds (each tensor object once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(obj))


class SnapshotBuffers:
    """Host tensors of earlier snapshots, free to be copied into again, by shape, dtype and pinning.

    Not thread-safe: the training thread takes (in a snapshot) and the background writer gives back (after its
    write), and a new snapshot starts only after the previous write has finished."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype, pin))
        if free:
            return free.pop()
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)

    def give_back(self, snapshot: Any) -> None:
        """Return every tensor of a snapshot that nothing reads any more (its files are written)."""
        for t in _unique_tensors(snapshot):
            if t.is_contiguous() and t.storage_offset() == 0:
                self._free.setdefault((tuple(t.shape), t.dtype, t.is_pinned()), []).append(t)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._free.values() for t in ts)


def host_snapshot(obj: Any, pin: bool | None = None, buffers: SnapshotBuffers | None = None) -> Any:
    """A deep copy of `obj` whose tensors live in (pinned, for CUDA sources) host memory and share nothing with
    the originals. Containers are rebuilt with their types; other leaves are deep-copied unless immutable.
    Tensors are copied into `buffers`' free tensors where the shape and dtype match."""
    memo: dict[int, Any] = {}
    pin = torch.cuda.is_available() if pin is None else pin
    buffers = buffers if buffers is not None else SnapshotBuffers()

    def copy_tensor(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        on_host = t.device.type == "cpu"
        out = buffers.take(t.shape, t.dtype, pin and not on_host)
        out.copy_(t, non_blocking=pin and not on_host)
        return out

    def walk(o: Any) -> Any:
        if isinstance(o, _IMMUTABLE):
            return o
        key = id(o)
        if key in memo:
            return memo[key]
        if isinstance(o, torch.Tensor):
            out = copy_tensor(o)
        elif isinstance(o, dict):
            out = type(o)() if type(o) is not dict else {}
            for k, v in o.items():
                out[k] = walk(v)
        elif isinstance(o, list):
            out = [walk(v) for v in o]
        elif isinstance(o, tuple) and not hasattr(o, "_fields"):
            out = tuple(walk(v) for v in o)
        else:  # named tuples, DeepSpeed's small config objects, enums: no tensors inside to alias training state
            out = copy.deepcopy(o)
        memo[key] = out
        return out

    result = walk(obj)
    if pin and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads them
    return result
