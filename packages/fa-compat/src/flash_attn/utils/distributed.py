"""``flash_attn.utils.distributed``: flash-attn 2.8.x's tensor-parallel communication helpers.

Collectives over a ``torch.distributed`` process group, along the first dimension of a tensor:

* :func:`all_gather_raw`, :func:`reduce_scatter_raw`, :func:`all_reduce_raw`: no autograd, optionally
  asynchronous; each returns ``(output, handle)`` (``handle`` is ``None`` unless ``async_op=True``);
* :func:`all_gather`, :func:`reduce_scatter`, :func:`all_reduce`: the ``apply`` of the autograd Functions
  :class:`AllGatherFunc` (backward: reduce-scatter), :class:`ReduceScatterFunc` (backward: all-gather) and
  :class:`AllReduceFunc` (backward: the gradient unchanged), synchronous;
* :func:`sync_shared_params`: broadcast the parameters marked ``_shared_params`` from the group's first rank;
* :func:`allreduce_sequence_parallel_grad`: sum the gradients of the parameters marked ``_sequence_parallel``
  over the group (one coalesced all-reduce);
* :func:`get_dim_for_local_rank`: this rank's share of a dimension split over ``world_size`` ranks.

The all-gather / reduce-scatter are ``torch.distributed.all_gather_into_tensor`` /
``reduce_scatter_tensor``, called by their newer names ``all_gather_single`` / ``reduce_scatter_single``
where this torch has them (the older names are deprecated aliases there). As in flash-attn,
:func:`all_reduce_raw` (and so :func:`all_reduce`) reduces a contiguous input in place and returns it.
Nothing here is imported by ``import flash_attn``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "AllGatherFunc",
    "AllReduceFunc",
    "ReduceScatterFunc",
    "all_gather",
    "all_gather_raw",
    "all_reduce",
    "all_reduce_raw",
    "allreduce_sequence_parallel_grad",
    "get_dim_for_local_rank",
    "reduce_scatter",
    "reduce_scatter_raw",
    "sync_shared_params",
]


def _gather_into_tensor() -> Any:
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_tensor() -> Any:
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_raw(
    input_: Tensor, process_group: dist.ProcessGroup | None, async_op: bool = False
) -> tuple[Tensor, Any]:
    """Concatenate every rank's ``input_`` along dim 0 (no autograd).

    ``input_`` ``(n, ...)`` -> ``(world_size * n, ...)``, rank ``r``'s rows at ``r * n : (r + 1) * n``.
    Returns ``(output, handle)``; with ``async_op`` wait on ``handle`` before reading ``output``.
    """
    world_size = dist.get_world_size(process_group)
    output = input_.new_empty((world_size * input_.shape[0], *input_.shape[1:]))
    handle = _gather_into_tensor()(output, input_.contiguous(), group=process_group, async_op=async_op)
    return output, handle


def reduce_scatter_raw(
    input_: Tensor, process_group: dist.ProcessGroup | None, async_op: bool = False
) -> tuple[Tensor, Any]:
    """Sum ``input_`` over the ranks and keep this rank's block of rows (no autograd).

    ``input_`` ``(world_size * n, ...)`` -> ``(n, ...)``: rows ``rank * n : (rank + 1) * n`` of the sum.
    Returns ``(output, handle)``; with ``async_op`` wait on ``handle`` before reading ``output``.
    """
    world_size = dist.get_world_size(process_group)
    if input_.shape[0] % world_size != 0:
        raise ValueError(
            f"reduce_scatter: the first dimension ({input_.shape[0]}) must be divisible by the world size "
            f"({world_size})"
        )
    output = input_.new_empty((input_.shape[0] // world_size, *input_.shape[1:]))
    handle = _reduce_scatter_tensor()(output, input_.contiguous(), group=process_group, async_op=async_op)
    return output, handle


def all_reduce_raw(
    input_: Tensor, process_group: dist.ProcessGroup | None, async_op: bool = False
) -> tuple[Tensor, Any]:
    """Sum ``input_`` over the ranks (no autograd); in place when ``input_`` is contiguous (else in a copy).

    Returns ``(output, handle)``; with ``async_op`` wait on ``handle`` before reading ``output``.
    """
    output = input_.contiguous()
    handle = dist.all_reduce(output, group=process_group, async_op=async_op)
    return output, handle


class AllGatherFunc(torch.autograd.Function):
    """:func:`all_gather_raw` with autograd: the gradient is reduce-scattered back to the ranks."""

    @staticmethod
    def forward(ctx: Any, input_: Tensor, process_group: dist.ProcessGroup | None) -> Tensor:
        ctx.process_group = process_group
        return all_gather_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return reduce_scatter_raw(grad_output, ctx.process_group)[0], None


class ReduceScatterFunc(torch.autograd.Function):
    """:func:`reduce_scatter_raw` with autograd: the gradient is all-gathered."""

    @staticmethod
    def forward(ctx: Any, input_: Tensor, process_group: dist.ProcessGroup | None) -> Tensor:
        ctx.process_group = process_group
        return reduce_scatter_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return all_gather_raw(grad_output, ctx.process_group)[0], None


class AllReduceFunc(torch.autograd.Function):
    """:func:`all_reduce_raw` with autograd: every rank's input receives the output's gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, input_: Tensor, process_group: dist.ProcessGroup | None) -> Tensor:
        ctx.process_group = process_group
        return all_reduce_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output, None


#: ``all_gather(input_, process_group)``: (n, ...) -> (world_size * n, ...), differentiable.
all_gather = AllGatherFunc.apply
#: ``reduce_scatter(input_, process_group)``: (world_size * n, ...) -> (n, ...), differentiable.
reduce_scatter = ReduceScatterFunc.apply
#: ``all_reduce(input_, process_group)``: the sum over the ranks, same shape, differentiable.
all_reduce = AllReduceFunc.apply


def _marked_parameters(model: nn.Module, flag: str) -> list[Tensor]:
    """The parameters with ``getattr(p, flag) == True``, sorted by name (the same order on every rank, even
    where ranks hold different sets of parameters)."""
    marked = {name: p for name, p in model.named_parameters() if getattr(p, flag, False)}
    return [marked[name] for name in sorted(marked)]


def sync_shared_params(model: nn.Module, process_group: dist.ProcessGroup) -> None:
    """Overwrite the parameters marked ``_shared_params`` (e.g. by ``Block(mark_shared_params=True)``) with
    the values of the group's first rank."""
    src = dist.get_global_rank(process_group, 0)  # broadcast takes a global rank
    with torch.no_grad():
        for p in _marked_parameters(model, "_shared_params"):
            dist.broadcast(p, src=src, group=process_group)


def allreduce_sequence_parallel_grad(model: nn.Module, process_group: dist.ProcessGroup) -> None:
    """Sum the gradients of the parameters marked ``_sequence_parallel`` (e.g. the norms of
    ``Block(sequence_parallel=True)``, which see only this rank's part of the sequence) over the group, in
    place; one all-reduce over their concatenation. Every marked parameter must have a gradient."""
    params = _marked_parameters(model, "_sequence_parallel")
    if not params:
        return
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        raise ValueError(
            "allreduce_sequence_parallel_grad: a parameter marked _sequence_parallel has no grad"
        )
    dense = [g for g in grads if g is not None]
    with torch.no_grad():
        flat = torch._utils._flatten_dense_tensors(dense)
        dist.all_reduce(flat, group=process_group)
        for grad, synced in zip(dense, torch._utils._unflatten_dense_tensors(flat, dense)):
            grad.copy_(synced)


def get_dim_for_local_rank(dim: int, world_size: int, local_rank: int, multiple_of: int = 1) -> int:
    """The part of ``dim`` held by rank ``local_rank`` when ``dim`` is split over ``world_size`` ranks in
    units of ``multiple_of``: ``dim // multiple_of`` units shared as evenly as possible, the first ranks taking
    one extra unit each while the remainder lasts (a remainder of ``dim % multiple_of`` is dropped)."""
    units = dim // multiple_of
    share, extra = divmod(units, world_size)
    return (share + int(local_rank < extra)) * multiple_of
