"""Append new keys / values into a paged cache (the unified kernel's layout), quantizing into an FP8 cache with the
given scales, rotary on the keys as :func:`fa_kvcache.interface.flash_attn_with_kvcache` applies it."""

from __future__ import annotations

import torch

from fa_core import settings
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from fa_core.fast_launch import FastLaunch, empty_arg
from fa_core.forward_configs import cdiv
from fa_core.rotary import apply_rotary
from fa_kvcache.append import append_dims
from fa_kvcache.unified_checks import FP8, _check_block_table, _check_descale, _check_int_vec
from fa_kvcache.unified_kernels import append_paged_kernel

__all__ = ["append_paged_kv"]

append_launch = FastLaunch(append_paged_kernel)


def append_paged_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    max_seqlen_new: int,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = False,
    q: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Write a serving step's new keys / values into the pages (in place), one kernel; rotate q alike.

    Args:
        k_new, v_new: ``(total_new, nheads_k, d[v])`` packed new rows; request ``b``'s are ``[cu_seqlens_new[b],
            cu_seqlens_new[b + 1])`` and go to positions ``cache_seqlens[b] + t`` (page ``block_table[b, pos //
            page_size]``, row ``pos % page_size``).
        k_cache, v_cache: ``(num_blocks, page_size, nheads_k, d[v])``, k_new's dtype or ``float8_e4m3fn``.
        block_table: ``(batch, max_blocks)`` int32. cache_seqlens: ``(batch,)`` int32 rows already filled.
        cu_seqlens_new: ``(batch + 1,)`` int32. max_seqlen_new: int bound of the new runs (sizes the grid).
        k_scale, v_scale: ``(batch, nheads_k)`` float32, required with an FP8 cache: stored values are
            ``k / k_scale`` rounded to e4m3 (saturated to +-448), so ``k_descale = k_scale`` in
            :func:`unified_attention`.
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``: k rotated at its positions before the store
            (as ``flash_attn_with_kvcache`` does), and ``q`` ``(total_new, nheads, d)`` too if given.
        rotary_interleaved: GPT-J pairs ``(2i, 2i + 1)`` instead of GPT-NeoX halves.

    Returns:
        ``q`` rotated at the positions of its request's new rows (a new tensor) when ``q`` and rotary are
        given, else ``q`` (None if not given).

    Value checks (``cache_seqlens[b] + new rows <= capacity``, used block-table entries in range,
    ``cu_seqlens_new`` consistent) run when ``fa_core.settings.get().value_checks`` is on and no graph is
    captured; without them the kernel clamps every index and writes no row past a request's capacity.
    """
    V.check_tensor("k_new", k_new, 3)
    V.check_tensor("v_new", v_new, 3)
    V.check_compute_device("k_new", k_new)
    V.check_dtype("k_new", k_new, (torch.float16, torch.bfloat16, torch.float32))
    if v_new.dtype != k_new.dtype or v_new.device != k_new.device:
        raise TypeError(f"v_new must match k_new's dtype and device, got {v_new.dtype} on {v_new.device}")
    k_new, v_new = V.contig_last(k_new), V.contig_last(v_new)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, t, 4)
        V.check_device(name, t, "k_new", k_new)
        V.check_last_dim_contiguous(name, t)
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (k_new.dtype, FP8):
        raise TypeError(
            f"k_cache / v_cache must both have k_new's dtype ({k_new.dtype}) or float8_e4m3fn, got "
            f"{k_cache.dtype} and {v_cache.dtype}"
        )
    total_new, nheads_k, d = k_new.shape
    if tuple(v_new.shape[:2]) != (total_new, nheads_k):
        raise FlashAttnValueError(
            f"v_new must have shape ({total_new}, {nheads_k}, dv), got {tuple(v_new.shape)}"
        )
    if k_cache.shape[2:] != (nheads_k, d) or v_cache.shape[2:] != (nheads_k, v_new.shape[2]):
        raise FlashAttnValueError(
            f"k_cache / v_cache (num_blocks, page, {nheads_k}, d) must match k_new / v_new, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[:2] != v_cache.shape[:2]:
        raise FlashAttnValueError("k_cache and v_cache must have the same pages")
    page = k_cache.shape[1]
    if page < 16 or page & (page - 1):
        raise FlashAttnValueError(
            f"the page size (k_cache.shape[1]) must be a power of two >= 16, got {page}"
        )
    batch = V.check_cu_seqlens("cu_seqlens_new", cu_seqlens_new, total_new, k_new, None, "max_seqlen_new")
    cu_seqlens_new = cu_seqlens_new.contiguous()
    cache_seqlens = _check_int_vec("cache_seqlens", cache_seqlens, batch, k_new)
    block_table = _check_block_table(block_table, batch, k_new)
    if isinstance(max_seqlen_new, bool) or not isinstance(max_seqlen_new, int) or max_seqlen_new < 0:
        raise FlashAttnValueError(f"max_seqlen_new must be an int >= 0, got {max_seqlen_new!r}")
    quant = k_cache.dtype == FP8 and k_new.dtype != FP8
    if quant:
        _check_descale("k_scale", k_scale, batch, nheads_k, k_new)
        _check_descale("v_scale", v_scale, batch, nheads_k, k_new)
    elif k_scale is not None or v_scale is not None:
        raise FlashAttnValueError("k_scale / v_scale apply to a float8_e4m3fn cache only")
    has_rot = rotary_cos is not None or rotary_sin is not None
    if has_rot:
        if rotary_cos is None or rotary_sin is None:
            raise FlashAttnValueError("rotary_cos and rotary_sin go together")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            V.check_tensor(name, t, 2)
            V.check_device(name, t, "k_new", k_new)
        if rotary_sin.shape != rotary_cos.shape or 2 * rotary_cos.shape[1] > d:
            raise FlashAttnValueError(
                f"rotary_cos / rotary_sin must have the same shape (seqlen_ro, rotary_dim / 2) with rotary_dim "
                f"<= {d}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
    if q is not None:
        V.check_tensor("q", q, 3)
        V.check_device("q", q, "k_new", k_new)
        if q.shape[0] != total_new:
            raise FlashAttnValueError(
                f"q must have {total_new} rows (one per new token), got {tuple(q.shape)}"
            )
    capacity = block_table.shape[1] * page
    if batch > 0 and settings.get().value_checks and V.value_checks_enabled(k_new):
        cu = cu_seqlens_new.cpu().long()
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total_new:
            raise FlashAttnValueError(
                f"cu_seqlens_new must be non-decreasing from 0 to total_new = {total_new}, got {cu.tolist()}"
            )
        n_new = cu[1:] - cu[:-1]
        if n_new.numel() and int(n_new.max()) > max_seqlen_new:
            raise FlashAttnValueError(
                f"max_seqlen_new = {max_seqlen_new} is below the longest run {int(n_new.max())}"
            )
        end = cache_seqlens.cpu().long() + n_new
        if bool((cache_seqlens.cpu() < 0).any()) or bool((end > capacity).any()):
            raise FlashAttnValueError(
                f"cache_seqlens + new rows must lie in [0, capacity = {capacity}], got ends {end.tolist()}"
            )
        if has_rot and rotary_cos is not None and int(end.max()) > rotary_cos.shape[0]:
            raise FlashAttnValueError(
                f"rotary_cos / rotary_sin have {rotary_cos.shape[0]} positions, the new rows reach {int(end.max())}"
            )
        need = (end + page - 1) // page
        read = torch.arange(block_table.shape[1]) < need[:, None]
        entries = block_table.cpu().long()
        if bool(((entries < 0) | (entries >= k_cache.shape[0]))[read].any()):
            raise FlashAttnValueError(
                f"block_table entries a request writes must lie in [0, {k_cache.shape[0]})"
            )
    if q is not None and has_rot and total_new > 0 and rotary_cos is not None and rotary_sin is not None:
        q = apply_rotary(
            q,
            rotary_cos,
            rotary_sin,
            seqlen_offsets=cache_seqlens.clamp(0, capacity),
            cu_seqlens=cu_seqlens_new,
            max_seqlen=max_seqlen_new,
            interleaved=rotary_interleaved,
        )
    if batch == 0 or total_new == 0 or max_seqlen_new == 0 or nheads_k == 0:
        return q
    placeholder = empty_arg(k_new, torch.float32)
    cos = rotary_cos.contiguous() if has_rot and rotary_cos is not None else placeholder
    sin = rotary_sin.contiguous() if has_rot and rotary_sin is not None else placeholder
    rot_dim = 2 * cos.shape[1] if has_rot else 0
    ks = k_scale if quant and k_scale is not None else placeholder
    vs = v_scale if quant and v_scale is not None else placeholder
    block_t = 16 if V.interpreting() else 32
    append_launch(
        (cdiv(max_seqlen_new, block_t), batch, nheads_k),
        k_new,
        v_new,
        k_cache,
        v_cache,
        block_table,
        cache_seqlens,
        cu_seqlens_new,
        ks,
        vs,
        cos,
        sin,
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        ks.stride(0) if quant else 0,
        ks.stride(1) if quant else 0,
        vs.stride(0) if quant else 0,
        vs.stride(1) if quant else 0,
        total_new,
        block_table.shape[1],
        k_cache.shape[0],
        cos.shape[0] if has_rot else 0,
        **append_dims(d, v_new.shape[2], has_rot, rot_dim, rotary_interleaved),
        PAGE=page,
        QUANT=quant,
        BLOCK_T=block_t,
    )
    return q
