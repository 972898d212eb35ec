"""The one autograd layer of Flash Attention Plus.

:class:`Attention` is the only ``torch.autograd.Function``; every differentiable public function (fa-compat's
``flash_attn_*func``, this package's, :mod:`fa_backward.programmable`) is a view of :func:`attention`, which
checks the arguments once (:func:`fa_core.ops.prepare`) and calls ``Attention.apply``. The custom op
``flash_attn_plus::fwd`` / ``varlen_fwd`` gets its autograd from the same two functions (:func:`save` and
:func:`backward`, registered in :mod:`fa_backward.ops`).

Inputs: ``(a, b, c)`` = ``(q, k, v)``, ``(qkv, None, None)`` or ``(q, kv, None)``; packed inputs are sliced into
views, and their gradient is ONE buffer (``dqkv`` / ``dkv``) whose views the backward kernels write (as
flash-attn does), not three packed-size gradients summed by autograd. The ``softmax_lse`` output is
differentiable (the kernels take ``delta - dlse``), as is a learnable sink: its gradient is the row reduction
``dL/dsink_h = -sum_{b, i} exp(sink_h - lse_{b,h,i}) * softmax_d_{b,h,i}``. ``S_dmask`` and ``rng_state`` are
not differentiable; double backward raises.

In eager mode the forward and the backward launch the kernels directly (no torch.library dispatch); while
``torch.compile`` traces (:func:`fa_core.ops.tracing`), they call the custom ops, which stay opaque.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fa_backward.backward import backward_from_autograd
from fa_core import ops
from fa_core.function_views import function_views
from fa_core.ops import KV, QKV, Spec

__all__ = [
    "Attention",
    "apply",
    "FlashAttnFunc",
    "FlashAttnKVPackedFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "FlashAttnVarlenKVPackedFunc",
    "FlashAttnVarlenQKVPackedFunc",
    "attention",
    "backward",
    "save",
]

Tensor = torch.Tensor


def save(ctx: Any, q, k, v, sink, alibi, cu_q, cu_k, seqused_k, out, lse, rng_state, spec: Spec,
         packed_shape: tuple | None = None, sink_index: int = 3) -> None:  # fmt: skip
    """Stash what :func:`backward` reads (q, k, v may be views of a packed input of ``packed_shape``;
    ``sink_index``: the sink's position among the inputs, for ``ctx.needs_input_grad``)."""
    ctx.save_for_backward(q, k, v, out, lse, rng_state, sink, alibi, cu_q, cu_k, seqused_k)
    ctx.spec = spec
    ctx.packed_shape = packed_shape
    ctx.sink_index = sink_index
    ctx.set_materialize_grads(False)


def _dsink(sink: Tensor, lse: Tensor, softmax_d: Tensor, cu_q: Tensor | None) -> Tensor:
    """``-sum exp(sink - lse) * softmax_d`` over every row of each head; ``lse`` / ``softmax_d`` are
    ``(batch, nheads, seqlen_q)`` or ``(nheads, total_q)``."""
    shape = (1, -1, 1) if lse.dim() == 3 else (-1, 1)
    terms = torch.exp(sink.float().reshape(shape) - lse) * softmax_d
    if cu_q is not None:  # varlen: rows outside every sequence hold no lse
        terms = torch.where(torch.arange(lse.shape[1], device=lse.device) < cu_q[-1], terms, 0.0)
    dims = (0, 2) if lse.dim() == 3 else (1,)
    return -terms.sum(dim=dims).to(sink.dtype)


def _grads(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """``(da, db, dq, dk, dv)``: the gradient buffers and the views the kernels write."""
    spec: Spec = ctx.spec
    if spec.pack == QKV:
        dqkv = q.new_empty(ctx.packed_shape)
        dq, dk, dv = ops.unpack(dqkv, None, None, QKV, spec.varlen)
        return dqkv, None, dq, dk, dv
    if (
        spec.pack == ops.DENSE
        and q.shape == k.shape == v.shape
        and q.dtype == k.dtype == v.dtype
        and (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
        and q.numel() * q.element_size() % 16 == 0  # dk, dv start 16-byte aligned
        and all(ctx.needs_input_grad[:3])  # a kept gradient holds the whole buffer
    ):
        # one allocation for the three (host time per call): contiguous views, as empty_like's would be
        dq, dk, dv = torch.empty((3, *q.shape), dtype=q.dtype, device=q.device).unbind(0)
        return dq, None, dq, dk, dv
    dq = torch.empty_like(q)
    if spec.pack == KV:
        dkv = k.new_empty(ctx.packed_shape)
        _, dk, dv = ops.unpack(dq, dkv, None, KV, spec.varlen)
        return dq, dkv, dq, dk, dv
    return dq, None, dq, torch.empty_like(k), torch.empty_like(v)


def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None, *unused: Any) -> tuple[Tensor | None, ...]:
    """Gradients of ``(a, b, c, sink)`` (then None for the non-tensor arguments) from ``dout`` / ``dlse``
    (None: not used downstream)."""
    q, k, v, out, lse, rng_state, sink, alibi, cu_q, cu_k, seqused_k = ctx.saved_tensors
    spec: Spec = ctx.spec
    dout = torch.zeros_like(out) if dout is None else dout
    da, db, dq, dk, dv = _grads(ctx, q, k, v)
    window = (spec.window_left, spec.window_right)
    if not ops.tracing(dout):
        mods = spec.mods or (None, None, None, None)
        varlen = (cu_q, cu_k, spec.max_seqlen_q, spec.max_seqlen_k) if spec.varlen else None
        softmax_d = backward_from_autograd(
            dout, q, k, v, out, lse, dq, dk, dv, varlen=varlen, dropout_p=spec.dropout_p,
            softmax_scale=spec.softmax_scale, causal=spec.causal, window_size=window, softcap=spec.softcap,
            alibi_slopes=alibi, rng_state=rng_state, seqused_k=seqused_k, attention_chunk=spec.attention_chunk,
            score_mod=mods[0], score_mod_grad=mods[1], mask_mod=mods[2], block_mask=mods[3], dsoftmax_lse=dlse,
        )  # fmt: skip
    elif spec.varlen:
        softmax_d = torch.ops.flash_attn_plus.varlen_bwd(
            dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, spec.max_seqlen_q, spec.max_seqlen_k, spec.dropout_p,
            spec.softmax_scale, spec.causal, spec.window_left, spec.window_right, spec.softcap, alibi,
            spec.deterministic, rng_state, False, seqused_k, spec.attention_chunk, dlse,
        )[:, : q.shape[0]]  # fmt: skip
    else:
        softmax_d = torch.ops.flash_attn_plus.bwd(
            dout, q, k, v, out, lse, dq, dk, dv, spec.dropout_p, spec.softmax_scale, spec.causal,
            spec.window_left, spec.window_right, spec.softcap, alibi, spec.deterministic, rng_state,
            spec.attention_chunk, dlse,
        )[:, :, : q.shape[1]]  # fmt: skip
    dsink = None
    if sink is not None and ctx.needs_input_grad[ctx.sink_index]:
        dsink = _dsink(sink, lse, softmax_d, cu_q if spec.varlen else None)
    if spec.pack == QKV:
        return da, None, None, dsink, None, None, None, None, None
    return (
        da,
        db if spec.pack == KV else dk,
        None if spec.pack == KV else dv,
        dsink,
        None,
        None,
        None,
        None,
        None,
    )


class Attention(torch.autograd.Function):
    """``apply(a, b, c, learnable_sink, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, spec)`` ->
    ``(out, softmax_lse, S_dmask, rng_state)``; ``spec`` from :func:`fa_core.ops.prepare` (checked inputs)."""

    @staticmethod
    def forward(ctx, a, b, c, sink, alibi, cu_q, cu_k, seqused_k, spec: Spec):
        if cu_k is None:
            cu_k = cu_q  # passed once when the two are one tensor (packed qkv)
        if spec.pack == ops.DENSE:
            q, k, v = a, b, c  # fa_core.ops.attention passes them checked (last dim contiguous)
        else:
            q, k, v = ops.unpack(a, b, c, spec.pack, spec.varlen)
            q, k, v = ops.V.contig_last(q), ops.V.contig_last(k), ops.V.contig_last(v)
        out, lse, s_dmask, rng_state = ops.run_forward(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec)
        packed = a if spec.pack == QKV else (b if spec.pack == KV else None)
        save(ctx, q, k, v, sink, alibi, cu_q, cu_k, seqused_k, out, lse, rng_state, spec,
             None if packed is None else tuple(packed.shape))  # fmt: skip
        ctx.mark_non_differentiable(s_dmask, rng_state)
        return out, lse, s_dmask, rng_state

    @staticmethod
    def backward(ctx, dout, dlse, ds, drng):
        # create_graph=True: a second backward must raise, as with once_differentiable
        if torch.is_grad_enabled():
            return _backward_once(ctx, dout, dlse)
        return backward(ctx, dout, dlse)  # the engine's usual call, in no-grad mode: no wrapper (host time)


@once_differentiable
def _backward_once(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    return backward(ctx, dout, dlse)


_C_APPLY = super(torch.autograd.Function, Attention).apply  # the C entry point under Function.apply
_WRAPPED = torch._C._functorch.is_functorch_wrapped_tensor
_compiling = torch.compiler.is_compiling


def apply(a, b, c, sink, alibi, cu_q, cu_k, seqused_k, spec: Spec):
    """``Attention.apply`` without its Python preamble where the preamble has nothing to do (eager, no functorch
    transform active, no functorch-wrapped input tensor that it would unwrap): host time per call. Dynamo
    traces ``Attention.apply`` itself."""
    if (
        _compiling()
        or torch._C._are_functorch_transforms_active()
        or any(t is not None and _WRAPPED(t) for t in (a, b, c, sink, alibi))
    ):
        return Attention.apply(a, b, c, sink, alibi, cu_q, cu_k, seqused_k, spec)
    return _C_APPLY(a, b, c, sink, alibi, cu_q, cu_k, seqused_k, spec)


def attention(
    a: Tensor,
    b: Tensor | None,
    c: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """One differentiable call: ``(out, softmax_lse, S_dmask)`` in flash-attn's layouts. ``kwargs``: those of
    :func:`fa_core.ops.prepare` (``pack``, ``varlen``, ``cu_seqlens_q``, ..., ``mods``)."""
    return ops.attention(a, b, c, autograd=apply, **kwargs)


# ------------------------------------------------------------- flash-attn's FlashAttn*Func names: views
_VIEWS = function_views(__name__, Attention.forward, backward)
FlashAttnFunc = _VIEWS["FlashAttnFunc"]
FlashAttnQKVPackedFunc = _VIEWS["FlashAttnQKVPackedFunc"]
FlashAttnKVPackedFunc = _VIEWS["FlashAttnKVPackedFunc"]
FlashAttnVarlenFunc = _VIEWS["FlashAttnVarlenFunc"]
FlashAttnVarlenQKVPackedFunc = _VIEWS["FlashAttnVarlenQKVPackedFunc"]
FlashAttnVarlenKVPackedFunc = _VIEWS["FlashAttnVarlenKVPackedFunc"]
