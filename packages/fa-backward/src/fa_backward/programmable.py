"""Differentiable attention with the features beyond flash-attn 2, dense and varlen: views of the one
autograd layer (:func:`fa_backward.autograd.attention`), which carries every feature below.

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

from fa_backward.autograd import attention as _attention
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


def _mods(score_mod, score_mod_grad, mask_mod, block_mask, *tensors) -> tuple | None:
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    _check_grad_fns(score_mod, score_mod_grad, needs_grad)
    if score_mod is None and mask_mod is None and block_mask is None:
        return None
    return (score_mod, score_mod_grad, mask_mod, block_mask)


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
    block_mask: BlockMask | Any | None = None,
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
        block_mask: :class:`fa_core.block_sparse.BlockMask`, or PyTorch's FlexAttention ``BlockMask``
            (converted once by :func:`fa_core.block_sparse.as_block_mask` before the forward; the backward
            reads the converted mask); only listed blocks are loaded, forward and backward; ``mask_mod`` is
            evaluated in its partial blocks only.
        dropout_p: dropout on the probabilities (the sink's probability is not dropped).
        Other arguments: as :func:`fa_core.flash_attn_forward`.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)`` and ``lse (batch, nheads, seqlen_q)`` float32 (includes the
        sink; differentiable).
    """
    out, lse, _ = _attention(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, attention_chunk=attention_chunk,
        learnable_sink=learnable_sink,
        mods=_mods(score_mod, score_mod_grad, mask_mod, block_mask, q, k, v, learnable_sink),
    )  # fmt: skip
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
    out, lse, _ = _attention(
        q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, dropout_p=dropout_p, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        attention_chunk=attention_chunk, learnable_sink=learnable_sink,
        mods=_mods(score_mod, score_mod_grad, mask_mod, None, q, k, v, learnable_sink),
    )  # fmt: skip
    return out, lse
