"""Block-sparse attention masks in FlexAttention's compact form, and the helpers that build them.

A :class:`BlockMask` lists, for every query block, the key blocks it may see, in two disjoint lists
(FlexAttention's names and layout):

* partial blocks ``kv_num_blocks (batch|1, nheads|1, num_q_blocks)`` and ``kv_indices (batch|1, nheads|1,
  num_q_blocks, num_kv_blocks)`` int32 (the first ``kv_num_blocks`` entries of each row are used): blocks
  where the element mask (``mask_mod``) must be evaluated;
* optional full blocks ``full_kv_num_blocks`` / ``full_kv_indices`` (same shapes): blocks every element of
  which is visible as far as ``mask_mod`` is concerned, so the kernels skip its evaluation there.

The kernels load only the listed key blocks, so their work is proportional to the visible blocks; inside them
the built-in element rules (causal, window, chunk, sequence ends) still apply, and ``mask_mod`` too in partial
blocks. The backward's dK/dV pass needs the transposed index (for every key block, the query blocks that see
it): :func:`transpose_block_mask` builds it on the device and caches it on the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "BlockMask",
    "QBlockIndex",
    "block_mask_from_dense",
    "block_mask_to_dense",
    "block_mask_to_dense_blocks",
    "create_block_mask",
    "transpose_block_mask",
]


class _BlockMaskFields(NamedTuple):
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: tuple[int, int] = (128, 128)
    full_kv_num_blocks: torch.Tensor | None = None
    full_kv_indices: torch.Tensor | None = None


class BlockMask(_BlockMaskFields):
    """``kv_num_blocks (B|1, H|1, Q)`` and ``kv_indices (B|1, H|1, Q, K)`` int32: the partial blocks;
    ``block_size`` = ``(query rows, key columns)`` per block, powers of two (default 128 x 128);
    ``full_kv_num_blocks`` / ``full_kv_indices`` (same shapes, optional): the full blocks (no ``mask_mod``
    evaluation), disjoint from the partial ones.

    A named tuple (``_replace`` gives a new mask without the cached transposed index)."""

    # instances get a __dict__ (no __slots__ here): it holds the cached transposed index


class QBlockIndex(NamedTuple):
    """The transposed index: ``q_num_blocks (B|1, H|1, K)``, ``q_indices (B|1, H|1, K, Q)`` int32 (the query
    blocks that see each key block through a partial block) and ``full_q_num_blocks`` / ``full_q_indices``
    (same, through a full block; None when the mask has no full blocks)."""

    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    full_q_num_blocks: torch.Tensor | None
    full_q_indices: torch.Tensor | None


def _compact(dense_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(..., rows, cols)`` -> ``(num (..., rows), indices (..., rows, cols))`` int32, the visible column
    indices first and in increasing order (a stable sort on "not visible"); device-only, no host sync."""
    num = dense_blocks.sum(-1, dtype=torch.int32)
    order = torch.sort((~dense_blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return num.contiguous(), order.contiguous()


def block_mask_from_dense(
    dense_blocks: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    full_blocks: torch.Tensor | None = None,
) -> BlockMask:
    """From a boolean ``(B|1, H|1, num_q_blocks, num_kv_blocks)`` block mask (True = visible).

    Args:
        dense_blocks: the visible blocks (partial and full).
        full_blocks: optional bool, same shape: the visible blocks that need no ``mask_mod`` evaluation (every
            element visible). Without it every visible block is partial (``mask_mod``, when given to the
            kernel, is evaluated everywhere).
    """
    if (
        not isinstance(dense_blocks, torch.Tensor)
        or dense_blocks.dim() != 4
        or dense_blocks.dtype != torch.bool
    ):
        raise ValueError(
            "dense_blocks must be a 4-D bool tensor, got "
            + (
                f"{dense_blocks.dtype} {tuple(dense_blocks.shape)}"
                if isinstance(dense_blocks, torch.Tensor)
                else type(dense_blocks).__name__
            )
        )
    if full_blocks is None:
        num, idx = _compact(dense_blocks)
        return BlockMask(num, idx, (int(block_size[0]), int(block_size[1])))
    if (
        not isinstance(full_blocks, torch.Tensor)
        or full_blocks.dtype != torch.bool
        or full_blocks.shape != dense_blocks.shape
    ):
        raise ValueError(
            f"full_blocks must be a bool tensor shaped like dense_blocks {tuple(dense_blocks.shape)}"
        )
    if full_blocks.device != dense_blocks.device:
        raise ValueError(
            f"full_blocks is on {full_blocks.device} but dense_blocks is on {dense_blocks.device}"
        )
    num, idx = _compact(dense_blocks & ~full_blocks)
    fnum, fidx = _compact(full_blocks)
    return BlockMask(num, idx, (int(block_size[0]), int(block_size[1])), fnum, fidx)


def create_block_mask(
    mask_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int | None,
    nheads: int | None,
    seqlen_q: int,
    seqlen_k: int,
    block_size: tuple[int, int] = (128, 128),
    device: torch.device | str = "cpu",
    full_blocks: bool = True,
) -> BlockMask:
    """From a PyTorch ``mask_fn(b, h, q_idx, kv_idx) -> bool`` (broadcastable index tensors).

    A block is listed when any of its elements is visible; it is *full* (``full_kv_*``, no ``mask_mod``
    evaluation in the kernels) when every element inside the sequences is, else *partial*. Pass the same
    function as ``mask_mod`` (as a ``@triton.jit`` twin) to the kernels for element-exact masking of the
    partial blocks (FlexAttention's semantics). ``full_blocks=False`` lists every visible block as partial.
    ``batch`` / ``nheads`` None = the mask does not depend on them. Evaluated one query-block row at a time
    on ``device``, so memory stays O(block_q * seqlen_k * batch * nheads).
    """
    bq, bk = (int(x) for x in block_size)
    nq, nk = -(-seqlen_q // bq), -(-seqlen_k // bk)
    bdim, hdim = batch or 1, nheads or 1
    b = torch.arange(bdim, device=device).view(-1, 1, 1, 1)
    h = torch.arange(hdim, device=device).view(1, -1, 1, 1)
    kv = torch.arange(nk * bk, device=device).view(1, 1, 1, -1)
    any_blocks = torch.zeros(bdim, hdim, nq, nk, dtype=torch.bool, device=device)
    all_blocks = torch.zeros(bdim, hdim, nq, nk, dtype=torch.bool, device=device)
    for i in range(nq):
        q = torch.arange(i * bq, (i + 1) * bq, device=device).view(1, 1, -1, 1)
        inside = (q < seqlen_q) & (kv < seqlen_k)
        m = torch.broadcast_to(mask_fn(b, h, q, kv), (bdim, hdim, bq, nk * bk))
        vis = (m & inside).reshape(bdim, hdim, bq, nk, bk)
        any_blocks[:, :, i] = vis.any(dim=4).any(dim=2)
        # elements outside the sequences do not make a block partial (the kernels mask them anyway)
        all_blocks[:, :, i] = (m | ~inside).reshape(bdim, hdim, bq, nk, bk).all(dim=4).all(dim=2)
    full = (any_blocks & all_blocks) if full_blocks else None
    return block_mask_from_dense(any_blocks, (bq, bk), full)


def _scatter_blocks(num: torch.Tensor, idx: torch.Tensor, ncols: int) -> torch.Tensor:
    """Bool ``(..., rows, ncols)`` of the used entries of a compact index; unused entries (whatever they
    hold) go to a dump column, so they never overwrite a used one."""
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    target = torch.where(used, idx.long().clamp(0, ncols), ncols)
    blocks = torch.zeros(*idx.shape[:-1], ncols + 1, dtype=torch.bool, device=idx.device)
    blocks.scatter_(-1, target, True)
    return blocks[..., :ncols]


def block_mask_to_dense_blocks(
    mask: BlockMask, num_kv_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` bool ``(B|1, H|1, num_q_blocks, num_kv_blocks)`` block masks (full is all False
    when the mask has no full blocks). ``num_kv_blocks`` defaults to ``kv_indices.shape[-1]``."""
    ncols = int(num_kv_blocks) if num_kv_blocks is not None else mask.kv_indices.shape[-1]
    partial = _scatter_blocks(mask.kv_num_blocks, mask.kv_indices, ncols)
    if mask.full_kv_num_blocks is None or mask.full_kv_indices is None:
        return partial, torch.zeros_like(partial)
    return partial, _scatter_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, ncols)


def block_mask_to_dense(mask: BlockMask, seqlen_q: int, seqlen_k: int, which: str = "all") -> torch.Tensor:
    """Element mask ``(B|1, H|1, seqlen_q, seqlen_k)`` (True = inside a listed block) of a :class:`BlockMask`,
    for references. ``which``: ``"all"`` (partial or full blocks), ``"partial"`` or ``"full"``."""
    bq, bk = mask.block_size
    nk = -(-seqlen_k // bk)
    partial, full = block_mask_to_dense_blocks(mask, max(nk, mask.kv_indices.shape[-1]))
    blocks = {"all": partial | full, "partial": partial, "full": full}[which]
    dense = blocks.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)
    return dense[:, :, :seqlen_q, :seqlen_k]


def transpose_block_mask(mask: BlockMask, num_kv_blocks: int) -> QBlockIndex:
    """For every key block, the query blocks that see it (the dK/dV pass of the backward iterates these).

    Built on the device with torch ops (scatter, transpose, stable sort: no host loop, no sync) and cached on
    ``mask`` per ``num_kv_blocks`` (= ``cdiv(seqlen_k, block_size[1])``), so repeated backward passes with the
    same mask build it once.
    """
    cache = mask.__dict__.setdefault("_q_index_cache", {})
    key = int(num_kv_blocks)
    hit = cache.get(key)
    if hit is not None:
        return hit
    partial, full = block_mask_to_dense_blocks(mask, key)
    q_num, q_idx = _compact(partial.transpose(-1, -2))
    fq_num: torch.Tensor | None = None
    fq_idx: torch.Tensor | None = None
    if mask.full_kv_num_blocks is not None:
        fq_num, fq_idx = _compact(full.transpose(-1, -2))
    res = QBlockIndex(q_num, q_idx, fq_num, fq_idx)
    cache[key] = res
    return res
