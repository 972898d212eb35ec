"""flash-attn 2.8's autograd Functions (``FlashAttnFunc`` & co), same ``forward``/``backward`` signatures.

The public ``flash_attn_func`` / ``flash_attn_varlen_func`` go through the differentiable custom ops of
:mod:`flash_attn._ops` instead; the packed variants use these Functions because their backward writes dq, dk
and dv straight into slices of one ``dqkv`` / ``dkv`` buffer (as flash-attn does), where autograd through
``qkv[:, :, i]`` views would allocate and sum three packed-size gradients. ``torch.compile`` traces these
Functions (the ops inside stay opaque), as it does flash-attn's own.
"""

from __future__ import annotations

import torch

from fa_core import validation as V
from fa_core.validation import contig_last
from flash_attn import _ops as ops

__all__ = [
    "FlashAttnFunc",
    "FlashAttnKVPackedFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "FlashAttnVarlenKVPackedFunc",
    "FlashAttnVarlenQKVPackedFunc",
]


def _dense_forward(
    ctx,
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    return_softmax,
    is_grad_enabled,
):
    q, k, v = contig_last(q), contig_last(k), contig_last(v)
    scale = ops.default_scale(q, softmax_scale)
    left, right = V.window_pair(window_size)
    out, lse, s_dmask, rng_state = torch.ops.flash_attn_plus.fwd(
        q, k, v, dropout_p, scale, causal, left, right, softcap, alibi_slopes,
        return_softmax and dropout_p > 0, deterministic,
    )  # fmt: skip
    if is_grad_enabled:
        ops.save_dense(
            ctx, q, k, v, out, lse, rng_state, alibi_slopes, dropout_p, scale, causal, left, right, softcap,
            deterministic,
        )  # fmt: skip
    return out, lse, s_dmask


def _dense_backward(ctx, dout, dq, dk, dv) -> None:
    ops.dense_backward_into(ctx, contig_last(dout), dq, dk, dv)


def _varlen_forward(
    ctx,
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    return_softmax,
    is_grad_enabled,
):
    q, k, v = contig_last(q), contig_last(k), contig_last(v)
    scale = ops.default_scale(q, softmax_scale)
    left, right = V.window_pair(window_size)
    max_q, max_k = int(max_q), int(max_k)
    out, lse, s_dmask, rng_state = torch.ops.flash_attn_plus.varlen_fwd(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, left, right, softcap, alibi_slopes,
        return_softmax and dropout_p > 0, None, deterministic,
    )  # fmt: skip
    if is_grad_enabled:
        ops.save_varlen(
            ctx, q, k, v, out, lse, rng_state, alibi_slopes, cu_q, cu_k, None, max_q, max_k, dropout_p, scale,
            causal, left, right, softcap, deterministic,
        )  # fmt: skip
    return out, lse, s_dmask


def _varlen_backward(ctx, dout, dq, dk, dv) -> None:
    # zero_tensors=False and no seqused_k, as flash-attn's FlashAttnVarlenFunc
    ops.varlen_backward_into(ctx, contig_last(dout), dq, dk, dv, False)


def _result(res: tuple[torch.Tensor, torch.Tensor, torch.Tensor], return_softmax: bool):
    """flash-attn's return: ``out``, or ``(out, softmax_lse, S_dmask)`` with return_softmax."""
    return res if return_softmax else res[0]


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_softmax,
        is_grad_enabled,
    ):
        res = _dense_forward(
            ctx,
            q,
            k,
            v,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad_enabled,
        )
        return _result(res, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        q, k, v = ctx.saved_tensors[:3]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dense_backward(ctx, dout, dq, dk, dv)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


class FlashAttnQKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        qkv,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_softmax,
        is_grad_enabled,
    ):
        # qkv (batch, seqlen, 3, nheads, headdim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        res = _dense_forward(
            ctx,
            q,
            k,
            v,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad_enabled,
        )
        ctx.packed_shape = qkv.shape
        return _result(res, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        q = ctx.saved_tensors[0]
        dqkv = q.new_empty(ctx.packed_shape)
        _dense_backward(ctx, dout, dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2])
        return dqkv, None, None, None, None, None, None, None, None, None


class FlashAttnKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        kv,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_softmax,
        is_grad_enabled,
    ):
        # kv (batch, seqlen_k, 2, nheads_k, headdim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        res = _dense_forward(
            ctx,
            q,
            k,
            v,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad_enabled,
        )
        ctx.packed_shape = kv.shape
        return _result(res, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        q = ctx.saved_tensors[0]
        dq, dkv = torch.empty_like(q), q.new_empty(ctx.packed_shape)
        _dense_backward(ctx, dout, dq, dkv[:, :, 0], dkv[:, :, 1])
        return dq, dkv, None, None, None, None, None, None, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_softmax,
        block_table,
        is_grad_enabled,
    ):
        if block_table is not None:
            # paged keys: forward only (as in flash-attn), through the public function's page gather
            from flash_attn.flash_attn_interface import flash_attn_varlen_func

            with torch.no_grad():
                return flash_attn_varlen_func(
                    q,
                    k,
                    v,
                    cu_seqlens_q,
                    cu_seqlens_k,
                    max_seqlen_q,
                    max_seqlen_k,
                    dropout_p,
                    softmax_scale,
                    causal,
                    window_size,
                    softcap,
                    alibi_slopes,
                    deterministic,
                    return_softmax,
                    block_table,
                )
        res = _varlen_forward(
            ctx,
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad_enabled,
        )
        return _result(res, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        q, k, v = ctx.saved_tensors[:3]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _varlen_backward(ctx, dout, dq, dk, dv)
        return (dq, dk, dv) + (None,) * 14


class FlashAttnVarlenQKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        qkv,
        cu_seqlens,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_softmax,
        is_grad_enabled,
    ):
        # qkv (total, 3, nheads, headdim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        res = _varlen_forward(
            ctx,
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad_enabled,
        )
        ctx.packed_shape = qkv.shape
        return _result(res, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        q = ctx.saved_tensors[0]
        dqkv = q.new_empty(ctx.packed_shape)
        _varlen_backward(ctx, dout, dqkv[:, 0], dqkv[:, 1], dqkv[:, 2])
        return (dqkv,) + (None,) * 11


class FlashAttnVarlenKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        kv,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_softmax,
        is_grad_enabled,
    ):
        # kv (total_k, 2, nheads_k, headdim)
        k, v = kv[:, 0], kv[:, 1]
        res = _varlen_forward(
            ctx,
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad_enabled,
        )
        ctx.packed_shape = kv.shape
        return _result(res, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        q = ctx.saved_tensors[0]
        dq, dkv = torch.empty_like(q), q.new_empty(ctx.packed_shape)
        _varlen_backward(ctx, dout, dq, dkv[:, 0], dkv[:, 1])
        return (dq, dkv) + (None,) * 13
