"""Plain-PyTorch references of the fused dropout + residual + LayerNorm / RMSNorm (flash-attn 2.8.x
``layer_norm_ref`` / ``rms_norm_ref``).

Same arguments and returns as :func:`fa_core.layer_norm.layer_norm_fn` (without ``residual_in_fp32``), plus
``dropout_mask`` / ``dropout_mask1`` (bool, ``x``-shaped keep masks to apply instead of fresh ``F.dropout``) and
``upcast`` (compute in fp32 instead of the inputs' dtypes). Low-precision semantics follow flash-attn: the
pre-norm sum is rounded to the dtype of ``x`` (after dropout), LayerNorm runs in the weight's dtype, RMSNorm
in the promoted dtype of the sum and the weight; outputs are cast back to ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fa_core.errors import FlashAttnValueError

__all__ = ["layer_norm_ref", "rms_norm_ref"]


def _ref_dropout(t: Tensor, mask: Tensor | None, p: float) -> Tensor:
    return F.dropout(t, p=p) if mask is None else t.masked_fill(~mask, 0.0) / (1.0 - p)


def _norm_ref(
    is_rms_norm: bool,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    x1: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    eps: float,
    dropout_p: float,
    rowscale: Tensor | None,
    prenorm: bool,
    zero_centered_weight: bool,
    dropout_mask: Tensor | None,
    dropout_mask1: Tensor | None,
    upcast: bool,
) -> Tensor | tuple[Tensor, ...]:
    out_dtype = x.dtype
    if upcast:

        def up(t: Tensor | None) -> Tensor | None:
            return t.float() if t is not None else None

        x, weight = x.float(), weight.float()
        bias, residual, x1, weight1, bias1 = up(bias), up(residual), up(x1), up(weight1), up(bias1)
    if zero_centered_weight:
        weight = weight + 1.0
        weight1 = weight1 + 1.0 if weight1 is not None else None
    if x1 is not None and rowscale is not None:
        raise FlashAttnValueError("rowscale is not supported together with x1")
    if rowscale is not None:
        x = x * rowscale[..., None]
    if dropout_p > 0.0:
        x = _ref_dropout(x, dropout_mask, dropout_p)
        x1 = _ref_dropout(x1, dropout_mask1, dropout_p) if x1 is not None else None
    h = x + x1 if x1 is not None else x
    if residual is not None:
        h = (h + residual).to(h.dtype)

    def normalize(w: Tensor, b: Tensor | None) -> Tensor:
        if is_rms_norm:
            y = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps) * w
            y = y + b if b is not None else y
        else:
            y = F.layer_norm(h.to(w.dtype), h.shape[-1:], weight=w, bias=b, eps=eps)
        return y.to(out_dtype)

    outs = [normalize(weight, bias)]
    if weight1 is not None:
        outs.append(normalize(weight1, bias1))
    if prenorm:
        outs.append(h)
    return outs[0] if len(outs) == 1 else tuple(outs)


def layer_norm_ref(
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
    zero_centered_weight: bool = False,
    dropout_mask: Tensor | None = None,
    dropout_mask1: Tensor | None = None,
    upcast: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Plain-PyTorch LayerNorm reference (same arguments and returns as :func:`layer_norm_fn`, no
    ``residual_in_fp32``). Computes in the inputs' dtypes, or in fp32 with ``upcast``; with given
    ``dropout_mask`` / ``dropout_mask1`` (bool, ``x``-shaped) it applies those masks."""
    return _norm_ref(
        False, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        zero_centered_weight, dropout_mask, dropout_mask1, upcast,
    )  # fmt: skip


def rms_norm_ref(
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
    zero_centered_weight: bool = False,
    dropout_mask: Tensor | None = None,
    dropout_mask1: Tensor | None = None,
    upcast: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Plain-PyTorch RMSNorm reference; see :func:`layer_norm_ref`."""
    return _norm_ref(
        True, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        zero_centered_weight, dropout_mask, dropout_mask1, upcast,
    )  # fmt: skip
