"""flash-attn 2.8.x's ``flash_attn.flash_attn_interface`` on the Flash Attention Plus Triton kernels.

Same names, parameter order, defaults and return values as flash-attn 2.8.3 (held by
``tests/test_signatures.py`` against the recorded signatures). Shapes: dense q ``(batch, seqlen_q, nheads,
headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``; varlen q ``(total_q, nheads, headdim)``, k/v
``(total_k, nheads_k, headdim)`` with int32 ``cu_seqlens`` ``(batch + 1,)``.

Differences from flash-attn (all supersets, none changes a result flash-attn would give):

* head dims 1..256 without padding, v's head dim may differ from q's; fp32 also accepted on CPU (interpreter).
* ``window_size``: any pair of ints (tuple, list, tensor or numpy array of two ints); floats and bools raise
  ``TypeError``.
* ``S_dmask`` (``return_attn_probs=True`` with dropout, ``return_softmax``) is flash-attn's form: per key block
  of ``_get_block_size_n`` columns the unnormalized ``exp(s - running max)``, dropped entries negated, zero
  padded to ``(b, h, round128(sq), round128(sk))`` (:func:`fa_core.probs_kernel.flash_attn_s_dmask`, from the
  forward's ``rng_state``), so flash-attn's ``normalize_flash_attn_S`` recovers the probabilities. With a
  ``learnable_sink`` (no flash-attn form) it holds the normalized probabilities, the sink's share included.
* ``softmax_lse`` (``return_attn_probs=True``) is differentiable (flash-attn ignores its gradient).
* ``deterministic`` is accepted and passed on, but the backward is always deterministic (no atomics).
* softcap and dropout may be combined; ``_flash_attn_forward(return_softmax=True)`` works without dropout.
* varlen ``block_table`` (paged keys): any power-of-two page size >= 16 is read in the kernel through the
  table (flash-attn: multiples of 256), forward only as in flash-attn; where a gradient is wanted, under
  ``torch.compile``, with ``S_dmask`` or with other page sizes the pages are gathered into a padded copy
  (differentiable). ``_flash_attn_varlen_forward``'s ``leftpad_k`` is read in the kernel too, and combines
  with a ``block_table`` (flash-attn refuses the pair).
* keyword-only extras of newer flash-attn interfaces, after every 2.8 parameter: ``attention_chunk`` (FA3) in
  ``flash_attn_func`` / ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``, ``learnable_sink`` (FA4)
  in the same three; at their defaults nothing changes. Both compile with ``fullgraph=True``.

Layout of the implementation: every function here is a thin view of one call path: arguments normalised and
checked once (:func:`fa_core.ops.prepare`), then the forward (:func:`fa_core.ops.run_forward`) or, when a
gradient is wanted, the one autograd layer of fa-backward (:mod:`fa_backward.autograd`); under
``torch.compile`` the kernels run as the custom ops ``flash_attn_plus::*``. The low-level 2.8 functions
(``_flash_attn_forward`` & co) are in :mod:`flash_attn._lowlevel`, re-exported here; ``flash_attn_gpu`` is
:mod:`flash_attn._flash_attn_gpu`, the raw entry points of flash-attn's compiled extension (``fwd``, ``bwd``,
``varlen_fwd``, ``varlen_bwd``, ``fwd_kvcache``) on those functions.

Gradients need the ``backward`` extra (fa-backward) and ``flash_attn_with_kvcache`` the ``kvcache`` extra
(fa-kvcache): without them the call raises :class:`flash_attn._extras.MissingExtraError` saying what to install.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch

from fa_core import ops
from fa_core import validation as V
from fa_core.function_views import function_views
from fa_core.ops import KV, QKV
from fa_core.ops import round_multiple as round_multiple
from flash_attn import _extras, _flash_attn_gpu, _kvcache
from flash_attn._checks import _check_block_table

# `x as x`: re-exported, flash-attn 2.8's low-level functions and helper live in this module
from flash_attn._lowlevel import _flash_attn_backward as _flash_attn_backward
from flash_attn._lowlevel import _flash_attn_forward as _flash_attn_forward
from flash_attn._lowlevel import _flash_attn_varlen_backward as _flash_attn_varlen_backward
from flash_attn._lowlevel import _flash_attn_varlen_forward as _flash_attn_varlen_forward
from flash_attn._lowlevel import _gather_pages, in_kernel, paged_varlen_forward

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

#: flash-attn 2.8's module flag (its ROCm Triton backend); these Triton kernels are not that backend
USE_TRITON_ROCM = False

#: flash-attn's compiled extension (2.8: ``import flash_attn_2_cuda as flash_attn_gpu``): the raw entry points
#: ``fwd`` / ``bwd`` / ``varlen_fwd`` / ``varlen_bwd`` / ``fwd_kvcache`` with its positional argument lists
flash_attn_gpu = _flash_attn_gpu


def _get_block_size_n(device, head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """flash-attn's key-block width for ``head_dim`` on ``device``: the block ``S_dmask``'s columns are
    scaled by (:func:`fa_core.probs_kernel.get_block_size_n`, flash-attn 2.8's rule; imported at the first
    call, so ``import flash_attn`` imports no Triton)."""
    from fa_core.probs_kernel import get_block_size_n

    return get_block_size_n(device, head_dim, is_dropout, is_causal)


# ---------------------------------------------------------------------------------------- the one path
def _attention(a: Tensor, b: Tensor | None, c: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, softmax_lse, S_dmask)`` of one call (:func:`fa_core.ops.attention`), differentiable through
    fa-backward's autograd layer when installed."""
    fab = _extras.BACKWARD
    return ops.attention(
        a, b, c, autograd=None if fab is None else fab.autograd.apply,
        missing=_extras.require_backward, **kwargs,
    )  # fmt: skip


def _result(res: tuple[Tensor, Tensor, Tensor], return_attn_probs: bool):
    """flash-attn's return: ``out``, or ``(out, softmax_lse, S_dmask)`` (S_dmask ``(0,)`` without dropout)."""
    return res if return_attn_probs else res[0]


# ---------------------------------------------------------------------------------------- public API
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
    ``return_attn_probs`` ``(out, softmax_lse (b, h, s), S_dmask)`` (S_dmask ``(0,)`` without dropout). The
    backward writes one ``dqkv``."""
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    return _result(_attention(qkv, None, None, pack=QKV, **opts), return_attn_probs)


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
    """q ``(batch, seqlen_q, nheads, headdim)``, kv ``(batch, seqlen_k, 2, nheads_k, headdim)``; the backward
    writes one ``dkv``."""
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    return _result(_attention(q, kv, None, pack=KV, **opts), return_attn_probs)


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

    Returns:
        ``out (batch, seqlen_q, nheads, headdim)``, or ``(out, softmax_lse, S_dmask)``.
    """
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = _attention(q, k, v, attention_chunk=attention_chunk, learnable_sink=learnable_sink, **opts)
    return _result(res, return_attn_probs)


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
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = _attention(
        qkv, None, None, pack=QKV, varlen=True, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, **opts,
    )  # fmt: skip
    return _result(res, return_attn_probs)


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
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = _attention(
        q, kv, None, pack=KV, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **opts,
    )  # fmt: skip
    return _result(res, return_attn_probs)


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
            only); causal/window/chunks are aligned per sequence.

    Returns:
        ``out (total_q, nheads, headdim)``, or ``(out, softmax_lse (nheads, total_q), S_dmask)``.
    """
    seqused_k = None
    if block_table is not None:
        want_s_dmask = bool(return_attn_probs) and dropout_p > 0
        if in_kernel(q, k, block_table, want_s_dmask, v, learnable_sink):  # forward only, pages read in place
            out, lse, s_dmask, _ = paged_varlen_forward(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
                softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                alibi_slopes=alibi_slopes, block_table=block_table, attention_chunk=attention_chunk,
                learnable_sink=learnable_sink,
            )  # fmt: skip
            return _result((out, lse, s_dmask), return_attn_probs)
        V.check_tensor("k", k, 4)
        V.check_tensor("cu_seqlens_k", cu_seqlens_k, 1)
        _check_block_table(block_table, k, cu_seqlens_k)
        k, v, cu_seqlens_k, seqused_k = _gather_pages(
            k, v, V.contig_last(block_table), cu_seqlens_k, int(max_seqlen_k), None
        )
    opts = ops.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs)  # fmt: skip
    res = _attention(
        q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, attention_chunk=attention_chunk,
        learnable_sink=learnable_sink, **opts,
    )  # fmt: skip
    return _result(res, return_attn_probs)


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
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
):
    """Attention over a KV cache, appending ``k``/``v`` into it in place first (see fa_kvcache for details).

    q ``(batch, seqlen_q, nheads, headdim)``; k_cache/v_cache ``(batch_cache, seqlen_cache, nheads_k, headdim)``
    or paged ``(num_blocks, page_block_size, nheads_k, headdim)`` with ``block_table``; ``cache_seqlens`` int or
    int32 ``(batch,)``. Returns ``out``, or ``(out, softmax_lse (batch, nheads, seqlen_q))``. No backward (as in
    flash-attn: the result does not require grad). Needs fa-kvcache, which checks every argument.

    Keyword only, beyond flash-attn 2.8: ``attention_chunk`` (FlashAttention-3's chunked attention, 0 = off)
    and ``learnable_sink`` ``(nheads,)`` (one extra softmax logit per head, as in :func:`flash_attn_func`;
    included in ``softmax_lse``); ``k_descale`` / ``v_descale`` ``(batch, nheads_k)`` float32 with a
    ``float8_e4m3fn`` k_cache / v_cache (FlashAttention-3's names: real values ``k_cache * k_descale``; q, k, v
    and out stay fp16 / bf16). Eager calls run fa-kvcache directly; under ``torch.compile`` the call is the
    ``flash_attn_plus::kvcache`` custom op.
    """
    left, right = V.window_pair(window_size)
    if not isinstance(q, torch.Tensor) or not ops.tracing(q):
        fak = _extras.require_kvcache()
        with (
            torch.no_grad() if ops.needs_grad(q, k, v, learnable_sink) else _NULL
        ):  # flash-attn's kernel is not differentiable
            out, lse = fak.flash_attn_with_kvcache(
                q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                cache_leftpad, block_table, softmax_scale, causal, (left, right), softcap, rotary_interleaved,
                alibi_slopes, num_splits, True, attention_chunk=attention_chunk, learnable_sink=learnable_sink,
                k_descale=k_descale, v_descale=v_descale,
            )  # fmt: skip
        return (out, lse) if return_softmax_lse else out
    seqlens_t = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    seqlens_i: int | None = None
    if cache_seqlens is not None and seqlens_t is None:
        try:
            seqlens_i = operator.index(cache_seqlens)
        except TypeError:
            raise TypeError(
                f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}"
            ) from None
    out, lse = _kvcache.kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens_t, seqlens_i, cache_batch_idx, cache_leftpad,
        maybe_contiguous(block_table), softmax_scale, causal, left, right, softcap, rotary_interleaved,
        alibi_slopes, num_splits, attention_chunk, learnable_sink, k_descale, v_descale,
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out


_NULL = contextlib.nullcontext()


# --------------------------------------------------------------- flash-attn's FlashAttn*Func names: views
def _view_forward(ctx: Any, a, b, c, sink, alibi, cu_q, cu_k, seqused_k, spec: ops.Spec):
    """The views' forward: fa-backward's autograd layer, or (without it) the forward alone, refusing inputs
    that want a gradient."""
    fab = _extras.BACKWARD
    if fab is not None:
        return fab.autograd.Attention.forward(ctx, a, b, c, sink, alibi, cu_q, cu_k, seqused_k, spec)
    cu_k = cu_q if cu_k is None else cu_k
    if getattr(ctx, "is_grad_enabled", False) and any(getattr(t, "requires_grad", False) for t in (a, b, c)):
        _extras.require_backward()
    q, k, v = ops.unpack(a, b, c, spec.pack, spec.varlen)
    return ops.run_forward(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec)


def _view_backward(ctx: Any, dout: Tensor, dlse: Tensor | None):
    return _extras.require_backward().autograd.backward(ctx, dout, dlse)


def _view_paged(**arguments: Any):
    """``FlashAttnVarlenFunc.apply`` with a ``block_table``: the public function (forward only, as flash-attn)."""
    arguments.pop("is_grad_enabled", None)
    arguments["return_attn_probs"] = arguments.pop("return_softmax")
    with torch.no_grad():
        return flash_attn_varlen_func(**arguments)


_VIEWS = function_views(__name__, _view_forward, _view_backward, paged=_view_paged)
FlashAttnFunc = _VIEWS["FlashAttnFunc"]
FlashAttnQKVPackedFunc = _VIEWS["FlashAttnQKVPackedFunc"]
FlashAttnKVPackedFunc = _VIEWS["FlashAttnKVPackedFunc"]
FlashAttnVarlenFunc = _VIEWS["FlashAttnVarlenFunc"]
FlashAttnVarlenQKVPackedFunc = _VIEWS["FlashAttnVarlenQKVPackedFunc"]
FlashAttnVarlenKVPackedFunc = _VIEWS["FlashAttnVarlenKVPackedFunc"]
