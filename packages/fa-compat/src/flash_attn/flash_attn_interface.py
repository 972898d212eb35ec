"""flash-attn 2.8.x's ``flash_attn.flash_attn_interface`` on the Flash Attention Plus Triton kernels.

Same names, parameter order, defaults and return values as flash-attn 2.8.3 (held by
``tests/test_signatures.py`` against the recorded signatures). Shapes: dense q ``(batch, seqlen_q, nheads,
headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``; varlen q ``(total_q, nheads, headdim)``, k/v
``(total_k, nheads_k, headdim)`` with int32 ``cu_seqlens`` ``(batch + 1,)``.

Differences from flash-attn (all supersets, none changes a result flash-attn would give):

* head dims 1..256 without padding, v's head dim may differ from q's; fp32 also accepted on CPU (interpreter).
* ``S_dmask`` (``return_attn_probs=True`` with dropout) holds the normalized probabilities, dropped entries
  negated (flash-attn: block-scaled unnormalized values, documented as "might not have the right scaling").
* ``deterministic`` is accepted and passed on, but the backward is always deterministic (no atomics).
* softcap and dropout may be combined; ``_flash_attn_forward(return_softmax=True)`` works without dropout.
* varlen ``block_table`` (paged keys) gathers the pages into a padded copy of K/V (forward only, as in
  flash-attn); ``leftpad_k`` is not supported (NotImplementedError).
* keyword-only extras of newer flash-attn interfaces, after every 2.8 parameter: ``attention_chunk`` (FA3) in
  ``flash_attn_func`` / ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``, ``learnable_sink`` (FA4)
  in the same three; at their defaults nothing changes (see :mod:`flash_attn._extensions`).

Layout of the implementation: the argument checks are in :mod:`flash_attn._checks`, the low-level 2.8 functions
(``_flash_attn_forward`` & co, re-exported here) in :mod:`flash_attn._lowlevel`, the autograd Functions in
:mod:`flash_attn._autograd`, the custom ops in :mod:`flash_attn._ops`.

Gradients need the ``backward`` extra (fa-backward) and ``flash_attn_with_kvcache`` the ``kvcache`` extra
(fa-kvcache): without them the call raises :class:`flash_attn._extras.MissingExtraError` saying what to install.
"""

from __future__ import annotations

import operator

import torch

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from flash_attn import _extensions, _extras
from flash_attn import _ops as ops
from flash_attn._autograd import (
    FlashAttnFunc,
    FlashAttnKVPackedFunc,
    FlashAttnQKVPackedFunc,
    FlashAttnVarlenFunc,
    FlashAttnVarlenKVPackedFunc,
    FlashAttnVarlenQKVPackedFunc,
)
from flash_attn._checks import _as_int, _check_args, _check_block_table, _check_grad

# `x as x`: re-exported, flash-attn 2.8's low-level functions and helper live in this module
from flash_attn._lowlevel import _flash_attn_backward as _flash_attn_backward
from flash_attn._lowlevel import _flash_attn_forward as _flash_attn_forward
from flash_attn._lowlevel import _flash_attn_varlen_backward as _flash_attn_varlen_backward
from flash_attn._lowlevel import _flash_attn_varlen_forward as _flash_attn_varlen_forward
from flash_attn._lowlevel import _gather_pages
from flash_attn._ops import round_multiple as round_multiple

__all__ = [
    "FlashAttnFunc",
    "FlashAttnKVPackedFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "FlashAttnVarlenKVPackedFunc",
    "FlashAttnVarlenQKVPackedFunc",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

Tensor = torch.Tensor


#: flash-attn's helper name (copies only a strided last dim), shared with fa_core
maybe_contiguous = V.contig_last


def _get_block_size_n(device, head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """flash-attn's key-block width for ``head_dim`` on ``device`` (what its ``S_dmask`` columns are grouped
    by): :func:`fa_core.probs_kernel.get_block_size_n` when fa-core has it, else flash-attn 2.8's rule."""
    try:
        from fa_core.probs_kernel import get_block_size_n
    except ImportError:
        return _block_size_n_rule(device, head_dim, is_dropout, is_causal)
    return get_block_size_n(device, head_dim, is_dropout, is_causal)


def _block_size_n_rule(device, head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """flash-attn 2.8's ``_get_block_size_n``: the CUDA kernels' block N per head dim and architecture (sm86 /
    sm89 differ from sm80 / sm90 at head dims 97..160). A non-CUDA device counts as sm80."""
    if head_dim > 256:
        raise FlashAttnValueError(f"head_dim must be <= 256, got {head_dim}")
    major, minor = (8, 0)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(dev)
    is_sm8x = major == 8 and minor > 0
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if is_dropout else 128
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        if is_sm8x:
            return 64 if (not is_dropout and is_causal) else 32
        return 32 if is_dropout else 64
    if head_dim <= 160:
        return 64 if is_sm8x else 32
    return 64


# ---------------------------------------------------------------------------------------- public API
def _dense(
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
    attention_chunk=0,
    learnable_sink=None,
):
    _check_args(window_size, q=q, k=k, v=v, alibi_slopes=alibi_slopes, learnable_sink=learnable_sink)
    _check_grad(q, k, v, learnable_sink)
    q, k, v = (maybe_contiguous(x) for x in (q, k, v))
    if not _extensions.is_default(attention_chunk, learnable_sink):
        return _extensions.dense(
            q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
            attention_chunk, learnable_sink,
        )  # fmt: skip
    left, right = V.window_pair(window_size)
    out, lse, s_dmask, _ = torch.ops.flash_attn_plus.fwd(
        q, k, v, dropout_p, ops.default_scale(q, softmax_scale), causal, left, right, softcap, alibi_slopes,
        bool(return_attn_probs and dropout_p > 0), deterministic,
    )  # fmt: skip
    return (out, lse, s_dmask) if return_attn_probs else out


def _varlen(
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
    block_table=None,
    attention_chunk=0,
    learnable_sink=None,
):
    _check_args(
        window_size,
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        alibi_slopes=alibi_slopes,
        learnable_sink=learnable_sink,
    )
    _check_grad(q, k, v, learnable_sink)
    q, k, v = (maybe_contiguous(x) for x in (q, k, v))
    max_seqlen_q, max_seqlen_k = _as_int(max_seqlen_q), _as_int(max_seqlen_k)
    seqused_k = None
    if block_table is not None:
        _check_block_table(block_table, k, cu_seqlens_k)
        k, v, cu_seqlens_k, seqused_k = _gather_pages(k, v, block_table, cu_seqlens_k, max_seqlen_k, None)
    if not _extensions.is_default(attention_chunk, learnable_sink):
        return _extensions.varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, return_attn_probs, seqused_k, attention_chunk, learnable_sink,
        )  # fmt: skip
    left, right = V.window_pair(window_size)
    out, lse, s_dmask, _ = torch.ops.flash_attn_plus.varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        ops.default_scale(q, softmax_scale), causal, left, right, softcap, alibi_slopes,
        bool(return_attn_probs and dropout_p > 0), seqused_k, deterministic,
    )  # fmt: skip
    return (out, lse, s_dmask) if return_attn_probs else out


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
    """qkv ``(batch, seqlen, 3, nheads, headdim)`` -> out ``(batch, seqlen, nheads, headdim)``; with
    ``return_attn_probs`` ``(out, softmax_lse (b, h, s), S_dmask)`` (S_dmask ``(0,)`` without dropout)."""
    V.check_packed("qkv", qkv, 5, 2, 3)
    _check_args(window_size, qkv=qkv, alibi_slopes=alibi_slopes)
    _check_grad(qkv)
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
    V.check_packed("kv", kv, 5, 2, 2)
    _check_args(window_size, q=q, kv=kv, alibi_slopes=alibi_slopes)
    _check_grad(q, kv)
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
    *,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
):
    """Dense attention.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)``, nheads a
            multiple of nheads_k (GQA/MQA).
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval).
        softmax_scale: default ``headdim ** -0.5``.
        causal: bottom-right aligned causal mask. window_size: ``(left, right)`` sliding window, -1 = unbounded.
        softcap: ``softcap * tanh(scores / softcap)`` when > 0.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``: bias ``-slope * |i + seqlen_k - seqlen_q - j|``.
        deterministic: accepted (our backward is always deterministic).
        return_attn_probs: also return ``softmax_lse (batch, nheads, seqlen_q)`` fp32 and ``S_dmask``.
        attention_chunk: keyword only, beyond flash-attn 2.8 (FlashAttention-3's name): a query at position
            ``p = i + seqlen_k - seqlen_q`` sees only keys ``j`` with ``j // chunk == p // chunk``; combines
            with causal / window; 0 = off.
        learnable_sink: keyword only, beyond flash-attn 2.8 (FlashAttention-4's name, gpt-oss's sinks):
            ``(nheads,)`` fp32/fp16/bf16, one extra logit per head in every row's softmax denominator and
            none in the output; differentiable (needs fa-backward). ``softmax_lse`` includes it.
        With either extra set, the call runs ``fa_backward.programmable.attention`` (fa-core's forward
        without fa-backward) instead of the registered ``flash_attn_plus`` custom op: ``torch.compile``
        graph-breaks there. ``softmax_lse`` is then differentiable, and ``return_attn_probs`` with
        ``dropout_p > 0`` raises ``ValueError``.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim)``, or ``(out, softmax_lse, S_dmask)``.
    """
    return _dense(
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
        attention_chunk,
        learnable_sink,
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
    """qkv ``(total, 3, nheads, headdim)``, cu_seqlens int32 ``(batch + 1,)`` -> out ``(total, nheads, headdim)``."""
    V.check_packed("qkv", qkv, 4, 1, 3)
    _check_args(window_size, qkv=qkv, cu_seqlens=cu_seqlens, alibi_slopes=alibi_slopes)
    _check_grad(qkv)
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
    V.check_packed("kv", kv, 4, 1, 2)
    _check_args(
        window_size,
        q=q,
        kv=kv,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        alibi_slopes=alibi_slopes,
    )
    _check_grad(q, kv)
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
    *,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
):
    """Variable-length attention over packed sequences.

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)``, or paged
            ``(num_blocks, page_block_size, nheads_k, headdim)`` with ``block_table (batch, max_blocks)`` int32.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)``; max_seqlen_q, max_seqlen_k: int (or 0-dim tensor).
        Other arguments: as :func:`flash_attn_func` (``attention_chunk`` and ``learnable_sink`` too, keyword
            only; with either set, ``fa_backward.programmable.attention_varlen`` runs, not a custom op);
            causal/window/chunks are aligned per sequence.

    Returns:
        ``out (total_q, nheads, headdim)``, or ``(out, softmax_lse (nheads, total_q), S_dmask)``.
    """
    return _varlen(
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
        attention_chunk,
        learnable_sink,
    )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    *,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
):
    """Attention over a KV cache, appending ``k``/``v`` into it in place first (see fa_kvcache for details).

    q ``(batch, seqlen_q, nheads, headdim)``; k_cache/v_cache ``(batch_cache, seqlen_cache, nheads_k, headdim)``
    or paged ``(num_blocks, page_block_size, nheads_k, headdim)`` with ``block_table``; ``cache_seqlens`` int or
    int32 ``(batch,)``. Returns ``out``, or ``(out, softmax_lse (batch, nheads, seqlen_q))``. No backward (as in
    flash-attn: the result does not require grad). Needs fa-kvcache.

    Keyword only, beyond flash-attn 2.8: ``attention_chunk`` (FlashAttention-3's chunked attention, 0 = off)
    and ``learnable_sink`` ``(nheads,)`` (one extra softmax logit per head, as in :func:`flash_attn_func`;
    included in ``softmax_lse``). Both go through the same ``flash_attn_plus::kvcache`` custom op.
    """
    _extras.require_kvcache()
    _check_args(
        window_size, q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
        alibi_slopes=alibi_slopes, learnable_sink=learnable_sink,
    )  # fmt: skip
    if isinstance(attention_chunk, bool) or not isinstance(attention_chunk, int) or attention_chunk < 0:
        raise ValueError(f"attention_chunk must be an int >= 0 (0 = off), got {attention_chunk!r}")
    q, k, v = (maybe_contiguous(x) for x in (q, k, v))
    seqlens_t = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    if cache_seqlens is not None and seqlens_t is None:
        try:
            seqlens_i: int | None = operator.index(cache_seqlens)
        except TypeError:
            raise TypeError(
                f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}"
            ) from None
    else:
        seqlens_i = None
    left, right = V.window_pair(window_size)
    with torch.no_grad():  # flash-attn's kernel is not differentiable and records no graph
        out, lse = torch.ops.flash_attn_plus.kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens_t, seqlens_i, cache_batch_idx,
            cache_leftpad, maybe_contiguous(block_table), softmax_scale, causal, left, right, softcap, rotary_interleaved, alibi_slopes, num_splits, attention_chunk,
            learnable_sink,
        )  # fmt: skip
    return (out, lse) if return_softmax_lse else out
