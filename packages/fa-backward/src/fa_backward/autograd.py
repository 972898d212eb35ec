"""Autograd Functions (flash-attn 2.8's ``FlashAttn*Func`` classes, same ``forward`` arguments).

Each Function runs fa_core's forward (grad mode is off inside ``Function.forward``) and the kernels of
:mod:`fa_backward.backward`. Packed variants write their gradient straight into one ``dqkv`` / ``dkv``
buffer (the kernels take strided outputs), as flash-attn does. The lse and ``S_dmask`` outputs are not
differentiable; double backward raises (``once_differentiable``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fa_backward.backward import backward_from_autograd
from fa_core import validation as V
from fa_core.forward import flash_attn_forward, flash_attn_varlen_forward

__all__ = [
    "FlashAttnFunc",
    "FlashAttnKVPackedFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "FlashAttnVarlenKVPackedFunc",
    "FlashAttnVarlenQKVPackedFunc",
]


def _forward(
    ctx,
    q,
    k,
    v,
    varlen,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    return_softmax,
    is_grad,
    to_save,
):
    """Run the forward, stash what the backward needs, return flash-attn's outputs."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    want_probs = bool(return_softmax and dropout_p > 0)  # flash-attn: S_dmask only exists with dropout
    kw = dict(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        return_probs=want_probs,
    )
    if varlen is None:
        res = flash_attn_forward(q, k, v, **kw)
    else:
        res = flash_attn_varlen_forward(q, k, v, *varlen, **kw)
    if is_grad:
        cu = tuple(varlen[:2]) if varlen is not None else ()
        ctx.save_for_backward(*to_save, res.out, res.lse, res.rng_state, *cu)
        ctx.max_seqlens = tuple(varlen[2:]) if varlen is not None else None
        ctx.dropout_p = dropout_p
        ctx.softmax_scale = softmax_scale
        ctx.causal = causal
        ctx.window_size = window_size
        ctx.softcap = softcap
        ctx.alibi_slopes = alibi_slopes
        ctx.deterministic = deterministic
    if not return_softmax:
        return res.out
    ctx.mark_non_differentiable(res.lse)
    if res.probs is not None:
        ctx.mark_non_differentiable(res.probs)
    return res.out, res.lse, res.probs


def _backward(ctx, dout, q, k, v, out, lse, rng_state, cu, dq, dk, dv) -> None:
    # the forward validated q, k, v, out, lse and the options: skip the public entry points' checks
    varlen = None if ctx.max_seqlens is None else (cu[0], cu[1], *ctx.max_seqlens)
    backward_from_autograd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        varlen=varlen,
        dropout_p=ctx.dropout_p,
        softmax_scale=ctx.softmax_scale,
        causal=ctx.causal,
        window_size=tuple(ctx.window_size),
        softcap=ctx.softcap,
        alibi_slopes=ctx.alibi_slopes,
        rng_state=rng_state,
    )


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
        is_grad = is_grad_enabled and any(x.requires_grad for x in (q, k, v))
        return _forward(
            ctx,
            q,
            k,
            v,
            None,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad,
            (q, k, v),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *args):
        q, k, v, out, lse, rng_state = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _backward(ctx, dout, q, k, v, out, lse, rng_state, (), dq, dk, dv)
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
        V.check_packed("qkv", qkv, 5, 2, 3)
        q, k, v = qkv[:, :, 0].detach(), qkv[:, :, 1].detach(), qkv[:, :, 2].detach()
        is_grad = is_grad_enabled and qkv.requires_grad
        return _forward(
            ctx,
            q,
            k,
            v,
            None,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad,
            (qkv,),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *args):
        qkv, out, lse, rng_state = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _backward(
            ctx,
            dout,
            qkv[:, :, 0],
            qkv[:, :, 1],
            qkv[:, :, 2],
            out,
            lse,
            rng_state,
            (),
            dqkv[:, :, 0],
            dqkv[:, :, 1],
            dqkv[:, :, 2],
        )
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
        V.check_packed("kv", kv, 5, 2, 2)
        k, v = kv[:, :, 0].detach(), kv[:, :, 1].detach()
        is_grad = is_grad_enabled and any(x.requires_grad for x in (q, kv))
        return _forward(
            ctx,
            q,
            k,
            v,
            None,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad,
            (q, kv),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *args):
        q, kv, out, lse, rng_state = ctx.saved_tensors
        dq = torch.empty_like(q)
        dkv = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
        _backward(
            ctx, dout, q, kv[:, :, 0], kv[:, :, 1], out, lse, rng_state, (), dq, dkv[:, :, 0], dkv[:, :, 1]
        )
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
            raise NotImplementedError(
                "block_table (paged KV) is not supported by flash_attn_varlen_func here: use "
                "flash_attn_with_kvcache (fa-kvcache) for paged KV"
            )
        is_grad = is_grad_enabled and any(x.requires_grad for x in (q, k, v))
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _forward(
            ctx,
            q,
            k,
            v,
            varlen,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad,
            (q, k, v),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *args):
        q, k, v, out, lse, rng_state, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _backward(ctx, dout, q, k, v, out, lse, rng_state, (cu_q, cu_k), dq, dk, dv)
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
        V.check_packed("qkv", qkv, 4, 1, 3)
        q, k, v = qkv[:, 0].detach(), qkv[:, 1].detach(), qkv[:, 2].detach()
        is_grad = is_grad_enabled and qkv.requires_grad
        varlen = (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        return _forward(
            ctx,
            q,
            k,
            v,
            varlen,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad,
            (qkv,),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *args):
        qkv, out, lse, rng_state, cu_q, cu_k = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _backward(
            ctx,
            dout,
            qkv[:, 0],
            qkv[:, 1],
            qkv[:, 2],
            out,
            lse,
            rng_state,
            (cu_q, cu_k),
            dqkv[:, 0],
            dqkv[:, 1],
            dqkv[:, 2],
        )
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
        V.check_packed("kv", kv, 4, 1, 2)
        k, v = kv[:, 0].detach(), kv[:, 1].detach()
        is_grad = is_grad_enabled and any(x.requires_grad for x in (q, kv))
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _forward(
            ctx,
            q,
            k,
            v,
            varlen,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_softmax,
            is_grad,
            (q, kv),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *args):
        q, kv, out, lse, rng_state, cu_q, cu_k = ctx.saved_tensors
        dq = torch.empty_like(q)
        dkv = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
        _backward(
            ctx, dout, q, kv[:, 0], kv[:, 1], out, lse, rng_state, (cu_q, cu_k), dq, dkv[:, 0], dkv[:, 1]
        )
        return (dq, dkv) + (None,) * 13
