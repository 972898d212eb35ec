"""Host launchers of the forward kernels: kernel arguments (strides, pointers, constexpr flags) from
validated inputs, and the on-device tensor-descriptor (TMA) setup.

:func:`launch_forward` runs :func:`fa_core.forward_kernel.fwd_kernel`; :func:`launch_probs` the test-only
probabilities kernel. Inputs are validated by :mod:`fa_core.forward` before they get here.
"""

from __future__ import annotations

import functools
import threading

import torch
import triton
import triton.language as tl

from fa_core import settings
from fa_core import validation as V
from fa_core.fast_launch import FastLaunch, empty_arg
from fa_core.forward_configs import MAX_BLOCK_M, cdiv, next_pow2, seq_bucket
from fa_core.forward_kernel import fwd_kernel
from fa_core.fp8 import transposed_v
from fa_core.masking import has_right_edge, has_window_left, normalize_window
from fa_core.probs_kernel import probs_kernel
from fa_core.scheduling import lpt_section
from fa_core.sparse_args import full_blocks, sparse_args

__all__ = ["fwd_launch", "launch_forward", "launch_probs", "tma_ok"]

# launches skip Triton's per-call Python once a specialization is compiled (fa_core.fast_launch)
fwd_launch = FastLaunch(fwd_kernel)
probs_launch = FastLaunch(probs_kernel)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Use on-device tensor descriptors (TMA) on Hopper+ when every stride and base is 16-byte aligned."""
    t0 = tensors[0]
    if not t0.is_cuda or not settings.get().tma or V.interpreting():
        return False
    if not hasattr(tl, "make_tensor_descriptor") or _major(t0.device.index) < 9:
        return False
    for t in tensors:
        size = t.element_size()
        # a zero stride (a broadcast view) is left to the pointer loads: a descriptor's row stride must be real
        if t.data_ptr() % 16 or any((s * size) % 16 or s == 0 for s in t.stride()[:-1]):
            return False
    _ensure_allocator()
    return True


@functools.cache
def _major(device_index: int | None) -> int:
    # cached: torch.cuda.get_device_capability costs microseconds on every launch
    return torch.cuda.get_device_capability(device_index)[0]


try:  # Triton keeps its allocator in a ContextVar: one value per thread (and per asyncio context)
    from triton.runtime._allocation import NullAllocator as _NullAllocator
    from triton.runtime._allocation import _allocator as _ALLOCATOR
except Exception:  # private API moved: _ensure_allocator installs ours once per thread
    _NullAllocator = _ALLOCATOR = None
_SET_IN_THREAD = threading.local()

#: Tests set this (pytest's monkeypatch) to run 16-bit inputs through the FP8 path's data layout.
FP8_LAYOUT_FOR_16BIT = False


def _torch_scratch(size: int, align: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """On-device descriptors need a small global scratch buffer; install a torch-backed allocator unless one is
    set. Checked on every call: Triton's allocator lives in a ContextVar, so one set on the main thread is not
    seen by the autograd engine's threads, where the backward's descriptor kernels launch."""
    if _ALLOCATOR is not None:
        if isinstance(_ALLOCATOR.get(), _NullAllocator):
            triton.set_allocator(_torch_scratch)
    elif not getattr(_SET_IN_THREAD, "done", False):
        triton.set_allocator(_torch_scratch)
        _SET_IN_THREAD.done = True


def launch_forward(
    q,
    k,
    v,
    out,
    lse,
    *,
    varlen,
    batch,
    max_seqlen_q,
    max_seqlen_k,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    dropout_p,
    rng_state,
    attention_chunk=0,
    learnable_sink=None,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    descale=None,
    leftpad_k=None,
    block_table=None,
):
    """Launch :func:`fwd_kernel` writing ``out`` and ``lse``; return the normalised window
    ``(left, right, is_local)`` (for :func:`launch_probs`).

    Varlen only: ``leftpad_k`` ``(batch,)`` int32, sequence b's keys start ``leftpad_k[b]`` rows into its slice
    and its length shrinks by as much; ``block_table`` ``(batch, max_pages)`` int32 with k / v a paged cache
    ``(num_pages, page_size, nheads_k, d)`` (page size a power of two >= 16): the kernel reads the keys
    through the table, ``cu_seqlens_k`` / ``seqused_k`` give the lengths."""
    paged = block_table is not None
    nheads, nheads_k, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    is_fp8 = descale is not None
    # FP8_LAYOUT_FOR_16BIT (tests): 16-bit inputs take the FP8 path's layout too (transposed V, shifted P), so
    # that the CPU interpreter, which cannot run FP8 dots, tests that layout
    v_t = is_fp8 or FP8_LAYOUT_FOR_16BIT
    if v_t:
        if paged:
            raise V.FlashAttnValueError("block_table is not supported with FP8 inputs (or the FP8 layout)")
        v = transposed_v(v, varlen)
    sv = v.stride()
    # paged: the batch stride slot carries the page stride
    stride_vb = sv[0] if paged or not varlen else 0
    # (stride_vb, stride_vn, stride_vh, stride_vd); the keys-last copy: keys contiguous, stride_vd between headdim rows
    v_strides = (stride_vb, 1, sv[-3], sv[-2]) if v_t else (stride_vb, sv[-3], sv[-2], 0)
    full = full_blocks(block_mask)
    # fp8 tensor-core dots need K >= 32
    min_block = 32 if is_fp8 else 16
    left, right, is_local = normalize_window(causal, window_size)
    has_left = has_window_left(is_local, left)
    # stride tuples once per tensor: each .stride(i) call costs ~0.5 us on the launch path
    sq, sk, so, sl = q.stride(), k.stride(), out.stride(), lse.stride()
    if varlen:
        sq_b = sk_b = 0
        stride_qb = stride_kb = stride_ob = 0
        stride_lb, stride_lh = 0, sl[0]
        if paged:
            stride_kb = sk[0]
    else:
        sq_b, sk_b = q.shape[1], k.shape[1]
        stride_qb, stride_kb, stride_ob = sq[0], sk[0], so[0]
        stride_lb, stride_lh = sl[0], sl[1]
    alibi = alibi_slopes if alibi_slopes is not None else empty_arg(q, torch.float32)
    stride_alb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    dummy_i32 = cu_seqlens_q if cu_seqlens_q is not None else empty_arg(q, torch.int32)
    # a CPU tensor's .tolist() still costs microseconds: only dropout reads the pair
    seed, offset = (int(x) for x in rng_state.tolist()) if dropout_p > 0 else (0, 0)

    def grid(meta):
        return (cdiv(max_seqlen_q, meta["BLOCK_M"]), nheads, batch)

    fwd_launch(
        grid,
        q,
        k,
        v,
        out,
        lse,
        stride_qb,
        sq[-3],
        sq[-2],
        stride_kb,
        sk[-3],
        sk[-2],
        *v_strides,
        stride_ob,
        so[-3],
        so[-2],
        stride_lb,
        stride_lh,
        cu_seqlens_q if varlen else dummy_i32,
        cu_seqlens_k if varlen else dummy_i32,
        seqused_k if seqused_k is not None else dummy_i32,
        sq_b,
        sk_b,
        nheads,
        nheads // nheads_k,
        softmax_scale,
        float(softcap),
        alibi,
        stride_alb,
        descale if is_fp8 else alibi,
        descale.stride(0) if is_fp8 else 0,
        descale.stride(1) if is_fp8 else 0,
        *sparse_args(block_mask, dummy_i32),
        left,
        right,
        attention_chunk,
        learnable_sink if learnable_sink is not None else alibi,
        float(dropout_p),
        seed,
        offset,
        seq_bucket(max_seqlen_q),
        seq_bucket(max_seqlen_k),
        # bounds of the values read from index tensors (the kernel clamps them: fa_core.masking.varlen_bounds)
        total_q=q.shape[0] if varlen else 0,
        total_k=k.shape[0] if varlen and not paged else 0,
        LeftPad=leftpad_k if leftpad_k is not None else dummy_i32,
        BlockTable=block_table if paged else dummy_i32,
        stride_bt_b=block_table.stride(0) if paged else 0,
        bt_cols=block_table.shape[1] if paged else 0,
        num_pages=k.shape[0] if paged else 0,
        kv_idx_cols=block_mask.kv_indices.shape[-1] if block_mask is not None else 0,
        full_idx_cols=full[1].shape[-1] if full is not None else 0,
        HAS_LEFTPAD=leftpad_k is not None,
        PAGED=paged,
        PAGE_SIZE=k.shape[1] if paged else 16,
        HEADDIM=d,
        HEADDIM_V=dv,
        BLOCK_D=max(next_pow2(d), min_block),
        BLOCK_DV=max(next_pow2(dv), min_block),
        IS_VARLEN=varlen,
        HAS_SEQUSED=seqused_k is not None,
        IS_LOCAL=is_local,
        LPT=lpt_section(is_local, has_left),
        HAS_WINDOW_LEFT=has_left,
        HAS_RIGHT_EDGE=has_right_edge(varlen, is_local, attention_chunk, mask_mod, seqused_k, max_seqlen_k),
        HAS_CHUNK=attention_chunk > 0,
        score_mod_fn=score_mod,
        mask_mod_fn=mask_mod,
        HAS_SCORE_MOD=score_mod is not None,
        HAS_MASK_MOD=mask_mod is not None,
        IS_SPARSE=block_mask is not None,
        HAS_FULL=full is not None,
        SPARSE_Q=block_mask.block_size[0] if block_mask is not None else 128,
        SPARSE_KV=block_mask.block_size[1] if block_mask is not None else 128,
        HAS_SINK=learnable_sink is not None,
        IS_FP8=is_fp8,
        V_T=v_t,
        # FP8: p scaled by 2^8 before its e4m3 rounding (cancels in out = acc / l; lse subtracts it)
        P_SHIFT=8.0 if v_t else 0.0,
        # plain scores: row max on raw q @ k^T, scale folded into exp2's FMA (needs a positive scale; FP8's
        # device-side descales are handled in the kernel by flipping q's sign bits, which makes the FP8 loop
        # reload Q from shared memory every tile; that costs less than scaling every score tile)
        FUSED_SCALE=not (softcap > 0 or alibi_slopes is not None or score_mod is not None)
        and (is_fp8 or softmax_scale > 0),
        HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=dropout_p > 0,
        # paged: descriptors over the whole cache, so its pages must lie back to back (rows < 2^31)
        TMA_OK=tma_ok(q, k, v, out)
        and (
            not paged
            or (
                k.stride(0) == k.shape[1] * k.stride(1)
                and v.stride(0) == v.shape[1] * v.stride(1)
                and k.shape[0] * k.shape[1] < 2**31
            )
        ),
        # full query blocks for every tile: no row masks on Q, O, LSE
        EVEN_M=not varlen and max_seqlen_q % MAX_BLOCK_M == 0,
    )
    return left, right, is_local


def launch_probs(
    q,
    k,
    lse,
    *,
    varlen,
    batch,
    max_seqlen_q,
    max_seqlen_k,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    softmax_scale,
    window,
    softcap,
    alibi_slopes,
    dropout_p,
    rng_state,
    attention_chunk=0,
    learnable_sink=None,
    score_mod=None,
    mask_mod=None,
):
    """Test/debug path: ``(batch, nheads, max_seqlen_q, max_seqlen_k)`` float32 probabilities."""
    nheads, nheads_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    left, right, is_local = window
    probs = torch.zeros(batch, nheads, max_seqlen_q, max_seqlen_k, dtype=torch.float32, device=q.device)
    dummy_i32 = empty_arg(q, torch.int32)
    alibi = alibi_slopes if alibi_slopes is not None else empty_arg(q, torch.float32)
    stride_alb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    seed, offset = (int(x) for x in rng_state.tolist())
    block_m, block_n = 16, 16
    grid = (cdiv(max_seqlen_q, block_m), nheads, batch)
    probs_launch(
        grid,
        q,
        k,
        lse,
        probs,
        0 if varlen else q.stride(0),
        q.stride(-3),
        q.stride(-2),
        0 if varlen else k.stride(0),
        k.stride(-3),
        k.stride(-2),
        0 if varlen else lse.stride(0),
        lse.stride(-2),
        probs.stride(0),
        probs.stride(1),
        probs.stride(2),
        cu_seqlens_q if varlen else dummy_i32,
        cu_seqlens_k if varlen else dummy_i32,
        seqused_k if seqused_k is not None else dummy_i32,
        0 if varlen else q.shape[1],
        0 if varlen else k.shape[1],
        max_seqlen_k,
        nheads,
        nheads // nheads_k,
        softmax_scale,
        float(softcap),
        alibi,
        stride_alb,
        left,
        right,
        attention_chunk,
        float(dropout_p),
        seed,
        offset,
        HEADDIM=d,
        BLOCK_D=max(next_pow2(d), 16),
        IS_VARLEN=varlen,
        HAS_SEQUSED=seqused_k is not None,
        IS_LOCAL=is_local,
        HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=dropout_p > 0,
        HAS_CHUNK=attention_chunk > 0,
        score_mod_fn=score_mod,
        mask_mod_fn=mask_mod,
        HAS_SCORE_MOD=score_mod is not None,
        HAS_MASK_MOD=mask_mod is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return probs
