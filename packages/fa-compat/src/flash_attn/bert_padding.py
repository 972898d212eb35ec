"""Padding helpers with the API of ``flash_attn.bert_padding`` (flash-attn 2.8.x). Pure PyTorch.

Tokens of a padded batch ``(batch, seqlen, ...)`` are addressed by their index in the flattened
``(batch * seqlen, ...)`` tensor; ``unpad_input`` keeps the selected rows and returns the
``cu_seqlens`` bookkeeping used by the varlen attention functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fa_core import validation as V

__all__ = [
    "IndexFirstAxis",
    "IndexPutFirstAxis",
    "IndexFirstAxisResidual",
    "index_first_axis",
    "index_put_first_axis",
    "index_first_axis_residual",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
    "pad_input",
]


class IndexFirstAxis(torch.autograd.Function):
    """out = input[indices]; input: (first_axis_dim, ...), indices: (n,) -> out: (n, ...)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:  # noqa: A002
        assert input.ndim >= 2, "input must have at least 2 dimensions"
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        other_shape = input.shape[1:]
        # Flatten trailing dims so a single row-gather (index_select) does the work.
        flat = input.reshape(input.shape[0], -1)
        return flat.index_select(0, indices).reshape(-1, *other_shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        assert grad_output.ndim >= 2
        other_shape = grad_output.shape[1:]
        grad_flat = grad_output.reshape(grad_output.shape[0], -1)
        grad_input = torch.zeros(
            ctx.first_axis_dim, grad_flat.shape[1], device=grad_output.device, dtype=grad_output.dtype
        )
        grad_input.index_copy_(0, indices, grad_flat)
        return grad_input.reshape(ctx.first_axis_dim, *other_shape), None


index_first_axis = IndexFirstAxis.apply


class IndexPutFirstAxis(torch.autograd.Function):
    """out = zeros(first_axis_dim, ...); out[indices] = values. values: (n, ...), indices: (n,)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
        assert indices.ndim == 1, "indices must be 1-D"
        assert values.ndim >= 2, "values must have at least 2 dimensions"
        ctx.save_for_backward(indices)
        output = torch.zeros(first_axis_dim, *values.shape[1:], device=values.device, dtype=values.dtype)
        output[indices] = values
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (indices,) = ctx.saved_tensors
        return grad_output[indices], None, None


index_put_first_axis = IndexPutFirstAxis.apply


class IndexFirstAxisResidual(torch.autograd.Function):
    """Returns (input[indices], input.detach()); gradients of both outputs flow back into input.

    The residual output lets a caller keep using the full tensor while only a subset of rows is
    processed; the backward adds the subset's gradient into the residual's gradient.
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: A002
        assert input.ndim >= 2, "input must have at least 2 dimensions"
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        # No reshape of input: it may be channels-last / non-contiguous. Detach so that autograd
        # does not treat the second output as a view being modified in-place.
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, grad_residual: torch.Tensor) -> tuple[torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        assert grad_output.ndim >= 2
        other_shape = grad_output.shape[1:]
        assert grad_residual.shape[1:] == other_shape
        # Accumulate into a copy: the incoming grad may be caller-owned (upstream writes into it).
        grad_input = grad_residual.clone()
        expanded = indices.reshape(-1, *((1,) * (grad_output.ndim - 1))).expand_as(grad_output)
        grad_input.scatter_add_(0, expanded, grad_output)
        return grad_input.reshape(ctx.first_axis_dim, *other_shape), None


index_first_axis_residual = IndexFirstAxisResidual.apply


def _cu_seqlens(seqlens: torch.Tensor) -> torch.Tensor:
    """(batch,) int lengths -> (batch + 1,) int32 cumulative lengths starting at 0."""
    return F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))


def _check_unpad(hidden_states: object, attention_mask: object, unused_mask: object) -> None:
    """A mask of the wrong shape would select the wrong tokens silently: refuse it, naming the argument."""
    V.check_tensor("hidden_states", hidden_states)
    assert isinstance(hidden_states, torch.Tensor)
    if hidden_states.dim() < 2:
        raise ValueError(
            f"hidden_states must be (batch, seqlen, ...), got shape {tuple(hidden_states.shape)}"
        )
    for name, m in (("attention_mask", attention_mask), ("unused_mask", unused_mask)):
        if m is None:
            continue
        V.check_tensor(name, m)
        assert isinstance(m, torch.Tensor)
        V.check_device(name, m, "hidden_states", hidden_states)
        if tuple(m.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(
                f"{name} must have shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}, got {tuple(m.shape)}"
            )


def _check_pad(hidden_states: object, indices: object, total: int) -> None:
    """indices must be the 1-D integer positions (in the flattened padded batch) of every row of hidden_states."""
    V.check_tensor("hidden_states", hidden_states)
    V.check_tensor("indices", indices, 1)
    assert isinstance(hidden_states, torch.Tensor) and isinstance(indices, torch.Tensor)
    if hidden_states.dim() < 2:
        raise ValueError(
            f"hidden_states must be (total_nnz, ...) with >= 2 dims, got {tuple(hidden_states.shape)}"
        )
    V.check_device("indices", indices, "hidden_states", hidden_states)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"indices has {indices.shape[0]} entries but hidden_states has {hidden_states.shape[0]} rows"
        )
    if indices.numel() and V.value_checks_enabled(indices):
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= total:
            raise ValueError(f"indices must lie in [0, batch * seqlen = {total}), got [{lo}, {hi}]")


def unpad_input(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    unused_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Remove padding tokens.

    Arguments:
        hidden_states: (batch, seqlen, ...)
        attention_mask: (batch, seqlen), bool / int, 1 means valid and 0 means not valid.
        unused_mask: (batch, seqlen), bool / int, 1 means the element is allocated but unused.
    Return:
        hidden_states: (total_nnz, ...), tokens selected by attention_mask + unused_mask.
        indices: (total_nnz,) int64, indices of the selected tokens in the flattened (batch * seqlen) input.
        cu_seqlens: (batch + 1,) int32, cumulative sequence lengths (attention_mask + unused_mask).
        max_seqlen_in_batch: int.
        seqused: (batch,) int32, number of tokens selected by attention_mask alone.
    """
    _check_unpad(hidden_states, attention_mask, unused_mask)
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    # Integer indices rather than a bool mask: cheaper to index with and reusable by pad_input.
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item())
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return (
        index_first_axis(flat, indices),
        indices,
        _cu_seqlens(seqlens_in_batch),
        max_seqlen_in_batch,
        used_seqlens_in_batch,
    )


def unpad_input_for_concatenated_sequences(
    hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Unpad rows that each pack several short sequences.

    Arguments:
        hidden_states: (batch, seqlen, ...)
        attention_mask_in_length: (batch, seqlen) int; the nonzero entries of row b, in order, are the
            lengths of the sequences packed left-aligned into row b, e.g. [[2, 3, 0, 0, 0, 0], ...].
    Return:
        hidden_states: (total_nnz, ...)
        indices: (total_nnz,) int64 indices into the flattened (batch * seqlen) input.
        cu_seqlens: (num_sequences + 1,) int32, one entry per packed sequence.
        max_seqlen_in_batch: int.
    """
    length = attention_mask_in_length.sum(dim=-1)
    seqlen = attention_mask_in_length.size(-1)
    positions = torch.arange(seqlen, device=length.device, dtype=length.dtype)
    attention_mask_2d = positions.expand(len(length), seqlen) < length.unsqueeze(1)
    flat_lengths = attention_mask_in_length.flatten()
    seqlens_in_batch = flat_lengths[torch.nonzero(flat_lengths, as_tuple=False).flatten()]
    indices = torch.nonzero(attention_mask_2d.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item())
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return (
        index_first_axis(flat, indices),
        indices,
        _cu_seqlens(seqlens_in_batch),
        max_seqlen_in_batch,
    )


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter unpadded tokens back into a zero-padded batch.

    Arguments:
        hidden_states: (total_nnz, ...)
        indices: (total_nnz,), indices of the tokens in the flattened (batch * seqlen) padded batch.
        batch: int, batch size of the padded output.
        seqlen: int, sequence length of the padded output.
    Return:
        hidden_states: (batch, seqlen, ...); rows not in ``indices`` are zero.
    """
    _check_pad(hidden_states, indices, batch * seqlen)
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.reshape(batch, seqlen, *output.shape[1:])
