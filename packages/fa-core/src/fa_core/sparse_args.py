"""Forward-kernel arguments of a block-sparse mask (:class:`fa_core.block_sparse.BlockMask`): pointers and
strides of the partial block lists, then of the full ones. The mask must have passed
:func:`fa_core.validation.check_block_mask` (which also checks the full-block fields)."""

from __future__ import annotations

import torch

__all__ = ["block_list_args", "full_blocks", "sparse_args"]


def full_blocks(block_mask) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(full_kv_num_blocks, full_kv_indices)`` of a block mask that has them (FlexAttention's names), else
    None. Read with getattr so that masks without the fields keep working."""
    if block_mask is None:
        return None
    num = getattr(block_mask, "full_kv_num_blocks", None)
    idx = getattr(block_mask, "full_kv_indices", None)
    if num is None or idx is None:
        return None
    return num, idx


def block_list_args(num: torch.Tensor, idx: torch.Tensor) -> tuple:
    """``(num, idx, num batch / head strides, idx batch / head / query-block strides)``, broadcast (size-1)
    batch and head dims given stride 0."""
    return (
        num,
        idx,
        num.stride(0) if num.shape[0] > 1 else 0,
        num.stride(1) if num.shape[1] > 1 else 0,
        idx.stride(0) if idx.shape[0] > 1 else 0,
        idx.stride(1) if idx.shape[1] > 1 else 0,
        idx.stride(2),
    )


def sparse_args(block_mask, dummy: torch.Tensor) -> tuple:
    """Kernel arguments of a block mask: pointers and strides (0 on broadcast batch / head dims), for the
    partial blocks then the full ones; ``dummy`` pointers and zero strides for what is absent."""
    absent = (dummy, dummy, 0, 0, 0, 0, 0)
    if block_mask is None:
        return absent * 2
    full = full_blocks(block_mask)
    return block_list_args(block_mask.kv_num_blocks, block_mask.kv_indices) + (
        block_list_args(*full) if full is not None else absent
    )
