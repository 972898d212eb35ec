"""Differentiable attention with the features beyond flash-attn 2 (learnable sinks, V head dim != QK head dim).

A learnable sink (gpt-oss) is one extra logit per head in every row's softmax denominator, with no value
row. The forward folds it into the lse, so the existing backward kernels, fed that lse, already produce
the right dQ/dK/dV (the sink behaves like a key whose value is zero). Its own gradient is a row reduction:

    dL/dsink_h = -sum_{b, i} exp(sink_h - lse_{b,h,i}) * delta_{b,h,i},   delta = rowsum(dout * out)

which the backward returns as ``softmax_d``. The lse output is not differentiable (as in flash-attn).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fa_backward.backward import flash_attn_backward
from fa_core import flash_attn_forward

__all__ = ["attention"]


class _AttentionFunc(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        learnable_sink,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        attention_chunk,
    ):
        res = flash_attn_forward(
            q,
            k,
            v,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            attention_chunk=attention_chunk,
            learnable_sink=learnable_sink,
        )
        ctx.save_for_backward(q, k, v, res.out, res.lse, learnable_sink, alibi_slopes)
        ctx.args = (softmax_scale, causal, window_size, softcap, attention_chunk)
        ctx.mark_non_differentiable(res.lse)
        return res.out, res.lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sink, alibi = ctx.saved_tensors
        softmax_scale, causal, window_size, softcap, attention_chunk = ctx.args
        if attention_chunk:
            raise NotImplementedError("the backward of attention_chunk is not implemented yet (forward only)")
        grads = flash_attn_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            None,
            None,
            None,
            0.0,
            softmax_scale,
            causal,
            window_size[0],
            window_size[1],
            softcap,
            alibi,
            True,
        )
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            p_sink = torch.exp(sink.float()[None, :, None] - lse)  # (batch, nheads, seqlen_q)
            dsink = -(p_sink * grads.softmax_d).sum(dim=(0, 2)).to(sink.dtype)
        return grads.dq, grads.dk, grads.dv, dsink, None, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention with learnable sinks (gradient included) and any V head dim.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k: ``(batch, seqlen_k, nheads_k, headdim)``;
            v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
        learnable_sink: ``(nheads,)`` (fp32/bf16/fp16), differentiable.
        attention_chunk: chunked attention; forward only for now (the backward raises).
        Other arguments: as :func:`fa_core.flash_attn_forward`.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)`` and ``lse (batch, nheads, seqlen_q)`` (not differentiable;
        it includes the sink).
    """
    out, lse = _AttentionFunc.apply(
        q,
        k,
        v,
        learnable_sink,
        softmax_scale,
        causal,
        tuple(window_size),
        softcap,
        alibi_slopes,
        int(attention_chunk),
    )
    return out, lse
