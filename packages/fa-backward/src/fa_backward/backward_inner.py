"""``@triton.jit`` helpers of the backward kernels: tile loads, programmable-attention helpers and the inner
loops (one tile: :func:`_dkdv_step` / :func:`_dq_step`; a range or a block-sparse list of tiles:
:func:`_dkdv_inner` / :func:`_dq_inner`). The kernels that call them are in :mod:`fa_backward.backward_kernel`,
whose docstring has the design (transposed dK/dV tiles, argument swap, programmable attention).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.forward_inner import load_tile
from fa_core.masking import (
    _chunk_start,
    chunk_visible,
    dropout_keep,
    scores_log2,
    softcap_grad,
    visible,
)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# Kernel code keeps Triton's customary compact argument lists (one line per group of strides / flags).
# fmt: off

# ------------------------------------------------------------------------------------------------ tiles
@triton.jit
def _load_vec(ptrs, offs, n, other, CHECK: tl.constexpr):
    if CHECK:
        return tl.load(ptrs, mask=offs < n, other=other)
    return tl.load(ptrs)


@triton.jit
def stream_sources(a_base, b_base, seqlen, stride_a, stride_b, HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, USE_TMA: tl.constexpr):
    """Where a pass's streamed pair of tiles (q / dout in dK/dV, k / v in dQ) comes from: with ``USE_TMA`` tensor
    descriptors over the sequence's rows (no per-element address math in the loop), else the base pointers."""
    if USE_TMA:
        a_src = tl.make_tensor_descriptor(a_base, shape=[seqlen, HEADDIM], strides=[stride_a, 1],
                                          block_shape=[BLOCK, BLOCK_D])
        b_src = tl.make_tensor_descriptor(b_base, shape=[seqlen, HEADDIM_V], strides=[stride_b, 1],
                                          block_shape=[BLOCK, BLOCK_DV])
    else:
        a_src = a_base
        b_src = b_base
    return a_src, b_src


@triton.jit
def _load_streamed(a_src, b_src, start, offs0, offs, seqlen, stride_a, stride_b, offs_d, offs_dv,
                   HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                   EVEN_DV: tl.constexpr, USE_TMA: tl.constexpr):
    """The streamed pair of tiles at row ``start`` (from :func:`stream_sources`)."""
    if USE_TMA:
        # descriptors: rows past seqlen and columns past the head dim read 0
        a = a_src.load([start, 0])
        b = b_src.load([start, 0])
    else:
        # 64-bit tile base (a scalar) + 32-bit offsets inside the tile: loop-invariant, hoisted out of the loop
        a_tile = a_src + tl.cast(start, tl.int64) * stride_a
        b_tile = b_src + tl.cast(start, tl.int64) * stride_b
        a = load_tile(a_tile + offs0[:, None] * stride_a + offs_d[None, :], offs, seqlen, offs_d, HEADDIM, MASKED,
                      EVEN_D)
        b = load_tile(b_tile + offs0[:, None] * stride_b + offs_dv[None, :], offs, seqlen, offs_dv, HEADDIM_V,
                      MASKED, EVEN_DV)
    return a, b


# ------------------------------------------------------------------------------------- programmable
@triton.jit
def _chunk_visible_t(offs_n, offs_m, seqlen_q, seqlen_k, chunk):
    """Transposed :func:`fa_core.masking.chunk_visible`: ``(BLOCK_N keys, BLOCK_M queries)``."""
    start = _chunk_start(offs_m[None, :] + (seqlen_k - seqlen_q), chunk)
    cols = offs_n[:, None]
    return (cols >= start) & (cols < start + chunk)


@triton.jit
def _chunk_q_range(lo, hi, start_n, seqlen_q, seqlen_k, chunk, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Narrow the query rows ``[lo, hi)`` to those whose chunk holds a key of key block ``start_n``
    (query ``i`` lives at key position ``i + seqlen_k - seqlen_q``)."""
    diag = seqlen_k - seqlen_q
    first = _chunk_start(start_n * BLOCK_N, chunk) - diag
    last = _chunk_start(start_n * BLOCK_N + BLOCK_N - 1, chunk) + chunk - diag
    lo = tl.maximum(lo, (tl.maximum(first, 0) // BLOCK_M) * BLOCK_M)
    hi = tl.minimum(hi, last)
    hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _mod_score_only(s2, off_b, off_h, q_idx, kv_idx, score_mod_fn: tl.constexpr):
    """User score_mod on log2-domain scores, for a score_mod whose derivative is 1 (``HAS_SCORE_MOD == 2``)."""
    return score_mod_fn(s2 * LN2, off_b, off_h, q_idx, kv_idx) * LOG2E


@triton.jit
def _mod_scores(s2, off_b, off_h, q_idx, kv_idx, score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr):
    """User score_mod on log2-domain scores: ``(modified s2, d score_mod / d score)`` (natural-log units)."""
    s = s2 * LN2
    return score_mod_fn(s, off_b, off_h, q_idx, kv_idx) * LOG2E, score_grad_fn(s, off_b, off_h, q_idx, kv_idx)


@triton.jit
def _scores(
    qk, offs_r, offs_c, seqlen_r, seqlen_c, q_idx, kv_idx, sm_scale, softcap, alibi_slope, off_b, off_h,
    score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, NAT_MOD: tl.constexpr,
):
    """Scores of a tile ``(rows, cols)`` (the dQ pass: queries x keys; the dK/dV pass: keys x queries, with
    ``q_idx`` / ``kv_idx`` broadcast to match) -> ``(s, dmod)``; ``dmod`` (d score_mod / d score) is meaningful
    only for ``HAS_SCORE_MOD == 1``. ``NAT_MOD`` (a score_mod without softcap / ALiBi): ``s`` in natural-log
    units straight from ``q @ k^T * scale``, the caller folding log2 into exp2's FMA; else in log2 units."""
    if NAT_MOD:
        s = qk * sm_scale
        dmod = s
        if HAS_SCORE_MOD == 1:
            dmod = score_grad_fn(s, off_b, off_h, q_idx, kv_idx)
        s = score_mod_fn(s, off_b, off_h, q_idx, kv_idx)
    else:
        s = scores_log2(qk, offs_r, offs_c, seqlen_r, seqlen_c, sm_scale, softcap, alibi_slope, HAS_SOFTCAP,
                        HAS_ALIBI)
        dmod = s
        if HAS_SCORE_MOD == 1:
            s, dmod = _mod_scores(s, off_b, off_h, q_idx, kv_idx, score_mod_fn, score_grad_fn)
        elif HAS_SCORE_MOD == 2:  # derivative 1 (an additive bias): no dmod tile at all
            s = _mod_score_only(s, off_b, off_h, q_idx, kv_idx, score_mod_fn)
    return s, dmod


# ------------------------------------------------------------------------------------------------ dK/dV
@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
    start_m, apply_mask, offs_n, offs_d, offs_dv, seqlen_q, seqlen_k,
    sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
    seed, rng_offset, bh, dropout_p, off_b, off_h,
    score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr, mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, APPLY_MASK_MOD: tl.constexpr, HAS_CHUNK: tl.constexpr,
    MASKED: tl.constexpr, DYN_MASK: tl.constexpr, IS_LOCAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One query tile ``[start_m, start_m + BLOCK_M)`` of the dK/dV pass. ``MASKED``: bounds-checked loads and
    the element rules on every element; with ``DYN_MASK`` (block-sparse full blocks) the built-in rules only,
    never mask_mod, and only where the runtime flag ``apply_mask`` says the tile can cut."""
    STATIC: tl.constexpr = MASKED and not DYN_MASK
    DYN: tl.constexpr = MASKED and DYN_MASK
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    q, do = _load_streamed(q_base, do_base, start_m, offs_m0, offs_m, seqlen_q, stride_qm, stride_dom, offs_d,
                           offs_dv, HEADDIM, HEADDIM_V, MASKED, EVEN_D, EVEN_DV, USE_TMA)
    # lse in log2 units (written by the dQ pass); ragged query rows get +inf, hence p = 0
    lse2 = _load_vec(lse_base + offs_m, offs_m, seqlen_q, float("inf"), MASKED)
    delta = _load_vec(delta_base + offs_m, offs_m, seqlen_q, 0.0, MASKED)
    # transposed tiles: (BLOCK_N keys, BLOCK_M queries); see the module docstring for the argument swap
    qk_t = tl.dot(k, tl.trans(q))
    # a score_mod without softcap / ALiBi: natural-log scores, log2 folded into exp2's FMA (as the forward)
    NAT_MOD: tl.constexpr = HAS_SCORE_MOD != 0 and not (HAS_SOFTCAP or HAS_ALIBI)
    s_t, dmod_t = _scores(qk_t, offs_n, offs_m, seqlen_k, seqlen_q, offs_m[None, :], offs_n[:, None], sm_scale,
                          softcap, alibi_slope, off_b, off_h, score_mod_fn, score_grad_fn, HAS_SCORE_MOD,
                          HAS_SOFTCAP, HAS_ALIBI, NAT_MOD)
    if STATIC:
        ok_t = visible(offs_n, offs_m, seqlen_k, seqlen_q, window_right, window_left, IS_LOCAL, True)
        if HAS_CHUNK:
            ok_t = ok_t & _chunk_visible_t(offs_n, offs_m, seqlen_q, seqlen_k, chunk)
        if APPLY_MASK_MOD:
            ok_t = ok_t & mask_mod_fn(off_b, off_h, offs_m[None, :], offs_n[:, None])
        s_t = tl.where(ok_t, s_t, float("-inf"))
        if HAS_SCORE_MOD == 1:
            dmod_t = tl.where(ok_t, dmod_t, 0.0)  # a derivative that is not finite off the mask is harmless
    # a row without any visible key has lse = +inf: exp2(s - inf) = 0, so its gradient is 0 (no NaN)
    if NAT_MOD:
        p_t = tl.exp2(s_t * LOG2E - lse2[None, :])
    else:
        p_t = tl.exp2(s_t - lse2[None, :])
    if STATIC:
        # a row with a NaN/Inf lse would give exp2(-inf - nan) = NaN at keys it does not see
        p_t = tl.where(ok_t, p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do))
    if HAS_DROPOUT:
        keep_t = tl.trans(dropout_keep(seed, rng_offset, bh, offs_m, offs_n, dropout_p))
        inv_keep = 1.0 / (1.0 - dropout_p)
        pv_t = tl.where(keep_t, p_t * inv_keep, 0.0)
        dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
    else:
        pv_t = p_t
    if not DYN:
        dv = tl.dot(pv_t.to(do.dtype), do, dv)
    ds_t = p_t * (dp_t - delta[None, :])
    if STATIC:
        ds_t = tl.where(ok_t, ds_t, 0.0)  # 0 * NaN from a NaN row's delta stays out of other keys
    if HAS_SCORE_MOD == 1:
        ds_t = ds_t * dmod_t
    if HAS_SOFTCAP:
        ds_t = ds_t * softcap_grad(qk_t, sm_scale, softcap)
    if DYN:
        # p and dS computed unmasked, then cut by the built-in rules in the tiles that reach out of the band
        if apply_mask:
            ok_t = visible(offs_n, offs_m, seqlen_k, seqlen_q, window_right, window_left, IS_LOCAL, True)
            if HAS_CHUNK:
                ok_t = ok_t & _chunk_visible_t(offs_n, offs_m, seqlen_q, seqlen_k, chunk)
            pv_t = tl.where(ok_t, pv_t, 0.0)
            ds_t = tl.where(ok_t, ds_t, 0.0)
        dv = tl.dot(pv_t.to(do.dtype), do, dv)
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
    start, end, idx_ptr, n_listed, full_lo, full_hi, offs_n, offs_d, offs_dv, seqlen_q, seqlen_k,
    sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
    seed, rng_offset, bh, dropout_p, off_b, off_h,
    score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr, mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, APPLY_MASK_MOD: tl.constexpr, HAS_CHUNK: tl.constexpr,
    MASKED: tl.constexpr, FROM_LIST: tl.constexpr, DYN_MASK: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    SPARSE_Q: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Query tiles ``[start, end)`` in steps of ``BLOCK_M``, or (``FROM_LIST``) the ``n_listed`` query blocks
    of ``SPARSE_Q`` rows whose indices start at ``idx_ptr``, flattened into one loop of tiles so that the
    software pipeline spans block boundaries (as :func:`fa_core.forward_inner.fwd_inner`). With ``DYN_MASK``
    a listed tile pays for the element rules only when it reaches outside ``[full_lo, full_hi)``."""
    if FROM_LIST:
        TILES: tl.constexpr = SPARSE_Q // BLOCK_M
        for t in tl.range(0, n_listed * TILES):
            start_m = tl.load(idx_ptr + t // TILES) * SPARSE_Q + (t % TILES) * BLOCK_M
            apply_mask = (start_m < full_lo) | (start_m + BLOCK_M > full_hi)
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                start_m, apply_mask, offs_n, offs_d, offs_dv, seqlen_q, seqlen_k,
                sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
                seed, rng_offset, bh, dropout_p, off_b, off_h, score_mod_fn, score_grad_fn, mask_mod_fn,
                HAS_SCORE_MOD, APPLY_MASK_MOD, HAS_CHUNK, MASKED, DYN_MASK, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI,
                HAS_DROPOUT, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_M, USE_TMA)
    else:
        for start_m in tl.range(start, end, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                start_m, True, offs_n, offs_d, offs_dv, seqlen_q, seqlen_k,
                sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
                seed, rng_offset, bh, dropout_p, off_b, off_h, score_mod_fn, score_grad_fn, mask_mod_fn,
                HAS_SCORE_MOD, APPLY_MASK_MOD, HAS_CHUNK, MASKED, False, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI,
                HAS_DROPOUT, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_M, USE_TMA)
    return dk, dv


# --------------------------------------------------------------------------------------------------- dQ
@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
    start_n, apply_mask, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
    sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
    seed, rng_offset, bh, dropout_p, off_b, off_h,
    score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr, mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, APPLY_MASK_MOD: tl.constexpr, HAS_CHUNK: tl.constexpr,
    MASKED: tl.constexpr, DYN_MASK: tl.constexpr, IS_LOCAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One key tile ``[start_n, start_n + BLOCK_N)`` of the dQ pass; ``MASKED`` / ``DYN_MASK`` as
    :func:`_dkdv_step`."""
    STATIC: tl.constexpr = MASKED and not DYN_MASK
    DYN: tl.constexpr = MASKED and DYN_MASK
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    k, v = _load_streamed(k_base, v_base, start_n, offs_n0, offs_n, seqlen_k, stride_kn, stride_vn, offs_d, offs_dv,
                          HEADDIM, HEADDIM_V, MASKED, EVEN_D, EVEN_DV, USE_TMA)
    qk = tl.dot(q, tl.trans(k))
    NAT_MOD: tl.constexpr = HAS_SCORE_MOD != 0 and not (HAS_SOFTCAP or HAS_ALIBI)  # as _dkdv_step
    s, dmod = _scores(qk, offs_m, offs_n, seqlen_q, seqlen_k, offs_m[:, None], offs_n[None, :], sm_scale, softcap,
                      alibi_slope, off_b, off_h, score_mod_fn, score_grad_fn, HAS_SCORE_MOD, HAS_SOFTCAP, HAS_ALIBI,
                      NAT_MOD)
    if STATIC:
        ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
        if HAS_CHUNK:
            ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, chunk)
        if APPLY_MASK_MOD:
            ok = ok & mask_mod_fn(off_b, off_h, offs_m[:, None], offs_n[None, :])
        s = tl.where(ok, s, float("-inf"))
        if HAS_SCORE_MOD == 1:
            dmod = tl.where(ok, dmod, 0.0)
    if NAT_MOD:
        p = tl.exp2(s * LOG2E - lse2[:, None])
    else:
        p = tl.exp2(s - lse2[:, None])
    if STATIC:
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    if HAS_DROPOUT:
        keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if STATIC:
        ds = tl.where(ok, ds, 0.0)
    if HAS_SCORE_MOD == 1:
        ds = ds * dmod
    if HAS_SOFTCAP:
        ds = ds * softcap_grad(qk, sm_scale, softcap)
    if DYN:
        if apply_mask:  # dS computed unmasked, then cut by the built-in rules where the tile leaves the band
            ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
            if HAS_CHUNK:
                ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, chunk)
            ds = tl.where(ok, ds, 0.0)
    dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
    start, end, idx_ptr, n_listed, full_lo, full_hi, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
    sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
    seed, rng_offset, bh, dropout_p, off_b, off_h,
    score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr, mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, APPLY_MASK_MOD: tl.constexpr, HAS_CHUNK: tl.constexpr,
    MASKED: tl.constexpr, FROM_LIST: tl.constexpr, DYN_MASK: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE_KV: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Key tiles ``[start, end)``, or (``FROM_LIST``) the ``n_listed`` listed key blocks of ``SPARSE_KV`` keys
    flattened into one loop of tiles; as :func:`_dkdv_inner` with queries and keys exchanged."""
    lse2 = lse * LOG2E
    if FROM_LIST:
        TILES: tl.constexpr = SPARSE_KV // BLOCK_N
        for t in tl.range(0, n_listed * TILES):
            start_n = tl.load(idx_ptr + t // TILES) * SPARSE_KV + (t % TILES) * BLOCK_N
            apply_mask = (start_n < full_lo) | (start_n + BLOCK_N > full_hi)
            dq = _dq_step(
                dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                start_n, apply_mask, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
                seed, rng_offset, bh, dropout_p, off_b, off_h, score_mod_fn, score_grad_fn, mask_mod_fn,
                HAS_SCORE_MOD, APPLY_MASK_MOD, HAS_CHUNK, MASKED, DYN_MASK, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI,
                HAS_DROPOUT, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_N, USE_TMA)
    else:
        for start_n in tl.range(start, end, BLOCK_N):
            dq = _dq_step(
                dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                start_n, True, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                sm_scale, softcap, alibi_slope, window_left, window_right, chunk,
                seed, rng_offset, bh, dropout_p, off_b, off_h, score_mod_fn, score_grad_fn, mask_mod_fn,
                HAS_SCORE_MOD, APPLY_MASK_MOD, HAS_CHUNK, MASKED, False, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI,
                HAS_DROPOUT, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_N, USE_TMA)
    return dq
