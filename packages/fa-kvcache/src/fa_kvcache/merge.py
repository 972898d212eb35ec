"""``merge_attention_states``: combine two partial attentions of the same queries over disjoint key sets.

Given the output and log-sum-exp of attention over key set A and over key set B (for example a shared prompt
prefix and a request's own tokens, see :mod:`fa_kvcache.cascade`), the attention over A and B together is

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

exactly (up to rounding), whatever the mask, scale or softcap inside each part, since those act on each score
separately. One fused Triton kernel computes both in float32 and writes ``out`` in its dtype.

Layouts are flash-attn's, as :func:`fa_kvcache.flash_attn_with_kvcache` and ``flash_attn_func`` return them:

* ``out (batch, seqlen_q, nheads, headdim)`` with ``lse (batch, nheads, seqlen_q)``;
* varlen ``out (total_q, nheads, headdim)`` with ``lse (nheads, total_q)``;
* in general ``out (*lead, seqlen, nheads, headdim)`` with ``lse (*lead, nheads, seqlen)``: lse has
  ``out.shape[:-1]`` with its last two dims swapped.

Empty rows: a side whose lse is ``+inf`` (this library's and flash-attn >= 2.1's value for a row with no visible
key, with out 0) or ``-inf`` (the other common convention) contributes nothing: the result is the other side
exactly (its out and lse bit for bit, up to the cast to the output dtype), and the empty side's out is not read
(it may hold anything, NaN included). Both sides empty gives ``out = 0`` and ``lse = +inf``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from fa_core.fast_launch import FastLaunch
from fa_core.forward_configs import cdiv, next_pow2

__all__ = ["merge_attention_states"]

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: elements of one (heads x headdim) tile a program merges
_TILE = 4096


@triton.jit
def merge_kernel(
    OA,
    LA,
    OB,
    LB,
    O,
    LO,
    s_oa1,
    s_oa2,
    s_oal,
    s_oah,
    s_ob1,
    s_ob2,
    s_obl,
    s_obh,
    s_o1,
    s_o2,
    s_ol,
    s_oh,
    s_la1,
    s_la2,
    s_lah,
    s_lal,
    s_lb1,
    s_lb2,
    s_lbh,
    s_lbl,
    s_lo1,
    s_lo2,
    s_loh,
    s_lol,
    N2,
    L,
    H,
    HEADDIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: query row ``(n1, n2, l)`` of the ``(N1, N2, L)`` leading grid, ``BLOCK_H`` heads."""
    row = tl.program_id(0).to(tl.int64)
    l_idx = row % L
    t = row // L
    n2 = t % N2
    n1 = t // N2
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < H
    d_ok = d < HEADDIM
    h64 = h.to(tl.int64)

    lse_a = tl.load(LA + n1 * s_la1 + n2 * s_la2 + l_idx * s_lal + h64 * s_lah, mask=h_ok, other=float("inf"))
    lse_b = tl.load(LB + n1 * s_lb1 + n2 * s_lb2 + l_idx * s_lbl + h64 * s_lbh, mask=h_ok, other=float("inf"))
    # +inf (no visible key, flash-attn's convention) and -inf both mean "empty": weight 0
    a_ok = (lse_a != float("inf")) & (lse_a != float("-inf"))
    b_ok = (lse_b != float("inf")) & (lse_b != float("-inf"))
    la = tl.where(a_ok, lse_a, float("-inf"))
    lb = tl.where(b_ok, lse_b, float("-inf"))
    m = tl.maximum(la, lb)
    m_safe = tl.where(a_ok | b_ok, m, 0.0)
    wa = tl.where(a_ok, tl.exp(la - m_safe), 0.0)
    wb = tl.where(b_ok, tl.exp(lb - m_safe), 0.0)
    den = wa + wb
    den_safe = tl.where(den > 0.0, den, 1.0)
    lse = tl.where(a_ok | b_ok, m_safe + tl.log(den_safe), float("inf"))

    tile_ok = h_ok[:, None] & d_ok[None, :]
    oa = tl.load(
        OA + n1 * s_oa1 + n2 * s_oa2 + l_idx * s_oal + h64[:, None] * s_oah + d[None, :],
        mask=tile_ok & a_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    ob = tl.load(
        OB + n1 * s_ob1 + n2 * s_ob2 + l_idx * s_obl + h64[:, None] * s_obh + d[None, :],
        mask=tile_ok & b_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    acc = oa * (wa / den_safe)[:, None] + ob * (wb / den_safe)[:, None]
    tl.store(
        O + n1 * s_o1 + n2 * s_o2 + l_idx * s_ol + h64[:, None] * s_oh + d[None, :],
        acc.to(O.dtype.element_ty),
        mask=tile_ok,
    )
    tl.store(LO + n1 * s_lo1 + n2 * s_lo2 + l_idx * s_lol + h64 * s_loh, lse, mask=h_ok)


merge_launch = FastLaunch(merge_kernel)


def _lead2(t: torch.Tensor, keep: int, name: str, writable: bool) -> torch.Tensor:
    """View ``t`` with exactly two leading dims before its last ``keep`` dims (size-1 dims added in front;
    extra leading dims merged, by a view, or a copy for inputs)."""
    while t.dim() < keep + 2:
        t = t.unsqueeze(0)
    if t.dim() > keep + 2:
        shape = (-1, *t.shape[t.dim() - keep - 1 :])
        if not writable:
            return t.reshape(shape)
        try:
            return t.view(shape)
        except RuntimeError:
            raise FlashAttnValueError(
                f"{name}'s leading dims {tuple(t.shape[: t.dim() - keep])} cannot be merged without a copy "
                f"(strides {t.stride()}): pass a tensor with at most two leading dims"
            ) from None
    return t


def _check_out(name: str, t: object, shape: torch.Size, ref: torch.Tensor) -> torch.Tensor:
    t = V.check_tensor(name, t)
    if t.shape != shape:
        raise FlashAttnValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    V.check_device(name, t, "out_a", ref)
    return t


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions of the same queries over disjoint key sets (one fused kernel).

    Args:
        out_a, out_b: ``(*lead, seqlen, nheads, headdim)`` float16 / bfloat16 / float32 (they may differ),
            e.g. ``(batch, seqlen_q, nheads, headdim)`` or varlen ``(total_q, nheads, headdim)``. Any strides;
            a strided last dim is copied first.
        lse_a, lse_b: float32 ``(*lead, nheads, seqlen)`` (flash-attn's ``(batch, nheads, seqlen_q)``, varlen
            ``(nheads, total_q)``), natural log, any strides. ``+inf`` or ``-inf`` marks an empty row (see the
            module docstring).
        out: optional destination ``out_a.shape`` (float16 / bfloat16 / float32, contiguous last dim); it may
            be ``out_a`` or ``out_b`` itself (in-place merge). Default: a new tensor in the promoted dtype of
            ``out_a`` and ``out_b``.
        out_lse: optional float32 destination of ``lse_a``'s shape (it may be ``lse_a`` or ``lse_b``).

    Returns:
        ``(out, lse)``: ``out`` like ``out_a``, ``lse`` float32 ``(*lead, nheads, seqlen)`` (contiguous when
        allocated here). Rows empty on both sides: out 0, lse ``+inf``.
    """
    out_a = V.check_tensor("out_a", out_a)
    out_b = V.check_tensor("out_b", out_b)
    lse_a = V.check_tensor("lse_a", lse_a)
    lse_b = V.check_tensor("lse_b", lse_b)
    if out_a.dim() < 3:
        raise FlashAttnValueError(
            f"out_a must be (*lead, seqlen, nheads, headdim) with at least 3 dims, got {tuple(out_a.shape)}"
        )
    if out_b.shape != out_a.shape:
        raise FlashAttnValueError(f"out_b has shape {tuple(out_b.shape)}, out_a {tuple(out_a.shape)}")
    lse_shape = torch.Size((*out_a.shape[:-3], out_a.shape[-2], out_a.shape[-3]))
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != lse_shape:
            raise FlashAttnValueError(
                f"{name} must have shape {tuple(lse_shape)} (out's (*lead, seqlen, nheads) with the last two "
                f"dims swapped, flash-attn's layout), got {tuple(t.shape)}"
            )
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    for name, t in (("out_a", out_a), ("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        V.check_device(name, t, "out_a", out_a)
        if t.dtype not in OUT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    V.check_compute_device("out_a", out_a)
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        if t.dtype == torch.bfloat16 and t.device.type == "cpu" and V.interpreting():
            raise TypeError(f"{name} has dtype torch.bfloat16 on CPU: {V.BF16_INTERPRETER_MESSAGE}")
    if out is None:
        out = torch.empty(
            out_a.shape, dtype=torch.promote_types(out_a.dtype, out_b.dtype), device=out_a.device
        )
    else:
        out = _check_out("out", out, out_a.shape, out_a)
        if out.dtype not in OUT_DTYPES:
            raise TypeError(f"out has dtype {out.dtype}; supported: float16, bfloat16, float32")
        V.check_last_dim_contiguous("out", out)
    if out_lse is None:
        out_lse = torch.empty(lse_shape, dtype=torch.float32, device=out_a.device)
    else:
        out_lse = _check_out("out_lse", out_lse, lse_shape, out_a)
        if out_lse.dtype != torch.float32:
            raise TypeError(f"out_lse must be float32, got {out_lse.dtype}")
    if out.numel() == 0:
        return out, out_lse

    oa = _lead2(V.contig_last(out_a), 3, "out_a", False)
    ob = _lead2(V.contig_last(out_b), 3, "out_b", False)
    o = _lead2(out, 3, "out", True)
    la = _lead2(lse_a, 2, "lse_a", False)
    lb = _lead2(lse_b, 2, "lse_b", False)
    lo = _lead2(out_lse, 2, "out_lse", True)
    n1, n2, seqlen, nheads, d = o.shape
    block_d = max(next_pow2(d), 16)
    block_h = max(1, min(next_pow2(nheads), _TILE // block_d))
    grid = (n1 * n2 * seqlen, cdiv(nheads, block_h))
    ctx = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with ctx:
        merge_launch(
            grid,
            oa,
            la,
            ob,
            lb,
            o,
            lo,
            *oa.stride()[:4],
            *ob.stride()[:4],
            *o.stride()[:4],
            *la.stride(),
            *lb.stride(),
            *lo.stride(),
            n2,
            seqlen,
            nheads,
            HEADDIM=d,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            num_warps=4 if block_h * block_d >= 2048 else 2,
        )
    return out, out_lse
