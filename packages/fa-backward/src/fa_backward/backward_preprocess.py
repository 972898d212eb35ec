"""Backward preprocess kernel: ``delta = rowsum(dout * out)`` (minus ``dlse`` when the lse output is
differentiated), float32, laid out like the lse. Run before the dK/dV and dQ passes of
:mod:`fa_backward.backward_kernel`.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["preprocess_kernel"]

# Kernel code keeps Triton's customary compact argument lists (one line per group of strides / flags).
# fmt: off


# ------------------------------------------------------------------------------------------ preprocess
@triton.jit
def _bwd_preprocess(
    Out, DO, Delta, DLse,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_deltab, stride_deltah, stride_dlb, stride_dlh,
    seqlen_q,
    HEADDIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Grid ``(cdiv(seqlen_q, BLOCK_M), nheads, batch)``; varlen runs it as one sequence of ``total_q`` rows.
    ``delta = rowsum(dout * out)``, minus ``dlse`` when the lse output is differentiated."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEADDIM_V)
    o_ptrs = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    do_ptrs = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    o = tl.load(o_ptrs + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptrs + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        dl_ptrs = DLse + off_b.to(tl.int64) * stride_dlb + off_h.to(tl.int64) * stride_dlh + offs_m
        delta = delta - tl.load(dl_ptrs, mask=offs_m < seqlen_q, other=0.0).to(tl.float32)
    d_ptrs = Delta + off_b.to(tl.int64) * stride_deltab + off_h.to(tl.int64) * stride_deltah + offs_m
    tl.store(d_ptrs, delta, mask=offs_m < seqlen_q)


# fmt: on
preprocess_kernel = _bwd_preprocess
