"""Argument and value checks of :func:`fa_kvcache.unified.unified_attention` and
:func:`fa_kvcache.paged_append.append_paged_kv` (each error names the argument, before anything is written)."""

from __future__ import annotations

import torch

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError

FP8 = torch.float8_e4m3fn
#: cache dtypes the unified kernel reads
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, FP8)


def _check_descale(name: str, t: torch.Tensor | None, batch: int, nheads_k: int, q: torch.Tensor) -> None:
    if t is None:
        raise FlashAttnValueError(f"{name} (batch, nheads_k) float32 is required with a float8_e4m3fn cache")
    V.check_tensor(name, t, 2)
    V.check_device(name, t, "q", q)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != (batch, nheads_k):
        raise FlashAttnValueError(f"{name} must have shape ({batch}, {nheads_k}), got {tuple(t.shape)}")


def _check_block_table(block_table: object, batch: int, q: torch.Tensor) -> torch.Tensor:
    V.check_tensor("block_table", block_table, 2)
    assert isinstance(block_table, torch.Tensor)
    V.check_device("block_table", block_table, "q", q)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise FlashAttnValueError(
            f"block_table must have shape (batch = {batch}, max_blocks >= 1), got {tuple(block_table.shape)}"
        )
    return block_table if block_table.stride(-1) == 1 else block_table.contiguous()


def _check_int_vec(name: str, t: object, n: int, q: torch.Tensor) -> torch.Tensor:
    V.check_tensor(name, t, 1)
    assert isinstance(t, torch.Tensor)
    V.check_device(name, t, "q", q)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.numel() != n:
        raise FlashAttnValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.contiguous()


def _check_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, t, 4)
        V.check_device(name, t, "q", q)
        if t.dtype not in CACHE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: q's dtype or float8_e4m3fn")
        V.check_last_dim_contiguous(name, t)
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.dtype != FP8 and k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache must have q's dtype ({q.dtype}) or float8_e4m3fn, got {k_cache.dtype}")
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[0] < 1:
        raise FlashAttnValueError(
            "k_cache / v_cache must be paged caches (num_blocks >= 1, page_size, nheads_k, d) with the same "
            f"pages, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    page = k_cache.shape[1]
    if page < 16 or page & (page - 1):
        raise FlashAttnValueError(
            f"the page size (k_cache.shape[1]) must be a power of two >= 16, got {page}"
        )
    if k_cache.shape[3] != q.shape[2]:
        raise FlashAttnValueError(f"k_cache head dim {k_cache.shape[3]} differs from q's {q.shape[2]}")
    nheads_k = k_cache.shape[2]
    if nheads_k < 1 or q.shape[1] % nheads_k:
        raise FlashAttnValueError(f"nheads ({q.shape[1]}) must be a multiple of nheads_k ({nheads_k})")


def _value_checks(
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    block_table: torch.Tensor,
    total_q: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    page: int,
    num_blocks: int,
) -> None:
    """The checks of index *values* (one device-to-host copy of each index tensor)."""
    cu = cu_seqlens_q.cpu().long()
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total_q:
        raise FlashAttnValueError(
            f"cu_seqlens_q must be non-decreasing from 0 to total_q = {total_q}, got {cu.tolist()}"
        )
    lens_q = cu[1:] - cu[:-1]
    if lens_q.numel() and int(lens_q.max()) > max_seqlen_q:
        raise FlashAttnValueError(
            f"max_seqlen_q = {max_seqlen_q} is smaller than the longest query run ({int(lens_q.max())})"
        )
    lens_k = seqused_k.cpu().long()
    cols = block_table.shape[1]
    if bool((lens_k < 0).any()) or bool((lens_k > cols * page).any()):
        raise FlashAttnValueError(
            f"seqused_k must lie in [0, max_blocks * page_size = {cols * page}], got {lens_k.tolist()}"
        )
    if lens_k.numel() and int(lens_k.max()) > max_seqlen_k:
        raise FlashAttnValueError(
            f"max_seqlen_k = {max_seqlen_k} is smaller than the longest context ({int(lens_k.max())})"
        )
    need = (lens_k + page - 1) // page
    read = torch.arange(cols) < need[:, None]
    entries = block_table.cpu().long()
    if bool(((entries < 0) | (entries >= num_blocks))[read].any()):
        raise FlashAttnValueError(f"block_table entries a request reads must lie in [0, {num_blocks})")
