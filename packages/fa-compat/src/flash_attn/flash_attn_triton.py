"""flash-attn 2.8.3's ``flash_attn.flash_attn_triton`` (its legacy Triton FlashAttention with an attention bias)
on the Flash Attention Plus kernels.

Same names, parameters, defaults, layouts and masking as flash-attn's module:

* :func:`flash_attn_func` ``(q, k, v, bias=None, causal=False, softmax_scale=None)``, q ``(batch, seqlen_q,
  nheads, headdim)``, k / v ``(batch, seqlen_k, nheads, headdim)``;
  :func:`flash_attn_kvpacked_func` ``(q, kv, ...)`` with kv ``(batch, seqlen_k, 2, nheads, headdim)``;
  :func:`flash_attn_qkvpacked_func` ``(qkv, ...)`` with qkv ``(batch, seqlen, 3, nheads, headdim)``. Each
  returns out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype.
* The autograd Functions :class:`FlashAttnFunc`, :class:`FlashAttnKVPackedFunc`, :class:`FlashAttnQKVPackedFunc`,
  whose ``apply`` takes the same positional arguments.
* ``bias``: 4-D, its last two dims ``(1, seqlen_k)`` (one bias row for every query, e.g. ALiBi for causal
  attention) or ``(seqlen_q, seqlen_k)``, its first two ``1`` or ``batch`` / ``1`` or ``nheads`` (broadcast to
  ``(batch, nheads, seqlen_q, seqlen_k)``); dtype q's or float32. It is added to the scaled logits
  ``softmax_scale * q @ k^T``.
* ``causal``: aligned top-left, as this module of flash-attn does: query ``i`` sees keys ``j <= i`` whatever
  seqlen_q and seqlen_k are (:func:`flash_attn.flash_attn_func` aligns bottom-right instead).
* ``softmax_scale``: flash-attn's ``softmax_scale or 1 / sqrt(headdim)``, so None and 0 both select the default.
* The bias gets no gradient: the backward returns None for it, and raises :class:`BiasGradientError` when the
  bias requires grad, where flash-attn's ``assert not ctx.needs_input_grad[...]`` fails (with the same message).

How it runs: without a bias, on our kernels through flash-attn's 2.8 low-level functions of
:mod:`flash_attn.flash_attn_interface` (``_flash_attn_forward`` / ``_flash_attn_backward``): the top-left causal
mask is the kernels' bottom-right one on the first ``seqlen_q`` keys when ``seqlen_q <= seqlen_k`` (no query
sees a later key; their gradients are zero), and the window ``(-1, seqlen_q - seqlen_k)`` when
``seqlen_q > seqlen_k``. With a bias, through ``torch.nn.functional.scaled_dot_product_attention`` with the
bias (the causal mask folded in) as its float ``attn_mask``; in float32 when a float32 bias meets fp16 / bf16
inputs, so that the bias keeps its precision, else in the inputs' dtype. Its backward recomputes that forward
and differentiates it. Gradients of the kernel path need the ``backward`` extra (fa-backward): without it,
the three functions raise :class:`flash_attn._extras.MissingExtraError` before the forward when a gradient is
wanted (``Function.apply``: its backward raises it).

Differences from flash-attn (supersets and fixes):

* Head dims 1..256 (flash-attn: up to 128); fp32 inputs on CPU through Triton's interpreter (flash-attn: fp16
  and bf16 on CUDA only).
* Bad arguments raise :class:`fa_core.errors.FlashAttnValueError` (a ``ValueError`` and a ``RuntimeError``)
  naming the argument, and ``TypeError`` for a wrong dtype or a non-tensor, where flash-attn's ``assert``
  statements raise ``AssertionError`` (or nothing under ``python -O``); a bias of a wrong shape raises a
  ``RuntimeError`` in both. k and v must have q's number of heads and head dim, as in flash-attn.
* :class:`BiasGradientError` is a ``NotImplementedError`` and an ``AssertionError``, raised under
  ``python -O`` as well.
* The three ``*_func`` names are functions with flash-attn's parameters, so they also take keyword arguments
  (flash-attn binds them to ``Function.apply``, which fails on keywords).
* The backward is deterministic, and a second-order backward raises (``once_differentiable``) instead of
  returning gradients that are silently not differentiable.
* flash-attn's Triton kernels and its private ``_flash_attn_forward`` / ``_flash_attn_backward`` helpers of
  this module (with their padded ``lse`` layout) are not provided.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fa_core import ops
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from flash_attn import _extras
from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

__all__ = [
    "BiasGradientError",
    "FlashAttnFunc",
    "FlashAttnKVPackedFunc",
    "FlashAttnQKVPackedFunc",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
]

Tensor = torch.Tensor
#: ``(q, k, v)`` views of a Function's tensor arguments (identity, kv-packed or qkv-packed)
Split = Callable[..., tuple[Tensor, Tensor, Tensor]]

#: flash-attn's message when the bias requires grad
BIAS_GRADIENT_MESSAGE = "FlashAttention does not support bias gradient yet"


class BiasGradientError(NotImplementedError, AssertionError):
    """The backward was asked for the bias's gradient, which is not computed (flash-attn's assertion).
    Catchable as ``NotImplementedError`` and as ``AssertionError``."""


# ------------------------------------------------------------------------------------------- arguments
def _split_dense(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q, k, v


def _split_kv(q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    V.check_packed("kv", kv, 5, 2, 2)
    return q, kv[:, :, 0], kv[:, :, 1]


def _split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    V.check_packed("qkv", qkv, 5, 2, 3)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _softmax_scale(softmax_scale: float | None, headdim: int) -> float:
    """flash-attn's ``softmax_scale or 1 / sqrt(headdim)``: None and 0 both select the default."""
    scale = float(softmax_scale) if softmax_scale else 1.0 / math.sqrt(headdim)
    V.check_scalars(0.0, 0.0, scale)
    return scale


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q ``(batch, seqlen_q, nheads, d)``, k and v ``(batch, seqlen_k, nheads, d)``, one dtype and device."""
    V.check_qkv(q, k, v, varlen=False, allow_v_headdim=False)
    if k.shape[2] != q.shape[2]:
        raise FlashAttnValueError(
            f"k and v must have as many heads as q ({q.shape[2]}), got k shape {tuple(k.shape)}"
        )


def _check_bias(bias: object, q: Tensor, k: Tensor) -> Tensor:
    """A bias broadcastable to ``(batch, nheads, seqlen_q, seqlen_k)`` in the forms flash-attn takes."""
    bias = V.check_tensor("bias", bias, 4)
    V.check_device("bias", bias, "q", q)
    if bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"bias has dtype {bias.dtype}; it must have q's dtype ({q.dtype}) or float32")
    batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
    seqlen_k = k.shape[1]
    if tuple(bias.shape[2:]) not in ((1, seqlen_k), (seqlen_q, seqlen_k)):
        raise FlashAttnValueError(
            f"Last 2 dimensions of bias must be (1, seqlen_k) or (seqlen_q, seqlen_k), i.e. (1, {seqlen_k}) or "
            f"({seqlen_q}, {seqlen_k}); got bias shape {tuple(bias.shape)}"
        )
    if bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, nheads):
        raise FlashAttnValueError(
            f"bias shape {tuple(bias.shape)} does not broadcast to (batch, nheads, seqlen_q, seqlen_k) = "
            f"({batch}, {nheads}, {seqlen_q}, {seqlen_k})"
        )
    return bias


# ------------------------------------------------------------------------------------ without a bias
def _kernel_mask(causal: bool, seqlen_q: int, seqlen_k: int) -> tuple[bool, int, int]:
    """The top-left causal mask in the kernels' terms: ``(causal, window_right, keys)``, the kernels running
    on the first ``keys`` keys with their bottom-right ``causal`` flag and the window ``(-1, window_right)``.

    ``seqlen_q <= seqlen_k``: no query sees a key past ``seqlen_q - 1``; on the first ``seqlen_q`` keys the
    two alignments coincide. ``seqlen_q > seqlen_k``: bottom-right, key ``j`` is visible from query ``i``
    when ``j <= i + seqlen_k - seqlen_q + window_right``, i.e. ``j <= i``."""
    if not causal:
        return False, -1, seqlen_k
    if seqlen_q <= seqlen_k:
        return True, -1, seqlen_q
    return False, seqlen_q - seqlen_k, seqlen_k


def _kernel_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """``(out (b, sq, h, d), softmax_lse (b, h, sq) fp32)`` of our forward kernel."""
    kernel_causal, right, keys = _kernel_mask(causal, q.shape[1], k.shape[1])
    out, lse, _, _ = _flash_attn_forward(
        q, k[:, :keys], v[:, :keys], 0.0, scale, kernel_causal, -1, right, 0.0, None, False
    )
    if out._base is not None:  # an output of a Function must not be a view (in-place use of it)
        out = out.clone()
    return out, lse


def _kernel_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    causal: bool,
    scale: float,
) -> None:
    """Writes dq, dk, dv (shaped like q, k, v, last dim contiguous) with our backward kernels."""
    kernel_causal, right, keys = _kernel_mask(causal, q.shape[1], k.shape[1])
    if keys < k.shape[1]:  # keys no query sees
        dk[:, keys:].zero_()
        dv[:, keys:].zero_()
    _flash_attn_backward(
        do, q, k[:, :keys], v[:, :keys], out, lse, dq, dk[:, :keys], dv[:, :keys], 0.0, scale, kernel_causal,
        -1, right, 0.0, None, False, None,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- with a bias
def _biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, causal: bool, scale: float) -> Tensor:
    """``softmax(scale * q @ k^T + bias [+ top-left causal mask]) @ v`` through PyTorch's SDPA, as
    ``(batch, nheads, seqlen_q, headdim)``: float32 when the bias is float32 and q is not, else q's dtype."""
    dtype = q.dtype if bias.dtype == q.dtype else torch.float32
    mask = bias.to(dtype)
    if causal:  # SDPA takes no is_causal with a mask: folded in, (B', H', sq, sk) for a bias (B', H', ., sk)
        visible = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        mask = torch.where(visible, mask, float("-inf"))
    qt, kt, vt = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)


def _biased_grads(
    tensors: Sequence[Tensor],
    needs: Sequence[bool],
    split: Split,
    bias: Tensor,
    causal: bool,
    scale: float,
    do: Tensor,
) -> list[Tensor | None]:
    """Gradients of the biased forward with respect to ``tensors`` (None where not needed), recomputed."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(tensors, needs)]
        out = _biased_attention(*split(*leaves), bias.detach(), causal, scale)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, do.transpose(1, 2).to(out.dtype)) if wanted else ())
    return [next(grads) if t.requires_grad else None for t in leaves]


# ------------------------------------------------------------------------------------ the Function body
def _forward(
    ctx: Any,
    tensors: tuple[Tensor, ...],
    split: Split,
    bias: Tensor | None,
    causal: bool,
    softmax_scale: float | None,
) -> Tensor:
    """Checks, runs the forward (kernels, or SDPA with a bias) and saves what the backward needs."""
    q, k, v = (V.contig_last(t) for t in split(*tensors))  # a strided last dim is copied, as flash-attn
    _check_qkv(q, k, v)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    ctx.causal, ctx.softmax_scale, ctx.split = bool(causal), scale, split
    ctx.num_tensors, ctx.has_bias = len(tensors), bias is not None
    if bias is not None:
        bias = _check_bias(bias, q, k)
        out = _biased_attention(q, k, v, bias, ctx.causal, scale)
        o = torch.empty_like(q)
        o.copy_(out.transpose(1, 2))
        ctx.save_for_backward(*tensors, bias)
        return o
    o, lse = _kernel_forward(q, k, v, ctx.causal, scale)
    ctx.save_for_backward(*tensors, o, lse)
    return o


def _backward(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of the Function's tensor arguments, then None for bias, causal and softmax_scale."""
    n = ctx.num_tensors
    if ctx.needs_input_grad[n]:
        raise BiasGradientError(BIAS_GRADIENT_MESSAGE)
    saved = ctx.saved_tensors
    tensors = saved[:n]
    if ctx.has_bias:
        grads = _biased_grads(
            tensors, ctx.needs_input_grad[:n], ctx.split, saved[n], ctx.causal, ctx.softmax_scale, do
        )
        return (*grads, None, None, None)
    out, lse = saved[n], saved[n + 1]
    dtensors = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors)
    q, k, v = ctx.split(*tensors)
    dq, dk, dv = ctx.split(*dtensors)
    _kernel_backward(do, q, k, v, out, lse, dq, dk, dv, ctx.causal, ctx.softmax_scale)
    return (*dtensors, None, None, None)


class FlashAttnQKVPackedFunc(torch.autograd.Function):
    """``apply(qkv, bias=None, causal=False, softmax_scale=None)`` -> out ``(batch, seqlen, nheads, headdim)``;
    the backward writes one ``dqkv``."""

    @staticmethod
    def forward(
        ctx: Any,
        qkv: Tensor,
        bias: Tensor | None = None,
        causal: bool = False,
        softmax_scale: float | None = None,
    ) -> Tensor:
        """qkv: ``(batch, seqlen, 3, nheads, headdim)``.

        bias: optional, broadcastable to ``(batch, nheads, seqlen, seqlen)``, e.g. ALiBi for causal attention
        ``(1, nheads, 1, seqlen)``, for non-causal ``(1, nheads, seqlen, seqlen)``.
        """
        return _forward(ctx, (qkv,), _split_qkv, bias, causal, softmax_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:
        return _backward(ctx, do)


class FlashAttnKVPackedFunc(torch.autograd.Function):
    """``apply(q, kv, bias=None, causal=False, softmax_scale=None)`` -> out ``(batch, seqlen_q, nheads,
    headdim)``; the backward writes one ``dkv``."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        kv: Tensor,
        bias: Tensor | None = None,
        causal: bool = False,
        softmax_scale: float | None = None,
    ) -> Tensor:
        """q: ``(batch, seqlen_q, nheads, headdim)``; kv: ``(batch, seqlen_k, 2, nheads, headdim)``.

        bias: optional, broadcastable to ``(batch, nheads, seqlen_q, seqlen_k)``, e.g. ALiBi for causal
        attention ``(1, nheads, 1, seqlen_k)``, for non-causal ``(1, nheads, seqlen_q, seqlen_k)``.
        """
        return _forward(ctx, (q, kv), _split_kv, bias, causal, softmax_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:
        return _backward(ctx, do)


class FlashAttnFunc(torch.autograd.Function):
    """``apply(q, k, v, bias=None, causal=False, softmax_scale=None)`` -> out ``(batch, seqlen_q, nheads,
    headdim)``."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None = None,
        causal: bool = False,
        softmax_scale: float | None = None,
    ) -> Tensor:
        """q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads, headdim)``.

        bias: optional, broadcastable to ``(batch, nheads, seqlen_q, seqlen_k)``, e.g. ALiBi for causal
        attention ``(1, nheads, 1, seqlen_k)``, for non-causal ``(1, nheads, seqlen_q, seqlen_k)``.
        """
        return _forward(ctx, (q, k, v), _split_dense, bias, causal, softmax_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:
        return _backward(ctx, do)


# ---------------------------------------------------------------------------------------- public API
def _require_backward(bias: Tensor | None, *tensors: Tensor) -> None:
    """The kernel path (no bias) differentiates with fa-backward: refuse, before the forward runs, inputs
    that want a gradient when it is not installed (``Function.apply`` raises in the backward instead)."""
    if bias is None and ops.needs_grad(*tensors):
        _extras.require_backward()


def flash_attn_qkvpacked_func(
    qkv: Tensor, bias: Tensor | None = None, causal: bool = False, softmax_scale: float | None = None
) -> Tensor:
    """Self-attention on packed qkv ``(batch, seqlen, 3, nheads, headdim)`` -> out ``(batch, seqlen, nheads,
    headdim)``; ``bias`` broadcastable to ``(batch, nheads, seqlen, seqlen)`` (see :func:`flash_attn_func`)."""
    _require_backward(bias, qkv)
    return FlashAttnQKVPackedFunc.apply(qkv, bias, causal, softmax_scale)


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    bias: Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> Tensor:
    """q ``(batch, seqlen_q, nheads, headdim)``, packed kv ``(batch, seqlen_k, 2, nheads, headdim)`` -> out
    ``(batch, seqlen_q, nheads, headdim)``; other arguments as :func:`flash_attn_func`."""
    _require_backward(bias, q, kv)
    return FlashAttnKVPackedFunc.apply(q, kv, bias, causal, softmax_scale)


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> Tensor:
    """Attention with an optional additive bias (flash-attn's Triton FlashAttention).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads, headdim)``; fp16 / bf16
            (fp32 too on CPU), headdim 1..256.
        bias: optional, q's dtype or float32, shape ``(batch or 1, nheads or 1, 1 or seqlen_q, seqlen_k)``,
            added to the scaled logits; e.g. ALiBi ``(1, nheads, 1, seqlen_k)`` for causal attention. It gets no
            gradient (a bias that requires grad makes the backward raise :class:`BiasGradientError`).
        causal: top-left aligned causal mask (query ``i`` sees keys ``j <= i``).
        softmax_scale: default (None or 0) ``1 / sqrt(headdim)``.

    Returns:
        out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype.
    """
    _require_backward(bias, q, k, v)
    return FlashAttnFunc.apply(q, k, v, bias, causal, softmax_scale)
