"""``flash_attn.ops.activations``: flash-attn 2.8.x's element-wise activation helpers, in plain PyTorch.

* GeLU, tanh approximation ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))``:
  :func:`gelu_fwd` / :func:`gelu_bwd`, with a bias added first :func:`bias_gelu` / :func:`bias_gelu_back`, and
  the autograd Functions :class:`FastGeLUFunction` (``fast_gelu_impl``) and :class:`GeLUFunction`
  (``bias_gelu_impl``).
* ReLU and squared ReLU: :func:`relu_bwd`, :func:`sqrelu_fwd`, :func:`sqrelu_bwd`.
* SwiGLU ``silu(x) * y``: :func:`swiglu_fwd`, :func:`swiglu_bwd` and :func:`swiglu`
  (:class:`SwiGLUFunction`), as used by :class:`flash_attn.modules.mlp.GatedMlp`.

Every function takes tensors of any shape, device and floating dtype. The arithmetic runs in float32 and the
result is cast back to the input's dtype (flash-attn's fused TorchScript / jiterator kernels compute in
float32 registers as well). Nothing is compiled at import time: these are eager PyTorch expressions, which
``torch.compile`` fuses when the caller compiles them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FastGeLUFunction",
    "GeLUFunction",
    "SwiGLUFunction",
    "bias_gelu",
    "bias_gelu_back",
    "bias_gelu_impl",
    "fast_gelu_impl",
    "gelu_bwd",
    "gelu_fwd",
    "relu_bwd",
    "sqrelu_bwd",
    "sqrelu_fwd",
    "swiglu",
    "swiglu_bwd",
    "swiglu_fwd",
]

#: sqrt(2 / pi)
_SQRT_2_OVER_PI = 0.79788456
#: sqrt(2 / pi) * 3 * 0.044715: the derivative of the cubic term inside the tanh
_CUBIC_GRAD = 0.1070322243
_CUBIC = 0.044715


def _gelu_tanh_f32(x: Tensor) -> Tensor:
    """Tanh-approximated GeLU of a float32 tensor."""
    return x * 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + _CUBIC * x * x)))


def _gelu_tanh_grad_f32(x: Tensor) -> Tensor:
    """d gelu_tanh(x) / dx of a float32 tensor."""
    tanh_out = torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + _CUBIC * x * x))
    return 0.5 * x * ((1.0 - tanh_out * tanh_out) * (_SQRT_2_OVER_PI + _CUBIC_GRAD * x * x)) + 0.5 * (
        1.0 + tanh_out
    )


def bias_gelu(y: Tensor, bias: Tensor) -> Tensor:
    """Tanh-approximated GeLU of ``y + bias``.

    Arguments:
        y: (..., D)
        bias: (D,), broadcast over the leading dimensions.
    Return:
        (..., D) in ``y``'s dtype.
    """
    return _gelu_tanh_f32(y.float() + bias.float()).to(dtype=y.dtype)


def bias_gelu_back(g: Tensor, y: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`bias_gelu`.

    Arguments:
        g: (..., D), gradient of the output.
        y: (..., D), the forward's input; bias: (D,).
    Return:
        ``(grad_y, grad_bias)``: grad_y (..., D) in ``y``'s dtype and grad_bias (D,) in ``bias``'s dtype, the
        sum of grad_y over every leading dimension (for flash-attn's 2-D ``(B, D)`` input: over dim 0).
    """
    grad = _gelu_tanh_grad_f32(y.float() + bias.float()) * g.float()
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0) if grad.dim() > 1 else grad
    return grad.to(dtype=y.dtype), grad_bias.to(dtype=bias.dtype)


class GeLUFunction(torch.autograd.Function):
    """Autograd Function of :func:`bias_gelu`: ``apply(input (..., D), bias (D,))``, gradients for both."""

    @staticmethod
    def forward(ctx, input: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(input, bias)
        return bias_gelu(input, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        input, bias = ctx.saved_tensors
        return bias_gelu_back(grad_output, input, bias)


bias_gelu_impl = GeLUFunction.apply


def gelu_fwd(x: Tensor) -> Tensor:
    """Tanh-approximated GeLU (``F.gelu(x, approximate="tanh")``), any shape, in ``x``'s dtype."""
    return _gelu_tanh_f32(x.float()).to(dtype=x.dtype)


def gelu_bwd(g: Tensor, x: Tensor) -> Tensor:
    """Gradient of :func:`gelu_fwd` with respect to ``x``, given the output gradient ``g`` (same shape)."""
    return (_gelu_tanh_grad_f32(x.float()) * g.float()).to(dtype=x.dtype)


class FastGeLUFunction(torch.autograd.Function):
    """Autograd Function of :func:`gelu_fwd` / :func:`gelu_bwd`: ``apply(input)``."""

    @staticmethod
    def forward(ctx, input: Tensor) -> Tensor:
        ctx.save_for_backward(input)
        return gelu_fwd(input)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (input,) = ctx.saved_tensors
        return gelu_bwd(grad_output, input)


fast_gelu_impl = FastGeLUFunction.apply


def relu_bwd(g: Tensor, x: Tensor) -> Tensor:
    """Gradient of ReLU given the output gradient ``g`` and the input ``x``: ``g`` where ``x >= 0``, else 0."""
    return torch.where(x >= 0, g, torch.zeros_like(g)).to(dtype=x.dtype)


def sqrelu_fwd(x: Tensor) -> Tensor:
    """Squared ReLU ``relu(x) ** 2``, in ``x``'s dtype."""
    r = F.relu(x.float())
    return (r * r).to(dtype=x.dtype)


def sqrelu_bwd(g: Tensor, x: Tensor) -> Tensor:
    """Gradient of :func:`sqrelu_fwd`: ``2 * g * relu(x)``, in ``x``'s dtype."""
    return (2.0 * g.float() * F.relu(x.float())).to(dtype=x.dtype)


def swiglu_fwd(x: Tensor, y: Tensor) -> Tensor:
    """SwiGLU ``silu(x) * y = x * sigmoid(x) * y`` of two same-shape tensors, in ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.sigmoid(xf) * y.float()).to(dtype=x.dtype)


def swiglu_bwd(x: Tensor, y: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients ``(dx, dy)`` of :func:`swiglu_fwd` given the output gradient ``g``, in ``x``'s dtype."""
    xf, yf, gf = x.float(), y.float(), g.float()
    sig = torch.sigmoid(xf)
    dx = sig * (1.0 + xf * (1.0 - sig)) * gf * yf
    dy = xf * sig * gf
    return dx.to(dtype=x.dtype), dy.to(dtype=x.dtype)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd Function of :func:`swiglu_fwd` / :func:`swiglu_bwd`: ``apply(x, y)``."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(x, y)
        return swiglu_fwd(x, y)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor]:
        x, y = ctx.saved_tensors
        return swiglu_bwd(x, y, dout)


def swiglu(x: Tensor, y: Tensor) -> Tensor:
    """``silu(x) * y`` (x the gate, y the value), differentiable with respect to both; shapes must match."""
    return SwiGLUFunction.apply(x, y)
