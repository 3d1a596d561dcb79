"""Host-memory snapshots of checkpoint state, for asynchronous saves.

A snapshot must not share memory with anything the next optimizer step changes: every tensor is copied (CUDA
tensors into pinned host memory, so the copy is one DMA and a later `torch.save` reads host memory). The copy is
compact per tensor, like DeepSpeed's own `clone_tensors_for_torch_save`: a view into a flat buffer becomes a tensor
of its own elements, so the files hold the same values in no more bytes. The same tensor object reached twice is
copied once, so aliases inside one state dict stay aliases.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

_IMMUTABLE = (int, float, bool, str, bytes, type(None), complex, torch.dtype, torch.device, torch.Size)


def snapshot_bytes(obj: Any) -> int:
    """The tensor bytes a snapshot of `obj` holds (each tensor object once)."""
    seen: set[int] = set()
    total = 0

    def walk(o: Any) -> None:
        nonlocal total
        if isinstance(o, torch.Tensor):
            if id(o) not in seen:
                seen.add(id(o))
                total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return total


def host_snapshot(obj: Any, pin: bool | None = None) -> Any:
    """A deep copy of `obj` whose tensors live in (pinned, for CUDA sources) host memory and share nothing with
    the originals. Containers are rebuilt with their types; other leaves are deep-copied unless immutable."""
    memo: dict[int, Any] = {}
    pin = torch.cuda.is_available() if pin is None else pin

    def copy_tensor(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type == "cpu":
            return t.clone(memory_format=torch.contiguous_format)
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        out.copy_(t, non_blocking=pin)
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
