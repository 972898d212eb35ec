"""Host side of the forward: validate, allocate, launch; the public forward functions.

The functions here are forward-only (not differentiable). fa-backward wraps them in autograd Functions;
fa-compat exposes them under flash-attn's names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from fa_core import validation as V
from fa_core.backends import get_forward, get_varlen_forward
from fa_core.block_sparse import BlockMask
from fa_core.forward_kernel import fwd_kernel
from fa_core.masking import UNBOUNDED, normalize_window
from fa_core.probs_kernel import probs_kernel
from fa_core.validation import FP8_DTYPE

__all__ = ["FwdResult", "flash_attn_forward", "flash_attn_varlen_forward", "new_rng_state"]


class FwdResult(NamedTuple):
    """``out`` like q; ``lse`` float32 ``(batch, nheads, seqlen_q)`` (dense) or ``(nheads, total_q)``
    (varlen); ``rng_state`` int64 ``(2,)`` CPU tensor ``[seed, offset]`` (zeros without dropout);
    ``probs``: the attention probabilities, dropped entries negated (only when asked for)."""

    out: torch.Tensor
    lse: torch.Tensor
    rng_state: torch.Tensor
    probs: torch.Tensor | None


def new_rng_state(dropout_p: float) -> torch.Tensor:
    """Draw ``[seed, offset]`` from torch's default CPU generator (no device sync; honours manual_seed).

    Kept on the CPU so the backward reads it without synchronising. Under CUDA-graph capture the values
    are baked into the graph, so every replay reuses the same dropout mask.
    """
    if dropout_p <= 0.0:
        return torch.zeros(2, dtype=torch.int64)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    offset = torch.randint(0, 2**31, (1,), dtype=torch.int64)
    return torch.cat([seed, offset])


def _full_blocks(block_mask, batch: int, nheads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(full_kv_num_blocks, full_kv_indices)`` of a block mask that has them (FlexAttention's names), else
    None. Read with getattr so that masks without the fields keep working."""
    if block_mask is None:
        return None
    num = getattr(block_mask, "full_kv_num_blocks", None)
    idx = getattr(block_mask, "full_kv_indices", None)
    if num is None and idx is None:
        return None
    if num is None or idx is None:
        raise ValueError(
            "block_mask.full_kv_num_blocks and block_mask.full_kv_indices must be given together"
        )
    part_num, part_idx = block_mask.kv_num_blocks, block_mask.kv_indices
    for name, t, like in (
        ("block_mask.full_kv_num_blocks", num, part_num),
        ("block_mask.full_kv_indices", idx, part_idx),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the block mask is on {like.device}")
        if (
            t.dim() != like.dim()
            or t.shape[2:] != like.shape[2:]
            or t.shape[:2] != num.shape[:2]
            or t.shape[0] not in (1, batch)
            or t.shape[1] not in (1, nheads)
        ):
            raise ValueError(
                f"{name} must have the partial lists' layout {tuple(like.shape)} with leading dims "
                f"(batch|1, nheads|1) = ({batch}|1, {nheads}|1), got {tuple(t.shape)}"
            )
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    return num, idx


def _sparse_args(block_mask, batch, nheads, dummy):
    """Kernel arguments of a block mask: pointers and strides (0 on broadcast batch / head dims), for the
    partial blocks then the full ones."""
    if block_mask is None:
        return (dummy, dummy, 0, 0, 0, 0, 0) * 2
    full = _full_blocks(block_mask, batch, nheads)
    return _block_list_args(block_mask.kv_num_blocks, block_mask.kv_indices) + (
        _block_list_args(*full) if full is not None else (dummy, dummy, 0, 0, 0, 0, 0)
    )


def _block_list_args(num, idx):
    return (
        num,
        idx,
        num.stride(0) if num.shape[0] > 1 else 0,
        num.stride(1) if num.shape[1] > 1 else 0,
        idx.stride(0) if idx.shape[0] > 1 else 0,
        idx.stride(1) if idx.shape[1] > 1 else 0,
        idx.stride(2),
    )


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Use on-device tensor descriptors (TMA) on Hopper+ when every stride and base is 16-byte aligned."""
    t0 = tensors[0]
    if not t0.is_cuda or os.environ.get("FA_PLUS_TMA", "1") == "0" or V.interpreting():
        return False
    if not hasattr(tl, "make_tensor_descriptor") or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    _ensure_allocator()
    return True


_ALLOCATOR_SET = False


def _ensure_allocator() -> None:
    """On-device descriptors need a small global scratch buffer; install a torch-backed allocator once,
    unless the user already installed one."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return
    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        user_set = not isinstance(_allocator.get(), NullAllocator)
    except Exception:  # private API moved: install ours
        user_set = False
    if not user_set:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _ALLOCATOR_SET = True


def _transposed_v(v: torch.Tensor, varlen: bool) -> torch.Tensor:
    """V with keys last, ``(batch, nheads_k, headdim_v, seqlen_k)`` (varlen ``(nheads_k, headdim_v,
    total_k)``), the key dim padded to a multiple of 16 elements so that its row stride suits TMA.

    Hopper's FP8 tensor-core dot (wgmma) needs both operands K-major; for P @ V the K dim is the key dim, so
    V must be read from a keys-contiguous copy. One copy per call: ~1% of the attention time at 4k keys.
    """
    keys = v.permute(1, 2, 0) if varlen else v.permute(0, 2, 3, 1)
    n = keys.shape[-1]
    padded = -(-n // 16) * 16
    vt = torch.empty(*keys.shape[:-1], padded, dtype=v.dtype, device=v.device)
    vt[..., :n].copy_(keys)
    return vt


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: powers of two, so that tunings stay few (forward and backward)."""
    return min(triton.next_power_of_2(max(int(n), 16)), 1 << 16)


def _launch(
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
):
    nheads, nheads_k, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    is_fp8 = descale is not None
    # FA_PLUS_FP8_LAYOUT=1: 16-bit inputs take the FP8 path's layout too (transposed V, shifted P), so that
    # the CPU interpreter tests it (it cannot run FP8 dots) and timings can compare the layouts
    v_t = is_fp8 or os.environ.get("FA_PLUS_FP8_LAYOUT", "0") == "1"
    if v_t:
        v = _transposed_v(v, varlen)
        # kernel view: batch / head strides of the copy, keys contiguous, stride_vd between headdim rows
        v_strides = (0 if varlen else v.stride(0), 1, v.stride(-3), v.stride(-2))
    else:
        v_strides = (0 if varlen else v.stride(0), v.stride(-3), v.stride(-2), 0)
    full = _full_blocks(block_mask, batch, nheads)
    # fp8 tensor-core dots need K >= 32
    min_block = 32 if is_fp8 else 16
    left, right, is_local = normalize_window(causal, window_size)
    if varlen:
        sq_b = sk_b = 0
        stride_qb = stride_kb = stride_ob = 0
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        sq_b, sk_b = q.shape[1], k.shape[1]
        stride_qb, stride_kb, stride_ob = q.stride(0), k.stride(0), out.stride(0)
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    alibi = alibi_slopes if alibi_slopes is not None else q.new_empty(0, dtype=torch.float32)
    stride_alb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    dummy_i32 = cu_seqlens_q if cu_seqlens_q is not None else q.new_empty(0, dtype=torch.int32)
    seed, offset = (int(x) for x in rng_state.tolist())

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), nheads, batch)

    fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        stride_qb,
        q.stride(-3),
        q.stride(-2),
        stride_kb,
        k.stride(-3),
        k.stride(-2),
        *v_strides,
        stride_ob,
        out.stride(-3),
        out.stride(-2),
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
        *_sparse_args(block_mask, batch, nheads, dummy_i32),
        left,
        right,
        attention_chunk,
        learnable_sink if learnable_sink is not None else alibi,
        float(dropout_p),
        seed,
        offset,
        seq_bucket(max_seqlen_q),
        seq_bucket(max_seqlen_k),
        HEADDIM=d,
        HEADDIM_V=dv,
        BLOCK_D=max(triton.next_power_of_2(d), min_block),
        BLOCK_DV=max(triton.next_power_of_2(dv), min_block),
        IS_VARLEN=varlen,
        HAS_SEQUSED=seqused_k is not None,
        IS_LOCAL=is_local,
        HAS_WINDOW_LEFT=is_local and left != UNBOUNDED,
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
        HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=dropout_p > 0,
        TMA_OK=_tma_ok(q, k, v, out),
    )
    return left, right, is_local


def _probs(
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
    dummy_i32 = q.new_empty(0, dtype=torch.int32)
    alibi = alibi_slopes if alibi_slopes is not None else q.new_empty(0, dtype=torch.float32)
    stride_alb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    seed, offset = (int(x) for x in rng_state.tolist())
    block_m, block_n = 16, 16
    grid = (triton.cdiv(max_seqlen_q, block_m), nheads, batch)
    probs_kernel[grid](
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
        BLOCK_D=max(triton.next_power_of_2(d), 16),
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


def _no_extras_on_backend(backend, attention_chunk, *extras) -> None:
    """Beyond-flash-attn-2 features exist only in our kernels: never drop them silently."""
    if attention_chunk or any(e is not None for e in extras):
        raise NotImplementedError(
            f"backend {backend or '$FA_BACKEND'} does not support attention_chunk, learnable_sink, "
            "score_mod / mask_mod or FP8 descales"
        )


def _out_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if q.dtype == FP8_DTYPE else q.dtype


def _fp8_descale(q, k, batch, q_descale, k_descale, v_descale, return_probs):
    """Validate the FP8 inputs; return the stacked ``(3, batch, nheads_k)`` float32 descales, or None."""
    given = [d is not None for d in (q_descale, k_descale, v_descale)]
    if q.dtype != FP8_DTYPE:
        if any(given):
            raise ValueError("q_descale / k_descale / v_descale are only valid with float8_e4m3fn q, k, v")
        return None
    if V.interpreting() or not q.is_cuda:
        raise ValueError(
            "FP8 (float8_e4m3fn) attention needs a CUDA GPU; the CPU interpreter cannot run FP8 dots"
        )
    if torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError(
            f"FP8 attention needs FP8 tensor cores (sm_89 or newer), got {torch.cuda.get_device_name()}"
        )
    if return_probs:
        raise ValueError("return_probs is not supported with FP8 inputs")
    nheads_k = k.shape[-2]
    scales = []
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if d is None:
            scales.append(torch.ones(batch, nheads_k, device=q.device, dtype=torch.float32))
            continue
        V.check_tensor(name, d, 2)
        V.check_device(name, d, "q", q)
        if d.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {d.dtype}")
        if tuple(d.shape) != (batch, nheads_k):
            raise ValueError(
                f"{name} must have shape (batch, nheads_k) = ({batch}, {nheads_k}), got {tuple(d.shape)}"
            )
        scales.append(d)
    return torch.stack(scales).contiguous()


def _common_checks(q, k, v, out, softmax_scale, window_size, softcap, dropout_p, rng_state, varlen):
    V.check_qkv(q, k, v, varlen=varlen)
    V.check_window(window_size)
    V.check_scalars(dropout_p, softcap, softmax_scale)
    if out is not None:
        V.check_tensor("out", out)
        expected = (*q.shape[:-1], v.shape[-1])
        if tuple(out.shape) != expected or out.dtype != _out_dtype(q) or out.device != q.device:
            raise ValueError(f"out must be a {_out_dtype(q)} tensor of shape {expected} on {q.device}")
        V.check_last_dim_contiguous("out", out)
    if rng_state is not None:
        V.check_tensor("rng_state", rng_state, 1)
        if rng_state.numel() != 2 or rng_state.dtype != torch.int64:
            raise ValueError("rng_state must be an int64 tensor [seed, offset] as returned by the forward")
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_probs: bool = False,
    out: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
    backend: str | None = None,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
    score_mod: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    block_mask: BlockMask | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> FwdResult:
    """Dense attention forward.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k: ``(batch, seqlen_k, nheads_k, headdim)``;
            v: ``(batch, seqlen_k, nheads_k, headdim_v)``. fp16/bf16 (fp32 on CPU), last dim contiguous.
        dropout_p: dropout probability in [0, 1).
        softmax_scale: defaults to ``headdim ** -0.5``.
        causal: bottom-right aligned causal mask. window_size: ``(left, right)``, -1 = unbounded.
        softcap: ``softcap * tanh(scores / softcap)``; 0 = off.
        alibi_slopes: ``(nheads,)`` or ``(batch, nheads)`` float32.
        return_probs: also return the probabilities (testing only: O(seqlen^2) memory).
        out: optional ``(batch, seqlen_q, nheads, headdim_v)`` output buffer.
        rng_state: reuse a ``[seed, offset]`` pair (to regenerate a dropout mask); default draws a new one.
        backend: ``None`` / ``"triton"`` (ours) or ``"flaggems"`` (``fa-core[flaggems]``); ``None`` reads
            ``$FA_BACKEND``. An unsupported feature on a backend raises; there is no silent fallback.
        attention_chunk: chunked attention (FlashAttention-3's name): a query sees only keys in its own chunk
            of that many positions (bottom-right aligned), combined with causal / window; 0 = off.
        learnable_sink: ``(nheads,)`` one extra logit per head in every row's softmax denominator, none in
            the output (gpt-oss attention sinks); the lse includes it.
        score_mod: a ``@triton.jit`` function ``(score, b, h, q_idx, kv_idx) -> score`` applied to every
            logit (natural-log units, after scale, softcap and ALiBi), FlexAttention-style; forward only.
        mask_mod: a ``@triton.jit`` function ``(b, h, q_idx, kv_idx) -> bool``: keys where it is False are
            masked out (combined with causal / window / chunk); forward only.
        block_mask: :class:`fa_core.block_sparse.BlockMask`: only the listed key blocks are loaded (dense
            inputs only; not with ``return_probs``). Its optional full blocks (``full_kv_num_blocks`` /
            ``full_kv_indices``) skip ``mask_mod``; causal / window / chunk still apply in every block.
        q_descale, k_descale, v_descale: ``(batch, nheads_k)`` float32 dequantisation factors for
            ``float8_e4m3fn`` q, k, v (FlashAttention-3's convention; default 1). The output is bf16. V is
            copied keys-last once per call (Hopper's FP8 dot needs a K-major V); P is rounded to e4m3 as
            ``p * 2^8`` (the factor cancels in the normalisation).

    Returns:
        :class:`FwdResult` ``(out, lse (batch, nheads, seqlen_q), rng_state, probs)``.
    """
    V.grad_guard(q, k, v)
    impl = get_forward(backend)
    if impl is not None:
        _no_extras_on_backend(
            backend,
            attention_chunk,
            learnable_sink,
            score_mod,
            mask_mod,
            q_descale,
            k_descale,
            v_descale,
            block_mask,
        )
        return impl(
            q,
            k,
            v,
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            return_probs=return_probs,
            out=out,
            rng_state=rng_state,
        )
    softmax_scale = _common_checks(
        q, k, v, out, softmax_scale, window_size, softcap, dropout_p, rng_state, False
    )
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    V.check_alibi(alibi_slopes, batch, nheads, q)
    descale = _fp8_descale(q, k, batch, q_descale, k_descale, v_descale, return_probs)
    V.check_chunk_and_sink(attention_chunk, learnable_sink, nheads, q)
    V.check_mods(score_mod, mask_mod)
    V.check_block_mask(block_mask, batch, nheads, seqlen_q, seqlen_k, q, return_probs)
    if out is None:
        out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=_out_dtype(q))
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    if rng_state is None:
        rng_state = new_rng_state(dropout_p)
    if batch == 0 or seqlen_q == 0:
        return FwdResult(out, lse, rng_state, None)
    kw = dict(
        varlen=False,
        batch=batch,
        max_seqlen_q=seqlen_q,
        max_seqlen_k=seqlen_k,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        seqused_k=None,
        softmax_scale=softmax_scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        learnable_sink=learnable_sink,
        score_mod=score_mod,
        mask_mod=mask_mod,
    )
    window = _launch(
        q,
        k,
        v,
        out,
        lse,
        causal=causal,
        window_size=window_size,
        descale=descale,
        block_mask=block_mask,
        **kw,
    )
    probs = _probs(q, k, lse, window=window, **kw) if return_probs else None
    return FwdResult(out, lse, rng_state, probs)


def flash_attn_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_probs: bool = False,
    seqused_k: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
    backend: str | None = None,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
    score_mod: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> FwdResult:
    """Variable-length (packed) attention forward.

    Args:
        q: ``(total_q, nheads, headdim)``; k: ``(total_k, nheads_k, headdim)``; v: ``(total_k, nheads_k, headdim_v)``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 prefix sums of the sequence lengths.
        max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths (the grid is sized by them).
        seqused_k: optional ``(batch,)`` int32: sequence b uses only its first ``seqused_k[b]`` keys.
        Other arguments as in :func:`flash_attn_forward`.

    Returns:
        :class:`FwdResult` with ``lse (nheads, total_q)`` and probs ``(batch, nheads, max_seqlen_q, max_seqlen_k)``.
    """
    V.grad_guard(q, k, v)
    impl = get_varlen_forward(backend)
    if impl is not None:
        _no_extras_on_backend(
            backend,
            attention_chunk,
            learnable_sink,
            score_mod,
            mask_mod,
            q_descale,
            k_descale,
            v_descale,
        )
        return impl(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            return_probs=return_probs,
            seqused_k=seqused_k,
            out=out,
            rng_state=rng_state,
        )
    softmax_scale = _common_checks(
        q, k, v, out, softmax_scale, window_size, softcap, dropout_p, rng_state, True
    )
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q, max_seqlen_q, "max_seqlen_q")
    batch_k = V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q, max_seqlen_k, "max_seqlen_k")
    if batch_k != batch:
        raise ValueError(f"cu_seqlens_k has {batch_k + 1} entries but cu_seqlens_q has {batch + 1}")
    V.check_seqused(seqused_k, batch, cu_seqlens_k, q)
    nheads = q.shape[1]
    V.check_alibi(alibi_slopes, batch, nheads, q)
    descale = _fp8_descale(q, k, batch, q_descale, k_descale, v_descale, return_probs)
    V.check_chunk_and_sink(attention_chunk, learnable_sink, nheads, q)
    V.check_mods(score_mod, mask_mod)
    if out is None:
        out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=_out_dtype(q))
    lse = torch.empty(nheads, q.shape[0], dtype=torch.float32, device=q.device)
    if rng_state is None:
        rng_state = new_rng_state(dropout_p)
    if batch == 0 or q.shape[0] == 0 or max_seqlen_q == 0:
        return FwdResult(out, lse, rng_state, None)
    kw = dict(
        varlen=True,
        batch=batch,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        learnable_sink=learnable_sink,
        score_mod=score_mod,
        mask_mod=mask_mod,
    )
    window = _launch(q, k, v, out, lse, causal=causal, window_size=window_size, descale=descale, **kw)
    probs = _probs(q, k, lse, window=window, **kw) if return_probs else None
    return FwdResult(out, lse, rng_state, probs)
