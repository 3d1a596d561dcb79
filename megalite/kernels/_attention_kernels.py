"""Flash attention's `@triton.jit` kernels: forward, delta, dk/dv, dq (the host side is flash_attention.py).

Every kernel has one body and two ways to fetch its tiles, chosen by the constexpr TMA:

- TMA=False: masked pointer loads; any strides; sm_80 and sm_90.
- TMA=True (sm_90 and newer, bf16/fp16): the tiles of q, k, v and do come through tensor descriptors made on the
  device (`tl.make_tensor_descriptor`, one per head or per batch; the copy engine, UTMALDG in the SASS). A
  descriptor spans exactly one head's rows and the true head dim, so the copy engine fills rows past the sequence
  and columns past the head dim with zeros, as the masked loads do. It needs a unit last stride and 16-byte aligned
  bases and strides (the launcher checks) and Triton's global scratch allocator on a GPU (`triton.set_allocator`).
  WS=True adds Triton's warp specialisation to the key (query) loops, `tl.range(..., warp_specialize=True)`: on
  Hopper the compiler splits the loop into a producer warp issuing the copies and consumer warpgroups doing the
  matrix products and the softmax, so the copies of the next tiles and one tile's softmax run under another's
  warpgroup MMA, as far as its scheduler allows.

Triton's CPU interpreter runs the TMA bodies too (it emulates descriptor loads with the same zero padding and
checks their alignment rules) and ignores warp specialisation, so the CPU tests cover each variant's arithmetic,
addressing and padding; what only a GPU shows (the copy engine, the warp partitions, their synchronisation) is
checked by `make gpu-check`.

Layout: q (B, H, Tq, D), k and v (B, KVH, Tk, D) with KVH dividing H; q head h reads kv head h // (H // KVH).
Causal masking is aligned bottom-right (query i sees keys j <= i + Tk - Tq); with Tq > Tk the first Tq - Tk rows
see no key and give zeros. Forward: one program per (BLOCK_M queries, batch*head) streams BLOCK_N keys at a time
with an online softmax in base 2 and fp32, saving the row log-sum-exp (base 2; +inf for rows without keys).
Backward (FlashAttention-2 split): delta = rowsum(o * do); one program per (key block, batch*kv head) sums dk, dv
over every q head of its group (deterministic, no atomics); one program per (query block, batch*head) sums dq.
"""

from __future__ import annotations

import triton
import triton.language as tl

# WS and one loop: Triton's Hopper warp specialisation (3.6 and 3.9) fails to compile a kernel with a second loop
# beside the specialised one (an MLIR dominance assertion in NVGPUWarpSpecialization), so with WS every kernel runs
# one key (query) loop over all its blocks, each masked, instead of an unmasked loop and a masked band.
# Lengths and head counts change often and gain nothing from Triton's per-value specialisation (equal to 1,
# divisible by 16), which would compile each kernel again per variant; D and the strides stay specialised.
SIZES = ["H", "GROUP", "TQ", "TK", "TQ_BUCKET", "TK_BUCKET"]


@triton.jit
def _tile_source(base, rows, D, row_stride, TMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where a head's (rows x D) tiles come from: a tensor descriptor (TMA) or the pointer itself."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[rows, D], strides=[row_stride, 1], block_shape=[BLOCK_R, BLOCK_D])
    else:
        return base


@triton.jit
def _load_rows(src, start, offs_r, offs_d, n_rows, D, s_r, s_d, TMA: tl.constexpr):
    """Rows start.. of a head, (len(offs_r) x BLOCK_D), zero past n_rows and past D."""
    if TMA:
        return src.load([start, 0])
    else:
        rows = start + offs_r
        return tl.load(src + rows[:, None] * s_r + offs_d[None, :] * s_d,
                       mask=(rows < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _attn_fwd_block(
    acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d, d_mask,
    skn, skd, svn, svd, TK, D, diag, qk_scale, doc_lo, doc_hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N step of the online softmax; MASK=False for blocks every row sees in full.

    With HAS_DOCS, each row sees the keys of its document, [doc_lo, doc_hi) (a document is a contiguous run).
    """
    cols = start_n + offs_n
    n_mask = cols < TK
    if TMA:
        kt = tl.trans(k_src.load([start_n, 0]))
    else:  # k loaded already transposed: the layout the sm_80 tiles were made spill-free with
        kt = tl.load(k_src + cols[None, :] * skn + offs_d[:, None] * skd, mask=n_mask[None, :] & d_mask[:, None],
                     other=0.0)
    v = _load_rows(v_src, start_n, offs_n, offs_d, TK, D, svn, svd, TMA)
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
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
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


@triton.jit(do_not_specialize=SIZES)
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, DOC_START, DOC_END,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, GROUP, TQ, TK, D, qk_scale, TQ_BUCKET, TK_BUCKET,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
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
    q_src = _tile_source(Q + b * sqb + h * sqh, TQ, D, sqm, TMA, BLOCK_M, BLOCK_D)
    q = _load_rows(q_src, pid_m * BLOCK_M, tl.arange(0, BLOCK_M), offs_d, TQ, D, sqm, sqd, TMA)
    if UPCAST:
        q = q.to(tl.float32)
    k_src = _tile_source(K + b * skb + kvh * skh, TK, D, skn, TMA, BLOCK_N, BLOCK_D)
    v_src = _tile_source(V + b * svb + kvh * svh, TK, D, svn, TMA, BLOCK_N, BLOCK_D)
    diag = TK - TQ  # bottom-right causal alignment: query i sees keys j <= i + diag
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full, hi, doc_lo, doc_hi = _query_block_keys(
        DOC_START, DOC_END, b, pid_m, offs_m, m_mask, TQ, TK, diag, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N
    )
    if WS:  # one warp-specialised loop, every block masked (see "WS and one loop")
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _attn_fwd_block(
                acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d, d_mask, skn, skd, svn, svd, TK, D,
                diag, qk_scale, doc_lo, doc_hi, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA,
            )  # fmt: skip
    else:
        for start_n in tl.range(lo, full, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_block(
                acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d, d_mask, skn, skd, svn, svd, TK, D,
                diag, qk_scale, doc_lo, doc_hi, False, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA,
            )  # fmt: skip
        for start_n in tl.range(full, hi, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_block(
                acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d, d_mask, skn, skd, svn, svd, TK, D,
                diag, qk_scale, doc_lo, doc_hi, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA,
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
    dk, dv, k, v, q_src, do_src, h, q_base, do_base, lse_base, delta_base, start_m, offs_m0, offs_n, offs_d, d_mask,
    sqm, sqd, sdom, sdod, TQ, D, diag, qk_scale, doc_lo, doc_hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Add one BLOCK_M block of queries of head h to dk, dv of a key block; MASK=False where every query sees every
    key. TMA: q_src, do_src are descriptors over the batch's (heads, TQ, D); else q_base, do_base point at head h.

    Queries past TQ need no mask: their lse loads as +inf, so their probabilities are exactly 0.
    """
    offs_m = start_m + offs_m0
    m_mask = offs_m < TQ
    if TMA:
        q = q_src.load([h.to(tl.int32), start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_src.load([h.to(tl.int32), start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
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
    dk, dv, k, v, Q, DO, q_src, do_src, LSE, DELTA, b, kvh, H, GROUP, start_m, n_blocks, offs_m0, offs_n, offs_d,
    d_mask, sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, TQ, D, diag, qk_scale, doc_lo, doc_hi,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
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
    for i in tl.range(0, GROUP * n_blocks, warp_specialize=WS):
        g = tl.minimum(i // blocks, GROUP - 1)
        h = kvh * GROUP + g
        bh = b * H + h
        dk, dv = _attn_bwd_dkdv_block(
            dk, dv, k, v, q_src, do_src, h, Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + bh * TQ,
            DELTA + bh * TQ, start_m + (i - g * blocks) * BLOCK_M, offs_m0, offs_n, offs_d, d_mask, sqm, sqd, sdom,
            sdod, TQ, D, diag, qk_scale, doc_lo, doc_hi, MASK, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA, BLOCK_M,
            BLOCK_D,
        )  # fmt: skip
    return dk, dv


@triton.jit
def _heads_source(base, heads, rows, D, head_stride, row_stride, TMA: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):  # fmt: skip
    """A batch's (heads x rows x D) tiles for a loop that changes head: a 3-d descriptor (TMA), else the pointer."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[heads, rows, D], strides=[head_stride, row_stride, 1],
                                         block_shape=[1, BLOCK_R, BLOCK_D])
    else:
        return base


@triton.jit(do_not_specialize=[*SIZES, "KVH"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, KVH, GROUP, TQ, TK, D, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
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
    k_src = _tile_source(K + b * skb + kvh * skh, TK, D, skn, TMA, BLOCK_N, BLOCK_D)
    v_src = _tile_source(V + b * svb + kvh * svh, TK, D, svn, TMA, BLOCK_N, BLOCK_D)
    k = _load_rows(k_src, start_n, tl.arange(0, BLOCK_N), offs_d, TK, D, skn, skd, TMA)
    v = _load_rows(v_src, start_n, tl.arange(0, BLOCK_N), offs_d, TK, D, svn, svd, TMA)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_src = _heads_source(Q + b * sqb, H, TQ, D, sqh, sqm, TMA, BLOCK_M, BLOCK_D)
    do_src = _heads_source(DO + b * sdob, H, TQ, D, sdoh, sdom, TMA, BLOCK_M, BLOCK_D)
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
    if WS:  # one warp-specialised loop, every block masked (see "WS and one loop"); documents end at `mid`
        end = mid if HAS_DOCS else TQ
        n_all = tl.maximum(tl.cdiv(tl.minimum(end, TQ) - lo, BLOCK_M), 0)
        dk, dv = _attn_bwd_dkdv_part(
            dk, dv, k, v, Q, DO, q_src, do_src, LSE, DELTA, b, kvh, H, GROUP, lo, n_all, offs_m0, offs_n, offs_d,
            d_mask, sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, TQ, D, diag, qk_scale, doc_lo, doc_hi,
            BLOCK_M, BLOCK_D, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA, True,
        )  # fmt: skip
    elif CAUSAL or HAS_DOCS:  # without either, no key block has a masked part
        n_masked = tl.maximum(tl.cdiv(tl.minimum(mid, TQ) - lo, BLOCK_M), 0)
        dk, dv = _attn_bwd_dkdv_part(
            dk, dv, k, v, Q, DO, q_src, do_src, LSE, DELTA, b, kvh, H, GROUP, lo, n_masked, offs_m0, offs_n, offs_d,
            d_mask, sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, TQ, D, diag, qk_scale, doc_lo, doc_hi,
            BLOCK_M, BLOCK_D, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA, False,
        )  # fmt: skip
    if not HAS_DOCS and not WS:
        n_full = tl.maximum(tl.cdiv(TQ - mid, BLOCK_M), 0)
        dk, dv = _attn_bwd_dkdv_part(
            dk, dv, k, v, Q, DO, q_src, do_src, LSE, DELTA, b, kvh, H, GROUP, mid, n_full, offs_m0, offs_n, offs_d,
            d_mask, sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, TQ, D, diag, qk_scale, doc_lo, doc_hi,
            BLOCK_M, BLOCK_D, False, CAUSAL, UPCAST, PRECISION, False, TMA, False,
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
    dq, q, do, lse, delta, k_src, v_src, start_n, offs_m, offs_n0, offs_d, d_mask,
    skn, skd, svn, svd, TK, D, diag, qk_scale, doc_lo, doc_hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """Add one BLOCK_N block of keys to dq; MASK=False for blocks every row sees in full."""
    offs_n = start_n + offs_n0
    n_mask = offs_n < TK
    k = _load_rows(k_src, start_n, offs_n0, offs_d, TK, D, skn, skd, TMA)
    v = _load_rows(v_src, start_n, offs_n0, offs_d, TK, D, svn, svd, TMA)
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


@triton.jit(do_not_specialize=SIZES)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC_START, DOC_END,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, GROUP, TQ, TK, D, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
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
    q_src = _tile_source(Q + b * sqb + h * sqh, TQ, D, sqm, TMA, BLOCK_M, BLOCK_D)
    do_src = _tile_source(DO + b * sdob + h * sdoh, TQ, D, sdom, TMA, BLOCK_M, BLOCK_D)
    q = _load_rows(q_src, pid_m * BLOCK_M, tl.arange(0, BLOCK_M), offs_d, TQ, D, sqm, sqd, TMA)
    do = _load_rows(do_src, pid_m * BLOCK_M, tl.arange(0, BLOCK_M), offs_d, TQ, D, sdom, sdod, TMA)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # Rows past TQ (and rows with no key) have lse = +inf: their p, and so their dq, are exactly 0.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
    k_src = _tile_source(K + b * skb + kvh * skh, TK, D, skn, TMA, BLOCK_N, BLOCK_D)
    v_src = _tile_source(V + b * svb + kvh * svh, TK, D, svn, TMA, BLOCK_N, BLOCK_D)
    diag = TK - TQ
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full, hi, doc_lo, doc_hi = _query_block_keys(
        DOC_START, DOC_END, b, pid_m, offs_m, m_mask, TQ, TK, diag, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N
    )
    if WS:  # one warp-specialised loop, every block masked (see "WS and one loop")
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            dq = _attn_bwd_dq_block(
                dq, q, do, lse, delta, k_src, v_src, start_n, offs_m, offs_n0, offs_d, d_mask, skn, skd, svn, svd, TK,
                D, diag, qk_scale, doc_lo, doc_hi, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA,
            )  # fmt: skip
    else:
        for start_n in tl.range(lo, full, BLOCK_N):
            dq = _attn_bwd_dq_block(
                dq, q, do, lse, delta, k_src, v_src, start_n, offs_m, offs_n0, offs_d, d_mask, skn, skd, svn, svd, TK,
                D, diag, qk_scale, doc_lo, doc_hi, False, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA,
            )  # fmt: skip
        for start_n in tl.range(full, hi, BLOCK_N):
            dq = _attn_bwd_dq_block(
                dq, q, do, lse, delta, k_src, v_src, start_n, offs_m, offs_n0, offs_d, d_mask, skn, skd, svn, svd, TK,
                D, diag, qk_scale, doc_lo, doc_hi, True, CAUSAL, UPCAST, PRECISION, HAS_DOCS, TMA,
            )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )
