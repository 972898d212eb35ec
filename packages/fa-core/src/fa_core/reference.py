"""Plain-PyTorch attention: the one reference every package's tests and benchmarks compare against.

Same arguments and conventions as the kernels (see :mod:`fa_core.masking`), written with explicit
``(seqlen_q, seqlen_k)`` masks, in float32 / float64 (``upcast=True``) or in the inputs' own precision
(``upcast=False``, the "plain PyTorch in low precision" baseline of the 2x error rule).
"""

from __future__ import annotations

import math

import torch

from fa_core.block_sparse import block_mask_to_dense

__all__ = ["attention_ref", "attention_varlen_ref", "visible_mask"]


def visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str = "cpu",
    attention_chunk: int = 0,
) -> torch.Tensor:
    """Bool ``(seqlen_q, seqlen_k)``: True where query ``i`` may see key ``j`` (bottom-right aligned).

    ``attention_chunk > 0`` also requires ``i + seqlen_k - seqlen_q`` and ``j`` to lie in the same chunk."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= diag + right
    if left >= 0:
        ok &= j >= diag - left
    if attention_chunk > 0:
        ok &= torch.div(diag, attention_chunk, rounding_mode="floor") == torch.div(
            j, attention_chunk, rounding_mode="floor"
        )
    return ok


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
    dtype: torch.dtype = torch.float32,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (GQA/MQA).
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
        alibi_slopes: ``(nheads,)`` or ``(batch, nheads)``; bias ``-slope * |i + seqlen_k - seqlen_q - j|``.
        dropout_mask: bool ``(batch, nheads, seqlen_q, seqlen_k)``, True = kept; scaled by ``1/(1-p)``.
        upcast: compute in ``dtype`` (float32/float64) when True, else in the inputs' dtype.
        attention_chunk: keys visible only inside the query's chunk (see :func:`visible_mask`).
        learnable_sink: ``(nheads,)`` extra logit per head in the softmax denominator (gpt-oss).
        score_mod, mask_mod: PyTorch twins of the kernels' user functions, called with broadcastable index
            tensors ``b (batch,1,1,1)``, ``h (1,nheads,1,1)``, ``q_idx (1,1,seqlen_q,1)``, ``kv_idx (1,1,1,seqlen_k)``.
        block_mask: :class:`fa_core.block_sparse.BlockMask` (FlexAttention's semantics): only elements inside
            listed blocks are visible; ``mask_mod`` applies inside the partial blocks only (full blocks skip
            it). The built-in rules (causal, window, chunk) apply everywhere.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)`` in q's dtype and ``lse (batch, nheads, seqlen_q)``
        float32. A row with no visible key gives ``out = 0`` and ``lse = +inf`` (as flash-attn writes it).
    """
    in_dtype = q.dtype
    if upcast:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    group = nheads // nheads_k
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q * softmax_scale, k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores.dtype)
        slopes = slopes.reshape(1, nheads, 1, 1) if slopes.dim() == 1 else slopes.reshape(batch, nheads, 1, 1)
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        rel = (i + seqlen_k - seqlen_q - j).abs().to(scores.dtype)
        scores = scores - slopes * rel
    ok = visible_mask(seqlen_q, seqlen_k, causal, window_size, q.device, attention_chunk)
    if score_mod is not None or mask_mod is not None:
        dev = q.device
        bi = torch.arange(batch, device=dev).view(-1, 1, 1, 1)
        hi = torch.arange(nheads, device=dev).view(1, -1, 1, 1)
        qi = torch.arange(seqlen_q, device=dev).view(1, 1, -1, 1)
        ki = torch.arange(seqlen_k, device=dev).view(1, 1, 1, -1)
        if score_mod is not None:
            scores = score_mod(scores, bi, hi, qi, ki)
        if mask_mod is not None:
            mm = mask_mod(bi, hi, qi, ki)
            if block_mask is not None:
                # full blocks skip mask_mod (FlexAttention): there mask_mod is taken as all True
                mm = mm | block_mask_to_dense(block_mask, seqlen_q, seqlen_k, "full")
            ok = ok & mm  # now (batch, nheads, seqlen_q, seqlen_k)
    if block_mask is not None:
        ok = ok & block_mask_to_dense(block_mask, seqlen_q, seqlen_k)
    scores = scores.masked_fill(~ok, float("-inf"))
    empty = ~ok.any(dim=-1)  # (seqlen_q,) or (batch, nheads, seqlen_q)
    if learnable_sink is not None:
        # gpt-oss: softmax over [scores, sink], the sink's column dropped afterwards
        sink = learnable_sink.to(scores.dtype).reshape(1, nheads, 1, 1).expand(batch, nheads, seqlen_q, 1)
        full = torch.cat([scores, sink], dim=-1)
        lse = torch.logsumexp(full.float(), dim=-1)
        attn = torch.softmax(full, dim=-1)[..., :-1]
        empty = torch.zeros_like(empty)  # the sink keeps every row's denominator finite
    else:
        lse = torch.logsumexp(scores.float(), dim=-1)
        # empty rows: softmax over zeros then zeroed, so that autograd through the reference stays NaN-free
        attn = torch.softmax(scores.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(
            empty[..., None], 0.0
        )
    if dropout_mask is not None:
        attn = attn.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhts,bshd->bthd", attn, v)
    lse = lse.masked_fill(empty, float("inf"))
    return out.to(in_dtype), lse.float()


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    seqused_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_mask: list[torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for packed sequences: loops :func:`attention_ref` over the batch.

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 prefix sums.
        seqused_k: ``(batch,)``: only the first ``seqused_k[b]`` keys of sequence b are used.
        dropout_mask: per sequence a bool ``(nheads, seqlen_q_b, seqlen_k_b)``.

    Returns:
        ``out (total_q, nheads, headdim_v)`` and ``lse (nheads, total_q)`` float32.
    """
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    batch = len(cq) - 1
    nheads = q.shape[1]
    out = q.new_zeros(q.shape[0], nheads, v.shape[-1])
    lse = torch.full((nheads, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        kb_end = ck[b + 1] if seqused_k is None else ck[b] + int(seqused_k[b])
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        mask = None if dropout_mask is None else dropout_mask[b][None]
        o, l = attention_ref(
            q[None, cq[b] : cq[b + 1]],
            k[None, ck[b] : kb_end],
            v[None, ck[b] : kb_end],
            alibi_slopes=slopes,
            dropout_mask=mask,
            **kwargs,
        )
        out[cq[b] : cq[b + 1]] = o[0]
        lse[:, cq[b] : cq[b + 1]] = l[0]
    return out, lse
