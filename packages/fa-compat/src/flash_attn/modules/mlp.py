"""``flash_attn.modules.mlp``: flash-attn 2.8.x's feed-forward blocks.

* :class:`Mlp` and :class:`GatedMlp`, built from ``nn.Linear`` layers;
* :class:`ParallelMLP` and :class:`ParallelGatedMlp`, their tensor-parallel variants: ``fc1`` a
  :class:`flash_attn.ops.fused_dense.ColumnParallelLinear` (this rank's hidden units; with
  ``sequence_parallel`` the input rows are all-gathered first), ``fc2`` a
  :class:`flash_attn.ops.fused_dense.RowParallelLinear` (the same hidden units, bias on the group's first rank)
  whose partial outputs are reduce-scattered along dim 0 (``sequence_parallel``) or all-reduced;
* :class:`FusedMLP` and :class:`ParallelFusedMLP`, re-exported from :mod:`flash_attn.ops.fused_dense` (as
  flash-attn's ``mlp`` module does).

Parameter names (``fc1``, ``fc2``), shapes, signatures and defaults are flash-attn's, so state dicts load either
way. Like :mod:`flash_attn.ops.fused_dense`, the parallel classes run on any device (plain PyTorch +
``torch.distributed``) and take ``process_group=None`` as one process without communication. A
``ParallelGatedMlp`` splits ``fc1`` in whole (value, gate) pairs, so each rank's value and gate halves line up
with its ``fc2`` columns for any world size (flash-attn splits ``fc1``'s rows one by one: the same shards when
the world size divides ``hidden_features``, a shape error in ``forward`` otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flash_attn.ops._dense_layers import _parallel_mlp_linears
from flash_attn.ops.activations import swiglu
from flash_attn.ops.fused_dense import FusedMLP, ParallelFusedMLP

__all__ = ["FusedMLP", "GatedMlp", "Mlp", "ParallelFusedMLP", "ParallelGatedMlp", "ParallelMLP"]


def _gated_hidden_features(in_features: int, hidden_features: int | None, multiple_of: int) -> int:
    """The gated hidden width: ``hidden_features`` (default ``int(8 * in_features / 3)``) rounded up to a
    multiple of ``multiple_of``."""
    hidden_features = hidden_features if hidden_features is not None else int(8 * in_features / 3)
    return -(-hidden_features // multiple_of) * multiple_of


def _gate(activation: Callable[[Tensor], Tensor], y: Tensor) -> Tensor:
    """``value * activation(gate)`` of ``value, gate = y.chunk(2, dim=-1)``: ``F.glu`` for ``F.sigmoid``,
    :func:`~flash_attn.ops.activations.swiglu` for ``F.silu``."""
    if activation is F.sigmoid:
        return F.glu(y, dim=-1)
    value, gate = y.chunk(2, dim=-1)
    return swiglu(gate, value) if activation is F.silu else value * activation(gate)


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
        hidden_features = _gated_hidden_features(in_features, hidden_features, multiple_of)
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias1, **factory_kwargs)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """x: (..., in_features) -> (..., out_features), or ``(out, x)`` with ``return_residual``."""
        y = self.fc2(_gate(self.activation, self.fc1(x)))
        return (y, x) if self.return_residual else y


class ParallelMLP(nn.Module):
    """:class:`Mlp` split over a process group: ``fc2(activation(fc1(x)))`` with ``fc1`` a
    :class:`~flash_attn.ops.fused_dense.ColumnParallelLinear` and ``fc2`` a
    :class:`~flash_attn.ops.fused_dense.RowParallelLinear` over the same hidden units.

    Input ``x``: with ``sequence_parallel`` this rank's rows ``(n, ..., in_features)`` (all-gathered along dim 0
    inside ``fc1``) -> this rank's rows of the output ``(n, ..., out_features)`` (reduce-scattered); else the
    full input on every rank -> the full output on every rank (all-reduced).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: Callable[[Tensor], Tensor] = F.gelu,
        process_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = True,
        bias1: bool = True,
        bias2: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: size of the input's last dimension.
            hidden_features: the full hidden width (split over the ranks); default ``4 * in_features``.
            out_features: size of the output's last dimension; default ``in_features``.
            activation: element-wise function applied to the hidden layer.
            process_group: the tensor-parallel group; None: one process (no communication).
            sequence_parallel: all-gather the input / reduce-scatter the output along dim 0 (else the input
                is replicated and the output all-reduced).
            bias1, bias2: whether ``fc1`` / ``fc2`` have a bias (``fc2``'s on the group's first rank only).
            device, dtype: of the parameters.
        """
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        hidden_features = hidden_features if hidden_features is not None else 4 * in_features
        fc1, fc2 = _parallel_mlp_linears(
            in_features,
            hidden_features,
            out_features,
            process_group,
            bias1=bias1,
            bias2=bias2,
            sequence_parallel=sequence_parallel,
            device=device,
            dtype=dtype,
        )
        self.fc1 = fc1
        self.activation = activation
        self.fc2 = fc2

    def forward(self, x: Tensor) -> Tensor:
        """x: (n, ..., in_features) -> (n, ..., out_features) (rows as in the class docstring)."""
        return self.fc2(self.activation(self.fc1(x)))


class ParallelGatedMlp(nn.Module):
    """:class:`GatedMlp` split over a process group: ``fc1`` a
    :class:`~flash_attn.ops.fused_dense.ColumnParallelLinear` holding this rank's value rows followed by its
    gate rows (the rows ``[value_r; gate_r]`` of the full ``fc1``), ``fc2`` a
    :class:`~flash_attn.ops.fused_dense.RowParallelLinear` over the same hidden units. The activation cases are
    :class:`GatedMlp`'s (GLU for ``F.sigmoid``, SwiGLU for ``F.silu``).

    Input / output rows as in :class:`ParallelMLP` (``sequence_parallel``: this rank's rows of dim 0; else
    the full tensor on every rank).
    """

    def __init__(
        self,
        in_features: int,
        process_group: dist.ProcessGroup | None,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: Callable[[Tensor], Tensor] = F.sigmoid,
        bias1: bool = True,
        bias2: bool = True,
        multiple_of: int = 128,
        sequence_parallel: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: size of the input's last dimension.
            process_group: the tensor-parallel group; None: one process (no communication).
            hidden_features: the full gated hidden width; default ``int(8 * in_features / 3)``, in every case
                rounded up to a multiple of ``multiple_of``; split over the ranks with
                :func:`flash_attn.utils.distributed.get_dim_for_local_rank`.
            out_features: size of the output's last dimension; default ``in_features``.
            activation: applied to the gate (see :class:`GatedMlp`).
            bias1, bias2: whether ``fc1`` / ``fc2`` have a bias (``fc2``'s on the group's first rank only).
            sequence_parallel: all-gather the input / reduce-scatter the output along dim 0 (else the input
                is replicated and the output all-reduced).
            device, dtype: of the parameters.
        """
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        hidden_features = _gated_hidden_features(in_features, hidden_features, multiple_of)
        fc1, fc2 = _parallel_mlp_linears(
            in_features,
            hidden_features,
            out_features,
            process_group,
            bias1=bias1,
            bias2=bias2,
            sequence_parallel=sequence_parallel,
            gated=True,
            device=device,
            dtype=dtype,
        )
        self.fc1 = fc1
        self.activation = activation
        self.fc2 = fc2

    def forward(self, x: Tensor) -> Tensor:
        """x: (n, ..., in_features) -> (n, ..., out_features) (rows as in the class docstring)."""
        return self.fc2(_gate(self.activation, self.fc1(x)))
