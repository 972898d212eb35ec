"""The public functions, with flash-attn 2.8's exact signatures and return conventions: thin views of
:func:`fa_backward.autograd.attention` (the one autograd layer)."""

from __future__ import annotations

from typing import Any

import torch

from fa_backward.autograd import attention
from fa_core import ops
from fa_core.ops import KV, QKV

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]

Tensor = torch.Tensor


def _result(res: tuple[Tensor, Tensor, Tensor], return_attn_probs: bool, dropout_p: float, sq: int, sk: int):
    """``out``, or ``(out, softmax_lse, S_dmask)``: S_dmask None without dropout (as flash-attn), else the
    probabilities ``(batch, nheads, max_seqlen_q, max_seqlen_k)`` (dropped entries negated)."""
    out, lse, s_dmask = res
    if not return_attn_probs:
        return out
    return out, lse, (s_dmask[:, :, :sq, :sk] if dropout_p > 0 else None)


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv ``(batch, seqlen, 3, nheads, headdim)`` -> out ``(batch, seqlen, nheads, headdim)``; backward
    writes one ``dqkv``. With ``return_attn_probs``: ``(out, softmax_lse, S_dmask)`` (``S_dmask`` is None
    unless ``dropout_p > 0``, as in flash-attn; dropped entries negated)."""
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = attention(qkv, None, None, pack=QKV, **opts)
    return _result(res, return_attn_probs, dropout_p, qkv.shape[1], qkv.shape[1])


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q ``(batch, seqlen_q, nheads, headdim)``, kv ``(batch, seqlen_k, 2, nheads_k, headdim)``; backward
    writes one ``dkv``."""
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = attention(q, kv, None, pack=KV, **opts)
    return _result(res, return_attn_probs, dropout_p, q.shape[1], kv.shape[1])


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Differentiable FlashAttention-2 (flash-attn 2.8's ``flash_attn_func``).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k ``(batch, seqlen_k, nheads_k, headdim)``;
            v ``(batch, seqlen_k, nheads_k, headdim_v)``; nheads divisible by nheads_k (GQA/MQA).
        dropout_p: dropout probability (pass 0.0 at evaluation). softmax_scale: default ``headdim ** -0.5``.
        causal: bottom-right aligned causal mask. window_size: ``(left, right)`` ints, -1 = unbounded.
        softcap: ``softcap * tanh(scores / softcap)`` (0 = off). alibi_slopes: ``(nheads,)`` or ``(batch, nheads)``
            float32, bias ``-slope * |i + seqlen_k - seqlen_q - j|``.
        deterministic: accepted; the backward is always deterministic (no atomics).
        return_attn_probs: also return ``softmax_lse (batch, nheads, seqlen_q)`` (differentiable) and
            ``S_dmask`` (testing only).

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)``, or ``(out, softmax_lse, S_dmask)``.
    """
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = attention(q, k, v, **opts)
    return _result(res, return_attn_probs, dropout_p, q.shape[1], k.shape[1])


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv ``(total, 3, nheads, headdim)``, cu_seqlens int32 ``(batch + 1,)``; lse ``(nheads, total)``."""
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = attention(
        qkv, None, None, pack=QKV, varlen=True, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, **opts,
    )  # fmt: skip
    return _result(res, return_attn_probs, dropout_p, int(max_seqlen), int(max_seqlen))


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q ``(total_q, nheads, headdim)``, kv ``(total_k, 2, nheads_k, headdim)``."""
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = attention(
        q, kv, None, pack=KV, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **opts,
    )  # fmt: skip
    return _result(res, return_attn_probs, dropout_p, int(max_seqlen_q), int(max_seqlen_k))


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
):
    """Differentiable varlen attention (flash-attn 2.8's ``flash_attn_varlen_func``).

    Args:
        q ``(total_q, nheads, headdim)``; k ``(total_k, nheads_k, headdim)``; v ``(total_k, nheads_k, headdim_v)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` prefix sums; max_seqlen_q/k: longest sequences.
        block_table: paged KV is not supported here (raises NotImplementedError; fa-compat's
            ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` take it).
        Other arguments: as :func:`flash_attn_func`.

    Returns:
        ``out (total_q, nheads, headdim_v)``, or ``(out, softmax_lse (nheads, total_q), S_dmask)``.
    """
    if block_table is not None:
        raise NotImplementedError(
            "block_table (paged KV) is not supported by fa_backward.flash_attn_varlen_func: use "
            "flash_attn.flash_attn_varlen_func (forward) or flash_attn_with_kvcache (fa-kvcache)"
        )
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = attention(
        q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, **opts,
    )  # fmt: skip
    return _result(res, return_attn_probs, dropout_p, int(max_seqlen_q), int(max_seqlen_k))
