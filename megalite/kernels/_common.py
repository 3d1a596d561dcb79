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


def recording() -> list[Launch] | None:
    """The launches being recorded (inside `recording_launches()`), else None."""
    return _recorded


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
class NormConfig:
    """How a norm kernel covers its rows: steps of `rows` whole rows of `block_n` columns (a power of two >= the
    width), `num_warps` warps; `per_sm` programs per streaming multiprocessor striding over the steps (a persistent
    grid; 0: one program per step, forward only); `prefetch`: each program loads its next step's rows before this
    step's arithmetic (a second set of registers keeps loads in flight); `split` (backward, rows wider than
    NORM_SPLIT_WIDTH): two programs per row, one per half of `2 * block_n` columns."""

    rows: int
    block_n: int
    num_warps: int
    per_sm: int = 2
    prefetch: bool = False
    split: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The kernels' constexprs (PER_SM is read by the grid function only)."""
        return {"ROWS": self.rows, "BLOCK_N": self.block_n, "PER_SM": self.per_sm, "PREFETCH": self.prefetch,
                "SPLIT": self.split}


def norm_configs(n: int, interpret: bool, backward: bool = False) -> list[NormConfig]:
    """The candidates autotuning measures for rows of width n, forward or backward; the first is the default
    (`MEGALITE_AUTOTUNE=0`). `interpret`: Triton's CPU interpreter, which wants few, large programs: one config,
    persistent and prefetching, so the CPU tests run the loop over several steps and the prefetch."""
    if n > MAX_NORM_WIDTH:
        raise ValueError(f"norm width {n} exceeds the fused kernel's limit of {MAX_NORM_WIDTH}")
    block_n = next_pow2(n)
    split = backward and block_n > NORM_SPLIT_WIDTH
    if split:
        block_n //= 2
    if interpret:
        return [NormConfig(1 if split else max(1, min(64, 65536 // block_n)), block_n, 4, 2, True, split)]
    # Rows per step: at least 4096 elements in flight per program (a step of 8 KB in bf16 per input).
    rows = 1 if split else max(1, min(16, 4096 // block_n))
    elements = rows * block_n
    # The next step's rows take a second set of registers: prefetch only up to 8192 elements a step, unsplit (the
    # 16384-wide LayerNorm forward and the split LayerNorm backward spill with it).
    prefetch = elements <= 8192 and not split

    def warps(per_thread: int) -> int:
        return min(max(elements // (32 * per_thread), 1), 16)

    if not backward:  # today's forward first (a program per step), then persistent ones
        configs = [NormConfig(rows, block_n, warps(8), 0), NormConfig(rows, block_n, warps(8), 2, prefetch),
                   NormConfig(rows, block_n, warps(16), 2, prefetch), NormConfig(rows, block_n, warps(8), 1, prefetch)]
    else:
        # 16 elements of a tile per thread (8 when split, whose programs also read the other half), at most 16 warps;
        # a persistent grid, prefetching or not, one or two programs per SM.
        per_thread = 8 if split else 16
        configs = [NormConfig(rows, block_n, warps(per_thread), 2, False, split),
                   NormConfig(rows, block_n, warps(per_thread), 2, prefetch, split),
                   NormConfig(rows, block_n, warps(per_thread), 1, prefetch, split),
                   NormConfig(rows, block_n, warps(per_thread // 2), 1, prefetch, split)]
    return list(dict.fromkeys(configs))  # without repeats (wide rows hit the 16-warp cap)


def norm_programs(m: int, rows: int, per_sm: int, sms: int) -> int:
    """Programs a norm launch of m rows runs: `per_sm` per SM (at most one per step of `rows`), or one per step."""
    steps = max(1, -(-m // rows))
    return steps if per_sm == 0 else max(1, min(steps, per_sm * sms))


def norm_partials(m: int, n: int, device: torch.device, configs: list[NormConfig]) -> torch.Tensor:
    """The backward's fp32 partial weight-gradient sums, a row per program of the largest candidate grid, zeroed:
    a config with fewer programs leaves the other rows at 0 (never poisoned: they are summed)."""
    rows = max(norm_programs(m, c.rows, c.per_sm, num_sms(device)) for c in configs)
    return torch.zeros((rows, n), dtype=torch.float32, device=device)


def norm_grid(m: int, device: torch.device, split: bool = False):  # noqa: ANN201 - Triton's grid callable
    """The grid of a norm launch of m rows for the config autotuning runs: (programs,) or (programs, 2) when split."""
    sms = num_sms(device)
    return lambda meta: (norm_programs(m, meta["ROWS"], meta["PER_SM"], sms), 2 if split else 1)


def norm_autotuner(cache: dict, fn: Any, n: int, interpret: bool, backward: bool) -> Any:
    """The autotuned launcher (a triton Autotuner) of norm kernel `fn` over width n's candidates, built once per
    power-of-two bucket and stored in `cache`; `MEGALITE_AUTOTUNE=0` keeps the first candidate. The backward's
    partial sums are zeroed around benchmarking (a candidate with fewer programs must not leave another's rows)."""
    import triton  # only the kernel modules call this; importing megalite.kernels never imports triton

    configs = norm_configs(n, interpret, backward)
    key = (fn.__name__, configs[0].block_n, configs[0].split)
    if key not in cache:
        if os.environ.get("MEGALITE_AUTOTUNE", "1") == "0":
            configs = configs[:1]
        triton_configs = [triton.Config(c.kwargs(), num_warps=c.num_warps) for c in configs]
        reset = ["DW_PART", "DB_PART"] if backward else []
        reset = [name for name in reset if name in fn.arg_names]
        cache[key] = triton.autotune(configs=triton_configs, key=["N"], reset_to_zero=reset)(fn)
    return cache[key]


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
