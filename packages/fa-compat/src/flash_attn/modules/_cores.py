"""The attention cores of :mod:`flash_attn.modules.mha` (re-exported there, where flash-attn defines them).

* :class:`FlashSelfAttention` / :class:`FlashCrossAttention`: attention on packed projections
  (``qkv (B, S, 3, H, D)`` / ``q (B, Sq, H, D)`` with ``kv (B, Sk, 2, H_k, D)``, or the varlen forms with
  ``cu_seqlens``), running :mod:`flash_attn.flash_attn_interface`'s kernels.
* :class:`SelfAttention` / :class:`CrossAttention`: the same computation in plain PyTorch (einsum + softmax),
  with a boolean ``key_padding_mask`` instead of varlen.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from flash_attn.flash_attn_interface import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

__all__ = [
    "CrossAttention",
    "FlashCrossAttention",
    "FlashSelfAttention",
    "LinearResidual",
    "SelfAttention",
    "get_alibi_slopes",
]

#: additive score of a masked position in the PyTorch cores (flash-attn's value; not -inf, so a row whose
#: keys are all masked still has a defined softmax)
_MASKED = -10000.0


def get_alibi_slopes(nheads: int) -> list[float]:
    """ALiBi slopes (Press et al., https://arxiv.org/abs/2108.12409) of ``nheads`` heads.

    For a power of two ``n`` the geometric sequence ``2 ** (-8 * (i + 1) / n)``, i = 0..n-1; otherwise the
    slopes of the largest power of two ``p < n`` followed by every other slope of ``2 * p`` heads.
    """
    exponent = math.log2(nheads)
    if exponent.is_integer():
        start = 2.0 ** (-8.0 / nheads)
        return [start ** (i + 1) for i in range(nheads)]
    lower = 2 ** math.floor(exponent)
    return get_alibi_slopes(lower) + get_alibi_slopes(2 * lower)[0::2][: nheads - lower]


def _fp32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _init_flash_core(
    core: Any,
    causal: bool,
    softmax_scale: float | None,
    attention_dropout: float,
    window_size: tuple[int, int],
    alibi_slopes: Tensor | None,
    deterministic: bool,
) -> None:
    """Set a flash core's ``causal``, ``softmax_scale``, ``drop`` (``nn.Dropout(attention_dropout)``), the
    non-persistent buffer ``alibi_slopes``, ``window_size`` and ``deterministic``."""
    core.causal = causal
    core.softmax_scale = softmax_scale
    core.drop = nn.Dropout(attention_dropout)
    core.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
    core.window_size = window_size
    core.deterministic = deterministic


def _flash_options(core: Any, causal: bool | None) -> tuple[float, dict[str, Any]]:
    """``(dropout_p, options)`` of a flash core's kernel call: the dropout probability in training mode (else
    0), and ``softmax_scale``, ``causal`` (``self.causal`` when None), ``alibi_slopes`` (float32),
    ``window_size`` and ``deterministic``."""
    options = dict(
        softmax_scale=core.softmax_scale,
        causal=core.causal if causal is None else causal,
        alibi_slopes=_fp32(core.alibi_slopes),
        window_size=core.window_size,
        deterministic=core.deterministic,
    )
    return (core.drop.p if core.training else 0.0), options


class FlashSelfAttention(nn.Module):
    """Scaled dot-product self-attention with softmax on packed ``qkv``, by the flash kernels.

    Arguments:
        causal: bottom-right aligned causal mask (default of ``forward``'s ``causal``).
        softmax_scale: the temperature; default ``1 / sqrt(D)``.
        attention_dropout: dropout on the attention probabilities, applied in training mode only.
        window_size: ``(left, right)`` sliding window, -1 = unbounded.
        alibi_slopes: ``(H,)`` or ``(B, H)`` ALiBi slopes (a non-persistent buffer; used in float32).
        deterministic: passed to the kernels (our backward is always deterministic).
    """

    alibi_slopes: Tensor | None

    def __init__(
        self,
        causal: bool = False,
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        window_size: tuple[int, int] = (-1, -1),
        alibi_slopes: Tensor | None = None,
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        _init_flash_core(
            self, causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic
        )

    def forward(
        self,
        qkv: Tensor,
        causal: bool | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        """
        Arguments:
            qkv: ``(B, S, 3, H, D)``, or ``(total, 3, H, D)`` when ``cu_seqlens`` is given (total = sum of
                the sequence lengths).
            causal: overrides ``self.causal`` when not None.
            cu_seqlens: int32 ``(B + 1,)`` cumulative sequence lengths indexing into qkv (varlen form).
            max_seqlen: the longest sequence; required with ``cu_seqlens``.
        Return:
            out: ``(B, S, H, D)``, or ``(total, H, D)`` in the varlen form.
        """
        dropout_p, opts = _flash_options(self, causal)
        if cu_seqlens is None:
            return flash_attn_qkvpacked_func(qkv, dropout_p, **opts)
        if max_seqlen is None:
            raise ValueError("FlashSelfAttention: max_seqlen is required with cu_seqlens")
        return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p, **opts)


class FlashCrossAttention(nn.Module):
    """Scaled dot-product attention of ``q`` over packed ``kv`` (cross-attention, or GQA / MQA), by the flash
    kernels.

    Arguments:
        causal: bottom-right aligned causal mask (default of ``forward``'s ``causal``).
        softmax_scale: the temperature; default ``1 / sqrt(D)``.
        attention_dropout: dropout on the attention probabilities, applied in training mode only.
        alibi_slopes: ``(H,)`` or ``(B, H)`` ALiBi slopes (a non-persistent buffer; used in float32).
        window_size: ``(left, right)`` sliding window, -1 = unbounded.
        deterministic: passed to the kernels (our backward is always deterministic).
    """

    alibi_slopes: Tensor | None

    def __init__(
        self,
        causal: bool = False,
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        alibi_slopes: Tensor | None = None,
        window_size: tuple[int, int] = (-1, -1),
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        _init_flash_core(
            self, causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic
        )

    def forward(
        self,
        q: Tensor,
        kv: Tensor,
        causal: bool | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen_k: int | None = None,
    ) -> Tensor:
        """
        Arguments:
            q: ``(B, Sq, H, D)``, or ``(total_q, H, D)`` with ``cu_seqlens``.
            kv: ``(B, Sk, 2, H_k, D)``, or ``(total_k, 2, H_k, D)`` with ``cu_seqlens``; H a multiple of H_k.
            causal: overrides ``self.causal`` when not None.
            cu_seqlens, max_seqlen: int32 ``(B + 1,)`` cumulative lengths of the queries and the longest one.
            cu_seqlens_k, max_seqlen_k: the same for the keys; default ``cu_seqlens`` / ``max_seqlen``.
        Return:
            out: ``(B, Sq, H, D)``, or ``(total_q, H, D)`` in the varlen form.
        """
        dropout_p, opts = _flash_options(self, causal)
        if cu_seqlens is None:
            if kv.shape[0] != q.shape[0] or kv.shape[-1] != q.shape[-1]:
                raise ValueError(
                    f"FlashCrossAttention: q {tuple(q.shape)} and kv {tuple(kv.shape)} must share batch size "
                    "and head dim"
                )
            return flash_attn_kvpacked_func(q, kv, dropout_p, **opts)
        if max_seqlen is None:
            raise ValueError("FlashCrossAttention: max_seqlen is required with cu_seqlens")
        cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
        return flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_k, max_seqlen, max_k, dropout_p, **opts)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float | None,
    drop: nn.Module,
    replace: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v`` of ``(B, S, H, D)`` tensors -> ``(B, Sq, H, D)``.

    ``bias`` is added to the scores; where the bool ``replace`` is True the score becomes -10000 instead.
    The softmax runs in ``v``'s dtype, then ``drop`` (dropout) is applied to the probabilities.
    """
    softmax_scale = scale or 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bthd,bshd->bhts", q, k * softmax_scale)
    if bias is not None:
        scores = scores + bias
    if replace is not None:
        scores = scores.masked_fill(replace, _MASKED)
    probs = drop(torch.softmax(scores, dim=-1, dtype=v.dtype))
    return torch.einsum("bhts,bshd->bthd", probs, v)


def _padding_bias(key_padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, Sk)`` bool (True = keep) -> additive ``(B, 1, 1, Sk)`` bias: 0 kept, -10000 masked."""
    bias = torch.full(key_padding_mask.shape, _MASKED, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill(key_padding_mask.bool(), 0.0)[:, None, None, :]


class SelfAttention(nn.Module):
    """Scaled dot-product self-attention with softmax on packed ``qkv``, in plain PyTorch.

    Arguments:
        causal: causal mask (default of ``forward``'s ``causal``).
        softmax_scale: the temperature; default ``1 / sqrt(D)``.
        attention_dropout: dropout on the attention probabilities (``nn.Dropout``, training mode only).
    """

    def __init__(
        self, causal: bool = False, softmax_scale: float | None = None, attention_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)

    def forward(
        self, qkv: Tensor, causal: bool | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """
        Arguments:
            qkv: ``(B, S, 3, H, D)``.
            causal: overrides ``self.causal`` when not None.
            key_padding_mask: ``(B, S)`` bool, True = keep, False = mask out (added as -10000 to the scores).
        Return:
            out: ``(B, S, H, D)``; rows of padded queries are computed like the others (not zeroed).
        """
        seqlen = qkv.shape[1]
        causal = self.causal if causal is None else causal
        q, k, v = qkv.unbind(dim=2)
        bias: Tensor | None = None
        if key_padding_mask is not None:
            bias = _padding_bias(key_padding_mask, q.dtype)
        if causal:
            # built in float32 (triu has no bf16 kernel on every device), added to the scores
            causal_bias = torch.triu(torch.full((seqlen, seqlen), _MASKED, device=qkv.device), 1).to(q.dtype)
            bias = causal_bias if bias is None else bias + causal_bias
        return _attend(q, k, v, bias, self.softmax_scale, self.drop)


class CrossAttention(nn.Module):
    """Scaled dot-product attention of ``q`` over packed ``kv`` (cross-attention, GQA / MQA), in plain PyTorch.

    Arguments:
        causal: bottom-right aligned causal mask (default of ``forward``'s ``causal``).
        softmax_scale: the temperature; default ``1 / sqrt(D)``.
        attention_dropout: dropout on the attention probabilities (``nn.Dropout``, training mode only).
    """

    def __init__(
        self, causal: bool = False, softmax_scale: float | None = None, attention_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)

    def forward(
        self, q: Tensor, kv: Tensor, causal: bool | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """
        Arguments:
            q: ``(B, Sq, H, D)``.
            kv: ``(B, Sk, 2, H_k, D)``, H a multiple of H_k (each kv head serves ``H / H_k`` consecutive
                query heads).
            causal: overrides ``self.causal`` when not None. Query i sees key j when
                ``j <= i + Sk' - Sq``, Sk' = the number of kept keys of its row (right padding) or Sk.
            key_padding_mask: ``(B, Sk)`` bool, True = keep, False = mask out (added as -10000 to the scores).
        Return:
            out: ``(B, Sq, H, D)``.
        """
        batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
        seqlen_k = kv.shape[1]
        if kv.shape[0] != batch or kv.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"CrossAttention: q {tuple(q.shape)} and kv {tuple(kv.shape)} must share batch size and head dim"
            )
        causal = self.causal if causal is None else causal
        if kv.shape[3] != nheads:
            kv = kv.repeat_interleave(nheads // kv.shape[3], dim=3)
        k, v = kv.unbind(dim=2)
        bias: Tensor | None = None
        if key_padding_mask is not None:
            bias = _padding_bias(key_padding_mask, q.dtype)
        # the causal mask replaces the score (masked_fill), the padding mask is added (as in flash-attn)
        future: Tensor | None = None
        if causal:
            rows = torch.arange(seqlen_q, device=q.device)[:, None]
            cols = torch.arange(seqlen_k, device=q.device)
            kept: Tensor | int = (
                seqlen_k if key_padding_mask is None else key_padding_mask.sum(-1)[:, None, None, None]
            )
            future = cols > rows + kept - seqlen_q
        return _attend(q, k, v, bias, self.softmax_scale, self.drop, replace=future)


class LinearResidual(nn.Linear):
    """``nn.Linear`` whose forward returns ``(linear(x), x)``: the output and the residual."""

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return super().forward(input), input
