"""``flash_attn.ops.rms_norm``: flash-attn 2.8.x's fused dropout + residual add + RMSNorm, on Triton.

The RMSNorm counterparts of :mod:`flash_attn.ops.layer_norm` (same autograd Functions with ``is_rms_norm``,
same shapes, dtypes, return values and dropout-mask contract): ``norm(x) = x / sqrt(mean(x ** 2) + eps)``,
then ``* weight (+ bias)``. The bias is optional here as in flash-attn; the modules have none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import init

from flash_attn.ops.layer_norm import (
    DropoutAddLayerNormFn,
    DropoutAddLayerNormParallelResidualFn,
    DropoutAddLayerNormSubsetFn,
)

__all__ = [
    "DropoutAddRMSNorm",
    "RMSNorm",
    "dropout_add_rms_norm",
    "dropout_add_rms_norm_parallel_residual",
    "dropout_add_rms_norm_subset",
    "rms_norm",
]


def rms_norm(x: Tensor, weight: Tensor, epsilon: float) -> Tensor:
    """RMSNorm over the last dimension: ``x`` (..., N), ``weight`` (N,); returns (..., N) in ``x``'s dtype."""
    return DropoutAddLayerNormFn.apply(x, None, weight, None, None, None, 0.0, epsilon, False, False, True)


def dropout_add_rms_norm(
    x0: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    dropout_p: float,
    epsilon: float,
    rowscale: Tensor | None = None,
    layerscale: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Any:
    """``RMSNorm(dropout(x0 * rowscale * layerscale) + residual)``, fused; arguments, shapes and returns as
    :func:`flash_attn.ops.layer_norm.dropout_add_layer_norm` (``bias`` may be None)."""
    return DropoutAddLayerNormFn.apply(
        x0, residual, weight, bias, rowscale, layerscale, dropout_p, epsilon, residual_in_fp32, prenorm, True,
        return_dropout_mask,
    )  # fmt: skip


def dropout_add_rms_norm_subset(
    x0: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    dropout_p: float,
    epsilon: float,
    layerscale: Tensor | None = None,
    x0_subset: Tensor | None = None,
    out_subset: Tensor | None = None,
    rowscale_const: float = 1.0,
    out_numrows: int = 0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Any:
    """:func:`dropout_add_rms_norm` on row subsets; arguments, shapes and returns as
    :func:`flash_attn.ops.layer_norm.dropout_add_layer_norm_subset`."""
    return DropoutAddLayerNormSubsetFn.apply(
        x0, residual, weight, bias, layerscale, x0_subset, out_subset, dropout_p, epsilon, rowscale_const,
        out_numrows, residual_in_fp32, prenorm, True, return_dropout_mask,
    )  # fmt: skip


def dropout_add_rms_norm_parallel_residual(
    x0: Tensor,
    x1: Tensor | None,
    residual: Tensor | None,
    weight0: Tensor,
    bias0: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    dropout_p: float,
    epsilon: float,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Any:
    """RMSNorm of ``dropout(x0) + dropout(x1) + residual`` with two weight sets; arguments, shapes and returns
    as :func:`flash_attn.ops.layer_norm.dropout_add_layer_norm_parallel_residual`."""
    return DropoutAddLayerNormParallelResidualFn.apply(
        x0, x1, residual, weight0, bias0, weight1, bias1, dropout_p, epsilon, residual_in_fp32, prenorm, True,
        return_dropout_mask,
    )  # fmt: skip


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension (``hidden_size``) with a weight (ones) and no bias;
    ``forward(x)`` returns ``x``'s shape and dtype."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class DropoutAddRMSNorm(torch.nn.Module):
    """``RMSNorm(dropout(x0) + residual)`` over ``hidden_size`` with a weight (ones) and no bias; dropout
    ``p`` applies in training mode only. ``forward(x0, residual=None)`` returns ``out``, or ``(out, x)`` with
    ``prenorm`` (see :func:`dropout_add_rms_norm`)."""

    def __init__(
        self,
        hidden_size: int,
        prenorm: bool = False,
        p: float = 0.0,
        eps: float = 1e-5,
        residual_in_fp32: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.p = p
        self.eps = eps
        self.residual_in_fp32 = residual_in_fp32
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)

    def forward(self, x0: Tensor, residual: Tensor | None = None) -> Any:
        return dropout_add_rms_norm(
            x0,
            residual,
            self.weight,
            None,
            self.p if self.training else 0.0,
            self.eps,
            prenorm=self.prenorm,
            residual_in_fp32=self.residual_in_fp32,
        )
