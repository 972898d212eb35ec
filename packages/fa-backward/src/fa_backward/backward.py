"""Host side of the backward: validate, allocate, launch (flash-attn's ``_flash_attn_backward`` semantics).

:func:`flash_attn_backward` and :func:`flash_attn_varlen_backward` take the forward's ``out``, ``softmax_lse``
and ``rng_state`` and write dq, dk, dv into caller-provided tensors when given (any strides with a contiguous
last dim, e.g. slices of a packed ``dqkv``), else into new ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton

from fa_backward.backward_kernel import dkdv_kernel, dq_kernel, preprocess_kernel
from fa_core import validation as V
from fa_core.block_sparse import BlockMask, transpose_block_mask
from fa_core.forward import seq_bucket
from fa_core.masking import normalize_window

__all__ = ["BwdResult", "flash_attn_backward", "flash_attn_varlen_backward"]


class BwdResult(NamedTuple):
    """``dq, dk, dv`` (the tensors written) and ``softmax_d`` = rowsum(dout * out), float32, laid out like the
    lse: ``(batch, nheads, seqlen_q)`` dense, ``(nheads, total_q)`` varlen. flash-attn's
    ``_flash_attn_backward`` returns only ``softmax_d``; use ``.softmax_d`` for that."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    softmax_d: torch.Tensor


def _check_qkv(q, k, v, varlen: bool) -> None:
    """fa_core's check; float64 is also accepted on CPU under the interpreter (for float64 gradcheck)."""
    if (
        isinstance(q, torch.Tensor)
        and q.dtype == torch.float64
        and q.device.type == "cpu"
        and V.interpreting()
        and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == "cpu"
            for t in (k, v)
        )
    ):
        meta = [
            torch.empty_strided(t.shape, t.stride(), dtype=torch.float16, device="meta") for t in (q, k, v)
        ]
        V.check_qkv(meta[0], meta[1], meta[2], varlen=varlen)
        return
    V.check_qkv(q, k, v, varlen=varlen)


def _check_like(name: str, t, shape, dtype, device, optional: bool = False) -> None:
    if t is None and optional:
        return
    V.check_tensor(name, t, len(shape))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: all tensors must share a device")
    V.check_last_dim_contiguous(name, t)


def _common(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    window,
    softcap,
    rng_state,
    varlen,
    lse_shape,
):
    _check_qkv(q, k, v, varlen)
    V.check_window(window)
    V.check_scalars(dropout_p, softcap, softmax_scale)
    o_shape = (*q.shape[:-1], v.shape[-1])
    _check_like("dout", dout, o_shape, q.dtype, q.device)
    _check_like("out", out, o_shape, q.dtype, q.device)
    _check_like("dq", dq, q.shape, q.dtype, q.device, optional=True)
    _check_like("dk", dk, k.shape, q.dtype, q.device, optional=True)
    _check_like("dv", dv, v.shape, q.dtype, q.device, optional=True)
    V.check_tensor("softmax_lse", softmax_lse, len(lse_shape))
    if tuple(softmax_lse.shape) != tuple(lse_shape) or softmax_lse.dtype != torch.float32:
        raise ValueError(
            f"softmax_lse must be a float32 tensor of shape {tuple(lse_shape)} (as the forward returns it), "
            f"got {softmax_lse.dtype} {tuple(softmax_lse.shape)}"
        )
    V.check_device("softmax_lse", softmax_lse, "q", q)
    if dropout_p > 0:
        if rng_state is None:
            raise ValueError("dropout_p > 0 needs the forward's rng_state to regenerate the dropout mask")
        V.check_tensor("rng_state", rng_state, 1)
        if rng_state.numel() != 2 or rng_state.dtype != torch.int64:
            raise ValueError("rng_state must be an int64 tensor [seed, offset] as returned by the forward")
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _is_jit(fn: object) -> bool:
    return callable(fn) and hasattr(fn, "fn")  # JITFunction, or InterpretedFunction on CPU


def check_programmable(
    attention_chunk: int,
    score_mod: object,
    score_mod_grad: object,
    mask_mod: object,
    dsoftmax_lse: torch.Tensor | None,
    lse_shape: tuple[int, ...],
    q: torch.Tensor,
) -> None:
    """Checks of the programmable-attention arguments of the backward (each error names its argument)."""
    V.check_chunk_and_sink(attention_chunk, None, 1, q)
    V.check_mods(score_mod, mask_mod)
    if score_mod_grad is not None and not _is_jit(score_mod_grad):
        raise TypeError(f"score_mod_grad must be a @triton.jit function, got {type(score_mod_grad).__name__}")
    if score_mod is not None and score_mod_grad is None:
        raise ValueError(
            "score_mod needs score_mod_grad (a @triton.jit d score_mod / d score) for the backward; "
            "fa_core.score_mods.additive_grad serves any score_mod that adds a bias"
        )
    if score_mod is None and score_mod_grad is not None:
        raise ValueError("score_mod_grad was given without score_mod")
    if dsoftmax_lse is not None:
        V.check_tensor("dsoftmax_lse", dsoftmax_lse, len(lse_shape))
        V.check_device("dsoftmax_lse", dsoftmax_lse, "q", q)
        if tuple(dsoftmax_lse.shape) != tuple(lse_shape) or not dsoftmax_lse.is_floating_point():
            raise ValueError(
                f"dsoftmax_lse must be a floating tensor shaped like softmax_lse {tuple(lse_shape)}, "
                f"got {dsoftmax_lse.dtype} {tuple(dsoftmax_lse.shape)}"
            )


def check_full_blocks(block_mask: BlockMask) -> None:
    """The optional full-block fields: both or neither, int32, shaped like the partial ones, same device."""
    fnum, fidx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if (fnum is None) != (fidx is None):
        raise ValueError(
            "block_mask.full_kv_num_blocks and block_mask.full_kv_indices must be given together"
        )
    if fnum is None or fidx is None:
        return
    for name, t, like in (
        ("block_mask.full_kv_num_blocks", fnum, block_mask.kv_num_blocks),
        ("block_mask.full_kv_indices", fidx, block_mask.kv_indices),
    ):
        V.check_tensor(name, t, like.dim())
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(
                f"{name} must be shaped like the partial list {tuple(like.shape)}, got {tuple(t.shape)}"
            )
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the partial list is on {like.device}")
    if V.value_checks_enabled(fnum):
        if bool((fnum < 0).any()) or bool((fnum > fidx.shape[-1]).any()):
            raise ValueError(
                "block_mask.full_kv_num_blocks entries must lie in [0, full_kv_indices.shape[-1]]"
            )


_SPARSE_NAMES = (
    "BlkNum",
    "BlkIdx",
    "FullNum",
    "FullIdx",
    "stride_bn_b",
    "stride_bn_h",
    "stride_bi_b",
    "stride_bi_h",
    "stride_bi_r",
)


def _named_sparse(*values: Any) -> dict[str, Any]:
    return dict(zip(_SPARSE_NAMES, values, strict=True))


def _sparse_args(block_mask: BlockMask | None, seqlen_k: int, dummy: torch.Tensor):
    """``(dq lists, dk/dv lists, has_full, block_size)``: each a dict of kernel arguments (partial and full
    lists, strides 0 on broadcast dims)."""
    if block_mask is None:
        none = _named_sparse(dummy, dummy, dummy, dummy, 0, 0, 0, 0, 0)
        return none, none, False, (128, 128)

    def pack(num, idx, fnum, fidx):
        num, idx = num.contiguous(), idx.contiguous()
        fnum = fnum.contiguous() if fnum is not None else num
        fidx = fidx.contiguous() if fidx is not None else idx
        return _named_sparse(
            num,
            idx,
            fnum,
            fidx,
            num.stride(0) if num.shape[0] > 1 else 0,
            num.stride(1) if num.shape[1] > 1 else 0,
            idx.stride(0) if idx.shape[0] > 1 else 0,
            idx.stride(1) if idx.shape[1] > 1 else 0,
            idx.stride(2),
        )

    bq, bk = (int(x) for x in block_mask.block_size)
    has_full = block_mask.full_kv_num_blocks is not None
    tq = transpose_block_mask(block_mask, -(-seqlen_k // bk))
    fwd = pack(
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
    )
    bwd = pack(tq.q_num_blocks, tq.q_indices, tq.full_q_num_blocks, tq.full_q_indices)
    return fwd, bwd, has_full, (bq, bk)


def _launch(
    dout,
    q,
    k,
    v,
    out,
    lse,
    dq,
    dk,
    dv,
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
    window,
    softcap,
    alibi_slopes,
    dropout_p,
    rng_state,
    attention_chunk=0,
    score_mod=None,
    score_mod_grad=None,
    mask_mod=None,
    block_mask=None,
    dsoftmax_lse=None,
):
    nheads, nheads_k, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    left, right, is_local = normalize_window(causal, window)
    lse = V.contig_last(lse)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    block_d = max(triton.next_power_of_2(d), 16)
    block_dv = max(triton.next_power_of_2(d_v), 16)

    if varlen:
        pre_rows, pre_batch = q.shape[0], 1
        stride_ob = stride_dob = stride_lb = stride_deltab = 0
        stride_qb = stride_kb = stride_vb = stride_dqb = stride_dkb = stride_dvb = 0
        stride_lh, stride_deltah = lse.stride(0), delta.stride(0)
        sq_b = sk_b = 0
    else:
        pre_rows, pre_batch = q.shape[1], batch
        stride_ob, stride_dob = out.stride(0), dout.stride(0)
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
        stride_deltab, stride_deltah = delta.stride(0), delta.stride(1)
        stride_qb, stride_kb, stride_vb = q.stride(0), k.stride(0), v.stride(0)
        stride_dqb, stride_dkb, stride_dvb = dq.stride(0), dk.stride(0), dv.stride(0)
        sq_b, sk_b = q.shape[1], k.shape[1]

    pre_block = max(16, min(128, 4096 // block_dv))  # ~32 elements of each tile per thread (4 warps)
    if dsoftmax_lse is not None:
        dlse = V.contig_last(dsoftmax_lse)
        stride_dlb, stride_dlh = (0, dlse.stride(0)) if varlen else (dlse.stride(0), dlse.stride(1))
    else:
        dlse, stride_dlb, stride_dlh = delta, 0, 0
    if pre_rows > 0:
        preprocess_kernel[(triton.cdiv(pre_rows, pre_block), nheads, pre_batch)](
            out,
            dout,
            delta,
            dlse,
            stride_ob,
            out.stride(-3),
            out.stride(-2),
            stride_dob,
            dout.stride(-3),
            dout.stride(-2),
            stride_deltab,
            stride_deltah,
            stride_dlb,
            stride_dlh,
            pre_rows,
            HEADDIM_V=d_v,
            BLOCK_DV=block_dv,
            BLOCK_M=pre_block,
            HAS_DLSE=dsoftmax_lse is not None,
        )

    alibi = alibi_slopes if alibi_slopes is not None else q.new_empty(0, dtype=torch.float32)
    stride_alb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    dummy_i32 = q.new_empty(0, dtype=torch.int32)
    seed, offset = (int(x) for x in rng_state.tolist()) if dropout_p > 0 else (0, 0)
    sparse_dq, sparse_dkdv, has_full, (sparse_q, sparse_kv) = _sparse_args(
        block_mask, max_seqlen_k, dummy_i32
    )
    common = dict(
        cu_seqlens_q=cu_seqlens_q if varlen else dummy_i32,
        cu_seqlens_k=cu_seqlens_k if varlen else dummy_i32,
        seqused_k=seqused_k if seqused_k is not None else dummy_i32,
        seqlen_q_dense=sq_b,
        seqlen_k_dense=sk_b,
        nheads=nheads,
        group=nheads // nheads_k,
        sm_scale=softmax_scale,
        softcap=float(softcap),
        Alibi=alibi,
        stride_alb=stride_alb,
        window_left=left,
        window_right=right,
        chunk=int(attention_chunk),
        dropout_p=float(dropout_p),
        seed=seed,
        rng_offset=offset,
        SEQ_BUCKET_Q=seq_bucket(max_seqlen_q),
        SEQ_BUCKET_K=seq_bucket(max_seqlen_k),
        HEADDIM=d,
        HEADDIM_V=d_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        IS_VARLEN=varlen,
        HAS_SEQUSED=seqused_k is not None,
        IS_LOCAL=is_local,
        HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=dropout_p > 0,
        # float32 accumulation; float64 (CPU interpreter only, for gradcheck) accumulates in float64
        ACC_FP64=q.dtype == torch.float64,
        HAS_CHUNK=attention_chunk > 0,
        score_mod_fn=score_mod,
        score_grad_fn=score_mod_grad,
        mask_mod_fn=mask_mod,
        HAS_SCORE_MOD=score_mod is not None,
        HAS_MASK_MOD=mask_mod is not None,
        IS_SPARSE=block_mask is not None,
        HAS_FULL=has_full,
        SPARSE_Q=sparse_q,
        SPARSE_KV=sparse_kv,
    )
    qkv_strides = (
        stride_qb,
        q.stride(-3),
        q.stride(-2),
        stride_kb,
        k.stride(-3),
        k.stride(-2),
        stride_vb,
        v.stride(-3),
        v.stride(-2),
        stride_dob,
        dout.stride(-3),
        dout.stride(-2),
        stride_lb,
        stride_lh,
        stride_deltab,
        stride_deltah,
    )
    if max_seqlen_k > 0:
        dkdv_kernel[lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), nheads_k, batch)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            *qkv_strides,
            stride_dkb,
            dk.stride(-3),
            dk.stride(-2),
            stride_dvb,
            dv.stride(-3),
            dv.stride(-2),
            **sparse_dkdv,
            **common,
        )
    if max_seqlen_q > 0:
        dq_kernel[lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), nheads, batch)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dq,
            *qkv_strides,
            stride_dqb,
            dq.stride(-3),
            dq.stride(-2),
            **sparse_dq,
            **common,
        )
    return delta


def flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    rng_state: torch.Tensor | None = None,
    attention_chunk: int = 0,
    score_mod: Callable[..., Any] | None = None,
    score_mod_grad: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    block_mask: BlockMask | None = None,
    dsoftmax_lse: torch.Tensor | None = None,
) -> BwdResult:
    """Dense attention backward (argument order of flash-attn 2.8's ``_flash_attn_backward``).

    Args:
        dout, out: ``(batch, seqlen_q, nheads, headdim_v)``; q ``(batch, seqlen_q, nheads, headdim)``;
            k ``(batch, seqlen_k, nheads_k, headdim)``; v ``(batch, seqlen_k, nheads_k, headdim_v)``.
        softmax_lse: the forward's float32 ``(batch, nheads, seqlen_q)`` (+inf for rows with no visible key).
        dq, dk, dv: optional outputs shaped like q, k, v (any strides with a contiguous last dim); allocated
            when None.
        rng_state: the forward's ``[seed, offset]``; required when ``dropout_p > 0``.
        deterministic: accepted for compatibility: the kernels never use atomics, so the result is always
            bitwise reproducible.
        attention_chunk, mask_mod, block_mask: as the forward's (they must match the forward's). Block-sparse:
            only listed blocks are loaded; ``full_kv_*`` blocks skip ``mask_mod``.
        score_mod: the forward's ``score_mod``; ``score_mod_grad(score, b, h, q_idx, kv_idx)`` (``@triton.jit``,
            required with it) returns ``d score_mod(score, ...) / d score`` at the unmodified score (natural-log
            units, after scale, softcap and ALiBi).
        dsoftmax_lse: gradient of the lse output, shaped like ``softmax_lse`` (None = not differentiated).
        Other arguments: as the forward's (causal is bottom-right aligned; -1 = unbounded window side).

    Returns:
        :class:`BwdResult` ``(dq, dk, dv, softmax_d)``.
    """
    dout, q, k, v, out = (V.contig_last(t) for t in (dout, q, k, v, out))
    window = (window_size_left, window_size_right)
    V.check_tensor("q", q, 4)
    batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
    softmax_scale = _common(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        dropout_p,
        softmax_scale,
        window,
        softcap,
        rng_state,
        False,
        (batch, nheads, seqlen_q),
    )
    V.check_alibi(alibi_slopes, batch, nheads, q)
    check_programmable(
        attention_chunk, score_mod, score_mod_grad, mask_mod, dsoftmax_lse, (batch, nheads, seqlen_q), q
    )
    V.check_block_mask(block_mask, batch, nheads, seqlen_q, k.shape[1], q, False)
    if block_mask is not None:
        check_full_blocks(block_mask)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if batch == 0 or nheads == 0:
        return BwdResult(dq, dk, dv, torch.zeros_like(softmax_lse))
    delta = _launch(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        varlen=False,
        batch=batch,
        max_seqlen_q=seqlen_q,
        max_seqlen_k=k.shape[1],
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        seqused_k=None,
        softmax_scale=softmax_scale,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        score_mod=score_mod,
        score_mod_grad=score_mod_grad,
        mask_mod=mask_mod,
        block_mask=block_mask,
        dsoftmax_lse=dsoftmax_lse,
    )
    return BwdResult(dq, dk, dv, delta)


def flash_attn_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    rng_state: torch.Tensor | None = None,
    zero_tensors: bool = False,
    seqused_k: torch.Tensor | None = None,
    attention_chunk: int = 0,
    score_mod: Callable[..., Any] | None = None,
    score_mod_grad: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    dsoftmax_lse: torch.Tensor | None = None,
) -> BwdResult:
    """Varlen backward (argument order of flash-attn 2.8's ``_flash_attn_varlen_backward``).

    Args:
        dout, out ``(total_q, nheads, headdim_v)``; q ``(total_q, nheads, headdim)``; k, v ``(total_k, nheads_k, .)``.
        softmax_lse: float32 ``(nheads, total_q)``. cu_seqlens_*: int32 ``(batch + 1,)``.
        zero_tensors: zero dq/dk/dv first (flash-attn's flag; every row is written anyway, so it only matters
            for rows outside every sequence, which then read 0 instead of their previous content).
        seqused_k: extension (forward's argument): sequence b uses its first ``seqused_k[b]`` keys; the other
            keys get a zero gradient.
        attention_chunk, score_mod, score_mod_grad, mask_mod, dsoftmax_lse: as :func:`flash_attn_backward`
            (``q_idx`` / ``kv_idx`` relative to the start of each sequence; ``dsoftmax_lse (nheads, total_q)``).
        Other arguments: as :func:`flash_attn_backward`.

    Returns:
        :class:`BwdResult` ``(dq, dk, dv, softmax_d)`` with ``softmax_d (nheads, total_q)``.
    """
    dout, q, k, v, out = (V.contig_last(t) for t in (dout, q, k, v, out))
    window = (window_size_left, window_size_right)
    V.check_tensor("q", q, 3)
    nheads = q.shape[1]
    softmax_scale = _common(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        dropout_p,
        softmax_scale,
        window,
        softcap,
        rng_state,
        True,
        (nheads, q.shape[0]),
    )
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q, max_seqlen_q, "max_seqlen_q")
    batch_k = V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q, max_seqlen_k, "max_seqlen_k")
    if batch_k != batch:
        raise ValueError(f"cu_seqlens_k has {batch_k + 1} entries but cu_seqlens_q has {batch + 1}")
    V.check_seqused(seqused_k, batch, cu_seqlens_k, q)
    V.check_alibi(alibi_slopes, batch, nheads, q)
    check_programmable(
        attention_chunk, score_mod, score_mod_grad, mask_mod, dsoftmax_lse, (nheads, q.shape[0]), q
    )
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if zero_tensors:
        dq.zero_()
        dk.zero_()
        dv.zero_()
    if batch == 0 or nheads == 0 or (max_seqlen_q == 0 and max_seqlen_k == 0):
        return BwdResult(dq, dk, dv, torch.zeros_like(softmax_lse))
    delta = _launch(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        varlen=True,
        batch=batch,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        score_mod=score_mod,
        score_mod_grad=score_mod_grad,
        mask_mod=mask_mod,
        dsoftmax_lse=dsoftmax_lse,
    )
    return BwdResult(dq, dk, dv, delta)
