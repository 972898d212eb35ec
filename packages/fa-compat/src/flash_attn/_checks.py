"""The argument check of the ``flash_attn`` API beyond the one check pass of :func:`fa_core.ops.prepare`:
a paged varlen call's ``block_table`` (checked before its pages are gathered)."""

from __future__ import annotations

import torch

from fa_core import validation as V

Tensor = torch.Tensor


def _check_block_table(block_table: Tensor, k_cache: Tensor, cu_seqlens_k: Tensor) -> None:
    """Paged varlen keys: int32 ``(batch, max_blocks)`` on k's device, used entries in [0, num_blocks)."""
    V.check_tensor("block_table", block_table, 2)
    V.check_device("block_table", block_table, "k", k_cache)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.shape[0] != cu_seqlens_k.numel() - 1:
        raise ValueError(f"block_table must have one row per sequence, got {tuple(block_table.shape)}")
    if V.value_checks_enabled(block_table):
        page = k_cache.shape[1]
        lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().cpu()
        need = (lens + page - 1) // page
        if bool((need > block_table.shape[1]).any()):
            raise ValueError("block_table has fewer columns than the longest sequence needs")
        used = torch.arange(block_table.shape[1])[None, :] < need[:, None]
        vals = block_table.cpu()[used]
        if bool(((vals < 0) | (vals >= k_cache.shape[0])).any()):
            raise ValueError(f"block_table entries must lie in [0, {k_cache.shape[0]}) for the pages in use")
