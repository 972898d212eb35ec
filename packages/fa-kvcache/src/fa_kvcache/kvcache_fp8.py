""":func:`fa_kvcache.interface.flash_attn_with_kvcache` over an FP8 (``float8_e4m3fn``) cache with
FlashAttention-3's per-(batch, kv-head) ``k_descale`` / ``v_descale``: the call is routed through the unified
paged kernel (:func:`fa_kvcache.unified.unified_attention`), a contiguous cache viewed as pages
(:func:`_contiguous_as_paged`), new keys / values quantized into the cache by
:func:`fa_kvcache.unified.append_paged_kv`.
"""

from __future__ import annotations

import functools

import torch

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from fa_core.rotary import apply_rotary
from fa_kvcache.checks import check_new_kv, kvcache_value_checks_enabled

__all__ = ["fp8_kvcache"]

_FP8 = torch.float8_e4m3fn


@functools.lru_cache(maxsize=64)
def _equal_runs(n: int, step: int, device: torch.device) -> torch.Tensor:
    """``arange(n + 1) * step`` int32 on ``device``: the ``cu_seqlens`` of ``n`` runs of ``step`` rows (cached:
    a decode loop builds it once per shape)."""
    return torch.arange(n + 1, dtype=torch.int32, device=device) * step


@functools.lru_cache(maxsize=64)
def _page_rows(batch: int, pages: int, device: torch.device) -> torch.Tensor:
    """``(batch, pages)`` int32 block table ``b * pages + j``: sequence ``b`` of a contiguous cache viewed as
    ``pages`` pages per sequence (cached)."""
    return torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)


def _contiguous_as_paged(
    k_cache: torch.Tensor, v_cache: torch.Tensor, batch: int, cache_batch_idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A contiguous cache ``(batch_cache, seqlen_cache, nheads_k, d)`` as the unified kernel's pages:
    ``(k_pages, v_pages, block_table)`` with page size the largest power of two dividing ``seqlen_cache``
    (one page per sequence when ``seqlen_cache`` is a power of two; otherwise the cache's first two dims must
    merge into one, as in a contiguous tensor). The page size must be >= 16, else FlashAttnValueError."""
    batch_cache, seqlen_cache = k_cache.shape[:2]
    page = seqlen_cache & -seqlen_cache
    if page < 16:
        raise FlashAttnValueError(
            f"a contiguous float8_e4m3fn k_cache needs seqlen_cache (k_cache.shape[1]) divisible by 16, got "
            f"{seqlen_cache}; pass a paged cache with block_table instead"
        )
    pages = seqlen_cache // page
    if pages > 1:
        try:
            k_cache = k_cache.view(batch_cache * pages, page, *k_cache.shape[2:])
            v_cache = v_cache.view(batch_cache * pages, page, *v_cache.shape[2:])
        except RuntimeError:
            raise FlashAttnValueError(
                f"a contiguous float8_e4m3fn k_cache / v_cache with seqlen_cache = {seqlen_cache} (not a power "
                "of two) must have mergeable batch and sequence dims (strides of a contiguous tensor); pass a "
                "paged cache with block_table instead"
            ) from None
    if cache_batch_idx is None:
        block_table = _page_rows(batch, pages, k_cache.device)
    else:
        block_table = (
            cache_batch_idx.long()[:, None] * pages + torch.arange(pages, device=k_cache.device)
        ).to(torch.int32)
    return k_cache, v_cache, block_table


def _fp8_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    cache_seqlens: int | torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    rotary_interleaved: bool,
    alibi_slopes: torch.Tensor | None,
    num_splits: int,
    return_softmax_lse: bool,
    attention_chunk: int,
    learnable_sink: torch.Tensor | None,
    k_descale: torch.Tensor | None,
    v_descale: torch.Tensor | None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`flash_attn_with_kvcache` over a ``float8_e4m3fn`` cache, through
    :func:`fa_kvcache.unified.unified_attention` (FP8 K / V tiles converted to q's dtype after the load,
    ``k_descale`` folded into the softmax scale, ``v_descale`` into the accumulator).

    q ``(batch, seqlen_q, nheads, d)`` is packed into ``batch * seqlen_q`` rows (``cu_seqlens_q = arange(batch
    + 1) * seqlen_q``); each sequence's keys are ``cache_seqlens[b] + seqlen_new`` rows, causal / window masks
    bottom-right aligned as in the bf16 path. New k / v go through :func:`fa_kvcache.unified.append_paged_kv`
    with ``k_scale = k_descale``, ``v_scale = v_descale`` (rotary on k at ``cache_seqlens + t``), q is rotated
    as in the bf16 path. A paged cache (``block_table``, page size a power of two >= 16) is used as is; a
    contiguous cache ``(batch_cache, seqlen_cache, ...)`` is viewed as pages (:func:`_contiguous_as_paged`;
    ``cache_batch_idx`` selects its rows). Not supported with FP8 (FlashAttnValueError): ``cache_leftpad`` /
    ``leftpad_k`` and ``attention_chunk``. Every argument is checked before anything is written.
    """
    from fa_kvcache import unified as U

    V.grad_guard(q, k, v)
    q, k, v = V.contig_last(q), V.contig_last(k), V.contig_last(v)
    V.check_tensor("q", q, 4)
    V.check_compute_device("q", q)
    V.check_dtype("q", q, (torch.float16, torch.bfloat16, torch.float32))
    if q.dtype == torch.float32 and q.device.type != "cpu":
        raise TypeError("q has dtype torch.float32; supported on GPUs with an FP8 cache: float16, bfloat16")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, t, 4)
        V.check_device(name, t, "q", q)
    if k_cache.dtype != _FP8 or v_cache.dtype != _FP8:
        if k_cache.dtype != _FP8 and v_cache.dtype != _FP8:
            raise FlashAttnValueError(
                "k_descale / v_descale apply to a float8_e4m3fn k_cache / v_cache only, got k_cache "
                f"{k_cache.dtype}"
            )
        raise TypeError(
            f"k_cache and v_cache must both be float8_e4m3fn, got {k_cache.dtype} and {v_cache.dtype}"
        )
    batch, seqlen_q, nheads, d = q.shape
    nheads_k, dv = k_cache.shape[2], v_cache.shape[3]
    U._check_descale("k_descale", k_descale, batch, nheads_k, q)
    U._check_descale("v_descale", v_descale, batch, nheads_k, q)
    if cache_leftpad is not None:
        raise FlashAttnValueError(
            "cache_leftpad / leftpad_k is not supported with a float8_e4m3fn cache: store each sequence from "
            "row 0 (or use a bf16 / fp16 cache)"
        )
    if isinstance(attention_chunk, bool) or not isinstance(attention_chunk, int) or attention_chunk != 0:
        raise FlashAttnValueError(
            f"attention_chunk is not supported with a float8_e4m3fn cache, got attention_chunk = {attention_chunk!r}"
        )
    if d == 0 or d > V.MAX_HEADDIM or dv == 0 or dv > V.MAX_HEADDIM:
        raise FlashAttnValueError(f"q / v_cache head dims must be in [1, {V.MAX_HEADDIM}], got {d} and {dv}")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise FlashAttnValueError(
                "cache_batch_idx cannot be combined with block_table (the table already maps sequences)"
            )
        block_table = U._check_block_table(block_table, batch, q)
        kc, vc = k_cache, v_cache
    else:
        if cache_batch_idx is not None:
            cache_batch_idx = U._check_int_vec("cache_batch_idx", cache_batch_idx, batch, q)
        elif k_cache.shape[0] < batch:
            raise FlashAttnValueError(
                f"k_cache batch {k_cache.shape[0]} is smaller than q batch {batch} (and no cache_batch_idx)"
            )
        if v_cache.shape[:2] != k_cache.shape[:2]:
            raise FlashAttnValueError(
                f"v_cache shape {tuple(v_cache.shape)} does not match k_cache shape {tuple(k_cache.shape)} "
                "except the head dim"
            )
        kc, vc, block_table = _contiguous_as_paged(k_cache, v_cache, batch, cache_batch_idx)
    q3 = q.reshape(batch * seqlen_q, nheads, d)
    U._check_caches(q3, kc, vc)
    page = kc.shape[1]
    capacity = block_table.shape[1] * page
    seqlen_new = check_new_kv(q, k, v, batch, nheads_k, d, dv, cache_seqlens)
    if isinstance(cache_seqlens, torch.Tensor):
        seqlens = U._check_int_vec("cache_seqlens", cache_seqlens, batch, q)
    elif cache_seqlens is None or (isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool)):
        n = capacity if cache_seqlens is None else int(cache_seqlens)
        seqlens = torch.full((batch,), n, dtype=torch.int32, device=q.device)
    else:
        raise TypeError(
            f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}"
        )
    has_rot = rotary_cos is not None or rotary_sin is not None
    if has_rot:
        if rotary_cos is None or rotary_sin is None:
            raise FlashAttnValueError("rotary_cos and rotary_sin must be passed together")
        if k is None:
            raise FlashAttnValueError(
                "rotary_cos/rotary_sin need the new k and v to append (flash-attn semantics)"
            )
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            V.check_tensor(name, t, 2)
            V.check_device(name, t, "q", q)
        if rotary_sin.shape != rotary_cos.shape or rotary_cos.shape[1] == 0 or 2 * rotary_cos.shape[1] > d:
            raise FlashAttnValueError(
                f"rotary_cos / rotary_sin must have the same shape (seqlen_ro, rotary_dim / 2) with rotary_dim "
                f"in [2, {d}], got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
        if rotary_cos.shape[0] < capacity:
            raise FlashAttnValueError(
                f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions but the cache holds {capacity}: "
                "seqlen_ro must be >= the cache capacity (as in flash-attn)"
            )
    V.check_window(window_size)
    V.check_scalars(0.0, softcap, softmax_scale)
    V.check_alibi(alibi_slopes, batch, nheads, q)
    V.check_chunk_and_sink(0, learnable_sink, nheads, q)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise FlashAttnValueError(f"num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    if cache_batch_idx is not None and batch > 0 and kvcache_value_checks_enabled(q):
        idx = cache_batch_idx.cpu()
        if bool(((idx < 0) | (idx >= k_cache.shape[0])).any()):
            raise FlashAttnValueError(f"cache_batch_idx entries must lie in [0, {k_cache.shape[0]})")
    if batch > 0 and kvcache_value_checks_enabled(q):
        ends = seqlens.cpu().long() + seqlen_new
        if bool((seqlens.cpu() < 0).any()) or bool((ends > capacity).any()):
            raise FlashAttnValueError(
                f"cache_seqlens + seqlen_new must lie in [0, capacity = {capacity}], got {ends.tolist()}"
            )

    if k is not None and v is not None and seqlen_new > 0 and batch > 0 and nheads_k > 0:
        U.append_paged_kv(
            k.reshape(batch * seqlen_new, nheads_k, d), v.reshape(batch * seqlen_new, nheads_k, dv), kc, vc,
            block_table, seqlens, _equal_runs(batch, seqlen_new, q.device), seqlen_new, k_scale=k_descale,
            v_scale=v_descale, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
            rotary_interleaved=bool(rotary_interleaved),
        )  # fmt: skip
    if rotary_cos is not None and rotary_sin is not None and seqlen_q > 0 and batch > 0:
        # as the bf16 path: q at cache_seqlens + i when causal or local, else every row at cache_seqlens
        local = any(0 <= int(w) < capacity for w in window_size) and not causal
        ro_offsets = seqlens.clamp(0, capacity)
        if causal or local:
            q = apply_rotary(
                q, rotary_cos, rotary_sin, seqlen_offsets=ro_offsets, interleaved=rotary_interleaved
            )
        else:
            q = apply_rotary(
                q.reshape(batch, 1, seqlen_q * nheads, d), rotary_cos, rotary_sin, seqlen_offsets=ro_offsets,
                interleaved=rotary_interleaved,
            ).reshape(q.shape)  # fmt: skip
        q3 = q.reshape(batch * seqlen_q, nheads, d)
    if batch == 0 or seqlen_q == 0 or nheads == 0:
        out = q.new_empty(batch, seqlen_q, nheads, dv)
        lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
        return (out, lse) if return_softmax_lse else out
    seqused_k = seqlens + seqlen_new if seqlen_new > 0 else seqlens
    res = U.unified_attention(
        q3, kc, vc, _equal_runs(batch, seqlen_q, q.device), seqused_k, seqlen_q, capacity, block_table,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, learnable_sink=learnable_sink, k_descale=k_descale, v_descale=v_descale,
        num_splits=int(num_splits), return_softmax_lse=True,
    )  # fmt: skip
    out3, lse2 = res
    out = out3.view(batch, seqlen_q, nheads, dv)
    if not return_softmax_lse:
        return out
    return out, lse2.view(nheads, batch, seqlen_q).transpose(0, 1).contiguous()


fp8_kvcache = _fp8_kvcache
