"""Rotary embedding layers with the API of ``flash_attn.layers.rotary`` (flash-attn 2.8.x).

All rotations run through ``fa_core.rotary.apply_rotary``: the Triton kernel behind two ``torch.library``
custom ops (out of place with a registered gradient, and in place), so ``torch.compile`` never traces into a
Triton launch and every function and argument form compiles with ``fullgraph=True`` (forward and backward,
static or dynamic shapes).

* Out of place (``apply_rotary_emb(inplace=False)``): the differentiable op, no ``autograd.Function``.
* In place without a recorded gradient (inference, ``torch.no_grad``): the in-place op, no
  ``autograd.Function``.
* In place with a recorded gradient: the ``ApplyRotaryEmb*`` Functions, as in flash-attn: the forward rotates
  in place and returns the input, the backward rotates the incoming gradient by the conjugate angle (out of
  place: it may be the caller's tensor or an expanded view).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from fa_core.errors import FlashAttnValueError
from fa_core.rotary import apply_rotary

__all__ = [
    "rotate_half",
    "apply_rotary_emb_torch",
    "ApplyRotaryEmb",
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "ApplyRotaryEmbQKV_",
    "apply_rotary_emb_qkv_",
    "ApplyRotaryEmbKV_",
    "apply_rotary_emb_kv_",
    "RotaryEmbedding",
]


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """(..., d) -> (..., d): [-x2, x1] of the two halves, or of the (even, odd) pairs if interleaved."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_emb_torch(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Pure-PyTorch rotary embedding.

    x: (batch_size, seqlen, nheads, headdim)
    cos, sin: (seqlen, rotary_dim / 2) or (batch_size, seqlen, rotary_dim / 2)
    """
    ro_dim = cos.shape[-1] * 2
    assert ro_dim <= x.shape[-1]
    # (..., d) -> (..., 1, 2d): repeat each half ("(2 d)") or each entry ("(d 2)"), add a head axis.
    if interleaved:
        cos = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
        sin = sin.repeat_interleave(2, dim=-1).unsqueeze(-2)
    else:
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(-2)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(-2)
    return torch.cat(
        [x[..., :ro_dim] * cos + rotate_half(x[..., :ro_dim], interleaved) * sin, x[..., ro_dim:]],
        dim=-1,
    )


def _records_grad(x: object) -> bool:
    """Whether autograd records an operation on ``x`` now (then the in-place forms go through their
    ``autograd.Function``: like flash-attn's, it rotates in place and returns an alias of the input carrying the
    rotation's gradient, so a leaf that requires grad is accepted too)."""
    return isinstance(x, Tensor) and torch.is_grad_enabled() and x.requires_grad


class ApplyRotaryEmb(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        interleaved: bool = False,
        inplace: bool = False,
        seqlen_offsets: int | Tensor = 0,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        out = apply_rotary(
            x,
            cos,
            sin,
            seqlen_offsets=seqlen_offsets,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            interleaved=interleaved,
            inplace=inplace,
        )
        if not isinstance(seqlen_offsets, Tensor):
            ctx.save_for_backward(cos, sin, cu_seqlens)  # an int can't go through save_for_backward
            ctx.seqlen_offsets = seqlen_offsets
        else:
            ctx.save_for_backward(cos, sin, cu_seqlens, seqlen_offsets)
            ctx.seqlen_offsets = None
        ctx.interleaved = interleaved
        ctx.inplace = inplace
        ctx.max_seqlen = max_seqlen
        return out if not inplace else x

    @staticmethod
    def backward(ctx, do: Tensor):
        if ctx.seqlen_offsets is None:
            cos, sin, cu_seqlens, seqlen_offsets = ctx.saved_tensors
        else:
            cos, sin, cu_seqlens = ctx.saved_tensors
            seqlen_offsets = ctx.seqlen_offsets
        # Out of place: the incoming grad may be caller-owned (``out.backward(g)``) or expanded
        # (stride 0), so writing into it would corrupt the caller's tensor. Upstream rotates it in place.
        dx = apply_rotary(
            do,
            cos,
            sin,
            seqlen_offsets=seqlen_offsets,
            cu_seqlens=cu_seqlens,
            max_seqlen=ctx.max_seqlen,
            interleaved=ctx.interleaved,
            conjugate=True,
        )
        return dx, None, None, None, None, None, None, None


def apply_rotary_emb(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """
    Arguments:
        x: (batch_size, seqlen, nheads, headdim) if cu_seqlens is None
            else (total_seqlen, nheads, headdim)
        cos, sin: (seqlen_rotary, rotary_dim / 2)
        interleaved: if True, rotate pairs of even and odd dimensions (GPT-J style) instead
            of 1st half and 2nd half (GPT-NeoX style).
        inplace: if True, apply rotary embedding in-place.
        seqlen_offsets: (batch_size,) or int. Each sequence in x is shifted by this amount.
        cu_seqlens: (batch + 1,) or None
        max_seqlen: int
    Return:
        out: (batch_size, seqlen, nheads, headdim) if cu_seqlens is None
            else (total_seqlen, nheads, headdim)
    rotary_dim must be <= headdim. Rotary embedding is applied to the first rotary_dim of x.
    Differentiable with respect to x; the gradient is the conjugate rotation of the output gradient.
    """
    if inplace and _records_grad(x):
        return ApplyRotaryEmb.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)
    return apply_rotary(
        x,
        cos,
        sin,
        seqlen_offsets=seqlen_offsets,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        interleaved=interleaved,
        inplace=inplace,
    )


# Backward-compatible alias (present in flash-attn 2.8).
apply_rotary_emb_func = apply_rotary_emb


def _apply_rotary_emb_qkv(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Tensor | None = None,
    sin_k: Tensor | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
    seqlen_offsets: int | Tensor = 0,
    num_heads_q: int | None = None,
) -> Tensor:
    """Rotate Q and K of a packed qkv.

    qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, num_heads_q + 2 * num_heads_k, headdim)
        with ``num_heads_q`` given (MQA / GQA).
    """
    rotate = partial(
        apply_rotary,
        interleaved=interleaved,
        inplace=inplace,
        conjugate=conjugate,
        seqlen_offsets=seqlen_offsets,
    )
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() == 5:
        batch, seqlen, three, nheads, headdim = qkv.shape
        if three != 3:
            raise FlashAttnValueError(
                f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}"
            )
        num_heads_q = num_heads_k = nheads
    else:
        if qkv.dim() != 4:
            raise FlashAttnValueError(
                "qkv must have shape (batch, seqlen, 3, nheads, headdim) or "
                f"(batch, seqlen, num_heads_q + 2 * num_heads_k, headdim), got {tuple(qkv.shape)}"
            )
        if num_heads_q is None:
            raise FlashAttnValueError("num_heads_q must be given for a (b, s, h_q + 2 * h_k, d) qkv")
        num_heads_k = (qkv.shape[2] - num_heads_q) // 2
        if num_heads_q <= 0 or num_heads_k <= 0 or qkv.shape[2] != num_heads_q + 2 * num_heads_k:
            raise FlashAttnValueError(
                f"qkv's head axis ({qkv.shape[2]}) must be num_heads_q ({num_heads_q}) + 2 * num_heads_k"
            )
    if cos_k is None and sin_k is None and qkv.is_contiguous():
        # One launch for Q and K together: for a contiguous qkv, (q, k) heads merge into one head axis.
        if qkv.dim() == 5:
            qk = rotate(qkv[:, :, :2].reshape(batch, seqlen, -1, headdim), cos, sin)
            if not inplace:
                qkv = torch.cat([qk.reshape(batch, seqlen, 2, nheads, headdim), qkv[:, :, 2:]], dim=2)
        else:
            qk = rotate(qkv[:, :, : num_heads_q + num_heads_k], cos, sin)
            if not inplace:
                qkv = torch.cat([qk, qkv[:, :, num_heads_q + num_heads_k :]], dim=2)
        return qkv
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    if qkv.dim() == 5:
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + num_heads_k]
    q = rotate(q, cos, sin)
    k = rotate(k, cos_k, sin_k)
    if not inplace:
        if qkv.dim() == 5:
            qkv = torch.stack([q, k, qkv[:, :, 2]], dim=2)
        else:
            qkv = torch.cat([q, k, qkv[:, :, num_heads_q + num_heads_k :]], dim=2)
    return qkv


class ApplyRotaryEmbQKV_(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        qkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        cos_k: Tensor | None = None,
        sin_k: Tensor | None = None,
        interleaved: bool = False,
        seqlen_offsets: int | Tensor = 0,
        num_heads_q: int | None = None,
    ) -> Tensor:
        qkv = _apply_rotary_emb_qkv(
            qkv,
            cos,
            sin,
            cos_k,
            sin_k,
            interleaved=interleaved,
            inplace=True,
            seqlen_offsets=seqlen_offsets,
            num_heads_q=num_heads_q,
        )
        if not isinstance(seqlen_offsets, Tensor):
            ctx.save_for_backward(cos, sin, cos_k, sin_k)
            ctx.seqlen_offsets = seqlen_offsets
        else:
            ctx.save_for_backward(cos, sin, cos_k, sin_k, seqlen_offsets)
            ctx.seqlen_offsets = None
        ctx.interleaved = interleaved
        ctx.num_heads_q = num_heads_q
        return qkv

    @staticmethod
    def backward(ctx, dqkv: Tensor):
        if ctx.seqlen_offsets is None:
            cos, sin, cos_k, sin_k, seqlen_offsets = ctx.saved_tensors
        else:
            cos, sin, cos_k, sin_k = ctx.saved_tensors
            seqlen_offsets = ctx.seqlen_offsets
        # Out of place: the incoming grad may be caller-owned or expanded (stride 0), and a functional backward
        # keeps inductor's graph free of mutations of the tangents
        dqkv = _apply_rotary_emb_qkv(
            dqkv.contiguous(),
            cos,
            sin,
            cos_k,
            sin_k,
            interleaved=ctx.interleaved,
            inplace=False,
            seqlen_offsets=seqlen_offsets,
            num_heads_q=ctx.num_heads_q,
            conjugate=True,
        )
        return dqkv, None, None, None, None, None, None, None


def apply_rotary_emb_qkv_(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Tensor | None = None,
    sin_k: Tensor | None = None,
    interleaved: bool = False,
    seqlen_offsets: int | Tensor = 0,
    num_heads_q: int | None = None,
) -> Tensor:
    """
    Arguments:
        qkv: (batch_size, seqlen, 3, nheads, headdim) or
            (batch_size, seqlen, num_heads_q + 2 * num_heads_k, headdim) with num_heads_q given (MQA / GQA).
        cos, sin: (seqlen, rotary_dim / 2)
        cos_k, sin_k: (seqlen, rotary_dim / 2), optional, used for K instead of cos / sin (XPos).
        interleaved: if True, rotate pairs of even and odd dimensions (GPT-J style) instead of
            1st half and 2nd half (GPT-NeoX style).
        seqlen_offsets: (batch_size,) or int. Each sequence in Q and K is shifted by this amount.
    Return:
        qkv: same shape as the input, rotated *in place* (first rotary_dim of Q and K).
    Differentiable with respect to qkv (the gradient of Q and K is the conjugate rotation, V's passes through).
    """
    if _records_grad(qkv):
        return ApplyRotaryEmbQKV_.apply(qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q)
    return _apply_rotary_emb_qkv(
        qkv,
        cos,
        sin,
        cos_k,
        sin_k,
        interleaved=interleaved,
        inplace=True,
        seqlen_offsets=seqlen_offsets,
        num_heads_q=num_heads_q,
    )


def _check_kv(kv: Tensor) -> None:
    if not isinstance(kv, Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise FlashAttnValueError(
            f"kv must have shape (batch, seqlen, 2, nheads, headdim), got {tuple(kv.shape)}"
        )


class ApplyRotaryEmbKV_(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        kv: Tensor,
        cos: Tensor,
        sin: Tensor,
        interleaved: bool = False,
        seqlen_offsets: int | Tensor = 0,
    ) -> Tensor:
        _check_kv(kv)
        apply_rotary(
            kv[:, :, 0], cos, sin, seqlen_offsets=seqlen_offsets, interleaved=interleaved, inplace=True
        )
        if not isinstance(seqlen_offsets, Tensor):
            ctx.save_for_backward(cos, sin)
            ctx.seqlen_offsets = seqlen_offsets
        else:
            ctx.save_for_backward(cos, sin, seqlen_offsets)
            ctx.seqlen_offsets = None
        ctx.interleaved = interleaved
        return kv

    @staticmethod
    def backward(ctx, dkv: Tensor):
        if ctx.seqlen_offsets is None:
            cos, sin, seqlen_offsets = ctx.saved_tensors
        else:
            cos, sin = ctx.saved_tensors
            seqlen_offsets = ctx.seqlen_offsets
        # out of place (never write into the caller's grad; no mutation in a compiled backward)
        dkv = dkv.contiguous()
        dk = apply_rotary(
            dkv[:, :, 0],
            cos,
            sin,
            seqlen_offsets=seqlen_offsets,
            interleaved=ctx.interleaved,
            inplace=False,
            conjugate=True,
        )
        return torch.stack([dk, dkv[:, :, 1]], dim=2), None, None, None, None


def apply_rotary_emb_kv_(
    kv: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    seqlen_offsets: int | Tensor = 0,
) -> Tensor:
    """
    Arguments:
        kv: (batch_size, seqlen, 2, nheads, headdim)
        cos, sin: (seqlen, rotary_dim / 2)
        interleaved: if True, rotate pairs of even and odd dimensions (GPT-J style) instead of
            1st half and 2nd half (GPT-NeoX style).
        seqlen_offsets: (batch_size,) or int. Each sequence is shifted by this amount.
    Return:
        kv: (batch_size, seqlen, 2, nheads, headdim); K is rotated *in place*, V untouched.
    Differentiable with respect to kv.
    """
    if _records_grad(kv):
        return ApplyRotaryEmbKV_.apply(kv, cos, sin, interleaved, seqlen_offsets)
    _check_kv(kv)
    apply_rotary(kv[:, :, 0], cos, sin, seqlen_offsets=seqlen_offsets, interleaved=interleaved, inplace=True)
    return kv


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embeddings (RoFormer, Su et al., https://arxiv.org/abs/2104.09864).

    If ``scale_base`` is not None this implements XPos (Sun et al., https://arxiv.org/abs/2212.10554):
    Q is rotated with cos/sin multiplied by ``scale ** power`` and K with cos/sin divided by it.
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        scale_base: float | None = None,
        device: torch.device | str | None = None,
    ):
        """
        dim: rotary dimension (number of rotated channels per head).
        interleaved: if True, rotate pairs of even and odd dimensions (GPT-J style) instead
            of 1st half and 2nd half (GPT-NeoX style).
        """
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        self.interleaved = interleaved
        self.scale_base = scale_base
        scale = (
            (torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
            if scale_base is not None
            else None
        )
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Tensor | None = None
        self._sin_cached: Tensor | None = None
        self._cos_k_cached: Tensor | None = None
        self._sin_k_cached: Tensor | None = None

    def _compute_inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        return 1.0 / (
            self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim)
        )

    def _update_cos_sin_cache(
        self, seqlen: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        # Rebuild on growth, device / dtype change, or when leaving inference mode for training.
        if (
            seqlen > self._seq_len_cached
            or self._cos_cached is None
            or self._cos_cached.device != device
            or self._cos_cached.dtype != dtype
            or (self.training and self._cos_cached.is_inference())
        ):
            self._seq_len_cached = seqlen
            # Positions and angles in fp32 regardless of the model dtype: bf16 positions lose precision.
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            inv_freq_buf: Tensor = self.inv_freq  # type: ignore[assignment]
            inv_freq = inv_freq_buf if inv_freq_buf.dtype == torch.float32 else self._compute_inv_freq(device)
            freqs = torch.outer(t, inv_freq)  # not einsum: autocast would turn it into bf16
            scale_buf: Tensor | None = self.scale  # type: ignore[assignment]
            if scale_buf is None or self.scale_base is None:
                self._cos_cached = torch.cos(freqs).to(dtype)
                self._sin_cached = torch.sin(freqs).to(dtype)
            else:
                power = (
                    torch.arange(seqlen, dtype=scale_buf.dtype, device=scale_buf.device) - seqlen // 2
                ) / self.scale_base
                scale = scale_buf.to(device=power.device) ** power[:, None]
                # Multiply by the scale in fp32, then cast.
                self._cos_cached = (torch.cos(freqs) * scale).to(dtype)
                self._sin_cached = (torch.sin(freqs) * scale).to(dtype)
                self._cos_k_cached = (torch.cos(freqs) / scale).to(dtype)
                self._sin_k_cached = (torch.sin(freqs) / scale).to(dtype)

    def forward(
        self,
        qkv: Tensor,
        kv: Tensor | None = None,
        seqlen_offset: int | Tensor = 0,
        max_seqlen: int | None = None,
        num_heads_q: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        qkv: (batch, seqlen, 3, nheads, headdim) or (batch, seqlen, num_heads_q + 2 * num_heads_k, headdim)
            if kv is None, else just q of shape (batch, seqlen, nheads, headdim).
        kv: (batch, seqlen, 2, nheads, headdim)
        seqlen_offset: (batch_size,) or int. Each sequence is shifted by this amount. With a tensor,
            pass max_seqlen so that the cos / sin cache covers every position.
        Rotary embedding is applied *in place* to qkv and / or kv.
        """
        seqlen = qkv.shape[1]
        cos_k: Tensor | None = self._cos_k_cached if self.scale is not None else None
        sin_k: Tensor | None = self._sin_k_cached if self.scale is not None else None
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif not isinstance(seqlen_offset, Tensor):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        cos, sin = self._cos_cached, self._sin_cached
        if cos is None or sin is None:
            raise ValueError("seqlen_offset is a tensor: pass max_seqlen so the cos/sin cache can be built")
        if self.scale is not None:
            cos_k, sin_k = self._cos_k_cached, self._sin_k_cached
        if kv is None:
            return apply_rotary_emb_qkv_(
                qkv,
                cos,
                sin,
                cos_k,
                sin_k,
                interleaved=self.interleaved,
                seqlen_offsets=seqlen_offset,
                num_heads_q=num_heads_q,
            )
        q = apply_rotary_emb_func(
            qkv,
            cos,
            sin,
            interleaved=self.interleaved,
            inplace=True,
            seqlen_offsets=seqlen_offset,
        )
        kv = apply_rotary_emb_kv_(
            kv,
            cos if cos_k is None else cos_k,
            sin if sin_k is None else sin_k,
            interleaved=self.interleaved,
            seqlen_offsets=seqlen_offset,
        )
        return q, kv
