"""Hopper (sm_90) Gluon forward attention kernels, written against Triton 3.6's Gluon API.

Two kernels share one per-tile step (:func:`_qk_softmax`):

* ``attn_fwd_pipelined``: one CTA of 8 warps (two warpgroups of 64 query rows each) per 128-row query tile.
  Q is loaded once by TMA; K and V stream through a ``STAGES``-deep shared-memory ring filled by TMA and tracked
  by one mbarrier per slot (K and V have separate barriers so S = QK^T can start before V lands). The loop
  overlaps within the warpgroup (FlashAttention-3): QK^T(j) and PV(j-1) are issued as async wgmma, the
  softmax of tile j runs while PV(j-1) is still on the tensor cores, then O is rescaled.
* ``attn_fwd_ws``: warp-specialized. A 1-warp producer partition issues every TMA load (Q for both halves,
  then the K/V ring, waiting on "slot free" barriers); two consumer partitions of 4 warps (the default one and
  a worker) each own 64 query rows of the CTA's 128-row tile and run the same overlapped loop on the shared ring
  (each slot is released when both consumers have finished with it).

Scores live in the log2 domain (``qk_scale = softmax_scale * log2(e)``); masked tiles (the causal diagonal and
the ragged last key tile) are processed by a separate loop with ``MASK=True`` so the interior is mask-free.
Rows with no visible key get out = 0 and lse = +inf. Inputs and outputs are rank-4 TMA descriptors over
``(batch, seqlen, nheads, headdim)`` so that any 16-byte-aligned strides work and the sequence end of every
batch is zero-padded by TMA (no reads from the next batch).
"""

from __future__ import annotations

import triton.language as tl
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
def _tile_range(m0, seqlen_k, diag, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Key tiles for query rows [m0, m0 + BLOCK_M): (number of tiles, number of leading tiles without masks)."""
    if CAUSAL:
        n_hi = gl.minimum(seqlen_k, gl.maximum(m0 + BLOCK_M + diag, 0))
        n_full = gl.minimum(gl.maximum(m0 + diag + 1, 0), seqlen_k) // BLOCK_N
    else:
        n_hi = seqlen_k
        n_full = seqlen_k // BLOCK_N
    n_total = (n_hi + BLOCK_N - 1) // BLOCK_N
    return n_total, n_full


@gluon.jit
def _qk_softmax(
    s,
    m_i,
    l_i,
    qk_scale,
    n0,
    rows,
    seqlen_k,
    diag,
    s_layout: gl.constexpr,
    BLOCK_N: gl.constexpr,
    MASK: gl.constexpr,
    CAUSAL: gl.constexpr,
):
    """Online softmax of one raw score tile ``s = q @ k^T`` (fp32, ``s_layout``).

    Returns ``p`` (fp32, un-normalised, log2 domain), ``alpha`` (rescale of the previous accumulator), the new
    running max ``m_i`` (log2 units, -inf while a row has seen no key) and the new running sum ``l_i``.
    Requires ``qk_scale > 0`` (the max is taken on the raw scores).
    """
    if MASK:
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = gl.expand_dims(cols, 0) < seqlen_k
        if CAUSAL:
            keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + diag)
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
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, t, b, hk, STAGES: gl.constexpr):
    """TMA K and V of key tile ``t`` into ring slot ``t % STAGES`` (each on its own barrier)."""
    slot = t % STAGES
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    kb = k_bars.index(slot)
    vb = v_bars.index(slot)
    mbarrier.expect(kb, k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, t * BLOCK_N, hk, 0], kb, _as4d(k_smem.index(slot), k_desc))
    mbarrier.expect(vb, v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [b, t * BLOCK_N, hk, 0], vb, _as4d(v_smem.index(slot), v_desc))


@gluon.jit
def _as4d(smem, desc):
    """View a 2-D ``[rows, headdim]`` tile as the descriptor's rank-4 ``[1, rows, 1, headdim]`` block."""
    return smem._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)


@gluon.jit
def _epilogue(
    acc,
    m_i,
    l_i,
    o_smem,
    o_desc,
    lse_ptr,
    b,
    h,
    m0,
    seqlen_q,
    stride_lb,
    stride_lh,
    o_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
):
    """Normalise O, store it through shared memory + TMA (rows past seqlen_q are clipped) and store the lse."""
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
    o = acc * gl.expand_dims(inv, 1)
    o_smem.store(o.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, m0, h, 0], _as4d(o_smem, o_desc))
    # lse in natural-log units; +inf where no key was visible
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    rows = m0 + gl.arange(0, BLOCK_M, layout=lse.type.layout)
    gl.store(
        lse_ptr + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + rows, lse, mask=rows < seqlen_q
    )
    tma.store_wait(0)


@gluon.jit
def _consume_tiles(
    q_smem,
    k_smem,
    v_smem,
    k_bars,
    v_bars,
    free_bars,
    turn_bars,
    k_desc,
    v_desc,
    b,
    hk,
    m0,
    seqlen_k,
    diag,
    qk_scale,
    n_total,
    n_full,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    PRODUCER: gl.constexpr,
    ME: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """The overlapped QK^T / softmax / PV loop over key tiles [0, n_total) for one query tile in ``q_smem``.

    ``PRODUCER=True``: this warp group also refills the ring (tile j - 1 + STAGES after PV(j - 1) finished).
    ``PRODUCER=False``: a separate producer refills it; this group arrives on ``free_bars[slot]`` instead.
    ``PINGPONG=True`` (two consumer warpgroups, ``ME`` = 0 or 1): each batch of wgmma issues waits for this
    group's turn on ``turn_bars[ME]`` and then hands the turn to the other group, so the tensor cores alternate
    between the groups and one group's softmax runs under the other's GEMMs (FlashAttention-3's ping-pong).
    Returns (acc, m_i, l_i) with acc in ``o_layout`` and m_i, l_i in ``SliceLayout(1, s_layout)``.
    """
    dtype: gl.constexpr = q_smem.dtype
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    if n_total > 0:
        # tile 0 (always through the masked path: it may be the only one)
        mbarrier.wait(k_bars.index(0), 0)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(ME), 0)
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - ME), count=1)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        p, alpha, m_i, l_i = _qk_softmax(
            s, m_i, l_i, qk_scale, 0, rows, seqlen_k, diag, s_layout, BLOCK_N, True, CAUSAL
        )
        p_prev = gl.convert_layout(p.to(dtype), p_layout)
        # interior tiles (no mask), then the masked edge (causal diagonal / ragged end)
        for j in range(1, n_full):
            acc, m_i, l_i, p_prev = _overlapped_step(
                j, acc, m_i, l_i, p_prev, q_smem, k_smem, v_smem, k_bars, v_bars, free_bars, turn_bars,
                k_desc, v_desc, b, hk, seqlen_k, diag, qk_scale, rows, n_total, s_zero, s_layout, o_layout,
                p_layout, BLOCK_N, STAGES, False, CAUSAL, PRODUCER, ME, PINGPONG,
            )  # fmt: skip
        for j in range(gl.maximum(n_full, 1), n_total):
            acc, m_i, l_i, p_prev = _overlapped_step(
                j, acc, m_i, l_i, p_prev, q_smem, k_smem, v_smem, k_bars, v_bars, free_bars, turn_bars,
                k_desc, v_desc, b, hk, seqlen_k, diag, qk_scale, rows, n_total, s_zero, s_layout, o_layout,
                p_layout, BLOCK_N, STAGES, True, CAUSAL, PRODUCER, ME, PINGPONG,
            )  # fmt: skip
        # last PV
        last = n_total - 1
        mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(ME), n_total & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(last % STAGES), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - ME), count=1)
        acc, p_prev = warpgroup_mma_wait(0, deps=(acc_tok, p_prev))
        if not PRODUCER:
            mbarrier.arrive(free_bars.index(last % STAGES), count=1)
    return acc, m_i, l_i


@gluon.jit
def _overlapped_step(
    j,
    acc,
    m_i,
    l_i,
    p_prev,
    q_smem,
    k_smem,
    v_smem,
    k_bars,
    v_bars,
    free_bars,
    turn_bars,
    k_desc,
    v_desc,
    b,
    hk,
    seqlen_k,
    diag,
    qk_scale,
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
    PRODUCER: gl.constexpr,
    ME: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """Issue QK^T(j) and PV(j - 1) asynchronously, softmax tile j while PV(j - 1) runs, then rescale O."""
    dtype: gl.constexpr = q_smem.dtype
    slot = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
    mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn_bars.index(ME), j & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc_tok = warpgroup_mma(p_prev, v_smem.index(prev), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - ME), count=1)
    s = warpgroup_mma_wait(1, deps=(s_tok,))
    p, alpha, m_i, l_i = _qk_softmax(
        s, m_i, l_i, qk_scale, j * BLOCK_N, rows, seqlen_k, diag, s_layout, BLOCK_N, MASK, CAUSAL
    )
    p_next = gl.convert_layout(p.to(dtype), p_layout)
    acc, p_prev = warpgroup_mma_wait(0, deps=(acc_tok, p_prev))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    # tile j - 1 is fully consumed: its slot can be refilled
    if PRODUCER:
        t = j - 1 + STAGES
        if t < n_total:
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, t, b, hk, STAGES)
    else:
        mbarrier.arrive(free_bars.index(prev), count=1)
    return acc, m_i, l_i, p_next


@gluon.constexpr_function
def _mma_layout(num_warps, n):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _smem_layout(rows, cols, bitwidth):
    # same swizzle as NVMMASharedLayout.get_default_for([rows, cols]) for 16-bit types with cols * 2 >= 128
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bitwidth, rank=2)


# ---------------------------------------------------------------------------------------------------------------
# Kernel 1: software-pipelined, one 8-warp consumer, loads issued in-line
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def attn_fwd_pipelined(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    group,
    qk_scale,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid ``(cdiv(seqlen_q, BLOCK_M), nheads, batch)``; query tiles are visited last-first (the causal
    tiles with the most keys start first)."""
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    hk = h // group
    m0 = pid_m * BLOCK_M
    diag = seqlen_k - seqlen_q

    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)
    q_layout: gl.constexpr = _smem_layout(BLOCK_M, HEAD_DIM, dtype.primitive_bitwidth)
    kv_layout: gl.constexpr = _smem_layout(BLOCK_N, HEAD_DIM, dtype.primitive_bitwidth)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    n_total, n_full = _tile_range(m0, seqlen_k, diag, BLOCK_M, BLOCK_N, CAUSAL)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, m0, h, 0], q_bar, _as4d(q_smem, q_desc))
    for t in gl.static_range(STAGES):
        if t < n_total:
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, t, b, hk, STAGES)
    mbarrier.wait(q_bar, 0)

    acc, m_i, l_i = _consume_tiles(
        q_smem, k_smem, v_smem, k_bars, v_bars, k_bars, k_bars, k_desc, v_desc, b, hk, m0, seqlen_k, diag,
        qk_scale, n_total, n_full, s_layout, o_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, True, 0, False,
    )  # fmt: skip

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    _epilogue(
        acc, m_i, l_i, q_smem, o_desc, lse_ptr, b, h, m0, seqlen_q, stride_lb, stride_lh, o_layout, BLOCK_M
    )


# ---------------------------------------------------------------------------------------------------------------
# Kernel 2: warp-specialized (1-warp TMA producer + two 4-warp consumers of 64 rows each)
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _ws_consumer(
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_bars,
    v_bars,
    free_bars,
    turn_bars,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    qk_scale,
    b,
    h,
    hk,
    m0,
    n_total,
    n_full,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    ME: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    s_layout: gl.constexpr = _mma_layout(4, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(4, HEAD_DIM)
    diag = seqlen_k - seqlen_q
    mbarrier.wait(q_bar, 0)
    acc, m_i, l_i = _consume_tiles(
        q_smem, k_smem, v_smem, k_bars, v_bars, free_bars, turn_bars, k_desc, v_desc, b, hk, m0, seqlen_k, diag,
        qk_scale, n_total, n_full, s_layout, o_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, False, ME,
        PINGPONG,
    )  # fmt: skip
    _epilogue(
        acc, m_i, l_i, q_smem, o_desc, lse_ptr, b, h, m0, seqlen_q, stride_lb, stride_lh, o_layout, BLOCK_M
    )


@gluon.jit
def _ws_producer(
    q_desc,
    k_desc,
    v_desc,
    q0_smem,
    q1_smem,
    k_smem,
    v_smem,
    q0_bar,
    q1_bar,
    k_bars,
    v_bars,
    free_bars,
    b,
    h,
    hk,
    m0,
    n_total,
    BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr,
):
    mbarrier.expect(q0_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, m0, h, 0], q0_bar, _as4d(q0_smem, q_desc))
    mbarrier.expect(q1_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, m0 + BLOCK_M, h, 0], q1_bar, _as4d(q1_smem, q_desc))
    for t in range(n_total):
        slot = t % STAGES
        # wait until both consumers released the slot's previous tile (t - STAGES); first pass is free
        mbarrier.wait(free_bars.index(slot), ((t // STAGES) & 1) ^ 1, pred=t >= STAGES)
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, t, b, hk, STAGES)


@gluon.jit
def attn_fwd_ws(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    group,
    qk_scale,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    PINGPONG: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid ``(cdiv(seqlen_q, 2 * BLOCK_M), nheads, batch)``, ``num_warps=4`` (the first consumer); ``BLOCK_M``
    is one consumer's rows (64). Both consumers share the CTA's key range (the longer one's, under causal)."""
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    hk = h // group
    m0 = pid_m * (2 * BLOCK_M)
    diag = seqlen_k - seqlen_q

    q_layout: gl.constexpr = _smem_layout(BLOCK_M, HEAD_DIM, dtype.primitive_bitwidth)
    kv_layout: gl.constexpr = _smem_layout(BLOCK_N, HEAD_DIM, dtype.primitive_bitwidth)
    q0_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    q1_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q0_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q1_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q0_bar, count=1)
    mbarrier.init(q1_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(free_bars.index(i), count=2)
    mbarrier.init(turn_bars.index(0), count=1)
    mbarrier.init(turn_bars.index(1), count=1)
    fence_async_shared()
    # the first consumer holds the first turn
    mbarrier.arrive(turn_bars.index(0), count=1)

    # both halves walk the key range of the second (lower) half; the first half masks the extra tiles
    n_total, n_full = _tile_range(m0, seqlen_k, diag, 2 * BLOCK_M, BLOCK_N, CAUSAL)

    gl.warp_specialize(
        [
            (
                _ws_consumer,
                (q0_smem, k_smem, v_smem, q0_bar, k_bars, v_bars, free_bars, turn_bars, k_desc, v_desc, o_desc,
                 lse_ptr, stride_lb, stride_lh, seqlen_q, seqlen_k, qk_scale, b, h, hk, m0, n_total, n_full,
                 BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, 0, PINGPONG),
            ),
            (
                _ws_consumer,
                (q1_smem, k_smem, v_smem, q1_bar, k_bars, v_bars, free_bars, turn_bars, k_desc, v_desc, o_desc,
                 lse_ptr, stride_lb, stride_lh, seqlen_q, seqlen_k, qk_scale, b, h, hk, m0 + BLOCK_M, n_total,
                 n_full, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, 1, PINGPONG),
            ),
            (
                _ws_producer,
                (q_desc, k_desc, v_desc, q0_smem, q1_smem, k_smem, v_smem, q0_bar, q1_bar, k_bars, v_bars,
                 free_bars, b, h, hk, m0, n_total, BLOCK_M, STAGES),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )  # fmt: skip


# keep tl imported for the version check done by the package (tl.constexpr is shared with gl)
_ = tl
