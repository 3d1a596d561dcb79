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
_recording_arch = 0


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
def recording_launches(arch: int = 90) -> Iterator[list[Launch]]:
    """Within this block launchers record their launches instead of running them (no GPU needed), choosing
    tiles for compute capability `arch`: the resource report compiles exactly what they would launch."""
    global _recorded, _recording_arch
    old = _recorded, _recording_arch
    _recorded, _recording_arch = [], arch
    try:
        yield _recorded
    finally:
        _recorded, _recording_arch = old


_capabilities: dict[int, int] = {}


def capability(device: torch.device) -> int:
    """Compute capability as one number (80, 86, 90, ...): the device's, or the one being recorded for;
    0 for a CPU tensor under the interpreter."""
    if _recorded is not None:
        return _recording_arch
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _capabilities:  # asked at every launch; the answer never changes
            major, minor = torch.cuda.get_device_capability(index)
            _capabilities[index] = 10 * major + minor
        return _capabilities[index]
    return 0


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


MAX_NORM_WIDTH = 65536  # LayerNorm/RMSNorm: one row must fit a program's registers
# Rows wider than this are split in two halves by the norm backwards, one program per half: a program keeps
# fp32 weight-gradient sums for its columns, and sums for 16384 columns plus the row do not fit its registers.
NORM_SPLIT_WIDTH = 8192


@dataclass(frozen=True)
class NormTiles:
    """How a norm kernel covers rows: BLOCK_M rows of BLOCK_N columns per step, or (split, backward) two
    programs per row, one for each half of BLOCK_N columns."""

    block_m: int
    block_n: int
    num_warps: int
    split: bool = False


def norm_tiles(n: int, interpret: bool, backward: bool = False) -> NormTiles:
    """The tiles for rows of width n (forward, or backward); `interpret`: Triton's CPU interpreter, which
    wants few, large programs."""
    if n > MAX_NORM_WIDTH:
        raise ValueError(f"norm width {n} exceeds the fused kernel's limit of {MAX_NORM_WIDTH}")
    block_n = next_pow2(n)
    split = backward and block_n > NORM_SPLIT_WIDTH
    if split:
        block_n //= 2
    # Several rows per program keep narrow rows efficient.
    block_m = 1 if split else max(1, min(64 if interpret else 16, (65536 if interpret else 4096) // block_n))
    # 8 elements of a tile per thread (16 in the backward, whose 16-warp tiles of 4096 elements put a value in
    # local memory on sm_80 with Triton 3.9), at most 16 warps.
    per_thread = 16 if backward and not split else 8
    return NormTiles(block_m, block_n, min(max(block_m * block_n // (32 * per_thread), 1), 16), split)


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
