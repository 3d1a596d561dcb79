"""Fused LayerNorm over the last dimension: Triton kernels, host launchers, autograd Function.

The same structure as fused_rms_norm.py (steps of ROWS rows, a persistent grid or a program per step, PREFETCH of
the next step, SPLIT halves for rows wider than NORM_SPLIT_WIDTH, autotuned candidates), with the mean and the bias.
Mean and variance are two-pass in fp32 (`var = mean((x - mean)^2)`), so large offsets do not cancel; mean and rstd
(fp32) are saved for the backward, which writes dx and keeps fp32 sums of dy * xhat and dy per column, written once
per program as rows of partial buffers summed afterwards in a fixed order (no atomics): dw and db are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels import _common

MAX_WIDTH = _common.MAX_NORM_WIDTH
INTERPRET = _common.interpreting()  # as triton.jit decided at this import


@triton.jit
def _rows_tile(PTR, rows, cols, M, N, stride):
    """(rows x cols) of a row-major matrix in its own dtype, zero outside M x N."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return tl.load(PTR + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit(do_not_specialize=["M"])  # row counts vary; recompiling per value gains nothing
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD, M, N, stride_x, stride_y, eps,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PER_SM: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = w
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    if PREFETCH:
        x_next = _rows_tile(X, pid * ROWS + tl.arange(0, ROWS), cols, M, N, stride_x)
    for start in tl.range(pid * ROWS, M, step):
        rows = start + tl.arange(0, ROWS)
        if PREFETCH:  # this step's rows came with the last one; ask for the next step's now
            x_raw = x_next
            x_next = _rows_tile(X, rows + step, cols, M, N, stride_x)
        else:
            x_raw = _rows_tile(X, rows, cols, M, N, stride_x)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = x_raw.to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += b[None, :]
        tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _layer_norm_bwd_rows(X, DY, MEAN, RSTD, W, rows, own, other, M, N, stride_x, stride_dy, SPLIT: tl.constexpr):
    """One step's inputs: x and dy over the owned columns in their own dtypes, mean, rstd, and (SPLIT) the other
    half's shares of each row's sums of xhat * w * dy and w * dy, reduced as soon as they are loaded so that half
    holds no registers."""
    mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    s1_other = tl.zeros_like(rstd)
    s2_other = tl.zeros_like(rstd)
    if SPLIT:
        w_o = tl.load(W + other, mask=other < N, other=0.0).to(tl.float32)
        mask_o = (rows < M)[:, None] & (other < N)[None, :]
        x_o = _rows_tile(X, rows, other, M, N, stride_x).to(tl.float32)
        xhat_o = tl.where(mask_o, (x_o - mean[:, None]) * rstd[:, None], 0.0)
        wdy_o = w_o[None, :] * _rows_tile(DY, rows, other, M, N, stride_dy).to(tl.float32)
        s1_other = tl.sum(xhat_o * wdy_o, axis=1)
        s2_other = tl.sum(wdy_o, axis=1)
    x = _rows_tile(X, rows, own, M, N, stride_x)
    dy = _rows_tile(DY, rows, own, M, N, stride_dy)
    return x, dy, mean, rstd, s1_other, s2_other


@triton.jit(do_not_specialize=["M"])
def _layer_norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART, M, N, stride_x, stride_dy, stride_dx,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PER_SM: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Grid (programs,) or, SPLIT, (programs, 2): program (p, h) owns column half h."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    half = tl.program_id(1)
    own = half * BLOCK_N + tl.arange(0, BLOCK_N)
    other = (1 - half) * BLOCK_N + tl.arange(0, BLOCK_N)  # unused unless SPLIT
    w = tl.load(W + own, mask=own < N, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        x_n, dy_n, mean_n, rstd_n, s1_n, s2_n = _layer_norm_bwd_rows(
            X, DY, MEAN, RSTD, W, pid * ROWS + tl.arange(0, ROWS), own, other, M, N, stride_x, stride_dy, SPLIT)
    for start in tl.range(pid * ROWS, M, step):
        rows = start + tl.arange(0, ROWS)
        if PREFETCH:  # this step's rows came with the last one; ask for the next step's now
            x, dy, mean, rstd, s1, s2 = x_n, dy_n, mean_n, rstd_n, s1_n, s2_n
            x_n, dy_n, mean_n, rstd_n, s1_n, s2_n = _layer_norm_bwd_rows(
                X, DY, MEAN, RSTD, W, rows + step, own, other, M, N, stride_x, stride_dy, SPLIT)
        else:
            x, dy, mean, rstd, s1, s2 = _layer_norm_bwd_rows(
                X, DY, MEAN, RSTD, W, rows, own, other, M, N, stride_x, stride_dy, SPLIT)
        mask = (rows < M)[:, None] & (own < N)[None, :]
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        dy = dy.to(tl.float32)
        wdy = w[None, :] * dy
        # SPLIT: plus the other half's shares; s + t == t + s exactly, so both programs of a row get the same c1, c2.
        c1 = (s1 + tl.sum(xhat * wdy, axis=1)) / N
        c2 = (s2 + tl.sum(wdy, axis=1)) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + own[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_PART + pid * N + own, tl.sum(dw_acc, axis=0), mask=own < N)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + own, tl.sum(db_acc, axis=0), mask=own < N)


_tuned: dict[tuple, object] = {}


def _kernel(fn, n: int, backward: bool):  # noqa: ANN001, ANN202
    """The autotuned launcher of `fn` for width n's candidates (`_common.norm_configs`), built once per bucket."""
    return _common.norm_autotuner(_tuned, fn, n, INTERPRET, backward)


def layer_norm_fwd(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on a (M, N) row-major view. Returns y, mean, rstd (fp32)."""
    m, n = x2.shape
    y = _common.empty((m, n), x2.dtype, x2.device)
    mean = _common.empty((m,), torch.float32, x2.device)
    rstd = _common.empty((m,), torch.float32, x2.device)
    if m == 0:
        return y, mean, rstd
    _common.launch(_kernel(_layer_norm_fwd_kernel, n, False), _common.norm_grid(m, x2.device),
        x2, weight, bias if bias is not None else weight, y, mean, rstd, m, n, x2.stride(0), y.stride(0), eps,
        HAS_BIAS=bias is not None,
    )  # fmt: skip
    _common.count("layer_norm_fwd")
    return y, mean, rstd


def layer_norm_bwd(
    dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, has_bias: bool, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward. Returns dx, dw and db (None without bias), dw/db in the weight's dtype."""
    m, n = x2.shape
    dx = _common.empty((m, n), x2.dtype, x2.device)
    configs = _common.norm_configs(n, INTERPRET, backward=True)
    dw_part = _common.norm_partials(m, n, x2.device, configs)
    db_part = _common.norm_partials(m, n, x2.device, configs) if has_bias else dw_part
    if m > 0:
        _common.launch(_kernel(_layer_norm_bwd_kernel, n, True), _common.norm_grid(m, x2.device, configs[0].split),
            x2, weight, dy2, dx, mean, rstd, dw_part, db_part, m, n, x2.stride(0), dy2.stride(0), dx.stride(0),
            HAS_BIAS=has_bias,
        )  # fmt: skip
        _common.count("layer_norm_bwd")
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm with the Triton forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # type: ignore[override]
        if weight.shape != (x.shape[-1],) or (bias is not None and bias.shape != weight.shape):
            raise ValueError(f"layer_norm: weight/bias must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
        x2 = _common.rows(x)
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y, mean, rstd = layer_norm_fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(_common.rows(dy), x2, weight, ctx.has_bias, mean, rstd)
        return dx.view(dy.shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Triton LayerNorm over the last dimension (differentiable)."""
    return LayerNormFunction.apply(x, weight, bias, eps)
