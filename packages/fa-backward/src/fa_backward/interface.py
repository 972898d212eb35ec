"""The public functions, with flash-attn 2.8's exact signatures and return conventions (thin wrappers)."""

from __future__ import annotations

import torch

from fa_backward.autograd import (
    FlashAttnFunc,
    FlashAttnKVPackedFunc,
    FlashAttnQKVPackedFunc,
    FlashAttnVarlenFunc,
    FlashAttnVarlenKVPackedFunc,
    FlashAttnVarlenQKVPackedFunc,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv ``(batch, seqlen, 3, nheads, headdim)`` -> out ``(batch, seqlen, nheads, headdim)``; backward
    writes one ``dqkv``. With ``return_attn_probs``: ``(out, softmax_lse, S_dmask)`` (``S_dmask`` is None
    unless ``dropout_p > 0``, as in flash-attn; dropped entries negated)."""
    return FlashAttnQKVPackedFunc.apply(
        qkv,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        torch.is_grad_enabled(),
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(batch, seqlen_q, nheads, headdim)``, kv ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    return FlashAttnKVPackedFunc.apply(
        q,
        kv,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        torch.is_grad_enabled(),
    )


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Differentiable FlashAttention-2 (flash-attn 2.8's ``flash_attn_func``).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k ``(batch, seqlen_k, nheads_k, headdim)``;
            v ``(batch, seqlen_k, nheads_k, headdim_v)``; nheads divisible by nheads_k (GQA/MQA).
        dropout_p: dropout probability (pass 0.0 at evaluation). softmax_scale: default ``headdim ** -0.5``.
        causal: bottom-right aligned causal mask. window_size: ``(left, right)``, -1 = unbounded.
        softcap: ``softcap * tanh(scores / softcap)`` (0 = off). alibi_slopes: ``(nheads,)`` or ``(batch, nheads)``
            float32, bias ``-slope * |i + seqlen_k - seqlen_q - j|``.
        deterministic: accepted; the backward is always deterministic (no atomics).
        return_attn_probs: also return ``softmax_lse (batch, nheads, seqlen_q)`` and ``S_dmask`` (testing only).

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)``, or ``(out, softmax_lse, S_dmask)``.
    """
    return FlashAttnFunc.apply(
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
        return_attn_probs,
        torch.is_grad_enabled(),
    )


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv ``(total, 3, nheads, headdim)``, cu_seqlens int32 ``(batch + 1,)``; lse ``(nheads, total)``."""
    return FlashAttnVarlenQKVPackedFunc.apply(
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
        return_attn_probs,
        torch.is_grad_enabled(),
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(total_q, nheads, headdim)``, kv ``(total_k, 2, nheads_k, headdim)``."""
    return FlashAttnVarlenKVPackedFunc.apply(
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
        return_attn_probs,
        torch.is_grad_enabled(),
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Differentiable varlen attention (flash-attn 2.8's ``flash_attn_varlen_func``).

    Args:
        q ``(total_q, nheads, headdim)``; k ``(total_k, nheads_k, headdim)``; v ``(total_k, nheads_k, headdim_v)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` prefix sums; max_seqlen_q/k: longest sequences.
        block_table: paged KV is not supported here (raises NotImplementedError).
        Other arguments: as :func:`flash_attn_func`.

    Returns:
        ``out (total_q, nheads, headdim_v)``, or ``(out, softmax_lse (nheads, total_q), S_dmask)``.
    """
    return FlashAttnVarlenFunc.apply(
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
        return_attn_probs,
        block_table,
        torch.is_grad_enabled(),
    )
