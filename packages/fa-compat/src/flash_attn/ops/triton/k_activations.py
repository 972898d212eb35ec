"""``flash_attn.ops.triton.k_activations``: flash-attn 2.8.x's element-wise activations as Triton device
functions (``@triton.jit``), to be called inside Triton kernels, and their gradients.

Each takes a Triton tensor ``x`` (any shape) and returns a tensor of ``x``'s shape and dtype:

* :func:`relu` ``max(x, 0)`` / :func:`relu_grad` ``1 if x >= 0 else 0``;
* :func:`leaky_relu` ``x if x >= 0 else 0.01 * x`` / :func:`leaky_relu_grad` ``1 if x >= 0 else 0.01``;
* :func:`squared_relu` ``relu(x) ** 2`` / :func:`squared_relu_grad` ``2 * relu(x)``;
* :func:`gelu` ``x * Phi(x)`` (exact, through ``erf``) / :func:`gelu_grad` ``Phi(x) + x * phi(x)``;
* :func:`gelu_approx` ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))`` /
  :func:`gelu_approx_grad` its derivative;
* :func:`tanh` and :func:`cosh`, the helpers (``tanh(x) = 2 * sigmoid(2 * x) - 1``).

The ``*_grad`` functions return the derivative at ``x`` (the pre-activation), to be multiplied by the incoming
gradient. :class:`Activation` names the five activations (a ``str`` enum: ``"relu"``, ``"leaky_relu"``,
``"squared_relu"``, ``"gelu"``, ``"gelu_approx"``); :func:`get_triton_activation_kernel` /
:func:`get_triton_activation_bwd_kernel` map a name (or None) to the device function (or None), e.g. to pass
as a ``tl.constexpr`` kernel argument.

Differences from flash-attn, all fixes or supersets:

* the arithmetic runs in float32 (float64 for float64 inputs) and the result is cast back to ``x``'s dtype,
  so float16 / bfloat16 inputs work in every function (flash-attn computes in ``x``'s dtype, and its
  ``gelu`` / ``gelu_grad`` call ``tl.libdevice.erf``, which current Triton no longer has: ``tl.math.erf``
  here);
* :func:`gelu_approx_grad` is the exact derivative of :func:`gelu_approx` (``sqrt(2 / pi)`` to double
  precision; flash-attn's uses the rounded constants ``0.79788456`` / ``0.1070322243``);
* the ``get_*`` functions also take the plain strings (``"gelu"``), and an unknown name raises ``ValueError``
  listing the known ones (flash-attn: ``KeyError`` for both).
"""

from __future__ import annotations

import math
from enum import Enum

import triton
import triton.language as tl

__all__ = [
    "Activation",
    "cosh",
    "gelu",
    "gelu_approx",
    "gelu_approx_grad",
    "gelu_grad",
    "get_triton_activation_bwd_kernel",
    "get_triton_activation_kernel",
    "leaky_relu",
    "leaky_relu_grad",
    "relu",
    "relu_grad",
    "squared_relu",
    "squared_relu_grad",
    "tanh",
]

# Comparisons and arithmetic run on the widened value (float32 / float64): besides precision, Triton's CPU
# interpreter compares bfloat16 values wrongly. A constexpr is always the right operand of an arithmetic
# operator with a tensor: the interpreter wraps ``constexpr * tensor`` in a constexpr.

#: sqrt(2 / pi), the tanh GeLU's scale
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(math.sqrt(2.0 / math.pi))
#: the tanh GeLU's cubic coefficient
_CUBIC: tl.constexpr = tl.constexpr(0.044715)
#: 1 / sqrt(2): erf's argument scale in the exact GeLU
_RSQRT_2: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0))
#: 1 / sqrt(2 pi): the standard normal density's normalization
_RSQRT_2PI: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
#: leaky ReLU's negative slope
_LEAKY_SLOPE: tl.constexpr = tl.constexpr(0.01)


class Activation(str, Enum):
    """The activations with a Triton forward and backward here."""

    SquaredReLU = "squared_relu"
    GeLU = "gelu"
    GeLUApprox = "gelu_approx"
    LeakyReLU = "leaky_relu"
    ReLU = "relu"


@triton.jit
def _wide(x):
    """``x`` in float32, or unchanged when it is float64."""
    if x.dtype.is_fp64():
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def tanh(x):
    """Hyperbolic tangent, as ``2 * sigmoid(2 * x) - 1``."""
    xw = _wide(x)
    return (2.0 * tl.sigmoid(2.0 * xw) - 1.0).to(x.dtype)


@triton.jit
def cosh(x):
    """Hyperbolic cosine, ``(exp(x) + exp(-x)) / 2``."""
    xw = _wide(x)
    return (0.5 * (tl.exp(xw) + tl.exp(-xw))).to(x.dtype)


@triton.jit
def relu(x):
    """ReLU: ``x`` where ``x >= 0``, else 0."""
    return tl.where(_wide(x) >= 0, x, 0.0).to(x.dtype)


@triton.jit
def relu_grad(x):
    """Derivative of :func:`relu` at ``x``: 1 where ``x >= 0``, else 0."""
    return tl.where(_wide(x) >= 0, 1.0, 0.0).to(x.dtype)


@triton.jit
def squared_relu(x):
    """Squared ReLU (Primer, arXiv:2109.08668): ``relu(x) ** 2``."""
    xw = _wide(x)
    r = tl.where(xw >= 0, xw, 0.0)
    return (r * r).to(x.dtype)


@triton.jit
def squared_relu_grad(x):
    """Derivative of :func:`squared_relu` at ``x``: ``2 * relu(x)``."""
    xw = _wide(x)
    return tl.where(xw >= 0, 2.0 * xw, 0.0).to(x.dtype)


@triton.jit
def leaky_relu(x):
    """Leaky ReLU with slope 0.01: ``x`` where ``x >= 0``, else ``0.01 * x``."""
    xw = _wide(x)
    return tl.where(xw >= 0, xw, xw * _LEAKY_SLOPE).to(x.dtype)


@triton.jit
def leaky_relu_grad(x):
    """Derivative of :func:`leaky_relu` at ``x``: 1 where ``x >= 0``, else 0.01."""
    xw = _wide(x)
    # the slope in the wide dtype (a bare float literal would be float32)
    return tl.where(xw >= 0, 1.0, tl.full(xw.shape, _LEAKY_SLOPE, xw.dtype)).to(x.dtype)


@triton.jit
def gelu(x):
    """Exact GeLU, ``x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))``."""
    xw = _wide(x)
    return (0.5 * xw * (1.0 + tl.math.erf(xw * _RSQRT_2))).to(x.dtype)


@triton.jit
def gelu_grad(x):
    """Derivative of :func:`gelu` at ``x``: ``Phi(x) + x * phi(x)`` (normal CDF and density)."""
    xw = _wide(x)
    cdf = 0.5 * (1.0 + tl.math.erf(xw * _RSQRT_2))
    pdf = tl.exp(-0.5 * xw * xw) * _RSQRT_2PI
    return (cdf + xw * pdf).to(x.dtype)


@triton.jit
def gelu_approx(x):
    """Tanh-approximated GeLU, ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))``."""
    xw = _wide(x)
    t = tanh(xw * _SQRT_2_OVER_PI * (1.0 + xw * xw * _CUBIC))
    return (0.5 * xw * (1.0 + t)).to(x.dtype)


@triton.jit
def gelu_approx_grad(x):
    """Derivative of :func:`gelu_approx` at ``x``:
    ``0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * sqrt(2 / pi) * (1 + 3 * 0.044715 * x ** 2)`` with ``t`` the
    tanh of the forward."""
    xw = _wide(x)
    t = tanh(xw * _SQRT_2_OVER_PI * (1.0 + xw * xw * _CUBIC))
    inner_grad = (1.0 + xw * xw * (3.0 * _CUBIC)) * _SQRT_2_OVER_PI
    return (0.5 * (1.0 + t) + 0.5 * xw * (1.0 - t * t) * inner_grad).to(x.dtype)


_FORWARD = {
    Activation.ReLU: relu,
    Activation.LeakyReLU: leaky_relu,
    Activation.GeLU: gelu,
    Activation.GeLUApprox: gelu_approx,
    Activation.SquaredReLU: squared_relu,
}
_BACKWARD = {
    Activation.ReLU: relu_grad,
    Activation.LeakyReLU: leaky_relu_grad,
    Activation.GeLU: gelu_grad,
    Activation.GeLUApprox: gelu_approx_grad,
    Activation.SquaredReLU: squared_relu_grad,
}


def _activation(activation: Activation | str) -> Activation:
    try:
        return Activation(activation)
    except ValueError:
        known = ", ".join(repr(a.value) for a in Activation)
        raise ValueError(f"unknown activation {activation!r}; known: {known}") from None


def get_triton_activation_kernel(activation: Activation | str | None) -> triton.JITFunction | None:
    """The device function of ``activation`` (an :class:`Activation` or its value), or None for None."""
    return _FORWARD[_activation(activation)] if activation else None


def get_triton_activation_bwd_kernel(activation: Activation | str | None) -> triton.JITFunction | None:
    """The derivative device function of ``activation`` (``relu_grad`` for ``"relu"``, ...), or None for
    None."""
    return _BACKWARD[_activation(activation)] if activation else None
