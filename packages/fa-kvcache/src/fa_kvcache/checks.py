"""Input checks of flash_attn_with_kvcache: shapes / dtypes always, tensor values unless switched off.

Shape and dtype checks raise ``TypeError`` / :class:`fa_core.errors.FlashAttnValueError` naming the argument.
Value checks (the contents of ``cache_seqlens``, ``block_table``, ``cache_batch_idx``, ``cache_leftpad``) cost
one small kernel (:func:`value_check_kernel`) and one device-to-host copy of the few numbers it reduces (none
of either for an int ``cache_seqlens`` without index tensors; a tensor ``cache_seqlens`` alone is copied to the
host itself, no kernel); they run on CPU and GPU alike unless
``fa_core.settings.get().value_checks`` is off (``FA_PLUS_SKIP_VALUE_CHECKS=1``), and never under CUDA-graph
capture or torch.compile tracing (:func:`fa_core.validation.value_checks_enabled`). Without them the kernels
still stay inside every tensor: each index read from a tensor's values is clamped in the kernel (see
:mod:`fa_kvcache.kernels`), so bad values give meaningless output, never a memory fault.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa_core import settings
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from fa_core.fast_launch import FastLaunch, empty_arg

__all__ = [
    "cache_capacity",
    "check_new_kv",
    "kvcache_value_checks_enabled",
    "validate",
    "value_check_kernel",
    "value_checks",
]


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


#: programs of the value-check kernel at most (each reduces a strided share of the batch rows)
MAX_CHECK_PROGRAMS = 16
#: largest batch whose ``cache_seqlens`` alone (no other index tensor) is checked by copying the tensor to the
#: host (one small copy, no kernel); larger batches go through :func:`value_check_kernel`'s reduction
HOST_READ_MAX = 1024
#: int32 slots each program writes: max total, min length, leftpad / batch-index / block-table violations,
#: the first bad block-table entry's row and column (-1: none), one spare
CHECK_SLOTS = 8


@triton.jit
def value_check_kernel(
    Out,
    CacheSeqlens,
    LeftPad,
    BatchIdx,
    BlockTable,
    batch,
    n_cols,
    stride_btb,
    cache_seqlen_int,
    seqlen_new,
    num_blocks,
    batch_cache,
    page,
    SEQLENS_TENSOR: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    HAS_BT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid ``(P,)``: program ``p`` reduces batch rows ``[p * BLOCK_B + k * P * BLOCK_B, +BLOCK_B)`` and
    writes :data:`CHECK_SLOTS` int32 at ``Out + p * CHECK_SLOTS``: ``max(cache_seqlens + seqlen_new)``
    (clamped to the int32 range), ``min(cache_seqlens)``, the number of ``cache_leftpad`` entries outside
    ``[0, cache_seqlens]``, of ``cache_batch_idx`` entries outside ``[0, batch_cache)``, of used
    ``block_table`` entries (columns ``[leftpad // page, cdiv(cache_seqlens + seqlen_new, page))``) outside
    ``[0, num_blocks)``, and the row-major first such entry's row and column (-1 when none). Only the used
    columns are read."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_B
    offs_b0 = tl.arange(0, BLOCK_B)
    offs_c0 = tl.arange(0, BLOCK_C)
    lo_sent = tl.full([BLOCK_B], -(2**40), tl.int64)
    hi_sent = tl.full([BLOCK_B], 2**40, tl.int64)
    mx = lo_sent
    mn = hi_sent
    n_pad = tl.zeros([BLOCK_B], tl.int32)
    n_idx = tl.zeros([BLOCK_B], tl.int32)
    n_bt = tl.zeros([BLOCK_B], tl.int32)
    first = tl.full([BLOCK_B], 2**62, tl.int64)
    for b0 in tl.range(pid * BLOCK_B, batch, step):
        offs_b = b0 + offs_b0
        ok = offs_b < batch
        if SEQLENS_TENSOR:
            lens = tl.load(CacheSeqlens + offs_b, mask=ok, other=0).to(tl.int64)
        else:
            lens = tl.zeros([BLOCK_B], tl.int64) + cache_seqlen_int
        total = lens + seqlen_new
        mx = tl.maximum(mx, tl.where(ok, total, lo_sent))
        mn = tl.minimum(mn, tl.where(ok, lens, hi_sent))
        start = tl.zeros([BLOCK_B], tl.int64)
        if HAS_LEFTPAD:
            start = tl.load(LeftPad + offs_b, mask=ok, other=0).to(tl.int64)
            n_pad += (ok & ((start < 0) | (start > lens))).to(tl.int32)
        if HAS_BATCH_IDX:
            idx = tl.load(BatchIdx + offs_b, mask=ok, other=0)
            n_idx += (ok & ((idx < 0) | (idx >= batch_cache))).to(tl.int32)
        if HAS_BT:
            c_lo = tl.maximum(start, 0) // page
            c_hi = tl.where(ok & (total > 0), (total + page - 1) // page, 0)
            c_end = tl.minimum(tl.max(c_hi, 0), n_cols)
            row_off = offs_b.to(tl.int64) * stride_btb
            row_lin = offs_b.to(tl.int64) * n_cols
            for c0 in tl.range(0, c_end, BLOCK_C):
                cols = c0 + offs_c0
                used = (cols[None, :] >= c_lo[:, None]) & (cols[None, :] < c_hi[:, None])
                used = used & (cols[None, :] < n_cols)
                blk = tl.load(BlockTable + row_off[:, None] + cols[None, :], mask=used, other=0)
                bad = used & ((blk < 0) | (blk >= num_blocks))
                n_bt += tl.sum(bad.to(tl.int32), 1)
                lin = tl.where(bad, row_lin[:, None] + cols[None, :], 2**62)
                first = tl.minimum(first, tl.min(lin, 1))
    out = Out + pid * 8  # CHECK_SLOTS
    tl.store(out, tl.minimum(tl.maximum(tl.max(mx, 0), -(2**31)), 2**31 - 1).to(tl.int32))
    tl.store(out + 1, tl.minimum(tl.maximum(tl.min(mn, 0), -(2**31)), 2**31 - 1).to(tl.int32))
    tl.store(out + 2, tl.sum(n_pad, 0))
    tl.store(out + 3, tl.sum(n_idx, 0))
    tl.store(out + 4, tl.sum(n_bt, 0))
    f = tl.min(first, 0)
    none = f == 2**62
    tl.store(out + 5, tl.where(none, -1, f // tl.maximum(n_cols, 1)).to(tl.int32))
    tl.store(out + 6, tl.where(none, -1, f % tl.maximum(n_cols, 1)).to(tl.int32))


value_check_launch = FastLaunch(value_check_kernel)
# one result buffer per device: written by the check kernel and read back right after it, in the same call
_CHECK_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _check_buffer(t: torch.Tensor) -> torch.Tensor:
    buf = _CHECK_BUFFERS.get(t.device)
    if buf is None:
        buf = _CHECK_BUFFERS[t.device] = torch.zeros(
            MAX_CHECK_PROGRAMS * CHECK_SLOTS, dtype=torch.int32, device=t.device
        )
    return buf


def _device_reduce(
    batch: int,
    cache_seqlens: torch.Tensor | int,
    cache_leftpad: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
    seqlen_new: int,
    page: int,
    batch_cache: int,
    num_blocks: int,
    like: torch.Tensor,
) -> tuple[int, int, int, int, int, int, int]:
    """The check kernel's seven numbers, reduced over its programs: one launch and one host read."""
    # CPU tensors run through the interpreter: small blocks
    block_b = 32 if like.is_cuda else 16
    block_c = 64 if like.is_cuda else 16
    n_prog = min(-(-batch // block_b), MAX_CHECK_PROGRAMS)
    buf = _check_buffer(like)
    seq_tensor = isinstance(cache_seqlens, torch.Tensor)
    dummy = empty_arg(like, torch.int32)
    # (the launcher switches to the tensors' device when it is not the current one)
    value_check_launch(
        (n_prog,),
        buf,
        cache_seqlens if seq_tensor else dummy,
        cache_leftpad if cache_leftpad is not None else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        block_table if block_table is not None else dummy,
        batch,
        block_table.shape[1] if block_table is not None else 1,
        block_table.stride(0) if block_table is not None else 0,
        0 if seq_tensor else int(cache_seqlens),
        seqlen_new,
        max(num_blocks, 1),
        batch_cache,
        max(page, 1),
        SEQLENS_TENSOR=seq_tensor,
        HAS_LEFTPAD=cache_leftpad is not None,
        HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_BT=block_table is not None,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
    )
    # the one host read (a device sync) of the passing case
    vals = buf.tolist()  # the whole (small) buffer: a slice would cost one more tensor op
    if n_prog == 1:
        return vals[0], vals[1], vals[2], vals[3], vals[4], vals[5], vals[6]
    rows = [vals[i : i + CHECK_SLOTS] for i in range(0, n_prog * CHECK_SLOTS, CHECK_SLOTS)]
    firsts = [(r[5], r[6]) for r in rows if r[5] >= 0]
    row, col = min(firsts) if firsts else (-1, -1)
    return (
        max(r[0] for r in rows),
        min(r[1] for r in rows),
        sum(r[2] for r in rows),
        sum(r[3] for r in rows),
        sum(r[4] for r in rows),
        row,
        col,
    )


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
    """Range checks of the index tensors: one small kernel (:func:`value_check_kernel`) and one device-to-host
    copy of the numbers it reduces; pure host arithmetic when ``cache_seqlens`` is an int and no index tensor
    is given; a tensor ``cache_seqlens`` with no other index tensor (and a batch of at most
    :data:`HOST_READ_MAX`) is copied to the host as is (one copy, no kernel).

    ``cache_seqlens`` (int or ``(batch,)``): ``>= 0`` and ``max(cache_seqlens) + seqlen_new <= capacity``
    (as flash-attn checks a paged cache); ``cache_leftpad`` in ``[0, cache_seqlens]``; ``cache_batch_idx`` in
    ``[0, batch_cache)``; the ``block_table`` entries a sequence uses (columns holding its rows
    ``[cache_leftpad, cache_seqlens + seqlen_new)``) in ``[0, num_blocks)``; unused entries may hold anything
    (serving stacks pad with -1). Raises :class:`FlashAttnValueError` naming the argument.
    """
    like = (
        cache_seqlens
        if isinstance(cache_seqlens, torch.Tensor)
        else block_table
        if block_table is not None
        else cache_batch_idx
        if cache_batch_idx is not None
        else cache_leftpad
    )
    if like is None:
        # an int cache_seqlens and no index tensor: no device work
        n = int(cache_seqlens)
        max_total, min_len, n_pad, n_idx, n_bt, bad_row, bad_col = n + seqlen_new, n, 0, 0, 0, -1, -1
    elif like is cache_seqlens and cache_leftpad is None and cache_batch_idx is None and block_table is None:
        # cache_seqlens alone (the common decode call): one host copy of the tensor itself, no kernel
        lens = cache_seqlens.tolist() if batch <= HOST_READ_MAX else None
        if lens is None:
            max_total, min_len, n_pad, n_idx, n_bt, bad_row, bad_col = _device_reduce(
                batch, cache_seqlens, None, None, None, seqlen_new, page, batch_cache, num_blocks, like
            )
        else:
            max_total, min_len, n_pad, n_idx, n_bt, bad_row, bad_col = (
                max(lens) + seqlen_new, min(lens), 0, 0, 0, -1, -1
            )  # fmt: skip
    else:
        max_total, min_len, n_pad, n_idx, n_bt, bad_row, bad_col = _device_reduce(
            batch,
            cache_seqlens,
            cache_leftpad,
            cache_batch_idx,
            block_table,
            seqlen_new,
            page,
            batch_cache,
            num_blocks,
            like,
        )
    if min_len >= 0 and max_total <= capacity and not (n_pad or n_idx or n_bt):
        return
    # failing: the messages read the tensors again (host copies; this path ends in an exception)
    lens = cache_seqlens.tolist() if isinstance(cache_seqlens, torch.Tensor) else [int(cache_seqlens)] * batch
    if min_len < 0:
        raise FlashAttnValueError(f"cache_seqlens must be >= 0, got {lens}")
    if max_total > capacity:
        where = (
            f"the capacity addressable by block_table (block_table.shape[1] * page_block_size = "
            f"{block_table.shape[1]} * {page} = {capacity}); allocate more columns in block_table"
            if block_table is not None
            else f"the cache capacity (k_cache.shape[1] = {capacity})"
        )
        raise FlashAttnValueError(
            f"cache too small: max(cache_seqlens){' + seqlen_new' if seqlen_new else ''} = "
            f"{max(lens) + seqlen_new} exceeds {where}; cache_seqlens = {lens}"
        )
    if n_pad and cache_leftpad is not None:
        raise FlashAttnValueError(
            f"{leftpad_name} must lie in [0, cache_seqlens] = {lens}; got {cache_leftpad.tolist()}"
        )
    if n_idx and cache_batch_idx is not None:
        raise FlashAttnValueError(
            f"cache_batch_idx entries must lie in [0, {batch_cache}); got {cache_batch_idx.tolist()}"
        )
    if n_bt and block_table is not None:
        raise FlashAttnValueError(
            f"block_table[{bad_row}, {bad_col}] = {int(block_table[bad_row, bad_col])} is out of range: the "
            f"paged cache has {num_blocks} blocks"
        )


def check_new_kv(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    batch: int,
    nheads_k: int,
    d: int,
    dv: int,
    cache_seqlens: object,
) -> int:
    """The new keys / values of a kvcache call: both or neither, each ``(batch, seqlen_new, nheads_k, d | dv)``
    on q's device in q's dtype, with ``cache_seqlens`` saying where they go; returns ``seqlen_new`` (0 without
    them)."""
    if (k is None) != (v is None):
        raise FlashAttnValueError("k and v must be passed together (new keys and values to append)")
    if k is None or v is None:
        return 0
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
        raise FlashAttnValueError(f"k and v must have the same seqlen_new, got {k.shape[1]} and {v.shape[1]}")
    if cache_seqlens is None:
        raise FlashAttnValueError("cache_seqlens must be passed when k and v are appended to the cache")
    return k.shape[1]


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
    seqlen_new = check_new_kv(q, k, v, batch, nheads_k, d, dv, cache_seqlens)
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
