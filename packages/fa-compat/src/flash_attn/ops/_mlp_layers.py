"""The MLPs of :mod:`flash_attn.ops.fused_dense` (``FusedMLPFunc``, ``fused_mlp_func``, ``FusedMLP``,
``ParallelFusedMLP``); see that module."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flash_attn.ops._dense_layers import (
    _activation_bwd,
    _activation_fwd,
    _autocast_context,
    _cast,
    _cast_optional,
    _check_mlp_args,
    _parallel_mlp_linears,
    _reduce_output,
    _resolve_heuristic,
    _rows,
    _start_forward,
    _start_gather,
    _start_input_grad_reduction,
    _wait,
)
from flash_attn.utils.distributed import all_gather_raw, reduce_scatter


# ---------------------------------------------------------------------------------------------- MLP
class FusedMLPFunc(torch.autograd.Function):
    """``F.linear(activation(F.linear(x, weight1, bias1)), weight2, bias2)`` with recomputation and
    tensor / sequence parallelism: ``apply(x, weight1, bias1, weight2, bias2, activation, save_pre_act,
    return_residual, checkpoint_lvl, heuristic, process_group, sequence_parallel)``.

    ``checkpoint_lvl`` 0 keeps the pre-activation and the activation output for the backward, 1 only the
    pre-activation (the activation is recomputed), 2 neither (both recomputed from the input);
    ``save_pre_act=False`` forces 2. The process group is used as in :class:`FusedDenseFunc` (all-gather of x
    before ``fc1``, reduction of the input gradient); the output is this rank's partial product, not reduced.
    Returns ``out`` or ``(out, x)`` with ``return_residual``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight1: Tensor,
        bias1: Tensor | None,
        weight2: Tensor,
        bias2: Tensor | None,
        activation: str = "gelu_approx",
        save_pre_act: bool = True,
        return_residual: bool = False,
        checkpoint_lvl: int = 0,
        heuristic: int = 0,
        process_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]:
        _check_mlp_args(activation, checkpoint_lvl, heuristic)
        if not save_pre_act:
            checkpoint_lvl = 2
        x, total_x, handle, dtype = _start_forward(ctx, x, return_residual, process_group, sequence_parallel)
        ctx.activation = activation
        ctx.checkpoint_lvl = checkpoint_lvl
        ctx.heuristic = heuristic
        weight1 = _cast(weight1, dtype).contiguous()
        weight2 = _cast(weight2, dtype).contiguous()
        bias1, bias2 = _cast_optional(bias1, dtype), _cast_optional(bias2, dtype)
        _wait(handle)
        pre_act = F.linear(total_x, weight1, bias1)
        hidden = _activation_fwd(activation, pre_act)
        out = F.linear(hidden, weight2, bias2)
        ctx.save_for_backward(
            x,
            weight1,
            bias1,
            weight2,
            pre_act if checkpoint_lvl < 2 else None,
            hidden if checkpoint_lvl == 0 else None,
        )
        return (out, x) if return_residual else out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *args: Tensor) -> tuple[Tensor | None, ...]:
        x, weight1, bias1, weight2, pre_act, hidden = ctx.saved_tensors
        needs = ctx.needs_input_grad
        process_group, sequence_parallel = ctx.process_group, ctx.sequence_parallel
        activation = ctx.activation
        with _autocast_context(ctx.autocast):
            grad_output = grad_output.contiguous()
            grad_rows = _rows(grad_output)
            total_x, gather = x, None
            if pre_act is None:  # checkpoint_lvl 2: everything from the input
                if process_group is not None and sequence_parallel:
                    total_x, _ = all_gather_raw(x, process_group)
                pre_act = F.linear(total_x, weight1, bias1)
            elif needs[1]:
                total_x, gather = _start_gather(x, process_group, sequence_parallel)
            grad_weight2 = grad_bias2 = None
            if needs[3]:
                if hidden is None:
                    hidden = _activation_fwd(activation, pre_act)
                grad_weight2 = grad_rows.t() @ _rows(hidden)
            if needs[4]:
                grad_bias2 = grad_rows.sum(0)
            grad_input = grad_weight1 = grad_bias1 = None
            reduction = None
            if needs[0] or needs[1] or needs[2]:
                grad_pre_act = _activation_bwd(activation, grad_rows @ weight2, _rows(pre_act))
                if needs[0]:
                    grad_input = (grad_pre_act @ weight1).reshape(*grad_output.shape[:-1], weight1.shape[1])
                    grad_input, reduction = _start_input_grad_reduction(
                        grad_input, process_group, sequence_parallel
                    )
                if needs[1]:
                    _wait(gather)
                    grad_weight1 = grad_pre_act.t() @ _rows(total_x)
                if needs[2]:
                    grad_bias1 = grad_pre_act.sum(0)
            _wait(reduction)
            if grad_input is not None and ctx.return_residual and args[0] is not None:
                grad_input = grad_input + args[0]
        return (
            grad_input,
            grad_weight1,
            grad_bias1,
            grad_weight2,
            grad_bias2,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_mlp_func(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Tensor | None = None,
    bias2: Tensor | None = None,
    activation: str = "gelu_approx",
    save_pre_act: bool = True,
    return_residual: bool = False,
    checkpoint_lvl: int = 0,
    heuristic: int = 0,
    process_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """``fc2(activation(fc1(x)))`` by :class:`FusedMLPFunc` (see there for the arguments).

    Shapes: x (..., in), weight1 (hidden, in), bias1 (hidden,), weight2 (out, hidden), bias2 (out,) ->
    (..., out), or ``(out, x)`` with ``return_residual``; with sequence parallelism dim 0 of the output is
    ``world_size`` times x's.
    """
    _check_mlp_args(activation, checkpoint_lvl, heuristic)
    return FusedMLPFunc.apply(
        x,
        weight1,
        bias1,
        weight2,
        bias2,
        activation,
        save_pre_act,
        return_residual,
        checkpoint_lvl,
        heuristic,
        process_group,
        sequence_parallel,
    )


def _init_fused_mlp(
    mlp: Any,
    in_features: int,
    hidden_features: int | None,
    out_features: int | None,
    activation: str,
    checkpoint_lvl: int,
    heuristic: int | str,
) -> tuple[int, int]:
    """Check the arguments of :class:`FusedMLP` / :class:`ParallelFusedMLP` and set ``mlp.activation``,
    ``mlp.checkpoint_lvl`` and ``mlp.heuristic`` (-1 for ``"sqrelu"``). Returns ``(hidden_features,
    out_features)`` with their defaults ``4 * in_features`` and ``in_features``."""
    _check_mlp_args(activation, checkpoint_lvl, _resolve_heuristic(heuristic))
    mlp.activation = activation
    mlp.checkpoint_lvl = checkpoint_lvl
    mlp.heuristic = heuristic if activation != "sqrelu" else -1
    return hidden_features or in_features * 4, out_features or in_features


def _run_fused_mlp(mlp: Any, x: Tensor, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`fused_mlp_func` of ``mlp``'s ``fc1`` / ``fc2``, activation, checkpoint level and heuristic,
    keeping the pre-activation in training mode only; ``kwargs``: the remaining arguments."""
    return fused_mlp_func(
        x,
        mlp.fc1.weight,
        mlp.fc2.weight,
        mlp.fc1.bias,
        mlp.fc2.bias,
        activation=mlp.activation,
        save_pre_act=mlp.training,
        checkpoint_lvl=mlp.checkpoint_lvl,
        heuristic=_resolve_heuristic(mlp.heuristic),
        **kwargs,
    )


class FusedMLP(nn.Module):
    """``fc2(activation(fc1(x)))`` by :func:`fused_mlp_func`, ``fc1`` / ``fc2`` plain ``nn.Linear``.

    ``forward(x, process_group=None)``: x (..., in_features) -> (..., out_features), or ``(out, x)`` with
    ``return_residual``. With ``process_group`` x is this rank's part of the rows: it is all-gathered along dim
    0, run through this rank's ``fc1`` / ``fc2`` and the result reduce-scattered back (the caller shards the
    weights). In training mode the pre-activation is kept per ``checkpoint_lvl``; in eval mode nothing is kept
    (level 2).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias1: bool = True,
        bias2: bool = True,
        activation: str = "gelu_approx",
        return_residual: bool = False,
        checkpoint_lvl: int = 0,
        heuristic: int | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: input width; hidden_features: default ``4 * in_features``; out_features: default
                ``in_features``.
            bias1, bias2: whether ``fc1`` / ``fc2`` have a bias.
            activation: ``"gelu_approx"`` (tanh GeLU), ``"relu"`` or ``"sqrelu"`` (squared ReLU).
            return_residual: ``forward`` also returns its input.
            checkpoint_lvl: 0, 1 or 2: what the backward recomputes (see :class:`FusedMLPFunc`).
            heuristic: ``"auto"`` or an int in ``[-1, 4]``; accepted, no effect (set to -1 for ``"sqrelu"``,
                as in flash-attn).
            device, dtype: of the parameters.
        """
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        hidden_features, out_features = _init_fused_mlp(
            self, in_features, hidden_features, out_features, activation, checkpoint_lvl, heuristic
        )
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(
        self, x: Tensor, process_group: dist.ProcessGroup | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        out = _run_fused_mlp(self, x, return_residual=self.return_residual, process_group=process_group)
        if self.return_residual:
            out, x = out
        if process_group is not None:
            out = reduce_scatter(out, process_group)
        return (out, x) if self.return_residual else out  # type: ignore[return-value]


class ParallelFusedMLP(nn.Module):
    """:class:`FusedMLP` split over a process group: ``fc1`` a :class:`ColumnParallelLinear` (this rank's
    hidden units), ``fc2`` a :class:`RowParallelLinear` (the same hidden units; bias on the first rank).

    ``forward(x)``: with ``sequence_parallel`` x (n, ..., in_features) is this rank's part of the rows,
    all-gathered first, and the output is reduce-scattered back to (n, ..., out_features); else x is the full
    input on every rank and the output is all-reduced. In eval mode nothing is kept for the backward.
    ``fc1`` / ``fc2`` get this module's ``sequence_parallel`` (flash-attn leaves theirs at the default True; it
    only matters when they are called on their own).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: str = "gelu_approx",
        process_group: dist.ProcessGroup | None = None,
        bias1: bool = True,
        bias2: bool = True,
        sequence_parallel: bool = True,
        checkpoint_lvl: int = 0,
        heuristic: int | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            in_features: input width; hidden_features: the full hidden width, default ``4 * in_features``;
                out_features: default ``in_features``.
            activation: ``"gelu_approx"``, ``"relu"`` or ``"sqrelu"``.
            process_group: the tensor-parallel group (flash-attn requires one); None: one process.
            bias1, bias2: whether ``fc1`` / ``fc2`` have a bias (``fc2``'s on the first rank only).
            sequence_parallel: all-gather the input / reduce-scatter the output along dim 0, else all-reduce
                the output.
            checkpoint_lvl: 0, 1 or 2 (see :class:`FusedMLPFunc`); heuristic: accepted, no effect.
            device, dtype: of the parameters.
        """
        super().__init__()
        hidden_features, out_features = _init_fused_mlp(
            self, in_features, hidden_features, out_features, activation, checkpoint_lvl, heuristic
        )
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel
        self.fc1, self.fc2 = _parallel_mlp_linears(
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

    def forward(self, x: Tensor) -> Tensor:
        out = _run_fused_mlp(
            self, x, process_group=self.process_group, sequence_parallel=self.sequence_parallel
        )
        return _reduce_output(out, self.process_group, self.sequence_parallel)  # type: ignore[arg-type]
