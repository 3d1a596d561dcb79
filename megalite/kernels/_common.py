"""Shared helpers for the Triton kernels: launches and their counters, output allocation, interpreter
detection, tile choices shared by the norm kernels.

This module never imports triton, so `megalite.kernels` imports on machines without it.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Incremented by every host launcher, so tests can prove the Triton code (not a fallback) ran.
CALLS: Counter[str] = Counter()

_poison = False
_recorded: list[Launch] | None = None


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel (a JITFunction or an Autotuner) and its arguments."""

    kernel: Any
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)


def launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`; inside `recording_launches()` the launch is only recorded."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within this block launchers record their launches instead of running them (no GPU needed): the
    resource report compiles exactly what the launchers would launch."""
    global _recorded
    old, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = old


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def count(name: str) -> None:
    """Record one launch of the kernel family `name`."""
    CALLS[name] += 1


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer; NaN-filled under `poison_outputs()` so tests catch unwritten elements."""
    if _poison:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within this block every kernel output (and partial-sum buffer) starts as NaN."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def rows(t: torch.Tensor) -> torch.Tensor:
    """A (M, N) view of `t` over its last dimension with unit column stride (copies only when needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small constant for the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def check_document_ids(q: torch.Tensor, k: torch.Tensor, document_ids: torch.Tensor) -> None:
    """document_ids must be (batch, seq) with as many queries as keys (both backends)."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: document_ids need as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    if tuple(document_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"attention: document_ids must be (batch, seq) = {(q.shape[0], q.shape[2])}, got {tuple(document_ids.shape)}"
        )


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) int32 tensors (B, T): position t lies in the document [start[b, t], end[b, t]).

    A document is a maximal run of equal ids along the sequence (packed samples: an id per document,
    or any id that changes where a document starts); positions attend only inside their own run.
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (batch, seq), got shape {tuple(document_ids.shape)}")
    b, t = document_ids.shape
    idx = torch.arange(t, device=document_ids.device, dtype=torch.int32).expand(b, t)
    first = torch.ones((b, t), dtype=torch.bool, device=document_ids.device)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, idx, 0).cummax(dim=1).values
    end = torch.where(last, idx + 1, t).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()
