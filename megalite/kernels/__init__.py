"""Public kernel functions and the one place where the backend is chosen.

The model calls only `attention`, `layer_norm`, `rms_norm` and `grouped_mm` from here. Backends:

- `auto`: Triton for CUDA tensors (when triton imports), torch for everything else; on a device with a measured
  table (`megalite/kernels/tables/<device>.json`, written by `megalite bench kernels --table`), the implementation
  that measured fastest for the call's op, dtype, mode and shape class where the table covers it (measured.py):
  megalite's kernel, a chosen SDPA backend (cuDNN, flash, memory-efficient) or torch's norms. The first call that
  consults a table says so on stderr (once per process, rank 0), with every choice that is not megalite's.
- `torch`: `F.scaled_dot_product_attention`, `F.layer_norm`, `F.rms_norm`.
- `triton`: the kernels in flash_attention.py, fused_layer_norm.py, fused_rms_norm.py. On CUDA tensors, or on CPU
  tensors under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported);
  anything else is a `KernelBackendError`, never a silent fallback.
- `apex`: NVIDIA apex's fused norms (only where apex imports); apex has no attention kernel, so
  attention uses torch SDPA under this backend (by design, documented here).

`grouped_mm` (the experts of an MoE layer) is torch's in every backend: `torch._grouped_mm`, one kernel for all
experts, where it runs (`grouped_mm_runs` says where), else one matmul per expert; `GROUPED_MM_BACKENDS` names
both for tests and benchmarks.

Importing this module imports neither triton nor apex and touches no GPU driver; the
Triton modules are imported on first use. `kernel_calls()` counts Triton launches, so tests
can prove that the Triton code ran.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType

import torch
import torch.nn.functional as F

from megalite.kernels import _common

BACKENDS = ("auto", "torch", "triton", "apex")
_backend = "auto"


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message says why."""


def set_backend(name: str) -> None:
    """Choose the kernel backend for every later call (raises if it cannot run on this machine)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "triton":
        _triton_module("attention")  # raises with the import error if triton is missing
    if name == "apex":
        _apex()
    _backend = name


def get_backend() -> str:
    """The backend as configured (possibly `auto`)."""
    return _backend


def kernel_calls() -> dict[str, int]:
    """How many times each Triton kernel family was launched (e.g. `attention_fwd`, `rms_norm_bwd`)."""
    return dict(_common.CALLS)


def reset_kernel_calls() -> None:
    """Zero the launch counters."""
    _common.CALLS.clear()


@functools.cache
def triton_available() -> bool:
    """True when triton imports (says nothing about a GPU); checked once."""
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


# The op files are not named after the public functions: importing a submodule binds its name
# on this package, which would shadow the function of the same name.
_OP_MODULES = {"attention": "flash_attention", "layer_norm": "fused_layer_norm", "rms_norm": "fused_rms_norm"}


def _triton_module(op: str) -> ModuleType:
    try:
        return importlib.import_module(f"megalite.kernels.{_OP_MODULES[op]}")
    except Exception as e:  # noqa: BLE001 - an ImportError or a broken triton install alike
        raise KernelBackendError(
            f"kernel backend 'triton' needs the triton package, which failed to import: {e}"
        ) from e


def _apex() -> ModuleType:
    try:
        return importlib.import_module("apex.normalization.fused_layer_norm")
    except ImportError as e:
        raise KernelBackendError(
            f"kernel backend 'apex' needs NVIDIA apex (built from source; PyPI's 'apex' is unrelated): {e}"
        ) from e


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_tables: dict[int, object] = {}  # device index -> its measured.Table, or None without one
_announced = False


def _table_for(device: torch.device) -> object:
    """The measured table of a CUDA device (measured.Table), or None; read once per device."""
    from megalite.kernels import measured

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _tables:
        _tables[index] = measured.load(torch.cuda.get_device_name(index))
    return _tables[index]


def auto_choice(table: object, op: str, dtype: torch.dtype, size: int | None, grad: bool, **klass: object) -> str:
    """Under `auto` on a CUDA tensor that megalite's kernel can run: 'triton', 'torch', 'apex' or an SDPA backend
    ('sdpa-cudnn', 'sdpa-flash', 'sdpa-efficient'), as the measured table (or None) says for the call's op
    ('attention', 'attention_docs', 'layer_norm', 'rms_norm'), dtype, length and class; 'triton' where it says
    megalite or does not cover the call."""
    from megalite.kernels import measured

    if table is None or size is None:
        return "triton"
    _announce(table)
    winner = table.winner(op, str(dtype).replace("torch.", ""), "fwd+bwd" if grad else "fwd", size, **klass)
    if winner in (None, measured.OURS):
        return "triton"
    if winner == "apex":
        try:
            _apex()
        except KernelBackendError:
            return "triton"
        return "apex"
    return winner if winner.startswith("sdpa-") and winner != "sdpa-dense-mask" else "torch"


def _announce(table: object) -> None:
    """Say once per process (rank 0) that `auto` follows a measured table, and every choice that is not megalite's."""
    global _announced
    if _announced:
        return
    _announced = True
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return
    where = ", ".join(f"{k} {v}" for k, v in table.measured.items() if k in ("commit", "date", "torch", "triton") and v)
    print(f"megalite kernels: backend 'auto' on {table.device} follows the measured table ({where}):", file=sys.stderr)
    for line in table.describe():
        print(f"megalite kernels:   {line}", file=sys.stderr, flush=True)


def _resolve(op: str, x: torch.Tensor, triton_can: bool = True, size: int | None = None, grad: bool = False,
             **klass: object) -> str:
    """The backend that runs `op` on tensors like `x`; `triton_can`: the kernel supports this shape; `size`, `grad`
    and `klass`: the call's length (None: not a shape the tables measure), whether gradients are wanted and its
    class (head_dim, causal), for the measured table under `auto`."""
    if _backend == "auto":
        if not (x.is_cuda and triton_can and x.dtype in _TRITON_DTYPES and triton_available()):
            return "torch"
        return auto_choice(_table_for(x.device), op, x.dtype, size, grad, **klass)
    if _backend == "triton" and not x.is_cuda and not (x.device.type == "cpu" and _common.interpreting()):
        raise KernelBackendError(
            f"kernel backend 'triton' cannot run {op} on a {x.device.type} tensor: it needs a CUDA tensor, "
            "or TRITON_INTERPRET=1 (set before triton is imported) for Triton's CPU interpreter; "
            "choose the 'torch' or 'auto' backend instead"
        )
    if _backend == "apex":
        if op.startswith("attention"):
            return "torch"  # apex has no attention kernel; documented above
        if not x.is_cuda:
            raise KernelBackendError(f"kernel backend 'apex' runs {op} on CUDA tensors only, got {x.device.type}")
    return _backend


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, H, Tq, D); k, v: (B, KVH, Tk, D) with KVH dividing H.

    Causal masking is aligned bottom-right (query i sees keys j <= i + Tk - Tq); a query row that
    sees no key gives zeros. `document_ids` (B, T), for packed documents (needs Tq == Tk = T): a
    position attends only inside its own run of equal ids (Megatron's reset_attention_mask).
    """
    four = q.dim() == 4 and k.dim() == 4
    # The tables measure self-attention without grouped heads: other calls are not covered (size None).
    measured = four and q.shape[2] == k.shape[2] and q.shape[1] == k.shape[1]
    backend = _resolve("attention_docs" if document_ids is not None else "attention", q,
                       triton_can=four and q.shape[-1] <= 256, size=q.shape[2] if measured else None,
                       grad=_wants_grad(q, k, v), head_dim=q.shape[-1] if four else None, causal=causal)
    if backend == "triton":
        return _triton_module("attention").attention(q, k, v, causal, scale, document_ids)
    if backend.startswith("sdpa-"):
        with _sdpa_first(backend):
            return attention_torch(q, k, v, causal, scale, document_ids)
    return attention_torch(q, k, v, causal, scale, document_ids)


def _sdpa_first(name: str):  # noqa: ANN202 - a context manager
    """SDPA with backend `name` ('sdpa-cudnn', 'sdpa-flash', 'sdpa-efficient') first, the others after it in torch's
    order, so a shape the chosen backend cannot run still runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
             "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([first, *[b for b in order if b != first]], set_priority=True)


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch (SDPA) implementation with the same semantics as the Triton kernel."""
    tq, tk = q.shape[2], k.shape[2]
    if document_ids is None and (not causal or tq == tk):
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # not every SDPA backend takes enable_gqa together with a mask
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if document_ids is not None:
        _common.check_document_ids(q, k, document_ids)
        start, _ = _common.document_bounds(document_ids.to(q.device))
        mask = (start[:, :, None] == start[:, None, :]).unsqueeze(1)  # (B, 1, T, T): same document
        if causal:
            mask = mask & torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Bottom-right causal alignment. The first tq - tk rows see no key and would be NaN in SDPA:
    # let them see key 0 (finite, so the backward stays finite) and zero them afterwards.
    i = torch.arange(tq, device=q.device)[:, None]
    j = torch.arange(tk, device=q.device)[None, :]
    empty = i < tq - tk
    mask = (j <= i + (tk - tq)) | (empty & (j == 0))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(empty, 0.0) if tq > tk else out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    backend = _resolve("layer_norm", x, size=x.shape[-1] if x.dim() else None, grad=_wants_grad(x, weight, bias))
    if backend == "triton":
        return _triton_module("layer_norm").layer_norm(x, weight, bias, eps)
    if backend == "apex":
        apex_ln = _apex()
        if bias is None:
            bias = torch.zeros_like(weight)  # apex's affine LayerNorm needs a bias
        return apex_ln.fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension."""
    backend = _resolve("rms_norm", x, size=x.shape[-1] if x.dim() else None, grad=_wants_grad(x, weight))
    if backend == "triton":
        return _triton_module("rms_norm").rms_norm(x, weight, eps)
    if backend == "apex":
        return _apex().fused_rms_norm_affine(x, weight, (x.shape[-1],), eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


GROUPED_MM_BACKENDS = ("auto", "grouped", "loop")


def grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs `grouped_mm(x, w, ...)`: torch has it, both tensors are bf16 (on a CUDA GPU
    of compute capability 9.0 or newer, torch's grouped GEMM kernels), or bf16/fp32 on the CPU (measured: torch 2.13
    runs both there; not float64), at least one row, and rows of both operands a multiple of 16 bytes long (its
    stride rule)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.device != w.device or x.shape[0] == 0:
        return False
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return False
    return (x.shape[-1] * x.element_size()) % 16 == 0 and (w.shape[-1] * w.element_size()) % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Consecutive row groups of `x` (A, K), `counts[g]` rows each (sum A), each times its own matrix `w[g]` (K, N)
    -> (A, N). `w` may be a transposed view of (G, N, K) weights. Every w[g] takes part in the graph even with no
    rows, so its gradient is zeros rather than missing (data-parallel reductions expect every gradient).

    backend: 'auto' (grouped where `grouped_mm_runs`, else the loop), 'grouped' (torch._grouped_mm; raises where
    it cannot run) or 'loop' (one matmul per group)."""
    if backend not in GROUPED_MM_BACKENDS:
        raise ValueError(f"unknown grouped_mm backend {backend!r}; valid: {', '.join(GROUPED_MM_BACKENDS)}")
    if backend == "grouped" or (backend == "auto" and grouped_mm_runs(x, w)):
        if not grouped_mm_runs(x, w):
            raise KernelBackendError(f"torch._grouped_mm cannot run on {x.dtype} {x.device.type} tensors of shapes "
                                     f"{tuple(x.shape)} x {tuple(w.shape)} here (see grouped_mm_runs)")
        ends = counts.to(device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x.contiguous(), w, offs=ends)
    outs = [x[start:start + n] @ w[g] for g, (start, n) in enumerate(_group_bounds(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


def _group_bounds(counts: torch.Tensor) -> list[tuple[int, int]]:
    sizes = [int(n) for n in counts.tolist()]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    return list(zip(starts, sizes))


__all__ = [
    "BACKENDS",
    "GROUPED_MM_BACKENDS",
    "KernelBackendError",
    "attention",
    "attention_torch",
    "auto_choice",
    "get_backend",
    "grouped_mm",
    "grouped_mm_runs",
    "kernel_calls",
    "layer_norm",
    "reset_kernel_calls",
    "rms_norm",
    "set_backend",
    "triton_available",
]
