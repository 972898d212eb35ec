"""``@triton.jit`` helpers of the forward kernel: tile loads and the inner loop over key blocks.

:func:`fwd_inner` runs the online softmax over the key blocks ``[start, end)`` of one query block, or over the
blocks a block-sparse mask lists for it, with or without element masks (``MASKED``); :func:`fwd_step` is one
key tile. :func:`fa_core.forward_kernel.fwd_kernel` calls :func:`fwd_inner` once per band segment (left edge,
right edge, then the interior) or once per list (partial blocks, full blocks) of a block-sparse mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.masking import chunk_visible, dropout_keep, score_mod, scores_log2, visible

__all__ = ["fwd_inner", "fwd_step", "load_k_tile", "load_tile", "load_vt_tile"]


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
def fwd_step(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    stride_kn,
    stride_vn,
    stride_vd,
    start_n,
    apply_mask,
    offs_m,
    offs_d,
    offs_dv,
    seqlen_q,
    seqlen_k,
    sm_scale,
    softcap,
    alibi_slope,
    window_left,
    window_right,
    chunk,
    seed,
    rng_offset,
    bh,
    dropout_p,
    off_b,
    off_h,
    score_mod_fn: tl.constexpr,
    mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr,
    HAS_MASK_MOD: tl.constexpr,
    MASKED: tl.constexpr,
    DYN_MASK: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    V_T: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    P_SHIFT: tl.constexpr,
    FUSED_SCALE: tl.constexpr,
):
    """One key tile ``[start_n, start_n + BLOCK_N)`` of the online softmax.

    ``MASKED``: loads are bounds-checked and the element rules applied; with ``DYN_MASK`` the rules are applied
    only where the runtime flag ``apply_mask`` says the tile can cut (block-sparse full blocks).
    ``FUSED_SCALE`` (no softcap / ALiBi / score_mod, ``sm_scale > 0``): the row max is taken over the raw
    ``q @ k^T`` and the scale folds into the exponent's FMA, one multiply per element fewer.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    if USE_TMA:
        # the descriptor zero-fills rows past seqlen_k and columns past HEADDIM
        k = tl.trans(k_desc.load([start_n, 0]))
    else:
        # 64-bit scalar tile base + 32-bit in-tile offsets (hoisted out of the loop): cheap and overflow-free
        k_tile = k_base + tl.cast(start_n, tl.int64) * stride_kn
        k = load_k_tile(k_tile, offs_n0, offs_n, offs_d, stride_kn, seqlen_k, HEADDIM, MASKED, EVEN_D)
    qk = tl.dot(q, k)
    # user score_mod without softcap / ALiBi: natural-log scores straight into the user's function, the log2
    # factor folded into exp2's FMA below (FUSED_SCALE's path), two multiplies per element fewer
    NAT_MOD: tl.constexpr = HAS_SCORE_MOD and not (HAS_SOFTCAP or HAS_ALIBI) and not FUSED_SCALE
    if FUSED_SCALE:
        s = qk
    elif NAT_MOD:
        s = score_mod_fn(qk * sm_scale, off_b, off_h, offs_m[:, None], offs_n[None, :])
    else:
        s = scores_log2(
            qk, offs_m, offs_n, seqlen_q, seqlen_k, sm_scale, softcap, alibi_slope, HAS_SOFTCAP, HAS_ALIBI
        )
        if HAS_SCORE_MOD:
            # user score_mod works on natural-log logits (after scale, softcap and ALiBi)
            s = score_mod(score_mod_fn, s, off_b, off_h, offs_m, offs_n)
    if MASKED:
        if DYN_MASK:
            if apply_mask:
                ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
                if HAS_CHUNK:
                    ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, chunk)
                s = tl.where(ok, s, float("-inf"))
        else:
            ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
            if HAS_CHUNK:
                ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, chunk)
            if HAS_MASK_MOD:
                ok = ok & mask_mod_fn(off_b, off_h, offs_m[:, None], offs_n[None, :])
            s = tl.where(ok, s, float("-inf"))
    if FUSED_SCALE:
        qk_scale = sm_scale * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    elif NAT_MOD:
        qk_scale = 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no visible key yet keeps m = -inf: subtract 0 instead to avoid inf - inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    if P_SHIFT != 0.0:
        # FP8: p in [0, 2^P_SHIFT] uses e4m3's range (max 448) instead of flushing p < 2^-10 to zero;
        # l carries the same factor, so out = acc / l is unchanged (lse subtracts P_SHIFT)
        m_safe = m_safe - P_SHIFT
    if FUSED_SCALE or NAT_MOD:
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if V_T:
        # V stored transposed (headdim, seqlen): the tile (BLOCK_DV, BLOCK_N) is K-major for P @ V,
        # which Hopper's FP8 wgmma requires of its B operand
        if USE_TMA and not IS_VARLEN:
            vt = v_desc.load([0, start_n])
        else:
            vt = load_vt_tile(v_base, offs_n, offs_dv, stride_vd, seqlen_k, HEADDIM_V, MASKED, EVEN_DV)
        v = tl.trans(vt)
    elif USE_TMA:
        v = v_desc.load([start_n, 0])
    else:
        v_ptrs = (v_base + tl.cast(start_n, tl.int64) * stride_vn) + (
            offs_n0[:, None] * stride_vn + offs_dv[None, :]
        )
        v = load_tile(v_ptrs, offs_n, seqlen_k, offs_dv, HEADDIM_V, MASKED, EVEN_DV)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, dropout_p)
        p = tl.where(keep, p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    stride_kn,
    stride_vn,
    stride_vd,
    start,
    end,
    idx_ptr,
    n_listed,
    full_lo,
    full_hi,
    offs_m,
    offs_d,
    offs_dv,
    seqlen_q,
    seqlen_k,
    sm_scale,
    softcap,
    alibi_slope,
    window_left,
    window_right,
    chunk,
    seed,
    rng_offset,
    bh,
    dropout_p,
    off_b,
    off_h,
    score_mod_fn: tl.constexpr,
    mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr,
    HAS_MASK_MOD: tl.constexpr,
    MASKED: tl.constexpr,
    FROM_LIST: tl.constexpr,
    DYN_MASK: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPARSE_KV: tl.constexpr,
    USE_TMA: tl.constexpr,
    V_T: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    P_SHIFT: tl.constexpr,
    FUSED_SCALE: tl.constexpr,
):
    """Online softmax over key tiles: ``[start, end)`` in steps of ``BLOCK_N``, or (``FROM_LIST``) the
    ``n_listed`` key blocks of ``SPARSE_KV`` keys whose indices start at ``idx_ptr``, flattened into one loop
    of ``BLOCK_N`` tiles so that the software pipeline spans block boundaries (a loop per listed block would
    run one or two iterations and never overlap loads with math). With ``DYN_MASK`` a listed tile pays for
    the element rules only when it reaches outside ``[full_lo, full_hi)``."""
    if FROM_LIST:
        TILES: tl.constexpr = SPARSE_KV // BLOCK_N
        for t in tl.range(0, n_listed * TILES):
            start_n = tl.load(idx_ptr + t // TILES) * SPARSE_KV + (t % TILES) * BLOCK_N
            apply_mask = (start_n < full_lo) | (start_n + BLOCK_N > full_hi)
            # fmt: off
            acc, l_i, m_i = fwd_step(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, stride_vd, start_n,
                apply_mask, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, sm_scale, softcap, alibi_slope,
                window_left, window_right, chunk, seed, rng_offset, bh, dropout_p, off_b, off_h, score_mod_fn,
                mask_mod_fn, HAS_SCORE_MOD, HAS_MASK_MOD, MASKED, DYN_MASK, IS_LOCAL, HAS_CHUNK, HAS_SOFTCAP,
                HAS_ALIBI, HAS_DROPOUT, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_N, USE_TMA, V_T, IS_VARLEN,
                P_SHIFT, FUSED_SCALE,
            )
            # fmt: on
    else:
        for start_n in tl.range(start, end, BLOCK_N):
            # fmt: off
            acc, l_i, m_i = fwd_step(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, stride_vd, start_n,
                True, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, sm_scale, softcap, alibi_slope,
                window_left, window_right, chunk, seed, rng_offset, bh, dropout_p, off_b, off_h, score_mod_fn,
                mask_mod_fn, HAS_SCORE_MOD, HAS_MASK_MOD, MASKED, False, IS_LOCAL, HAS_CHUNK, HAS_SOFTCAP,
                HAS_ALIBI, HAS_DROPOUT, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_N, USE_TMA, V_T, IS_VARLEN,
                P_SHIFT, FUSED_SCALE,
            )
            # fmt: on
    return acc, l_i, m_i
