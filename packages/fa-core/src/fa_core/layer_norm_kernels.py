"""Triton kernels for the fused dropout + residual + LayerNorm / RMSNorm, and their launchers.

Every tensor handed to a launcher is 2-D ``(M, N)`` (rows, hidden) with a unit last stride, or a 1-D ``(N,)``
parameter / ``(M,)`` per-row vector; allocation, shape checks and autograd live in :mod:`fa_core.layer_norm`.

Forward, one program per row. The pre-norm value of a row is

    x = dropout(x0 * rowscale) + dropout1(x1) + residual

computed in fp32 and, when ``RES_OUT`` is given, stored (rounded to its dtype) for the backward pass and for
``prenorm``. The row is normalized with its fp32 ``mean`` (LayerNorm only) and ``rstd``, both stored as fp32
``(M,)`` vectors, then ``y = xhat * w + b`` (and ``y1 = xhat * w1 + b1`` for the second weight).

Dropout keeps column ``c`` of row ``r`` where ``rand(seeds[r], c) > p`` (``seeds[M + r]`` for ``x1``), so the
backward pass regenerates the masks from the ``(M,)`` / ``(2 * M,)`` int64 seeds instead of storing them; the
bool masks are only written when asked for.

Rows of up to :data:`MAX_BLOCK_N` columns are held in registers (one block). Longer rows loop over column
blocks: the forward recomputes the pre-norm block per pass (mean, variance, output; RMSNorm skips the mean), the
backward first stores each row's two reduction coefficients to an fp32 ``(M, 2)`` scratch, then walks column
blocks with the weight-gradient accumulators of that block in registers. Either way the backward writes fp32
per-program partial sums ``(programs, N)`` of ``dw`` / ``db`` / ``dw1`` / ``db1``, summed on the host.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from fa_core.forward_configs import cdiv, next_pow2

__all__ = ["MAX_BLOCK_N", "bwd_programs", "col_block", "norm_bwd_launch", "norm_fwd_launch"]

MAX_BLOCK_N = 8192
"""Columns one program holds in registers; longer rows loop over blocks of this many columns."""


def col_block(n: int) -> tuple[int, bool, int]:
    """``(BLOCK_N, single_block, num_warps)`` for rows of ``n`` columns."""
    block = min(next_pow2(max(n, 1)), MAX_BLOCK_N)
    num_warps = min(max(block // 512, 1), 16)
    return block, n <= block, num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def bwd_programs(m: int, device: torch.device) -> tuple[int, int]:
    """``(programs, rows_per_program)`` of the backward grid: about 8 programs per SM on a GPU (each owns a
    contiguous run of rows and one row of the partial weight-gradient sums), never more than ``m``."""
    if m <= 0:
        return 1, 1
    if device.type == "cuda":
        target = 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    rows = cdiv(m, max(min(target, m), 1))
    return cdiv(m, rows), rows


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device.index) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- forward


@triton.jit
def _prenorm_block(
    X,
    X1,
    RES,
    ROWSCALE,
    SEEDS,
    row,
    M,
    cols,
    cmask,
    dropout_p,
    HAS_X1: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """fp32 pre-norm values of columns ``cols`` of a row (0 outside ``cmask``), with the two keep masks
    (``cmask`` when there is no dropout). ``X``, ``X1``, ``RES`` point at the row's first element."""
    x = tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32)
    keep = cmask
    keep1 = cmask
    if HAS_ROWSCALE:
        x = x * tl.load(ROWSCALE + row).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(SEEDS + row), cols) > dropout_p
        x = tl.where(keep, x / (1.0 - dropout_p), 0.0)
    if HAS_X1:
        x1 = tl.load(X1 + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep1 = tl.rand(tl.load(SEEDS + M + row), cols) > dropout_p
            x1 = tl.where(keep1, x1 / (1.0 - dropout_p), 0.0)
        x += x1
    if HAS_RES:
        x += tl.load(RES + cols, mask=cmask, other=0.0).to(tl.float32)
    return tl.where(cmask, x, 0.0), keep, keep1


@triton.jit
def _affine_store(xhat, W, B, Y, cols, cmask, ZERO_CENTERED: tl.constexpr, HAS_B: tl.constexpr):
    """Store ``xhat * w (+ b)`` (``w + 1`` for zero-centered weights) at ``Y + cols``."""
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    y = xhat * w
    if HAS_B:
        y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + cols, y, mask=cmask)


@triton.jit
def _fwd_outputs(
    x,
    keep,
    keep1,
    mean,
    rstd,
    row64,
    N,
    cols,
    cmask,
    W,
    B,
    W1,
    B1,
    Y,
    Y1,
    RES_OUT,
    MASK,
    MASK1,
    ZERO_CENTERED: tl.constexpr,
    HAS_X1: tl.constexpr,
    STORE_MASK: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    STORE_RES_OUT: tl.constexpr,
):
    """Every store of one column block of a row, once its ``mean`` / ``rstd`` are known."""
    if STORE_MASK:
        tl.store(MASK + row64 * N + cols, keep, mask=cmask)
        if HAS_X1:
            tl.store(MASK1 + row64 * N + cols, keep1, mask=cmask)
    if STORE_RES_OUT:
        tl.store(RES_OUT + cols, x, mask=cmask)
    xhat = (x - mean) * rstd
    _affine_store(xhat, W, B, Y, cols, cmask, ZERO_CENTERED, HAS_B)
    if HAS_W1:
        _affine_store(xhat, W1, B1, Y1, cols, cmask, ZERO_CENTERED, HAS_B1)


@triton.jit
def norm_fwd_kernel(
    X,
    X1,
    RES,
    ROWSCALE,
    SEEDS,
    W,
    B,
    W1,
    B1,
    Y,
    Y1,
    RES_OUT,
    MASK,
    MASK1,
    MEAN,
    RSTD,
    stride_x,
    stride_x1,
    stride_res,
    stride_y,
    stride_y1,
    stride_res_out,
    M,
    N,
    eps,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    HAS_X1: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_MASK: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    STORE_RES_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    X += row64 * stride_x
    X1 += row64 * stride_x1
    RES += row64 * stride_res
    Y += row64 * stride_y
    Y1 += row64 * stride_y1
    RES_OUT += row64 * stride_res_out
    offs = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        cmask = offs < N
        x, keep, keep1 = _prenorm_block(
            X,
            X1,
            RES,
            ROWSCALE,
            SEEDS,
            row,
            M,
            offs,
            cmask,
            dropout_p,
            HAS_X1,
            HAS_RES,
            HAS_ROWSCALE,
            HAS_DROPOUT,
        )
        if IS_RMS_NORM:
            mean = 0.0
            var = tl.sum(x * x, axis=0) / N
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(cmask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        _fwd_outputs(
            x, keep, keep1, mean, rstd, row64, N, offs, cmask, W, B, W1, B1, Y, Y1, RES_OUT, MASK, MASK1,
            ZERO_CENTERED, HAS_X1, STORE_MASK, HAS_B, HAS_W1, HAS_B1, STORE_RES_OUT,
        )  # fmt: skip
    else:
        if IS_RMS_NORM:
            mean = 0.0
        else:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                x, keep, keep1 = _prenorm_block(
                    X, X1, RES, ROWSCALE, SEEDS, row, M, cols, cols < N, dropout_p,
                    HAS_X1, HAS_RES, HAS_ROWSCALE, HAS_DROPOUT,
                )  # fmt: skip
                acc += x
            mean = tl.sum(acc, axis=0) / N
        acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            cmask = cols < N
            x, keep, keep1 = _prenorm_block(
                X,
                X1,
                RES,
                ROWSCALE,
                SEEDS,
                row,
                M,
                cols,
                cmask,
                dropout_p,
                HAS_X1,
                HAS_RES,
                HAS_ROWSCALE,
                HAS_DROPOUT,
            )
            xc = tl.where(cmask, x - mean, 0.0)
            acc2 += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            cmask = cols < N
            x, keep, keep1 = _prenorm_block(
                X,
                X1,
                RES,
                ROWSCALE,
                SEEDS,
                row,
                M,
                cols,
                cmask,
                dropout_p,
                HAS_X1,
                HAS_RES,
                HAS_ROWSCALE,
                HAS_DROPOUT,
            )
            _fwd_outputs(
                x, keep, keep1, mean, rstd, row64, N, cols, cmask, W, B, W1, B1, Y, Y1, RES_OUT, MASK, MASK1,
                ZERO_CENTERED, HAS_X1, STORE_MASK, HAS_B, HAS_W1, HAS_B1, STORE_RES_OUT,
            )  # fmt: skip
    if not IS_RMS_NORM:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


def _or_dummy(first: torch.Tensor, *rest: torch.Tensor | None) -> list[torch.Tensor]:
    """Kernel pointer arguments with absent tensors replaced by ``first``: the kernels offset every pointer by
    its row but only dereference those their constexpr flags enable."""
    return [first, *(t if t is not None else first for t in rest)]


def _stride0(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def norm_fwd_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    eps: float,
    residual: torch.Tensor | None = None,
    x1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    bias1: torch.Tensor | None = None,
    y1: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_mask1: torch.Tensor | None = None,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
) -> None:
    """Launch :func:`norm_fwd_kernel` (no checks, no allocation).

    x, x1, residual, y, y1, residual_out: (M, N), unit last stride. weight, bias, weight1, bias1: (N,)
    contiguous. rowscale: (M,). seeds: int64 (M,), (2 * M,) with ``x1``, when ``dropout_p > 0``.
    dropout_mask, dropout_mask1: bool (M, N) contiguous or None. mean (None for RMSNorm), rstd: fp32 (M,).
    """
    m, n = x.shape
    if m == 0 or n == 0:
        return
    block, single, num_warps = col_block(n)
    with _on_device(x):
        norm_fwd_kernel[(m,)](
            *_or_dummy(x, x1, residual, rowscale, seeds, weight, bias, weight1, bias1,
                       y, y1, residual_out, dropout_mask, dropout_mask1, mean, rstd),
            x.stride(0), _stride0(x1), _stride0(residual), y.stride(0), _stride0(y1), _stride0(residual_out),
            m, n, eps, dropout_p,
            IS_RMS_NORM=is_rms_norm,
            ZERO_CENTERED=zero_centered_weight,
            HAS_X1=x1 is not None,
            HAS_RES=residual is not None,
            HAS_ROWSCALE=rowscale is not None,
            HAS_DROPOUT=dropout_p > 0.0,
            STORE_MASK=dropout_mask is not None,
            HAS_B=bias is not None,
            HAS_W1=weight1 is not None,
            HAS_B1=bias1 is not None,
            STORE_RES_OUT=residual_out is not None,
            BLOCK_N=block,
            SINGLE_BLOCK=single,
            num_warps=num_warps,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_load(X, DY, DY1, W, W1, cols, cmask, mean, rstd, ZERO_CENTERED: tl.constexpr, HAS_W1: tl.constexpr):
    """``(xhat, dy, dy1, wdy)`` in fp32 for a column block of a row; ``wdy = w * dy (+ w1 * dy1)`` is the
    gradient with respect to ``xhat``. ``dy1`` is ``dy`` when there is no second weight (unused)."""
    x = tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32)
    xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
    dy = tl.load(DY + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    wdy = w * dy
    dy1 = dy
    if HAS_W1:
        dy1 = tl.load(DY1 + cols, mask=cmask, other=0.0).to(tl.float32)
        w1 = tl.load(W1 + cols, mask=cmask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w1 += 1.0
        wdy += w1 * dy1
    return xhat, dy, dy1, wdy


@triton.jit
def _bwd_store(
    dx,
    xhat,
    row,
    M,
    cols,
    cmask,
    W,
    B,
    Y,
    DRES,
    DRES_IN,
    DX1,
    DX,
    ROWSCALE,
    SEEDS,
    dropout_p,
    ZERO_CENTERED: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DRES: tl.constexpr,
    STORE_DRES_IN: tl.constexpr,
    STORE_DX1: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    RECOMPUTE_Y: tl.constexpr,
):
    """Store the input gradients of a column block from ``dx`` (the gradient of the pre-norm value, before
    the prenorm output's own gradient is added); optionally the recomputed normalized output."""
    if RECOMPUTE_Y:
        _affine_store(xhat, W, B, Y, cols, cmask, ZERO_CENTERED, HAS_B)
    if HAS_DRES:
        dx += tl.load(DRES + cols, mask=cmask, other=0.0).to(tl.float32)
    if STORE_DRES_IN:
        tl.store(DRES_IN + cols, dx, mask=cmask)
    if STORE_DX1:
        keep1 = tl.rand(tl.load(SEEDS + M + row), cols) > dropout_p
        tl.store(DX1 + cols, tl.where(keep1, dx / (1.0 - dropout_p), 0.0), mask=cmask)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(SEEDS + row), cols) > dropout_p
        dx = tl.where(keep, dx / (1.0 - dropout_p), 0.0)
    if HAS_ROWSCALE:
        dx *= tl.load(ROWSCALE + row).to(tl.float32)
    tl.store(DX + cols, dx, mask=cmask)


@triton.jit
def norm_bwd_kernel(
    X,
    W,
    B,
    W1,
    DY,
    DY1,
    DRES,
    DX,
    DRES_IN,
    DX1,
    Y,
    ROWSCALE,
    SEEDS,
    MEAN,
    RSTD,
    COEF,
    DW,
    DB,
    DW1,
    DB1,
    stride_x,
    stride_dy,
    stride_dy1,
    stride_dres,
    stride_dx,
    stride_dres_in,
    stride_dx1,
    stride_y,
    M,
    N,
    rows_per_program,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_DRES: tl.constexpr,
    STORE_DRES_IN: tl.constexpr,
    STORE_DX1: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    RECOMPUTE_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(M - row_start, rows_per_program)
    offs = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N  # this program's row of the partial weight-gradient sums
    if SINGLE_BLOCK:
        cmask = offs < N
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dw1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(0, n_rows):
            row = row_start + i
            mean = 0.0
            if not IS_RMS_NORM:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat, dy, dy1, wdy = _bwd_load(
                X + row * stride_x, DY + row * stride_dy, DY1 + row * stride_dy1, W, W1, offs, cmask, mean, rstd,
                ZERO_CENTERED, HAS_W1,
            )  # fmt: skip
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS_NORM:
                dx = (wdy - xhat * c1) * rstd
            else:
                dx = (wdy - xhat * c1 - tl.sum(wdy, axis=0) / N) * rstd
            _bwd_store(
                dx, xhat, row, M, offs, cmask, W, B, Y + row * stride_y, DRES + row * stride_dres,
                DRES_IN + row * stride_dres_in, DX1 + row * stride_dx1, DX + row * stride_dx, ROWSCALE, SEEDS,
                dropout_p, ZERO_CENTERED, HAS_B, HAS_DRES, STORE_DRES_IN, STORE_DX1, HAS_DROPOUT, HAS_ROWSCALE,
                RECOMPUTE_Y,
            )  # fmt: skip
            dw += dy * xhat
            db += dy
            if HAS_W1:
                dw1 += dy1 * xhat
                db1 += dy1
        tl.store(DW + part + offs, dw, mask=cmask)
        if HAS_B:
            tl.store(DB + part + offs, db, mask=cmask)
        if HAS_W1:
            tl.store(DW1 + part + offs, dw1, mask=cmask)
            if HAS_B1:
                tl.store(DB1 + part + offs, db1, mask=cmask)
    else:
        # pass 1: the two row reductions of dx, to the (M, 2) scratch
        for i in range(0, n_rows):
            row = row_start + i
            mean = 0.0
            if not IS_RMS_NORM:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                xhat, dy, dy1, wdy = _bwd_load(
                    X + row * stride_x, DY + row * stride_dy, DY1 + row * stride_dy1, W, W1, cols, cols < N,
                    mean, rstd, ZERO_CENTERED, HAS_W1,
                )  # fmt: skip
                s1 += xhat * wdy
                s2 += wdy
            tl.store(COEF + 2 * row, tl.sum(s1, axis=0) / N)
            tl.store(COEF + 2 * row + 1, tl.sum(s2, axis=0) / N)
        tl.debug_barrier()
        # pass 2: column block by column block, rows inside (weight-gradient sums stay in registers)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            cmask = cols < N
            dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
            db = tl.zeros((BLOCK_N,), dtype=tl.float32)
            dw1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            db1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for i in range(0, n_rows):
                row = row_start + i
                mean = 0.0
                if not IS_RMS_NORM:
                    mean = tl.load(MEAN + row)
                rstd = tl.load(RSTD + row)
                c1 = tl.load(COEF + 2 * row)
                xhat, dy, dy1, wdy = _bwd_load(
                    X + row * stride_x, DY + row * stride_dy, DY1 + row * stride_dy1, W, W1, cols, cmask,
                    mean, rstd, ZERO_CENTERED, HAS_W1,
                )  # fmt: skip
                if IS_RMS_NORM:
                    dx = (wdy - xhat * c1) * rstd
                else:
                    dx = (wdy - xhat * c1 - tl.load(COEF + 2 * row + 1)) * rstd
                _bwd_store(
                    dx, xhat, row, M, cols, cmask, W, B, Y + row * stride_y, DRES + row * stride_dres,
                    DRES_IN + row * stride_dres_in, DX1 + row * stride_dx1, DX + row * stride_dx, ROWSCALE,
                    SEEDS, dropout_p, ZERO_CENTERED, HAS_B, HAS_DRES, STORE_DRES_IN, STORE_DX1, HAS_DROPOUT,
                    HAS_ROWSCALE, RECOMPUTE_Y,
                )  # fmt: skip
                dw += dy * xhat
                db += dy
                if HAS_W1:
                    dw1 += dy1 * xhat
                    db1 += dy1
            tl.store(DW + part + cols, dw, mask=cmask)
            if HAS_B:
                tl.store(DB + part + cols, db, mask=cmask)
            if HAS_W1:
                tl.store(DW1 + part + cols, dw1, mask=cmask)
                if HAS_B1:
                    tl.store(DB1 + part + cols, db1, mask=cmask)


def norm_bwd_launch(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    dx: torch.Tensor,
    dw_part: torch.Tensor,
    db_part: torch.Tensor | None,
    rows_per_program: int,
    *,
    dresidual: torch.Tensor | None = None,
    dresidual_in: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    dy1: torch.Tensor | None = None,
    dx1: torch.Tensor | None = None,
    dw1_part: torch.Tensor | None = None,
    db1_part: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
) -> None:
    """Launch :func:`norm_bwd_kernel` over ``dw_part.shape[0]`` programs (no checks, no allocation).

    x (the saved pre-norm value), dy, dy1, dresidual, dx, dresidual_in, dx1, y: (M, N), unit last stride.
    dw_part, db_part, dw1_part, db1_part: fp32 (programs, N) contiguous, each program's partial sums.
    ``dx1`` is written only with dropout (without it, the ``x1`` gradient equals ``dresidual_in``); ``y`` is
    the recomputed normalized output (single weight only).
    """
    m, n = x.shape
    if m == 0 or n == 0:
        return
    block, single, num_warps = col_block(n)
    coef = None if single else torch.empty(m, 2, dtype=torch.float32, device=x.device)
    with _on_device(x):
        norm_bwd_kernel[(dw_part.shape[0],)](
            *_or_dummy(x, weight, bias, weight1, dy, dy1, dresidual, dx, dresidual_in, dx1, y, rowscale, seeds,
                       mean, rstd, coef, dw_part, db_part, dw1_part, db1_part),
            x.stride(0), dy.stride(0), _stride0(dy1), _stride0(dresidual), dx.stride(0), _stride0(dresidual_in),
            _stride0(dx1), _stride0(y),
            m, n, rows_per_program, dropout_p,
            IS_RMS_NORM=is_rms_norm,
            ZERO_CENTERED=zero_centered_weight,
            HAS_B=bias is not None,
            HAS_W1=weight1 is not None,
            HAS_B1=db1_part is not None,
            HAS_DRES=dresidual is not None,
            STORE_DRES_IN=dresidual_in is not None,
            STORE_DX1=dx1 is not None,
            HAS_DROPOUT=dropout_p > 0.0,
            HAS_ROWSCALE=rowscale is not None,
            RECOMPUTE_Y=y is not None,
            BLOCK_N=block,
            SINGLE_BLOCK=single,
            num_warps=num_warps,
        )  # fmt: skip
