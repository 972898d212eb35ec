"""Input checks of the varlen forward's key-side options: ``leftpad_k`` and a paged K/V cache (``block_table``).

flash-attn's rule (csrc/flash_attn/src/block_info.h): sequence b's keys start ``leftpad_k[b]`` rows into its
slice and number ``(seqused_k[b] or cu_seqlens_k[b + 1] - cu_seqlens_k[b]) - leftpad_k[b]``. Paged: k / v are
a cache ``(num_pages, page_size, nheads_k, d)`` (page size a power of two >= 16, every size fa-kvcache
takes; flash-attn asks for multiples of 256), key j of sequence b lives in row ``(leftpad_k[b] + j) %
page_size`` of page ``block_table[b, (leftpad_k[b] + j) // page_size]``, and ``cu_seqlens_k`` / ``seqused_k``
give the lengths (flash-attn refuses leftpad_k with a paged cache; here the two combine as stated).

The kernel clamps every index it reads (fa_core.masking.varlen_bounds, clamp_index), so skipped value checks
(CUDA graphs, ``torch.compile``, ``value_checks=False``) give garbage out, never a stray memory access.
"""

from __future__ import annotations

import torch

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError

__all__ = ["check_leftpad_and_pages", "key_view"]


def key_view(k: torch.Tensor, block_table: torch.Tensor | None) -> torch.Tensor:
    """A 3-D ``(rows, nheads_k, d)`` view of ``k`` for the shape / dtype / stride checks of the packed layout:
    ``k`` itself, or the first row of every page of a paged cache."""
    return k if block_table is None or k.dim() != 4 else k[:, 0]


def check_leftpad_and_pages(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    seqused_k: torch.Tensor | None,
    leftpad_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    batch: int,
    return_probs: bool,
) -> None:
    """Validate ``leftpad_k`` ``(batch,)`` int32 and ``block_table`` ``(batch, max_pages)`` int32 with the
    paged ``k`` / ``v``; with value checks on, also their values: ``0 <= leftpad_k[b] <= seqlen_k[b]``, each
    length within the table row's capacity, each table entry a sequence reads in ``[0, num_pages)``."""
    if leftpad_k is None and block_table is None:
        return
    if return_probs:
        raise FlashAttnValueError("return_probs is not supported with leftpad_k or block_table")
    if leftpad_k is not None:
        V.check_tensor("leftpad_k", leftpad_k, 1)
        V.check_device("leftpad_k", leftpad_k, "q", q)
        if leftpad_k.dtype != torch.int32:
            raise TypeError(f"leftpad_k must be int32, got {leftpad_k.dtype}")
        if leftpad_k.numel() != batch:
            raise FlashAttnValueError(
                f"leftpad_k must have {batch} entries (one per sequence), got {leftpad_k.numel()}"
            )
    page = 0
    if block_table is not None:
        if q.dtype == V.FP8_DTYPE:
            raise FlashAttnValueError("block_table is not supported with FP8 inputs")
        V.check_tensor("block_table", block_table, 2)
        V.check_device("block_table", block_table, "q", q)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        if block_table.shape[0] != batch or block_table.shape[1] < 1:
            raise FlashAttnValueError(
                f"block_table must have shape (batch = {batch}, max_pages >= 1), got {tuple(block_table.shape)}"
            )
        if block_table.stride(-1) != 1:
            raise FlashAttnValueError("block_table must have a contiguous last dimension")
        V.check_tensor("k", k, 4)
        V.check_tensor("v", v, 4)
        if k.shape[:2] != v.shape[:2] or k.shape[0] < 1:
            raise FlashAttnValueError(
                "a paged k / v must be caches (num_pages >= 1, page_size, nheads_k, d) with the same pages, "
                f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
            )
        page = k.shape[1]
        if page < 16 or page & (page - 1):
            raise FlashAttnValueError(f"the page size (k.shape[1]) must be a power of two >= 16, got {page}")
    if not V.value_checks_enabled(cu_seqlens_k):
        return
    cu = cu_seqlens_k.cpu().long()
    lens = (cu[1:] - cu[:-1]) if seqused_k is None else seqused_k.cpu().long()
    if leftpad_k is not None:
        pad = leftpad_k.cpu().long()
        if bool((pad < 0).any()) or bool((pad > lens).any()):
            raise FlashAttnValueError(
                f"leftpad_k must lie in [0, seqlen_k of each sequence] = [0, {lens.tolist()}], got {pad.tolist()}"
            )
    if block_table is not None:
        cols = block_table.shape[1]
        if bool((lens > cols * page).any()):
            raise FlashAttnValueError(
                f"sequence lengths {lens.tolist()} exceed the block table's capacity "
                f"(max_pages {cols} x page_size {page} = {cols * page})"
            )
        # the table entries a sequence reads: its first ceil(length / page) columns (left padding included)
        need = (lens + page - 1) // page
        read = torch.arange(cols) < need[:, None]
        entries = block_table.cpu().long()
        if bool(((entries < 0) | (entries >= k.shape[0]))[read].any()):
            raise FlashAttnValueError(f"block_table entries a sequence reads must lie in [0, {k.shape[0]})")
