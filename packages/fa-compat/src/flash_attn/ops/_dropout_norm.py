"""Row-level core shared by :mod:`flash_attn.ops.layer_norm` and :mod:`flash_attn.ops.rms_norm`.

Every tensor here is a 2-D ``(rows, N)`` matrix (``N`` = hidden size). The pre-norm sum

    ``x = dropout(x0 * rowscale * colscale) + dropout(x1) + residual``

and its normalization run in the Triton kernels of :mod:`fa_core.layer_norm` (fp32 arithmetic, one launch
forward, one backward). Those kernels have no per-column scale, so ``colscale`` is composed around them:

* Forward: the kernel reads ``u = x0 * colscale``, computed in fp32 (as flash-attn's CUDA kernel keeps the
  product in fp32 registers); ``out`` stays in ``x0``'s dtype and the residual stream in the residual dtype.
* Backward: the kernel returns ``du`` in fp32; ``dx0 = du * colscale`` (cast to ``x0``'s dtype) and
  ``dcolscale = sum_rows(du * x0)`` (cast to ``colscale``'s dtype).

Row subsets (flash-attn's ``x0_subset`` / ``out_subset``, used for stochastic depth) are index maps
``subset[i] = 1 + j`` (row ``i`` of the full matrix is row ``j`` of the compact one) or ``0`` (no row). They
become int64 index vectors whose ``0`` entries point at one extra scratch row (:func:`subset_index`), so the
gathers and scatters below need no host synchronization.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fa_core.errors import FlashAttnValueError
from fa_core.layer_norm import _layer_norm_bwd, _layer_norm_fwd
from fa_core.layer_norm_ops import maybe_contiguous, maybe_contiguous_lastdim

__all__ = [
    "NormBackward",
    "NormForward",
    "as_rows",
    "gather_rows",
    "keep_mask",
    "norm_backward",
    "norm_forward",
    "residual_dtype_of",
    "scatter_add_rows",
    "scatter_rows",
    "subset_index",
]


class NormForward(NamedTuple):
    """Outputs of :func:`norm_forward`, all ``(rows, N)`` except the statistics and seeds."""

    #: ``norm(x) * weight + bias`` in ``x0``'s dtype
    out: Tensor
    #: ``norm(x) * weight1 + bias1`` (only with ``weight1``)
    out1: Tensor | None
    #: the pre-norm sum in the residual dtype (the kernel input itself when nothing changes it)
    x: Tensor
    #: per-row mean (fp32, LayerNorm only) and inverse standard deviation (fp32)
    mean: Tensor | None
    rstd: Tensor
    #: the per-row dropout seeds the backward pass regenerates the masks from (dropout only)
    seeds: Tensor | None
    #: bool keep masks of ``x0`` / ``x1`` (only with ``return_dropout_mask`` and dropout)
    mask: Tensor | None
    mask1: Tensor | None


class NormBackward(NamedTuple):
    """Gradients of :func:`norm_backward`; None where the input was absent."""

    dx0: Tensor
    dresidual: Tensor | None
    dx1: Tensor | None
    dweight: Tensor
    dbias: Tensor | None
    dweight1: Tensor | None
    dbias1: Tensor | None
    dcolscale: Tensor | None


def as_rows(name: str, t: Tensor, numrows: int, n: int) -> Tensor:
    """``t`` as a ``(numrows, n)`` matrix with a unit last stride; a bad shape raises."""
    if t.shape[-1] != n or t.numel() != numrows * n:
        raise FlashAttnValueError(
            f"{name} must hold {numrows} rows of {n} elements, got shape {tuple(t.shape)}"
        )
    return maybe_contiguous_lastdim(t.reshape(numrows, n))


def _check_vector(name: str, t: Tensor | None, n: int) -> None:
    if t is not None and t.shape != (n,):
        raise FlashAttnValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")


def residual_dtype_of(x0: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """The residual stream's dtype: ``residual``'s, else fp32 with ``residual_in_fp32``, else ``x0``'s."""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else x0.dtype


def norm_forward(
    x0: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    dropout_p: float,
    *,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    rowscale: Tensor | None = None,
    colscale: Tensor | None = None,
    residual_in_fp32: bool = False,
    is_rms_norm: bool = False,
    return_dropout_mask: bool = False,
) -> NormForward:
    """Fused dropout + add + LayerNorm / RMSNorm on ``(M, N)`` rows.

    Arguments:
        x0: (M, N). residual, x1: (M, N) or None. rowscale: (M,) or None (not with ``x1``).
        weight, bias, weight1, bias1, colscale: (N,) or None (``weight`` required).
    Return:
        :class:`NormForward`; ``out`` / ``out1`` in ``x0``'s dtype.
    """
    n = x0.shape[1]
    for name, t in (("colscale", colscale), ("weight", weight)):
        _check_vector(name, t, n)
    kernel_x0 = x0 if colscale is None else x0.float() * colscale.float()
    y, y1, mean, rstd, x, seeds, mask, mask1 = _layer_norm_fwd(
        maybe_contiguous_lastdim(kernel_x0),
        weight.contiguous(),
        maybe_contiguous(bias),
        eps,
        residual=maybe_contiguous_lastdim(residual),
        x1=maybe_contiguous_lastdim(x1),
        weight1=maybe_contiguous(weight1),
        bias1=maybe_contiguous(bias1),
        dropout_p=dropout_p,
        rowscale=maybe_contiguous(rowscale),
        out_dtype=x0.dtype,
        residual_dtype=residual_dtype_of(x0, residual, residual_in_fp32),
        is_rms_norm=is_rms_norm,
        return_dropout_mask=return_dropout_mask,
    )
    return NormForward(y, y1, x, mean, rstd, seeds, mask, mask1)


def norm_backward(
    dout: Tensor,
    dout1: Tensor | None,
    dx: Tensor | None,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    seeds: Tensor | None,
    rowscale: Tensor | None,
    colscale: Tensor | None,
    x0: Tensor | None,
    eps: float,
    dropout_p: float,
    has_residual: bool,
    has_x1: bool,
    is_rms_norm: bool,
    x0_dtype: torch.dtype,
) -> NormBackward:
    """Backward of :func:`norm_forward` on ``(M, N)`` rows.

    ``dout`` / ``dout1`` are the gradients of ``out`` / ``out1``, ``dx`` the gradient of the returned pre-norm
    sum (pre-norm architectures) or None, ``x`` the saved pre-norm sum; ``x0`` (the forward's ``x0`` rows) is
    needed only with ``colscale``.
    """
    if weight1 is not None and dout1 is None:
        dout1 = torch.zeros_like(dout)
    kernel_dtype = x0_dtype if colscale is None else torch.float32
    dk, dw, db, dres, dx1, dw1, db1, _ = _layer_norm_bwd(
        dout, x, weight, bias, eps, mean, rstd, dresidual=dx, dy1=dout1, weight1=weight1, bias1=bias1,
        seeds=seeds, dropout_p=dropout_p, rowscale=rowscale, has_residual=has_residual, has_x1=has_x1,
        is_rms_norm=is_rms_norm, x_dtype=kernel_dtype,
    )  # fmt: skip
    dcolscale = None
    if colscale is not None:
        assert x0 is not None, "x0 is needed for the gradient of colscale"
        dcolscale = (dk * x0.float()).sum(0).to(colscale.dtype)
        dk = (dk * colscale.float()).to(x0_dtype)
    return NormBackward(dk, dres, dx1, dw, db, dw1, db1, dcolscale)


def keep_mask(mask: Tensor | None, rows: int, n: int, device: torch.device) -> Tensor:
    """flash-attn's returned dropout mask: uint8 ``(rows, n)``, 1 = kept; all ones without a mask."""
    if mask is None:
        return torch.ones(rows, n, dtype=torch.uint8, device=device)
    return mask.to(torch.uint8)


def subset_index(name: str, subset: Tensor, rows: int, numrows: int) -> Tensor:
    """int64 ``(rows,)`` indices into a compact ``(numrows, N)`` matrix from a 1-based index map
    (``subset[i] - 1``); the entries ``<= 0`` point at the scratch row ``numrows``."""
    if subset.numel() != rows or subset.is_floating_point() or subset.is_complex():
        raise FlashAttnValueError(
            f"{name} must be an integer tensor with {rows} elements, got {subset.dtype} {tuple(subset.shape)}"
        )
    s = subset.reshape(-1).to(torch.int64)
    return torch.where(s > 0, s - 1, numrows)


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """``(len(index), N)``: row ``index[i]`` of ``src`` (zeros where ``index[i] == len(src)``)."""
    padded = torch.cat([src, src.new_zeros(1, src.shape[1])])
    return padded.index_select(0, index)


def scatter_rows(src: Tensor, index: Tensor, numrows: int) -> Tensor:
    """``(numrows, N)``: row ``index[i]`` receives ``src[i]``; rows nobody writes are zero and the rows with
    ``index[i] == numrows`` are dropped."""
    buf = src.new_zeros(numrows + 1, src.shape[1])
    buf.index_copy_(0, index, src)
    return buf[:numrows]


def scatter_add_rows(src: Tensor, index: Tensor, numrows: int) -> Tensor:
    """``(numrows, N)``: the sum of the rows ``src[i]`` with ``index[i] == r`` in row ``r`` (the adjoint of
    :func:`gather_rows`)."""
    buf = src.new_zeros(numrows + 1, src.shape[1])
    buf.index_add_(0, index, src)
    return buf[:numrows]
