"""``@triton.jit`` helpers of the forward kernel: tile loads and the inner loop over key blocks.

:func:`fwd_inner` runs the online softmax over the key blocks ``[start, end)`` of one query block, or over the
blocks a block-sparse mask lists for it, with or without element masks (``MASKED``); :func:`fwd_step` is one
key tile. :func:`fa_core.forward_kernel.fwd_kernel` calls :func:`fwd_inner` once per band segment (left edge,
right edge, then the interior) or once per list (partial blocks, full blocks) of a block-sparse mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from fa_core.masking import chunk_visible, clamp_index, dropout_keep, score_mod, scores_log2, visible

__all__ = [
    "FwdFlags",
    "KVTiles",
    "ScoreArgs",
    "fwd_inner",
    "fwd_step",
    "load_k_tile",
    "load_tile",
    "load_vt_tile",
]


class FwdFlags(NamedTuple):
    """Compile-time features of one forward kernel specialisation, the same for every call of the inner loop.
    Built inside the kernel as ``F: tl.constexpr = FwdFlags(...)`` (the annotation keeps every field a
    constexpr, so ``if F.HAS_SOFTCAP:`` is resolved at compile time)."""

    score_mod_fn: Any
    mask_mod_fn: Any
    HAS_SCORE_MOD: Any
    IS_LOCAL: Any
    HAS_CHUNK: Any
    HAS_SOFTCAP: Any
    HAS_ALIBI: Any
    HAS_DROPOUT: Any
    HEADDIM: Any
    HEADDIM_V: Any
    EVEN_D: Any
    EVEN_DV: Any
    BLOCK_N: Any
    SPARSE_KV: Any
    USE_TMA: Any
    V_T: Any
    IS_VARLEN: Any
    P_SHIFT: Any
    FUSED_SCALE: Any
    PAGED: Any
    PAGE_SIZE: Any
    PAGE_TILE: Any
    PAGE_ALIGNED: Any


class KVTiles(NamedTuple):
    """Where the key / value tiles of one (sequence, kv head) are read: 64-bit base pointers at the sequence's
    first key (or tensor descriptors, ``USE_TMA``), the key-row strides of K and V, ``stride_vd`` (the
    headdim-row stride of a transposed V, ``V_T``) and the column offsets of the K and V tiles.

    Paged (``PAGED``): the bases point at the kv head in page 0 of the cache ``(num_pages, PAGE_SIZE,
    nheads_k, d)``; logical key ``j`` is cache row ``row0 + j`` (``row0``: the left padding), held in page
    ``bt_row[(row0 + j) // PAGE_SIZE]`` (``bt_row``: this sequence's block-table row of ``bt_cols`` entries, each
    clamped to ``[0, num_pages)``), ``stride_kp`` / ``stride_vp`` apart."""

    k_base: Any
    v_base: Any
    k_desc: Any
    v_desc: Any
    stride_kn: Any
    stride_vn: Any
    stride_vd: Any
    offs_d: Any
    offs_dv: Any
    bt_row: Any
    bt_cols: Any
    num_pages: Any
    stride_kp: Any
    stride_vp: Any
    row0: Any


class ScoreArgs(NamedTuple):
    """Runtime values of the score rules for one query block: its rows ``offs_m`` (relative to the sequence),
    the sequence lengths, scale / softcap / ALiBi slope, window and chunk, the dropout RNG key and the
    ``(batch, head)`` handed to a user ``score_mod`` / ``mask_mod``."""

    offs_m: Any
    seqlen_q: Any
    seqlen_k: Any
    sm_scale: Any
    softcap: Any
    alibi_slope: Any
    window_left: Any
    window_right: Any
    chunk: Any
    seed: Any
    rng_offset: Any
    bh: Any
    dropout_p: Any
    off_b: Any
    off_h: Any


@triton.jit
def load_tile(
    ptrs, offs_rows, n_rows, offs_d, HEADDIM: tl.constexpr, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr
):
    if CHECK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEADDIM), other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEADDIM, other=0.0)


@triton.jit
def load_k_tile(
    k_tile,
    offs_n0,
    offs_n,
    offs_d,
    stride_kn,
    seqlen_k,
    HEADDIM: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """K block loaded transposed: ``(BLOCK_D, BLOCK_N)``. ``k_tile`` points at the block's first row (a 64-bit
    scalar base); ``offs_n0`` are the rows inside the block (32-bit, loop-invariant), ``offs_n`` the absolute
    rows for the bounds check."""
    k_ptrs = k_tile + offs_n0[None, :] * stride_kn + offs_d[:, None]
    if MASKED:
        if EVEN_D:
            return tl.load(k_ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
        return tl.load(k_ptrs, mask=(offs_n[None, :] < seqlen_k) & (offs_d[:, None] < HEADDIM), other=0.0)
    if EVEN_D:
        return tl.load(k_ptrs)
    return tl.load(k_ptrs, mask=offs_d[:, None] < HEADDIM, other=0.0)


@triton.jit
def load_vt_tile(
    vt_base,
    offs_n,
    offs_dv,
    stride_vd,
    seqlen_k,
    HEADDIM_V: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_DV: tl.constexpr,
):
    """Tile of V stored transposed ``(headdim_v, seqlen_k)``: ``(BLOCK_DV, BLOCK_N)``, keys contiguous."""
    ptrs = vt_base + offs_dv[:, None] * stride_vd + offs_n[None, :]
    if MASKED:
        if EVEN_DV:
            return tl.load(ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
        return tl.load(ptrs, mask=(offs_n[None, :] < seqlen_k) & (offs_dv[:, None] < HEADDIM_V), other=0.0)
    if EVEN_DV:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_dv[:, None] < HEADDIM_V, other=0.0)


@triton.jit
def load_kt(
    ptrs, offs_n, offs_d, seqlen_k, HEADDIM: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr
):
    """K tile ``(BLOCK_D, BLOCK_N)`` from ready pointers (a gathered paged tile): keys past ``seqlen_k`` and
    columns past ``HEADDIM`` read as zeros."""
    if MASKED:
        if EVEN_D:
            return tl.load(ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
        return tl.load(ptrs, mask=(offs_n[None, :] < seqlen_k) & (offs_d[:, None] < HEADDIM), other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[:, None] < HEADDIM, other=0.0)


@triton.jit
def page_tile_bases(kv: KVTiles, start_n, PAGE_SIZE: tl.constexpr):
    """K and V pointers (64-bit) at logical key ``start_n`` of a paged cache whose tile lies in one page
    (``PAGE_TILE``: page size a multiple of BLOCK_N, no left padding): one block-table read per tile, the rows
    inside the tile stay affine (the contiguous layout's address math)."""
    pg = clamp_index(tl.load(kv.bt_row + start_n // PAGE_SIZE), kv.num_pages).to(tl.int64)
    r = tl.cast(start_n % PAGE_SIZE, tl.int64)
    return kv.k_base + pg * kv.stride_kp + r * kv.stride_kn, kv.v_base + pg * kv.stride_vp + r * kv.stride_vn


@triton.jit
def page_of(kv: KVTiles, start_n, PAGE_SIZE: tl.constexpr):
    """The page (clamped to ``[0, num_pages)``) holding logical key ``start_n``; 0 past the table's row."""
    col = start_n // PAGE_SIZE
    return clamp_index(tl.load(kv.bt_row + col, mask=col < kv.bt_cols, other=0), kv.num_pages)


@triton.jit
def page_row_offsets(
    kv: KVTiles,
    start_n,
    offs_n0,
    offs_n,
    seqlen_k,
    PAGE_SIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    """K and V element offsets (int64, ``(BLOCK_N,)``) of logical keys ``offs_n`` in a paged cache, one block-table
    read per key (pages smaller than the tile, or left padding): a tile may span several pages. Page ids are
    clamped to the cache.

    ``ALIGNED`` (no left padding): tiles start on a page boundary, so the row inside the page (``offs_n0 %
    PAGE_SIZE``) is loop-invariant and only the table read moves; keys past the end of a masked tile read
    no table entry (sm_90 SASS, page 16 under a 128 x 128 tile: 609 instructions per unmasked iteration
    instead of 834 with per-key division, 538 contiguous). Otherwise the column is clamped to the table row."""
    if ALIGNED:
        col = start_n // PAGE_SIZE + offs_n0 // PAGE_SIZE
        prow = offs_n0 % PAGE_SIZE
        if MASKED:
            pg = tl.load(kv.bt_row + col, mask=offs_n < seqlen_k, other=0)
        else:
            pg = tl.load(kv.bt_row + col)
    else:
        rows = kv.row0 + offs_n
        col = tl.minimum(rows // PAGE_SIZE, kv.bt_cols - 1)
        prow = rows % PAGE_SIZE
        pg = tl.load(kv.bt_row + col)
    pg = clamp_index(pg, kv.num_pages).to(tl.int64)
    prow = prow.to(tl.int64)
    return pg * kv.stride_kp + prow * kv.stride_kn, pg * kv.stride_vp + prow * kv.stride_vn


@triton.jit
def fwd_step(
    acc,
    l_i,
    m_i,
    q,
    kv: KVTiles,
    sc: ScoreArgs,
    start_n,
    apply_mask,
    page_id,
    F: FwdFlags,
    HAS_MASK_MOD: tl.constexpr,
    MASKED: tl.constexpr,
    DYN_MASK: tl.constexpr,
    ZERO_V: tl.constexpr,
):
    """One key tile ``[start_n, start_n + BLOCK_N)`` of the online softmax.

    ``MASKED``: loads are bounds-checked and the element rules applied; with ``DYN_MASK`` the rules are applied
    only where the runtime flag ``apply_mask`` says the tile can cut (block-sparse full blocks). ``ZERO_V``
    (paged cache through descriptors): the tile may reach past ``seqlen_k``, whose V rows are real cache rows
    and are zeroed (the descriptor does not); tiles that end inside the keys skip that. ``page_id``: on that
    path, the page holding ``start_n``, read by the caller (:func:`page_of`); unused elsewhere.
    ``FUSED_SCALE`` (no softcap / ALiBi / score_mod, ``sm_scale > 0``): the row max is taken over the raw
    ``q @ k^T`` and the scale folds into the exponent's FMA, one multiply per element fewer.
    """
    offs_m = sc.offs_m
    seqlen_q = sc.seqlen_q
    seqlen_k = sc.seqlen_k
    offs_n0 = tl.arange(0, F.BLOCK_N)
    offs_n = start_n + offs_n0
    if F.USE_TMA:
        if F.PAGED:
            # the cache row of key start_n (a tile lies in one page); keys past seqlen_k are real cache rows
            # here: masked scores drop them from the softmax, V is zeroed below
            cache_row = page_id * F.PAGE_SIZE + start_n % F.PAGE_SIZE
            k = tl.trans(kv.k_desc.load([cache_row, 0]))
        else:
            # the descriptor zero-fills rows past seqlen_k and columns past HEADDIM
            k = tl.trans(kv.k_desc.load([start_n, 0]))
    elif F.PAGED and not F.PAGE_TILE:
        k_off, v_off = page_row_offsets(
            kv, start_n, offs_n0, offs_n, seqlen_k, F.PAGE_SIZE, F.PAGE_ALIGNED, MASKED
        )
        k = load_kt(
            kv.k_base + k_off[None, :] + kv.offs_d[:, None],
            offs_n,
            kv.offs_d,
            seqlen_k,
            F.HEADDIM,
            MASKED,
            F.EVEN_D,
        )
    else:
        if F.PAGED:
            k_tile, v_tile = page_tile_bases(kv, start_n, F.PAGE_SIZE)
        else:
            # 64-bit scalar tile base + 32-bit in-tile offsets (hoisted out of the loop): cheap and overflow-free
            k_tile = kv.k_base + tl.cast(start_n, tl.int64) * kv.stride_kn
        k = load_k_tile(
            k_tile, offs_n0, offs_n, kv.offs_d, kv.stride_kn, seqlen_k, F.HEADDIM, MASKED, F.EVEN_D
        )
    qk = tl.dot(q, k)
    # user score_mod without softcap / ALiBi: natural-log scores straight into the user's function, the log2
    # factor folded into exp2's FMA below (FUSED_SCALE's path), two multiplies per element fewer
    NAT_MOD: tl.constexpr = F.HAS_SCORE_MOD and not (F.HAS_SOFTCAP or F.HAS_ALIBI) and not F.FUSED_SCALE
    if F.FUSED_SCALE:
        s = qk
    elif NAT_MOD:
        s = F.score_mod_fn(qk * sc.sm_scale, sc.off_b, sc.off_h, offs_m[:, None], offs_n[None, :])
    else:
        s = scores_log2(
            qk,
            offs_m,
            offs_n,
            seqlen_q,
            seqlen_k,
            sc.sm_scale,
            sc.softcap,
            sc.alibi_slope,
            F.HAS_SOFTCAP,
            F.HAS_ALIBI,
        )
        if F.HAS_SCORE_MOD:
            # user score_mod works on natural-log logits (after scale, softcap and ALiBi)
            s = score_mod(F.score_mod_fn, s, sc.off_b, sc.off_h, offs_m, offs_n)
    if MASKED:
        if DYN_MASK:
            if apply_mask:
                ok = visible(
                    offs_m, offs_n, seqlen_q, seqlen_k, sc.window_left, sc.window_right, F.IS_LOCAL, True
                )
                if F.HAS_CHUNK:
                    ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, sc.chunk)
                s = tl.where(ok, s, float("-inf"))
        else:
            ok = visible(
                offs_m, offs_n, seqlen_q, seqlen_k, sc.window_left, sc.window_right, F.IS_LOCAL, True
            )
            if F.HAS_CHUNK:
                ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, sc.chunk)
            if HAS_MASK_MOD:
                ok = ok & F.mask_mod_fn(sc.off_b, sc.off_h, offs_m[:, None], offs_n[None, :])
            s = tl.where(ok, s, float("-inf"))
    if F.FUSED_SCALE:
        qk_scale = sc.sm_scale * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    elif NAT_MOD:
        qk_scale = 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no visible key yet keeps m = -inf: subtract 0 instead to avoid inf - inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    if F.P_SHIFT != 0.0:
        # FP8: p in [0, 2^P_SHIFT] uses e4m3's range (max 448) instead of flushing p < 2^-10 to zero;
        # l carries the same factor, so out = acc / l is unchanged (lse subtracts P_SHIFT)
        m_safe = m_safe - F.P_SHIFT
    if F.FUSED_SCALE or NAT_MOD:
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if F.V_T:
        # V stored transposed (headdim, seqlen): the tile (BLOCK_DV, BLOCK_N) is K-major for P @ V,
        # which Hopper's FP8 wgmma requires of its B operand
        if F.USE_TMA and not F.IS_VARLEN:
            vt = kv.v_desc.load([0, start_n])
        else:
            vt = load_vt_tile(
                kv.v_base, offs_n, kv.offs_dv, kv.stride_vd, seqlen_k, F.HEADDIM_V, MASKED, F.EVEN_DV
            )
        v = tl.trans(vt)
    elif F.USE_TMA:
        if F.PAGED:
            v = kv.v_desc.load([cache_row, 0])
            if ZERO_V:
                # a stale NaN / Inf in the page's unused rows must not reach the output through p = 0
                v = tl.where(offs_n[:, None] < seqlen_k, v, 0.0)
        else:
            v = kv.v_desc.load([start_n, 0])
    elif F.PAGED:
        if F.PAGE_TILE:
            v_ptrs = v_tile + (offs_n0[:, None] * kv.stride_vn + kv.offs_dv[None, :])
        else:
            v_ptrs = kv.v_base + v_off[:, None] + kv.offs_dv[None, :]
        v = load_tile(v_ptrs, offs_n, seqlen_k, kv.offs_dv, F.HEADDIM_V, MASKED, F.EVEN_DV)
    else:
        v_ptrs = (kv.v_base + tl.cast(start_n, tl.int64) * kv.stride_vn) + (
            offs_n0[:, None] * kv.stride_vn + kv.offs_dv[None, :]
        )
        v = load_tile(v_ptrs, offs_n, seqlen_k, kv.offs_dv, F.HEADDIM_V, MASKED, F.EVEN_DV)
    if F.HAS_DROPOUT:
        keep = dropout_keep(sc.seed, sc.rng_offset, sc.bh, offs_m, offs_n, sc.dropout_p)
        p = tl.where(keep, p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    kv: KVTiles,
    sc: ScoreArgs,
    start,
    end,
    idx_ptr,
    n_listed,
    full_lo,
    full_hi,
    F: FwdFlags,
    HAS_MASK_MOD: tl.constexpr,
    MASKED: tl.constexpr,
    FROM_LIST: tl.constexpr,
    DYN_MASK: tl.constexpr,
    ZERO_V: tl.constexpr,
):
    """Online softmax over key tiles: ``[start, end)`` in steps of ``BLOCK_N``, or (``FROM_LIST``) the
    ``n_listed`` key blocks of ``SPARSE_KV`` keys whose indices start at ``idx_ptr``, flattened into one loop
    of ``BLOCK_N`` tiles so that the software pipeline spans block boundaries (a loop per listed block would
    run one or two iterations and never overlap loads with math). With ``DYN_MASK`` a listed tile pays for
    the element rules only when it reaches outside ``[full_lo, full_hi)``.

    What differs between the calls of one kernel is passed by keyword: ``HAS_MASK_MOD`` (False for
    block-sparse full blocks), ``MASKED``, ``FROM_LIST``, ``DYN_MASK``, ``ZERO_V`` (see :func:`fwd_step`); the
    rest travels in ``kv``, ``sc`` and ``F``."""
    if FROM_LIST:
        TILES: tl.constexpr = F.SPARSE_KV // F.BLOCK_N
        # listed block ids are clamped to the key blocks that exist (garbage ids: garbage out, no stray reads)
        n_kv_blocks = tl.cdiv(sc.seqlen_k, F.SPARSE_KV)
        for t in tl.range(0, n_listed * TILES):
            blk = clamp_index(tl.load(idx_ptr + t // TILES), n_kv_blocks)
            start_n = blk * F.SPARSE_KV + (t % TILES) * F.BLOCK_N
            apply_mask = (start_n < full_lo) | (start_n + F.BLOCK_N > full_hi)
            acc, l_i, m_i = fwd_step(
                acc,
                l_i,
                m_i,
                q,
                kv,
                sc,
                start_n,
                apply_mask,
                0,
                F,
                HAS_MASK_MOD=HAS_MASK_MOD,
                MASKED=MASKED,
                DYN_MASK=DYN_MASK,
                ZERO_V=ZERO_V,
            )
    else:
        # paged descriptor loads: the page of each tile is read one tile ahead (a plain load whose latency the
        # tile's work hides) instead of inside the tile, where the software pipeline would stage it through
        # shared memory; other layouts take no page (0)
        READ_AHEAD: tl.constexpr = F.PAGED and F.USE_TMA
        page_next = 0
        if READ_AHEAD:
            page_next = page_of(kv, start, F.PAGE_SIZE)
        for start_n in tl.range(start, end, F.BLOCK_N):
            page = page_next
            if READ_AHEAD:
                page_next = page_of(kv, start_n + F.BLOCK_N, F.PAGE_SIZE)
            acc, l_i, m_i = fwd_step(
                acc,
                l_i,
                m_i,
                q,
                kv,
                sc,
                start_n,
                True,
                page,
                F,
                HAS_MASK_MOD=HAS_MASK_MOD,
                MASKED=MASKED,
                DYN_MASK=False,
                ZERO_V=ZERO_V,
            )
    return acc, l_i, m_i
