"""Plain-PyTorch reference for :func:`fa_core.rotary.apply_rotary`.

Computes in the dtype of its inputs (no upcast), so calling it with fp16 tensors gives the
"same low precision" baseline error, and with float64 tensors gives the ground truth.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rotary_ref"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: (..., rotary_dim); cos, sin: broadcastable to (..., rotary_dim / 2)."""
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
    else:
        x0, x1 = x.chunk(2, dim=-1)
    o0 = x0 * cos - x1 * sin
    o1 = x0 * sin + x1 * cos
    if interleaved:
        return torch.stack((o0, o1), dim=-1).flatten(-2)
    return torch.cat((o0, o1), dim=-1)


def _gather_cos_sin(
    cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pos: any-shape integer positions -> cos/sin rows of shape (*pos.shape, rotary_dim / 2).

    Positions at or beyond seqlen_ro, and negative ones, give the identity rotation, like the kernel.
    """
    seqlen_ro = cos.shape[0]
    valid = (pos >= 0) & (pos < seqlen_ro)
    idx = torch.where(valid, pos, torch.zeros_like(pos)).long()
    c = torch.where(valid[..., None], cos[idx], torch.ones((), dtype=cos.dtype, device=cos.device))
    s = torch.where(valid[..., None], sin[idx], torch.zeros((), dtype=sin.dtype, device=sin.device))
    return c, s


def apply_rotary_ref(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
) -> torch.Tensor:
    """Reference rotary embedding; same arguments and semantics as ``fa_core.rotary.apply_rotary``.

    x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens.
    cos, sin: (seqlen_ro, rotary_dim / 2). Returns a tensor shaped like x (x itself if inplace).
    ``max_seqlen`` is accepted for signature parity and unused.
    """
    del max_seqlen
    rotary_dim = 2 * cos.shape[-1]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    if conjugate:
        sin = -sin
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        m = torch.arange(seqlen, device=x.device)
        offs = (
            seqlen_offsets.to(x.device).long()[:, None]
            if isinstance(seqlen_offsets, torch.Tensor)
            else torch.full((batch, 1), int(seqlen_offsets), device=x.device, dtype=torch.long)
        )
        pos = m[None, :] + offs  # (batch, seqlen)
        c, s = _gather_cos_sin(cos, sin, pos)
        c, s = c[:, :, None, :], s[:, :, None, :]  # broadcast over heads
    else:
        cu = cu_seqlens.long().tolist()
        total = x.shape[0]
        offs_list = (
            seqlen_offsets.long().tolist()
            if isinstance(seqlen_offsets, torch.Tensor)
            else [int(seqlen_offsets)] * (len(cu) - 1)
        )
        # Rows outside every sequence get an out-of-table position, i.e. are left unrotated.
        pos = torch.full((total,), cos.shape[0], dtype=torch.long, device=x.device)
        for b in range(len(cu) - 1):
            pos[cu[b] : cu[b + 1]] = torch.arange(cu[b + 1] - cu[b], device=x.device) + offs_list[b]
        c, s = _gather_cos_sin(cos, sin, pos)
        c, s = c[:, None, :], s[:, None, :]
    rotated = _rotate(x[..., :rotary_dim], c, s, interleaved)
    out = torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
    if inplace:
        x.copy_(out)
        return x
    return out
