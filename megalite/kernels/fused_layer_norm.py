"""Fused LayerNorm over the last dimension: Triton kernels, host launchers, autograd Function.

Forward: each program normalises BLOCK_M whole rows held in registers (two-pass mean/variance
in fp32, so large-magnitude inputs do not lose precision), writing y, mean and rstd.
Backward: each program walks a contiguous range of rows, writes dx and keeps fp32 running
sums of dy*xhat and dy in registers; the per-program partials are summed afterwards in a
fixed order (no atomics), so dw and db are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels import _common

MAX_WIDTH = _common.MAX_NORM_WIDTH
INTERPRET = _common.interpreting()  # as triton.jit decided at this import


@triton.jit(do_not_specialize=["M"])  # row counts vary; recompiling per value gains nothing
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, N, stride_x, stride_y, eps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])  # row counts vary; recompiling per value gains nothing
def _layer_norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART,
    M, N, stride_x, stride_dy, stride_dx, rows_per_prog,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


@triton.jit
def _layer_norm_bwd_part(x_row, dy_row, W, cols, N, mean, rstd):
    """x-hat, w*dy and dy (fp32, zero past the row's end) of one row over the columns `cols`."""
    cmask = cols < N
    x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
    dy = tl.load(dy_row + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
    return xhat, w * dy, dy


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _layer_norm_bwd_split_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART,
    M, N, stride_x, stride_dy, stride_dx, rows_per_prog,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The backward for rows wider than one register tile, grid (programs, 2): program (p, h) walks the rows
    of range p, reads both halves of each row for the row's two reductions, and writes dx and keeps the
    weight-gradient sums for half h only (sums for the whole width would fill half the register file)."""
    pid = tl.program_id(0)
    half = tl.program_id(1)
    own = half * BLOCK_N + tl.arange(0, BLOCK_N)
    other = (1 - half) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, M - row_start)):
        row = row_start + i
        x_row = X + row * stride_x
        dy_row = DY + row * stride_dy
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat, wdy, _ = _layer_norm_bwd_part(x_row, dy_row, W, other, N, mean, rstd)
        s1 = tl.sum(xhat * wdy, axis=0)
        s2 = tl.sum(wdy, axis=0)
        xhat, wdy, dy = _layer_norm_bwd_part(x_row, dy_row, W, own, N, mean, rstd)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        # s + t == t + s exactly, so both programs of a row compute the same c1, c2.
        c1 = (s1 + tl.sum(xhat * wdy, axis=0)) / N
        c2 = (s2 + tl.sum(wdy, axis=0)) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + own, dx.to(DX.dtype.element_ty), mask=own < N)
    tl.store(DW_PART + pid * N + own, dw, mask=own < N)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + own, db, mask=own < N)


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
    tiles = _common.norm_tiles(n, INTERPRET)
    _common.launch(_layer_norm_fwd_kernel, (triton.cdiv(m, tiles.block_m),),
        x2, weight, bias if bias is not None else weight, y, mean, rstd,
        m, n, x2.stride(0), y.stride(0), eps,
        HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
    )  # fmt: skip
    _common.count("layer_norm_fwd")
    return y, mean, rstd


def layer_norm_bwd(
    dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, has_bias: bool, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward. Returns dx, dw and db (None without bias), dw/db in the weight's dtype."""
    m, n = x2.shape
    dx = _common.empty((m, n), x2.dtype, x2.device)
    tiles = _common.norm_tiles(n, INTERPRET, backward=True)
    # Enough programs to fill the GPU, each with a contiguous row range and one fp32 partial row.
    progs = max(1, min(triton.cdiv(m, tiles.block_m), 4 * _common.num_sms(x2.device)))
    rows_per_prog = triton.cdiv(max(m, 1), progs)
    rows_per_prog = triton.cdiv(rows_per_prog, tiles.block_m) * tiles.block_m
    progs = max(1, triton.cdiv(m, rows_per_prog))
    dw_part = _common.empty((progs, n), torch.float32, x2.device)
    db_part = _common.empty((progs, n), torch.float32, x2.device) if has_bias else dw_part
    if m == 0:
        dw_part.zero_()
        db_part.zero_()
    else:
        args = (x2, weight, dy2, dx, mean, rstd, dw_part, db_part, m, n, x2.stride(0), dy2.stride(0), dx.stride(0),
                rows_per_prog)
        if tiles.split:
            _common.launch(_layer_norm_bwd_split_kernel, (progs, 2), *args,
                HAS_BIAS=has_bias, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
            )  # fmt: skip
        else:
            _common.launch(_layer_norm_bwd_kernel, (progs,), *args,
                HAS_BIAS=has_bias, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
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
