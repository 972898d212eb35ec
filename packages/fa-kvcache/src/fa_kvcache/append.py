"""Triton kernel of the cache append: new k (rotated when cos/sin are given) and v written into a contiguous
or paged cache at each sequence's ``cache_seqlens`` (launched by
:func:`fa_kvcache.interface.append_to_cache`). Rows are addressed through
:func:`fa_kvcache.kernels.page_offsets`, the split-KV kernel's own paging rule."""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.forward_configs import next_pow2
from fa_core.rotary import load_cos_sin, rotary_pair_cols, rotate_pair
from fa_kvcache.kernels import clamp_index, page_offsets


def append_dims(d: int, dv: int, has_rot: bool, rot_dim: int, interleaved: bool) -> dict[str, object]:
    """The head-dim and rotary constexprs that both append kernels take (this module's ``append_kernel`` and
    ``fa_kvcache.unified_kernels.append_paged_kernel``): key / value head dims, their power-of-two tile widths,
    and the rotary layout (``rot_dim``: rotated columns, 0 without rotary)."""
    return dict(
        HEADDIM=d, HEADDIM_V=dv, BLOCK_D=max(next_pow2(d), 16), BLOCK_DV=max(next_pow2(dv), 16),
        HAS_ROTARY=has_rot, ROTARY_DIM=rot_dim, BLOCK_HALF=max(next_pow2(max(rot_dim // 2, 1)), 2),
        INTERLEAVED=bool(interleaved),
    )  # fmt: skip


__all__ = ["append_kernel"]


@triton.jit
def _quant(x, mul, QUANT: tl.constexpr, dtype: tl.constexpr):
    """``x`` cast to the cache dtype; FP8: ``x * mul`` (``1 / scale``) in fp32 rounded to nearest-even at e4m3's
    3 mantissa bits on the fp32 bits (so the cast itself is exact: the same result on every backend, Triton's
    interpreter included), then saturated to +-448. Below e4m3's normal range (``|y| < 2^-6``) the cast rounds
    a second time to the subnormal step 2^-9."""
    if QUANT:
        y = x.to(tl.float32) * mul
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFFF + ((bits >> 20) & 1))) & -1048576  # clear the low 20 of 23 mantissa bits
        y = bits.to(tl.float32, bitcast=True)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        return y.to(dtype)
    return x.to(dtype)


@triton.jit
def _write_rows(
    k_src,
    v_src,
    k_dst,
    v_dst,
    ok,
    pos,
    Cos,
    Sin,
    seqlen_ro,
    k_mul,
    v_mul,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    QUANT: tl.constexpr,
    ROUND_NEW: tl.constexpr,
):
    """Copy ``(BLOCK_T,)`` new rows from row pointers ``k_src`` / ``v_src`` to cache row pointers ``k_dst`` /
    ``v_dst`` where ``ok``: v as is, k rotated at positions ``pos`` (cos / sin rows ``< seqlen_ro``) when
    ``HAS_ROTARY`` (channels ``[ROTARY_DIM, HEADDIM)`` pass through), each through :func:`_quant` (``QUANT``:
    times ``k_mul`` / ``v_mul`` and rounded to FP8 e4m3). ``ROUND_NEW``: without ``QUANT``, rotated values are
    rounded to k_new's dtype before the cast to the cache's. Shared by both append kernels."""
    k_ty = k_dst.dtype.element_ty
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_v = ok[:, None] & (offs_dv[None, :] < HEADDIM_V)
    vv = tl.load(v_src[:, None] + offs_dv[None, :], mask=mask_v, other=0.0)
    tl.store(v_dst[:, None] + offs_dv[None, :], _quant(vv, v_mul, QUANT, v_dst.dtype.element_ty), mask=mask_v)

    offs_d = tl.arange(0, BLOCK_D)
    if HAS_ROTARY:
        # pass-through channels [ROTARY_DIM, HEADDIM)
        mask_p = ok[:, None] & (offs_d[None, :] >= ROTARY_DIM) & (offs_d[None, :] < HEADDIM)
        kp = tl.load(k_src[:, None] + offs_d[None, :], mask=mask_p, other=0.0)
        tl.store(k_dst[:, None] + offs_d[None, :], _quant(kp, k_mul, QUANT, k_ty), mask=mask_p)
        HALF: tl.constexpr = ROTARY_DIM // 2
        offs_k = tl.arange(0, BLOCK_HALF)
        k0, k1 = rotary_pair_cols(offs_k, HALF, INTERLEAVED)
        mask_r = ok[:, None] & (offs_k[None, :] < HALF)
        cos, sin = load_cos_sin(Cos, Sin, pos, offs_k, HALF, mask_r & (pos[:, None] < seqlen_ro))
        x0 = tl.load(k_src[:, None] + k0[None, :], mask=mask_r, other=0.0).to(tl.float32)
        x1 = tl.load(k_src[:, None] + k1[None, :], mask=mask_r, other=0.0).to(tl.float32)
        o0, o1 = rotate_pair(x0, x1, cos, sin)
        if ROUND_NEW and not QUANT:
            # round the rotated values to k's dtype first, as a rotated k_new then cast would be
            o0 = o0.to(k_src.dtype.element_ty)
            o1 = o1.to(k_src.dtype.element_ty)
        tl.store(k_dst[:, None] + k0[None, :], _quant(o0, k_mul, QUANT, k_ty), mask=mask_r)
        tl.store(k_dst[:, None] + k1[None, :], _quant(o1, k_mul, QUANT, k_ty), mask=mask_r)
    else:
        mask_k = ok[:, None] & (offs_d[None, :] < HEADDIM)
        kk = tl.load(k_src[:, None] + offs_d[None, :], mask=mask_k, other=0.0)
        tl.store(k_dst[:, None] + offs_d[None, :], _quant(kk, k_mul, QUANT, k_ty), mask=mask_k)


@triton.jit
def append_kernel(
    Knew,
    Vnew,
    K,
    V,
    BlockTable,
    CacheSeqlens,
    CacheBatchIdx,
    Cos,
    Sin,
    stride_knb,
    stride_knm,
    stride_knh,
    stride_vnb,
    stride_vnm,
    stride_vnh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_btb,
    seqlen_new,
    cache_seqlen_int,
    capacity,
    num_blocks,
    batch_cache,
    seqlen_ro,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    SEQLENS_TENSOR: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Grid ``(cdiv(seqlen_new, BLOCK_T), batch, nheads_k)``: write new k (rotated) and v into the cache.

    Token ``t`` of sequence ``b`` goes to cache row ``cache_seqlens[b] + t`` (also its rotary position, as
    in flash-attn, leftpad or not). Index values read from tensors never address memory unclamped:
    ``cache_seqlens`` is clamped to ``[0, capacity]``, rows at or past ``capacity`` are not written, block ids
    are clamped to ``[0, num_blocks)`` and ``cache_batch_idx`` to ``[0, batch_cache)`` (the host-side value
    checks, when on, report such values before anything is written). Rotary in fp32, rounded once, like
    ``fa_core.rotary``.
    """
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if SEQLENS_TENSOR:
        cache_len = tl.load(CacheSeqlens + b).to(tl.int32)
    else:
        cache_len = cache_seqlen_int
    cache_len = tl.minimum(tl.maximum(cache_len, 0), capacity)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = cache_len + t
    ok = (t < seqlen_new) & (pos < capacity) & (pos >= 0)
    if PAGED:
        bt_base = BlockTable + b.to(tl.int64) * stride_btb
        blk = tl.load(bt_base + pos // PAGE, mask=ok, other=0)
        k_off, v_off = page_offsets(blk, pos, stride_kb, stride_kn, stride_vb, stride_vn, num_blocks, PAGE)
        k_dst = K + h.to(tl.int64) * stride_kh + k_off
        v_dst = V + h.to(tl.int64) * stride_vh + v_off
    else:
        cb = b
        if HAS_BATCH_IDX:
            cb = clamp_index(tl.load(CacheBatchIdx + b), batch_cache)
        k_dst = K + cb.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + pos.to(tl.int64) * stride_kn
        v_dst = V + cb.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + pos.to(tl.int64) * stride_vn
    k_src = Knew + b.to(tl.int64) * stride_knb + h.to(tl.int64) * stride_knh + t.to(tl.int64) * stride_knm
    v_src = Vnew + b.to(tl.int64) * stride_vnb + h.to(tl.int64) * stride_vnh + t.to(tl.int64) * stride_vnm

    _write_rows(
        k_src, v_src, k_dst, v_dst, ok, pos, Cos, Sin, seqlen_ro, 1.0, 1.0, HEADDIM=HEADDIM, HEADDIM_V=HEADDIM_V,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, HAS_ROTARY=HAS_ROTARY, ROTARY_DIM=ROTARY_DIM, BLOCK_HALF=BLOCK_HALF,
        INTERLEAVED=INTERLEAVED, QUANT=False, ROUND_NEW=False,
    )  # fmt: skip
