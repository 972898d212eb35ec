"""``flash_attn.modules.mlp``: flash-attn 2.8.x's feed-forward blocks ``Mlp`` and ``GatedMlp``.

Both are built from ``nn.Linear`` layers with the same parameter names (``fc1``, ``fc2``), shapes and defaults
as flash-attn, so state dicts load either way. The fused CUDA variants (``FusedMLP``) and the tensor-parallel
ones (``ParallelMLP``, ``ParallelGatedMlp``) are not provided.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_attn.ops.activations import swiglu

__all__ = ["GatedMlp", "Mlp"]


class Mlp(nn.Module):
    """``fc2(activation(fc1(x)))``.

    Input ``x`` (..., in_features) -> (..., out_features); with ``return_residual`` the pair ``(out, x)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: Callable[[Tensor], Tensor] = F.gelu,
        bias1: bool = True,
        bias2: bool = True,
        return_residual: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: size of the input's last dimension.
            hidden_features: width of the hidden layer; default ``4 * in_features``.
            out_features: size of the output's last dimension; default ``in_features``.
            activation: element-wise function applied to the hidden layer.
            bias1, bias2: whether ``fc1`` / ``fc2`` have a bias.
            return_residual: also return the input (for post-norm blocks that add it afterwards).
        """
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = out_features if out_features is not None else in_features
        hidden_features = hidden_features if hidden_features is not None else 4 * in_features
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """x: (..., in_features) -> (..., out_features), or ``(out, x)`` with ``return_residual``."""
        y = self.fc2(self.activation(self.fc1(x)))
        return (y, x) if self.return_residual else y


class GatedMlp(nn.Module):
    """Gated linear unit feed-forward: ``fc2(value * activation(gate))`` with ``value, gate = fc1(x).chunk(2)``.

    ``fc1`` maps to ``2 * hidden_features``: the first half of its output is the value, the second half the
    gate. ``activation=F.sigmoid`` is GLU (``F.glu``), ``activation=F.silu`` is SwiGLU
    (:func:`flash_attn.ops.activations.swiglu`), any other callable is applied to the gate.
    Input ``x`` (..., in_features) -> (..., out_features); with ``return_residual`` the pair ``(out, x)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: Callable[[Tensor], Tensor] = F.sigmoid,
        bias1: bool = True,
        bias2: bool = True,
        multiple_of: int = 128,
        return_residual: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: size of the input's last dimension.
            hidden_features: width of the gated hidden layer; default ``int(8 * in_features / 3)``, in every
                case rounded up to a multiple of ``multiple_of``.
            out_features: size of the output's last dimension; default ``in_features``.
            activation: applied to the gate (see the class docstring for the GLU / SwiGLU cases).
            bias1, bias2: whether ``fc1`` / ``fc2`` have a bias.
            return_residual: also return the input.
        """
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = out_features if out_features is not None else in_features
        hidden_features = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden_features = -(-hidden_features // multiple_of) * multiple_of
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias1, **factory_kwargs)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """x: (..., in_features) -> (..., out_features), or ``(out, x)`` with ``return_residual``."""
        y = self.fc1(x)
        if self.activation is F.sigmoid:
            y = F.glu(y, dim=-1)
        else:
            value, gate = y.chunk(2, dim=-1)
            y = swiglu(gate, value) if self.activation is F.silu else value * self.activation(gate)
        y = self.fc2(y)
        return (y, x) if self.return_residual else y
