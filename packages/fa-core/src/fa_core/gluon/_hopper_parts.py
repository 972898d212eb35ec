"""Building blocks of the Hopper (sm_90) Gluon attention kernels (:mod:`fa_core.gluon._hopper`, and the backward
passes :mod:`fa_backward.gluon_dq` / :mod:`fa_backward.gluon_dkdv`): the key-tile ranges of a query tile, the
log2-domain softmax step, TMA loads of K / V (dense or through a paged cache's block table), the overlapped
consumer loop, the epilogue, the per-sequence descriptors of varlen calls, and the wgmma / shared-memory
layouts. The conventions (log2-domain scores, visibility, masked edges) are stated in :mod:`fa_core.gluon._hopper`.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _tile_range(
    m0,
    seqlen_k,
    diag,
    left,
    right,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    WINDOW: gl.constexpr,
):
    """Key tiles of query rows [m0, m0 + BLOCK_M) as ``(lo, full_lo, full_hi, hi)``: tiles [lo, hi) hold
    every visible key, tiles [full_lo, full_hi) are visible to every row (no mask), lo <= full_lo <= full_hi
    <= hi."""
    if WINDOW:
        key_lo = gl.maximum(m0 + diag - left, 0)
        key_hi = gl.minimum(seqlen_k, gl.maximum(m0 + BLOCK_M + diag + right, 0))
        lo = key_lo // BLOCK_N
        hi = gl.maximum((key_hi + BLOCK_N - 1) // BLOCK_N, lo)
        full_lo = gl.maximum(m0 + BLOCK_M - 1 + diag - left, 0)
        full_lo = gl.minimum(gl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N, lo), hi)
        full_hi = gl.minimum(gl.maximum(m0 + diag + right + 1, 0), seqlen_k) // BLOCK_N
        full_hi = gl.minimum(gl.maximum(full_hi, full_lo), hi)
    elif CAUSAL:
        lo = 0
        full_lo = 0
        key_hi = gl.minimum(seqlen_k, gl.maximum(m0 + BLOCK_M + diag, 0))
        hi = (key_hi + BLOCK_N - 1) // BLOCK_N
        full_hi = gl.minimum(gl.maximum(m0 + diag + 1, 0), seqlen_k) // BLOCK_N
    else:
        lo = 0
        full_lo = 0
        hi = (seqlen_k + BLOCK_N - 1) // BLOCK_N
        full_hi = seqlen_k // BLOCK_N
    return lo, full_lo, full_hi, hi


@gluon.jit
def _tanh(x):
    # tanh through exp2 (one MUFU op + a division): accurate to a few fp32 ulps, unlike tanh.approx.f32
    e = gl.exp2(x * 2.8853900817779268)
    return 1.0 - 2.0 / (e + 1.0)


@gluon.jit
def _qk_softmax(
    s,
    m_i,
    l_i,
    n0,
    rows,
    sp,
    s_layout: gl.constexpr,
    BLOCK_N: gl.constexpr,
    MASK: gl.constexpr,
    CAUSAL: gl.constexpr,
    WINDOW: gl.constexpr,
    SOFTCAP: gl.constexpr,
):
    """Online softmax of one raw score tile ``s = q @ k^T`` (fp32, ``s_layout``) for key columns
    [n0, n0 + BLOCK_N). ``sp`` = (qk_scale, softcap_in, seqlen_k, diag, left, right).

    Returns ``p`` (fp32, un-normalised), ``alpha`` (rescale of the previous accumulator), the new running max
    ``m_i`` (log2 units, -inf while a row has seen no key) and the new running sum ``l_i``. The max is taken on
    the raw (or tanh-capped) scores, which needs ``qk_scale > 0``.
    """
    qk_scale, softcap_in, seqlen_k, diag, left, right = sp
    if SOFTCAP:
        s = _tanh(s * softcap_in)
    if MASK:
        cols = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        keep = cols < seqlen_k
        if WINDOW:
            rel = cols - gl.expand_dims(rows, 1) - diag
            keep = keep & (rel <= right) & (rel >= -left)
        elif CAUSAL:
            keep = keep & (cols <= gl.expand_dims(rows, 1) + diag)
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if MASK:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _as4d(smem, desc):
    """View a 2-D ``[rows, headdim]`` tile as the descriptor's rank-4 ``[1, rows, 1, headdim]`` block."""
    return smem._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, tile, slot, b, hk, pg, PAGE: gl.constexpr):
    """TMA K and V of key tile ``tile`` into ring slot ``slot`` (each on its own barrier); ``PAGE > 0``: from a
    paged cache through the block table (see :func:`_load_kv_paged`)."""
    kb = k_bars.index(slot)
    vb = v_bars.index(slot)
    if PAGE == 0:
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
        mbarrier.expect(kb, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            k_desc, [b, tile * BLOCK_N, hk, 0], kb, _as4d(k_smem.index(slot), k_desc)
        )
        mbarrier.expect(vb, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            v_desc, [b, tile * BLOCK_N, hk, 0], vb, _as4d(v_smem.index(slot), v_desc)
        )
    else:
        _load_kv_paged(k_desc, v_desc, k_smem, v_smem, kb, vb, tile, slot, hk, pg, PAGE)


@gluon.jit
def _page_of(table, lp, max_pages, num_pages):
    """The cache page of logical page ``lp`` of a sequence (``table``: its block-table row), both clamped: a
    garbage table gives garbage rows, never a read outside the table or the cache."""
    lp = gl.minimum(gl.maximum(lp, 0), max_pages - 1)
    return gl.minimum(gl.maximum(gl.load(table + lp), 0), num_pages - 1)


@gluon.jit
def _load_kv_paged(k_desc, v_desc, k_smem, v_smem, kb, vb, tile, slot, hk, pg, PAGE: gl.constexpr):
    """K and V of key tile ``tile`` from a paged cache into ring slot ``slot`` (see :func:`_load_paged`)."""
    rows = _page_rows(pg, tile, k_smem.shape[1], k_desc.block_type.shape[1], PAGE)
    _load_paged(k_desc, k_smem, kb, rows, tile, slot, hk, pg, PAGE, False)
    _load_paged(v_desc, v_smem, vb, rows, tile, slot, hk, pg, PAGE, True)


@gluon.jit
def _page_rows(pg, tile, BLOCK_N: gl.constexpr, ROWS: gl.constexpr, PAGE: gl.constexpr):
    """The cache rows of key tile ``tile``: ``PAGE >= BLOCK_N``, the row of its first key (a scalar);
    below, the first row of each of its ``BLOCK_N / PAGE`` pages, as one vector load of the block-table
    entries (every thread holds all of them; :func:`_load_paged` picks them out)."""
    table, max_pages, num_pages, last_lp, vt_desc = pg
    NPG: gl.constexpr = BLOCK_N // ROWS
    if NPG == 1:
        key0 = tile * BLOCK_N
        return _page_of(table, key0 // PAGE, max_pages, num_pages) * PAGE + key0 % PAGE
    else:
        rows = (_page_of(table, tile * NPG, max_pages, num_pages) * PAGE,)
        for i in gl.static_range(1, NPG):
            rows = rows + (_page_of(table, tile * NPG + i, max_pages, num_pages) * PAGE,)  # type: ignore[assignment]
        return rows


@gluon.jit
def _load_paged(desc, smem, bar, rows, tile, slot, hk, pg, PAGE: gl.constexpr, IS_V: gl.constexpr):
    """TMA one operand (K, or V with ``IS_V``) of key tile ``tile`` from a paged cache into ring slot
    ``slot``; ``rows`` from :func:`_page_rows`. The descriptors cover the whole cache as rows ``(1,
    num_pages * PAGE, nheads_k, d)`` with blocks of ``ROWS = min(PAGE, BLOCK_N)`` rows.

    ``PAGE >= BLOCK_N``: one load per tile (a tile lies in one page). ``PAGE < BLOCK_N``: ``BLOCK_N / PAGE``
    page loads per tile, each split by hand into ``HEAD_DIM / BOX_D`` column chunks of 128 bytes (the ring
    slot is column-chunk major under the 128-byte swizzle, so a row slice of it is not one TMA destination).
    One barrier expects the whole tile. ``pg`` = (block-table row, max_pages, num_pages, last logical page,
    tail descriptor): V of the sequence's last page (and anything past it) comes through the tail descriptor,
    which ends at the sequence's last key, so TMA zero-fills the rows past the end (unused cache rows may hold
    NaN / Inf, and 0 * NaN in P @ V would poison the row). K needs no such care: the scores of those columns
    are masked to -inf before any use.
    """
    table, max_pages, num_pages, last_lp, vt_desc = pg
    BLOCK_N: gl.constexpr = smem.shape[1]
    HEAD_DIM: gl.constexpr = smem.shape[2]
    ROWS: gl.constexpr = desc.block_type.shape[1]
    BOX_D: gl.constexpr = desc.block_type.shape[3]
    NPG: gl.constexpr = BLOCK_N // ROWS
    NCH: gl.constexpr = HEAD_DIM // BOX_D
    mbarrier.expect(bar, desc.block_type.nbytes * NPG * NCH)
    if NPG == 1:
        dst = _as4d(smem.index(slot), desc)
        lp = tile * BLOCK_N // PAGE
        if IS_V and lp >= last_lp:
            tma.async_copy_global_to_shared(vt_desc, [0, tile * BLOCK_N - last_lp * PAGE, hk, 0], bar, dst)
        else:
            tma.async_copy_global_to_shared(desc, [0, rows, hk, 0], bar, dst)
    else:
        STAGES: gl.constexpr = smem.shape[0]
        parts = smem._reinterpret(smem.dtype, [STAGES * NCH * NPG, ROWS, BOX_D], smem.layout)
        for i in gl.static_range(NPG):
            lp = tile * NPG + i
            row = rows[i]
            for c in gl.static_range(NCH):
                dst = _as4d(parts.index((slot * NCH + c) * NPG + i), desc)
                if IS_V and lp >= last_lp:
                    tma.async_copy_global_to_shared(
                        vt_desc, [0, (lp - last_lp) * PAGE, hk, c * BOX_D], bar, dst
                    )
                else:
                    tma.async_copy_global_to_shared(desc, [0, row, hk, c * BOX_D], bar, dst)


@gluon.jit
def _epilogue(
    acc,
    m_i,
    l_i,
    o_smem,
    o_desc,
    lse_ptr,
    bc,
    lse_off,
    h,
    m0,
    seqlen_q,
    stride_lh,
    o_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
):
    """Normalise O, store it through shared memory + TMA (rows past seqlen_q are clipped) and store the lse
    at ``lse_ptr + lse_off + h * stride_lh + row``. ``bc``: the batch coordinate of the descriptors."""
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
    o = acc * gl.expand_dims(inv, 1)
    if m0 < seqlen_q:  # (a varlen tile past its sequence's end stores nothing)
        o_smem.store(o.to(o_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [bc, m0, h, 0], _as4d(o_smem, o_desc))
    # lse in natural-log units; +inf where no key was visible
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    rows = m0 + gl.arange(0, BLOCK_M, layout=lse.type.layout)
    gl.store(lse_ptr + lse_off + h.to(gl.int64) * stride_lh + rows, lse, mask=rows < seqlen_q)
    tma.store_wait(0)


@gluon.jit
def _consume_tiles(
    q_smem,
    k_smem,
    v_smem,
    bars,
    k_desc,
    v_desc,
    b,
    hk,
    pg,
    m0,
    sp,
    tiles,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    WINDOW: gl.constexpr,
    SOFTCAP: gl.constexpr,
    PRODUCER: gl.constexpr,
    ME: gl.constexpr,
    PINGPONG: gl.constexpr,
    NCONS: gl.constexpr,
    PAGE: gl.constexpr,
):
    """The overlapped QK^T / softmax / PV loop over key tiles [lo, hi) for the query tile in ``q_smem``.

    ``bars`` = (k_bars, v_bars, free_bars, turn_bars); ``tiles`` = (lo, full_lo, full_hi, hi) from
    :func:`_tile_range`; ring slot and barrier phase of tile j follow r = j - lo.
    ``PRODUCER=True``: this warp group also refills the ring (tile r - 1 + STAGES once PV(r - 1) finished).
    ``PRODUCER=False``: a separate producer refills it; this group arrives on ``free_bars[slot]`` instead.
    ``PINGPONG=True`` (``NCONS`` consumer warpgroups, this one ``ME``): each batch of wgmma issues waits for
    this group's turn on ``turn_bars[ME]`` and then hands the turn to group ``(ME + 1) % NCONS``.
    Returns (acc, m_i, l_i) with acc in ``o_layout`` and m_i, l_i in ``SliceLayout(1, s_layout)``.
    """
    k_bars, v_bars, free_bars, turn_bars = bars
    lo, full_lo, full_hi, hi = tiles
    dtype: gl.constexpr = q_smem.dtype
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    n_total = hi - lo

    if n_total > 0:
        # the first tile (always through the masked path: it may be the only one)
        mbarrier.wait(k_bars.index(0), 0)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(ME), 0)
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index((ME + 1) % NCONS), count=1)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        p, alpha, m_i, l_i = _qk_softmax(
            s, m_i, l_i, lo * BLOCK_N, rows, sp, s_layout, BLOCK_N, True, CAUSAL, WINDOW, SOFTCAP
        )
        p_prev = gl.convert_layout(p.to(dtype), p_layout)
        # masked left edge (sliding window only), unmasked interior, masked right edge
        if WINDOW:
            for j in range(lo + 1, full_lo):
                acc, m_i, l_i, p_prev = _overlapped_step(
                    j, lo, acc, m_i, l_i, p_prev, q_smem, k_smem, v_smem, bars, k_desc, v_desc, b, hk, pg, sp,
                    rows, n_total, s_zero, s_layout, o_layout, p_layout, BLOCK_N, STAGES, True, CAUSAL, WINDOW,
                    SOFTCAP, PRODUCER, ME, PINGPONG, NCONS, PAGE,
                )  # fmt: skip
        for j in range(gl.maximum(full_lo, lo + 1), full_hi):
            acc, m_i, l_i, p_prev = _overlapped_step(
                j, lo, acc, m_i, l_i, p_prev, q_smem, k_smem, v_smem, bars, k_desc, v_desc, b, hk, pg, sp,
                rows, n_total, s_zero, s_layout, o_layout, p_layout, BLOCK_N, STAGES, False, CAUSAL, WINDOW,
                SOFTCAP, PRODUCER, ME, PINGPONG, NCONS, PAGE,
            )  # fmt: skip
        for j in range(gl.maximum(full_hi, lo + 1), hi):
            acc, m_i, l_i, p_prev = _overlapped_step(
                j, lo, acc, m_i, l_i, p_prev, q_smem, k_smem, v_smem, bars, k_desc, v_desc, b, hk, pg, sp,
                rows, n_total, s_zero, s_layout, o_layout, p_layout, BLOCK_N, STAGES, True, CAUSAL, WINDOW,
                SOFTCAP, PRODUCER, ME, PINGPONG, NCONS, PAGE,
            )  # fmt: skip
        # the last PV
        last = n_total - 1
        mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(ME), n_total & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(last % STAGES), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index((ME + 1) % NCONS), count=1)
        acc, p_prev = warpgroup_mma_wait(0, deps=(acc_tok, p_prev))
        if not PRODUCER:
            mbarrier.arrive(free_bars.index(last % STAGES), count=1)
    return acc, m_i, l_i


@gluon.jit
def _overlapped_step(
    j,
    lo,
    acc,
    m_i,
    l_i,
    p_prev,
    q_smem,
    k_smem,
    v_smem,
    bars,
    k_desc,
    v_desc,
    b,
    hk,
    pg,
    sp,
    rows,
    n_total,
    s_zero,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
    p_layout: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    MASK: gl.constexpr,
    CAUSAL: gl.constexpr,
    WINDOW: gl.constexpr,
    SOFTCAP: gl.constexpr,
    PRODUCER: gl.constexpr,
    ME: gl.constexpr,
    PINGPONG: gl.constexpr,
    NCONS: gl.constexpr,
    PAGE: gl.constexpr,
):
    """Issue QK^T(j) and PV(j - 1) asynchronously, softmax tile j while PV(j - 1) runs, then rescale O."""
    k_bars, v_bars, free_bars, turn_bars = bars
    dtype: gl.constexpr = q_smem.dtype
    r = j - lo
    slot = r % STAGES
    prev = (r - 1) % STAGES
    mbarrier.wait(k_bars.index(slot), (r // STAGES) & 1)
    mbarrier.wait(v_bars.index(prev), ((r - 1) // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn_bars.index(ME), r & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc_tok = warpgroup_mma(p_prev, v_smem.index(prev), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index((ME + 1) % NCONS), count=1)
    t = r - 1 + STAGES
    if PRODUCER and PAGE > 0:
        # paged: the block-table look-up and the K half of the refill run under the wgmma (K of tile r - 1
        # was consumed by the previous step's QK^T); V waits for PV(j - 1) below
        page_rows = _page_rows(pg, lo + t, BLOCK_N, k_desc.block_type.shape[1], PAGE)
        if t < n_total:
            _load_paged(k_desc, k_smem, k_bars.index(prev), page_rows, lo + t, prev, hk, pg, PAGE, False)
    s = warpgroup_mma_wait(1, deps=(s_tok,))
    p, alpha, m_i, l_i = _qk_softmax(
        s, m_i, l_i, j * BLOCK_N, rows, sp, s_layout, BLOCK_N, MASK, CAUSAL, WINDOW, SOFTCAP
    )
    p_next = gl.convert_layout(p.to(dtype), p_layout)
    acc, p_prev = warpgroup_mma_wait(0, deps=(acc_tok, p_prev))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    # tile r - 1 is fully consumed: its slot can be refilled
    if PRODUCER:
        if t < n_total:
            if PAGE > 0:
                _load_paged(v_desc, v_smem, v_bars.index(prev), page_rows, lo + t, prev, hk, pg, PAGE, True)
            else:
                _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, lo + t, prev, b, hk, pg, PAGE)
    else:
        mbarrier.arrive(free_bars.index(prev), count=1)
    return acc, m_i, l_i, p_next


@gluon.jit
def _seq_desc(ptr, start, seqlen, nheads, stride_s, stride_h, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    """On-device rank-4 descriptor ``[1, seqlen, nheads, HEAD_DIM]`` over one packed (varlen) sequence: TMA
    zero-fills reads and clips writes at the sequence's end, exactly as the dense descriptors do at seqlen."""
    layout: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=128, element_bitwidth=ptr.dtype.element_ty.primitive_bitwidth, rank=4
    )
    return tma.make_tensor_descriptor(
        ptr + start.to(gl.int64) * stride_s,
        [1, gl.maximum(seqlen, 1), nheads, HEAD_DIM],
        [stride_s, stride_s, stride_h, 1],
        [1, ROWS, 1, HEAD_DIM],
        layout,
    )


@gluon.jit
def _problem(
    q_arg,
    k_arg,
    v_arg,
    o_arg,
    b,
    seqlen_q,
    seqlen_k,
    stride_lb,
    vl,
    pa,
    ROWS_Q: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    VARLEN: gl.constexpr,
    PAGE: gl.constexpr,
    SEQUSED: gl.constexpr,
):
    """(q, k, v, o descriptors, seqlen_q, seqlen_k, batch coordinate, lse offset, paging state) of batch
    entry ``b``.

    Dense: the host descriptors over ``(batch, seqlen, nheads, headdim)``, coordinate ``b``, lse offset
    ``b * stride_lb``. Varlen (``vl`` = (cu_seqlens_q, cu_seqlens_k, q/k/v/o sequence and head strides,
    nheads, nheads_k, total_q, total_k), ``*_arg`` base pointers of ``(total, nheads, headdim)`` tensors):
    one descriptor per sequence, coordinate 0, lse offset ``cu_seqlens_q[b]`` (lse ``(nheads, total_q)``).
    Paged varlen (``PAGE > 0``; ``k_arg``, ``v_arg`` host descriptors over the whole cache as rows ``(1,
    num_pages * PAGE, nheads_k, headdim)``; ``pa`` = (block_table, its row stride, max_pages, num_pages,
    seqused_k, v base pointer): the key length is ``seqused_k[b]`` (``SEQUSED``) or ``cu_seqlens_k[b + 1] -
    cu_seqlens_k[b]``, clamped to ``[0, max_pages * PAGE]``; the paging state is :func:`_load_kv_paged`'s.
    Without paging the state is ``pa`` itself (unused).
    """
    if VARLEN:
        cu_q, cu_k, sqs, sqh, sks, skh, svs, svh, sos, soh, nheads, nheads_k, total_q, total_k = vl
        # clamped: garbage offsets give garbage rows, never an access outside q, k, v, out
        q_start = gl.minimum(gl.maximum(gl.load(cu_q + b), 0), total_q)
        seqlen_q = gl.minimum(gl.maximum(gl.load(cu_q + b + 1), q_start), total_q) - q_start
        q_desc = _seq_desc(q_arg, q_start, seqlen_q, nheads, sqs, sqh, ROWS_Q, HEAD_DIM)
        o_desc = _seq_desc(o_arg, q_start, seqlen_q, nheads, sos, soh, ROWS_Q, HEAD_DIM)
        if PAGE > 0:
            table, stride_bt, max_pages, num_pages, seqused, v_ptr = pa
            if SEQUSED:
                seqlen_k = gl.load(seqused + b)
            else:
                seqlen_k = gl.load(cu_k + b + 1) - gl.load(cu_k + b)
            seqlen_k = gl.minimum(gl.maximum(seqlen_k, 0), max_pages * PAGE)
            table = table + b.to(gl.int64) * stride_bt
            last_lp = gl.maximum(seqlen_k - 1, 0) // PAGE
            # V of the last page through a descriptor ending at the last key: TMA zero-fills past it
            vt_base = v_ptr + (_page_of(table, last_lp, max_pages, num_pages) * PAGE).to(gl.int64) * svs
            vt_rows = gl.maximum(seqlen_k - last_lp * PAGE, 1)
            vt_desc = tma.make_tensor_descriptor(
                vt_base,
                [1, vt_rows, nheads_k, HEAD_DIM],
                [svs, svs, svh, 1],
                v_arg.block_type.shape,
                v_arg.layout,
            )
            pg = (table, max_pages, num_pages, last_lp, vt_desc)
            return q_desc, k_arg, v_arg, o_desc, seqlen_q, seqlen_k, 0, q_start.to(gl.int64), pg
        else:
            k_start = gl.minimum(gl.maximum(gl.load(cu_k + b), 0), total_k)
            seqlen_k = gl.minimum(gl.maximum(gl.load(cu_k + b + 1), k_start), total_k) - k_start
            k_desc = _seq_desc(k_arg, k_start, seqlen_k, nheads_k, sks, skh, BLOCK_N, HEAD_DIM)
            v_desc = _seq_desc(v_arg, k_start, seqlen_k, nheads_k, svs, svh, BLOCK_N, HEAD_DIM)
            return q_desc, k_desc, v_desc, o_desc, seqlen_q, seqlen_k, 0, q_start.to(gl.int64), pa
    else:
        return q_arg, k_arg, v_arg, o_arg, seqlen_q, seqlen_k, b, b.to(gl.int64) * stride_lb, pa


@gluon.jit
def _active_tiles(tiles, m0, seqlen_q, VARLEN: gl.constexpr):
    """Varlen grids are sized by the longest sequence: a tile past its own sequence's end gets no key tile."""
    if VARLEN:
        lo, full_lo, full_hi, hi = tiles
        hi = lo + (hi - lo) * (m0 < seqlen_q).to(gl.int32)
        return lo, gl.minimum(full_lo, hi), gl.minimum(full_hi, hi), hi
    else:
        return tiles


@gluon.constexpr_function
def _mma_layout(num_warps, n):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _smem_layout(bitwidth):
    # 128-byte swizzle: what NVMMASharedLayout.get_default_for picks for 16-bit tiles of >= 64 columns
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bitwidth, rank=2)
