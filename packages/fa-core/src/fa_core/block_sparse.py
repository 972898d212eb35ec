"""Block-sparse attention masks in FlexAttention's compact form, and the helpers that build them.

A :class:`BlockMask` lists, for every query block, the key blocks it may see:
``kv_num_blocks (batch|1, nheads|1, num_q_blocks)`` and ``kv_indices (batch|1, nheads|1, num_q_blocks,
num_kv_blocks)`` int32 (the first ``kv_num_blocks`` entries of each row are used). The forward loads only
those key blocks, so its work is proportional to the visible blocks; inside them the element rules (causal,
window, chunk, ``mask_mod``) still apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["BlockMask", "block_mask_from_dense", "block_mask_to_dense", "create_block_mask"]


class BlockMask(NamedTuple):
    """``kv_num_blocks (B|1, H|1, Q)`` and ``kv_indices (B|1, H|1, Q, K)`` int32; ``block_size`` =
    ``(query rows, key columns)`` per block, powers of two (default 128 x 128)."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: tuple[int, int] = (128, 128)


def block_mask_from_dense(dense_blocks: torch.Tensor, block_size: tuple[int, int] = (128, 128)) -> BlockMask:
    """From a boolean ``(B|1, H|1, num_q_blocks, num_kv_blocks)`` block mask (True = visible)."""
    if dense_blocks.dim() != 4 or dense_blocks.dtype != torch.bool:
        raise ValueError(
            f"dense_blocks must be a 4-D bool tensor, got {dense_blocks.dtype} {tuple(dense_blocks.shape)}"
        )
    num = dense_blocks.sum(-1, dtype=torch.int32)
    # visible block indices first, in increasing order (a stable sort on "not visible")
    order = torch.sort((~dense_blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return BlockMask(num.contiguous(), order.contiguous(), tuple(block_size))  # type: ignore[arg-type]


def create_block_mask(
    mask_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int | None,
    nheads: int | None,
    seqlen_q: int,
    seqlen_k: int,
    block_size: tuple[int, int] = (128, 128),
    device: torch.device | str = "cpu",
) -> BlockMask:
    """From a PyTorch ``mask_fn(b, h, q_idx, kv_idx) -> bool`` (broadcastable index tensors); a block is
    visible when any of its elements is. ``batch`` / ``nheads`` None = the mask does not depend on them.
    Evaluated one query-block row at a time, so memory stays O(block_q * seqlen_k * batch * nheads)."""
    bq, bk = block_size
    nq, nk = -(-seqlen_q // bq), -(-seqlen_k // bk)
    bdim, hdim = batch or 1, nheads or 1
    b = torch.arange(bdim, device=device).view(-1, 1, 1, 1)
    h = torch.arange(hdim, device=device).view(1, -1, 1, 1)
    kv = torch.arange(nk * bk, device=device).view(1, 1, 1, -1)
    blocks = torch.zeros(bdim, hdim, nq, nk, dtype=torch.bool, device=device)
    for i in range(nq):
        q = torch.arange(i * bq, (i + 1) * bq, device=device).view(1, 1, -1, 1)
        m = mask_fn(b, h, q, kv) & (q < seqlen_q) & (kv < seqlen_k)
        m = torch.broadcast_to(m, (bdim, hdim, bq, nk * bk))
        blocks[:, :, i] = m.reshape(bdim, hdim, bq, nk, bk).any(dim=4).any(dim=2)
    return block_mask_from_dense(blocks, block_size)


def block_mask_to_dense(mask: BlockMask, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """Element mask ``(B|1, H|1, seqlen_q, seqlen_k)`` (True = visible) of a :class:`BlockMask` (references)."""
    bq, bk = mask.block_size
    num, idx = mask.kv_num_blocks.long(), mask.kv_indices.long()
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    blocks = torch.zeros(*idx.shape[:-1], idx.shape[-1], dtype=torch.bool, device=idx.device)
    blocks.scatter_(-1, idx, used)
    dense = blocks.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)
    return dense[:, :, :seqlen_q, :seqlen_k]
