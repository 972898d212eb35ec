"""Fused dropout + residual + LayerNorm / RMSNorm with the API of ``flash_attn.ops.triton.layer_norm`` (2.8.x).

Shapes: ``x`` is ``(..., N)``; every leading dimension is flattened into ``M`` rows. ``residual`` and ``x1``
have ``x``'s shape, ``rowscale`` is ``x.shape[:-1]``, the weights and biases are ``(N,)``. Any ``N`` works:
rows longer than :data:`fa_core.layer_norm_kernels.MAX_BLOCK_N` loop over column blocks in the kernels.
Inputs whose last dimension is not contiguous are copied.

The pre-norm value is ``h = dropout(x * rowscale) + dropout1(x1) + residual`` (each term optional; ``rowscale``
and ``x1`` exclude each other), computed in fp32. The outputs are ``norm(h) * weight + bias`` and, with
``weight1``, a second ``norm(h) * weight1 + bias1`` sharing the statistics; ``zero_centered_weight`` uses
``weight + 1``. Return values follow flash-attn: ``out``, then ``out1`` (with ``weight1``), then ``h``
(``prenorm``: the residual stream, in the residual dtype, ``float32`` with ``residual_in_fp32``), then
``(dropout_mask, dropout_mask1)`` (``return_dropout_mask``: bool ``x``-shaped keep masks, None where there is
no dropout / no ``x1``).

Decisions:

* ``h`` is stored (rounded to the residual dtype) only when it differs from ``x`` (residual, dropout, rowscale,
  ``x1``, or a residual dtype other than ``x.dtype``); otherwise ``x`` itself is saved and returned as the
  residual. A caller-given ``residual_out`` buffer always receives ``h``.
* Dropout masks are regenerated in the backward pass from per-row int64 seeds drawn with ``torch.randint``
  (so ``torch.manual_seed`` makes runs reproducible); they are materialized only for
  ``return_dropout_mask``.
* The backward pass recomputes ``xhat`` from the saved ``h``, ``mean`` and ``rstd``; ``dweight`` / ``dbias``
  (and ``weight1`` / ``bias1``) are fp32 per-program partial sums reduced by one ``torch`` sum.
* :class:`LayerNormLinearFn` does not keep the normalized output: the backward kernel recomputes it for the
  linear layer's weight gradient. Under autocast (on ``x``'s device type) the norm outputs the autocast dtype
  and the linear weight is cast to it; the backward pass runs under the forward's autocast state.
* The kernel launches are the custom ops ``fa_core::norm_fwd`` / ``fa_core::norm_bwd``
  (:mod:`fa_core.layer_norm_ops`), called by the autograd Functions, so every function here works under
  ``torch.compile`` (``fullgraph=True``, aot_eager and inductor, dynamic row counts). The dropout seeds are
  drawn before the op; inductor draws them from its own generator (eager's with ``fallback_random``), the
  returned masks are the ones applied. Traced, caller-given ``out`` / ``residual_out`` buffers receive
  copies and the returned tensors need not share their storage; in eager they are written in place and
  returned.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from fa_core.errors import FlashAttnValueError
from fa_core.layer_norm_ops import maybe_contiguous, maybe_contiguous_lastdim, norm_bwd, norm_fwd
from fa_core.layer_norm_ref import layer_norm_ref, rms_norm_ref

__all__ = [
    "LayerNormFn",
    "LayerNormLinearFn",
    "RMSNorm",
    "layer_norm_fn",
    "layer_norm_linear_fn",
    "layer_norm_ref",
    "maybe_contiguous",
    "maybe_contiguous_lastdim",
    "rms_norm_fn",
    "rms_norm_ref",
]


# ------------------------------------------------------------------------------------------ host passes


def _check_param(name: str, t: Tensor | None, n: int) -> None:
    if t is not None and t.shape != (n,):
        raise FlashAttnValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")


def _as_rows(name: str, t: Tensor, shape: torch.Size) -> Tensor:
    if t.shape != shape:
        raise FlashAttnValueError(f"{name} must have the shape of x {tuple(shape)}, got {tuple(t.shape)}")
    return t.reshape(-1, shape[-1])


def _buffer_rows(name: str, t: Tensor, shape: torch.Size) -> Tensor:
    """A caller's output buffer as an (M, N) view (a copy would drop the writes)."""
    if t.shape != shape or t.stride(-1) != 1:
        raise FlashAttnValueError(f"{name} must have the shape of x {tuple(shape)} and a unit last stride")
    try:
        return t.view(-1, shape[-1])
    except RuntimeError:
        raise FlashAttnValueError(f"{name} must be viewable as (rows, {shape[-1]})") from None


def _layer_norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
    return_dropout_mask: bool = False,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Forward on (M, N) rows (unit last strides, contiguous parameters, rowscale (M,)).

    Returns ``(y, y1, mean, rstd, residual_out, seeds, dropout_mask, dropout_mask1)``; ``residual_out`` is the
    pre-norm value (``x`` itself when nothing changes it), ``mean`` is None for RMSNorm. The dropout seeds are
    drawn here and handed to the launch as a tensor.
    """
    m, n = x.shape
    if not 0.0 <= dropout_p < 1.0:
        raise FlashAttnValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if x1 is not None and rowscale is not None:
        raise FlashAttnValueError("rowscale is not supported together with x1")
    for name, p in (("weight", weight), ("bias", bias), ("weight1", weight1), ("bias1", bias1)):
        _check_param(name, p, n)
    if bias1 is not None and weight1 is None:
        raise FlashAttnValueError("bias1 needs weight1")
    if rowscale is not None and rowscale.shape != (m,):
        raise FlashAttnValueError(f"rowscale must have {m} elements (x.shape[:-1]), got {rowscale.numel()}")
    if out is not None:
        out_dtype = out.dtype
    if residual is not None:
        residual_dtype = residual.dtype
    if residual_out is not None:
        residual_dtype = residual_out.dtype
    elif not (
        residual is not None
        or (residual_dtype is not None and residual_dtype != x.dtype)
        or dropout_p > 0.0
        or rowscale is not None
        or x1 is not None
    ):
        residual_dtype = None  # nothing changes x: it is the pre-norm value itself
    elif residual_dtype is None:
        residual_dtype = x.dtype
    seeds = None
    if dropout_p > 0.0:
        seeds = torch.randint(0, 2**62, (2 * m if x1 is not None else m,), device=x.device, dtype=torch.int64)
    y, y1, mean, rstd, res_out, mask, mask1 = norm_fwd(
        x, weight, bias, residual, x1, weight1, bias1, rowscale, seeds, eps, dropout_p,
        out_dtype if out_dtype is not None else x.dtype, residual_dtype, zero_centered_weight, is_rms_norm,
        return_dropout_mask, out, residual_out,
    )  # fmt: skip
    return y, y1, mean, rstd, res_out if res_out is not None else x, seeds, mask, mask1


def _layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    mean: Tensor | None,
    rstd: Tensor,
    dresidual: Tensor | None = None,
    dy1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    seeds: Tensor | None = None,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    has_residual: bool = False,
    has_x1: bool = False,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
    x_dtype: torch.dtype | None = None,
    recompute_output: bool = False,
) -> tuple[
    Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None
]:
    """Backward on (M, N) rows; ``x`` is the saved pre-norm value.

    Returns ``(dx, dweight, dbias, dresidual_in, dx1, dweight1, dbias1, y)``: ``dx`` in ``x_dtype``, the
    residual / ``x1`` gradients (None without residual / ``x1``; they share storage with ``dx`` when they are
    equal), and ``y`` the recomputed ``norm(x) * weight + bias`` in ``dy``'s dtype with ``recompute_output``.
    """
    if recompute_output and weight1 is not None:
        raise FlashAttnValueError("recompute_output is not supported with weight1")
    dx, dw, db, dresidual_in, dx1, dw1, db1, y = norm_bwd(
        dy, x, weight, bias, mean, rstd, dresidual, dy1, weight1, bias1, rowscale, seeds, dropout_p,
        has_residual, has_x1, zero_centered_weight, is_rms_norm, x_dtype if x_dtype is not None else x.dtype,
        recompute_output,
    )  # fmt: skip
    # equal gradients share dx's storage instead of being stored twice
    if has_residual and dresidual_in is None:
        dresidual_in = dx
    if has_x1 and dx1 is None:
        dx1 = dx
    return dx, dw, db, dresidual_in, dx1, dw1, db1, y


# -------------------------------------------------------------------------------------------- autograd


class LayerNormFn(torch.autograd.Function):
    """``apply(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
    residual_in_fp32, zero_centered_weight, is_rms_norm, return_dropout_mask, out_dtype, out, residual_out)``;
    see :func:`layer_norm_fn`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        residual: Tensor | None = None,
        x1: Tensor | None = None,
        weight1: Tensor | None = None,
        bias1: Tensor | None = None,
        eps: float = 1e-6,
        dropout_p: float = 0.0,
        rowscale: Tensor | None = None,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        zero_centered_weight: bool = False,
        is_rms_norm: bool = False,
        return_dropout_mask: bool = False,
        out_dtype: torch.dtype | None = None,
        out: Tensor | None = None,
        residual_out: Tensor | None = None,
    ) -> Any:
        shape = x.shape
        x_rows = maybe_contiguous_lastdim(x.reshape(-1, shape[-1]))
        res_rows = (
            maybe_contiguous_lastdim(_as_rows("residual", residual, shape)) if residual is not None else None
        )
        x1_rows = maybe_contiguous_lastdim(_as_rows("x1", x1, shape)) if x1 is not None else None
        weight = weight.contiguous()
        bias, weight1, bias1 = maybe_contiguous(bias), maybe_contiguous(weight1), maybe_contiguous(bias1)
        rowscale = rowscale.reshape(-1).contiguous() if rowscale is not None else None
        residual_dtype = (
            residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else None)
        )
        y, y1, mean, rstd, res_out, seeds, mask, mask1 = _layer_norm_fwd(
            x_rows, weight, bias, eps, res_rows, x1_rows, weight1, bias1, dropout_p=dropout_p,
            rowscale=rowscale, out_dtype=out_dtype, residual_dtype=residual_dtype,
            zero_centered_weight=zero_centered_weight, is_rms_norm=is_rms_norm,
            return_dropout_mask=return_dropout_mask,
            out=_buffer_rows("out", out, shape) if out is not None else None,
            residual_out=_buffer_rows("residual_out", residual_out, shape) if residual_out is not None else None,
        )  # fmt: skip
        ctx.save_for_backward(res_out, weight, bias, weight1, bias1, rowscale, seeds, mean, rstd)
        ctx.x_shape = shape
        ctx.x_dtype = x.dtype
        ctx.eps = eps
        ctx.dropout_p = dropout_p
        ctx.is_rms_norm = is_rms_norm
        ctx.zero_centered_weight = zero_centered_weight
        ctx.has_residual = residual is not None
        ctx.has_x1 = x1 is not None
        ctx.prenorm = prenorm
        outs: list[Tensor | None] = [y.reshape(shape)]
        if y1 is not None:
            outs.append(y1.reshape(shape))
        if prenorm:
            outs.append(res_out.reshape(shape))
        if return_dropout_mask:
            masks = [t.reshape(shape) if t is not None else None for t in (mask, mask1)]
            ctx.mark_non_differentiable(*[t for t in masks if t is not None])
            outs.extend(masks)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *args: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, bias, weight1, bias1, rowscale, seeds, mean, rstd = ctx.saved_tensors
        n = x.shape[-1]
        dy1 = None
        if weight1 is not None:
            dy1, args = args[0], args[1:]
            dy1 = dy1.reshape(-1, n) if dy1 is not None else torch.zeros_like(x, dtype=dy.dtype)
        dresidual = None
        if ctx.prenorm and args[0] is not None:
            dresidual = args[0].reshape(-1, n)
        dx, dw, db, dres_in, dx1, dw1, db1, _ = _layer_norm_bwd(
            dy.reshape(-1, n), x, weight, bias, ctx.eps, mean, rstd, dresidual, dy1, weight1, bias1, seeds,
            ctx.dropout_p, rowscale, ctx.has_residual, ctx.has_x1, ctx.zero_centered_weight, ctx.is_rms_norm,
            x_dtype=ctx.x_dtype,
        )  # fmt: skip
        shape = ctx.x_shape
        return (
            dx.reshape(shape),
            dw,
            db,
            dres_in.reshape(shape) if dres_in is not None else None,
            dx1.reshape(shape) if dx1 is not None else None,
            dw1,
            db1,
            *([None] * 11),
        )


def layer_norm_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
    return_dropout_mask: bool = False,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Any:
    """Fused ``dropout(x * rowscale) + dropout(x1) + residual`` followed by LayerNorm (RMSNorm with
    ``is_rms_norm``); differentiable in ``x``, ``weight``, ``bias``, ``residual``, ``x1``, ``weight1``,
    ``bias1``.

    Arguments:
        x: (..., N) fp16 / bf16 / fp32. residual, x1: like ``x`` (``residual`` may have another dtype).
        weight, bias, weight1, bias1: (N,); ``bias`` / ``weight1`` / ``bias1`` may be None.
        rowscale: ``x.shape[:-1]``, scales each row of ``x`` before dropout (not with ``x1``).
        dropout_p: in [0, 1), applied to ``x`` and ``x1`` with independent masks.
        prenorm: also return the pre-norm sum (the new residual stream).
        residual_in_fp32: without ``residual``, keep that sum in fp32.
        zero_centered_weight: the weights are stored minus one (``weight + 1`` is applied).
        out_dtype: dtype of ``out`` / ``out1`` (default ``x.dtype``).
        out, residual_out: optional preallocated ``x``-shaped buffers for ``out`` and the pre-norm sum.
    Returns:
        ``out``, then ``out1`` (with ``weight1``), then the residual (``prenorm``), then
        ``dropout_mask, dropout_mask1`` (``return_dropout_mask``); a lone ``out`` is returned bare.
    """
    return LayerNormFn.apply(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm, residual_in_fp32,
        zero_centered_weight, is_rms_norm, return_dropout_mask, out_dtype, out, residual_out,
    )  # fmt: skip


def rms_norm_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None = None,
    x1: Tensor | None = None,
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
    return_dropout_mask: bool = False,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
) -> Any:
    """:func:`layer_norm_fn` with ``is_rms_norm=True`` (same arguments and returns)."""
    return LayerNormFn.apply(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm, residual_in_fp32,
        zero_centered_weight, True, return_dropout_mask, out_dtype, out, residual_out,
    )  # fmt: skip


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension (``hidden_size``) with a weight and no bias, through
    :func:`rms_norm_fn`; ``dropout_p`` applies to the input in training mode."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        dropout_p: float = 0.0,
        zero_centered_weight: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.drop = torch.nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.zero_centered_weight = zero_centered_weight
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the effective weight starts at one either way
        if self.zero_centered_weight:
            torch.nn.init.zeros_(self.weight)
        else:
            torch.nn.init.ones_(self.weight)

    def forward(
        self, x: Tensor, residual: Tensor | None = None, prenorm: bool = False, residual_in_fp32: bool = False
    ) -> Any:
        return rms_norm_fn(
            x,
            self.weight,
            cast("Tensor | None", self.bias),
            residual=residual,
            eps=self.eps,
            dropout_p=self.drop.p if self.drop is not None and self.training else 0.0,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            zero_centered_weight=self.zero_centered_weight,
        )


class LayerNormLinearFn(torch.autograd.Function):
    """``apply(x, norm_weight, norm_bias, linear_weight, linear_bias, residual, eps, prenorm,
    residual_in_fp32, is_rms_norm)``; see :func:`layer_norm_linear_fn`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        norm_weight: Tensor,
        norm_bias: Tensor | None,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        residual: Tensor | None = None,
        eps: float = 1e-6,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        is_rms_norm: bool = False,
    ) -> Any:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        ctx.autocast = (device_type, autocast, torch.get_autocast_dtype(device_type))
        shape = x.shape
        x_rows = maybe_contiguous_lastdim(x.reshape(-1, shape[-1]))
        res_rows = (
            maybe_contiguous_lastdim(_as_rows("residual", residual, shape)) if residual is not None else None
        )
        norm_weight = norm_weight.contiguous()
        norm_bias = maybe_contiguous(norm_bias)
        residual_dtype = (
            residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else None)
        )
        y, _, mean, rstd, res_out, *_ = _layer_norm_fwd(
            x_rows, norm_weight, norm_bias, eps, res_rows,
            out_dtype=ctx.autocast[2] if autocast else None, residual_dtype=residual_dtype,
            is_rms_norm=is_rms_norm,
        )  # fmt: skip
        dtype = ctx.autocast[2] if autocast else y.dtype
        linear_weight = linear_weight.to(dtype)
        linear_bias = linear_bias.to(dtype) if linear_bias is not None else None
        out = F.linear(y.reshape(shape).to(dtype), linear_weight, linear_bias)
        # y is not kept: the backward kernel recomputes it
        ctx.save_for_backward(res_out, norm_weight, norm_bias, linear_weight, mean, rstd)
        ctx.x_shape = shape
        ctx.x_dtype = x.dtype
        ctx.eps = eps
        ctx.is_rms_norm = is_rms_norm
        ctx.has_residual = residual is not None
        ctx.prenorm = prenorm
        ctx.has_linear_bias = linear_bias is not None
        return out if not prenorm else (out, res_out.reshape(shape))

    @staticmethod
    def backward(ctx: Any, dout: Tensor, *args: Tensor | None) -> tuple[Tensor | None, ...]:
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type=device_type, enabled=enabled, dtype=dtype):
            x, norm_weight, norm_bias, linear_weight, mean, rstd = ctx.saved_tensors
            dout = dout.reshape(-1, dout.shape[-1])
            dy = F.linear(dout, linear_weight.t())
            dlinear_bias = dout.sum(0) if ctx.has_linear_bias else None
            dresidual = args[0].reshape(-1, x.shape[-1]) if ctx.prenorm and args[0] is not None else None
            dx, dnorm_weight, dnorm_bias, dres_in, _, _, _, y = _layer_norm_bwd(
                dy, x, norm_weight, norm_bias, ctx.eps, mean, rstd, dresidual=dresidual,
                has_residual=ctx.has_residual, is_rms_norm=ctx.is_rms_norm, x_dtype=ctx.x_dtype,
                recompute_output=True,
            )  # fmt: skip
            assert y is not None
            dlinear_weight = torch.einsum("bo,bi->oi", dout, y)
        shape = ctx.x_shape
        return (
            dx.reshape(shape),
            dnorm_weight,
            dnorm_bias,
            dlinear_weight,
            dlinear_bias,
            dres_in.reshape(shape) if dres_in is not None else None,
            None,
            None,
            None,
            None,
        )


def layer_norm_linear_fn(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor | None,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    is_rms_norm: bool = False,
) -> Any:
    """``F.linear(norm(x + residual), linear_weight, linear_bias)`` with the norm fused as in
    :func:`layer_norm_fn` (no dropout / ``x1`` / second weight).

    x: (..., N); residual: like ``x``; norm_weight, norm_bias: (N,); linear_weight: (out_features, N);
    linear_bias: (out_features,) or None. Returns ``out`` (..., out_features), or ``(out, residual)`` with
    ``prenorm``. Under autocast the norm output and the linear layer use the autocast dtype.
    """
    return LayerNormLinearFn.apply(
        x, norm_weight, norm_bias, linear_weight, linear_bias, residual, eps, prenorm, residual_in_fp32,
        is_rms_norm,
    )  # fmt: skip
