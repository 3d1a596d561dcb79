"""Fused RMSNorm over the last dimension: Triton kernels, host launchers, autograd Function.

Both kernels walk steps of ROWS whole rows held in registers (width padded to a power of two); program p takes
steps p, p + programs, ... (a persistent grid of one or two programs per SM, or one program per step in the
forward), and with PREFETCH loads its next step's rows before this step's arithmetic. The forward keeps rstd in
fp32. The backward writes dx and keeps fp32 sums of dy * xhat per column in registers; each program writes its sums
once, as one row of a partial buffer that is summed afterwards in a fixed order (no atomics), so dw is deterministic.
Rows wider than NORM_SPLIT_WIDTH take two programs per row (SPLIT), each owning half of the columns: it reads the
whole row for the row's reduction and writes dx and the sums of its half. The candidate configs
(`_common.norm_configs`) are autotuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels import _common

INTERPRET = _common.interpreting()  # as triton.jit decided at this import


@triton.jit
def _rows_tile(PTR, rows, cols, M, N, stride):
    """(rows x cols) of a row-major matrix in its own dtype, zero outside M x N."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return tl.load(PTR + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit(do_not_specialize=["M"])  # row counts vary; recompiling per value gains nothing
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, M, N, stride_x, stride_y, eps,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PER_SM: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if PREFETCH:
        x_next = _rows_tile(X, pid * ROWS + tl.arange(0, ROWS), cols, M, N, stride_x)
    for start in tl.range(pid * ROWS, M, step):
        rows = start + tl.arange(0, ROWS)
        if PREFETCH:  # this step's rows came with the last one; ask for the next step's now
            x_raw = x_next
            x_next = _rows_tile(X, rows + step, cols, M, N, stride_x)
        else:
            x_raw = _rows_tile(X, rows, cols, M, N, stride_x)
        x = x_raw.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * rstd[:, None] * w[None, :]
        mask = (rows < M)[:, None] & cmask[None, :]
        tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _rms_norm_bwd_rows(X, DY, RSTD, W, rows, own, other, M, N, stride_x, stride_dy, SPLIT: tl.constexpr):
    """One step's inputs: x and dy over the owned columns in their own dtypes, rstd, and (SPLIT) the other half's
    share of each row's sum of xhat * w * dy, reduced as soon as it is loaded so that half holds no registers."""
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    s_other = tl.zeros_like(rstd)
    if SPLIT:
        w_o = tl.load(W + other, mask=other < N, other=0.0).to(tl.float32)
        xhat_o = _rows_tile(X, rows, other, M, N, stride_x).to(tl.float32) * rstd[:, None]
        wdy_o = w_o[None, :] * _rows_tile(DY, rows, other, M, N, stride_dy).to(tl.float32)
        s_other = tl.sum(xhat_o * wdy_o, axis=1)  # as the owning program computes it
    x = _rows_tile(X, rows, own, M, N, stride_x)
    dy = _rows_tile(DY, rows, own, M, N, stride_dy)
    return x, dy, rstd, s_other


@triton.jit(do_not_specialize=["M"])
def _rms_norm_bwd_kernel(
    X, W, DY, DX, RSTD, DW_PART, M, N, stride_x, stride_dy, stride_dx,
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
    if PREFETCH:
        x_n, dy_n, rstd_n, so_n = _rms_norm_bwd_rows(
            X, DY, RSTD, W, pid * ROWS + tl.arange(0, ROWS), own, other, M, N, stride_x, stride_dy, SPLIT)
    for start in tl.range(pid * ROWS, M, step):
        rows = start + tl.arange(0, ROWS)
        if PREFETCH:  # this step's rows came with the last one; ask for the next step's now
            x, dy, rstd, s_other = x_n, dy_n, rstd_n, so_n
            x_n, dy_n, rstd_n, so_n = _rms_norm_bwd_rows(
                X, DY, RSTD, W, rows + step, own, other, M, N, stride_x, stride_dy, SPLIT)
        else:
            x, dy, rstd, s_other = _rms_norm_bwd_rows(X, DY, RSTD, W, rows, own, other, M, N, stride_x, stride_dy,
                                                      SPLIT)
        xhat = x.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        wdy = w[None, :] * dy
        # SPLIT: plus the other half's share; s + t == t + s exactly, so both programs of a row get the same c1.
        c1 = (s_other + tl.sum(xhat * wdy, axis=1)) / N
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        mask = (rows < M)[:, None] & (own < N)[None, :]
        tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + own[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(DW_PART + pid * N + own, tl.sum(dw_acc, axis=0), mask=own < N)


_tuned: dict[tuple, object] = {}


def _kernel(fn, n: int, backward: bool):  # noqa: ANN001, ANN202
    """The autotuned launcher of `fn` for width n's candidates (`_common.norm_configs`), built once per bucket."""
    return _common.norm_autotuner(_tuned, fn, n, INTERPRET, backward)


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on a (M, N) row-major view. Returns y and rstd (fp32)."""
    m, n = x2.shape
    y = _common.empty((m, n), x2.dtype, x2.device)
    rstd = _common.empty((m,), torch.float32, x2.device)
    if m == 0:
        return y, rstd
    _common.launch(_kernel(_rms_norm_fwd_kernel, n, False), _common.norm_grid(m, x2.device),
                   x2, weight, y, rstd, m, n, x2.stride(0), y.stride(0), eps)
    _common.count("rms_norm_fwd")
    return y, rstd


def rms_norm_bwd(
    dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns dx and dw (in the weight's dtype)."""
    m, n = x2.shape
    dx = _common.empty((m, n), x2.dtype, x2.device)
    configs = _common.norm_configs(n, INTERPRET, backward=True)
    dw_part = _common.norm_partials(m, n, x2.device, configs)
    if m > 0:
        _common.launch(_kernel(_rms_norm_bwd_kernel, n, True), _common.norm_grid(m, x2.device, configs[0].split),
                       x2, weight, dy2, dx, rstd, dw_part, m, n, x2.stride(0), dy2.stride(0), dx.stride(0))
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
