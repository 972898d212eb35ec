"""The kernels Flash Attention Plus registers for aten's flash ops (see :mod:`fa_backward.sdpa`).

Each function has the semantics of one aten op's schema (``_scaled_dot_product_flash_attention`` and its
backward, ``_flash_attention_forward`` / ``_flash_attention_backward``,
``_flash_attention_forward_no_dropout_inplace``), adapts layouts with transposed *views* and runs fa-core's
forward or fa-backward's backward; :func:`call_counts` counts their calls. :mod:`fa_backward.sdpa` binds them to
the running torch's schemas and registers them with the dispatcher; everything here stays importable from there.
"""

from __future__ import annotations

from typing import Any

import torch

from fa_backward.backward import flash_attn_backward, flash_attn_varlen_backward
from fa_core.forward import flash_attn_forward, flash_attn_varlen_forward
from fa_core.validation import contig_last

__all__ = [
    "IMPL_NAME",
    "call_counts",
    "flash_attention_backward",
    "flash_attention_forward",
    "flash_attention_forward_no_dropout_inplace",
    "reset_call_counts",
    "sdpa_flash_backward",
    "sdpa_flash_forward",
]

#: The name under which torch's flash-attention registry knows us.
IMPL_NAME = "FA_PLUS"

# How many times our registered kernels ran (tests and users check that SDPA really routed to us).
_CALLS = {"forward": 0, "backward": 0}


def call_counts() -> dict[str, int]:
    """``{"forward": n, "backward": m}``: calls of our SDPA kernels since import / the last reset."""
    return dict(_CALLS)


def reset_call_counts() -> None:
    """Zero the counters of :func:`call_counts`."""
    for key in _CALLS:
        _CALLS[key] = 0


# ------------------------------------------------------------------------------------ layout helpers


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """``(b, h, s, d)`` -> ``(b, s, h, d)`` as a view (a copy only when the last dim is strided)."""
    return contig_last(t.transpose(1, 2))


def _new_bhsd(batch: int, nheads: int, seqlen: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """A ``(b, h, s, d)`` tensor whose memory is ``(b, s, h, d)``: the layout torch's own flash kernel
    returns (``out.transpose(1, 2)`` is then contiguous, which attention layers reshape for free)."""
    return like.new_empty(batch, seqlen, nheads, d).transpose(1, 2)


def _grad_like(t: torch.Tensor, bhsd: bool) -> torch.Tensor:
    """A gradient buffer with ``t``'s layout (autograd then accumulates into ``.grad`` without a copy),
    falling back to a layout with a contiguous last dim."""
    g = torch.empty_like(t)
    if g.shape[-1] <= 1 or g.stride(-1) == 1:
        return g
    if bhsd:
        return _new_bhsd(t.shape[0], t.shape[1], t.shape[2], t.shape[3], t)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _rng_outputs(
    rng_state: torch.Tensor, dropout_p: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The schema's ``(rng_state, unused)``: uint64 ``(2,)`` and ``()`` as torch's meta functions declare.

    With dropout, ``rng_state`` holds our ``[seed, offset]`` on the CPU (no device sync when the backward
    reads it). Without dropout nothing reads them: uninitialised device tensors cost no kernel launch.
    """
    if dropout_p <= 0.0:
        return (
            torch.empty(2, dtype=torch.uint64, device=device),
            torch.empty((), dtype=torch.uint64, device=device),
        )
    seed, offset = (int(x) for x in rng_state.tolist())
    return torch.tensor([seed, offset], dtype=torch.uint64), torch.zeros((), dtype=torch.uint64)


def _rng_input(rng_state: torch.Tensor | None, dropout_p: float) -> torch.Tensor | None:
    """Our int64 ``[seed, offset]`` back from the schema's ``rng_state`` (only read with dropout)."""
    if dropout_p <= 0.0:
        return None
    if rng_state is None or rng_state.numel() != 2:
        raise RuntimeError(
            f"{IMPL_NAME}: dropout backward needs the rng_state (2,) [seed, offset] returned by this "
            "backend's forward; was the forward run by another flash implementation?"
        )
    return torch.tensor([int(x) for x in rng_state.tolist()], dtype=torch.int64)


def _debug_mask(probs: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if probs is None:
        return torch.empty(0, dtype=like.dtype, device=like.device)
    return probs.to(like.dtype)


def _window(left: int | None, right: int | None) -> tuple[int, int]:
    return (-1 if left is None else int(left), -1 if right is None else int(right))


# ------------------------------------------------------------------ the kernels (aten schema semantics)


def sdpa_flash_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    return_debug_mask: bool = False,
    *,
    scale: float | None = None,
) -> tuple[Any, ...]:
    """``aten::_scaled_dot_product_flash_attention`` on our kernels.

    Args:
        query ``(batch, nheads, seqlen_q, d)``, key / value ``(batch, nheads_k, seqlen_k, d)``: SDPA's
            layout, any strides (SDPA passes GQA as ``nheads_k < nheads``: our kernels read kv head
            ``h // (nheads // nheads_k)``, i.e. ``repeat_interleave`` semantics, as ``enable_gqa``).
        dropout_p, is_causal (bottom-right aligned, as torch's flash kernel; SDPA only sends it with
            ``seqlen_q == seqlen_k``), scale (default ``d ** -0.5``).
        return_debug_mask: also return the probabilities ``(batch, nheads, seqlen_q, seqlen_k)`` in q's dtype
            (dropped entries negated; testing only).

    Returns:
        ``(output, logsumexp, cum_seq_q=None, cum_seq_k=None, max_q, max_k, rng_state, unused,
        debug_attn_mask)``; output ``(batch, nheads, seqlen_q, d_v)`` (memory ``(b, s, h, d)``),
        logsumexp float32 ``(batch, nheads, seqlen_q)``.
    """
    batch, nheads, seqlen_q, _ = query.shape
    out = _new_bhsd(batch, nheads, seqlen_q, value.shape[-1], query)
    # below the autograd key the inputs may still say requires_grad: fa_core's grad guard must not fire
    with torch.no_grad():
        res = flash_attn_forward(
            _bshd(query),
            _bshd(key),
            _bshd(value),
            dropout_p=float(dropout_p),
            softmax_scale=scale,
            causal=bool(is_causal),
            return_probs=bool(return_debug_mask),
            out=out.transpose(1, 2),
        )
    _CALLS["forward"] += 1
    rng_state, unused = _rng_outputs(res.rng_state, float(dropout_p), query.device)
    return (
        out,
        res.lse,
        None,
        None,
        seqlen_q,
        key.shape[2],
        rng_state,
        unused,
        _debug_mask(res.probs, query),
    )


def sdpa_flash_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    philox_seed: torch.Tensor | None,
    philox_offset: torch.Tensor | None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten::_scaled_dot_product_flash_attention_backward`` on our kernels: ``(dq, dk, dv)`` shaped
    (and, where possible, laid out) like query, key, value."""
    dq, dk, dv = _grad_like(query, True), _grad_like(key, True), _grad_like(value, True)
    flash_attn_backward(
        _bshd(grad_out),
        _bshd(query),
        _bshd(key),
        _bshd(value),
        _bshd(out),
        logsumexp,
        dq=dq.transpose(1, 2),
        dk=dk.transpose(1, 2),
        dv=dv.transpose(1, 2),
        dropout_p=float(dropout_p),
        softmax_scale=scale,
        causal=bool(is_causal),
        rng_state=_rng_input(philox_seed, float(dropout_p)),
    )
    _CALLS["backward"] += 1
    return dq, dk, dv


def flash_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    return_debug_mask: bool,
    *,
    scale: float | None = None,
    window_size_left: int | None = None,
    window_size_right: int | None = None,
    seqused_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[Any, ...]:
    """``aten::_flash_attention_forward`` on our kernels: dense ``(batch, seqlen, nheads, d)`` or, with
    ``cum_seq_q`` / ``cum_seq_k``, packed ``(total, nheads, d)``.

    ``num_splits`` is a performance hint (ignored); ``block_table`` (paged KV) is refused. ``out`` is
    not in the schema: :func:`flash_attention_forward_no_dropout_inplace` passes its buffer through it.

    Returns:
        ``(output, logsumexp, rng_state, unused, debug_attn_mask)``; logsumexp float32
        ``(batch, nheads, seqlen_q)`` dense, ``(nheads, total_q)`` varlen.
    """
    if block_table is not None:
        raise RuntimeError(f"{IMPL_NAME}: paged KV (block_table) is not supported by this backend")
    kw: dict[str, Any] = dict(
        dropout_p=float(dropout_p),
        softmax_scale=scale,
        causal=bool(is_causal),
        window_size=_window(window_size_left, window_size_right),
        alibi_slopes=alibi_slopes,
        return_probs=bool(return_debug_mask),
        out=out,
    )
    q, k, v = contig_last(query), contig_last(key), contig_last(value)
    if (cum_seq_q is None) != (cum_seq_k is None):
        raise RuntimeError(f"{IMPL_NAME}: cum_seq_q and cum_seq_k must be given together")
    if cum_seq_q is None and seqused_k is not None:
        raise RuntimeError(f"{IMPL_NAME}: seqused_k needs the varlen path (cum_seq_q / cum_seq_k)")
    with torch.no_grad():  # as in sdpa_flash_forward: we run below autograd
        if cum_seq_q is None or cum_seq_k is None:
            res = flash_attn_forward(q, k, v, **kw)
        else:
            res = flash_attn_varlen_forward(
                q, k, v, cum_seq_q, cum_seq_k, int(max_q), int(max_k), seqused_k=seqused_k, **kw
            )
    _CALLS["forward"] += 1
    rng_state, unused = _rng_outputs(res.rng_state, float(dropout_p), query.device)
    return res.out, res.lse, rng_state, unused, _debug_mask(res.probs, query)


def flash_attention_forward_no_dropout_inplace(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    return_debug_mask: bool,
    *,
    scale: float | None = None,
    window_size_left: int | None = None,
    window_size_right: int | None = None,
    seqused_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``aten::_flash_attention_forward_no_dropout_inplace``: writes ``out``, returns the logsumexp."""
    if dropout_p:
        raise RuntimeError(f"{IMPL_NAME}: _flash_attention_forward_no_dropout_inplace got dropout_p != 0")
    return flash_attention_forward(
        query,
        key,
        value,
        cum_seq_q,
        cum_seq_k,
        max_q,
        max_k,
        0.0,
        is_causal,
        return_debug_mask,
        scale=scale,
        window_size_left=window_size_left,
        window_size_right=window_size_right,
        seqused_k=seqused_k,
        alibi_slopes=alibi_slopes,
        block_table=block_table,
        num_splits=num_splits,
        out=out,
    )[1]


def flash_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    rng_state: torch.Tensor | None,
    unused: torch.Tensor | None,
    *,
    scale: float | None = None,
    window_size_left: int | None = None,
    window_size_right: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten::_flash_attention_backward`` on our kernels (dense or varlen, as the forward).

    The schema carries no ``alibi_slopes`` / ``seqused_k``: as with torch's own kernel, gradients of a
    forward that used them are those of attention without them.
    """
    dq, dk, dv = _grad_like(query, False), _grad_like(key, False), _grad_like(value, False)
    left, right = _window(window_size_left, window_size_right)
    kw: dict[str, Any] = dict(
        dropout_p=float(dropout_p),
        softmax_scale=scale,
        causal=bool(is_causal),
        window_size_left=left,
        window_size_right=right,
        rng_state=_rng_input(rng_state, float(dropout_p)),
    )
    g, q, k, v, o = (contig_last(t) for t in (grad_out, query, key, value, out))
    if cum_seq_q is None:
        flash_attn_backward(g, q, k, v, o, logsumexp, dq=dq, dk=dk, dv=dv, **kw)
    else:
        if cum_seq_k is None:
            raise RuntimeError(f"{IMPL_NAME}: cum_seq_q and cum_seq_k must be given together")
        flash_attn_varlen_backward(
            g,
            q,
            k,
            v,
            o,
            logsumexp,
            dq,
            dk,
            dv,
            cum_seq_q,
            cum_seq_k,
            int(max_q),
            int(max_k),
            **kw,
        )
    _CALLS["backward"] += 1
    return dq, dk, dv
