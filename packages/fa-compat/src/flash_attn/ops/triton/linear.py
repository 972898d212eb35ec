"""``flash_attn.ops.triton.linear``: flash-attn 2.8.x's linear layer with a fused activation, and the
matching input-gradient product with the activation's derivative.

* :func:`triton_linear_act`: ``activation(x @ weight.T + bias)``, optionally also returning the
  pre-activation ``x @ weight.T + bias`` (``save_act_input=True``) for the backward;
* :func:`triton_dgrad_act`: ``(grad_output @ weight) * activation'(act_input)``: the gradient of the
  pre-activation of a layer whose activated output fed ``F.linear(., weight)``, from that linear layer's
  output gradient and the saved pre-activation (``"id"``: ``grad_output @ weight``).

``activation`` is one of ``"id"`` (none), ``"gelu"`` (exact, ``erf``), ``"gelu_approx"`` (tanh
approximation) and ``"squared_relu"``; the derivatives are those of
:mod:`flash_attn.ops.triton.k_activations`. Inputs are float tensors of one dtype on one device; results have
that dtype. Neither function records an autograd graph (as flash-attn's, whose kernels write into fresh
buffers); they are the building blocks of :class:`flash_attn.ops.triton.mlp.FusedDenseSqreluDenseFunc`.

The matrix product is ``F.linear`` / ``torch.matmul`` (cuBLAS on GPUs, with its float32 accumulation for
half-precision inputs) under autocast disabled, as flash-attn's kernels ignore autocast. The activation (and,
in the backward, the derivative and the product with the gradient) is one element-wise Triton kernel built
on :mod:`~flash_attn.ops.triton.k_activations`, computing in float32 (float64 for float64), on CUDA tensors
and on CPU tensors under the interpreter (``TRITON_INTERPRET=1``); elsewhere (other CPU runs, other
devices, or while ``torch.compile`` / export / ``make_fx`` traces the call) the same arithmetic runs as
PyTorch element-wise operations. Hence the activation is applied to the pre-activation rounded to the
output dtype, which is exactly what ``save_act_input`` returns: the output always equals
``activation(act_input)``, whatever the dtype.

Differences from flash-attn, all supersets or fixes:

* any device and float dtype (float64 included); flash-attn's Triton GEMM needs a CUDA tensor;
* invalid arguments raise ``ValueError`` (unknown activation, shapes, a missing ``act_input``) or
  ``TypeError`` (mixed dtypes, non-tensors) where flash-attn fails an ``assert``;
* every output row is written exactly once (flash-attn's forward kernel stores whole blocks without a mask,
  writing past the output when the row count is not a multiple of the block size).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fa_core.validation import interpreting, traced
from flash_attn.ops.triton.k_activations import (
    _wide,
    gelu,
    gelu_approx,
    gelu_approx_grad,
    gelu_grad,
    squared_relu,
    squared_relu_grad,
)

__all__ = ["triton_dgrad_act", "triton_linear_act"]

#: the ``activation`` values both functions take
ACTIVATIONS = ("id", "gelu", "gelu_approx", "squared_relu")
#: elements per program of the element-wise kernels
_BLOCK = 1024


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _activation_kernel(PRE, OUT, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = ACTIVATION(PRE[i]) for i < n (both contiguous, of one dtype)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pre = _wide(tl.load(PRE + offs, mask=mask, other=0.0))
    if ACTIVATION == "gelu":
        out = gelu(pre)
    elif ACTIVATION == "gelu_approx":
        out = gelu_approx(pre)
    else:  # squared_relu
        out = squared_relu(pre)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _activation_grad_kernel(G, ACT_IN, OUT, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = G[i] * ACTIVATION'(ACT_IN[i]) for i < n (contiguous; OUT has G's dtype; OUT may be G)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = _wide(tl.load(G + offs, mask=mask, other=0.0))
    act_in = _wide(tl.load(ACT_IN + offs, mask=mask, other=0.0))
    if ACTIVATION == "gelu":
        d = gelu_grad(act_in)
    elif ACTIVATION == "gelu_approx":
        d = gelu_approx_grad(act_in)
    else:  # squared_relu
        d = squared_relu_grad(act_in)
    tl.store(OUT + offs, (g * d).to(OUT.dtype.element_ty), mask=mask)


def _use_triton(t: Tensor) -> bool:
    """The element-wise Triton kernels run on CUDA tensors, and on CPU tensors under the interpreter, unless a
    tracer records the call."""
    if traced(t):
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def _launch(kernel: Any, activation: str, out: Tensor, *inputs: Tensor) -> None:
    n = out.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        kernel[grid](*inputs, out, n, ACTIVATION=activation, BLOCK=_BLOCK)


# ------------------------------------------------------------------------------ PyTorch arithmetic
def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _activation_torch(activation: str, pre: Tensor) -> Tensor:
    """The activation of ``pre`` in float32 (float64 for float64), as the kernel computes it."""
    x = pre.to(_wide_dtype(pre.dtype))
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_approx":
        return F.gelu(x, approximate="tanh")
    return torch.relu(x).square()


def _activation_grad_torch(activation: str, act_in: Tensor, dtype: torch.dtype) -> Tensor:
    """The activation's derivative at ``act_in``, in the wide dtype of ``dtype``."""
    x = act_in.to(_wide_dtype(dtype))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * 0.5**0.5))
        pdf = torch.exp(-0.5 * x * x) * (2.0 * torch.pi) ** -0.5
        return cdf + x * pdf
    if activation == "gelu_approx":
        scale = (2.0 / torch.pi) ** 0.5
        t = torch.tanh(scale * x * (1.0 + 0.044715 * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * scale * (1.0 + 3.0 * 0.044715 * x * x)
    return 2.0 * torch.relu(x)


# --------------------------------------------------------------------------------------- checks
def _check_activation(activation: object) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return str(activation)


def _check_tensor(name: str, t: object, ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if ndim is None and t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def _check_same(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{ref_name} and {name} must have the same dtype, got {ref.dtype} and {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{ref_name} and {name} must be on the same device, got {ref.device} and {t.device}")


def _autocast_off(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    device_type = t.device.type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


# ------------------------------------------------------------------------------------------- API
def _apply_activation(activation: str, pre: Tensor) -> Tensor:
    """``activation(pre)`` in ``pre``'s dtype (``pre`` contiguous)."""
    if _use_triton(pre):
        out = torch.empty_like(pre)
        _launch(_activation_kernel, activation, out, pre)
        return out
    return _activation_torch(activation, pre).to(pre.dtype)


def _apply_activation_grad(activation: str, grad: Tensor, act_in: Tensor) -> Tensor:
    """``grad * activation'(act_in)`` in ``grad``'s dtype (``grad``: a contiguous temporary, overwritten by
    the kernel; ``act_in``: of its numel)."""
    act_in = act_in.reshape(grad.shape).contiguous()
    if _use_triton(grad):
        _launch(_activation_grad_kernel, activation, grad, grad, act_in)  # in place: element-wise
        return grad
    return (grad.to(_wide_dtype(grad.dtype)) * _activation_grad_torch(activation, act_in, grad.dtype)).to(
        grad.dtype
    )


def triton_linear_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "id",
    save_act_input: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``activation(x @ weight.T + bias)``.

    Arguments:
        x: (..., in_features).
        weight: (out_features, in_features), ``x``'s dtype and device.
        bias: (out_features,) or None, ``x``'s dtype and device.
        activation: ``"id"``, ``"gelu"``, ``"gelu_approx"`` or ``"squared_relu"``.
        save_act_input: also return the pre-activation.
    Return:
        output: (..., out_features) in ``x``'s dtype; with ``save_act_input`` the tuple
        ``(output, act_input)``, act_input (..., out_features) the pre-activation ``x @ weight.T + bias``.
    """
    activation = _check_activation(activation)
    x = _check_tensor("x", x)
    weight = _check_tensor("weight", weight, ndim=2)
    _check_same("weight", weight, "x", x)
    if bias is not None:
        bias = _check_tensor("bias", bias, ndim=1)
        _check_same("bias", bias, "x", x)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must be weight's in_features ({in_features}): x "
            f"{tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(
            f"bias must have weight's out_features ({out_features}) entries, got {bias.shape[0]}"
        )
    batch_shape = x.shape[:-1]
    with torch.no_grad(), _autocast_off(x):
        pre = F.linear(x.reshape(-1, in_features), weight, bias).contiguous()
        out = pre if activation == "id" else _apply_activation(activation, pre)
    out = out.reshape(*batch_shape, out_features)
    if not save_act_input:
        return out
    act_input = pre.clone() if activation == "id" else pre
    return out, act_input.reshape(*batch_shape, out_features)


def triton_dgrad_act(
    grad_output: Tensor,
    weight: Tensor,
    activation: str = "id",
    act_input: Tensor | None = None,
) -> Tensor:
    """``(grad_output @ weight) * activation'(act_input)``.

    Arguments:
        grad_output: (..., out_features), the gradient of ``F.linear(h, weight)``'s output.
        weight: (out_features, in_features), ``grad_output``'s dtype and device.
        activation: ``"id"``, ``"gelu"``, ``"gelu_approx"`` or ``"squared_relu"``.
        act_input: (..., in_features), the pre-activation ``h`` was computed from (``h = activation(act_input)``),
            any float dtype, on ``grad_output``'s device; required unless ``activation="id"`` (then unused).
    Return:
        grad_input: (..., in_features) in ``grad_output``'s dtype, the gradient of ``act_input``.
    """
    activation = _check_activation(activation)
    grad_output = _check_tensor("grad_output", grad_output)
    weight = _check_tensor("weight", weight, ndim=2)
    _check_same("weight", weight, "grad_output", grad_output)
    out_features, in_features = weight.shape
    if grad_output.shape[-1] != out_features:
        raise ValueError(
            f"grad_output's last dimension ({grad_output.shape[-1]}) must be weight's out_features "
            f"({out_features}): grad_output {tuple(grad_output.shape)}, weight {tuple(weight.shape)}"
        )
    batch_shape = grad_output.shape[:-1]
    if activation != "id":
        if act_input is None:
            raise ValueError(f"act_input is required for activation {activation!r}")
        act_input = _check_tensor("act_input", act_input)
        if act_input.device != grad_output.device:
            raise ValueError(
                f"act_input must be on grad_output's device ({grad_output.device}), got {act_input.device}"
            )
        if act_input.shape[-1] != in_features or act_input.numel() != batch_shape.numel() * in_features:
            raise ValueError(
                f"act_input must have shape (..., {in_features}) with grad_output's {batch_shape.numel()} rows, "
                f"got {tuple(act_input.shape)}"
            )
    with torch.no_grad(), _autocast_off(grad_output):
        grad = torch.matmul(grad_output.reshape(-1, out_features), weight).contiguous()
        if activation != "id" and act_input is not None:  # act_input is checked above
            grad = _apply_activation_grad(activation, grad, act_input.detach())
    return grad.reshape(*batch_shape, in_features)
