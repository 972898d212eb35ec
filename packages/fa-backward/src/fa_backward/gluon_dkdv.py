"""Hopper (sm_90) dK/dV pass of the attention backward, written in Gluon (Triton 3.6's explicit-layout dialect).

The second pass of :mod:`fa_backward.backward_kernel`'s two-pass backward: the dQ pass (the portable Triton
kernel) writes dQ, ``delta = rowsum(dout * out)`` and the lse in log2 units; this kernel then computes dK and
dV with FlashAttention-3's means on Hopper. Same contract as the Triton dK/dV kernel: one CTA per key block of
one (batch, kv head), the q heads of the GQA group and the visible query tiles looped over inside the CTA,
dK / dV accumulated in registers, no atomics: deterministic (bitwise identical from run to run).

Per CTA (``NCONS`` consumer warpgroups of ``BLOCK_N`` = 64 key rows each, plus a 1-warp TMA producer):

* K and V of the CTA's ``NCONS * BLOCK_N`` keys are loaded once by TMA and stay resident in shared memory;
  each consumer owns ``BLOCK_N`` of those rows (its dK / dV rows).
* The producer streams (q, dout) tiles of ``BLOCK_M`` query rows, and the matching ``BLOCK_M`` values of the
  log2 lse and delta (1-D TMA loads: each of those contiguous ``(batch, nheads, seqlen_q)`` buffers is read
  as one vector; a TMA coordinate must address a 16-byte boundary, else the copy faults with an illegal
  instruction, so ``seqlen_q`` is a multiple of 4 and both buffers start 16-byte aligned), through a ``STAGES``-deep shared-memory ring: one "ready" mbarrier per slot expecting the
  four loads' bytes, one "free" mbarrier per slot on which every consumer arrives once done with the tile.
  q / dout rows past ``seqlen_q`` read as zero (TMA bounds).
* Each consumer, per query tile (transposed tiles: keys x queries): ``S^T = K Q^T`` and ``dP^T = V dO^T``
  issued back to back as async wgmma; ``P^T = exp2(S^T * scale_log2 - lse2)`` while ``dP^T`` is still on the
  tensor cores; ``dV += P^T dO`` issued (P^T from registers) before waiting for ``dP^T``;
  ``dS^T = P^T (dP^T - delta)`` while ``dV`` runs; ``dK += dS^T Q``; then the slot is released.
  lse2 / delta are read from shared memory where needed (16 values per thread in the transposed layout:
  held in registers across the tile they would spill); query rows past ``seqlen_q`` get ``lse2 = +inf``
  (P = 0) and ``delta = 0``.
* Causal (bottom-right aligned, ``diag = seqlen_k - seqlen_q``: key ``j`` visible from query ``i`` iff
  ``j <= i + diag``): query tiles that see no key of the CTA are skipped, the diagonal tiles are masked, the
  tiles below them run without a mask.
* Masked entries of ``dS^T`` are ``P^T = 0`` times ``dP^T - delta``: zero for finite inputs. A non-finite
  ``dout`` / ``delta`` row in a diagonal tile reaches the dK rows of keys it cannot see, which the Triton pass
  zeroes explicitly; the extra select costs the d128 causal build 164 more bytes of spills
  (``scripts/gluon_bwd_probe.py``: 56 -> 220), so it is left out.
* Finally ``dK *= softmax_scale``; dK / dV go through the (now free) K / V shared-memory tiles and TMA stores
  (rows past ``seqlen_k`` are clipped).

Offline sm_90 compile (``scripts/gluon_bwd_probe.py``, Triton 3.6): every variant (d64 / d128, causal or not,
GQA group 1 / 4, bf16 / fp16) compiles; d64: 84 KB of shared memory, no spills; d128: 132 KB, 8 (non-causal)
/ 56 (causal) bytes of scalar spills, 0-3 local loads per tile. Per query tile and consumer the loop has 32
MUFU.EX2 and 24 (d128) / 16 (d64) HGMMA (S^T, dP^T from shared memory; dV, dK with P^T / dS^T from registers).
Numerics and speed on a GPU: ``tests/test_gluon_dkdv_gpu.py`` and ``bench/bench_gluon_bwd.py``.

Scope (:func:`supports`): dense ``(batch, seqlen, nheads, headdim)`` bf16/fp16, head dim 64 or 128, causal or
not, GQA/MQA, any ``softmax_scale > 0``; TMA-compatible strides. :mod:`fa_backward.launch` takes it, on the
buffers the dQ pass has filled, from ``GLUON_DKDV_MIN_FLOPS`` (per head dim, the measured range where it is
faster: ``bench/results/*-gluon-thresholds.md``); :func:`dkdv` runs it directly. This module imports under any Triton: the kernels are defined only where
:func:`fa_core.gluon._gluon_importable` says Triton 3.6's Gluon is there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fa_backward._gluon_checks import HEAD_DIMS, LOG2E, available, dense_reason, layout_reason, options_reason
from fa_core.errors import FlashAttnValueError
from fa_core.gluon import _gluon_importable

__all__ = ["CONFIGS", "HEAD_DIMS", "available", "dkdv", "prepare", "supports", "unsupported_reason"]


#: head dim -> tile configuration: ``NCONS`` consumer warpgroups of ``BLOCK_N`` key rows each (the CTA's key
#: block is ``NCONS * BLOCK_N``), query tiles of ``BLOCK_M`` rows through a ``STAGES``-deep ring, registers
#: split by setmaxnreg between the consumers and the producer warp (FlashAttention-3's d128 backward shape:
#: two warpgroups over 128 keys, 64-row query tiles; here without its dQ accumulation, which the dQ pass does).
CONFIGS: dict[int, dict[str, int]] = {
    64: dict(BLOCK_M=64, BLOCK_N=64, NCONS=2, STAGES=3, CONSUMER_REGS=232, PRODUCER_REGS=40, num_warps=4),
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

    from fa_core.gluon._hopper_parts import _as4d, _mma_layout, _smem_layout

    @gluon.jit
    def _q_range(n0, seqlen_q, seqlen_k, KEYS: gl.constexpr, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
        """Query tiles of key rows [n0, n0 + KEYS) as ``(lo, full_lo, hi)``: tiles [lo, hi) hold every query
        that sees one of the keys, tiles [full_lo, hi) see all of them (no causal mask)."""
        hi = (seqlen_q + BLOCK_M - 1) // BLOCK_M
        if CAUSAL:
            diag = seqlen_k - seqlen_q
            lo = gl.minimum(gl.maximum(n0 - diag, 0) // BLOCK_M, hi)
            full = gl.maximum(n0 + KEYS - 1 - diag, 0)
            full_lo = gl.minimum(gl.maximum((full + BLOCK_M - 1) // BLOCK_M, lo), hi)
        else:
            lo = 0
            full_lo = 0
        return lo, full_lo, hi

    @gluon.jit
    def _dkdv_tile(
        dk,
        dv,
        k_me,
        v_me,
        ring,
        ready_bars,
        free_bars,
        m0,
        r,
        n_me,
        seqlen_q,
        diag,
        scale_log2,
        s_layout: gl.constexpr,
        a_layout: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        MASK: gl.constexpr,
    ):
        """One query tile (ring position ``r``, rows [m0, m0 + BLOCK_M)) of one consumer: returns dK, dV.
        ``ring`` = (q, dout, lse2, delta) shared-memory rings."""
        q_smem, do_smem, lse_smem, delta_smem = ring
        dtype: gl.constexpr = q_smem.dtype
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        slot = r % STAGES
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
        mbarrier.wait(ready_bars.index(slot), (r // STAGES) & 1)
        q_s = q_smem.index(slot)
        do_s = do_smem.index(slot)
        s_tok = warpgroup_mma(k_me, q_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v_me, do_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        cols = m0 + gl.arange(0, BLOCK_M, layout=col_layout)
        in_q = cols < seqlen_q
        # the 1-D loads run on past the head's rows: +inf there (P = 0)
        lse2 = gl.where(in_q, lse_smem.index(slot).load(col_layout), float("inf"))
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        p = gl.exp2(s * scale_log2 - gl.expand_dims(lse2, 0))
        if MASK:
            keys = n_me + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
            keep = gl.expand_dims(keys, 1) <= gl.expand_dims(cols, 0) + diag
            p = gl.where(keep, p, 0.0)
        p_op = gl.convert_layout(p.to(dtype), a_layout)
        dv_tok = warpgroup_mma(p_op, do_s, dv, is_async=True)
        delta = gl.where(in_q, delta_smem.index(slot).load(col_layout), 0.0)
        dp = warpgroup_mma_wait(1, deps=(dp_tok,))
        ds = p * (dp - gl.expand_dims(delta, 0))
        ds_op = gl.convert_layout(ds.to(dtype), a_layout)
        dk_tok = warpgroup_mma(ds_op, q_s, dk, is_async=True)
        dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
        # this consumer is done with the slot
        mbarrier.arrive(free_bars.index(slot), count=1)
        return dk, dv

    @gluon.jit
    def _consumer(
        k_smem,
        v_smem,
        ring,
        bars,
        dk_desc,
        dv_desc,
        b,
        hk,
        n0,
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
        NCONS: gl.constexpr,
        ME: gl.constexpr,
    ):
        """Consumer ``ME``: dK / dV of key rows [n0 + ME * BLOCK_N, + BLOCK_N), over the group's q heads.
        ``bars`` = (kv_bar, ready_bars, free_bars)."""
        kv_bar, ready_bars, free_bars = bars
        s_layout: gl.constexpr = _mma_layout(4, BLOCK_M)
        kv_layout: gl.constexpr = _mma_layout(4, HEAD_DIM)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
        k_me = k_smem.index(ME)
        v_me = v_smem.index(ME)
        n_me = n0 + ME * BLOCK_N
        diag = seqlen_k - seqlen_q
        lo, full_lo, hi = _q_range(n0, seqlen_q, seqlen_k, NCONS * BLOCK_N, BLOCK_M, CAUSAL)
        n_tiles = hi - lo
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
        mbarrier.wait(kv_bar, 0)
        for g in range(group):
            r0 = g * n_tiles - lo
            if CAUSAL:
                # the diagonal tiles: queries that see only part of the CTA's keys
                for t in range(lo, full_lo):
                    dk, dv = _dkdv_tile(
                        dk, dv, k_me, v_me, ring, ready_bars, free_bars, t * BLOCK_M, r0 + t, n_me, seqlen_q, diag,
                        scale_log2, s_layout, a_layout, BLOCK_M, BLOCK_N, STAGES, True,
                    )  # fmt: skip
            for t in range(full_lo, hi):
                dk, dv = _dkdv_tile(
                    dk, dv, k_me, v_me, ring, ready_bars, free_bars, t * BLOCK_M, r0 + t, n_me, seqlen_q, diag,
                    scale_log2, s_layout, a_layout, BLOCK_M, BLOCK_N, STAGES, False,
                )  # fmt: skip
        dk = dk * sm_scale
        # K / V of this consumer are no longer read: their tiles stage dK / dV for the TMA stores
        dtype: gl.constexpr = k_smem.dtype
        k_me.store(dk.to(dtype))
        v_me.store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [b, n_me, hk, 0], _as4d(k_me, dk_desc))
        tma.async_copy_shared_to_global(dv_desc, [b, n_me, hk, 0], _as4d(v_me, dv_desc))
        tma.store_wait(0)

    @gluon.jit
    def _producer(
        descs,
        k_smem,
        v_smem,
        ring,
        bars,
        b,
        hk,
        n0,
        seqlen_q,
        seqlen_k,
        group,
        nheads,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        NCONS: gl.constexpr,
    ):
        """The TMA warp: K / V of every consumer once, then (q, dout, lse2, delta) tiles of every q head of the
        group, in the consumers' order. ``descs`` = (q, k, v, dout, lse2, delta) descriptors."""
        q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc = descs
        q_smem, do_smem, lse_smem, delta_smem = ring
        kv_bar, ready_bars, free_bars = bars
        mbarrier.expect(kv_bar, NCONS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for c in gl.static_range(NCONS):
            tma.async_copy_global_to_shared(
                k_desc, [b, n0 + c * BLOCK_N, hk, 0], kv_bar, _as4d(k_smem.index(c), k_desc)
            )
            tma.async_copy_global_to_shared(
                v_desc, [b, n0 + c * BLOCK_N, hk, 0], kv_bar, _as4d(v_smem.index(c), v_desc)
            )
        lo, full_lo, hi = _q_range(n0, seqlen_q, seqlen_k, NCONS * BLOCK_N, BLOCK_M, CAUSAL)
        n_tiles = gl.maximum(hi - lo, 1)
        tile_bytes: gl.constexpr = (
            q_desc.block_type.nbytes
            + do_desc.block_type.nbytes
            + lse_desc.block_type.nbytes
            + delta_desc.block_type.nbytes
        )
        for r in range(group * (hi - lo)):
            g = r // n_tiles
            m0 = (lo + r - g * n_tiles) * BLOCK_M
            h = hk * group + g
            slot = r % STAGES
            # every consumer released the slot's previous tile (r - STAGES); the first pass is free
            mbarrier.wait(free_bars.index(slot), ((r // STAGES) & 1) ^ 1, pred=r >= STAGES)
            bar = ready_bars.index(slot)
            mbarrier.expect(bar, tile_bytes)
            tma.async_copy_global_to_shared(q_desc, [b, m0, h, 0], bar, _as4d(q_smem.index(slot), q_desc))
            tma.async_copy_global_to_shared(do_desc, [b, m0, h, 0], bar, _as4d(do_smem.index(slot), do_desc))
            # lse2 / delta: (batch, nheads, seqlen_q) seen as one vector (see dkdv's host code)
            row = (b * nheads + h) * seqlen_q + m0
            tma.async_copy_global_to_shared(lse_desc, [row], bar, lse_smem.index(slot))
            tma.async_copy_global_to_shared(delta_desc, [row], bar, delta_smem.index(slot))

    @gluon.jit
    def attn_bwd_dkdv_ws(
        q_desc,
        k_desc,
        v_desc,
        do_desc,
        dk_desc,
        dv_desc,
        lse_desc,
        delta_desc,
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
        NCONS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Grid ``(cdiv(seqlen_k, NCONS * BLOCK_N), nheads_k, batch)``, ``num_warps=4`` (the first consumer).

        Descriptors: rank-4 over ``(batch, seqlen, nheads, headdim)``: q / dout with blocks ``[1, BLOCK_M, 1,
        HEAD_DIM]``, k / v / dk / dv with ``[1, BLOCK_N, 1, HEAD_DIM]``; rank-1 over the float32 log2 lse and
        delta of the dQ pass, contiguous ``(batch, nheads, seqlen_q)`` starting 16-byte aligned, with
        ``seqlen_q % 4 == 0`` so every row's coordinate is a 16-byte boundary, as TMA requires; blocks of
        ``BLOCK_M``. Key blocks run
        first-first: under a causal mask the first ones see the most queries."""
        n0 = gl.program_id(0) * (NCONS * BLOCK_N)
        hk = gl.program_id(1)
        b = gl.program_id(2)
        nheads = gl.num_programs(1) * group
        dtype: gl.constexpr = q_desc.dtype
        smem_layout: gl.constexpr = _smem_layout(dtype.primitive_bitwidth)
        k_smem = gl.allocate_shared_memory(dtype, [NCONS, BLOCK_N, HEAD_DIM], smem_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NCONS, BLOCK_N, HEAD_DIM], smem_layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], smem_layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], smem_layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready_bars.index(i), count=1)
            mbarrier.init(free_bars.index(i), count=NCONS)
        fence_async_shared()
        ring = (q_smem, do_smem, lse_smem, delta_smem)
        bars = (kv_bar, ready_bars, free_bars)
        descs = (q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc)
        if NCONS == 1:
            gl.warp_specialize(
                [
                    (_consumer, (k_smem, v_smem, ring, bars, dk_desc, dv_desc, b, hk, n0, seqlen_q, seqlen_k, group,
                                 scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, NCONS, 0)),
                    (_producer, (descs, k_smem, v_smem, ring, bars, b, hk, n0, seqlen_q, seqlen_k, group, nheads,
                                 BLOCK_M, BLOCK_N, STAGES, CAUSAL, NCONS)),
                ],
                [1],
                [PRODUCER_REGS],
            )  # fmt: skip
        elif NCONS == 2:
            gl.warp_specialize(
                [
                    (_consumer, (k_smem, v_smem, ring, bars, dk_desc, dv_desc, b, hk, n0, seqlen_q, seqlen_k, group,
                                 scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, NCONS, 0)),
                    (_consumer, (k_smem, v_smem, ring, bars, dk_desc, dv_desc, b, hk, n0, seqlen_q, seqlen_k, group,
                                 scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, NCONS, 1)),
                    (_producer, (descs, k_smem, v_smem, ring, bars, b, hk, n0, seqlen_q, seqlen_k, group, nheads,
                                 BLOCK_M, BLOCK_N, STAGES, CAUSAL, NCONS)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )  # fmt: skip
        else:
            gl.warp_specialize(
                [
                    (_consumer, (k_smem, v_smem, ring, bars, dk_desc, dv_desc, b, hk, n0, seqlen_q, seqlen_k, group,
                                 scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, NCONS, 0)),
                    (_consumer, (k_smem, v_smem, ring, bars, dk_desc, dv_desc, b, hk, n0, seqlen_q, seqlen_k, group,
                                 scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, NCONS, 1)),
                    (_consumer, (k_smem, v_smem, ring, bars, dk_desc, dv_desc, b, hk, n0, seqlen_q, seqlen_k, group,
                                 scale_log2, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, NCONS, 2)),
                    (_producer, (descs, k_smem, v_smem, ring, bars, b, hk, n0, seqlen_q, seqlen_k, group, nheads,
                                 BLOCK_M, BLOCK_N, STAGES, CAUSAL, NCONS)),
                ],
                [4, 4, 1],
                [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
            )  # fmt: skip
        mbarrier.invalidate(kv_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready_bars.index(i))
            mbarrier.invalidate(free_bars.index(i))


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse2: torch.Tensor,
    delta: torch.Tensor,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    check_device: bool = True,
    **extras: Any,
) -> str | None:
    """Why :func:`dkdv` cannot take these arguments, or None when it can (see :func:`supports`)."""
    reason = dense_reason(q, k, v, [("dout", dout)], check_device)
    if reason is not None:
        return reason
    batch, seqlen_q, nheads, _ = q.shape
    if max(seqlen_q, k.shape[1], batch * nheads * seqlen_q + 4) >= 2**31:
        return "sizes must fit int32 (batch * nheads * seqlen_q included)"
    # lse2 / delta rows are TMA loads of one vector at element (b * nheads + h) * seqlen_q + m0: a TMA
    # coordinate must address a 16-byte boundary (else the copy faults with an illegal instruction), so
    # seqlen_q a multiple of 4 and both vectors 16-byte aligned; other calls keep the Triton pass
    if seqlen_q % 4:
        return "seqlen_q must be a multiple of 4 (lse2 / delta rows are read through TMA)"
    for name, t in (("lse2", lse2), ("delta", delta)):
        if t.dtype != torch.float32 or tuple(t.shape) != (batch, nheads, seqlen_q) or not t.is_contiguous():
            return f"{name} must be a contiguous float32 (batch, nheads, seqlen_q) tensor"
        if t.data_ptr() % 16:
            return f"{name} must start 16-byte aligned (TMA)"
    outs = [(name, t) for name, t in (("dk", dk), ("dv", dv)) if t is not None]
    for name, o in outs:
        if o.shape != k.shape or o.dtype != q.dtype:
            return f"{name} must have k's shape and q's dtype"
    return options_reason(softmax_scale, extras) or layout_reason(
        q, [("q", q), ("k", k), ("v", v), ("dout", dout), *outs], (lse2, delta), check_device
    )


def supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse2: torch.Tensor,
    delta: torch.Tensor,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    **extras: Any,
) -> bool:
    """Whether :func:`dkdv` handles this call.

    True only for: :func:`available` on q's device; bf16/fp16 ``q, dout (b, s_q, h, d)``, ``k, v (b, s_k, h_k,
    d)`` with ``d`` in {64, 128} and ``h % h_k == 0``, no empty dim, ``b * h * s_q < 2**31 - 4``, ``s_q`` a
    multiple of 4; ``lse2``, ``delta`` contiguous float32 ``(b, h, s_q)`` starting 16-byte aligned (the
    kernel reads each as one vector through TMA, whose coordinates must address 16-byte boundaries); ``dk``,
    ``dv`` (if given) of k's shape and q's dtype; causal or not;
    ``softmax_scale`` None or finite > 0; every stride but the last (which is 1) and the base 16-byte aligned
    for q, k, v, dout, dk, dv (TMA); every tensor on q's device. Any further keyword (``softcap``,
    ``alibi_slopes``, ``dropout_p``, ...) must be None / False / 0, ``window_size`` also ``(-1, -1)``.
    """
    reason = unsupported_reason(
        q, k, v, dout, lse2, delta, dk, dv, causal=causal, softmax_scale=softmax_scale, **extras
    )
    return reason is None


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse2: torch.Tensor,
    delta: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    config: dict[str, int] | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any], int, tuple[int, int, int]]:
    """Build (kernel, runtime args by name, constexprs by name, num_warps, grid) for one call (shapes as
    :func:`dkdv`); works on CPU tensors too (offline compiles: ``scripts/gluon_bwd_probe.py``)."""
    if not _gluon_importable():
        raise FlashAttnValueError("fa_backward.gluon_dkdv needs Triton 3.6 with Gluon's Hopper modules")
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from fa_core.gluon._launch import _desc as desc  # rank-4 (b, s, h, d), block [1, rows, 1, d]
    from fa_core.gluon._launch import shared_layout

    def vec_desc(t: torch.Tensor, rows: int) -> Any:
        # a contiguous float32 tensor (16-byte aligned: see unsupported_reason) as one vector
        return TensorDescriptor(t.view(-1), [t.numel()], [1], [rows], shared_layout((rows,), torch.float32))

    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    cfg = {**CONFIGS[head_dim], **(config or {})}  # a partial override keeps the tuned rest
    num_warps = cfg.pop("num_warps")
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    lse_desc = vec_desc(lse2, block_m)
    delta_desc = vec_desc(delta, block_m)
    args: dict[str, Any] = dict(
        q_desc=desc(q, block_m),
        k_desc=desc(k, block_n),
        v_desc=desc(v, block_n),
        do_desc=desc(dout, block_m),
        dk_desc=desc(dk, block_n),
        dv_desc=desc(dv, block_n),
        lse_desc=lse_desc,
        delta_desc=delta_desc,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        group=nheads // nheads_k,
        scale_log2=float(softmax_scale) * LOG2E,
        sm_scale=float(softmax_scale),
    )
    constexprs: dict[str, Any] = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), num_warps=num_warps, **cfg)
    grid = (math.ceil(seqlen_k / (cfg["NCONS"] * block_n)), nheads_k, batch)
    return attn_bwd_dkdv_ws, args, constexprs, num_warps, grid


def dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse2: torch.Tensor,
    delta: torch.Tensor,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dK and dV of dense attention on Hopper, from the dQ pass's ``lse2`` and ``delta``.

    Args:
        q, dout: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)``;
            bf16/fp16, ``headdim`` 64 or 128, ``nheads % nheads_k == 0`` (see :func:`supports`).
        lse2: contiguous float32 ``(batch, nheads, seqlen_q)``: the forward's lse in log2 units (``lse * log2(e)``; +inf
            for a row that sees no key), as the dQ pass of :mod:`fa_backward.launch` writes it.
        delta: contiguous float32 ``(batch, nheads, seqlen_q)``: ``rowsum(dout * out)``, as the dQ pass writes it.
        dk, dv: optional ``(batch, seqlen_k, nheads_k, headdim)`` outputs of q's dtype (TMA-compatible strides).
        causal: bottom-right aligned causal mask (query i sees keys j <= i + seqlen_k - seqlen_q).
        softmax_scale: defaults to ``headdim ** -0.5``; must be > 0.
        config: tile override (see :data:`CONFIGS`).

    Returns:
        ``(dk, dv)``, each ``(batch, seqlen_k, nheads_k, headdim)``; dK / dV of a kv head are summed over the
        q heads of its group; keys no query sees get 0.

    Raises:
        FlashAttnValueError: the arguments are outside :func:`supports` (the message says which one).
    """
    reason = unsupported_reason(
        q, k, v, dout, lse2, delta, dk, dv, causal=causal, softmax_scale=softmax_scale
    )
    if reason is not None:
        raise FlashAttnValueError(f"fa_backward.gluon_dkdv.dkdv: {reason}")
    if dk is None:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    if dv is None:
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kernel, args, constexprs, _, grid = prepare(q, k, v, dout, lse2, delta, dk, dv, scale, causal, config)
    with torch.cuda.device(q.device):
        kernel[grid](**args, **constexprs)
    return dk, dv
