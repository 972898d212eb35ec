"""``flash_attn_with_kvcache``: flash-attn 2.8's KV-cache attention (decode / chunked prefill) in Triton.

Host side of an eager call: shape / dtype checks (one pass, :func:`fa_kvcache.checks.validate`); the value
checks (:func:`fa_kvcache.checks.value_checks`: one small kernel and one host read of the few numbers it
reduces; off under CUDA-graph capture and torch.compile, or with ``fa_core.settings.get().value_checks`` off);
the launch plan (:func:`plan_decode`, cached per shapes and flags); the fused append + rotary kernel for new
k/v, q rotated with :func:`fa_core.rotary.apply_rotary`; the split-KV attention kernel and, with several
splits, the combine kernel. The value checks' copy is the only device value read on the host, so a whole
decode step can be captured in a CUDA graph.

A call without new k/v, rotary, cache_batch_idx, left padding, ALiBi or sink (the steady decode step) takes
:func:`fa_kvcache.decode_fast._decode_fast`, planned once per signature.

With or without the checks, the kernels clamp every index they read from a tensor's values, so no input value
makes them read or write outside the tensors passed in.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from fa_core.fast_launch import FastLaunch, empty_arg
from fa_core.forward_configs import cdiv, next_pow2
from fa_core.masking import has_window_left, normalize_window
from fa_core.rotary import apply_rotary
from fa_kvcache.append import append_dims, append_kernel
from fa_kvcache.checks import cache_capacity, kvcache_value_checks_enabled, validate, value_checks
from fa_kvcache.decode_configs import (
    _FORCED_TILES,
    MAX_SPLITS,
    _key_tile,
    _row_tile,
    _sm_count,
    bt_preload,
    num_splits_heuristic,
)
from fa_kvcache.decode_fast import _FAST, _decode_fast, _split_workspace
from fa_kvcache.kernels import combine_kernel, split_kv_kernel
from fa_kvcache.kvcache_fp8 import _fp8_kvcache

# eager decode steps: launches skip Triton's per-call Python once a specialization is compiled
append_launch = FastLaunch(append_kernel)
split_kv_launch = FastLaunch(split_kv_kernel)
combine_launch = FastLaunch(combine_kernel)

__all__ = [
    "DecodePlan",
    "append_to_cache",
    "flash_attn_with_kvcache",
    "kvcache_value_checks_enabled",
    "plan_decode",
]

_FP8 = torch.float8_e4m3fn


def append_to_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor | int,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
) -> None:
    """Write ``k`` (rotated when cos/sin are given) and ``v`` ``(batch, seqlen_new, nheads_k, d)`` into the
    cache in place at rows ``cache_seqlens[b] + t`` (through ``block_table`` when paged). One kernel.

    Low-level: no validation beyond what :func:`flash_attn_with_kvcache` does before calling it.
    """
    batch, seqlen_new, nheads_k, d = k.shape
    dv = v.shape[-1]
    if batch == 0 or seqlen_new == 0 or nheads_k == 0:
        return
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    capacity = cache_capacity(k_cache, block_table)
    seq_tensor = isinstance(cache_seqlens, torch.Tensor)
    dummy = empty_arg(k_cache, torch.int32)
    has_rot = rotary_cos is not None and rotary_sin is not None
    placeholder = empty_arg(k_cache, k_cache.dtype)
    cos = rotary_cos.contiguous() if rotary_cos is not None and has_rot else placeholder
    sin = rotary_sin.contiguous() if rotary_sin is not None and has_rot else placeholder
    rot_dim = 2 * cos.shape[1] if has_rot else 0
    bt = block_table if block_table is not None else dummy
    block_t = 16 if V.interpreting() else 32
    grid = (cdiv(seqlen_new, block_t), batch, nheads_k)
    append_launch(
        grid,
        k,
        v,
        k_cache,
        v_cache,
        bt,
        cache_seqlens if seq_tensor else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        cos,
        sin,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        bt.stride(0) if paged else 0,
        seqlen_new,
        0 if seq_tensor else int(cache_seqlens),
        capacity,
        max(k_cache.shape[0], 1),
        max(k_cache.shape[0], 1),
        cos.shape[0] if has_rot else 0,
        **append_dims(d, dv, has_rot, rot_dim, rotary_interleaved),
        PAGED=paged,
        PAGE=page,
        SEQLENS_TENSOR=seq_tensor,
        HAS_BATCH_IDX=cache_batch_idx is not None,
        BLOCK_T=block_t,
    )


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
    leftpad_k: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over a KV cache, optionally appending new k/v into the cache first (in place).

    Same semantics as flash-attn 2.8's ``flash_attn_with_kvcache``:

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k_cache, v_cache: ``(batch_cache, seqlen_cache, nheads_k, headdim[_v])``, or paged
            ``(num_blocks, page_block_size, nheads_k, headdim[_v])`` with ``block_table``. Any page size
            (flash-attn needs multiples of 256). Last dim contiguous.
        k, v: optional ``(batch, seqlen_new, nheads_k, headdim[_v])``, written into the cache at rows
            ``cache_seqlens[b] + t`` before attending (needs ``cache_seqlens``).
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``, only with k/v: new k is rotated at positions
            ``cache_seqlens + t``; q at ``cache_seqlens + i`` when causal or local, else all rows of q at
            ``cache_seqlens``. ``rotary_dim <= headdim`` (any even size).
        cache_seqlens: int or ``(batch,)`` int32: cache rows already filled (absolute, leftpad included).
            None = the whole cache (``seqlen_cache``, or ``block_table.shape[1] * page_block_size``).
        cache_batch_idx: ``(batch,)`` int32 rows of a non-paged cache used by each sequence.
        cache_leftpad: ``(batch,)`` int32: sequence ``b``'s keys are cache rows ``[cache_leftpad[b],
            cache_seqlens[b] (+ seqlen_new))``; causal / window alignment and ALiBi use that effective length;
            rotary positions stay absolute (cache row = position, as in flash-attn). Not with
            ``block_table`` (flash-attn refuses it too). Also accepted as the keyword ``leftpad_k``
            (flash-attn's low-level name).
        block_table: ``(batch, max_blocks_per_seq)`` int32 block indices of a paged cache.
        softmax_scale: default ``headdim ** -0.5``. causal / window_size: bottom-right aligned over the
            ``cache_seqlens + seqlen_new - leftpad`` visible keys. softcap: 0 = off.
        alibi_slopes: ``(nheads,)`` or ``(batch, nheads)`` float32.
        num_splits: key splits (flash-decoding); 0 = heuristic from batch * kv heads * query tiles vs the
            SM count and the cache length; 1 = no split.
        return_softmax_lse: also return lse ``(batch, nheads, seqlen_q)`` float32 (natural log).
        attention_chunk: keyword only, beyond flash-attn 2 (FlashAttention-3's name): a query at position
            ``p`` (bottom-right aligned) sees only keys in its own chunk ``[p // chunk * chunk, +chunk)``;
            0 = off. Combines with causal / window.
        learnable_sink: keyword only, beyond flash-attn 2: ``(nheads,)`` float logits, one extra term per
            head in every row's softmax denominator and none in the output (gpt-oss). The lse includes it.
        k_descale, v_descale: keyword only, FlashAttention-3's names: ``(batch, nheads_k)`` float32, required
            when k_cache / v_cache are ``float8_e4m3fn`` (real values ``k_cache * k_descale``; q, k, v and out
            stay fp16 / bf16). New k / v are quantised into the cache as ``k / k_descale`` (e4m3, saturated at
            +-448). The call then runs :func:`fa_kvcache.unified.unified_attention` (see
            :func:`_fp8_kvcache` for what that path takes).

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)``, or ``(out, softmax_lse)`` with return_softmax_lse.

    Shapes and dtypes are always checked (TypeError / :class:`fa_core.errors.FlashAttnValueError`, a
    ValueError and a RuntimeError, naming the argument). Checks of tensor *values* (cache too small for
    ``max(cache_seqlens) + seqlen_new``, the used block_table entries outside ``[0, num_blocks)``,
    cache_leftpad / cache_batch_idx out of range) run before anything is written, on CPU and GPU, unless
    ``fa_core.settings.get().value_checks`` is off; never under CUDA-graph capture or torch.compile tracing
    (one device sync). Without them the kernels clamp each such index (cache_seqlens to the cache's capacity,
    block ids to ``[0, num_blocks)``, cache_batch_idx to the cache batch, cache_leftpad to the sequence) and
    do not write rows past the capacity: bad values then give meaningless output, never a memory fault.
    """
    if k_descale is not None or v_descale is not None or getattr(k_cache, "dtype", None) == _FP8:
        return _fp8_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
            cache_leftpad if leftpad_k is None else leftpad_k, block_table, softmax_scale, causal, window_size,
            softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse, attention_chunk,
            learnable_sink, k_descale, v_descale,
        )  # fmt: skip
    if (
        k is None
        and v is None
        and rotary_cos is None
        and rotary_sin is None
        and cache_batch_idx is None
        and cache_leftpad is None
        and leftpad_k is None
        and alibi_slopes is None
        and learnable_sink is None
    ):
        res = _decode_fast(
            q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
            num_splits, attention_chunk,
        )  # fmt: skip
        if res is not None:
            return res if return_softmax_lse else res[0]
    V.grad_guard(q, k, v)
    # flash-attn's maybe_contiguous: a strided last dim of q / k / v is copied (the caches must have stride 1)
    q, k, v = V.contig_last(q), V.contig_last(k), V.contig_last(v)
    leftpad_name = "cache_leftpad"
    if leftpad_k is not None:
        if cache_leftpad is not None:
            raise FlashAttnValueError("pass cache_leftpad or leftpad_k (the same argument), not both")
        cache_leftpad, leftpad_name = leftpad_k, "leftpad_k"
    cache_seqlens, cache_batch_idx, cache_leftpad, seqlen_new = validate(
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
        leftpad_name,
    )
    batch, seqlen_q, nheads, d = q.shape
    V.check_chunk_and_sink(attention_chunk, learnable_sink, nheads, q)
    dv = v_cache.shape[3]
    capacity = cache_capacity(k_cache, block_table)
    if rotary_cos is not None and rotary_cos.shape[0] < capacity:
        # checked before anything is written: a short table must not leave a half-updated cache behind
        raise FlashAttnValueError(
            f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions but the cache holds {capacity}: "
            "seqlen_ro must be >= the cache capacity (as in flash-attn)"
        )
    if softmax_scale is None:
        softmax_scale = d ** (-0.5)
    if block_table is not None:
        block_table = block_table.contiguous() if block_table.stride(-1) != 1 else block_table
    if batch > 0 and kvcache_value_checks_enabled(q):
        value_checks(
            batch,
            capacity if cache_seqlens is None else cache_seqlens,
            cache_leftpad,
            cache_batch_idx,
            block_table,
            seqlen_new,
            capacity,
            k_cache.shape[0],
            k_cache.shape[1],
            k_cache.shape[0],
            leftpad_name,
        )

    if k is not None and v is not None and seqlen_new > 0:
        append_to_cache(
            k_cache,
            v_cache,
            k,
            v,
            cache_seqlens,
            cache_batch_idx,
            block_table,
            rotary_cos,
            rotary_sin,
            rotary_interleaved,
        )

    if rotary_cos is not None and rotary_sin is not None and seqlen_q > 0 and batch > 0:
        q = _rotate_q(
            q, rotary_cos, rotary_sin, cache_seqlens, capacity, causal, window_size, rotary_interleaved
        )
    out = q.new_empty(batch, seqlen_q, nheads, dv)
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    if batch == 0 or seqlen_q == 0 or nheads == 0:
        return (out, lse) if return_softmax_lse else out
    _launch_decode(
        q, k_cache, v_cache, out, lse, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, capacity,
        seqlen_new, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits, attention_chunk,
        learnable_sink,
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out


def _rotate_q(
    q: torch.Tensor,
    rotary_cos: torch.Tensor,
    rotary_sin: torch.Tensor,
    cache_seqlens: Any,
    capacity: int,
    causal: bool,
    window_size: tuple[int, int],
    rotary_interleaved: bool,
) -> torch.Tensor:
    """q ``(batch, seqlen_q, nheads, d)`` rotated at its positions ``cache_seqlens + t`` (causal or local), or
    every query at ``cache_seqlens`` (otherwise), as flash-attn's kvcache kernel does."""
    batch, seqlen_q, nheads, d = q.shape
    # flash-attn drops a window side that spans the whole cache before deciding "local"
    local = any(0 <= int(w) < capacity for w in window_size) and not causal
    # q's rotary rows start at cache_seqlens, clamped on the device like the kernels' (no sync): a value
    # outside [0, capacity] (value checks off) cannot address cos/sin outside the table
    ro_offsets = (
        cache_seqlens.clamp(0, capacity) if isinstance(cache_seqlens, torch.Tensor) else cache_seqlens
    )
    if causal or local:
        return apply_rotary(
            q, rotary_cos, rotary_sin, seqlen_offsets=ro_offsets, interleaved=rotary_interleaved
        )
    return apply_rotary(
        q.reshape(batch, 1, seqlen_q * nheads, d),
        rotary_cos,
        rotary_sin,
        seqlen_offsets=ro_offsets,
        interleaved=rotary_interleaved,
    ).reshape(q.shape)


def _launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cache_seqlens: int | torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    capacity: int,
    seqlen_new: int,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    num_splits: int,
    attention_chunk: int,
    learnable_sink: torch.Tensor | None,
) -> None:
    """Plan (:func:`plan_decode`) and launch the split-KV kernel and, with several splits, the combine kernel
    on checked inputs, writing ``out`` ``(batch, seqlen_q, nheads, dv)`` and ``lse`` ``(batch, nheads,
    seqlen_q)``."""
    batch, seqlen_q, nheads, d = q.shape
    nheads_k, dv = k_cache.shape[2], v_cache.shape[3]
    group = nheads // nheads_k
    paged = block_table is not None
    left, right, is_local = normalize_window(causal, window_size)
    page = k_cache.shape[1] if paged else 0
    seq_tensor = isinstance(cache_seqlens, torch.Tensor)
    plan = plan_decode(
        batch,
        seqlen_q,
        nheads,
        nheads_k,
        d,
        dv,
        capacity,
        page,
        int(num_splits or 0),
        _sm_count(q.device),
        seq_tensor,
        cache_batch_idx is not None,
        cache_leftpad is not None,
        is_local,
        has_window_left(is_local, left),
        attention_chunk > 0,
        softcap > 0,
        alibi_slopes is not None,
        learnable_sink is not None,
        V.interpreting(),
        _FORCED_TILES[-1] if _FORCED_TILES else None,
    )
    splits = plan.splits
    cache_len_int = capacity if cache_seqlens is None else (0 if seq_tensor else int(cache_seqlens))
    dummy = empty_arg(q, torch.int32)
    bt = block_table if block_table is not None else dummy
    if splits > 1:
        out_part, lse_part = _split_workspace(splits * batch * seqlen_q * nheads, dv, q)
    else:
        out_part = lse_part = empty_arg(q, torch.float32)
    alibi = alibi_slopes if alibi_slopes is not None else empty_arg(q, torch.float32)
    stride_alb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    split_kv_launch(
        plan.grid,
        q,
        k_cache,
        v_cache,
        out,
        lse,
        out_part,
        lse_part,
        bt,
        cache_seqlens if seq_tensor else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        cache_leftpad if cache_leftpad is not None else dummy,
        alibi,
        learnable_sink if learnable_sink is not None else alibi,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        bt.stride(0) if paged else 0,
        stride_alb,
        batch,
        seqlen_q,
        seqlen_new,
        cache_len_int,
        capacity,
        max(k_cache.shape[0], 1),
        max(k_cache.shape[0], 1),
        nheads,
        nheads_k,
        group,
        plan.n_head_chunks,
        splits,
        float(softmax_scale),
        float(softcap),
        left,
        right,
        int(attention_chunk),
        **plan.split_meta,
    )
    if splits > 1:
        combine_launch(
            plan.combine_grid,
            out_part,
            lse_part,
            out,
            lse,
            learnable_sink if learnable_sink is not None else lse_part,
            plan.combine_grid[0],
            seqlen_q,
            nheads,
            splits,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            **plan.combine_meta,
        )


class DecodePlan(NamedTuple):
    """How :func:`flash_attn_with_kvcache` launches one decode call (see :func:`plan_decode`)."""

    #: key splits (1: no combine launch)
    splits: int
    #: GQA head chunks per kv head (``cdiv(group, HB)``)
    n_head_chunks: int
    #: split-KV grid ``(query tiles * head chunks, batch * nheads_k, splits)``
    grid: tuple[int, int, int]
    #: the split-KV kernel's constexprs and compile options
    split_meta: dict[str, Any]
    #: combine grid ``(batch * seqlen_q * nheads,)`` (with splits)
    combine_grid: tuple[int]
    #: the combine kernel's constexprs and compile options
    combine_meta: dict[str, Any]


@functools.lru_cache(maxsize=1024)
def plan_decode(
    batch: int,
    seqlen_q: int,
    nheads: int,
    nheads_k: int,
    d: int,
    dv: int,
    capacity: int,
    page: int,
    num_splits: int,
    num_sms: int,
    seqlens_tensor: bool,
    has_batch_idx: bool,
    has_leftpad: bool,
    is_local: bool,
    has_window_left: bool,
    has_chunk: bool,
    has_softcap: bool,
    has_alibi: bool,
    has_sink: bool,
    interpret: bool,
    forced_tile: tuple[int, int, int] | None = None,
) -> DecodePlan:
    """The launch plan of one decode call: query-row tile and GQA packing (:func:`_row_tile`), split count
    (``num_splits`` > 0: that many, at most :data:`MAX_SPLITS`; else :func:`num_splits_heuristic`), key tile
    (:func:`_key_tile`, or ``forced_tile``), block-table preload (:func:`bt_preload`), grids and every
    constexpr of the split-KV and combine kernels.

    Cached on its arguments (shapes, the cache's ``page`` size, 0 = contiguous, ``capacity`` = rows a sequence
    can hold, the SM count and the kernel flags): a steady decode loop plans once. Strides and dtypes are not
    inputs: the launches pass them as runtime arguments.
    """
    group = nheads // nheads_k
    paged = page > 0
    block_m, hb = _row_tile(seqlen_q, group, d, dv, interpret)
    n_head_chunks = cdiv(group, hb)
    n_qblocks = cdiv(seqlen_q, block_m // hb)
    work = n_qblocks * n_head_chunks * batch * nheads_k
    if num_splits <= 0:
        splits = num_splits_heuristic(work, cdiv(capacity, 64), num_sms, paged=paged, page=page)
    else:
        splits = min(num_splits, MAX_SPLITS)
    if forced_tile is not None:
        block_n, warps, stages = forced_tile
    else:
        block_n, warps, stages = _key_tile(
            seqlen_q, group, block_m, max(d, dv), interpret, capacity // splits, page
        )
    aligned = 0 < page <= block_n and block_n % page == 0 and not has_leftpad
    split_meta: dict[str, Any] = {
        "HEADDIM": d,
        "HEADDIM_V": dv,
        "BLOCK_D": max(next_pow2(d), 16),
        "BLOCK_DV": max(next_pow2(dv), 16),
        "PAGED": paged,
        "PAGE": page if paged else 1,
        "PAGE_TILE": paged and page % block_n == 0 and not has_leftpad,
        "BT_PRELOAD": bt_preload(page, capacity, splits, block_n, aligned),
        "SEQLENS_TENSOR": seqlens_tensor,
        "HAS_BATCH_IDX": has_batch_idx,
        "HAS_LEFTPAD": has_leftpad,
        "IS_LOCAL": is_local,
        "HAS_WINDOW_LEFT": has_window_left,
        "HAS_CHUNK": has_chunk,
        "HAS_SOFTCAP": has_softcap,
        "HAS_ALIBI": has_alibi,
        "HAS_SINK": has_sink,
        "SPLIT": splits > 1,
        "HB": hb,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_warps": warps,
        "num_stages": stages,
    }
    combine_meta: dict[str, Any] = {
        "HEADDIM_V": dv,
        "BLOCK_DV": max(next_pow2(dv), 16),
        "BLOCK_S": min(next_pow2(splits), 16),
        "HAS_SINK": has_sink,
        "num_warps": 4 if dv > 64 else 2,
    }
    grid = (n_qblocks * n_head_chunks, batch * nheads_k, splits)
    return DecodePlan(splits, n_head_chunks, grid, split_meta, (batch * seqlen_q * nheads,), combine_meta)


_clear_plan_cache = plan_decode.cache_clear


def _clear_plans() -> None:
    """``plan_decode.cache_clear()``: drops the cached plans and the signature cache of :func:`_decode_fast`
    (whose entries hold plans), so that the next calls plan again (e.g. after a planning constant changed)."""
    _clear_plan_cache()
    _FAST.clear()


plan_decode.cache_clear = _clear_plans  # type: ignore[method-assign]
