"""flash-attn 2.8.3's ``flash_attn.flash_attn_triton_og`` (the 2022 Triton fused-attention tutorial kernel that
flash-attn kept for benchmarking) on the Flash Attention Plus kernels.

* :func:`attention` ``(q, k, v, sm_scale)`` and its autograd Function :class:`_attention` (``_attention.apply``
  takes the same arguments): q, k, v ``(batch, nheads, seqlen, headdim)``, one shape for the three, -> out
  ``(batch, nheads, seqlen, headdim)`` in q's dtype, laid out like ``torch.empty_like(q)``.
* Always causal, as the tutorial kernel: query ``i`` sees keys ``j <= i`` (q and k share one seqlen, so the
  top-left and bottom-right alignments coincide); logits ``sm_scale * q @ k^T``, ``sm_scale`` required.
* Head dims 16, 32, 64 and 128 only, one head dim for q, k and v, as the tutorial kernel accepts.

The forward and backward run our kernels through flash-attn's 2.8 low-level functions of
:mod:`flash_attn.flash_attn_interface` on ``(batch, seqlen, nheads, headdim)`` transposed views (no copies of
the inputs). Gradients need the ``backward`` extra (fa-backward): without it, :func:`attention` raises
:class:`flash_attn._extras.MissingExtraError` before the forward when a gradient is wanted
(``_attention.apply``: its backward raises it).

Differences from flash-attn (supersets and fixes):

* Any seqlen (the tutorial kernel reads and writes out of bounds unless seqlen is a multiple of 128) and any
  strides of q, k, v (it assumes contiguous inputs and addresses k and v with q's strides).
* k and v must have q's shape (checked; the tutorial kernel reads q's seqlen worth of keys unchecked).
* Bad arguments raise :class:`fa_core.errors.FlashAttnValueError` (a ``ValueError`` and a ``RuntimeError``)
  naming the argument, ``TypeError`` for a wrong dtype or an ``sm_scale`` that is not a real number, where the
  tutorial's ``assert`` statements raise ``AssertionError``.
* fp16 and bf16 on GPUs, fp32 too on CPU through Triton's interpreter.
* The backward is deterministic, and a second-order backward raises (``once_differentiable``).
* The tutorial's Triton kernels (``_fwd_kernel``, ``_bwd_preprocess``, ``_bwd_kernel``) are not provided.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fa_core import ops
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from flash_attn import _extras
from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

__all__ = ["_attention", "attention"]

Tensor = torch.Tensor

#: the head dims the tutorial kernel takes
HEAD_DIMS = (16, 32, 64, 128)


def _check(q: object, k: object, v: object, sm_scale: object) -> float:
    """q, k, v ``(batch, nheads, seqlen, headdim)`` of one shape with headdim in :data:`HEAD_DIMS`; returns
    ``sm_scale`` as a float (dtype, device and strides are checked by the forward)."""
    q, k, v = V.check_tensor("q", q, 4), V.check_tensor("k", k, 4), V.check_tensor("v", v, 4)
    lq, lk, lv = q.shape[-1], k.shape[-1], v.shape[-1]
    if not lq == lk == lv:
        raise FlashAttnValueError(f"q, k and v must have one head dim, got {lq}, {lk} and {lv}")
    if lk not in HEAD_DIMS:
        raise FlashAttnValueError(f"head dim must be one of {HEAD_DIMS}, got {lk}")
    if k.shape != q.shape or v.shape != q.shape:
        raise FlashAttnValueError(
            f"q, k and v must have one shape (batch, nheads, seqlen, headdim), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale must be a real number, got {type(sm_scale).__name__}")
    return float(sm_scale)


class _attention(torch.autograd.Function):
    """``apply(q, k, v, sm_scale)``: causal attention on ``(batch, nheads, seqlen, headdim)`` tensors."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> Tensor:
        """q, k, v: ``(batch, nheads, seqlen, headdim)``; sm_scale: the logits' scale. -> out, q's shape."""
        scale = _check(q, k, v, sm_scale)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (batch, seqlen, nheads, headdim) views
        out, lse, _, _ = _flash_attn_forward(qt, kt, vt, 0.0, scale, True, -1, -1, 0.0, None, False)
        o = torch.empty_like(q)
        o.copy_(out.transpose(1, 2))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sm_scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        _flash_attn_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out, lse,
            dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), 0.0, ctx.sm_scale, True, -1, -1, 0.0,
            None, False, None,
        )  # fmt: skip
        return dq, dk, dv, None


def attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> Tensor:
    """Causal attention (the Triton tutorial's fused attention).

    Args:
        q, k, v: ``(batch, nheads, seqlen, headdim)``, one shape, headdim 16, 32, 64 or 128; fp16 / bf16 (fp32
            too on CPU).
        sm_scale: scale of the logits ``q @ k^T`` (e.g. ``headdim ** -0.5``).

    Returns:
        out ``(batch, nheads, seqlen, headdim)`` in q's dtype; query ``i`` attends to keys ``j <= i``.
    """
    if ops.needs_grad(q, k, v):  # refused before the forward runs (``_attention.apply``: in the backward)
        _extras.require_backward()
    return _attention.apply(q, k, v, sm_scale)
