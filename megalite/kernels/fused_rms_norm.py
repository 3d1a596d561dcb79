"""Fused RMSNorm over the last dimension: Triton kernels, host launchers, autograd Function.

Same structure as fused_layer_norm.py without the mean and the bias: the forward keeps rstd in fp32;
the backward writes dx and fp32 per-program partials of dy*xhat, summed afterwards in a fixed
order (no atomics), so dw is deterministic; rows wider than 8192 take the split backward (two programs per row range, one per half).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels import _common

INTERPRET = _common.interpreting()  # as triton.jit decided at this import


@triton.jit(do_not_specialize=["M"])  # row counts vary; recompiling per value gains nothing
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    M, N, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])  # row counts vary; recompiling per value gains nothing
def _rms_norm_bwd_kernel(
    X, W, DY, DX, RSTD, DW_PART,
    M, N, stride_x, stride_dy, stride_dx, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)


@triton.jit
def _rms_norm_bwd_part(x_row, dy_row, W, cols, N, rstd):
    """x-hat, w*dy and dy (fp32, zero past the row's end) of one row over the columns `cols`."""
    cmask = cols < N
    x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
    dy = tl.load(dy_row + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    return x * rstd, w * dy, dy


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _rms_norm_bwd_split_kernel(
    X, W, DY, DX, RSTD, DW_PART,
    M, N, stride_x, stride_dy, stride_dx, rows_per_prog,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The backward for rows wider than one register tile, grid (programs, 2), as fused_layer_norm's: program
    (p, h) reads whole rows for the reduction and writes dx and the weight-gradient sums of half h."""
    pid = tl.program_id(0)
    half = tl.program_id(1)
    own = half * BLOCK_N + tl.arange(0, BLOCK_N)
    other = (1 - half) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, M - row_start)):
        row = row_start + i
        x_row = X + row * stride_x
        dy_row = DY + row * stride_dy
        rstd = tl.load(RSTD + row)
        xhat, wdy, _ = _rms_norm_bwd_part(x_row, dy_row, W, other, N, rstd)
        s1 = tl.sum(xhat * wdy, axis=0)
        xhat, wdy, dy = _rms_norm_bwd_part(x_row, dy_row, W, own, N, rstd)
        dw += dy * xhat
        c1 = (s1 + tl.sum(xhat * wdy, axis=0)) / N  # the same in both programs of a row: s + t == t + s
        dx = (wdy - xhat * c1) * rstd
        tl.store(DX + row * stride_dx + own, dx.to(DX.dtype.element_ty), mask=own < N)
    tl.store(DW_PART + pid * N + own, dw, mask=own < N)


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on a (M, N) row-major view. Returns y and rstd (fp32)."""
    m, n = x2.shape
    y = _common.empty((m, n), x2.dtype, x2.device)
    rstd = _common.empty((m,), torch.float32, x2.device)
    if m == 0:
        return y, rstd
    tiles = _common.norm_tiles(n, INTERPRET)
    _common.launch(_rms_norm_fwd_kernel, (triton.cdiv(m, tiles.block_m),),
        x2, weight, y, rstd, m, n, x2.stride(0), y.stride(0), eps,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
    )  # fmt: skip
    _common.count("rms_norm_fwd")
    return y, rstd


def rms_norm_bwd(
    dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns dx and dw (in the weight's dtype)."""
    m, n = x2.shape
    dx = _common.empty((m, n), x2.dtype, x2.device)
    tiles = _common.norm_tiles(n, INTERPRET, backward=True)
    progs = max(1, min(triton.cdiv(m, tiles.block_m), 4 * _common.num_sms(x2.device)))
    rows_per_prog = triton.cdiv(triton.cdiv(max(m, 1), progs), tiles.block_m) * tiles.block_m
    progs = max(1, triton.cdiv(m, rows_per_prog))
    dw_part = _common.empty((progs, n), torch.float32, x2.device)
    if m == 0:
        dw_part.zero_()
    else:
        args = (x2, weight, dy2, dx, rstd, dw_part, m, n, x2.stride(0), dy2.stride(0), dx.stride(0), rows_per_prog)
        if tiles.split:
            _common.launch(_rms_norm_bwd_split_kernel, (progs, 2), *args, BLOCK_N=tiles.block_n,
                           num_warps=tiles.num_warps)
        else:
            _common.launch(_rms_norm_bwd_kernel, (progs,), *args,
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
            )  # fmt: skip
        _common.count("rms_norm_bwd")
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with the Triton forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
        x2 = _common.rows(x)
        weight = weight.contiguous()
        y, rstd = rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(_common.rows(dy), x2, weight, rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton RMSNorm over the last dimension (differentiable)."""
    return RMSNormFunction.apply(x, weight, eps)
