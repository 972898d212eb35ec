"""Input checks of flash_attn_with_kvcache: shapes / dtypes always, tensor values where affordable.

Each check raises ValueError / TypeError naming the argument. Value checks (``cache_seqlens``,
``block_table``, ``cache_batch_idx``, ``cache_leftpad`` contents) need a device-to-host copy on a GPU, so
there they are opt-in (``FA_PLUS_KVCACHE_VALUE_CHECKS=1``); on CPU tensors they always run.
"""

from __future__ import annotations

import os

import torch

from fa_core import validation as V

__all__ = ["cache_capacity", "kvcache_value_checks_enabled", "validate", "value_checks"]


def kvcache_value_checks_enabled(t: torch.Tensor) -> bool:
    """Checks of ``cache_seqlens`` / ``block_table`` / ``cache_batch_idx`` / ``cache_leftpad`` *values*.

    Always on for CPU tensors. On a GPU they need a device-to-host copy, so they are opt-in:
    ``FA_PLUS_KVCACHE_VALUE_CHECKS=1``. Never while a CUDA graph is captured or under torch.compile, and
    never with ``FA_PLUS_SKIP_VALUE_CHECKS=1`` (see :func:`fa_core.validation.value_checks_enabled`).
    """
    if not V.value_checks_enabled(t):
        return False
    return t.device.type == "cpu" or os.environ.get("FA_PLUS_KVCACHE_VALUE_CHECKS", "0") == "1"


def _check_int_vec(name: str, t: object, batch: int, q: torch.Tensor) -> torch.Tensor:
    V.check_tensor(name, t, 1)
    assert isinstance(t, torch.Tensor)
    V.check_device(name, t, "q", q)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.numel() != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one entry per sequence), got {tuple(t.shape)}")
    return t.contiguous()


def cache_capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    if block_table is not None:
        return block_table.shape[1] * k_cache.shape[1]
    return k_cache.shape[1]


def value_checks(
    batch,
    cache_seqlens,
    cache_leftpad,
    cache_batch_idx,
    block_table,
    seqlen_new,
    capacity,
    num_blocks,
    page,
    batch_cache,
) -> None:
    if isinstance(cache_seqlens, torch.Tensor):
        lens = cache_seqlens.cpu().long()
    else:
        lens = torch.full((batch,), int(cache_seqlens), dtype=torch.long)
    if bool((lens < 0).any()):
        raise ValueError(f"cache_seqlens must be >= 0, got {lens.tolist()}")
    total = lens + seqlen_new
    if bool((total > capacity).any()):
        raise ValueError(
            f"cache too small: cache_seqlens + seqlen_new = {total.tolist()} exceeds the cache capacity "
            f"{capacity} (k_cache seqlen, or block_table columns * page size)"
        )
    start = torch.zeros_like(lens)
    if cache_leftpad is not None:
        start = cache_leftpad.cpu().long()
        if bool((start < 0).any()) or bool((start > lens).any()):
            raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens]; got {start.tolist()}")
    if cache_batch_idx is not None:
        idx = cache_batch_idx.cpu().long()
        if bool((idx < 0).any()) or bool((idx >= batch_cache).any()):
            raise ValueError(f"cache_batch_idx entries must lie in [0, {batch_cache}); got {idx.tolist()}")
    if block_table is not None:
        bt = block_table.cpu().long()
        cols = torch.arange(bt.shape[1])[None, :]
        used = (cols >= (start // page)[:, None]) & (cols < ((total + page - 1) // page)[:, None])
        bad = used & ((bt < 0) | (bt >= num_blocks))
        if bool(bad.any()):
            b, c = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"block_table[{b}, {c}] = {int(bt[b, c])} is out of range: the paged cache has {num_blocks} blocks"
            )


def validate(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    cache_leftpad,
    block_table,
    alibi_slopes,
    window_size,
    softcap,
    softmax_scale,
):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, t, 4)
    V.check_compute_device("q", q)
    V.check_dtype("q", q)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_device(name, t, "q", q)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: they must share a dtype")
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have contiguous last dimension (stride 1), got strides {t.stride()}"
            )
    V.check_last_dim_contiguous("q", q)
    batch, _, nheads, d = q.shape
    nheads_k, dv = k_cache.shape[2], v_cache.shape[3]
    if d == 0 or d > V.MAX_HEADDIM:
        raise ValueError(f"q head dim must be in [1, {V.MAX_HEADDIM}], got {d}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q head dim {d}")
    if dv == 0 or dv > V.MAX_HEADDIM:
        raise ValueError(f"v_cache head dim must be in [1, {V.MAX_HEADDIM}], got {dv}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} does not match k_cache shape {tuple(k_cache.shape)} "
            "except the head dim"
        )
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(
            f"nheads ({nheads}) must be a multiple of k_cache's nheads_k ({nheads_k}) for GQA/MQA"
        )
    if block_table is not None:
        V.check_tensor("block_table", block_table, 2)
        V.check_device("block_table", block_table, "q", q)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        if block_table.shape[0] != batch:
            raise ValueError(
                f"block_table must have {batch} rows (one per sequence), got {tuple(block_table.shape)}"
            )
        if block_table.shape[1] == 0:
            raise ValueError("block_table must have at least one column")
        if k_cache.shape[1] == 0:
            raise ValueError("paged k_cache must have page_block_size >= 1")
        if cache_batch_idx is not None:
            raise ValueError(
                "cache_batch_idx cannot be combined with block_table (the table already maps sequences)"
            )
    elif cache_batch_idx is None and k_cache.shape[0] < batch:
        raise ValueError(
            f"k_cache batch {k_cache.shape[0]} is smaller than q batch {batch} (and no cache_batch_idx)"
        )
    if (k is None) != (v is None):
        raise ValueError("k and v must be passed together (new keys and values to append)")
    seqlen_new = 0
    if k is not None:
        for name, t, hd in (("k", k, d), ("v", v, dv)):
            V.check_tensor(name, t, 4)
            V.check_device(name, t, "q", q)
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: they must share a dtype")
            if t.shape[0] != batch or t.shape[2] != nheads_k or t.shape[3] != hd:
                raise ValueError(
                    f"{name} must have shape (batch={batch}, seqlen_new, nheads_k={nheads_k}, {hd}), "
                    f"got {tuple(t.shape)}"
                )
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must have the same seqlen_new, got {k.shape[1]} and {v.shape[1]}")
        seqlen_new = k.shape[1]
        if cache_seqlens is None:
            raise ValueError("cache_seqlens must be passed when k and v are appended to the cache")
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int):
            raise TypeError(
                f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}"
            )
    elif cache_seqlens is not None:
        cache_seqlens = _check_int_vec("cache_seqlens", cache_seqlens, batch, q)
    if cache_batch_idx is not None:
        cache_batch_idx = _check_int_vec("cache_batch_idx", cache_batch_idx, batch, q)
    if cache_leftpad is not None:
        cache_leftpad = _check_int_vec("cache_leftpad", cache_leftpad, batch, q)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be passed together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k and v to append (flash-attn semantics)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            V.check_tensor(name, t, 2)
            V.check_device(name, t, "q", q)
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(
                f"rotary_sin shape {tuple(rotary_sin.shape)} != rotary_cos shape {tuple(rotary_cos.shape)}"
            )
        if rotary_cos.shape[1] == 0 or 2 * rotary_cos.shape[1] > d:
            raise ValueError(
                f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} must be in [2, {d}]"
            )
    V.check_alibi(alibi_slopes, batch, nheads, q)
    V.check_window(window_size)
    V.check_scalars(0.0, softcap, softmax_scale)
    return cache_seqlens, cache_batch_idx, cache_leftpad, seqlen_new
