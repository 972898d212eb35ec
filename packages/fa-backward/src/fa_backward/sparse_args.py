"""Programmable / block-sparse arguments of the backward: their checks and their kernel arguments.

:func:`check_programmable` and :func:`check_full_blocks` validate ``attention_chunk``, ``score_mod`` /
``score_mod_grad`` / ``mask_mod``, ``dsoftmax_lse`` and the optional full-block lists of a
:class:`~fa_core.block_sparse.BlockMask` (each error names its argument); :func:`_sparse_args` turns a block
mask into the keyword arguments of the dQ and dK/dV kernels (the dK/dV pass walks the transposed lists).
"""

from __future__ import annotations

from typing import Any

import torch

from fa_core import validation as V
from fa_core.block_sparse import BlockMask, transpose_block_mask
from fa_core.sparse_args import block_list_args

__all__ = ["check_full_blocks", "check_programmable"]


def _is_jit(fn: object) -> bool:
    return callable(fn) and hasattr(fn, "fn")  # JITFunction, or InterpretedFunction on CPU


def check_programmable(
    attention_chunk: int,
    score_mod: object,
    score_mod_grad: object,
    mask_mod: object,
    dsoftmax_lse: torch.Tensor | None,
    lse_shape: tuple[int, ...],
    q: torch.Tensor,
) -> None:
    """Checks of the programmable-attention arguments of the backward (each error names its argument)."""
    V.check_chunk_and_sink(attention_chunk, None, 1, q)
    V.check_mods(score_mod, mask_mod)
    if score_mod_grad is not None and not _is_jit(score_mod_grad):
        raise TypeError(f"score_mod_grad must be a @triton.jit function, got {type(score_mod_grad).__name__}")
    if score_mod is not None and score_mod_grad is None:
        raise ValueError(
            "score_mod needs score_mod_grad (a @triton.jit d score_mod / d score) for the backward; "
            "fa_core.score_mods.additive_grad serves any score_mod that adds a bias"
        )
    if score_mod is None and score_mod_grad is not None:
        raise ValueError("score_mod_grad was given without score_mod")
    if dsoftmax_lse is not None:
        V.check_tensor("dsoftmax_lse", dsoftmax_lse, len(lse_shape))
        V.check_device("dsoftmax_lse", dsoftmax_lse, "q", q)
        if tuple(dsoftmax_lse.shape) != tuple(lse_shape) or not dsoftmax_lse.is_floating_point():
            raise ValueError(
                f"dsoftmax_lse must be a floating tensor shaped like softmax_lse {tuple(lse_shape)}, "
                f"got {dsoftmax_lse.dtype} {tuple(dsoftmax_lse.shape)}"
            )


def check_full_blocks(block_mask: BlockMask, q: torch.Tensor | None = None) -> None:
    """The optional full-block fields as the backward reads them (one set of strides for both lists):
    :func:`fa_core.validation.check_full_blocks` with ``like_partial``: both or neither, int32, shaped exactly
    like the partial lists, on q's device (``q`` defaults to the partial list, which
    :func:`fa_core.validation.check_block_mask` has put there). The backward runs it through
    ``check_block_mask(..., full_like_partial=True)``."""
    ref = block_mask.kv_num_blocks if q is None else q
    batch, nheads = block_mask.kv_num_blocks.shape[:2]
    V.check_full_blocks(block_mask, batch, nheads, ref, like_partial=True)


_SPARSE_NAMES = (
    "BlkNum",
    "BlkIdx",
    "FullNum",
    "FullIdx",
    "stride_bn_b",
    "stride_bn_h",
    "stride_bi_b",
    "stride_bi_h",
    "stride_bi_r",
    "idx_cols",
)


def _named_sparse(*values: Any) -> dict[str, Any]:
    return dict(zip(_SPARSE_NAMES, values, strict=True))


def _sparse_args(block_mask: BlockMask | None, seqlen_k: int, dummy: torch.Tensor):
    """``(dq lists, dk/dv lists, has_full, block_size)``: each a dict of kernel arguments (partial and full
    lists, strides 0 on broadcast dims, ``idx_cols`` the index lists' last dim)."""
    if block_mask is None:
        none = _named_sparse(dummy, dummy, dummy, dummy, 0, 0, 0, 0, 0, 0)
        return none, none, False, (128, 128)

    def pack(num, idx, fnum, fidx):
        num, idx = num.contiguous(), idx.contiguous()
        fnum = fnum.contiguous() if fnum is not None else num
        fidx = fidx.contiguous() if fidx is not None else idx
        # full lists share the partial lists' layout (check_full_blocks), hence their strides
        _, _, *strides = block_list_args(num, idx)
        # idx_cols: the kernels clamp each list's length to it (the lengths are read from a tensor)
        return _named_sparse(num, idx, fnum, fidx, *strides, idx.shape[-1])

    bq, bk = (int(x) for x in block_mask.block_size)
    has_full = block_mask.full_kv_num_blocks is not None
    tq = transpose_block_mask(block_mask, -(-seqlen_k // bk))
    fwd = pack(
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
    )
    bwd = pack(tq.q_num_blocks, tq.q_indices, tq.full_q_num_blocks, tq.full_q_indices)
    return fwd, bwd, has_full, (bq, bk)
