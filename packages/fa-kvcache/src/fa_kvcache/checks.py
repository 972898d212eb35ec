"""Input checks of flash_attn_with_kvcache: shapes / dtypes always, tensor values unless switched off.

Shape and dtype checks raise ``TypeError`` / :class:`fa_core.errors.FlashAttnValueError` naming the argument.
Value checks (the contents of ``cache_seqlens``, ``block_table``, ``cache_batch_idx``, ``cache_leftpad``) cost
one device-to-host copy of a few reduced numbers; they run on CPU and GPU alike unless
``fa_core.settings.get().value_checks`` is off (``FA_PLUS_SKIP_VALUE_CHECKS=1``), and never under CUDA-graph
capture or torch.compile tracing (:func:`fa_core.validation.value_checks_enabled`). Without them the kernels
still stay inside every tensor: each index read from a tensor's values is clamped in the kernel (see
:mod:`fa_kvcache.kernels`), so bad values give meaningless output, never a memory fault.
"""

from __future__ import annotations

import torch

from fa_core import settings
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError

__all__ = ["cache_capacity", "kvcache_value_checks_enabled", "validate", "value_checks"]


def kvcache_value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether the checks of ``cache_seqlens`` / ``block_table`` / ``cache_batch_idx`` / ``cache_leftpad``
    *values* run for a call on ``t``'s device: ``fa_core.settings.get().value_checks`` (default on, CPU and
    GPU) and not while a CUDA graph is captured or torch.compile traces
    (:func:`fa_core.validation.value_checks_enabled`)."""
    return settings.get().value_checks and V.value_checks_enabled(t)


def _check_int_vec(name: str, t: object, batch: int, q: torch.Tensor) -> torch.Tensor:
    V.check_tensor(name, t, 1)
    assert isinstance(t, torch.Tensor)
    V.check_device(name, t, "q", q)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.numel() != batch:
        raise FlashAttnValueError(
            f"{name} must have shape ({batch},) (one entry per sequence), got {tuple(t.shape)}"
        )
    return t.contiguous()


def cache_capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Rows one sequence can hold: ``block_table.shape[1] * page_block_size`` (paged) or ``seqlen_cache``."""
    if block_table is not None:
        return block_table.shape[1] * k_cache.shape[1]
    return k_cache.shape[1]


def value_checks(
    batch: int,
    cache_seqlens: torch.Tensor | int,
    cache_leftpad: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
    seqlen_new: int,
    capacity: int,
    num_blocks: int,
    page: int,
    batch_cache: int,
    leftpad_name: str = "cache_leftpad",
) -> None:
    """Range checks of the index tensors, with one device-to-host copy (five reduced numbers) when they pass.

    ``cache_seqlens`` (int or ``(batch,)``): ``>= 0`` and ``max(cache_seqlens) + seqlen_new <= capacity``
    (as flash-attn checks a paged cache); ``cache_leftpad`` in ``[0, cache_seqlens]``; ``cache_batch_idx`` in
    ``[0, batch_cache)``; the ``block_table`` entries a sequence uses (columns holding its rows
    ``[cache_leftpad, cache_seqlens + seqlen_new)``) in ``[0, num_blocks)``; unused entries may hold anything
    (serving stacks pad with -1). Raises :class:`FlashAttnValueError` naming the argument.
    """
    tensors = [
        t for t in (cache_seqlens, cache_leftpad, cache_batch_idx, block_table) if isinstance(t, torch.Tensor)
    ]
    dev = tensors[0].device if tensors else torch.device("cpu")
    if isinstance(cache_seqlens, torch.Tensor):
        lens = cache_seqlens.long()
    else:
        lens = torch.full((batch,), int(cache_seqlens), dtype=torch.long, device=dev)
    total = lens + seqlen_new
    zero = torch.zeros((), dtype=torch.long, device=dev)
    start = cache_leftpad.long() if cache_leftpad is not None else torch.zeros_like(lens)
    pad_bad = ((start < 0) | (start > lens)).sum() if cache_leftpad is not None else zero
    if cache_batch_idx is not None:
        idx = cache_batch_idx.long()
        idx_bad = ((idx < 0) | (idx >= batch_cache)).sum()
    else:
        idx_bad = zero
    if block_table is not None:
        bt = block_table.long()
        cols = torch.arange(bt.shape[1], device=dev)[None, :]
        used = (cols >= (start.clamp(min=0) // page)[:, None]) & (
            cols < ((total + page - 1) // page)[:, None]
        )
        bt_bad_mask = used & ((bt < 0) | (bt >= num_blocks))
        bt_bad = bt_bad_mask.sum()
    else:
        bt_bad_mask = None
        bt_bad = zero
    # the one host read of the passing case
    max_total, min_len, n_pad, n_idx, n_bt = torch.stack(
        [total.max(), lens.min(), pad_bad, idx_bad, bt_bad]
    ).tolist()
    if min_len < 0:
        raise FlashAttnValueError(f"cache_seqlens must be >= 0, got {lens.tolist()}")
    if max_total > capacity:
        where = (
            f"the capacity addressable by block_table (block_table.shape[1] * page_block_size = "
            f"{block_table.shape[1]} * {page} = {capacity}); allocate more columns in block_table"
            if block_table is not None
            else f"the cache capacity (k_cache.shape[1] = {capacity})"
        )
        raise FlashAttnValueError(
            f"cache too small: max(cache_seqlens){' + seqlen_new' if seqlen_new else ''} = {max_total} "
            "exceeds "
            f"{where}; cache_seqlens = {lens.tolist()}"
        )
    if n_pad:
        raise FlashAttnValueError(
            f"{leftpad_name} must lie in [0, cache_seqlens] = {lens.tolist()}; got {start.tolist()}"
        )
    if n_idx and cache_batch_idx is not None:
        raise FlashAttnValueError(
            f"cache_batch_idx entries must lie in [0, {batch_cache}); got {cache_batch_idx.tolist()}"
        )
    if n_bt and bt_bad_mask is not None and block_table is not None:
        b, c = (int(x) for x in bt_bad_mask.nonzero()[0])
        raise FlashAttnValueError(
            f"block_table[{b}, {c}] = {int(block_table[b, c])} is out of range: the paged cache has "
            f"{num_blocks} blocks"
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
    leftpad_name="cache_leftpad",
):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, t, 4)
    V.check_compute_device("q", q)
    V.check_dtype(
        "q", q
    )  # also refuses bfloat16 CPU tensors under the interpreter (its bf16 tl.dot is wrong)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_device(name, t, "q", q)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: they must share a dtype")
        if t.stride(-1) != 1:
            raise FlashAttnValueError(
                f"{name} must have contiguous last dimension (stride 1), got strides {t.stride()}"
            )
    V.check_last_dim_contiguous("q", q)
    batch, _, nheads, d = q.shape
    nheads_k, dv = k_cache.shape[2], v_cache.shape[3]
    if d == 0 or d > V.MAX_HEADDIM:
        raise FlashAttnValueError(f"q head dim must be in [1, {V.MAX_HEADDIM}], got {d}")
    if k_cache.shape[3] != d:
        raise FlashAttnValueError(f"k_cache head dim {k_cache.shape[3]} must equal q head dim {d}")
    if dv == 0 or dv > V.MAX_HEADDIM:
        raise FlashAttnValueError(f"v_cache head dim must be in [1, {V.MAX_HEADDIM}], got {dv}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise FlashAttnValueError(
            f"v_cache shape {tuple(v_cache.shape)} does not match k_cache shape {tuple(k_cache.shape)} "
            "except the head dim"
        )
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise FlashAttnValueError(
            f"nheads ({nheads}) must be a multiple of k_cache's nheads_k ({nheads_k}) for GQA/MQA"
        )
    if block_table is not None:
        V.check_tensor("block_table", block_table, 2)
        V.check_device("block_table", block_table, "q", q)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        if block_table.shape[0] != batch:
            raise FlashAttnValueError(
                f"block_table must have {batch} rows (one per sequence), got {tuple(block_table.shape)}"
            )
        if block_table.shape[1] == 0:
            raise FlashAttnValueError("block_table must have at least one column")
        if k_cache.shape[1] == 0:
            raise FlashAttnValueError("paged k_cache must have page_block_size >= 1")
        if k_cache.shape[0] == 0 and batch > 0:
            raise FlashAttnValueError("paged k_cache has no blocks (k_cache.shape[0] == 0)")
        if cache_batch_idx is not None:
            raise FlashAttnValueError(
                "cache_batch_idx cannot be combined with block_table (the table already maps sequences)"
            )
        if cache_leftpad is not None:
            raise FlashAttnValueError(
                f"{leftpad_name} cannot be combined with block_table: a paged KV cache with left padding is "
                "not supported (as in flash-attn)"
            )
    elif cache_batch_idx is not None and k_cache.shape[0] == 0 and batch > 0:
        raise FlashAttnValueError("k_cache has batch 0: cache_batch_idx has no row to select")
    elif cache_batch_idx is None and k_cache.shape[0] < batch:
        raise FlashAttnValueError(
            f"k_cache batch {k_cache.shape[0]} is smaller than q batch {batch} (and no cache_batch_idx)"
        )
    if (k is None) != (v is None):
        raise FlashAttnValueError("k and v must be passed together (new keys and values to append)")
    seqlen_new = 0
    if k is not None:
        for name, t, hd in (("k", k, d), ("v", v, dv)):
            V.check_tensor(name, t, 4)
            V.check_device(name, t, "q", q)
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: they must share a dtype")
            if t.shape[0] != batch or t.shape[2] != nheads_k or t.shape[3] != hd:
                raise FlashAttnValueError(
                    f"{name} must have shape (batch={batch}, seqlen_new, nheads_k={nheads_k}, {hd}), "
                    f"got {tuple(t.shape)}"
                )
        if k.shape[1] != v.shape[1]:
            raise FlashAttnValueError(
                f"k and v must have the same seqlen_new, got {k.shape[1]} and {v.shape[1]}"
            )
        seqlen_new = k.shape[1]
        if cache_seqlens is None:
            raise FlashAttnValueError("cache_seqlens must be passed when k and v are appended to the cache")
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
        cache_leftpad = _check_int_vec(leftpad_name, cache_leftpad, batch, q)
    if (rotary_cos is None) != (rotary_sin is None):
        raise FlashAttnValueError("rotary_cos and rotary_sin must be passed together")
    if rotary_cos is not None:
        if k is None:
            raise FlashAttnValueError(
                "rotary_cos/rotary_sin need the new k and v to append (flash-attn semantics)"
            )
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            V.check_tensor(name, t, 2)
            V.check_device(name, t, "q", q)
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
        if rotary_sin.shape != rotary_cos.shape:
            raise FlashAttnValueError(
                f"rotary_sin shape {tuple(rotary_sin.shape)} != rotary_cos shape {tuple(rotary_cos.shape)}"
            )
        if rotary_cos.shape[1] == 0 or 2 * rotary_cos.shape[1] > d:
            raise FlashAttnValueError(
                f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} must be in [2, {d}]"
            )
    V.check_alibi(alibi_slopes, batch, nheads, q)
    V.check_window(window_size)
    V.check_scalars(0.0, softcap, softmax_scale)
    return cache_seqlens, cache_batch_idx, cache_leftpad, seqlen_new
