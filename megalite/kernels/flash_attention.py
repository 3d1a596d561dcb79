"""Flash attention (forward and backward) with grouped-query attention: kernels, launchers, autograd.

Layout: q (B, H, Tq, D), k and v (B, KVH, Tk, D) with KVH dividing H; q head h reads kv head
h // (H // KVH), so repeated k/v are never materialised. Any strides are accepted.
Causal masking is aligned bottom-right (query i sees keys j <= i + Tk - Tq, as in
flash-attn), so with Tq > Tk the first Tq - Tk rows see nothing: they give zeros.

Forward: one program per (BLOCK_M queries, batch*head); it streams BLOCK_N keys at a time
with an online softmax in base 2 and fp32, never forming the Tq x Tk matrix, and saves the
per-row log-sum-exp (base 2; +inf for rows with no keys, which makes their backward zero).
Backward (FlashAttention-2 split): delta = rowsum(o * do); one kernel per (key block, batch*kv
head) accumulates dk and dv in registers over every q head of its group and every query
block (deterministic, no atomics); one kernel per (query block, batch*head) accumulates dq.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from megalite.kernels import _common

LOG2E = 1.4426950408889634
# Fixed when triton.jit chose the interpreter (at this import), so the two never disagree.
INTERPRET = _common.interpreting()
MAX_HEAD_DIM = 256
# Lengths and head counts change often and gain nothing from Triton's per-value specialisation (equal to 1,
# divisible by 16), which would compile each kernel again per variant; D and the strides stay specialised.
_SIZES = ["H", "GROUP", "TQ", "TK", "TQ_BUCKET", "TK_BUCKET"]


@triton.jit
def _attn_fwd_block(
    acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, d_mask,
    skn, skd, svn, svd, TK, diag, qk_scale, doc_lo, doc_hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N step of the online softmax; MASK=False for blocks every row sees in full.

    With HAS_DOCS, each row sees the keys of its document, [doc_lo, doc_hi) (a document is a contiguous run).
    """
    cols = start_n + offs_n
    n_mask = cols < TK
    kt_ptrs = k_base + cols[None, :] * skn + offs_d[:, None] * skd
    kt = tl.load(kt_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is broken; exact fp32 instead
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    if MASK:
        valid = _visible_keys(cols, offs_m, n_mask, diag, doc_lo, doc_hi, CAUSAL, HAS_DOCS)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with no valid key so far has m_new = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _visible_keys(cols, rows, n_mask, diag, doc_lo, doc_hi, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """(rows x cols) mask of the keys each query row sees (forward and dq)."""
    if HAS_DOCS:  # the row's document; causal: up to the row itself, which lies inside its document
        valid = cols[None, :] >= doc_lo[:, None]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + diag)
        else:
            valid = valid & (cols[None, :] < doc_hi[:, None])
    else:
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + diag)
    return valid


@triton.jit
def _query_block_keys(
    DOC_START, DOC_END, b, pid_m, offs_m, m_mask, TQ, TK, diag,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The keys a block of queries visits (forward and dq): [lo, full) whole blocks every row sees, no mask;
    [full, hi) masked. Also each row's document [doc_lo, doc_hi) (unused without HAS_DOCS; rows past TQ get
    an empty one)."""
    doc_lo = offs_m
    doc_hi = offs_m
    if HAS_DOCS:  # packed documents (TQ == TK): only the keys of the block's documents, all masked
        doc_lo = tl.load(DOC_START + b * TK + offs_m, mask=m_mask, other=0)
        doc_hi = tl.load(DOC_END + b * TK + offs_m, mask=m_mask, other=0)
        last = tl.minimum((pid_m + 1) * BLOCK_M, TQ) - 1
        lo = (tl.load(DOC_START + b * TK + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N  # the first row's document start
        full = lo
        if CAUSAL:
            hi = last + 1
        else:
            hi = tl.load(DOC_END + b * TK + last)  # the last row's document end
    else:
        lo = 0
        if CAUSAL:
            hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M + diag)  # keys from here on are masked for every row
            full = tl.maximum(pid_m * BLOCK_M + diag + 1, 0)  # keys below this are visible to every row
        else:
            hi = TK
            full = TK
        # Whole blocks below `full` need no mask; the rest (diagonal, ragged end) are masked.
        full = (tl.minimum(full, tl.maximum(hi, 0)) // BLOCK_N) * BLOCK_N
    return lo, full, hi, doc_lo, doc_hi


@triton.jit(do_not_specialize=_SIZES)
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, DOC_START, DOC_END,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, GROUP, TQ, TK, D, qk_scale, TQ_BUCKET, TK_BUCKET,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < TQ
    d_mask = offs_d < D
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    diag = TK - TQ  # bottom-right causal alignment: query i sees keys j <= i + diag
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full, hi, doc_lo, doc_hi = _query_block_keys(
        DOC_START, DOC_END, b, pid_m, offs_m, m_mask, TQ, TK, diag, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N
    )
    for start_n in range(lo, full, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(
            acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, d_mask,
            skn, skd, svn, svd, TK, diag, qk_scale, doc_lo, doc_hi, False, CAUSAL, UPCAST, PRECISION, HAS_DOCS,
        )  # fmt: skip
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(
            acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, d_mask,
            skn, skd, svn, svd, TK, diag, qk_scale, doc_lo, doc_hi, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS,
        )  # fmt: skip
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    # +inf for empty rows: exp2(s - inf) = 0 makes their backward contribution exactly zero.
    lse = tl.where(empty_row, float("inf"), m_i + tl.log2(l_safe))
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=m_mask)


@triton.jit(do_not_specialize=["H", "TQ"])
def _attn_bwd_delta_kernel(
    Out, DO, DELTA, H, TQ, D,
    sob, soh, som, sod, sdob, sdoh, sdom, sdod,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < TQ)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, delta, mask=offs_m < TQ)


@triton.jit
def _attn_bwd_dkdv_block(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m0, offs_n, offs_d, d_mask,
    sqm, sqd, sdom, sdod, TQ, diag, qk_scale, doc_lo, doc_hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """Add one BLOCK_M block of queries to dk, dv of a key block; MASK=False where every query sees every key.

    Queries past TQ need no mask: their lse loads as +inf, so their probabilities are exactly 0.
    """
    offs_m = start_m + offs_m0
    m_mask = offs_m < TQ
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_base + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    if MASK:
        if CAUSAL:
            # Mask before exp2: a masked logit can exceed the row's lse by enough to overflow.
            st = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, st, float("-inf"))
        if HAS_DOCS:  # the queries of each key's document [doc_lo, doc_hi); causal ones start at the key
            valid = offs_m[None, :] < doc_hi[:, None]
            if not CAUSAL:
                valid = valid & (offs_m[None, :] >= doc_lo[:, None])
            st = tl.where(valid, st, float("-inf"))
    pt = tl.exp2(st - lse[None, :])
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_part(
    dk, dv, k, v, Q, DO, LSE, DELTA, b, kvh, H, GROUP, start_m, n_blocks, offs_m0, offs_n, offs_d, d_mask,
    sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, TQ, diag, qk_scale, doc_lo, doc_hi,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """Add `n_blocks` query blocks from `start_m`, of every q head sharing this kv head, to dk and dv.

    One flat loop over (head of the group, query block), not a loop over heads around a loop over blocks: the
    nested form keeps more values live across the inner loop and spills. The software pipeliner computes the
    addresses of the next iterations before it knows whether they run (also when the loop runs 0 times): the
    head index is clamped and the divisor kept >= 1 so that every such address stays inside q/do/lse/delta. A
    division by 0 there gave garbage heads and an illegal memory access on an H200 (Triton 3.6) for non-causal
    attention, whose masked part is empty.
    """
    blocks = tl.maximum(n_blocks, 1)
    for i in range(0, GROUP * n_blocks):
        g = tl.minimum(i // blocks, GROUP - 1)
        h = kvh * GROUP + g
        bh = b * H + h
        dk, dv = _attn_bwd_dkdv_block(
            dk, dv, k, v, Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + bh * TQ, DELTA + bh * TQ,
            start_m + (i - g * blocks) * BLOCK_M, offs_m0, offs_n, offs_d, d_mask, sqm, sqd, sdom, sdod, TQ, diag,
            qk_scale, doc_lo, doc_hi, MASK, CAUSAL, UPCAST, PRECISION, HAS_DOCS,
        )  # fmt: skip
    return dk, dv


@triton.jit(do_not_specialize=[*_SIZES, "KVH"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, KVH, GROUP, TQ, TK, D, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // KVH).to(tl.int64)
    kvh = (pid_bkv % KVH).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < TK
    d_mask = offs_d < D
    kv_mask = n_mask[:, None] & d_mask[None, :]
    # Keys past TK load as 0 and their rows are never stored, so they need no mask in the loop.
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    diag = TK - TQ
    doc_lo = offs_n
    doc_hi = offs_n
    if HAS_DOCS:  # packed documents (TQ == TK): only the queries of the block's documents, all masked
        # Keys past TK get an empty document: they see no query (and are never stored).
        doc_lo = tl.load(DOC_START + b * TK + offs_n, mask=n_mask, other=0)
        doc_hi = tl.load(DOC_END + b * TK + offs_n, mask=n_mask, other=0)
        if CAUSAL:
            lo = start_n
        else:
            lo = tl.load(DOC_START + b * TK + start_n)  # the first key's document start
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.load(DOC_END + b * TK + tl.minimum(start_n + BLOCK_N, TK) - 1)  # the last key's document end
    elif CAUSAL:
        lo = tl.maximum(start_n - diag, 0)  # earlier queries see none of these keys
        # From `mid` on every query sees the whole key block; [lo, mid) is the masked diagonal band.
        mid = lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0) - lo, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    # The whole group of q heads sharing this kv head, summed here: GQA without repeated k/v and no atomics.
    if CAUSAL or HAS_DOCS:  # without either, no key block has a masked part
        n_masked = tl.maximum(tl.cdiv(tl.minimum(mid, TQ) - lo, BLOCK_M), 0)
        dk, dv = _attn_bwd_dkdv_part(
            dk, dv, k, v, Q, DO, LSE, DELTA, b, kvh, H, GROUP, lo, n_masked, offs_m0, offs_n, offs_d, d_mask,
            sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, TQ, diag, qk_scale, doc_lo, doc_hi,
            BLOCK_M, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS,
        )  # fmt: skip
    if not HAS_DOCS:
        n_full = tl.maximum(tl.cdiv(TQ - mid, BLOCK_M), 0)
        dk, dv = _attn_bwd_dkdv_part(
            dk, dv, k, v, Q, DO, LSE, DELTA, b, kvh, H, GROUP, mid, n_full, offs_m0, offs_n, offs_d, d_mask,
            sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, TQ, diag, qk_scale, doc_lo, doc_hi,
            BLOCK_M, False, CAUSAL, UPCAST, PRECISION, False,
        )  # fmt: skip
    dk = dk * sm_scale
    tl.store(
        DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _attn_bwd_dq_block(
    dq, q, do, lse, delta, k_base, v_base, start_n, offs_m, offs_n0, offs_d, d_mask,
    skn, skd, svn, svd, TK, diag, qk_scale, doc_lo, doc_hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """Add one BLOCK_N block of keys to dq; MASK=False for blocks every row sees in full."""
    offs_n = start_n + offs_n0
    n_mask = offs_n < TK
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASK:
        valid = _visible_keys(offs_n, offs_m, n_mask, diag, doc_lo, doc_hi, CAUSAL, HAS_DOCS)
        s = tl.where(valid, s, float("-inf"))  # before exp2, so masked logits cannot overflow
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC_START, DOC_END,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, GROUP, TQ, TK, D, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < TQ
    d_mask = offs_d < D
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # Rows past TQ (and rows with no key) have lse = +inf: their p, and so their dq, are exactly 0.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    diag = TK - TQ
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full, hi, doc_lo, doc_hi = _query_block_keys(
        DOC_START, DOC_END, b, pid_m, offs_m, m_mask, TQ, TK, diag, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N
    )
    for start_n in range(lo, full, BLOCK_N):
        dq = _attn_bwd_dq_block(
            dq, q, do, lse, delta, k_base, v_base, start_n, offs_m, offs_n0, offs_d, d_mask,
            skn, skd, svn, svd, TK, diag, qk_scale, doc_lo, doc_hi, False, CAUSAL, UPCAST, PRECISION, HAS_DOCS,
        )  # fmt: skip
    for start_n in range(full, hi, BLOCK_N):
        dq = _attn_bwd_dq_block(
            dq, q, do, lse, delta, k_base, v_base, start_n, offs_m, offs_n0, offs_d, d_mask,
            skn, skd, svn, svd, TK, diag, qk_scale, doc_lo, doc_hi, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS,
        )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


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


def autotune_configs(kind: str, block_d: int, dtype: torch.dtype, arch: int, docs: bool = False) -> list[triton.Config]:
    """The configs autotuning tries for kernel `kind` ("fwd", "dkdv", "dq") at a padded head dim, dtype and
    compute capability (80, 86, 90, ...), with packed documents or not; one fixed config under the
    interpreter (autotuning needs a driver).
    `MEGALITE_AUTOTUNE=0` keeps only the first (quick GPU test runs: each config compiles per specialisation)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    if dtype == torch.float32:
        shapes = TILES_FP32[(kind, 64 if block_d <= 64 else 256)]
    else:
        key = (kind, 64 if block_d <= 64 else 128 if block_d <= 128 else 256, 90 if arch >= 90 else 80)
        shapes = [t for t in TILES[key] if not (docs and t in TILES_WITHOUT_DOCS.get(key, ()))]
    if os.environ.get("MEGALITE_AUTOTUNE", "1") == "0":
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _kernel(kind: str, block_d: int, dtype: torch.dtype, device: torch.device, docs: bool):  # noqa: ANN202
    """The autotuned launcher (a triton Autotuner) for `kind`, a head-dim bucket, fp32-or-not, the device's
    generation and documents or not, built once."""
    arch = _common.capability(device)
    key = (kind, block_d, dtype == torch.float32, arch, docs)
    if key not in _tuned:
        fn = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
        # Tuned per power-of-two bucket of the lengths (TQ_BUCKET, TK_BUCKET: unused by the kernels), so
        # varying lengths (generation) do not retune every call; also per head dim, causality and dtype.
        # Outputs are fully overwritten by every run, so benchmarking configs needs no reset.
        keys = ["TQ_BUCKET", "TK_BUCKET", "D", "CAUSAL", "PRECISION", "HAS_DOCS"]
        _tuned[key] = triton.autotune(configs=autotune_configs(kind, block_d, dtype, arch, docs), key=keys)(fn)
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
    _common.launch(_kernel("fwd", block_d, q.dtype, q.device, docs is not None), grid,
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
    _common.launch(_kernel("dkdv", block_d, q.dtype, q.device, docs is not None), grid,
        q, k, v, do, lse, delta, dk, dv, doc_start, doc_end,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        heads, kvh, heads // kvh, tq, tk, d, scale * LOG2E, scale, _common.next_pow2(tq), _common.next_pow2(tk),
        CAUSAL=causal, UPCAST=upcast, PRECISION=precision, HAS_DOCS=docs is not None, BLOCK_D=block_d,
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), bsz * heads)
    _common.launch(_kernel("dq", block_d, q.dtype, q.device, docs is not None), grid,
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
