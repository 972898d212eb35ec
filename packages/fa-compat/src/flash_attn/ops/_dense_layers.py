"""The dense layers of :mod:`flash_attn.ops.fused_dense` (``FusedDenseFunc``, ``fused_dense_func``, ``FusedDense``,
``ColumnParallelLinear``, ``RowParallelLinear``) and the helpers its MLP shares; see that module."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flash_attn.utils.distributed import (
    all_gather_raw,
    all_reduce,
    all_reduce_raw,
    get_dim_for_local_rank,
    reduce_scatter,
    reduce_scatter_raw,
)

_ACTIVATIONS = ("gelu_approx", "relu", "sqrelu")

#: (device_type, enabled, dtype) of the autocast state a Function's forward ran under
_AutocastState = tuple[str, bool, torch.dtype]


# ------------------------------------------------------------------------------------------------ helpers
def _world_and_rank(process_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(world_size, rank)`` of the group; ``(1, 0)`` without one."""
    if process_group is None:
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def _autocast_state(x: Tensor) -> _AutocastState:
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):
        return device_type, False, x.dtype
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_context(state: _AutocastState) -> contextlib.AbstractContextManager[Any]:
    """The autocast state of the forward, restored for the backward."""
    device_type, enabled, dtype = state
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=enabled, dtype=dtype)


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None else t.to(dtype)


def _cast_optional(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return None if t is None else _cast(t, dtype)


def _rows(t: Tensor) -> Tensor:
    """(..., n) -> (rows, n)."""
    return t.reshape(-1, t.shape[-1])


def _start_forward(
    ctx: Any,
    x: Tensor,
    return_residual: bool,
    process_group: dist.ProcessGroup | None,
    sequence_parallel: bool,
) -> tuple[Tensor, Tensor, Any, torch.dtype | None]:
    """The start of the Functions' forwards: record on ``ctx`` the autocast state, ``return_residual``,
    ``process_group`` and ``sequence_parallel``; cast ``x`` to the autocast dtype (contiguous) and start its
    all-gather. Returns ``(x, total_x, gather handle or None, autocast dtype or None)``."""
    ctx.autocast = _autocast_state(x)
    dtype = ctx.autocast[2] if ctx.autocast[1] else None
    ctx.return_residual = return_residual
    ctx.process_group = process_group
    ctx.sequence_parallel = sequence_parallel
    x = _cast(x, dtype).contiguous()
    total_x, handle = _start_gather(x, process_group, sequence_parallel)
    return x, total_x, handle, dtype


def _start_gather(
    x: Tensor, process_group: dist.ProcessGroup | None, sequence_parallel: bool
) -> tuple[Tensor, Any]:
    """Start the all-gather of ``x`` along dim 0 when sequence parallel; ``(total_x, handle or None)``."""
    if process_group is None or not sequence_parallel:
        return x, None
    return all_gather_raw(x, process_group, async_op=True)


def _start_input_grad_reduction(
    grad_input: Tensor, process_group: dist.ProcessGroup | None, sequence_parallel: bool
) -> tuple[Tensor, Any]:
    """Start the reduce-scatter (sequence parallel) or all-reduce of the input gradient over the group."""
    if process_group is None:
        return grad_input, None
    reduce = reduce_scatter_raw if sequence_parallel else all_reduce_raw
    return reduce(grad_input, process_group, async_op=True)


def _wait(handle: Any) -> None:
    if handle is not None:
        handle.wait()


def _reduce_output(out: Tensor, process_group: dist.ProcessGroup | None, sequence_parallel: bool) -> Tensor:
    """The sum of every rank's partial ``out``: reduce-scattered along dim 0 (``sequence_parallel``) or
    all-reduced over the group; ``out`` itself without a group."""
    if process_group is None:
        return out
    reduce = reduce_scatter if sequence_parallel else all_reduce
    return reduce(out, process_group)


def _local_features(
    name: str, features: int, process_group: dist.ProcessGroup | None, multiple_of: int
) -> tuple[int, int]:
    """``(local, rank)``: this rank's share of ``features`` (``name``: the argument, for the error), split in
    whole units of ``multiple_of`` by :func:`get_dim_for_local_rank`, and its rank in the group."""
    world_size, rank = _world_and_rank(process_group)
    if features % multiple_of:
        raise ValueError(f"{name} ({features}) must be a multiple of {multiple_of}")
    return get_dim_for_local_rank(features, world_size, rank, multiple_of), rank


def _check_mlp_args(activation: str, checkpoint_lvl: int, heuristic: Any) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if checkpoint_lvl not in (0, 1, 2):
        raise ValueError(f"checkpoint_lvl must be 0, 1 or 2, got {checkpoint_lvl!r}")
    if isinstance(heuristic, bool) or not isinstance(heuristic, int) or not -1 <= heuristic <= 4:
        raise ValueError(f"heuristic must be an int in [-1, 4], got {heuristic!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def _activation_fwd(activation: str, x: Tensor) -> Tensor:
    if activation == "gelu_approx":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    r = F.relu(x.to(_compute_dtype(x.dtype)))
    return (r * r).to(x.dtype)


def _activation_bwd(activation: str, grad: Tensor, x: Tensor) -> Tensor:
    """Gradient with respect to the pre-activation ``x`` given the activation output's gradient ``grad``, in
    ``x``'s dtype: PyTorch's own GeLU backward (the exact derivative of ``F.gelu(approximate="tanh")``); ReLU
    passes ``grad`` where ``x >= 0`` (flash-attn's convention at 0); squared ReLU ``2 * grad * relu(x)`` in
    float32 (float64 for float64 inputs)."""
    if activation == "gelu_approx":
        return torch.ops.aten.gelu_backward(grad.to(x.dtype), x, approximate="tanh")
    if activation == "relu":
        return torch.where(x >= 0, grad, torch.zeros_like(grad)).to(x.dtype)
    dtype = _compute_dtype(x.dtype)
    return (2.0 * grad.to(dtype) * F.relu(x.to(dtype))).to(x.dtype)


def _resolve_heuristic(heuristic: Any) -> Any:
    """``"auto"`` -> -1 (the unfused computation, the only one here); anything else unchanged."""
    return -1 if heuristic == "auto" else heuristic


# -------------------------------------------------------------------------------------------- dense
class FusedDenseFunc(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with tensor / sequence parallelism:
    ``apply(x, weight, bias, return_residual, process_group, sequence_parallel)``.

    With ``process_group`` and ``sequence_parallel``, ``x`` ``(n, ..., in)`` is all-gathered along dim 0 to
    ``(world_size * n, ..., in)`` before the product, and the input gradient is reduce-scattered back; with
    ``process_group`` and not ``sequence_parallel`` the input is the full input on every rank and its gradient
    is all-reduced. Returns ``out`` ``(total rows, ..., out)``, or ``(out, x)`` with ``return_residual`` (``x``
    this rank's input, cast to the autocast dtype under autocast).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        return_residual: bool = False,
        process_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]:
        x, total_x, handle, dtype = _start_forward(ctx, x, return_residual, process_group, sequence_parallel)
        weight = _cast(weight, dtype).contiguous()
        bias = _cast_optional(bias, dtype)
        _wait(handle)
        out = F.linear(total_x, weight, bias)
        # this rank's x only: the backward gathers it again when it needs the weight gradient
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return (out, x) if return_residual else out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *args: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        process_group, sequence_parallel = ctx.process_group, ctx.sequence_parallel
        with _autocast_context(ctx.autocast):
            grad_output = grad_output.contiguous()
            grad_rows = _rows(grad_output)
            total_x, gather = None, None
            if ctx.needs_input_grad[1]:
                total_x, gather = _start_gather(x, process_group, sequence_parallel)
            grad_input, reduction = None, None
            if ctx.needs_input_grad[0]:
                grad_input = (grad_rows @ weight).reshape(*grad_output.shape[:-1], weight.shape[1])
                grad_input, reduction = _start_input_grad_reduction(
                    grad_input, process_group, sequence_parallel
                )
            grad_weight = grad_bias = None
            if ctx.needs_input_grad[1]:
                _wait(gather)
                assert total_x is not None
                grad_weight = grad_rows.t() @ _rows(total_x)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_rows.sum(0)
            _wait(reduction)
            if grad_input is not None and ctx.return_residual and args[0] is not None:
                grad_input = grad_input + args[0]
        return grad_input, grad_weight, grad_bias, None, None, None


def fused_dense_func(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    return_residual: bool = False,
    process_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.linear(x, weight, bias)``, or ``(out, x)`` with ``return_residual``; see :class:`FusedDenseFunc`
    for ``process_group`` / ``sequence_parallel``. Without a process group this is plain ``F.linear`` (with
    the usual autograd, autocast and ``torch.compile`` support).

    Shapes: x (..., in_features), weight (out_features, in_features), bias (out_features,) ->
    (..., out_features); with sequence parallelism dim 0 of the output is ``world_size`` times x's.
    """
    if process_group is None:
        out = F.linear(x, weight, bias)
        return (out, x) if return_residual else out
    return FusedDenseFunc.apply(x, weight, bias, return_residual, process_group, sequence_parallel)


class FusedDense(nn.Linear):
    """``nn.Linear`` (same parameters and initialisation) computed by :func:`fused_dense_func`.

    ``forward(x, process_group=None)``: x (..., in_features) -> (..., out_features), or ``(out, x)`` with
    ``return_residual``. With ``process_group``, x is this rank's part of the rows and is all-gathered along
    dim 0 first (sequence parallelism); the output covers every rank's rows.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        return_residual: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
            return_residual: ``forward`` also returns its input (post-norm blocks add it afterwards).
        """
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.return_residual = return_residual

    def forward(  # type: ignore[override]
        self, x: Tensor, process_group: dist.ProcessGroup | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        return fused_dense_func(
            x, self.weight, self.bias, return_residual=self.return_residual, process_group=process_group
        )


class ColumnParallelLinear(nn.Linear):
    """``nn.Linear(in_features, local_out)`` holding rows of the full ``(out_features, in_features)`` weight:
    ``local_out = get_dim_for_local_rank(out_features, world_size, rank, multiple_of)`` (whole units of
    ``multiple_of`` rows, the first ranks taking one extra unit when they do not divide evenly).

    ``forward(x)``: with ``sequence_parallel`` x (n, ..., in_features) is this rank's part of the rows,
    all-gathered along dim 0 first -> (world_size * n, ..., local_out); else x is the full input on every rank
    -> (n, ..., local_out). The input gradient is reduce-scattered / all-reduced over the group.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        process_group: dist.ProcessGroup | None,
        bias: bool = True,
        sequence_parallel: bool = True,
        multiple_of: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: input width (every rank holds all of it).
            out_features: the full output width, a multiple of ``multiple_of``.
            process_group: the tensor-parallel group; None: one process (the full layer, no communication).
            bias: a bias of this rank's ``local_out`` entries.
            sequence_parallel: all-gather the input along dim 0 first (see the class docstring).
            multiple_of: the unit in which the output features are split (e.g. a head's qkv width).
            device, dtype: of the parameters.
        """
        local_out, _ = _local_features("out_features", out_features, process_group, multiple_of)
        super().__init__(in_features, local_out, bias=bias, device=device, dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        return fused_dense_func(  # type: ignore[return-value]
            x,
            self.weight,
            self.bias,
            process_group=self.process_group,
            sequence_parallel=self.sequence_parallel,
        )


class RowParallelLinear(nn.Linear):
    """``nn.Linear(local_in, out_features)`` holding columns of the full ``(out_features, in_features)``
    weight: ``local_in = get_dim_for_local_rank(in_features, world_size, rank, multiple_of)``; only the group's
    first rank has the bias (when ``bias``).

    ``forward(x)``: x (m, ..., local_in), this rank's share of the features -> the sum of every rank's partial
    product: reduce-scattered along dim 0 to (m / world_size, ..., out_features) with ``sequence_parallel``,
    else all-reduced to (m, ..., out_features) on every rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        process_group: dist.ProcessGroup | None,
        bias: bool = True,
        sequence_parallel: bool = True,
        multiple_of: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: the full input width, a multiple of ``multiple_of``.
            out_features: output width (every rank computes all of it).
            process_group: the tensor-parallel group; None: one process (the full layer, no communication).
            bias: a bias on the group's first rank.
            sequence_parallel: reduce-scatter the output along dim 0 instead of all-reducing it.
            multiple_of: the unit in which the input features are split (e.g. the head dim).
            device, dtype: of the parameters.
        """
        local_in, rank = _local_features("in_features", in_features, process_group, multiple_of)
        super().__init__(local_in, out_features, bias=bias and rank == 0, device=device, dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        return _reduce_output(F.linear(x, self.weight, self.bias), self.process_group, self.sequence_parallel)


def _parallel_mlp_linears(
    in_features: int,
    hidden_features: int,
    out_features: int,
    process_group: dist.ProcessGroup | None,
    *,
    bias1: bool,
    bias2: bool,
    sequence_parallel: bool,
    gated: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[ColumnParallelLinear, RowParallelLinear]:
    """``(fc1, fc2)`` of a tensor-parallel MLP: ``fc1`` a :class:`ColumnParallelLinear` ``in_features ->``
    this rank's hidden units, ``fc2`` a :class:`RowParallelLinear` of the same hidden units ``->
    out_features``, both with ``sequence_parallel``. ``gated``: ``fc1`` maps to ``2 * hidden_features``, split
    in whole (value, gate) pairs so that this rank's ``fc1`` rows are twice its ``fc2`` columns."""
    factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    fc1 = ColumnParallelLinear(
        in_features,
        2 * hidden_features if gated else hidden_features,
        process_group,
        bias=bias1,
        sequence_parallel=sequence_parallel,
        multiple_of=2 if gated else 1,
        **factory_kwargs,
    )
    fc2 = RowParallelLinear(
        hidden_features,
        out_features,
        process_group,
        bias=bias2,
        sequence_parallel=sequence_parallel,
        **factory_kwargs,
    )
    return fc1, fc2
