"""Triton kernels of the KV-cache path: split-KV attention over a (paged) cache and the split combine (the
cache append is :mod:`fa_kvcache.append`).

Split-KV attention (flash-decoding)
    A program owns one ``(batch, kv_head)`` pair, a tile of ``BLOCK_M`` rows and one split of the key range.
    The ``BLOCK_M`` rows pack ``HB`` query heads of the same GQA group times ``BLOCK_M // HB`` query
    positions (row ``r`` -> position ``r // HB``, head ``r % HB``), so each K/V tile is read once per
    kv-head and serves every query head of the group: with ``seqlen_q = 1`` this is what keeps decode
    memory-bound rather than launch-bound. The group is padded to a power of two (padded rows are masked).
    Keys are addressed by their *logical* index ``j`` in ``[0, seqlen_k)``; cache row ``leftpad + j``; in a
    paged cache that row lives in block ``block_table[b, row // PAGE]`` at offset ``row % PAGE`` (a per-key
    gather, so any page size works and a tile may straddle pages).
    With one split the kernel writes ``out`` and ``lse`` directly; with several, each split writes a
    normalised partial output and its lse (fp32), and :func:`combine_kernel` merges them (a second launch:
    merging in the split-KV kernel's last program of each tile ran at 0.54-0.68x of it at batch 1 on an H200,
    a serial tail, ``reports/h200-decode-tuning.md``).

Masking and score modification come from :mod:`fa_core.masking` (``kv_range``, ``visible``,
``scores_log2``), the project's single definition of causal / window / softcap / ALiBi.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.masking import chunk_kv_range, chunk_visible, kv_range, scores_log2, visible


@triton.jit
def clamp_index(x, n):
    """``x`` clamped to ``[0, n)`` (``n >= 1``): every index read from a tensor's values (block ids, cache
    batch rows) passes through it before it addresses memory, so bad values cannot leave the tensor."""
    return tl.minimum(tl.maximum(x, 0), n - 1)


@triton.jit
def page_offsets(blk, rows, stride_kb, stride_kn, stride_vb, stride_vn, num_blocks, PAGE: tl.constexpr):
    """K and V element offsets (int64) of cache rows ``rows`` held in cache blocks ``blk`` of ``PAGE`` rows:
    the paging rule shared by the split-KV kernel and the cache append. Block ids are clamped to
    ``[0, num_blocks)``."""
    blk = clamp_index(blk, num_blocks).to(tl.int64)
    prow = (rows % PAGE).to(tl.int64)
    return blk * stride_kb + prow * stride_kn, blk * stride_vb + prow * stride_vn


@triton.jit
def _row_offsets(
    bt_base,
    bt_vec,
    pg0,
    start_n,
    rows,
    n_ok,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    num_blocks,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    PAGE_TILE: tl.constexpr,
    MASK_N: tl.constexpr,
    BT_PRELOAD: tl.constexpr,
):
    """K and V element offsets (int64, ``(BLOCK_N,)``) of cache rows ``rows`` (through the block table if
    paged: one block-table read serves both). ``PAGE_TILE``: the tile's rows ``start_n + [0, BLOCK_N)`` lie in
    one page (page size a multiple of BLOCK_N, no left padding), so one scalar block-table read serves the
    tile and the row offsets stay affine (cheaper address math, wider loads).

    ``BT_PRELOAD`` > 0: the program's block-table entries ``pg0 + [0, BT_PRELOAD)`` were loaded once before
    the loop (``bt_vec``) and are picked from registers here. A block-table load inside the loop makes the K/V
    loads indirect, and Triton's pipeliner then splits the stages between the two loads (num_stages 4
    prefetched K/V one tile ahead instead of three): a paged cache streamed at about half the contiguous rate
    per program. Pages smaller than the tile take one entry per key through ``tl.gather`` (shared memory: 10
    barriers per iteration instead of 7 in the sm_90 PTX). Picking the tile's ``BLOCK_N // PAGE`` entries as
    scalars instead compiles without the extra barriers (<= 32 entries, i.e. 64 splits at b1/32k page 16) but
    measured on an H200 it did not pay: 3127 vs 3096 GB/s at 64 splits, both below the gather at 47 splits
    (3143), so it is gone."""
    if PAGED:
        if BT_PRELOAD > 0:
            if PAGE_TILE:
                pick = tl.arange(0, BT_PRELOAD) == start_n // PAGE - pg0
                blk = tl.sum(tl.where(pick, bt_vec, 0))
            else:
                blk = tl.gather(bt_vec, tl.minimum(rows // PAGE - pg0, BT_PRELOAD - 1), 0)
        elif PAGE_TILE:
            blk = tl.load(bt_base + start_n // PAGE)
        elif MASK_N:
            blk = tl.load(bt_base + rows // PAGE, mask=n_ok, other=0)
        else:
            blk = tl.load(bt_base + rows // PAGE)
        return page_offsets(blk, rows, stride_kb, stride_kn, stride_vb, stride_vn, num_blocks, PAGE)
    r64 = rows.to(tl.int64)
    return r64 * stride_kn, r64 * stride_vn


@triton.jit
def _attn_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    bt_base,
    bt_vec,
    pg0,
    leftpad,
    q_pos,
    offs_d,
    offs_dv,
    seqlen_q,
    seqlen_k,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    num_blocks,
    sm_scale,
    softcap,
    alibi_slope,
    window_left,
    window_right,
    attention_chunk,
    IS_LOCAL: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    PAGE_TILE: tl.constexpr,
    BT_PRELOAD: tl.constexpr,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    start,
    end,
    MASKED: tl.constexpr,
):
    """Online-softmax accumulation of the keys ``[start, end)`` (``MASKED``: with the element mask, window /
    chunk and edge checks); :func:`_attn_range` calls it for the masked edges and the unmasked middle of a key
    range. K / V tiles are converted to q's dtype after the load (FP8 cache -> bf16 / fp16)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seqlen_k
        rows = offs_n + leftpad
        k_off, v_off = _row_offsets(
            bt_base,
            bt_vec,
            pg0,
            start_n,
            rows,
            n_ok,
            stride_kb,
            stride_kn,
            stride_vb,
            stride_vn,
            num_blocks,
            PAGED=PAGED,
            PAGE=PAGE,
            PAGE_TILE=PAGE_TILE,
            MASK_N=MASKED,
            BT_PRELOAD=BT_PRELOAD,
        )
        # K transposed: (BLOCK_D, BLOCK_N)
        k_ptrs = k_base + k_off[None, :] + offs_d[:, None]
        v_ptrs = v_base + v_off[:, None] + offs_dv[None, :]
        if MASKED:
            if EVEN_D:
                k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=n_ok[None, :] & (offs_d[:, None] < HEADDIM), other=0.0)
            if EVEN_DV:
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_dv[None, :] < HEADDIM_V), other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[:, None] < HEADDIM, other=0.0)
            if EVEN_DV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEADDIM_V, other=0.0)
        k = k.to(q.dtype)  # FP8 cache -> q's dtype; a no-op when they match
        v = v.to(q.dtype)
        qk = tl.dot(q, k)
        s = scores_log2(
            qk, q_pos, offs_n, seqlen_q, seqlen_k, sm_scale, softcap, alibi_slope, HAS_SOFTCAP, HAS_ALIBI
        )
        if MASKED:
            ok = visible(q_pos, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
            if HAS_CHUNK:
                ok = ok & chunk_visible(q_pos, offs_n, seqlen_q, seqlen_k, attention_chunk)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_range(
    q,
    k_base,
    v_base,
    bt_base,
    leftpad,
    q_pos,
    offs_d,
    offs_dv,
    seqlen_q,
    seqlen_k,
    s_lo,
    s_hi,
    full_lo,
    full_hi,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    num_blocks,
    sm_scale,
    softcap,
    alibi_slope,
    window_left,
    window_right,
    attention_chunk,
    IS_LOCAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    PAGE_TILE: tl.constexpr,
    BT_PRELOAD: tl.constexpr,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``(acc, l_i, m_i)`` (``(BLOCK_M, BLOCK_DV)``, ``(BLOCK_M,)`` x 2, log2 domain) of the keys ``[s_lo,
    s_hi)`` (logical indices; cache row ``leftpad + j``): masked edges ``[s_lo, a)`` and ``[c, s_hi)``,
    unmasked middle ``[a, c)`` (``a`` / ``c``: ``full_lo`` / ``full_hi`` clipped to the range). ``[s_lo, a)``
    is empty unless a window bounds the keys on the left (``kv_range``: ``full_lo == lo`` otherwise), so it is
    compiled only with ``HAS_WINDOW_LEFT`` (a zero-trip masked loop still cost 7-13% in the forward kernel on
    an H200). ``BT_PRELOAD`` > 0: the range's block-table entries are loaded once, before the key loop (see
    :func:`_row_offsets`); the host sizes it for the longest range, entries past the range's last page are not
    read. Shared by the split-KV kernel and :mod:`fa_kvcache.unified_kernels`."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    a = tl.minimum(tl.maximum(full_lo, s_lo), s_hi)
    c = tl.minimum(tl.maximum(full_hi, a), s_hi)
    bt_vec = 0
    pg0 = 0
    if BT_PRELOAD > 0:
        pg0 = (s_lo + leftpad) // PAGE
        pidx = pg0 + tl.arange(0, BT_PRELOAD)
        bt_vec = tl.load(bt_base + pidx, mask=pidx <= (s_hi - 1 + leftpad) // PAGE, other=0)
    # part 0: [s_lo, a) masked (left window only), 1: [a, c) unmasked, 2: [c, s_hi) masked
    for part in tl.static_range(1 - HAS_WINDOW_LEFT, 3):
        if part == 0:
            start = s_lo
            end = a
        elif part == 1:
            start = a
            end = c
        else:
            start = c
            end = s_hi
        acc, l_i, m_i = _attn_inner(
            acc, l_i, m_i, q, k_base, v_base, bt_base, bt_vec, pg0, leftpad, q_pos, offs_d, offs_dv, seqlen_q,
            seqlen_k, stride_kb, stride_kn, stride_vb, stride_vn, num_blocks, sm_scale, softcap, alibi_slope,
            window_left, window_right, attention_chunk, IS_LOCAL=IS_LOCAL, HAS_CHUNK=HAS_CHUNK,
            HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, PAGED=PAGED, PAGE=PAGE, PAGE_TILE=PAGE_TILE,
            BT_PRELOAD=BT_PRELOAD, HEADDIM=HEADDIM, HEADDIM_V=HEADDIM_V, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV,
            BLOCK_N=BLOCK_N, start=start, end=end, MASKED=part != 1,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def split_kv_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    OutPart,
    LsePart,
    BlockTable,
    CacheSeqlens,
    CacheBatchIdx,
    LeftPad,
    Alibi,
    Sink,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_om,
    stride_oh,
    stride_btb,
    stride_alb,
    batch,
    seqlen_q,
    seqlen_new,
    cache_seqlen_int,
    capacity,
    num_blocks,
    batch_cache,
    nheads,
    nheads_k,
    group,
    n_head_chunks,
    num_splits,
    sm_scale,
    softcap,
    window_left,
    window_right,
    attention_chunk,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    PAGE_TILE: tl.constexpr,
    BT_PRELOAD: tl.constexpr,
    SEQLENS_TENSOR: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SINK: tl.constexpr,
    SPLIT: tl.constexpr,
    HB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(seqlen_q, BLOCK_M // HB) * n_head_chunks, batch * nheads_k, num_splits)``.

    q ``(batch, seqlen_q, nheads, d)``; cache ``(batch_cache, seqlen_cache, nheads_k, d)`` or paged
    ``(num_blocks, PAGE, nheads_k, d)``; out ``(batch, seqlen_q, nheads, dv)``; lse ``(batch, nheads,
    seqlen_q)``; partials (``SPLIT``) ``(num_splits, batch, seqlen_q, nheads[, dv])`` fp32, contiguous.
    A learnable sink (``HAS_SINK``, ``(nheads,)``) joins the denominator here without splits, else in the
    combine.
    """
    QROWS: tl.constexpr = BLOCK_M // HB
    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    qblock = pid_m // n_head_chunks
    chunk = pid_m % n_head_chunks
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k

    # index values read from tensors are clamped before they address memory (the host checks them unless value
    # checks are off): the sequence's rows [leftpad, end) lie inside its cache (``capacity`` rows)
    if SEQLENS_TENSOR:
        cache_len = tl.load(CacheSeqlens + b).to(tl.int32)
    else:
        cache_len = cache_seqlen_int
    cache_len = tl.minimum(tl.maximum(cache_len, 0), capacity)
    end = tl.minimum(cache_len + seqlen_new, capacity)
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.minimum(tl.maximum(tl.load(LeftPad + b).to(tl.int32), 0), end)
    seqlen_k = end - leftpad

    offs_r = tl.arange(0, BLOCK_M)
    q_pos = qblock * QROWS + offs_r // HB
    g = chunk * HB + offs_r % HB
    head = hk * group + g
    row_ok = (q_pos < seqlen_q) & (g < group)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + q_pos[:, None].to(tl.int64) * stride_qm
        + head[:, None].to(tl.int64) * stride_qh
        + offs_d[None, :]
    )
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)

    alibi_slope = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + b * stride_alb + head, mask=row_ok, other=0.0).to(tl.float32)[:, None]

    if PAGED:
        k_base = K + hk.to(tl.int64) * stride_kh
        v_base = V + hk.to(tl.int64) * stride_vh
        bt_base = BlockTable + b.to(tl.int64) * stride_btb
    else:
        cb = b
        if HAS_BATCH_IDX:
            cb = clamp_index(tl.load(CacheBatchIdx + b), batch_cache)
        k_base = K + cb.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + cb.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        bt_base = BlockTable

    lo, full_lo, full_hi, hi = kv_range(
        qblock, seqlen_q, seqlen_k, window_left, window_right, QROWS, BLOCK_N, IS_LOCAL
    )
    if HAS_CHUNK:
        # chunked attention: only the chunks this tile's positions live in, every block masked
        lo, hi = chunk_kv_range(lo, hi, qblock, seqlen_q, seqlen_k, attention_chunk, QROWS, BLOCK_N)
        full_lo = lo
        full_hi = lo
    # this split's share of the key blocks; split edges stay multiples of BLOCK_N from lo
    n_blocks = tl.cdiv(hi - lo, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    s_lo = tl.minimum(lo + split * per_split * BLOCK_N, hi)
    s_hi = tl.minimum(s_lo + per_split * BLOCK_N, hi)
    acc, l_i, m_i = _attn_range(
        q, k_base, v_base, bt_base, leftpad, q_pos, offs_d, offs_dv, seqlen_q, seqlen_k, s_lo, s_hi, full_lo,
        full_hi, stride_kb, stride_kn, stride_vb, stride_vn, num_blocks, sm_scale, softcap, alibi_slope,
        window_left, window_right, attention_chunk, IS_LOCAL=IS_LOCAL, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT,
        HAS_CHUNK=HAS_CHUNK, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, PAGED=PAGED, PAGE=PAGE,
        PAGE_TILE=PAGE_TILE, BT_PRELOAD=BT_PRELOAD, HEADDIM=HEADDIM, HEADDIM_V=HEADDIM_V, EVEN_D=EVEN_D,
        EVEN_DV=EVEN_DV, BLOCK_M=BLOCK_M, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N,
    )  # fmt: skip

    dv_ok = offs_dv[None, :] < HEADDIM_V
    acc, lse = _finish_rows(acc, l_i, m_i, Sink, head, row_ok, HAS_SINK=HAS_SINK and not SPLIT, PARTIAL=SPLIT)
    if SPLIT:
        # flattened row (split, b, q_pos, head)
        prow = ((split * batch + b).to(tl.int64) * seqlen_q + q_pos) * nheads + head
        tl.store(LsePart + prow, lse, mask=row_ok)
        tl.store(OutPart + prow[:, None] * HEADDIM_V + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok)
    else:
        _store_rows(Out, Lse, acc, lse, b, q_pos, head, row_ok, offs_dv, dv_ok, seqlen_q, nheads, stride_ob,
                    stride_om, stride_oh)  # fmt: skip


@triton.jit
def _finish_rows(acc, l_i, m_i, Sink, head, row_ok, HAS_SINK: tl.constexpr, PARTIAL: tl.constexpr):
    """Normalise accumulated rows (log2-domain ``m_i``): ``(acc / l, lse)`` with ``acc (R, DV)``, ``l_i`` /
    ``m_i`` / ``head`` / ``row_ok`` ``(R,)``. ``HAS_SINK``: the learnable sink ``Sink[head]`` (gpt-oss: one
    extra logit per head) joins the denominator, not the output. Rows with no visible key: out 0 and lse
    +inf (flash-attn 2.8's convention), or ``PARTIAL`` (a split's partial rows) lse -inf, weight 0 in the
    combine. Shared by the split-KV and unified kernels."""
    if HAS_SINK:
        sink = tl.load(Sink + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_sink = tl.maximum(m_i, sink)
        alpha_sink = tl.exp2(m_i - m_sink)
        l_i = l_i * alpha_sink + tl.exp2(sink - m_sink)
        acc = acc * alpha_sink[:, None]
        m_i = m_sink
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(
        empty, float("-inf") if PARTIAL else float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453
    )
    return acc / l_safe[:, None], lse


@triton.jit
def _merged_rows(acc, den, m, sink, HAS_SINK: tl.constexpr):
    """Finish merged split rows (natural-log domain): ``acc (R, DV)`` sum of weighted partial outputs, ``den
    (R,)`` their weights, ``m (R,)`` the max partial lse (-inf: no visible key), ``sink (R,)`` the learnable
    sink logit. Returns ``(out rows, lse)``; rows with no visible key give out 0 and lse +inf."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    if HAS_SINK:
        m_sink = tl.maximum(m_safe, sink)
        den = den * tl.exp(m_safe - m_sink) + tl.exp(sink - m_sink)
        acc = acc * tl.exp(m_safe - m_sink)[:, None]
        m_safe = m_sink
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    return acc / den_safe[:, None], tl.where(empty, float("inf"), m_safe + tl.log(den_safe))


@triton.jit
def _store_rows(
    Out,
    Lse,
    acc,
    lse,
    b,
    q_pos,
    head,
    row_ok,
    offs_dv,
    dv_ok,
    seqlen_q,
    nheads,
    stride_ob,
    stride_om,
    stride_oh,
):
    """Store final rows: lse ``(batch, nheads, seqlen_q)``, out ``(batch, seqlen_q, nheads, dv)``."""
    tl.store(Lse + (b.to(tl.int64) * nheads + head) * seqlen_q + q_pos, lse, mask=row_ok)
    o_ptrs = (
        Out
        + b.to(tl.int64) * stride_ob
        + q_pos[:, None].to(tl.int64) * stride_om
        + head[:, None].to(tl.int64) * stride_oh
        + offs_dv[None, :]
    )
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok)


@triton.jit
def _merge_splits(
    OutPart,
    LsePart,
    r,
    n_rows,
    num_splits,
    offs_s,
    offs_dv,
    dv_ok,
    HEADDIM_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Online merge of row ``r``'s ``num_splits`` partials (lse ``(num_splits, n_rows)``, out ``(num_splits,
    n_rows, HEADDIM_V)`` fp32), ``BLOCK_S`` splits per ``(BLOCK_S, BLOCK_DV)`` load. Returns ``acc (BLOCK_DV,)``
    (sum of weighted outputs), ``den (1,)`` (their weights) and ``m (1,)`` (max lse, -inf: no visible key), for
    :func:`_merged_rows`. Shared by both combine kernels."""
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    den = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros(offs_dv.shape, dtype=tl.float32)
    for s0 in tl.range(0, num_splits, BLOCK_S):
        sp = s0 + offs_s
        s_ok = sp < num_splits
        row = sp.to(tl.int64) * n_rows + r
        lse_s = tl.load(LsePart + row, mask=s_ok, other=float("-inf"))
        o = tl.load(
            OutPart + row[:, None] * HEADDIM_V + offs_dv[None, :],
            mask=s_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_s[None, :] - m_safe[:, None])  # (1, BLOCK_S)
        den = den * alpha + tl.sum(w, 1)
        acc = acc * alpha + tl.sum(tl.reshape(w, [BLOCK_S])[:, None] * o, 0)
        m = m_new
    return acc, den, m


@triton.jit
def combine_kernel(
    OutPart,
    LsePart,
    Out,
    Lse,
    Sink,
    n_rows,
    seqlen_q,
    nheads,
    num_splits,
    stride_ob,
    stride_om,
    stride_oh,
    HEADDIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_SINK: tl.constexpr,
):
    """Grid ``(n_rows,)`` with ``n_rows = batch * seqlen_q * nheads``: merge one row's splits.

    Splits are read ``BLOCK_S`` at a time as one ``(BLOCK_S, BLOCK_DV)`` tile with an online rescale, so a
    row costs ``cdiv(num_splits, BLOCK_S)`` wide loads and small batches still spread over many programs.
    """
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEADDIM_V
    acc, den, m = _merge_splits(
        OutPart, LsePart, r, n_rows, num_splits, offs_s, offs_dv, dv_ok, HEADDIM_V, BLOCK_S
    )
    one = tl.zeros([1], dtype=tl.int64)
    head = r % nheads + one
    q_pos = (r // nheads) % seqlen_q + one
    b = r // (nheads * seqlen_q) + one
    sink = tl.zeros([1], dtype=tl.float32)
    if HAS_SINK:
        sink = tl.load(Sink + head).to(tl.float32)
    out_row, lse = _merged_rows(acc[None, :], den, m, sink, HAS_SINK)
    _store_rows(
        Out,
        Lse,
        out_row,
        lse,
        b,
        q_pos,
        head,
        one == 0,
        offs_dv,
        dv_ok[None, :],
        seqlen_q,
        nheads,
        stride_ob,
        stride_om,
        stride_oh,
    )
