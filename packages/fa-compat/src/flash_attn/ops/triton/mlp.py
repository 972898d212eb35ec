"""``flash_attn.ops.triton.mlp``: flash-attn 2.8.x's MLP with a squared-ReLU activation,
``fc2(relu(fc1(x)) ** 2)``, with the activation fused into the first linear layer's output and its
derivative into the input-gradient product of the second.

* :class:`FusedDenseSqreluDenseFunc` (``apply(x, weight1, bias1, weight2, bias2, checkpoint_lvl=0)``) /
  :func:`fused_dense_sqrelu_dense_function` (its ``apply``): the autograd Function. ``checkpoint_lvl`` says
  what the backward recomputes: 0 nothing (the pre-activation and the activation output are kept), 1 the
  activation output (only the pre-activation is kept), 2 both (only the input and the weights are kept).
  The gradients are the same at every level.
* :class:`FusedDenseSqreluDense`: the module, ``fc1`` / ``fc2`` ``nn.Linear`` layers (``in_features ->
  hidden_features`` (default ``4 * in_features``) ``-> out_features`` (default ``in_features``)), so state
  dicts are those of flash-attn's module and of :class:`flash_attn.modules.mlp.Mlp` with
  ``activation=sqrelu_fwd``.

The products and the fused activation are :func:`flash_attn.ops.triton.linear.triton_linear_act` /
:func:`~flash_attn.ops.triton.linear.triton_dgrad_act` (see there), the weight and bias gradients plain
matrix products and sums. Under ``torch.autocast`` (on the input's device type) the forward casts the input,
weights and biases to the autocast dtype, and the backward computes in that dtype; without autocast
everything runs in the input's dtype (one float dtype for the input, weights and biases).

Differences from flash-attn, all supersets:

* any device and float dtype (flash-attn's module asserts a CUDA input, its Function needs its CUDA
  extension ``fused_dense_lib``), and the autocast of the input's device type (flash-attn: CUDA's);
* ``bias1`` / ``bias2`` may be None in the Function and False in the module (flash-attn asserts both present);
* invalid arguments raise ``ValueError`` / ``TypeError`` naming the argument where flash-attn asserts;
* the backward computes only the gradients autograd asks for.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from flash_attn.ops._dense_layers import _autocast_state
from flash_attn.ops.triton.linear import _apply_activation, _autocast_off, triton_dgrad_act, triton_linear_act

__all__ = ["FusedDenseSqreluDense", "FusedDenseSqreluDenseFunc", "fused_dense_sqrelu_dense_function"]

_CHECKPOINT_LVLS = (0, 1, 2)


def _check_checkpoint_lvl(checkpoint_lvl: Any) -> int:
    if isinstance(checkpoint_lvl, Tensor) or checkpoint_lvl not in _CHECKPOINT_LVLS:
        raise ValueError(f"checkpoint_lvl must be 0, 1 or 2, got {checkpoint_lvl!r}")
    return int(checkpoint_lvl)


def _check_param(name: str, t: object, shape: tuple[int, ...], x: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    return t


def _check_args(
    x: Any, weight1: Any, bias1: Any, weight2: Any, bias2: Any
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Check the Function's tensors; under autocast (on ``x``'s device type) cast them to its dtype."""
    for name, t in (("x", x), ("weight1", weight1), ("weight2", weight2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias1", bias1), ("bias2", bias2)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a scalar")
    if weight1.dim() != 2 or weight2.dim() != 2:
        raise ValueError(
            "weight1 / weight2 must be 2-D, (hidden_features, in_features) / (out_features, hidden_features); "
            f"got {tuple(weight1.shape)} / {tuple(weight2.shape)}"
        )
    _, autocast_on, dtype = _autocast_state(x)
    if autocast_on:
        x, weight1, weight2 = x.to(dtype), weight1.to(dtype), weight2.to(dtype)
        bias1 = bias1.to(dtype) if bias1 is not None else None
        bias2 = bias2.to(dtype) if bias2 is not None else None
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    hidden_features, in_features = weight1.shape
    out_features = weight2.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must be weight1's in_features ({in_features})")
    _check_param("weight1", weight1, (hidden_features, in_features), x)
    _check_param("weight2", weight2, (out_features, hidden_features), x)
    if bias1 is not None:
        _check_param("bias1", bias1, (hidden_features,), x)
    if bias2 is not None:
        _check_param("bias2", bias2, (out_features,), x)
    return x, weight1, bias1, weight2, bias2


def _linear_sqrelu(x_rows: Tensor, weight1: Tensor, bias1: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(sqrelu(pre), pre)`` with ``pre = F.linear(x_rows, weight1, bias1)``."""
    result = triton_linear_act(x_rows, weight1, bias1, activation="squared_relu", save_act_input=True)
    return cast(tuple[Tensor, Tensor], result)


def _rows(t: Tensor) -> Tensor:
    """(..., n) -> (rows, n)."""
    return t.reshape(-1, t.shape[-1])


class FusedDenseSqreluDenseFunc(torch.autograd.Function):
    """``F.linear(sqrelu(F.linear(x, weight1, bias1)), weight2, bias2)`` with ``sqrelu(a) = relu(a) ** 2``,
    keeping what ``checkpoint_lvl`` says for the backward (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight1: Tensor,
        bias1: Tensor | None,
        weight2: Tensor,
        bias2: Tensor | None,
        checkpoint_lvl: int = 0,
    ) -> Tensor:
        """
        Arguments:
            x: (..., in_features).
            weight1: (hidden_features, in_features); bias1: (hidden_features,) or None.
            weight2: (out_features, hidden_features); bias2: (out_features,) or None.
            checkpoint_lvl: 0, 1 or 2.
        Return:
            (..., out_features), in ``x``'s dtype (the autocast dtype under autocast).
        """
        checkpoint_lvl = _check_checkpoint_lvl(checkpoint_lvl)
        x, weight1, bias1, weight2, bias2 = _check_args(x, weight1, bias1, weight2, bias2)
        out_features = weight2.shape[0]
        x = x.contiguous()
        weight1, weight2 = weight1.contiguous(), weight2.contiguous()
        output1, act_input = _linear_sqrelu(_rows(x), weight1, bias1)
        output2 = cast(Tensor, triton_linear_act(output1, weight2, bias2))
        ctx.checkpoint_lvl = checkpoint_lvl
        ctx.save_for_backward(
            x,
            weight1,
            bias1,
            weight2,
            act_input if checkpoint_lvl < 2 else None,
            output1 if checkpoint_lvl == 0 else None,
        )
        return output2.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight1, bias1, weight2, act_input, output1 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x_rows = _rows(x)
        # the forward's autocast state does not matter: every tensor already has the compute dtype
        with torch.no_grad(), _autocast_off(x):
            if act_input is None:  # checkpoint_lvl 2: the pre-activation from the input
                output1, act_input = _linear_sqrelu(x_rows, weight1, bias1)
            grad_rows = _rows(grad_output.to(x.dtype).contiguous())
            grad_weight2 = grad_bias2 = None
            if needs[3]:
                if output1 is None:  # checkpoint_lvl 1: the activation output from the pre-activation
                    output1 = _apply_activation("squared_relu", act_input)
                grad_weight2 = grad_rows.t() @ output1
            if needs[4]:  # False for a None bias
                grad_bias2 = grad_rows.sum(0)
            grad_input = grad_weight1 = grad_bias1 = None
            if needs[0] or needs[1] or needs[2]:
                grad_act_input = triton_dgrad_act(
                    grad_rows, weight2, activation="squared_relu", act_input=act_input
                )
                if needs[0]:
                    grad_input = (grad_act_input @ weight1).reshape(x.shape)
                if needs[1]:
                    grad_weight1 = grad_act_input.t() @ x_rows
                if needs[2]:
                    grad_bias1 = grad_act_input.sum(0)
        return grad_input, grad_weight1, grad_bias1, grad_weight2, grad_bias2, None


#: ``FusedDenseSqreluDenseFunc.apply(x, weight1, bias1, weight2, bias2, checkpoint_lvl=0)``
fused_dense_sqrelu_dense_function = FusedDenseSqreluDenseFunc.apply


class FusedDenseSqreluDense(nn.Module):
    """``fc2(relu(fc1(x)) ** 2)`` through :class:`FusedDenseSqreluDenseFunc`.

    Arguments:
        in_features: width of the input.
        hidden_features: width of ``fc1``'s output; None means ``4 * in_features``.
        out_features: width of the output; None means ``in_features``.
        bias1, bias2: whether ``fc1`` / ``fc2`` have a bias.
        checkpoint_lvl: 0 (nothing recomputed in the backward), 1 (the activation output recomputed) or 2
            (the pre-activation and the activation output recomputed): slower but less memory as it grows.
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias1: bool = True,
        bias2: bool = True,
        checkpoint_lvl: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint_lvl = _check_checkpoint_lvl(checkpoint_lvl)
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features * 4
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return fused_dense_sqrelu_dense_function(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.checkpoint_lvl
        )
