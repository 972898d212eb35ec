"""Hopper (sm_90) Gluon forward attention kernels, written against Triton 3.6's Gluon API.

Two kernels share one consumer loop (:func:`fa_core.gluon._hopper_parts._consume_tiles`):

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
)

from fa_core.gluon._hopper_parts import (
    _active_tiles,
    _as4d,
    _consume_tiles,
    _epilogue,
    _load_kv,
    _mma_layout,
    _problem,
    _smem_layout,
    _tile_range,
)

__all__ = ["attn_fwd_pipelined", "attn_fwd_ws"]

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
