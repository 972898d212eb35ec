"""Hopper (sm_90) Gluon forward attention kernels, written against Triton 3.6's Gluon API.

Two kernels share one consumer loop (:func:`_consume_tiles`):

* ``attn_fwd_pipelined``: one CTA of ``num_warps`` warps (4: one warpgroup of 64 query rows; 8: two
  warpgroups, 128 rows) per query tile. Q is loaded once by TMA; K and V stream through a ``STAGES``-deep
  shared-memory ring filled by TMA and tracked by one mbarrier per slot (K and V have separate barriers so
  S = QK^T can start before V lands). The loop overlaps within the warpgroup (FlashAttention-3): QK^T(j) and
  PV(j-1) are issued as async wgmma, the softmax of tile j runs while PV(j-1) is still on the tensor cores,
  then O is rescaled; the same warps refill the ring slot that PV(j-1) released.
* ``attn_fwd_ws``: warp-specialized. A 1-warp producer partition issues every TMA load (Q of every consumer,
  then the K/V ring, waiting on "slot free" barriers); ``NCONS`` (2 or 3) consumer partitions of 4 warps (the
  default one and workers) each own 64 query rows of the CTA's tile and run the same overlapped loop on the
  shared ring (a slot is released when every consumer is done with it). With ``PINGPONG`` the consumers take
  turns to issue their wgmma (FlashAttention-3's ping-pong): one group's softmax runs under another's GEMMs.

Both take dense inputs (host TMA descriptors) or packed varlen sequences (``VARLEN``: one descriptor per
sequence, built on the device from ``cu_seqlens``; see :func:`_problem`).

Scores live in the log2 domain: ``s2 = qk * qk_scale`` with ``qk_scale = softmax_scale * log2(e)``, or with a
softcap ``s2 = tanh(qk * softcap_in) * qk_scale`` with ``softcap_in = softmax_scale / softcap`` and
``qk_scale = softcap * log2(e)``. Key tiles of a query tile split into a masked left edge (sliding window),
an unmasked interior and a masked right edge (causal diagonal / window / ragged end): only the edges pay for
the mask. Visibility (flash-attn): key j is visible from query i iff
``i + diag - left <= j <= i + diag + right`` and ``j < seqlen_k`` with ``diag = seqlen_k - seqlen_q``
(``left``/``right`` unbounded = 2**30; causal = ``right`` 0). Rows with no visible key get out = 0 and
lse = +inf. Inputs and outputs are rank-4 TMA descriptors over ``(batch, seqlen, nheads, headdim)``, so any
16-byte-aligned strides work and the sequence end of every batch is zero-filled by TMA (no reads from the next
batch).
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

__all__ = ["attn_fwd_pipelined", "attn_fwd_ws"]


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Kernel 1: software-pipelined, one consumer of num_warps warps, loads issued in-line
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def attn_fwd_pipelined(
    q_arg,
    k_arg,
    v_arg,
    o_arg,
    lse_ptr,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    group,
    qk_scale,
    softcap_in,
    left,
    right,
    vl,
    pa,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    WINDOW: gl.constexpr,
    SOFTCAP: gl.constexpr,
    VARLEN: gl.constexpr,
    PAGE: gl.constexpr,
    SEQUSED: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid ``(cdiv(max seqlen_q, BLOCK_M), nheads, batch)``; query tiles are visited last-first (the causal
    tiles with the most keys start first). See :func:`_problem` for the dense / varlen arguments."""
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    q_desc, k_desc, v_desc, o_desc, seqlen_q, seqlen_k, bc, lse_off, pg = _problem(
        q_arg, k_arg, v_arg, o_arg, b, seqlen_q, seqlen_k, stride_lb, vl, pa, BLOCK_M, BLOCK_N, HEAD_DIM, VARLEN,
        PAGE, SEQUSED,
    )  # fmt: skip
    dtype: gl.constexpr = q_desc.dtype
    hk = h // group
    m0 = pid_m * BLOCK_M
    diag = seqlen_k - seqlen_q
    sp = (qk_scale, softcap_in, seqlen_k, diag, left, right)

    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)
    smem_layout: gl.constexpr = _smem_layout(dtype.primitive_bitwidth)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    tiles = _tile_range(m0, seqlen_k, diag, left, right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    tiles = _active_tiles(tiles, m0, seqlen_q, VARLEN)
    lo = tiles[0]
    n_total = tiles[3] - lo

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [bc, m0, h, 0], q_bar, _as4d(q_smem, q_desc))
    for t in gl.static_range(STAGES):
        if t < n_total:
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, lo + t, t, bc, hk, pg, PAGE)
    mbarrier.wait(q_bar, 0)

    acc, m_i, l_i = _consume_tiles(
        q_smem, k_smem, v_smem, (k_bars, v_bars, k_bars, k_bars), k_desc, v_desc, bc, hk, pg, m0, sp, tiles,
        s_layout, o_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, SOFTCAP, True, 0, False, 1, PAGE,
    )  # fmt: skip

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    _epilogue(
        acc, m_i, l_i, q_smem, o_desc, lse_ptr, bc, lse_off, h, m0, seqlen_q, stride_lh, o_layout, BLOCK_M
    )


# ---------------------------------------------------------------------------------------------------------------
# Kernel 2: warp-specialized (1-warp TMA producer + NCONS 4-warp consumers of 64 rows each)
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _ws_consumer(
    q_all,
    k_smem,
    v_smem,
    q_bars,
    bars,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    lse_off,
    stride_lh,
    seqlen_q,
    sp,
    bc,
    h,
    hk,
    m0,
    tiles,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    WINDOW: gl.constexpr,
    SOFTCAP: gl.constexpr,
    ME: gl.constexpr,
    PINGPONG: gl.constexpr,
    NCONS: gl.constexpr,
):
    s_layout: gl.constexpr = _mma_layout(4, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(4, HEAD_DIM)
    q_smem = q_all.index(ME)
    m_me = m0 + ME * BLOCK_M
    mbarrier.wait(q_bars.index(ME), 0)
    acc, m_i, l_i = _consume_tiles(
        q_smem, k_smem, v_smem, bars, k_desc, v_desc, bc, hk, 0, m_me, sp, tiles, s_layout, o_layout, BLOCK_M,
        BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, SOFTCAP, False, ME, PINGPONG, NCONS, 0,
    )  # fmt: skip
    _epilogue(
        acc, m_i, l_i, q_smem, o_desc, lse_ptr, bc, lse_off, h, m_me, seqlen_q, stride_lh, o_layout, BLOCK_M
    )


@gluon.jit
def _ws_producer(
    q_desc,
    k_desc,
    v_desc,
    q_all,
    k_smem,
    v_smem,
    q_bars,
    bars,
    b,
    h,
    hk,
    pg,
    m0,
    lo,
    hi,
    BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr,
    NCONS: gl.constexpr,
    PAGE: gl.constexpr,
):
    k_bars, v_bars, free_bars, turn_bars = bars
    for c in gl.static_range(NCONS):
        mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            q_desc, [b, m0 + c * BLOCK_M, h, 0], q_bars.index(c), _as4d(q_all.index(c), q_desc)
        )
    for r in range(hi - lo):
        slot = r % STAGES
        # wait until every consumer released the slot's previous tile (r - STAGES); the first pass is free
        mbarrier.wait(free_bars.index(slot), ((r // STAGES) & 1) ^ 1, pred=r >= STAGES)
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, lo + r, slot, b, hk, pg, PAGE)


@gluon.jit
def attn_fwd_ws(
    q_arg,
    k_arg,
    v_arg,
    o_arg,
    lse_ptr,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    group,
    qk_scale,
    softcap_in,
    left,
    right,
    vl,
    pa,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    WINDOW: gl.constexpr,
    SOFTCAP: gl.constexpr,
    PINGPONG: gl.constexpr,
    NCONS: gl.constexpr,
    VARLEN: gl.constexpr,
    PAGE: gl.constexpr,
    SEQUSED: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid ``(cdiv(seqlen_q, NCONS * BLOCK_M), nheads, batch)``, ``num_warps=4`` (the first consumer);
    ``BLOCK_M`` is one consumer's rows (64), ``NCONS`` (2 or 3) the number of consumers. Every consumer walks
    the key tiles of the CTA's ``NCONS * BLOCK_M`` rows (the masks cover the tiles a consumer does not need)."""
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    q_desc, k_desc, v_desc, o_desc, seqlen_q, seqlen_k, bc, lse_off, pg = _problem(
        q_arg, k_arg, v_arg, o_arg, b, seqlen_q, seqlen_k, stride_lb, vl, pa, BLOCK_M, BLOCK_N, HEAD_DIM, VARLEN,
        PAGE, SEQUSED,
    )  # fmt: skip
    dtype: gl.constexpr = q_desc.dtype
    hk = h // group
    m0 = pid_m * (NCONS * BLOCK_M)
    diag = seqlen_k - seqlen_q
    sp = (qk_scale, softcap_in, seqlen_k, diag, left, right)

    smem_layout: gl.constexpr = _smem_layout(dtype.primitive_bitwidth)
    q_all = gl.allocate_shared_memory(dtype, [NCONS, BLOCK_M, HEAD_DIM], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [NCONS, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [NCONS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NCONS):
        mbarrier.init(q_bars.index(c), count=1)
        mbarrier.init(turn_bars.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(free_bars.index(i), count=NCONS)
    fence_async_shared()
    # the first consumer holds the first turn
    mbarrier.arrive(turn_bars.index(0), count=1)
    bars = (k_bars, v_bars, free_bars, turn_bars)

    tiles = _tile_range(m0, seqlen_k, diag, left, right, NCONS * BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    tiles = _active_tiles(tiles, m0, seqlen_q, VARLEN)
    if NCONS == 3:
        gl.warp_specialize(
            [
                (_ws_consumer, (q_all, k_smem, v_smem, q_bars, bars, k_desc, v_desc, o_desc, lse_ptr, lse_off,
                                stride_lh, seqlen_q, sp, bc, h, hk, m0, tiles, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                CAUSAL, WINDOW, SOFTCAP, 0, PINGPONG, NCONS)),
                (_ws_consumer, (q_all, k_smem, v_smem, q_bars, bars, k_desc, v_desc, o_desc, lse_ptr, lse_off,
                                stride_lh, seqlen_q, sp, bc, h, hk, m0, tiles, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                CAUSAL, WINDOW, SOFTCAP, 1, PINGPONG, NCONS)),
                (_ws_consumer, (q_all, k_smem, v_smem, q_bars, bars, k_desc, v_desc, o_desc, lse_ptr, lse_off,
                                stride_lh, seqlen_q, sp, bc, h, hk, m0, tiles, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                CAUSAL, WINDOW, SOFTCAP, 2, PINGPONG, NCONS)),
                (_ws_producer, (q_desc, k_desc, v_desc, q_all, k_smem, v_smem, q_bars, bars, bc, h, hk, pg, m0,
                                tiles[0], tiles[3], BLOCK_M, STAGES, NCONS, PAGE)),
            ],
            [4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_ws_consumer, (q_all, k_smem, v_smem, q_bars, bars, k_desc, v_desc, o_desc, lse_ptr, lse_off,
                                stride_lh, seqlen_q, sp, bc, h, hk, m0, tiles, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                CAUSAL, WINDOW, SOFTCAP, 0, PINGPONG, NCONS)),
                (_ws_consumer, (q_all, k_smem, v_smem, q_bars, bars, k_desc, v_desc, o_desc, lse_ptr, lse_off,
                                stride_lh, seqlen_q, sp, bc, h, hk, m0, tiles, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                CAUSAL, WINDOW, SOFTCAP, 1, PINGPONG, NCONS)),
                (_ws_producer, (q_desc, k_desc, v_desc, q_all, k_smem, v_smem, q_bars, bars, bc, h, hk, pg, m0,
                                tiles[0], tiles[3], BLOCK_M, STAGES, NCONS, PAGE)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
