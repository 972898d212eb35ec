"""Hopper (sm_90) dQ pass of the attention backward, written in Gluon (Triton 3.6's explicit-layout dialect).

The first pass of :mod:`fa_backward.backward_kernel`'s two-pass backward, with FlashAttention-3's means on
Hopper: same contract as the Triton ``_bwd_dq_kernel`` (dense inputs). One CTA per ``NCONS * BLOCK_M`` query
rows of one (batch, q head); it writes the rows' dQ, ``delta = rowsum(dout * out)`` (minus ``dlse`` when
given) and the lse in log2 units (``lse2 = lse * log2(e)``, the form the dK/dV passes, Triton and
:mod:`fa_backward.gluon_dkdv`, read). dQ is accumulated in registers over the visible key tiles, no atomics:
deterministic (bitwise identical from run to run).

Per CTA (``NCONS`` consumer warpgroups of ``BLOCK_M`` = 64 query rows each, plus a 1-warp TMA producer):

* Q, dout and out of every consumer's rows are loaded once by TMA (one mbarrier per consumer) and stay
  resident in shared memory; rows past ``seqlen_q`` read as zero (TMA bounds).
* Each consumer first computes its rows' delta (``out`` and ``dout`` read from shared memory in the dQ
  accumulator's layout, summed in float32), loads the forward's lse (natural log; rows past ``seqlen_q`` get
  +inf, as in the Triton pass) and stores ``delta`` and ``lse2 = lse * log2(e)`` for every row below
  ``seqlen_q``, before its loop over key tiles: rows that see no key get them too. The out tile's shared
  memory then stages dQ for its TMA store.
* The producer streams (K, V) tiles of ``BLOCK_N`` keys through a ``STAGES``-deep ring: K and V on separate
  "ready" mbarriers per slot (S can start before V lands), one "free" mbarrier per slot on which every
  consumer arrives once its ``dS K`` product is done with the slot. Key rows past ``seqlen_k`` read as zero.
* Each consumer, per key tile: ``S = Q K^T`` and ``dP = dO V^T`` issued back to back as async wgmma;
  ``P = exp2(S * scale_log2 - lse2)`` while ``dP`` is still on the tensor cores; ``dS = P (dP - delta)``;
  ``dQ += dS K`` (dS cast to q's dtype, from registers); then the slot is released.
* Key tiles (:func:`fa_core.gluon._hopper_parts._tile_range` over the CTA's rows): tiles ``[0, full_hi)`` are
  visible to every row and run without a mask; tiles ``[full_hi, hi)`` (the causal diagonal, bottom-right
  aligned: key ``j`` visible from query ``i`` iff ``j <= i + seqlen_k - seqlen_q``; the ragged last key tile)
  are masked by one select on dS: ``dS = 0`` where the key is past ``seqlen_k`` or not visible. That single
  select also covers the rows whose lse is +-inf or whose delta is not finite (as the Triton pass's masks do):
  a row that sees no key gets ``dQ = 0``. Tiles past ``hi`` (no visible key) are never loaded.
* Finally ``dQ *= softmax_scale``, stored through shared memory and TMA (rows past ``seqlen_q`` clipped).

Offline sm_90 compile (``scripts/gluon_bwd_probe.py --pass dq``, Triton 3.6): every variant (d64 / d128, causal or not,
GQA group 1 / 4, bf16 / fp16, with or without ``dlse``) compiles without spills; shared memory 112 KB (d64)
/ 160 KB (d128). Per key tile and consumer the loop has 64 (d64, ``BLOCK_N`` 128) / 32 (d128, ``BLOCK_N``
64) MUFU.EX2 and 16 / 20 HGMMA (S, dP from shared memory; dQ with dS from registers). The dQ wgmma is waited
for inside its tile (the next tile's S / dP do not run under it): the two consumers' tiles interleave on the
tensor cores instead. Numerics on a GPU: ``tests/test_gluon_dq_gpu.py``; speed against the Triton pass:
``bench/bench_gluon_bwd.py``. :mod:`fa_backward.launch` takes this pass above ``GLUON_DQ_MIN_FLOPS``, at
d128 only: there the public fwd+bwd with both Gluon passes is the fastest of the three choices from 512 x 32
non-causal up; at d64 the pass alone is no faster than the Triton one (``bench/results/*-gluon-thresholds.md``,
``bench/results/h200-gluon-backward.md``).

Scope (:func:`supports`): dense ``(batch, seqlen, nheads, headdim)`` bf16/fp16, head dim 64 or 128, causal or
not, GQA/MQA, any ``softmax_scale > 0``, optional float32 ``dlse``; TMA-compatible strides for q, k, v, out,
dout, dq. This module imports under any Triton: the kernels are defined only where
:func:`fa_core.gluon._gluon_importable` says Triton 3.6's Gluon is there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fa_backward._gluon_checks import HEAD_DIMS, LOG2E, available, dense_reason, layout_reason, options_reason
from fa_core.errors import FlashAttnValueError
from fa_core.gluon import _gluon_importable

__all__ = ["CONFIGS", "HEAD_DIMS", "available", "dq_pass", "prepare", "supports", "unsupported_reason"]


#: head dim -> tile configuration: ``NCONS`` consumer warpgroups of ``BLOCK_M`` query rows each (the CTA's
#: query tile is ``NCONS * BLOCK_M`` rows, sharing one K/V ring), key tiles of ``BLOCK_N`` rows through a
#: ``STAGES``-deep ring, registers split by setmaxnreg between the consumers and the producer warp (the
#: forward's split). Untuned: the simplest shapes that compile without spills
#: (``scripts/gluon_bwd_probe.py --pass dq``).
CONFIGS: dict[int, dict[str, int]] = {
    64: dict(BLOCK_M=64, BLOCK_N=128, NCONS=2, STAGES=2, CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4),
    128: dict(BLOCK_M=64, BLOCK_N=64, NCONS=2, STAGES=2, CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4),
}


# ---------------------------------------------------------------------------------------------------------------
# Kernel (defined only where Triton 3.6's Gluon imports)
# ---------------------------------------------------------------------------------------------------------------

if _gluon_importable():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from fa_core.gluon._hopper_parts import _as4d, _load_kv, _mma_layout, _smem_layout, _tile_range

    @gluon.jit
    def _dq_tile(
        dq,
        q_s,
        do_s,
        k_smem,
        v_smem,
        bars,
        j,
        lo,
        rows,
        lse2,
        delta,
        seqlen_k,
        diag,
        scale_log2,
        s_layout: gl.constexpr,
        a_layout: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        MASK: gl.constexpr,
    ):
        """Key tile ``j`` (ring position ``j - lo``) of one consumer's query rows ``rows``: returns dQ.
        ``bars`` = (q_bars, k_bars, v_bars, free_bars)."""
        _q_bars, k_bars, v_bars, free_bars = bars
        dtype: gl.constexpr = q_s.dtype
        r = j - lo
        slot = r % STAGES
        phase = (r // STAGES) & 1
        k_s = k_smem.index(slot)
        v_s = v_smem.index(slot)
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(k_bars.index(slot), phase)
        s_tok = warpgroup_mma(q_s, k_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bars.index(slot), phase)
        dp_tok = warpgroup_mma(do_s, v_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        # rows past seqlen_q have lse2 = +inf: P = 0
        p = gl.exp2(s * scale_log2 - gl.expand_dims(lse2, 1))
        dp = warpgroup_mma_wait(0, deps=(dp_tok,))
        ds = p * (dp - gl.expand_dims(delta, 1))
        if MASK:
            # keys past seqlen_k (zero-filled: S = 0) and keys right of the causal diagonal; the select on dS
            # also keeps a non-finite lse / delta of a row out of the keys it does not see
            cols = gl.expand_dims(j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
            keep = cols < seqlen_k
            if CAUSAL:
                keep = keep & (cols <= gl.expand_dims(rows, 1) + diag)
            ds = gl.where(keep, ds, 0.0)
        ds_op = gl.convert_layout(ds.to(dtype), a_layout)
        dq_tok = warpgroup_mma(ds_op, k_s, dq, is_async=True)
        dq, ds_op = warpgroup_mma_wait(0, deps=(dq_tok, ds_op))
        # this consumer is done with the slot
        mbarrier.arrive(free_bars.index(slot), count=1)
        return dq

    @gluon.jit
    def _consumer(
        tiles_smem,
        k_smem,
        v_smem,
        bars,
        dq_desc,
        ptrs,
        strides,
        b,
        h,
        m0,
        seqlen_q,
        seqlen_k,
        tiles,
        scale_log2,
        sm_scale,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        HAS_DLSE: gl.constexpr,
        ME: gl.constexpr,
    ):
        """Consumer ``ME``: delta, lse2 and dQ of query rows [m0 + ME * BLOCK_M, + BLOCK_M).
        ``tiles_smem`` = (q, dout, out) resident tiles; ``ptrs`` = (lse, delta, lse2, dlse);
        ``strides`` = their (batch, head) strides; ``tiles`` = (lo, full_lo, full_hi, hi)."""
        q_all, do_all, o_all = tiles_smem
        lse_ptr, delta_ptr, lse2_ptr, dlse_ptr = ptrs
        stride_lb, stride_lh, stride_db, stride_dh, stride_l2b, stride_l2h, stride_dlb, stride_dlh = strides
        q_bars, _k_bars, _v_bars, _free_bars = bars
        lo, _full_lo, full_hi, hi = tiles
        s_layout: gl.constexpr = _mma_layout(4, BLOCK_N)
        dq_layout: gl.constexpr = _mma_layout(4, HEAD_DIM)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        q_s = q_all.index(ME)
        do_s = do_all.index(ME)
        o_s = o_all.index(ME)
        m_me = m0 + ME * BLOCK_M
        diag = seqlen_k - seqlen_q
        rows = m_me + gl.arange(0, BLOCK_M, layout=row_layout)
        in_q = rows < seqlen_q
        bl = b.to(gl.int64)
        hl = h.to(gl.int64)
        # the forward's lse (natural log; +inf for a row that sees no key); rows past seqlen_q: +inf (P = 0)
        lse = gl.load(lse_ptr + bl * stride_lb + hl * stride_lh + rows, mask=in_q, other=float("inf"))
        lse2 = lse * 1.4426950408889634
        mbarrier.wait(q_bars.index(ME), 0)
        # delta = rowsum(dout * out) in float32, before anything else: every row gets it
        o = o_s.load(dq_layout).to(gl.float32)
        do = do_s.load(dq_layout).to(gl.float32)
        delta = gl.convert_layout(gl.sum(o * do, 1), row_layout)
        if HAS_DLSE:
            dlse = gl.load(dlse_ptr + bl * stride_dlb + hl * stride_dlh + rows, mask=in_q, other=0.0)
            delta = delta - dlse
        gl.store(delta_ptr + bl * stride_db + hl * stride_dh + rows, delta, mask=in_q)
        gl.store(lse2_ptr + bl * stride_l2b + hl * stride_l2h + rows, lse2, mask=in_q)

        dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout)
        # tiles every row of the CTA sees whole, then the masked edge (causal diagonal, ragged key end)
        for j in range(lo, full_hi):
            dq = _dq_tile(
                dq, q_s, do_s, k_smem, v_smem, bars, j, lo, rows, lse2, delta, seqlen_k, diag, scale_log2,
                s_layout, a_layout, BLOCK_M, BLOCK_N, STAGES, CAUSAL, False,
            )  # fmt: skip
        for j in range(full_hi, hi):
            dq = _dq_tile(
                dq, q_s, do_s, k_smem, v_smem, bars, j, lo, rows, lse2, delta, seqlen_k, diag, scale_log2,
                s_layout, a_layout, BLOCK_M, BLOCK_N, STAGES, CAUSAL, True,
            )  # fmt: skip
        dq = dq * sm_scale
        if m_me < seqlen_q:
            # out's tile was read (delta) long ago: it stages dQ for the TMA store
            o_s.store(dq.to(o_s.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(dq_desc, [b, m_me, h, 0], _as4d(o_s, dq_desc))
            tma.store_wait(0)

    @gluon.jit
    def _producer(
        descs,
        tiles_smem,
        k_smem,
        v_smem,
        bars,
        b,
        h,
        hk,
        m0,
        lo,
        hi,
        BLOCK_M: gl.constexpr,
        STAGES: gl.constexpr,
        NCONS: gl.constexpr,
    ):
        """The TMA warp: q / dout / out of every consumer once, then the (K, V) tiles [lo, hi) through the
        ring. ``descs`` = (q, k, v, out, dout) descriptors."""
        q_desc, k_desc, v_desc, o_desc, do_desc = descs
        q_all, do_all, o_all = tiles_smem
        q_bars, k_bars, v_bars, free_bars = bars
        rows_bytes: gl.constexpr = (
            q_desc.block_type.nbytes + do_desc.block_type.nbytes + o_desc.block_type.nbytes
        )
        for c in gl.static_range(NCONS):
            bar = q_bars.index(c)
            m_c = m0 + c * BLOCK_M
            mbarrier.expect(bar, rows_bytes)
            tma.async_copy_global_to_shared(q_desc, [b, m_c, h, 0], bar, _as4d(q_all.index(c), q_desc))
            tma.async_copy_global_to_shared(do_desc, [b, m_c, h, 0], bar, _as4d(do_all.index(c), do_desc))
            tma.async_copy_global_to_shared(o_desc, [b, m_c, h, 0], bar, _as4d(o_all.index(c), o_desc))
        for r in range(hi - lo):
            slot = r % STAGES
            # every consumer released the slot's previous tile (r - STAGES); the first pass is free
            mbarrier.wait(free_bars.index(slot), ((r // STAGES) & 1) ^ 1, pred=r >= STAGES)
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, lo + r, slot, b, hk, 0, 0)

    @gluon.jit
    def attn_bwd_dq_ws(
        q_desc,
        k_desc,
        v_desc,
        o_desc,
        do_desc,
        dq_desc,
        lse_ptr,
        delta_ptr,
        lse2_ptr,
        dlse_ptr,
        stride_lb,
        stride_lh,
        stride_db,
        stride_dh,
        stride_l2b,
        stride_l2h,
        stride_dlb,
        stride_dlh,
        seqlen_q,
        seqlen_k,
        group,
        scale_log2,
        sm_scale,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        HAS_DLSE: gl.constexpr,
        NCONS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Grid ``(cdiv(seqlen_q, NCONS * BLOCK_M), nheads, batch)``, ``num_warps=4`` (the first consumer).

        Descriptors: rank-4 over ``(batch, seqlen, nheads, headdim)``: q / out / dout / dq with blocks ``[1,
        BLOCK_M, 1, HEAD_DIM]``, k / v with ``[1, BLOCK_N, 1, HEAD_DIM]``. ``lse`` (read), ``delta``, ``lse2``
        (written) and ``dlse`` (read with ``HAS_DLSE``; otherwise any float32 pointer) are float32
        ``(batch, nheads, seqlen_q)`` with unit row stride and the given (batch, head) strides. Query tiles
        run last-first: under a causal mask the last ones see the most keys."""
        pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
        h = gl.program_id(1)
        b = gl.program_id(2)
        hk = h // group
        m0 = pid_m * (NCONS * BLOCK_M)
        dtype: gl.constexpr = q_desc.dtype
        smem_layout: gl.constexpr = _smem_layout(dtype.primitive_bitwidth)
        q_all = gl.allocate_shared_memory(dtype, [NCONS, BLOCK_M, HEAD_DIM], smem_layout)
        do_all = gl.allocate_shared_memory(dtype, [NCONS, BLOCK_M, HEAD_DIM], smem_layout)
        o_all = gl.allocate_shared_memory(dtype, [NCONS, BLOCK_M, HEAD_DIM], smem_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [NCONS, 1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(NCONS):
            mbarrier.init(q_bars.index(c), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(free_bars.index(i), count=NCONS)
        fence_async_shared()
        tiles_smem = (q_all, do_all, o_all)
        bars = (q_bars, k_bars, v_bars, free_bars)
        descs = (q_desc, k_desc, v_desc, o_desc, do_desc)
        ptrs = (lse_ptr, delta_ptr, lse2_ptr, dlse_ptr)
        strides = (stride_lb, stride_lh, stride_db, stride_dh, stride_l2b, stride_l2h, stride_dlb, stride_dlh)
        # key tiles of the CTA's rows (every consumer walks them; the masks cover what one does not see)
        tiles = _tile_range(m0, seqlen_k, seqlen_k - seqlen_q, 0, 0, NCONS * BLOCK_M, BLOCK_N, CAUSAL, False)
        lo = tiles[0]
        hi = tiles[3]
        if NCONS == 1:
            gl.warp_specialize(
                [
                    (_consumer, (tiles_smem, k_smem, v_smem, bars, dq_desc, ptrs, strides, b, h, m0, seqlen_q,
                                 seqlen_k, tiles, scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                 HAS_DLSE, 0)),
                    (_producer, (descs, tiles_smem, k_smem, v_smem, bars, b, h, hk, m0, lo, hi, BLOCK_M, STAGES,
                                 NCONS)),
                ],
                [1],
                [PRODUCER_REGS],
            )  # fmt: skip
        else:
            gl.warp_specialize(
                [
                    (_consumer, (tiles_smem, k_smem, v_smem, bars, dq_desc, ptrs, strides, b, h, m0, seqlen_q,
                                 seqlen_k, tiles, scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                 HAS_DLSE, 0)),
                    (_consumer, (tiles_smem, k_smem, v_smem, bars, dq_desc, ptrs, strides, b, h, m0, seqlen_q,
                                 seqlen_k, tiles, scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                 HAS_DLSE, 1)),
                    (_producer, (descs, tiles_smem, k_smem, v_smem, bars, b, h, hk, m0, lo, hi, BLOCK_M, STAGES,
                                 NCONS)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )  # fmt: skip
        for c in gl.static_range(NCONS):
            mbarrier.invalidate(q_bars.index(c))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))
            mbarrier.invalidate(free_bars.index(i))


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _vec_reason(name: str, t: torch.Tensor, shape: tuple[int, int, int]) -> str | None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape or t.stride(-1) != 1:
        return f"{name} must be a float32 (batch, nheads, seqlen_q) tensor with unit last stride"
    return None


def unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    lse2: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dlse: torch.Tensor | None = None,
    check_device: bool = True,
    **extras: Any,
) -> str | None:
    """Why :func:`dq_pass` cannot take these arguments, or None when it can (see :func:`supports`)."""
    reason = dense_reason(q, k, v, [("out", out), ("dout", dout)], check_device)
    if reason is not None:
        return reason
    batch, seqlen_q, nheads, _ = q.shape
    if max(seqlen_q, k.shape[1]) >= 2**31:
        return "sizes must fit int32"
    shape = (batch, nheads, seqlen_q)
    vecs = [("lse", lse), ("delta", delta), ("lse2", lse2), ("dlse", dlse)]
    for name, t in vecs:
        if t is not None and (reason := _vec_reason(name, t, shape)) is not None:
            return reason
    if dq is not None and (dq.shape != q.shape or dq.dtype != q.dtype):
        return "dq must have q's shape and dtype"
    tma = [
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", out),
        ("dout", dout),
        *([("dq", dq)] if dq is not None else []),
    ]
    return options_reason(softmax_scale, extras) or layout_reason(
        q, tma, [t for _, t in vecs if t is not None], check_device
    )


def supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    lse2: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dlse: torch.Tensor | None = None,
    **extras: Any,
) -> bool:
    """Whether :func:`dq_pass` handles this call.

    True only for: :func:`available` on q's device; bf16/fp16 ``q, out, dout (b, s_q, h, d)``, ``k, v (b, s_k,
    h_k, d)`` with ``d`` in {64, 128} and ``h % h_k == 0``, no empty dim; ``lse`` and (if given) ``delta``,
    ``lse2``, ``dlse``: float32 ``(b, h, s_q)`` with unit last stride (any batch / head strides); ``dq`` (if
    given) of q's shape and dtype; causal or not; ``softmax_scale`` None or finite > 0; every stride but the
    last (which is 1) and the base 16-byte aligned for q, k, v, out, dout, dq (TMA); every tensor on q's
    device. Any further keyword (``softcap``, ``alibi_slopes``, ``dropout_p``, ...) must be None / False / 0,
    ``window_size`` also ``(-1, -1)``.
    """
    reason = unsupported_reason(
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        delta,
        lse2,
        causal=causal,
        softmax_scale=softmax_scale,
        dlse=dlse,
        **extras,
    )
    return reason is None


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    delta: torch.Tensor,
    lse2: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    dlse: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any], int, tuple[int, int, int]]:
    """Build (kernel, runtime args by name, constexprs by name, num_warps, grid) for one call (shapes as
    :func:`dq_pass`); works on CPU tensors too (offline compiles: ``scripts/gluon_bwd_probe.py --pass dq``)."""
    if not _gluon_importable():
        raise FlashAttnValueError("fa_backward.gluon_dq needs Triton 3.6 with Gluon's Hopper modules")
    from fa_core.gluon._launch import _desc as desc  # rank-4 (b, s, h, d), block [1, rows, 1, d]

    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    cfg = {**CONFIGS[head_dim], **(config or {})}  # a partial override keeps the tuned rest
    num_warps = cfg.pop("num_warps")
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    dl = delta if dlse is None else dlse  # (never read without HAS_DLSE)
    args: dict[str, Any] = dict(
        q_desc=desc(q, block_m),
        k_desc=desc(k, block_n),
        v_desc=desc(v, block_n),
        o_desc=desc(out, block_m),
        do_desc=desc(dout, block_m),
        dq_desc=desc(dq, block_m),
        lse_ptr=lse,
        delta_ptr=delta,
        lse2_ptr=lse2,
        dlse_ptr=dl,
        stride_lb=lse.stride(0),
        stride_lh=lse.stride(1),
        stride_db=delta.stride(0),
        stride_dh=delta.stride(1),
        stride_l2b=lse2.stride(0),
        stride_l2h=lse2.stride(1),
        stride_dlb=dl.stride(0),
        stride_dlh=dl.stride(1),
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        group=nheads // nheads_k,
        scale_log2=float(softmax_scale) * LOG2E,
        sm_scale=float(softmax_scale),
    )
    constexprs: dict[str, Any] = dict(
        HEAD_DIM=head_dim, CAUSAL=bool(causal), HAS_DLSE=dlse is not None, num_warps=num_warps, **cfg
    )
    grid = (math.ceil(seqlen_q / (cfg["NCONS"] * block_m)), nheads, batch)
    return attn_bwd_dq_ws, args, constexprs, num_warps, grid


def dq_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    lse2: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dlse: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ of dense attention on Hopper, and the ``delta`` / ``lse2`` that the dK/dV passes read.

    Args:
        q, out, dout: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)``;
            bf16/fp16, ``headdim`` 64 or 128, ``nheads % nheads_k == 0`` (see :func:`supports`).
        lse: float32 ``(batch, nheads, seqlen_q)``: the forward's lse in natural-log units (+inf for a row
            that sees no key).
        dq: optional ``(batch, seqlen_q, nheads, headdim)`` output of q's dtype (TMA-compatible strides).
        delta, lse2: optional float32 ``(batch, nheads, seqlen_q)`` outputs (unit last stride); when absent,
            both are views of one ``(2, batch, nheads, seqlen_q)`` allocation, as :mod:`fa_backward.launch`
            makes them.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + seqlen_k - seqlen_q).
        softmax_scale: defaults to ``headdim ** -0.5``; must be > 0.
        dlse: optional float32 ``(batch, nheads, seqlen_q)`` gradient of the lse: ``delta`` becomes
            ``rowsum(dout * out) - dlse``.
        config: tile override (see :data:`CONFIGS`).

    Returns:
        ``(dq, delta, lse2)``: dq of q's shape (0 for rows that see no key); ``delta = rowsum(dout * out)``
        (``- dlse``) and ``lse2 = lse * log2(e)`` for every row, as the Triton dQ pass writes them.

    Raises:
        FlashAttnValueError: the arguments are outside :func:`supports` (the message says which one).
    """
    reason = unsupported_reason(
        q, k, v, out, dout, lse, dq, delta, lse2, causal=causal, softmax_scale=softmax_scale, dlse=dlse
    )
    if reason is not None:
        raise FlashAttnValueError(f"fa_backward.gluon_dq.dq_pass: {reason}")
    if dq is None:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if delta is None or lse2 is None:
        pair = torch.empty((2, *lse.shape), dtype=torch.float32, device=q.device).unbind(0)
        delta = pair[0] if delta is None else delta
        lse2 = pair[1] if lse2 is None else lse2
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kernel, args, constexprs, _, grid = prepare(
        q, k, v, out, dout, lse, dq, delta, lse2, scale, causal, dlse, config
    )
    with torch.cuda.device(q.device):
        kernel[grid](**args, **constexprs)
    return dq, delta, lse2
