"""The keyword-only extras of ``flash_attn_func`` / ``flash_attn_varlen_func`` beyond flash-attn 2.8.

``attention_chunk`` (FlashAttention-3's name: a query sees keys of its own chunk only) and ``learnable_sink``
(FlashAttention-4's / gpt-oss's: one extra logit per head in every row's softmax denominator). With both at
their defaults the public functions never come here: they call the ``flash_attn_plus`` custom ops exactly as
before. With either set they call :func:`dense` / :func:`varlen`, which run

* with fa-backward installed: ``fa_backward.programmable.attention`` / ``attention_varlen``, differentiable
  for q, k, v and the sink (the returned ``softmax_lse`` is differentiable too);
* without it: fa-core's forward (no gradient; inputs that require grad raise
  :class:`flash_attn._extras.MissingExtraError` at the forward, as everywhere else).

This path is not a registered custom op: ``torch.compile`` does not trace into it (``torch.compiler.disable``,
a graph break; ``fullgraph=True`` refuses it). ``flash_attn_with_kvcache`` needs no such path: its custom op
takes both extras.
"""

from __future__ import annotations

import torch

import fa_core
from fa_core import validation as V
from flash_attn import _extras

__all__ = ["dense", "varlen", "is_default"]

Tensor = torch.Tensor


def is_default(attention_chunk: object, learnable_sink: object) -> bool:
    """Both extras at their defaults (the 2.8 path). ``attention_chunk=0`` and ``False`` count as off."""
    return learnable_sink is None and isinstance(attention_chunk, int) and attention_chunk == 0


def _check(
    attention_chunk: int,
    learnable_sink: Tensor | None,
    nheads: int,
    q: Tensor,
    dropout_p: float,
    return_attn_probs: bool,
    needs_grad: bool,
) -> None:
    if learnable_sink is not None and not isinstance(learnable_sink, torch.Tensor):
        raise TypeError(
            f"learnable_sink must be a tensor of shape ({nheads},), got {type(learnable_sink).__name__}"
        )
    V.check_chunk_and_sink(attention_chunk, learnable_sink, nheads, q)
    if return_attn_probs and dropout_p > 0:
        raise ValueError(
            "return_attn_probs=True with dropout_p > 0 (S_dmask) is not available together with attention_chunk "
            "or learnable_sink; pass dropout_p=0.0 (S_dmask is then empty, as in flash-attn) or "
            "return_attn_probs=False"
        )
    if needs_grad:
        _extras.require_backward()


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _result(out: Tensor, lse: Tensor, q: Tensor, return_attn_probs: bool) -> Tensor | tuple[Tensor, ...]:
    # S_dmask is empty without dropout, as in flash-attn 2.8 (dropout + return_attn_probs is refused above).
    return (out, lse, q.new_empty((0,))) if return_attn_probs else out


@torch.compiler.disable
def dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    return_attn_probs: bool,
    attention_chunk: int,
    learnable_sink: Tensor | None,
) -> Tensor | tuple[Tensor, ...]:
    """``flash_attn_func`` with an attention chunk and/or a learnable sink (inputs already checked for
    device and kind by the caller)."""
    needs_grad = _needs_grad(q, k, v, learnable_sink)
    _check(attention_chunk, learnable_sink, q.shape[2], q, dropout_p, return_attn_probs, needs_grad)
    window = V.window_pair(window_size)
    if _extras.BACKWARD is not None:
        out, lse = _extras.BACKWARD.programmable.attention(
            q, k, v, softmax_scale, causal, window, softcap, alibi_slopes, attention_chunk=attention_chunk,
            learnable_sink=learnable_sink, dropout_p=dropout_p,
        )  # fmt: skip
    else:
        res = fa_core.flash_attn_forward(
            q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes,
            attention_chunk=attention_chunk, learnable_sink=learnable_sink,
        )  # fmt: skip
        out, lse = res.out, res.lse
    return _result(out, lse, q, return_attn_probs)


@torch.compiler.disable
def varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    return_attn_probs: bool,
    seqused_k: Tensor | None,
    attention_chunk: int,
    learnable_sink: Tensor | None,
) -> Tensor | tuple[Tensor, ...]:
    """``flash_attn_varlen_func`` with an attention chunk and/or a learnable sink (paged keys already
    gathered by the caller into ``k``/``v`` + ``seqused_k``)."""
    needs_grad = _needs_grad(q, k, v, learnable_sink)
    _check(attention_chunk, learnable_sink, q.shape[1], q, dropout_p, return_attn_probs, needs_grad)
    window = V.window_pair(window_size)
    if _extras.BACKWARD is not None:
        out, lse = _extras.BACKWARD.programmable.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window,
            softcap, alibi_slopes, attention_chunk=attention_chunk, learnable_sink=learnable_sink,
            dropout_p=dropout_p, seqused_k=seqused_k,
        )  # fmt: skip
    else:
        res = fa_core.flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window, softcap, alibi_slopes, seqused_k=seqused_k, attention_chunk=attention_chunk,
            learnable_sink=learnable_sink,
        )  # fmt: skip
        out, lse = res.out, res.lse
    return _result(out, lse, q, return_attn_probs)
