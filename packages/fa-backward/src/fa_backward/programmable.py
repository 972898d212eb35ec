"""Differentiable attention with the features beyond flash-attn 2 (issue 6), dense and varlen.

* Learnable sinks (gpt-oss): one extra logit per head in every row's softmax denominator, with no value row.
  The forward folds it into the lse, so the backward kernels, fed that lse, produce the right dQ/dK/dV (the
  sink behaves like a key whose value is zero). Its own gradient is a row reduction,
  ``dL/dsink_h = -sum_{b, i} exp(sink_h - lse_{b,h,i}) * delta_{b,h,i}`` with ``delta = rowsum(dout * out) -
  dlse`` (the backward's ``softmax_d``), which also carries the contribution of a differentiated lse.
* The lse output is differentiable (``d lse_i / d s_ij = p_ij``: the kernels take ``delta - dlse``).
* V head dim != QK head dim, ``attention_chunk``, ``mask_mod``, ``score_mod`` (with its derivative
  ``score_mod_grad``), block-sparse masks (dense only) and dropout, in any combination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fa_backward.backward import flash_attn_backward, flash_attn_varlen_backward
from fa_core import flash_attn_forward, flash_attn_varlen_forward
from fa_core.block_sparse import BlockMask

__all__ = ["attention", "attention_varlen"]


def _check_grad_fns(score_mod: object, score_mod_grad: object, needs_grad: bool) -> None:
    """Refuse, before the forward runs, what the backward could not do (errors name the arguments)."""
    if score_mod_grad is not None and score_mod is None:
        raise ValueError("score_mod_grad was given without score_mod")
    if score_mod is not None and score_mod_grad is None and needs_grad:
        raise ValueError(
            "score_mod needs score_mod_grad (a @triton.jit d score_mod / d score) to differentiate; pass "
            "fa_core.score_mods.additive_grad for a score_mod that adds a bias, or run under torch.no_grad()"
        )


def _dsink(
    sink: torch.Tensor, lse: torch.Tensor, softmax_d: torch.Tensor, rows_ok: torch.Tensor | None
) -> torch.Tensor:
    """``-sum exp(sink - lse) * softmax_d`` over every row of each head; ``lse`` / ``softmax_d`` are
    ``(batch, nheads, seqlen_q)`` or ``(nheads, total_q)``."""
    shape = (1, -1, 1) if lse.dim() == 3 else (-1, 1)
    terms = torch.exp(sink.float().reshape(shape) - lse) * softmax_d
    if rows_ok is not None:  # varlen: rows outside every sequence hold no lse
        terms = torch.where(rows_ok, terms, 0.0)
    dims = (0, 2) if lse.dim() == 3 else (1,)
    return -terms.sum(dim=dims).to(sink.dtype)


class _AttentionFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, learnable_sink, varlen, kw, mods):
        score_mod, score_mod_grad, mask_mod, block_mask = mods
        fwd_kw = dict(kw, score_mod=score_mod, mask_mod=mask_mod, learnable_sink=learnable_sink)
        if varlen is None:
            res = flash_attn_forward(q, k, v, block_mask=block_mask, **fwd_kw)
        else:
            res = flash_attn_varlen_forward(q, k, v, *varlen[:4], **fwd_kw)
        cu = tuple(varlen[:2]) if varlen is not None else ()
        ctx.save_for_backward(q, k, v, res.out, res.lse, learnable_sink, res.rng_state, *cu)
        ctx.varlen = varlen[2:] if varlen is not None else None
        ctx.kw = kw
        ctx.mods = mods
        ctx.set_materialize_grads(False)
        return res.out, res.lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sink, rng_state, *cu = ctx.saved_tensors
        score_mod, score_mod_grad, mask_mod, block_mask = ctx.mods
        kw = ctx.kw
        if dout is None:
            dout = torch.zeros_like(out)
        common = dict(
            dropout_p=kw["dropout_p"],
            softmax_scale=kw["softmax_scale"],
            causal=kw["causal"],
            window_size_left=kw["window_size"][0],
            window_size_right=kw["window_size"][1],
            softcap=kw["softcap"],
            alibi_slopes=kw["alibi_slopes"],
            rng_state=rng_state,
            attention_chunk=kw["attention_chunk"],
            score_mod=score_mod,
            score_mod_grad=score_mod_grad,
            mask_mod=mask_mod,
            dsoftmax_lse=dlse,
        )
        rows_ok = None
        if ctx.varlen is None:
            grads = flash_attn_backward(
                dout, q, k, v, out, lse, None, None, None, block_mask=block_mask, **common
            )
        else:
            seqused_k = ctx.varlen[2]
            grads = flash_attn_varlen_backward(
                dout, q, k, v, out, lse, None, None, None, cu[0], cu[1], ctx.varlen[0], ctx.varlen[1],
                seqused_k=seqused_k, **common,
            )  # fmt: skip
            rows_ok = torch.arange(q.shape[0], device=q.device) < cu[0][-1]
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            dsink = _dsink(sink, lse, grads.softmax_d, rows_ok)
        return grads.dq, grads.dk, grads.dv, dsink, None, None, None


def _kw(
    softmax_scale, causal, window_size, softcap, alibi_slopes, attention_chunk, dropout_p
) -> dict[str, Any]:
    return dict(
        dropout_p=float(dropout_p),
        softmax_scale=softmax_scale if softmax_scale is None else float(softmax_scale),
        causal=bool(causal),
        window_size=(int(window_size[0]), int(window_size[1])),
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        attention_chunk=attention_chunk,
    )


def _needs_grad(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


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
    dropout_p: float = 0.0,
    score_mod: Callable[..., Any] | None = None,
    score_mod_grad: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    block_mask: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable programmable attention (dense): gradients for q, k, v, the sink, through out and lse.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k: ``(batch, seqlen_k, nheads_k, headdim)``;
            v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
        learnable_sink: ``(nheads,)`` (fp32/bf16/fp16), differentiable.
        attention_chunk: chunked attention (a query sees keys of its own chunk only); 0 = off.
        score_mod: ``@triton.jit (score, b, h, q_idx, kv_idx) -> score`` on natural-log logits (after scale,
            softcap and ALiBi). score_mod_grad: ``@triton.jit`` with the same arguments returning
            ``d score_mod / d score`` at the unmodified score; required to differentiate a score_mod
            (examples with their derivatives: :mod:`fa_core.score_mods`).
        mask_mod: ``@triton.jit (b, h, q_idx, kv_idx) -> bool`` (False = masked); needs no derivative.
        block_mask: :class:`fa_core.block_sparse.BlockMask`; only listed blocks are loaded, forward and backward;
            ``mask_mod`` is evaluated in its partial blocks only.
        dropout_p: dropout on the probabilities (the sink's probability is not dropped).
        Other arguments: as :func:`fa_core.flash_attn_forward`.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)`` and ``lse (batch, nheads, seqlen_q)`` float32 (includes the
        sink; differentiable).
    """
    _check_grad_fns(score_mod, score_mod_grad, _needs_grad(q, k, v, learnable_sink))
    kw = _kw(softmax_scale, causal, window_size, softcap, alibi_slopes, attention_chunk, dropout_p)
    out, lse = _AttentionFunc.apply(
        q, k, v, learnable_sink, None, kw, (score_mod, score_mod_grad, mask_mod, block_mask)
    )
    return out, lse


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    score_mod: Callable[..., Any] | None = None,
    score_mod_grad: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    seqused_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable programmable attention over packed sequences (as :func:`attention`, no block mask).

    Args:
        q: ``(total_q, nheads, headdim)``; k: ``(total_k, nheads_k, headdim)``; v: ``(total_k, nheads_k, headdim_v)``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 prefix sums; max_seqlen_q / max_seqlen_k: bounds.
        seqused_k: optional ``(batch,)`` int32 keys used per sequence.
        score_mod / mask_mod get ``q_idx`` / ``kv_idx`` relative to the start of each sequence.
        Other arguments: as :func:`attention`.

    Returns:
        ``out (total_q, nheads, headdim_v)`` and ``lse (nheads, total_q)`` float32 (differentiable).
    """
    _check_grad_fns(score_mod, score_mod_grad, _needs_grad(q, k, v, learnable_sink))
    kw = _kw(softmax_scale, causal, window_size, softcap, alibi_slopes, attention_chunk, dropout_p)
    kw["seqused_k"] = seqused_k
    varlen = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), seqused_k)
    mods = (score_mod, score_mod_grad, mask_mod, None)
    out, lse = _AttentionFunc.apply(q, k, v, learnable_sink, varlen, kw, mods)
    return out, lse
