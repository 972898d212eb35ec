"""The norm kernels' launches as ``torch.library`` custom ops, so that tracers see them as opaque nodes.

Two functional ops (no input is mutated, no output aliases an input or another output) wrap the launchers of
:mod:`fa_core.layer_norm_kernels` together with the allocation of their outputs:

* ``torch.ops.fa_core.norm_fwd``: the forward on ``(M, N)`` rows. Returns ``(y, y1, mean, rstd,
  residual_out, dropout_mask, dropout_mask1)``; ``y1`` only with ``weight1``, ``mean`` only for LayerNorm,
  ``residual_out`` (the pre-norm value, in ``residual_dtype``) only when ``residual_dtype`` is given, the
  bool masks only with ``return_dropout_mask`` and dropout (``dropout_mask1`` also needs ``x1``). Dropout
  seeds come in as a tensor drawn by the caller, so the op is a pure function of its inputs.
* ``torch.ops.fa_core.norm_bwd``: the backward. Returns ``(dx, dweight, dbias, dresidual_in, dx1, dweight1,
  dbias1, y)``: ``dx`` in ``x_dtype``, the parameter gradients in their parameters' dtypes (the fp32
  per-program partial sums are reduced inside the op), ``dresidual_in`` / ``dx1`` only where they differ
  from ``dx`` (None where the caller reuses ``dx``), ``y`` (the recomputed normalized output, ``dy``'s
  dtype) only with ``recompute_output``.

Neither op has an autograd formula: the differentiable layer is :class:`fa_core.layer_norm.LayerNormFn` /
:class:`~fa_core.layer_norm.LayerNormLinearFn`, whose forward and backward call :func:`norm_fwd` and
:func:`norm_bwd`. Those run the ops while a tracer is active (``torch.compile``, export, ``make_fx``, fake or
functional tensors); a plain eager call runs the same implementation directly (no op dispatch), which also
lets caller-given ``out`` / ``residual_out`` buffers be written in place. Traced, the buffers receive a copy
of the op's fresh outputs. The fake implementations share the allocation code of the real ones, so shapes,
dtypes and strides agree by construction.

Inputs may have any strides: the implementations give the ``(M, N)`` tensors (``x``, ``residual``, ``x1``,
``dy``, ``dy1``, ``dresidual``) a unit last stride and make the vectors contiguous (copies only where
needed), so the autograd layer never reads a gradient's strides (unknown while ``torch.compile`` traces a
backward). Every output is a new contiguous tensor.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor

from fa_core.layer_norm_kernels import bwd_programs, norm_bwd_launch, norm_fwd_launch
from fa_core.validation import traced

__all__ = ["maybe_contiguous", "maybe_contiguous_lastdim", "norm_bwd", "norm_fwd"]

_FwdOut = tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None]
_BwdOut = tuple[
    Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None
]

_FWD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? x1, Tensor? weight1, Tensor? bias1, "
    "Tensor? rowscale, Tensor? seeds, float eps, float dropout_p, ScalarType out_dtype, "
    "ScalarType? residual_dtype, bool zero_centered_weight, bool is_rms_norm, bool return_dropout_mask) "
    "-> (Tensor y, Tensor? y1, Tensor? mean, Tensor rstd, Tensor? residual_out, Tensor? dropout_mask, "
    "Tensor? dropout_mask1)"
)
_BWD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor? mean, Tensor rstd, Tensor? dresidual, "
    "Tensor? dy1, Tensor? weight1, Tensor? bias1, Tensor? rowscale, Tensor? seeds, float dropout_p, "
    "bool has_residual, bool has_x1, bool zero_centered_weight, bool is_rms_norm, ScalarType x_dtype, "
    "bool recompute_output) "
    "-> (Tensor dx, Tensor dweight, Tensor? dbias, Tensor? dresidual_in, Tensor? dx1, Tensor? dweight1, "
    "Tensor? dbias1, Tensor? y)"
)


@overload
def maybe_contiguous_lastdim(x: Tensor) -> Tensor: ...
@overload
def maybe_contiguous_lastdim(x: Tensor | None) -> Tensor | None: ...
def maybe_contiguous_lastdim(x: Tensor | None) -> Tensor | None:
    """``x`` with a unit last stride (a copy only when needed); None stays None."""
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def maybe_contiguous(x: Tensor | None) -> Tensor | None:
    """``x.contiguous()``; None stays None."""
    return x.contiguous() if x is not None else None


# ----------------------------------------------------------------------------------------------- forward


def _fwd_alloc(
    x: Tensor,
    has_x1: bool,
    has_weight1: bool,
    dropout_p: float,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    is_rms_norm: bool,
    return_dropout_mask: bool,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> _FwdOut:
    """The forward's outputs, contiguous (``out`` / ``residual_out``: caller buffers used instead of new
    tensors)."""
    m, n = x.shape
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=x.device)
    y1 = torch.empty(m, n, dtype=y.dtype, device=x.device) if has_weight1 else None
    mean = torch.empty(m, dtype=torch.float32, device=x.device) if not is_rms_norm else None
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if residual_out is None and residual_dtype is not None:
        residual_out = torch.empty(m, n, dtype=residual_dtype, device=x.device)
    mask = mask1 = None
    if return_dropout_mask and dropout_p > 0.0:
        mask = torch.empty(m, n, dtype=torch.bool, device=x.device)
        mask1 = torch.empty(m, n, dtype=torch.bool, device=x.device) if has_x1 else None
    return y, y1, mean, rstd, residual_out, mask, mask1


def _norm_fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    x1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    rowscale: Tensor | None,
    seeds: Tensor | None,
    eps: float,
    dropout_p: float,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    return_dropout_mask: bool,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> _FwdOut:
    x, residual, x1 = (
        maybe_contiguous_lastdim(x),
        maybe_contiguous_lastdim(residual),
        maybe_contiguous_lastdim(x1),
    )
    weight, rowscale, seeds = weight.contiguous(), maybe_contiguous(rowscale), maybe_contiguous(seeds)
    bias, weight1, bias1 = maybe_contiguous(bias), maybe_contiguous(weight1), maybe_contiguous(bias1)
    outs = _fwd_alloc(
        x, x1 is not None, weight1 is not None, dropout_p, out_dtype, residual_dtype, is_rms_norm,
        return_dropout_mask, out, residual_out,
    )  # fmt: skip
    y, y1, mean, rstd, res_out, mask, mask1 = outs
    norm_fwd_launch(
        x, weight, bias, y, mean, rstd, eps=eps, residual=residual, x1=x1, weight1=weight1, bias1=bias1,
        y1=y1, residual_out=res_out, rowscale=rowscale, seeds=seeds, dropout_p=dropout_p,
        dropout_mask=mask, dropout_mask1=mask1, zero_centered_weight=zero_centered_weight,
        is_rms_norm=is_rms_norm,
    )  # fmt: skip
    return outs


@torch.library.custom_op("fa_core::norm_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _norm_fwd_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    x1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    rowscale: Tensor | None,
    seeds: Tensor | None,
    eps: float,
    dropout_p: float,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    return_dropout_mask: bool,
) -> _FwdOut:
    """Forward on (M, N) rows into new tensors (see the module docstring)."""
    return _norm_fwd_impl(
        x, weight, bias, residual, x1, weight1, bias1, rowscale, seeds, eps, dropout_p, out_dtype,
        residual_dtype, zero_centered_weight, is_rms_norm, return_dropout_mask,
    )  # fmt: skip


@_norm_fwd_op.register_fake
def _norm_fwd_fake(
    x, weight, bias, residual, x1, weight1, bias1, rowscale, seeds, eps, dropout_p, out_dtype, residual_dtype,
    zero_centered_weight, is_rms_norm, return_dropout_mask,
):  # fmt: skip
    return _fwd_alloc(
        x, x1 is not None, weight1 is not None, dropout_p, out_dtype, residual_dtype, is_rms_norm,
        return_dropout_mask,
    )  # fmt: skip


def norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    x1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    rowscale: Tensor | None,
    seeds: Tensor | None,
    eps: float,
    dropout_p: float,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    return_dropout_mask: bool,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> _FwdOut:
    """Forward on (M, N) rows (no checks): ``fa_core::norm_fwd``'s outputs, with ``out`` / ``residual_out``
    (caller buffers of ``out_dtype`` / ``residual_dtype``) returned in place of ``y`` / ``residual_out``.

    Traced, the op runs and the buffers receive copies of its outputs; otherwise the kernel writes them.
    """
    if not traced(x):
        return _norm_fwd_impl(
            x, weight, bias, residual, x1, weight1, bias1, rowscale, seeds, eps, dropout_p, out_dtype,
            residual_dtype, zero_centered_weight, is_rms_norm, return_dropout_mask, out, residual_out,
        )  # fmt: skip
    y, y1, mean, rstd, res_out, mask, mask1 = torch.ops.fa_core.norm_fwd(
        x, weight, bias, residual, x1, weight1, bias1, rowscale, seeds, eps, dropout_p, out_dtype,
        residual_dtype, zero_centered_weight, is_rms_norm, return_dropout_mask,
    )  # fmt: skip
    if out is not None:
        out.copy_(y)
        y = out
    if residual_out is not None and res_out is not None:
        residual_out.copy_(res_out)
        res_out = residual_out
    return y, y1, mean, rstd, res_out, mask, mask1


# ---------------------------------------------------------------------------------------------- backward


def _bwd_alloc(
    dy: Tensor,
    x: Tensor,
    has_residual: bool,
    has_x1: bool,
    dropout_p: float,
    has_rowscale: bool,
    x_dtype: torch.dtype,
    recompute_output: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dresidual_in, dx1, y)`` of the backward, contiguous; the two middle ones only where they differ
    from ``dx``."""
    m, n = x.shape
    dx = torch.empty(m, n, dtype=x_dtype, device=x.device)
    separate_dres = has_residual and (x_dtype != x.dtype or dropout_p > 0.0 or has_rowscale or has_x1)
    dresidual_in = torch.empty(m, n, dtype=x.dtype, device=x.device) if separate_dres else None
    dx1 = torch.empty(m, n, dtype=x_dtype, device=x.device) if has_x1 and dropout_p > 0.0 else None
    y = torch.empty(m, n, dtype=dy.dtype, device=x.device) if recompute_output else None
    return dx, dresidual_in, dx1, y


def _norm_bwd_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    dresidual: Tensor | None,
    dy1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    rowscale: Tensor | None,
    seeds: Tensor | None,
    dropout_p: float,
    has_residual: bool,
    has_x1: bool,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    x_dtype: torch.dtype,
    recompute_output: bool,
) -> _BwdOut:
    m, n = x.shape
    dy, dy1, x = maybe_contiguous_lastdim(dy), maybe_contiguous_lastdim(dy1), maybe_contiguous_lastdim(x)
    dresidual, mean, rstd = maybe_contiguous_lastdim(dresidual), maybe_contiguous(mean), rstd.contiguous()
    weight, rowscale, seeds = weight.contiguous(), maybe_contiguous(rowscale), maybe_contiguous(seeds)
    bias, weight1, bias1 = maybe_contiguous(bias), maybe_contiguous(weight1), maybe_contiguous(bias1)
    dx, dresidual_in, dx1, y = _bwd_alloc(
        dy, x, has_residual, has_x1, dropout_p, rowscale is not None, x_dtype, recompute_output
    )
    programs, rows = bwd_programs(m, x.device)

    def partial(needed: bool) -> Tensor | None:
        return torch.zeros(programs, n, dtype=torch.float32, device=x.device) if needed else None

    dw_p = partial(True)
    db_p, dw1_p, db1_p = partial(bias is not None), partial(weight1 is not None), partial(bias1 is not None)
    assert dw_p is not None
    norm_bwd_launch(
        dy, x, weight, bias, mean, rstd, dx, dw_p, db_p, rows, dresidual=dresidual,
        dresidual_in=dresidual_in, weight1=weight1, dy1=dy1, dx1=dx1, dw1_part=dw1_p, db1_part=db1_p, y=y,
        rowscale=rowscale, seeds=seeds, dropout_p=dropout_p, zero_centered_weight=zero_centered_weight,
        is_rms_norm=is_rms_norm,
    )  # fmt: skip
    dw = dw_p.sum(0).to(weight.dtype)
    db = db_p.sum(0).to(bias.dtype) if db_p is not None and bias is not None else None
    dw1 = dw1_p.sum(0).to(weight1.dtype) if dw1_p is not None and weight1 is not None else None
    db1 = db1_p.sum(0).to(bias1.dtype) if db1_p is not None and bias1 is not None else None
    return dx, dw, db, dresidual_in, dx1, dw1, db1, y


@torch.library.custom_op("fa_core::norm_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _norm_bwd_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    dresidual: Tensor | None,
    dy1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    rowscale: Tensor | None,
    seeds: Tensor | None,
    dropout_p: float,
    has_residual: bool,
    has_x1: bool,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    x_dtype: torch.dtype,
    recompute_output: bool,
) -> _BwdOut:
    """Backward on (M, N) rows (see the module docstring)."""
    return _norm_bwd_impl(
        dy, x, weight, bias, mean, rstd, dresidual, dy1, weight1, bias1, rowscale, seeds, dropout_p,
        has_residual, has_x1, zero_centered_weight, is_rms_norm, x_dtype, recompute_output,
    )  # fmt: skip


@_norm_bwd_op.register_fake
def _norm_bwd_fake(
    dy, x, weight, bias, mean, rstd, dresidual, dy1, weight1, bias1, rowscale, seeds, dropout_p, has_residual,
    has_x1, zero_centered_weight, is_rms_norm, x_dtype, recompute_output,
):  # fmt: skip
    dx, dresidual_in, dx1, y = _bwd_alloc(
        dy, x, has_residual, has_x1, dropout_p, rowscale is not None, x_dtype, recompute_output
    )

    def grad(p: Tensor | None) -> Tensor | None:
        return torch.empty_like(p, memory_format=torch.contiguous_format) if p is not None else None

    return dx, grad(weight), grad(bias), dresidual_in, dx1, grad(weight1), grad(bias1), y


def norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    dresidual: Tensor | None,
    dy1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    rowscale: Tensor | None,
    seeds: Tensor | None,
    dropout_p: float,
    has_residual: bool,
    has_x1: bool,
    zero_centered_weight: bool,
    is_rms_norm: bool,
    x_dtype: torch.dtype,
    recompute_output: bool,
) -> _BwdOut:
    """Backward on (M, N) rows (no checks): ``fa_core::norm_bwd`` if traced, else its implementation."""
    args = (
        dy, x, weight, bias, mean, rstd, dresidual, dy1, weight1, bias1, rowscale, seeds, dropout_p,
        has_residual, has_x1, zero_centered_weight, is_rms_norm, x_dtype, recompute_output,
    )  # fmt: skip
    return torch.ops.fa_core.norm_bwd(*args) if traced(x) else _norm_bwd_impl(*args)
