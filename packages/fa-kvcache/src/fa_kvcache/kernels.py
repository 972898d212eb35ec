"""Triton kernels of the KV-cache path: split-KV attention over a (paged) cache, split combine, cache append.

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
    normalised partial output and its lse (fp32), and :func:`combine_kernel` merges them.

Masking and score modification come from :mod:`fa_core.masking` (``kv_range``, ``visible``,
``scores_log2``), the project's single definition of causal / window / softcap / ALiBi.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.masking import kv_range, scores_log2, visible


@triton.jit
def _row_offsets(
    bt_base,
    rows,
    n_ok,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    MASK_N: tl.constexpr,
):
    """K and V element offsets (int64, ``(BLOCK_N,)``) of cache rows ``rows`` (through the block table if
    paged: one block-table read serves both)."""
    if PAGED:
        if MASK_N:
            blk = tl.load(bt_base + rows // PAGE, mask=n_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_base + rows // PAGE).to(tl.int64)
        prow = (rows % PAGE).to(tl.int64)
        return blk * stride_kb + prow * stride_kn, blk * stride_vb + prow * stride_vn
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
    start,
    end,
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
    sm_scale,
    softcap,
    alibi_slope,
    window_left,
    window_right,
    MASKED: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seqlen_k
        rows = offs_n + leftpad
        k_off, v_off = _row_offsets(
            bt_base, rows, n_ok, stride_kb, stride_kn, stride_vb, stride_vn, PAGED, PAGE, MASKED
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
        qk = tl.dot(q, k)
        s = scores_log2(
            qk, q_pos, offs_n, seqlen_q, seqlen_k, sm_scale, softcap, alibi_slope, HAS_SOFTCAP, HAS_ALIBI
        )
        if MASKED:
            ok = visible(q_pos, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
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
    nheads,
    nheads_k,
    group,
    n_head_chunks,
    num_splits,
    sm_scale,
    softcap,
    window_left,
    window_right,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    SEQLENS_TENSOR: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SPLIT: tl.constexpr,
    HB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(seqlen_q, BLOCK_M // HB) * n_head_chunks, batch * nheads_k, num_splits)``.

    q ``(batch, seqlen_q, nheads, d)``; cache ``(batch_cache, seqlen_cache, nheads_k, d)`` or paged
    ``(num_blocks, PAGE, nheads_k, d)``; out ``(batch, seqlen_q, nheads, dv)``; lse ``(batch, nheads,
    seqlen_q)``; partials (``SPLIT``) ``(num_splits, batch, seqlen_q, nheads[, dv])`` fp32, contiguous.
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

    if SEQLENS_TENSOR:
        cache_len = tl.load(CacheSeqlens + b).to(tl.int32)
    else:
        cache_len = cache_seqlen_int
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.load(LeftPad + b).to(tl.int32)
    seqlen_k = cache_len + seqlen_new - leftpad

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
            cb = tl.load(CacheBatchIdx + b)
        k_base = K + cb.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + cb.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        bt_base = BlockTable

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = kv_range(
        qblock, seqlen_q, seqlen_k, window_left, window_right, QROWS, BLOCK_N, IS_LOCAL
    )
    # this split's share of the key blocks; split edges stay multiples of BLOCK_N from lo
    n_blocks = tl.cdiv(hi - lo, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    s_lo = tl.minimum(lo + split * per_split * BLOCK_N, hi)
    s_hi = tl.minimum(s_lo + per_split * BLOCK_N, hi)
    a = tl.minimum(tl.maximum(full_lo, s_lo), s_hi)
    c = tl.minimum(tl.maximum(full_hi, a), s_hi)

    acc, l_i, m_i = _attn_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        bt_base,
        s_lo,
        a,
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
        sm_scale,
        softcap,
        alibi_slope,
        window_left,
        window_right,
        True,
        IS_LOCAL,
        HAS_SOFTCAP,
        HAS_ALIBI,
        PAGED,
        PAGE,
        HEADDIM,
        HEADDIM_V,
        EVEN_D,
        EVEN_DV,
        BLOCK_N,
    )
    acc, l_i, m_i = _attn_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        bt_base,
        a,
        c,
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
        sm_scale,
        softcap,
        alibi_slope,
        window_left,
        window_right,
        False,
        IS_LOCAL,
        HAS_SOFTCAP,
        HAS_ALIBI,
        PAGED,
        PAGE,
        HEADDIM,
        HEADDIM_V,
        EVEN_D,
        EVEN_DV,
        BLOCK_N,
    )
    acc, l_i, m_i = _attn_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        bt_base,
        c,
        s_hi,
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
        sm_scale,
        softcap,
        alibi_slope,
        window_left,
        window_right,
        True,
        IS_LOCAL,
        HAS_SOFTCAP,
        HAS_ALIBI,
        PAGED,
        PAGE,
        HEADDIM,
        HEADDIM_V,
        EVEN_D,
        EVEN_DV,
        BLOCK_N,
    )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    dv_ok = offs_dv[None, :] < HEADDIM_V
    if SPLIT:
        # flattened row (split, b, q_pos, head); empty splits carry lse = -inf (weight 0 in the combine)
        prow = ((split * batch + b).to(tl.int64) * seqlen_q + q_pos) * nheads + head
        tl.store(LsePart + prow, tl.where(empty, float("-inf"), lse), mask=row_ok)
        tl.store(OutPart + prow[:, None] * HEADDIM_V + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok)
    else:
        lse = tl.where(empty, float("inf"), lse)
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
def combine_kernel(
    OutPart,
    LsePart,
    Out,
    Lse,
    n_rows,
    seqlen_q,
    nheads,
    num_splits,
    stride_ob,
    stride_om,
    stride_oh,
    HEADDIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid ``(cdiv(n_rows, BLOCK_R),)`` with ``n_rows = batch * seqlen_q * nheads``: merge the splits."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    r64 = r.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_o = r_ok[:, None] & (offs_dv[None, :] < HEADDIM_V)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in tl.range(0, num_splits):
        m = tl.maximum(m, tl.load(LsePart + s * n_rows + r64, mask=r_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for s in tl.range(0, num_splits):
        row = s * n_rows + r64
        w = tl.exp(tl.load(LsePart + row, mask=r_ok, other=float("-inf")) - m_safe)
        o = tl.load(OutPart + row[:, None] * HEADDIM_V + offs_dv[None, :], mask=mask_o, other=0.0)
        den += w
        acc += w[:, None] * o
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    acc = acc / den_safe[:, None]
    lse = tl.where(empty, float("inf"), m_safe + tl.log(den_safe))
    head = r % nheads
    q_pos = (r // nheads) % seqlen_q
    b = r // (nheads * seqlen_q)
    tl.store(Lse + (b.to(tl.int64) * nheads + head) * seqlen_q + q_pos, lse, mask=r_ok)
    o_ptrs = (
        Out
        + b[:, None].to(tl.int64) * stride_ob
        + q_pos[:, None].to(tl.int64) * stride_om
        + head[:, None].to(tl.int64) * stride_oh
        + offs_dv[None, :]
    )
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_o)


@triton.jit
def append_kernel(
    Knew,
    Vnew,
    K,
    V,
    BlockTable,
    CacheSeqlens,
    CacheBatchIdx,
    Cos,
    Sin,
    stride_knb,
    stride_knm,
    stride_knh,
    stride_vnb,
    stride_vnm,
    stride_vnh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_btb,
    seqlen_new,
    cache_seqlen_int,
    capacity,
    seqlen_ro,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    SEQLENS_TENSOR: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Grid ``(cdiv(seqlen_new, BLOCK_T), batch, nheads_k)``: write new k (rotated) and v into the cache.

    Token ``t`` of sequence ``b`` goes to cache row ``cache_seqlens[b] + t`` (also its rotary position, as
    in flash-attn, leftpad or not). Rows at or past ``capacity`` are not written (the host-side value
    check, when enabled, reports them). Rotary in fp32, rounded once, like ``fa_core.rotary``.
    """
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if SEQLENS_TENSOR:
        cache_len = tl.load(CacheSeqlens + b).to(tl.int32)
    else:
        cache_len = cache_seqlen_int
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = cache_len + t
    ok = (t < seqlen_new) & (pos < capacity) & (pos >= 0)
    if PAGED:
        bt_base = BlockTable + b.to(tl.int64) * stride_btb
        k_off, v_off = _row_offsets(
            bt_base, pos, ok, stride_kb, stride_kn, stride_vb, stride_vn, True, PAGE, True
        )
        k_dst = K + h.to(tl.int64) * stride_kh + k_off
        v_dst = V + h.to(tl.int64) * stride_vh + v_off
    else:
        cb = b
        if HAS_BATCH_IDX:
            cb = tl.load(CacheBatchIdx + b)
        k_dst = K + cb.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + pos.to(tl.int64) * stride_kn
        v_dst = V + cb.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + pos.to(tl.int64) * stride_vn
    k_src = Knew + b.to(tl.int64) * stride_knb + h.to(tl.int64) * stride_knh + t.to(tl.int64) * stride_knm
    v_src = Vnew + b.to(tl.int64) * stride_vnb + h.to(tl.int64) * stride_vnh + t.to(tl.int64) * stride_vnm

    offs_dv = tl.arange(0, BLOCK_DV)
    mask_v = ok[:, None] & (offs_dv[None, :] < HEADDIM_V)
    vv = tl.load(v_src[:, None] + offs_dv[None, :], mask=mask_v, other=0.0)
    tl.store(v_dst[:, None] + offs_dv[None, :], vv.to(V.dtype.element_ty), mask=mask_v)

    offs_d = tl.arange(0, BLOCK_D)
    if HAS_ROTARY:
        # pass-through channels [ROTARY_DIM, HEADDIM)
        mask_p = ok[:, None] & (offs_d[None, :] >= ROTARY_DIM) & (offs_d[None, :] < HEADDIM)
        kp = tl.load(k_src[:, None] + offs_d[None, :], mask=mask_p, other=0.0)
        tl.store(k_dst[:, None] + offs_d[None, :], kp.to(K.dtype.element_ty), mask=mask_p)
        HALF: tl.constexpr = ROTARY_DIM // 2
        offs_k = tl.arange(0, BLOCK_HALF)
        if INTERLEAVED:
            k0 = 2 * offs_k
            k1 = 2 * offs_k + 1
        else:
            k0 = offs_k
            k1 = offs_k + HALF
        mask_r = ok[:, None] & (offs_k[None, :] < HALF)
        cs_mask = mask_r & (pos[:, None] < seqlen_ro)
        cs_off = pos[:, None].to(tl.int64) * HALF + offs_k[None, :]
        cos = tl.load(Cos + cs_off, mask=cs_mask, other=1.0).to(tl.float32)
        sin = tl.load(Sin + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
        x0 = tl.load(k_src[:, None] + k0[None, :], mask=mask_r, other=0.0).to(tl.float32)
        x1 = tl.load(k_src[:, None] + k1[None, :], mask=mask_r, other=0.0).to(tl.float32)
        o0 = x0 * cos - x1 * sin
        o1 = x0 * sin + x1 * cos
        tl.store(k_dst[:, None] + k0[None, :], o0.to(K.dtype.element_ty), mask=mask_r)
        tl.store(k_dst[:, None] + k1[None, :], o1.to(K.dtype.element_ty), mask=mask_r)
    else:
        mask_k = ok[:, None] & (offs_d[None, :] < HEADDIM)
        kk = tl.load(k_src[:, None] + offs_d[None, :], mask=mask_k, other=0.0)
        tl.store(k_dst[:, None] + offs_d[None, :], kk.to(K.dtype.element_ty), mask=mask_k)
