"""Flash attention (forward and backward) with grouped-query attention: tiles, launchers, autograd, the public
function. The `@triton.jit` kernels are in _attention_kernels.py (their docstring: the algorithm, the sm_90 TMA and
warp-specialised variants).

Layout: q (B, H, Tq, D), k and v (B, KVH, Tk, D) with KVH dividing H; any strides. Causal masking is aligned
bottom-right (query i sees keys j <= i + Tk - Tq, as in flash-attn), so with Tq > Tk the first Tq - Tk rows see
nothing: they give zeros. Packed documents: `document_ids` (B, T).
"""

from __future__ import annotations

import math
import os

import torch
import triton

from megalite.kernels import _common
from megalite.kernels._attention_kernels import (
    _attn_bwd_delta_kernel,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
)

LOG2E = 1.4426950408889634
# Fixed when triton.jit chose the interpreter (at this import), so the two never disagree.
INTERPRET = _common.interpreting()
MAX_HEAD_DIM = 256
KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


# --- launch configuration -------------------------------------------------------------------

_tuned: dict[tuple, object] = {}

# Tiles (BLOCK_M, BLOCK_N, warps, stages) autotuning chooses from, per kernel, head-dim bucket and GPU
# generation (80: Ampere/Ada mma.sync; 90: Hopper and newer, warpgroup MMA). For bf16/fp16 at head dims up to
# 128 every one compiles without register spills on sm_80 and sm_90 with Triton 3.6 and 3.9, causal or not,
# with documents or not (`kernels/compile_check.py` reports it; tests/test_kernels_resources.py keeps it so).
# dk/dv holds BLOCK_N keys and two fp32 BLOCK_N x D accumulators, so at head dim 128 it needs 8 warps even for
# 64-key tiles; dq holds BLOCK_M queries, the forward BLOCK_M queries and an fp32 accumulator. Head dim 256:
# dk/dv on sm_90 has no spill-free tile with warpgroup MMA (which needs 64 keys per warpgroup); 32-key tiles
# (mma.sync, no spills) and 16 x 64 (warpgroup MMA, about 30 spilled values) are both offered to autotuning.
TILES: dict[tuple[str, int, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 64, 90): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", 64, 80): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 8, 4)],
    ("fwd", 128, 90): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("fwd", 128, 80): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
    ("fwd", 256, 90): [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    ("fwd", 256, 80): [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    ("dkdv", 64, 90): [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
    ("dkdv", 64, 80): [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3)],
    ("dkdv", 128, 90): [(32, 64, 8, 3), (32, 128, 8, 3), (16, 128, 8, 3)],
    ("dkdv", 128, 80): [(32, 64, 8, 3), (64, 64, 8, 3), (16, 128, 8, 3)],
    ("dkdv", 256, 90): [(32, 32, 8, 2), (16, 32, 8, 2), (16, 64, 8, 2)],
    ("dkdv", 256, 80): [(32, 32, 8, 2), (16, 32, 8, 2), (16, 64, 8, 2)],
    ("dq", 64, 90): [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
    ("dq", 64, 80): [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
    ("dq", 128, 90): [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
    ("dq", 128, 80): [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)],
    ("dq", 256, 90): [(64, 32, 8, 2), (64, 16, 8, 2), (128, 32, 8, 2)],
    ("dq", 256, 80): [(64, 32, 8, 2), (64, 16, 4, 2), (32, 32, 4, 2)],
}
# Tiles that spill with packed documents (their per-row document bounds), used only without them.
TILES_WITHOUT_DOCS: dict[tuple[str, int, int], set[tuple[int, int, int, int]]] = {
    ("fwd", 128, 90): {(128, 128, 8, 3)},
    ("fwd", 128, 80): {(128, 64, 8, 3)},
}
# fp32 tiles take twice the shared memory and IEEE dots run without tensor cores: small tiles.
TILES_FP32: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 64): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("dkdv", 64): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("dq", 64): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("fwd", 256): [(32, 32, 4, 2), (32, 16, 4, 2)],
    ("dkdv", 256): [(16, 32, 4, 2), (32, 32, 4, 2)],
    ("dq", 256): [(32, 32, 4, 2), (32, 16, 4, 2)],
}


# sm_90 and newer, bf16/fp16, tensors the copy engine can read (see `tma_eligible`): tiles of the TMA variants,
# (BLOCK_M, BLOCK_N, warps, stages, warp-specialised), offered to autotuning after the pointer tiles above. Every
# one compiles without spills (Triton 3.6 and 3.9) with HGMMA and UTMALDG; the warp-specialised ones have 4 warps
# per consumer warpgroup: with 8 Triton compiles the loop without specialising it (no USETMAXREG in its SASS),
# and they are never offered with packed documents, for which the specialisation fails to compile (an "unsupported
# load type for producer commit" error). tests/test_kernels_resources.py checks all of it.
TILES_TMA: dict[tuple[str, int], list[tuple[int, int, int, int, bool]]] = {
    ("fwd", 64): [(128, 64, 4, 3, False), (128, 128, 8, 3, False), (128, 64, 4, 2, True), (128, 128, 4, 2, True)],
    ("fwd", 128): [(128, 64, 8, 3, False), (128, 128, 8, 2, False), (128, 64, 4, 2, True), (128, 128, 4, 2, True)],
    ("dkdv", 64): [(32, 128, 8, 3, False), (64, 128, 8, 3, False), (64, 64, 4, 2, True)],
    ("dkdv", 128): [(32, 64, 8, 3, False), (32, 128, 8, 3, False), (32, 64, 4, 2, True)],
    ("dq", 64): [(128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 64, 4, 2, True)],
    ("dq", 128): [(128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 64, 4, 2, True)],
}


def autotune_configs(
    kind: str, block_d: int, dtype: torch.dtype, arch: int, docs: bool = False, tma: bool = False
) -> list[triton.Config]:
    """The configs autotuning tries for kernel `kind` ("fwd", "dkdv", "dq") at a padded head dim, dtype and
    compute capability (80, 86, 90, ...), with packed documents or not; `tma`: the tensors allow the TMA variants
    (sm_90 and newer only). One fixed config under the interpreter (autotuning needs a driver).
    `MEGALITE_AUTOTUNE=0` keeps only the first (quick GPU test runs: each config compiles per specialisation)."""
    if INTERPRET:
        return [config(64, 64, 4, 1)]
    if dtype == torch.float32:
        shapes = [(*t, False, False) for t in TILES_FP32[(kind, 64 if block_d <= 64 else 256)]]
    else:
        bucket = 64 if block_d <= 64 else 128 if block_d <= 128 else 256
        key = (kind, bucket, 90 if arch >= 90 else 80)
        shapes = [(*t, False, False) for t in TILES[key] if not (docs and t in TILES_WITHOUT_DOCS.get(key, ()))]
        if tma and arch >= 90:  # no warp specialisation with documents: it fails to compile (see TILES_TMA)
            shapes += [(m, n, w, s, True, ws) for m, n, w, s, ws in TILES_TMA.get((kind, bucket), []) if not (docs and ws)]
    if os.environ.get("MEGALITE_AUTOTUNE", "1") == "0":
        shapes = shapes[:1]
    return [config(*shape) for shape in shapes]


def config(m: int, n: int, warps: int, stages: int, tma: bool = False, ws: bool = False) -> triton.Config:
    """One autotune candidate: tiles, warps, pipeline stages, TMA and warp specialisation (constexprs)."""
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TMA": tma, "WS": ws}, num_warps=warps, num_stages=stages)


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine can read these tensors' tiles: unit last stride, 16-byte aligned base and every
    other stride a multiple of 16 bytes (so every head's base is aligned too)."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


_allocator_ready = False


def _tma_scratch() -> None:
    """Device-made tensor descriptors live in Triton's global scratch memory, which Triton asks an allocator for
    (`triton.set_allocator`); set one (torch's caching allocator) once, before the first TMA launch."""
    global _allocator_ready
    if not _allocator_ready and not INTERPRET and _common.recording() is None:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_ready = True


def _kernel(kind: str, block_d: int, dtype: torch.dtype, device: torch.device, docs: bool, tma: bool):  # noqa: ANN202
    """The autotuned launcher (a triton Autotuner) for `kind`, a head-dim bucket, fp32-or-not, the device's
    generation, documents or not and TMA-eligible tensors or not, built once."""
    arch = _common.capability(device)
    tma = tma and arch >= 90 and dtype != torch.float32
    key = (kind, block_d, dtype == torch.float32, arch, docs, tma)
    if key not in _tuned:
        # Tuned per power-of-two bucket of the lengths (TQ_BUCKET, TK_BUCKET: unused by the kernels), so
        # varying lengths (generation) do not retune every call; also per head dim, causality and dtype.
        # Outputs are fully overwritten by every run, so benchmarking configs needs no reset.
        keys = ["TQ_BUCKET", "TK_BUCKET", "D", "CAUSAL", "PRECISION", "HAS_DOCS"]
        configs = autotune_configs(kind, block_d, dtype, arch, docs, tma)
        _tuned[key] = triton.autotune(configs=configs, key=keys)(KERNELS[kind])
    if tma:
        _tma_scratch()
    return _tuned[key]


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only where torch itself would (torch.backends.cuda.matmul.allow_tf32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-d (B, H, T, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: batch/head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: kv heads {k.shape[1]} must divide q heads {q.shape[1]}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {q.shape[3]} exceeds {MAX_HEAD_DIM}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and INTERPRET


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    docs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns o (B, H, Tq, D) and the base-2 log-sum-exp (B, H, Tq) in fp32.

    docs: (start, end) int32 (B, T) from `_common.document_bounds`, for packed documents (Tq == Tk).
    """
    bsz, heads, tq, d = q.shape
    kvh, tk = k.shape[1], k.shape[2]
    # o is laid out (B, Tq, H, D) in memory so the model's transpose back to (B, T, H*D) is free.
    o = _common.empty((bsz, tq, heads, d), q.dtype, q.device).transpose(1, 2)
    lse = _common.empty((bsz, heads, tq), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    block_d = max(16, _common.next_pow2(d))
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), bsz * heads)
    doc_start, doc_end = docs if docs is not None else (lse, lse)  # unread without HAS_DOCS
    tma = tma_eligible(q, k, v)
    _common.launch(_kernel("fwd", block_d, q.dtype, q.device, docs is not None, tma), grid,
        q, k, v, o, lse, doc_start, doc_end,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        heads, heads // kvh, tq, tk, d, scale * LOG2E, _common.next_pow2(tq), _common.next_pow2(tk),
        CAUSAL=causal, UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype), HAS_DOCS=docs is not None,
        BLOCK_D=block_d,
    )  # fmt: skip
    _common.count("attention_fwd")
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    docs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns dq, dk, dv in the inputs' dtype (dk, dv per kv head)."""
    bsz, heads, tq, d = q.shape
    kvh, tk = k.shape[1], k.shape[2]
    dq = _common.empty(q.shape, q.dtype, q.device)
    dk = _common.empty(k.shape, k.dtype, k.device)
    dv = _common.empty(v.shape, v.dtype, v.device)
    if tq == 0 or tk == 0 or bsz * heads * d == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = max(16, _common.next_pow2(d))
    delta = _common.empty((bsz, heads, tq), torch.float32, q.device)
    block_m = 64 if INTERPRET else max(16, min(128, 8192 // block_d))
    _common.launch(_attn_bwd_delta_kernel, (triton.cdiv(tq, block_m), bsz * heads),
        o, do, delta, heads, tq, d, *o.stride(), *do.stride(), BLOCK_M=block_m, BLOCK_D=block_d
    )
    upcast, precision = _upcast(q.dtype), _precision(q.dtype)
    doc_start, doc_end = docs if docs is not None else (lse, lse)  # unread without HAS_DOCS
    grid = lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), bsz * kvh)
    tma = tma_eligible(q, k, v, do)
    _common.launch(_kernel("dkdv", block_d, q.dtype, q.device, docs is not None, tma), grid,
        q, k, v, do, lse, delta, dk, dv, doc_start, doc_end,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        heads, kvh, heads // kvh, tq, tk, d, scale * LOG2E, scale, _common.next_pow2(tq), _common.next_pow2(tk),
        CAUSAL=causal, UPCAST=upcast, PRECISION=precision, HAS_DOCS=docs is not None, BLOCK_D=block_d,
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), bsz * heads)
    _common.launch(_kernel("dq", block_d, q.dtype, q.device, docs is not None, tma), grid,
        q, k, v, do, lse, delta, dq, doc_start, doc_end,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        heads, heads // kvh, tq, tk, d, scale * LOG2E, scale, _common.next_pow2(tq), _common.next_pow2(tk),
        CAUSAL=causal, UPCAST=upcast, PRECISION=precision, HAS_DOCS=docs is not None, BLOCK_D=block_d,
    )  # fmt: skip
    _common.count("attention_bwd")
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Flash attention with the Triton forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, doc_start=None, doc_end=None):  # type: ignore[override]
        docs = (doc_start, doc_end) if doc_start is not None else None
        o, lse = attention_fwd(q, k, v, causal, scale, docs)
        ctx.save_for_backward(q, k, v, o, lse, *(docs or ()))
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse, *docs = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, tuple(docs) if docs else None)
        return dq, dk, dv, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton flash attention (differentiable). q: (B, H, Tq, D); k, v: (B, KVH, Tk, D).

    document_ids (B, T), for packed documents (Tq == Tk = T): a position attends only to positions of its
    own run of equal ids.
    """
    _check(q, k, v)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[3])
    if document_ids is None:
        return AttentionFunction.apply(q, k, v, causal, scale)
    _common.check_document_ids(q, k, document_ids)
    start, end = _common.document_bounds(document_ids.to(q.device))
    return AttentionFunction.apply(q, k, v, causal, scale, start, end)
