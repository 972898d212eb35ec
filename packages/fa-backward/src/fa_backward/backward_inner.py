"""``@triton.jit`` helpers of the backward kernels: tile loads, programmable-attention helpers and the inner
loops (one tile: :func:`_dkdv_step` / :func:`_dq_step`; a range or a block-sparse list of tiles:
:func:`_dkdv_inner` / :func:`_dq_inner`). The kernels that call them are in :mod:`fa_backward.backward_kernel`,
whose docstring has the design (transposed dK/dV tiles, argument swap, programmable attention).

The inner loops and steps take what a kernel holds fixed for all its loops as tuples built by the kernel
(Triton's frontend flattens tuples of runtime values; ``tl.constexpr`` tuples stay compile-time), and what
differs between the loops of one kernel by keyword. ``fixed = (tile, streamed, rules, scoring, dropout)``:

* ``tile``: the program's resident tile and its index vectors: dK/dV ``(k, v, offs_n, offs_d, offs_dv)``, dQ
  ``(q, do, lse, delta, offs_m, offs_d, offs_dv)``;
* ``streamed``: where the other pass's tiles come from (:func:`stream_sources`): dK/dV ``(q_src, do_src,
  stride_qm, stride_dom, lse_base, delta_base)``, dQ ``(k_src, v_src, stride_kn, stride_vn)``;
* ``rules``: ``(seqlen_q, seqlen_k, window_left, window_right, chunk, full_lo, full_hi)``, the element rules
  and the band interior ``[full_lo, full_hi)`` of the tiles that need none;
* ``scoring``: ``(sm_scale, softcap, alibi_slope, off_b, off_h)``; ``dropout``: ``(seed, rng_offset, bh,
  dropout_p)``.

Three constexpr tuples: ``FNS = (score_mod_fn, score_grad_fn, mask_mod_fn)``; ``FLAGS = (HAS_SCORE_MOD,
HAS_MASK_MOD, HAS_CHUNK, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)``; ``SHAPE = (HEADDIM, HEADDIM_V,
EVEN_D, EVEN_DV, BLOCK, SPARSE_BLOCK, USE_TMA)`` with ``BLOCK`` the streamed tile's rows (``BLOCK_M`` in
dK/dV, ``BLOCK_N`` in dQ) and ``SPARSE_BLOCK`` the block mask's block along that axis.

Per loop: ``start`` / ``end`` (a range of tiles), or ``blocks`` / ``n_blocks`` with ``FROM_LIST`` (a list of
block-mask blocks: the pointer to its first index and its length); ``MASKED`` (bounds checks and every
element rule: window / causal, chunk, mask_mod) and ``DYN_MASK`` (block-sparse full blocks: the built-in rules
only, and only in tiles that leave the band interior).

Indices read from tensors (``cu_seqlens_*``, ``seqused_k``, block-list lengths and indices) are clamped
(:func:`checked_seq_bounds`, :func:`checked_list_length`, the list loops): garbage values give garbage
gradients, never an access outside the tensors.
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
    seq_bounds,
    softcap_grad,
    visible,
)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------- indices from tensors
@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def checked_seq_bounds(
    off_b, cu_seqlens_q, cu_seqlens_k, seqused_k, seqlen_q_dense, seqlen_k_dense, IS_VARLEN: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
):  # fmt: skip
    """``(q_start, seqlen_q, k_start, seqlen_k_rows, seqlen_k)`` of sequence ``off_b`` with every value read
    from a tensor clamped, so that garbage there (host value checks off) never moves a load or store outside
    q / k / v and their gradients: starts in ``[0, total]``, ends in ``[start, total]`` (varlen
    ``seqlen_*_dense`` is the total row count of q / k), ``seqused_k`` in ``[0, seqlen_k_rows]``. Scalars,
    once per program. ``seqlen_k``: the keys attended (``seqused_k``); ``seqlen_k_rows``: the keys the
    sequence owns."""
    if IS_VARLEN:
        q_start = _clamp(tl.load(cu_seqlens_q + off_b), 0, seqlen_q_dense)
        q_end = _clamp(tl.load(cu_seqlens_q + off_b + 1), q_start, seqlen_q_dense)
        k_start = _clamp(tl.load(cu_seqlens_k + off_b), 0, seqlen_k_dense)
        k_end = _clamp(tl.load(cu_seqlens_k + off_b + 1), k_start, seqlen_k_dense)
        seqlen_q = q_end - q_start
        seqlen_k_rows = k_end - k_start
    else:
        q_start, seqlen_q, k_start, seqlen_k_rows = seq_bounds(
            off_b, cu_seqlens_q, cu_seqlens_k, seqlen_q_dense, seqlen_k_dense, False
        )
    seqlen_k = seqlen_k_rows
    if HAS_SEQUSED:
        seqlen_k = _clamp(tl.load(seqused_k + off_b), 0, seqlen_k_rows)
    return q_start, seqlen_q, k_start, seqlen_k_rows, seqlen_k


@triton.jit
def checked_list_length(num_ptr, n_cols):
    """A block list's length read from the mask, clamped to ``[0, n_cols]`` (the columns of its index row)."""
    return _clamp(tl.load(num_ptr), 0, n_cols)


# ------------------------------------------------------------------------------------------------ tiles
@triton.jit
def _load_vec(ptrs, offs, n, other, CHECK: tl.constexpr):
    if CHECK:
        return tl.load(ptrs, mask=offs < n, other=other)
    return tl.load(ptrs)


@triton.jit
def _seq_base(ptr, off_b, off_h, start, stride_b, stride_h, stride_row):
    """``ptr`` moved to row ``start`` of batch ``off_b``, head ``off_h`` (64-bit offsets: see docs/design.md)."""
    return (
        ptr + off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_row
    )


@triton.jit
def _load_rows(base, offs, seqlen, stride_row, offs_d, HEADDIM: tl.constexpr, EVEN_D: tl.constexpr):
    """The rows ``offs`` (those < ``seqlen``; others 0) of a ``(rows, HEADDIM)`` matrix at ``base``."""
    ptrs = base + offs[:, None].to(tl.int64) * stride_row + offs_d[None, :]
    return load_tile(ptrs, offs, seqlen, offs_d, HEADDIM, True, EVEN_D)


@triton.jit
def stream_sources(
    a_base,
    b_base,
    seqlen,
    stride_a,
    stride_b,
    SHAPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Where a pass's streamed pair of tiles (q / dout in dK/dV, k / v in dQ) comes from: with ``USE_TMA`` tensor
    descriptors over the sequence's rows (no per-element address math in the loop), else the base pointers."""
    HEADDIM, HEADDIM_V, _EVEN_D, _EVEN_DV, BLOCK, _SPARSE, USE_TMA = SHAPE
    if USE_TMA:
        a_src = tl.make_tensor_descriptor(
            a_base, shape=[seqlen, HEADDIM], strides=[stride_a, 1], block_shape=[BLOCK, BLOCK_D]
        )
        b_src = tl.make_tensor_descriptor(
            b_base, shape=[seqlen, HEADDIM_V], strides=[stride_b, 1], block_shape=[BLOCK, BLOCK_DV]
        )
    else:
        a_src = a_base
        b_src = b_base
    return a_src, b_src


@triton.jit
def _load_streamed(
    src, start, offs0, offs, seqlen, offs_d, offs_dv, SHAPE: tl.constexpr, MASKED: tl.constexpr
):
    """The streamed pair of tiles at row ``start``; ``src = (a_src, b_src, stride_a, stride_b)`` (sources from
    :func:`stream_sources`)."""
    a_src, b_src, stride_a, stride_b = src
    HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, _BLOCK, _SPARSE, USE_TMA = SHAPE
    if USE_TMA:
        # descriptors: rows past seqlen and columns past the head dim read 0
        a = a_src.load([start, 0])
        b = b_src.load([start, 0])
    else:
        # 64-bit tile base (a scalar) + 32-bit offsets inside the tile: loop-invariant, hoisted out of the loop
        a_tile = a_src + tl.cast(start, tl.int64) * stride_a
        b_tile = b_src + tl.cast(start, tl.int64) * stride_b
        a_ptrs = a_tile + offs0[:, None] * stride_a + offs_d[None, :]
        a = load_tile(a_ptrs, offs, seqlen, offs_d, HEADDIM, MASKED, EVEN_D)
        b_ptrs = b_tile + offs0[:, None] * stride_b + offs_dv[None, :]
        b = load_tile(b_ptrs, offs, seqlen, offs_dv, HEADDIM_V, MASKED, EVEN_DV)
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
    qk, offs_r, offs_c, seqlen_r, seqlen_c, q_idx, kv_idx, scoring, FNS: tl.constexpr, FLAGS: tl.constexpr
):
    """Scores of a tile ``(rows, cols)`` (the dQ pass: queries x keys; the dK/dV pass: keys x queries, with
    ``q_idx`` / ``kv_idx`` broadcast to match) -> ``(s, dmod)``; ``dmod`` (d score_mod / d score) is meaningful
    only for ``HAS_SCORE_MOD == 1``. A score_mod without softcap / ALiBi: ``s`` in natural-log units straight
    from ``q @ k^T * scale``, the caller folding log2 into exp2's FMA; else in log2 units."""
    sm_scale, softcap, alibi_slope, off_b, off_h = scoring
    score_mod_fn, score_grad_fn, _mask_mod_fn = FNS
    HAS_SCORE_MOD, _HAS_MASK_MOD, _HAS_CHUNK, _IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, _HAS_DROPOUT = FLAGS
    NAT_MOD: tl.constexpr = HAS_SCORE_MOD != 0 and not (HAS_SOFTCAP or HAS_ALIBI)
    if NAT_MOD:
        s = qk * sm_scale
        dmod = s
        if HAS_SCORE_MOD == 1:
            dmod = score_grad_fn(s, off_b, off_h, q_idx, kv_idx)
        s = score_mod_fn(s, off_b, off_h, q_idx, kv_idx)
    else:
        s = scores_log2(
            qk, offs_r, offs_c, seqlen_r, seqlen_c, sm_scale, softcap, alibi_slope, HAS_SOFTCAP, HAS_ALIBI
        )
        dmod = s
        if HAS_SCORE_MOD == 1:
            s, dmod = _mod_scores(s, off_b, off_h, q_idx, kv_idx, score_mod_fn, score_grad_fn)
        elif HAS_SCORE_MOD == 2:  # derivative 1 (an additive bias): no dmod tile at all
            s = _mod_score_only(s, off_b, off_h, q_idx, kv_idx, score_mod_fn)
    return s, dmod


# ------------------------------------------------------------------------------------------------ dK/dV
@triton.jit
def _dkdv_step(
    dk,
    dv,
    fixed,
    FNS: tl.constexpr,
    FLAGS: tl.constexpr,
    SHAPE: tl.constexpr,
    start_m,
    apply_mask,
    MASKED: tl.constexpr,
    DYN_MASK: tl.constexpr,
):
    """One query tile ``[start_m, start_m + BLOCK_M)`` of the dK/dV pass. ``MASKED``: bounds-checked loads and
    the element rules on every element; with ``DYN_MASK`` (block-sparse full blocks) the built-in rules only,
    never mask_mod, and only where the runtime flag ``apply_mask`` says the tile can cut."""
    tile, streamed, rules, scoring, dropout = fixed
    k, v, offs_n, offs_d, offs_dv = tile
    q_src, do_src, stride_qm, stride_dom, lse_base, delta_base = streamed
    seqlen_q, seqlen_k, window_left, window_right, chunk, _full_lo, _full_hi = rules
    sm_scale, softcap, alibi_slope, off_b, off_h = scoring
    seed, rng_offset, bh, dropout_p = dropout
    _score_mod_fn, _score_grad_fn, mask_mod_fn = FNS
    HAS_SCORE_MOD, HAS_MASK_MOD, HAS_CHUNK, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT = FLAGS
    _HEADDIM, _HEADDIM_V, _EVEN_D, _EVEN_DV, BLOCK_M, _SPARSE_Q, _USE_TMA = SHAPE
    STATIC: tl.constexpr = MASKED and not DYN_MASK
    DYN: tl.constexpr = MASKED and DYN_MASK
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    q_pair = (q_src, do_src, stride_qm, stride_dom)
    q, do = _load_streamed(q_pair, start_m, offs_m0, offs_m, seqlen_q, offs_d, offs_dv, SHAPE, MASKED)
    # lse in log2 units (written by the dQ pass); ragged query rows get +inf, hence p = 0
    lse2 = _load_vec(lse_base + offs_m, offs_m, seqlen_q, float("inf"), MASKED)
    delta = _load_vec(delta_base + offs_m, offs_m, seqlen_q, 0.0, MASKED)
    # transposed tiles: (BLOCK_N keys, BLOCK_M queries); see the module docstring for the argument swap
    qk_t = tl.dot(k, tl.trans(q))
    # a score_mod without softcap / ALiBi: natural-log scores, log2 folded into exp2's FMA (as the forward)
    NAT_MOD: tl.constexpr = HAS_SCORE_MOD != 0 and not (HAS_SOFTCAP or HAS_ALIBI)
    s_t, dmod_t = _scores(
        qk_t, offs_n, offs_m, seqlen_k, seqlen_q, offs_m[None, :], offs_n[:, None], scoring, FNS, FLAGS
    )
    if STATIC:
        ok_t = visible(offs_n, offs_m, seqlen_k, seqlen_q, window_right, window_left, IS_LOCAL, True)
        if HAS_CHUNK:
            ok_t = ok_t & _chunk_visible_t(offs_n, offs_m, seqlen_q, seqlen_k, chunk)
        if HAS_MASK_MOD:
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
    dk,
    dv,
    fixed,
    FNS: tl.constexpr,
    FLAGS: tl.constexpr,
    SHAPE: tl.constexpr,
    start=0,
    end=0,
    blocks=None,
    n_blocks=0,
    MASKED: tl.constexpr = False,
    FROM_LIST: tl.constexpr = False,
    DYN_MASK: tl.constexpr = False,
):
    """Query tiles ``[start, end)`` in steps of ``BLOCK_M``, or (``FROM_LIST``) the ``n_blocks`` query blocks
    of ``SPARSE_Q`` rows whose indices start at ``blocks``, flattened into one loop of tiles so that the
    software pipeline spans block boundaries (as :func:`fa_core.forward_inner.fwd_inner`). With ``DYN_MASK``
    a listed tile pays for the element rules only when it reaches outside ``[full_lo, full_hi)``."""
    _HEADDIM, _HEADDIM_V, _EVEN_D, _EVEN_DV, BLOCK_M, SPARSE_Q, _USE_TMA = SHAPE
    if FROM_LIST:
        _tile, _streamed, rules, _scoring, _dropout = fixed
        seqlen_q, _seqlen_k, _left, _right, _chunk, full_lo, full_hi = rules
        TILES: tl.constexpr = SPARSE_Q // BLOCK_M
        # listed indices come from a tensor: clamped to the sequence's blocks (garbage reads no other rows)
        last = tl.maximum(tl.cdiv(seqlen_q, SPARSE_Q) - 1, 0)
        for t in tl.range(0, n_blocks * TILES):
            start_m = _clamp(tl.load(blocks + t // TILES), 0, last) * SPARSE_Q + (t % TILES) * BLOCK_M
            apply_mask = (start_m < full_lo) | (start_m + BLOCK_M > full_hi)
            dk, dv = _dkdv_step(
                dk, dv, fixed, FNS, FLAGS, SHAPE, start_m, apply_mask, MASKED=MASKED, DYN_MASK=DYN_MASK
            )
    else:
        for start_m in tl.range(start, end, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, fixed, FNS, FLAGS, SHAPE, start_m, True, MASKED=MASKED, DYN_MASK=False
            )
    return dk, dv


# --------------------------------------------------------------------------------------------------- dQ
@triton.jit
def _dq_step(
    dq,
    fixed,
    FNS: tl.constexpr,
    FLAGS: tl.constexpr,
    SHAPE: tl.constexpr,
    start_n,
    apply_mask,
    MASKED: tl.constexpr,
    DYN_MASK: tl.constexpr,
):
    """One key tile ``[start_n, start_n + BLOCK_N)`` of the dQ pass; ``MASKED`` / ``DYN_MASK`` as
    :func:`_dkdv_step`. ``tile`` holds the lse in log2 units (see :func:`_dq_inner`)."""
    tile, streamed, rules, scoring, dropout = fixed
    q, do, lse2, delta, offs_m, offs_d, offs_dv = tile
    seqlen_q, seqlen_k, window_left, window_right, chunk, _full_lo, _full_hi = rules
    sm_scale, softcap, _alibi_slope, off_b, off_h = scoring
    seed, rng_offset, bh, dropout_p = dropout
    _score_mod_fn, _score_grad_fn, mask_mod_fn = FNS
    HAS_SCORE_MOD, HAS_MASK_MOD, HAS_CHUNK, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT = FLAGS
    _HEADDIM, _HEADDIM_V, _EVEN_D, _EVEN_DV, BLOCK_N, _SPARSE_KV, _USE_TMA = SHAPE
    STATIC: tl.constexpr = MASKED and not DYN_MASK
    DYN: tl.constexpr = MASKED and DYN_MASK
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    k, v = _load_streamed(streamed, start_n, offs_n0, offs_n, seqlen_k, offs_d, offs_dv, SHAPE, MASKED)
    qk = tl.dot(q, tl.trans(k))
    NAT_MOD: tl.constexpr = HAS_SCORE_MOD != 0 and not (HAS_SOFTCAP or HAS_ALIBI)  # as _dkdv_step
    s, dmod = _scores(
        qk, offs_m, offs_n, seqlen_q, seqlen_k, offs_m[:, None], offs_n[None, :], scoring, FNS, FLAGS
    )
    if STATIC:
        ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
        if HAS_CHUNK:
            ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, chunk)
        if HAS_MASK_MOD:
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
    dq,
    fixed,
    FNS: tl.constexpr,
    FLAGS: tl.constexpr,
    SHAPE: tl.constexpr,
    start=0,
    end=0,
    blocks=None,
    n_blocks=0,
    MASKED: tl.constexpr = False,
    FROM_LIST: tl.constexpr = False,
    DYN_MASK: tl.constexpr = False,
):
    """Key tiles ``[start, end)``, or (``FROM_LIST``) the ``n_blocks`` listed key blocks of ``SPARSE_KV`` keys
    flattened into one loop of tiles; as :func:`_dkdv_inner` with queries and keys exchanged."""
    tile, streamed, rules, scoring, dropout = fixed
    q, do, lse, delta, offs_m, offs_d, offs_dv = tile
    _HEADDIM, _HEADDIM_V, _EVEN_D, _EVEN_DV, BLOCK_N, SPARSE_KV, _USE_TMA = SHAPE
    # the steps take the lse in log2 units
    fixed2 = ((q, do, lse * LOG2E, delta, offs_m, offs_d, offs_dv), streamed, rules, scoring, dropout)
    if FROM_LIST:
        _seqlen_q, seqlen_k, _left, _right, _chunk, full_lo, full_hi = rules
        TILES: tl.constexpr = SPARSE_KV // BLOCK_N
        last = tl.maximum(tl.cdiv(seqlen_k, SPARSE_KV) - 1, 0)  # as in _dkdv_inner
        for t in tl.range(0, n_blocks * TILES):
            start_n = _clamp(tl.load(blocks + t // TILES), 0, last) * SPARSE_KV + (t % TILES) * BLOCK_N
            apply_mask = (start_n < full_lo) | (start_n + BLOCK_N > full_hi)
            dq = _dq_step(
                dq, fixed2, FNS, FLAGS, SHAPE, start_n, apply_mask, MASKED=MASKED, DYN_MASK=DYN_MASK
            )
    else:
        for start_n in tl.range(start, end, BLOCK_N):
            dq = _dq_step(dq, fixed2, FNS, FLAGS, SHAPE, start_n, True, MASKED=MASKED, DYN_MASK=False)
    return dq
