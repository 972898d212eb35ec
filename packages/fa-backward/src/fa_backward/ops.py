"""The backward custom ops (namespace ``flash_attn_plus``) and the autograd of the forward ops.

* ``bwd`` / ``varlen_bwd``: flash-attn's ``_flash_attn_backward`` / ``_flash_attn_varlen_backward`` semantics,
  writing dq/dk/dv in place (``mutates_args``) and returning flash-attn's padded ``softmax_d``; two trailing
  extras: ``attention_chunk`` and ``dsoftmax_lse`` (the gradient of a differentiated lse). The autograd layer
  (:mod:`fa_backward.autograd`) calls them while ``torch.compile`` traces; eager backwards launch directly.
* ``fwd`` / ``varlen_fwd`` (registered by :mod:`fa_core.ops`) get their autograd here, from the layer's own
  :func:`fa_backward.autograd.save` and :func:`fa_backward.autograd.backward`: one backward for every path.

This module does not use ``from __future__ import annotations``: ``custom_op`` infers the schema from the
evaluated annotations.
"""

import torch

from fa_backward import autograd
from fa_backward.backward import flash_attn_backward, flash_attn_varlen_backward
from fa_core import ops as core_ops

NS = core_ops.NS
Tensor = torch.Tensor


def _softmax_d_shape(q: Tensor) -> tuple[int, int, int]:
    """flash-attn's dense ``softmax_d`` shape: ``(b, h, round128(sq))``."""
    b, sq, h = q.shape[:3]
    return (b, h, core_ops.round_multiple(sq, 128))


def _varlen_softmax_d_shape(q: Tensor, cu_seqlens_q: Tensor) -> tuple[int, int]:
    """flash-attn's varlen ``softmax_d`` shape: ``(h, total_q + 128 * b)``."""
    return (q.shape[1], q.shape[0] + 128 * (cu_seqlens_q.shape[0] - 1))


def bwd_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    rng_state: Tensor | None,
    attention_chunk: int = 0,
    dsoftmax_lse: Tensor | None = None,
) -> Tensor:
    """flash-attn's ``_flash_attn_backward``: writes dq/dk/dv, returns softmax_d ``(b, h, round128(sq))`` fp32."""
    res = flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size_left,
        window_size_right, softcap, alibi_slopes, deterministic, rng_state, attention_chunk=attention_chunk,
        dsoftmax_lse=dsoftmax_lse,
    )  # fmt: skip
    softmax_d = softmax_lse.new_zeros(_softmax_d_shape(q))
    softmax_d[:, :, : q.shape[1]] = res.softmax_d
    return softmax_d


bwd = torch.library.custom_op(f"{NS}::bwd", bwd_impl, mutates_args=("dq", "dk", "dv"))


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, *args, **kwargs):
    return softmax_lse.new_empty(_softmax_d_shape(q))


def varlen_bwd_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    rng_state: Tensor | None,
    zero_tensors: bool,
    seqused_k: Tensor | None,
    attention_chunk: int = 0,
    dsoftmax_lse: Tensor | None = None,
) -> Tensor:
    """flash-attn's ``_flash_attn_varlen_backward``: returns softmax_d ``(h, total_q + 128 * b)`` fp32."""
    res = flash_attn_varlen_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
        deterministic, rng_state, zero_tensors, seqused_k, attention_chunk=attention_chunk,
        dsoftmax_lse=dsoftmax_lse,
    )  # fmt: skip
    softmax_d = softmax_lse.new_zeros(_varlen_softmax_d_shape(q, cu_seqlens_q))
    softmax_d[:, : q.shape[0]] = res.softmax_d
    return softmax_d


varlen_bwd = torch.library.custom_op(f"{NS}::varlen_bwd", varlen_bwd_impl, mutates_args=("dq", "dk", "dv"))


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, *args, **kwargs):
    return softmax_lse.new_empty(_varlen_softmax_d_shape(q, cu_seqlens_q))


# ------------------------------------------------------------------------ autograd of the forward ops
def _fwd_setup_context(ctx, inputs, output) -> None:
    (q, k, v, dropout_p, scale, causal, left, right, softcap, alibi, want, deterministic, *extra) = inputs
    chunk, sink = (list(extra) + [0, None])[:2]
    out, lse, _, rng_state = output
    spec = core_ops.Spec(False, core_ops.DENSE, 0, 0, dropout_p, scale, causal, left, right, softcap, want,
                         chunk, deterministic, None)  # fmt: skip
    autograd.save(ctx, q, k, v, sink, alibi, None, None, None, out, lse, rng_state, spec, sink_index=13)


def _varlen_setup_context(ctx, inputs, output) -> None:
    (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, left, right, softcap, alibi, want, seqused_k,
     deterministic, *extra) = inputs  # fmt: skip
    chunk, sink = (list(extra) + [0, None])[:2]
    out, lse, _, rng_state = output
    spec = core_ops.Spec(True, core_ops.DENSE, max_q, max_k, dropout_p, scale, causal, left, right, softcap,
                         want, chunk, deterministic, None)  # fmt: skip
    autograd.save(ctx, q, k, v, sink, alibi, cu_q, cu_k, seqused_k, out, lse, rng_state, spec, sink_index=18)


def _fwd_backward(ctx, dout, dlse, ds, drng):
    dq, dk, dv, dsink = autograd.backward(ctx, dout, dlse)[:4]
    return (dq, dk, dv) + (None,) * 10 + (dsink,)


def _varlen_backward(ctx, dout, dlse, ds, drng):
    dq, dk, dv, dsink = autograd.backward(ctx, dout, dlse)[:4]
    return (dq, dk, dv) + (None,) * 15 + (dsink, None)


torch.library.register_autograd(f"{NS}::fwd", _fwd_backward, setup_context=_fwd_setup_context)
torch.library.register_autograd(f"{NS}::varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context)
