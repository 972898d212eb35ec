"""The KV-cache half of :mod:`flash_attn_interface`: ``flash_attn_with_kvcache``, ``flash_attn_combine``,
``get_scheduler_metadata`` (re-exported there; conventions in that module's docstring)."""

from __future__ import annotations

from typing import Any

import torch

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from flash_attn_interface._common import (
    Tensor,
    _attention,
    _even_cu_seqlens,
    _is_fp8,
    _refuse,
    _refuse_qv,
)


def flash_attn_combine(
    out_partial: Tensor,
    lse_partial: Tensor,
    out: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge attention results computed over disjoint key splits, weighting each by its log-sum-exp.

    ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i(lse_i)``, computed in float32 with the
    row maximum subtracted (no overflow). A split whose ``lse_i`` is ``-inf`` (it saw no key) contributes
    nothing; ``+inf``, which the unsplit forward writes for such rows, counts as ``-inf`` too. A row where every
    split is empty gives ``out = 0`` and ``lse = -inf``. Differentiable (plain PyTorch).

    Args:
        out_partial: ``(num_splits, batch, seqlen, nheads, headdim)`` float32.
        lse_partial: ``(num_splits, batch, seqlen, nheads)`` float32.
        out: optional ``(batch, seqlen, nheads, headdim)`` buffer of dtype ``out_dtype``, written and returned.
        out_dtype: float32, float16 or bfloat16; default ``out_partial.dtype``.

    Returns:
        ``(out (batch, seqlen, nheads, headdim), lse (batch, seqlen, nheads))``; ``lse`` is float32, a transposed
        view of a ``(batch, nheads, seqlen)`` tensor as in FlashAttention-3.
    """
    V.check_tensor("out_partial", out_partial, 5)
    V.check_tensor("lse_partial", lse_partial, 4)
    for name, t in (("out_partial", out_partial), ("lse_partial", lse_partial)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(lse_partial.shape) != tuple(out_partial.shape[:4]):
        raise FlashAttnValueError(
            f"lse_partial must have shape (num_splits, batch, seqlen, nheads) = {tuple(out_partial.shape[:4])}, "
            f"got {tuple(lse_partial.shape)}"
        )
    if lse_partial.device != out_partial.device:
        raise FlashAttnValueError("out_partial and lse_partial must be on the same device")
    dtype = out_partial.dtype if out_dtype is None else out_dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {dtype}")
    if out is not None:
        if out.dtype != dtype:
            raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")
        if tuple(out.shape) != tuple(out_partial.shape[1:]) or out.device != out_partial.device:
            raise FlashAttnValueError(
                f"out must have shape (batch, seqlen, nheads, headdim) = {tuple(out_partial.shape[1:])} on "
                f"{out_partial.device}, got {tuple(out.shape)} on {out.device}"
            )
    lse_p = lse_partial.masked_fill(lse_partial == float("inf"), float("-inf"))
    if lse_p.shape[0] == 0:
        lse = lse_p.new_full(lse_p.shape[1:], float("-inf"))
        merged = out_partial.new_zeros(out_partial.shape[1:])
    else:
        peak = lse_p.amax(dim=0)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        weights = torch.exp(lse_p - peak)  # in [0, 1]: the largest split has weight 1
        total = weights.sum(dim=0)
        lse = torch.log(total) + peak  # log(0) = -inf for rows with no key
        weights = weights / total.clamp_min(torch.finfo(torch.float32).tiny)
        merged = (weights.unsqueeze(-1) * out_partial).sum(dim=0)
    lse = lse.transpose(1, 2).contiguous().transpose(1, 2)
    if out is None:
        return merged.to(dtype), lse
    with torch.no_grad():
        out.copy_(merged)
    return out, lse


def _dequantize(t: Tensor, descale: Tensor | None, name: str) -> Tensor:
    """bf16 values of an FP8 ``(batch, seqlen, nheads, d)`` tensor whose scale is per ``(batch, nheads_k)``."""
    if descale is None:
        return t.to(torch.bfloat16)
    V.check_tensor(name, descale, 2)
    batch, nheads = t.shape[0], t.shape[2]
    if descale.shape[0] != batch or nheads % descale.shape[1] != 0:
        raise FlashAttnValueError(f"{name} must have shape (batch, nheads_k), got {tuple(descale.shape)}")
    scale = descale.float().repeat_interleave(nheads // descale.shape[1], dim=1)
    return (t.float() * scale[:, None, :, None]).to(torch.bfloat16)


def _capacity(k_cache: Tensor, page_table: Tensor | None) -> int:
    """Rows one sequence can hold: the cache's length, or the page table's width times the page size."""
    return page_table.shape[1] * k_cache.shape[1] if page_table is not None else k_cache.shape[1]


def _cache_lengths(
    cache_seqlens: int | Tensor | None, batch: int, capacity: int, device: torch.device
) -> Tensor:
    """``cache_seqlens`` as int32 ``(batch,)`` (None: the whole cache)."""
    if cache_seqlens is None:
        seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, torch.Tensor):
        seqlens = cache_seqlens.to(torch.int32)
    else:
        seqlens = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=device)
    if tuple(seqlens.shape) != (batch,):
        raise FlashAttnValueError(
            f"cache_seqlens must have shape (batch,) = ({batch},), got {tuple(seqlens.shape)}"
        )
    return seqlens


def _rows_of(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """``(sequence, position in it)`` of each of the ``total`` packed rows of ``cu_seqlens``."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)
    return seq, rows - cu_seqlens.to(torch.int64)[seq]


def _append_varlen(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens: Tensor,
    cache_batch_idx: Tensor | None,
    page_table: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k_new: Tensor | None,
    rotary: tuple[Tensor | None, Tensor | None, Tensor | None, bool, bool],
) -> tuple[Tensor, Tensor]:
    """Packed new keys / values ``(total_new, nheads_k, headdim[_v])`` of sequence b (rows
    ``cu_seqlens_k_new[b]:cu_seqlens_k_new[b + 1]``) written into the cache at rows ``seqlens[b] + t`` (through
    ``page_table`` or ``cache_batch_idx``), after rotating them and the packed q when ``rotary = (cos, sin,
    rotary_seqlens, per_row, interleaved)`` has tables (positions from ``rotary_seqlens``, default ``seqlens``;
    q rows at ``start + i`` when ``per_row``, else at ``start``). Returns ``(q, the cache lengths after)``."""
    from flash_attn.layers.rotary import apply_rotary_emb

    batch = seqlens.shape[0]
    if cu_seqlens_k_new is None:
        raise FlashAttnValueError("cu_seqlens_k_new must be given with packed k / v (cu_seqlens_q)")
    cu_new = V.check_tensor("cu_seqlens_k_new", cu_seqlens_k_new, 1)
    if tuple(cu_new.shape) != (batch + 1,) or cu_new.dtype != torch.int32:
        raise FlashAttnValueError(
            f"cu_seqlens_k_new must be an int32 tensor of shape (batch + 1,) = ({batch + 1},), got "
            f"{cu_new.dtype} {tuple(cu_new.shape)}"
        )
    V.check_tensor("k", k, 3)
    V.check_tensor("v", v, 3)
    if k.shape[0] != v.shape[0] or k.shape[1:] != k_cache.shape[2:] or v.shape[1:] != v_cache.shape[2:]:
        raise FlashAttnValueError(
            f"k / v must be (total_new, nheads_k, headdim[_v]) matching the caches, got {tuple(k.shape)} / "
            f"{tuple(v.shape)}"
        )
    new_len = cu_new[1:] - cu_new[:-1]
    after = seqlens + new_len
    if (
        bool((new_len < 0).any() | (after > _capacity(k_cache, page_table)).any())
        or int(cu_new[-1]) != k.shape[0]
    ):
        raise FlashAttnValueError(
            "cu_seqlens_k_new must be non-decreasing, end at k's row count, and fit every sequence's new keys in "
            "its cache (cache_seqlens + new rows <= the cache's capacity)"
        )
    seq, t = _rows_of(cu_new, k.shape[0])
    pos = seqlens.to(torch.int64)[seq] + t
    cos, sin, rotary_seqlens, per_row, interleaved = rotary
    if cos is not None:
        if sin is None:
            raise FlashAttnValueError("rotary_sin must be given with rotary_cos")
        starts = (seqlens if rotary_seqlens is None else rotary_seqlens).to(torch.int64)
        k = apply_rotary_emb(
            k[:, None], cos, sin, interleaved, seqlen_offsets=(starts[seq] + t).to(torch.int32)
        )[:, 0]
        seq_q, i = _rows_of(cu_seqlens_q, q.shape[0])
        q_pos = starts[seq_q] + (i if per_row else 0)
        q = apply_rotary_emb(q[:, None], cos, sin, interleaved, seqlen_offsets=q_pos.to(torch.int32))[:, 0]
    if page_table is not None:
        page = k_cache.shape[1]
        blocks = page_table.to(torch.int64)[seq, pos // page]
        k_cache[blocks, pos % page] = k.to(k_cache.dtype)
        v_cache[blocks, pos % page] = v.to(v_cache.dtype)
    else:
        rows = seq if cache_batch_idx is None else cache_batch_idx.to(torch.int64)[seq]
        k_cache[rows, pos] = k.to(k_cache.dtype)
        v_cache[rows, pos] = v.to(v_cache.dtype)
    return q, after


def _leftpad(cache_leftpad: Tensor, seqlens: Tensor) -> Tensor:
    """``cache_leftpad`` checked against the cache lengths: int32 ``(batch,)`` in ``[0, cache_seqlens[b]]``."""
    lp = V.check_tensor("cache_leftpad", cache_leftpad, 1)
    if tuple(lp.shape) != tuple(seqlens.shape) or lp.dtype != torch.int32:
        raise FlashAttnValueError(
            f"cache_leftpad must be an int32 tensor of shape (batch,) = ({seqlens.shape[0]},), got {lp.dtype} "
            f"{tuple(lp.shape)}"
        )
    if bool(((lp < 0) | (lp > seqlens)).any()):
        raise FlashAttnValueError("cache_leftpad[b] must lie in [0, cache_seqlens[b]]")
    return lp


def _varlen_over_cache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: int | Tensor | None,
    cache_batch_idx: Tensor | None,
    page_table: Tensor | None,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int | None,
    opts: dict[str, Any],
    cache_leftpad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``flash_attn_with_kvcache`` with a packed q (``cu_seqlens_q``, checked by the caller), its new keys already
    in the cache: varlen attention over the cache (paged through ``page_table`` or contiguous), forward only.
    ``cache_leftpad`` (contiguous caches): sequence b's keys are its cache rows ``[cache_leftpad[b],
    cache_seqlens[b])``."""
    from flash_attn import flash_attn_varlen_func as varlen_fa2

    batch = cu_seqlens_q.shape[0] - 1
    seqlens = _cache_lengths(cache_seqlens, batch, _capacity(k_cache, page_table), q.device)
    max_q = (
        int(max_seqlen_q) if max_seqlen_q is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    )
    with torch.no_grad():
        if page_table is not None:
            cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
            cu_k[1:] = seqlens.cumsum(0)
            out, lse, _ = varlen_fa2(
                q, k_cache, v_cache, cu_seqlens_q, cu_k, max_q, int(seqlens.max()) if batch else 0,
                softmax_scale=opts["softmax_scale"], causal=opts["causal"], window_size=opts["window_size"],
                softcap=opts["softcap"], return_attn_probs=True, block_table=page_table,
                attention_chunk=opts["attention_chunk"],
            )  # fmt: skip
            return out, lse
        if cache_batch_idx is not None:
            k_cache, v_cache = (
                k_cache.index_select(0, cache_batch_idx),
                v_cache.index_select(0, cache_batch_idx),
            )
        else:
            k_cache, v_cache = k_cache[:batch], v_cache[:batch]
        s = k_cache.shape[1]
        k = k_cache.reshape(batch * s, *k_cache.shape[2:])
        v = v_cache.reshape(batch * s, *v_cache.shape[2:])
        cu_k = _even_cu_seqlens(batch, s, q.device)
        if cache_leftpad is not None:
            # sequence b's keys start cache_leftpad[b] rows into its slice of the packed cache
            # (cu_seqlens_k starts at 0: the packed keys start at the first sequence's first key)
            lp = _leftpad(cache_leftpad, seqlens)
            first = int(lp[0]) if batch else 0
            cu_k = torch.cat([cu_k[:-1] + lp, cu_k[-1:]]) - first
            k, v = k[first:], v[first:]
            seqlens = seqlens - lp
            s = int((cu_k[1:] - cu_k[:-1]).max()) if batch else s
        return _attention(
            q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
            max_seqlen_k=s, seqused_k=seqlens, **opts,
        )  # fmt: skip


def _rotate_at(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor | None, seqlens: Tensor, per_row: bool, interleaved: bool
) -> tuple[Tensor, Tensor]:
    """q and the new k rotated from the positions ``seqlens`` (int32 ``(batch,)``) on: k row t at ``seqlens[b] +
    t``; q row i at ``seqlens[b] + i`` when ``per_row`` (causal / local), else every q row at ``seqlens[b]``
    (FlashAttention-3's ``rotary_seqlens``)."""
    from flash_attn.layers.rotary import apply_rotary_emb

    batch = q.shape[0]
    if not isinstance(seqlens, Tensor) or tuple(seqlens.shape) != (batch,) or seqlens.dtype != torch.int32:
        raise FlashAttnValueError(
            f"rotary_seqlens must be an int32 tensor of shape (batch,) = ({batch},), got "
            f"{getattr(seqlens, 'dtype', type(seqlens).__name__)} {tuple(getattr(seqlens, 'shape', ()))}"
        )
    if sin is None:
        raise FlashAttnValueError("rotary_sin must be given with rotary_cos")
    if per_row:
        q = apply_rotary_emb(q, cos, sin, interleaved=interleaved, seqlen_offsets=seqlens)
    else:
        rows = q.reshape(batch, 1, -1, q.shape[-1])
        q = apply_rotary_emb(rows, cos, sin, interleaved=interleaved, seqlen_offsets=seqlens).reshape(q.shape)
    k = apply_rotary_emb(k, cos, sin, interleaved=interleaved, seqlen_offsets=seqlens)
    return q, k


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    qv: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    max_seqlen_q: int | None = None,
    rotary_seqlens: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: Tensor | None = None,
    num_splits: int = 0,
    pack_gqa: bool | None = None,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention over a KV cache, appending new ``k`` / ``v`` into it in place first (incremental decoding).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, or ``(total_q, nheads, headdim)`` with ``cu_seqlens_q``.
        k_cache, v_cache: ``(batch_cache, seqlen_cache, nheads_k, headdim[_v])``, or paged ``(num_blocks,
            page_block_size, nheads_k, headdim[_v])`` with ``page_table`` (any page size).
        k, v: optional ``(batch, seqlen_new, nheads_k, headdim[_v])``, written into the cache at rows
            ``cache_seqlens[b] + t`` before attending.
        qv: must be None (no kernel for the MLA query-value term here).
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``, only with k / v: new k rotated at positions
            ``cache_seqlens + t``, q at ``cache_seqlens + i`` when causal or local, else at ``cache_seqlens``.
        cache_seqlens: int or int32 ``(batch,)``: filled cache rows; None = the whole cache.
        cache_batch_idx: int32 ``(batch,)`` cache rows of a non-paged cache. cache_leftpad: int32 ``(batch,)``
            first used cache row of each sequence.
        page_table: int32 ``(batch, max_blocks_per_seq)`` block indices of a paged cache.
        cu_seqlens_q, max_seqlen_q: packed q (int32 ``(batch + 1,)``; forward only), without FP8 (nor cache_leftpad
            with page_table):
            the cache is read as varlen keys; new k / v are then packed ``(total_new, nheads_k, headdim[_v])``
            with ``cu_seqlens_k_new`` (int32 ``(batch + 1,)``), written after each sequence's cached rows.
        cu_seqlens_k_new: with cu_seqlens_q only (see there).
        rotary_seqlens: optional int32 ``(batch,)``: the rotary positions start there instead of at
            ``cache_seqlens`` (new k at ``rotary_seqlens + t``, q as above); used with rotary_cos / k only.
        q_descale, k_descale, v_descale: ``(batch, nheads_k)`` float32 with ``float8_e4m3fn`` q / caches.
        softmax_scale: default ``headdim ** -0.5``. causal, window_size, attention_chunk, softcap: as in
            :func:`flash_attn_func`, aligned over the ``cache_seqlens (+ seqlen_new) - leftpad`` visible keys.
        rotary_interleaved: GPT-J (True) or GPT-NeoX (False) rotary pairing.
        scheduler_metadata, pack_gqa, sm_margin: ignored (launch tuning). num_splits: key splits of the decode
            (0 = heuristic, 1 = none); results do not depend on it beyond rounding.
        return_softmax_lse: also return ``softmax_lse`` and the (empty) split accumulators.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)`` (``(total_q, nheads, headdim_v)`` with cu_seqlens_q), or
        ``(out, softmax_lse, out_accum, softmax_lse_accum)``: ``softmax_lse`` float32 ``(batch, nheads,
        seqlen_q)`` (``(nheads, total_q)`` with cu_seqlens_q), the accumulators empty float32 tensors. The
        result does not require grad.
    """
    _refuse_qv(qv)
    if cu_seqlens_q is None:
        _refuse("cu_seqlens_k_new", cu_seqlens_k_new, "packed new keys come with a packed q (cu_seqlens_q)")
    opts: dict[str, Any] = dict(
        softmax_scale=softmax_scale, causal=causal, window_size=V.window_pair(window_size), softcap=softcap,
        attention_chunk=attention_chunk,
    )  # fmt: skip
    # q rows rotate at their own positions under a causal / local mask, else all at the sequence's start
    per_row = causal or tuple(opts["window_size"]) != (-1, -1)
    if cu_seqlens_q is not None:
        if page_table is not None:
            _refuse(
                "cache_leftpad", cache_leftpad, "it does not combine with cu_seqlens_q and page_table here"
            )
        if (k is None) != (v is None):
            raise FlashAttnValueError("k and v must be given together")
        if k is None:
            for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
                _refuse(name, value, "rotary tables apply to new keys (k / v) only")
        if _is_fp8(q) or _is_fp8(k_cache) or (k is not None and _is_fp8(k)):
            raise FlashAttnValueError("float8_e4m3fn inputs are not supported together with cu_seqlens_q")
        V.check_tensor("cu_seqlens_q", cu_seqlens_q, 1)
        batch = cu_seqlens_q.shape[0] - 1
        if k is not None:
            assert v is not None
            seqlens = _cache_lengths(cache_seqlens, batch, _capacity(k_cache, page_table), q.device)
            q, cache_seqlens = _append_varlen(
                q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, page_table, cu_seqlens_q, cu_seqlens_k_new,
                (rotary_cos, rotary_sin, rotary_seqlens, per_row, rotary_interleaved),
            )  # fmt: skip
        out, lse = _varlen_over_cache(
            q, k_cache, v_cache, cache_seqlens, cache_batch_idx, page_table, cu_seqlens_q, max_seqlen_q, opts,
            cache_leftpad,
        )  # fmt: skip
    else:
        from flash_attn import flash_attn_with_kvcache as kvcache_fa2

        fp8_cache = _is_fp8(k_cache) or _is_fp8(v_cache)
        if _is_fp8(q):
            q = _dequantize(q, q_descale, "q_descale")
        if fp8_cache:
            if isinstance(k, torch.Tensor) and _is_fp8(k):
                k = _dequantize(k, k_descale, "k_descale")
            if isinstance(v, torch.Tensor) and _is_fp8(v):
                v = _dequantize(v, v_descale, "v_descale")
            batch, nheads_k = q.shape[0], k_cache.shape[2]
            ones = torch.ones(batch, nheads_k, dtype=torch.float32, device=q.device)
            k_descale = ones if k_descale is None else k_descale
            v_descale = ones if v_descale is None else v_descale
        else:
            k_descale = v_descale = None  # ignored with 16-bit caches, as in FlashAttention-3
        if rotary_seqlens is not None and rotary_cos is not None and k is not None:
            q, k = _rotate_at(q, k, rotary_cos, rotary_sin, rotary_seqlens, per_row, rotary_interleaved)
            rotary_cos = rotary_sin = None
        out, lse = kvcache_fa2(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            page_table, opts["softmax_scale"], causal, opts["window_size"], softcap, rotary_interleaved, None,
            num_splits, True, attention_chunk=attention_chunk, k_descale=k_descale, v_descale=v_descale,
        )  # fmt: skip
    if not return_softmax_lse:
        return out
    empty = torch.empty(0, dtype=torch.float32, device=out.device)
    return out, lse, empty, empty.clone()


def get_scheduler_metadata(
    batch_size: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_heads_q: int,
    num_heads_kv: int,
    headdim: int,
    cache_seqlens: Tensor,
    qkv_dtype: torch.dtype = torch.bfloat16,
    headdim_v: int | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    page_size: int | None = None,
    max_seqlen_k_new: int = 0,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    has_softcap: bool = False,
    num_splits: int = 0,
    pack_gqa: bool | None = None,
    sm_margin: int = 0,
) -> Tensor:
    """A placeholder for FlashAttention-3's precomputed tile schedule.

    FlashAttention-3 returns an int32 tensor to pass back as ``flash_attn_with_kvcache(scheduler_metadata=)``
    (e.g. once per decode step, outside a CUDA graph). The Triton kernels plan their launches themselves, so
    this returns a one-element int32 zero tensor on ``cache_seqlens``'s device, and ``scheduler_metadata`` is
    ignored where it is passed. Arguments are accepted for signature compatibility and not checked.

    Returns:
        int32 ``(1,)`` zeros.
    """
    device = cache_seqlens.device if isinstance(cache_seqlens, torch.Tensor) else None
    return torch.zeros(1, dtype=torch.int32, device=device)


# ------------------------------------------------------------------ FlashAttention-3's autograd Function names
