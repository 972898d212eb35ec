"""``flash_attn.utils.testing``: flash-attn 2.8.x's helpers for testing attention kernels, in plain PyTorch.

* :func:`generate_random_padding_mask`: a ``(batch_size, max_seqlen)`` bool mask of left-aligned valid
  tokens with random lengths (``mode`` ``"full"`` / ``"random"`` / ``"third"``, optionally zero lengths).
* :func:`generate_qkv`: padded ``q`` / ``k`` / ``v`` -> their unpadded (varlen) forms, ``cu_seqlens`` /
  ``seqused`` / max lengths, fresh leaf copies of the padded tensors and the functions that pad outputs and
  gradients back; separate, ``kvpacked`` or ``qkvpacked`` forms.
* :func:`construct_local_mask` / :func:`construct_chunk_mask`: the sliding-window (with sink tokens) and the
  chunked-attention masks, True where a key is masked out, queries aligned to the end of the keys.
* :func:`attention_ref`: the reference attention (padding, causal / sliding-window / chunked masks, sink
  tokens and learnable sinks, bias, softcap, dropout mask, GQA / MQA, the ``qv`` term, FP8 descales).

Conventions (flash-attn's FlashAttention-3 test utilities): a padding mask is ``(batch, seqlen)`` bool, True
for a valid token; a window side of None is unbounded (``window_size=(None, None)``: no window); masks from
the ``construct_*`` functions are ``(seqlen_q, seqlen_k)``, or ``(batch, 1, seqlen_q, seqlen_k)`` when a
padding mask or ``key_leftpad`` makes them depend on the batch; query row ``i`` of a sequence of ``sq``
queries and ``sk`` keys sits at key position ``i + sk - sq`` (bottom-right alignment).

The random draws of :func:`generate_random_padding_mask` are flash-attn's (the same ``torch.randint`` calls in
the same order), so a seed gives flash-attn's masks.

Differences from flash-attn, all supersets or fixes:

* ``attention_ref(upcast=True)`` computes in float32, or in float64 when an input is float64 (flash-attn
  rounds float64 inputs to float32);
* a window with a None right side and a given left side is unbounded on the right (flash-attn: ``TypeError``),
  and ``window_size=(None, None)`` in :func:`construct_local_mask` masks nothing;
* ``generate_qkv(qkvpacked=True)`` works without padding masks (flash-attn compares ``None == None`` and
  fails); :func:`generate_random_padding_mask` allows ``max_seqlen`` below the minimum random length;
* invalid arguments raise ``ValueError`` naming the problem where flash-attn fails an ``assert`` (or divides
  by zero: ``dropout_p=1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flash_attn.bert_padding import pad_input, unpad_input

__all__ = [
    "attention_ref",
    "construct_chunk_mask",
    "construct_local_mask",
    "generate_qkv",
    "generate_random_padding_mask",
]

_MODES = ("full", "random", "third")
#: the key position given to left-padding slots of ``key_leftpad``: beyond every window
_FAR = 2**32


# ---------------------------------------------------------------------------------------- padding
def generate_random_padding_mask(
    max_seqlen: int,
    batch_size: int,
    device: torch.device | str | None,
    mode: str = "random",
    zero_lengths: bool = False,
) -> Tensor:
    """A random left-aligned padding mask.

    Arguments:
        max_seqlen: padded length.
        batch_size: number of sequences.
        device: of the mask.
        mode: ``"full"`` (every length ``max_seqlen``), ``"random"`` (lengths uniform in
            ``[max(1, max_seqlen - 20), max_seqlen]``, from 0 with ``zero_lengths``) or ``"third"``
            (uniform in ``[max_seqlen // 3, max_seqlen]``).
        zero_lengths: also set the lengths of sequences 0, 5, 10, ... and of the last one to 0.
    Return:
        (batch_size, max_seqlen) bool, True at positions below the sequence's length.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if max_seqlen < 0 or batch_size < 0:
        raise ValueError(f"max_seqlen and batch_size must be >= 0, got {max_seqlen} and {batch_size}")
    if mode == "full":
        lengths = torch.full((batch_size, 1), max_seqlen, device=device, dtype=torch.int32)
    else:
        low = max(0 if zero_lengths else 1, max_seqlen - 20) if mode == "random" else max_seqlen // 3
        lengths = torch.randint(min(low, max_seqlen), max_seqlen + 1, (batch_size, 1), device=device)
    if zero_lengths and batch_size > 0:
        lengths[::5] = 0
        lengths[-1] = 0
    positions = torch.arange(max_seqlen, device=device).expand(batch_size, max_seqlen)
    return positions < lengths


def _pad_rows(batch_size: int) -> Callable[[Tensor], Tensor]:
    """``(batch_size * seqlen, ...) -> (batch_size, seqlen, ...)``."""
    return lambda t: t.reshape(batch_size, -1, *t.shape[1:])


def _pad_indices(indices: Tensor, batch_size: int, seqlen: int) -> Callable[[Tensor], Tensor]:
    """``(total, ...) -> (batch_size, seqlen, ...)``, zeros at the padding."""
    return lambda t: pad_input(t, indices, batch_size, seqlen)


def _check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, seqlen, nheads, headdim)")
    batch_size, seqlen_q, nheads, d = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    d_v = v.shape[-1]
    if tuple(k.shape) != (batch_size, seqlen_k, nheads_k, d):
        raise ValueError(
            f"k must have shape (batch_size, seqlen_k, nheads_k, headdim) = ({batch_size}, seqlen_k, nheads_k, "
            f"{d}), got {tuple(k.shape)}"
        )
    if tuple(v.shape) != (batch_size, seqlen_k, nheads_k, d_v):
        raise ValueError(
            f"v must have shape {(batch_size, seqlen_k, nheads_k)} + (headdim_v,), got {tuple(v.shape)}"
        )
    return batch_size, seqlen_q, seqlen_k, nheads, nheads_k, d, d_v


def generate_qkv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_padding_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    qv: Tensor | None = None,
    kvpacked: bool = False,
    qkvpacked: bool = False,
    query_unused_mask: Tensor | None = None,
    key_unused_mask: Tensor | None = None,
) -> tuple[Any, ...]:
    """Unpad ``q`` / ``k`` / ``v`` for the varlen API and return the helpers to check the results.

    Arguments:
        q: (batch_size, seqlen_q, nheads, d)
        k: (batch_size, seqlen_k, nheads_k, d)
        v: (batch_size, seqlen_k, nheads_k, d_v)
        query_padding_mask: (batch_size, seqlen_q) bool, or None (every query valid).
        key_padding_mask: (batch_size, seqlen_k) bool, or None (every key valid).
        qv: (batch_size, seqlen_q, nheads, d_v) or None, unpadded like ``q`` (not made a leaf that requires
            grad).
        kvpacked: return ``k`` / ``v`` stacked: kv (batch_size, seqlen_k, 2, nheads_k, d), needs d_v == d.
        qkvpacked: return ``q`` / ``k`` / ``v`` stacked: qkv (batch_size, seqlen, 3, nheads, d), needs equal
            lengths, padding masks, head counts and head dims.
        query_unused_mask / key_unused_mask: (batch_size, seqlen) bool or None, tokens allocated but unused:
            kept in the unpadded tensors and ``cu_seqlens``, left out of ``seqused`` (separate form only).
    Return:
        separate: ``(q_unpad, k_unpad, v_unpad, qv_unpad, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
        max_seqlen_q, max_seqlen_k, q, k, v, qv, output_pad_fn, dq_pad_fn, dk_pad_fn)``;
        kvpacked: ``(q_unpad, kv_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, kv,
        output_pad_fn, dq_pad_fn, dkv_pad_fn)``;
        qkvpacked: ``(qkv_unpad, cu_seqlens_q, max_seqlen_q, qkv, output_pad_fn, dqkv_pad_fn)``.

        The unpadded tensors are (total, nheads, d) (kv_unpad (total_k, 2, nheads_k, d), qkv_unpad
        (total, 3, nheads, d)) and, like the returned padded tensors, detached leaves that require grad
        (``qv`` / ``qv_unpad``: detached only). ``cu_seqlens_*``: (batch_size + 1,) int32; ``seqused_*``:
        (batch_size,) int32 with a padding mask, else None; ``max_seqlen_*``: int. The ``*_pad_fn`` map an
        unpadded (total, ...) tensor to (batch_size, seqlen, ...), zero at the padding (``dk_pad_fn`` /
        ``dkv_pad_fn`` with the key layout).
    """
    batch_size, seqlen_q, seqlen_k, nheads, nheads_k, d, d_v = _check_qkv(q, k, v)
    if kvpacked and qkvpacked:
        raise ValueError("kvpacked and qkvpacked cannot both be set")
    if (query_unused_mask is not None or key_unused_mask is not None) and (kvpacked or qkvpacked):
        raise ValueError(
            "query_unused_mask / key_unused_mask need the separate form (kvpacked=qkvpacked=False)"
        )
    if qkvpacked:
        if (query_padding_mask is None) != (key_padding_mask is None) or (
            query_padding_mask is not None
            and key_padding_mask is not None
            and not torch.equal(query_padding_mask, key_padding_mask)
        ):
            raise ValueError("qkvpacked needs query_padding_mask == key_padding_mask")
        if seqlen_q != seqlen_k or nheads != nheads_k or d_v != d:
            raise ValueError(
                "qkvpacked needs q, k and v of one shape, got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
    if kvpacked and d_v != d:
        raise ValueError(f"kvpacked needs k and v of one head dim, got {d} and {d_v}")

    seqused_q: Tensor | None = None
    seqused_k: Tensor | None = None
    if query_padding_mask is not None:
        q_unpad, indices_q, cu_seqlens_q, max_seqlen_q, seqused_q = unpad_input(
            q, query_padding_mask, query_unused_mask
        )
        output_pad_fn = _pad_indices(indices_q, batch_size, seqlen_q)
        qv_unpad = qv.reshape(-1, *qv.shape[2:])[indices_q] if qv is not None else None
    else:
        q_unpad = q.reshape(-1, nheads, d)
        cu_seqlens_q = torch.arange(
            0, (batch_size + 1) * seqlen_q, step=seqlen_q, dtype=torch.int32, device=q.device
        )
        max_seqlen_q = seqlen_q
        output_pad_fn = _pad_rows(batch_size)
        qv_unpad = qv.reshape(-1, *qv.shape[2:]) if qv is not None else None

    if key_padding_mask is not None:
        k_unpad, indices_k, cu_seqlens_k, max_seqlen_k, seqused_k = unpad_input(
            k, key_padding_mask, key_unused_mask
        )
        v_unpad = unpad_input(v, key_padding_mask, key_unused_mask)[0]
        dk_pad_fn = _pad_indices(indices_k, batch_size, seqlen_k)
    else:
        k_unpad = k.reshape(-1, nheads_k, d)
        v_unpad = v.reshape(-1, nheads_k, d_v)
        cu_seqlens_k = torch.arange(
            0, (batch_size + 1) * seqlen_k, step=seqlen_k, dtype=torch.int32, device=k.device
        )
        max_seqlen_k = seqlen_k
        dk_pad_fn = _pad_rows(batch_size)

    def leaf(t: Tensor) -> Tensor:
        return t.detach().requires_grad_()

    if qkvpacked:
        qkv_unpad = torch.stack([q_unpad, k_unpad, v_unpad], dim=1)
        qkv = torch.stack([q, k, v], dim=2)
        # one padding for queries and keys: the query layout pads dqkv
        return leaf(qkv_unpad), cu_seqlens_q, max_seqlen_q, leaf(qkv), output_pad_fn, output_pad_fn
    if kvpacked:
        kv_unpad = torch.stack([k_unpad, v_unpad], dim=1)
        kv = torch.stack([k, v], dim=2)
        return (
            leaf(q_unpad),
            leaf(kv_unpad),
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            leaf(q),
            leaf(kv),
            output_pad_fn,
            output_pad_fn,
            dk_pad_fn,
        )
    return (
        leaf(q_unpad),
        leaf(k_unpad),
        leaf(v_unpad),
        qv_unpad.detach() if qv_unpad is not None else None,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_q,
        seqused_k,
        max_seqlen_q,
        max_seqlen_k,
        leaf(q),
        leaf(k),
        leaf(v),
        qv.detach() if qv is not None else None,
        output_pad_fn,
        output_pad_fn,
        dk_pad_fn,
    )


# ------------------------------------------------------------------------------------------ masks
def _mask_coordinates(
    seqlen_q: int,
    seqlen_k: int,
    query_padding_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    key_leftpad: Tensor | None,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor, Tensor, int | Tensor]:
    """``(row, col, sk, sq)``: query rows (seqlen_q, 1); key positions (seqlen_k,), or (batch, 1, 1,
    seqlen_k) counted from ``key_leftpad`` (left-padding slots at a far position); the key lengths as a
    tensor broadcastable to ``col`` (seqlen_k without a key padding mask, else (batch, 1, 1, 1)); the query
    lengths (seqlen_q, or (batch, 1, 1, 1))."""
    row = torch.arange(seqlen_q, device=device, dtype=torch.long).unsqueeze(-1)
    col = torch.arange(seqlen_k, device=device, dtype=torch.long)
    if key_leftpad is not None:
        leftpad = key_leftpad.reshape(-1, 1, 1, 1)
        col = col.expand(leftpad.shape[0], 1, 1, seqlen_k)
        col = torch.where(col >= leftpad, col - leftpad, _FAR)
    if key_padding_mask is None:
        sk = torch.full_like(col, seqlen_k)
    else:
        sk = key_padding_mask.sum(-1).reshape(-1, 1, 1, 1)
    sq: int | Tensor = (
        seqlen_q if query_padding_mask is None else query_padding_mask.sum(-1).reshape(-1, 1, 1, 1)
    )
    return row, col, sk, sq


def construct_local_mask(
    seqlen_q: int,
    seqlen_k: int,
    window_size: tuple[int | None, int | None] = (None, None),
    sink_token_length: int = 0,
    query_padding_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    key_leftpad: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The sliding-window mask, True where key ``j`` is masked out for query ``i``.

    With ``d = i + sk - sq`` (``sk`` / ``sq``: the sequence's key / query length, from the padding masks, else
    ``seqlen_k`` / ``seqlen_q``) and ``window_size = (left, right)``, key ``j`` (counted from ``key_leftpad``
    when given) is masked when ``j > d + right`` or ``j < d - left``; the first ``sink_token_length`` keys
    are exempt from the left limit. With a left limit, keys beyond the sequence (``j > sk``) are masked too.
    A None side has no limit.

    Arguments:
        seqlen_q, seqlen_k: padded lengths.
        window_size: (left, right), each an int or None.
        sink_token_length: number of leading keys always visible on the left.
        query_padding_mask: (batch, seqlen_q) bool or None; key_padding_mask: (batch, seqlen_k) bool or None.
        key_leftpad: (batch,) int or None, the number of left-padding slots of each sequence's keys.
        device: of the mask.
    Return:
        (seqlen_q, seqlen_k) bool, or (batch, 1, seqlen_q, seqlen_k) with a padding mask or ``key_leftpad``.
    """
    left, right = window_size
    row, col, sk, sq = _mask_coordinates(
        seqlen_q, seqlen_k, query_padding_mask, key_padding_mask, key_leftpad, device
    )
    diag = row + sk - sq
    if left is None:
        if right is None:
            return torch.zeros_like(diag + col, dtype=torch.bool)
        return col > diag + right
    right_limit = sk if right is None else torch.minimum(diag + right, sk)
    beyond_left = (col < diag - left) & (col >= sink_token_length)
    return (col > right_limit) | beyond_left


def construct_chunk_mask(
    seqlen_q: int,
    seqlen_k: int,
    attention_chunk: int,
    query_padding_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    key_leftpad: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The chunked-attention mask, True where key ``j`` is masked out for query ``i``: keys are split into
    chunks of ``attention_chunk`` positions and query ``i`` sees only the chunk holding its key position
    ``d = i + sk - sq`` (``j`` in ``[d - d mod attention_chunk, that + attention_chunk)``, floor modulo).

    Arguments:
        seqlen_q, seqlen_k: padded lengths.
        attention_chunk: chunk length, > 0.
        query_padding_mask, key_padding_mask, key_leftpad, device: as in :func:`construct_local_mask`.
    Return:
        (seqlen_q, seqlen_k) bool, or (batch, 1, seqlen_q, seqlen_k) with a padding mask or ``key_leftpad``.
    """
    if attention_chunk <= 0:
        raise ValueError(f"attention_chunk must be > 0, got {attention_chunk}")
    row, col, sk, sq = _mask_coordinates(
        seqlen_q, seqlen_k, query_padding_mask, key_padding_mask, key_leftpad, device
    )
    diag = row + sk - sq
    chunk_start = diag - torch.remainder(diag, attention_chunk)
    return (col < chunk_start) | (col >= chunk_start + attention_chunk)


# -------------------------------------------------------------------------------------- reference
def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when a tensor is float64, else float32."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _descale(t: Tensor, scale: Tensor) -> Tensor:
    """``t * scale`` (``scale`` broadcastable, per (batch, head)) computed at least in float32, in ``t``'s
    dtype."""
    wide = torch.promote_types(t.dtype, torch.float32)
    return (t.to(wide) * scale.to(wide)).to(t.dtype)


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_padding_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    key_leftpad: Tensor | None = None,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
    causal: bool = False,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    window_size: tuple[int | None, int | None] = (None, None),
    attention_chunk: int = 0,
    sink_token_length: int = 0,
    learnable_sink: Tensor | None = None,
    softcap: float = 0.0,
    upcast: bool = True,
    reorder_ops: bool = False,
    intermediate_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference attention ``softmax(q k^T * scale + masks + bias) v``.

    The scale is ``1 / sqrt(d)``, or ``1 / sqrt(d + d_v)`` with ``qv`` (whose ``qv v^T`` term is added to the
    scores). In order: scores (``softcap > 0``: ``softcap * tanh(scores / softcap)``), key padding, the
    window (``causal`` sets its right side to 0) and chunk masks, ``attn_bias``, the softmax (with a learnable
    sink: an extra logit ``learnable_sink[h]`` in each row's normalizer, without a value), zeros for padded
    queries, padded keys and fully masked rows, ``dropout_mask`` (False drops) and the ``1 / (1 -
    dropout_p)`` scaling of ``v`` (applied whenever ``dropout_p > 0``, with or without a mask), the product
    with ``v`` and zeros at padded queries.

    Arguments:
        q: (batch_size, seqlen_q, nheads, head_dim)
        k: (batch_size, seqlen_k, nheads_k, head_dim), nheads divisible by nheads_k (GQA / MQA).
        v: (batch_size, seqlen_k, nheads_k, head_dim_v)
        query_padding_mask: (batch_size, seqlen_q) bool or None.
        key_padding_mask: (batch_size, seqlen_k) bool or None.
        key_leftpad: (batch_size,) int or None, left-padding slots of the keys for the window / chunk masks.
        attn_bias: broadcastable to (batch_size, nheads, seqlen_q, seqlen_k), added to the scores.
        dropout_p: in [0, 1).
        dropout_mask: (batch_size, nheads, seqlen_q, seqlen_k) bool or None.
        causal: right window side 0.
        qv: (batch_size, seqlen_q, nheads, head_dim_v) or None.
        q_descale / k_descale / v_descale: (batch_size, nheads_k) or None, multiplied into q (per kv head's
            group) / k / v first, the results kept in the inputs' dtypes.
        window_size: (left, right), None for an unbounded side.
        attention_chunk: chunk length of chunked attention, 0 for none.
        sink_token_length: leading keys exempt from the window's left limit.
        learnable_sink: (nheads,) or None.
        softcap: 0 for none.
        upcast: compute in float32 (float64 for float64 inputs) and return in q's dtype; False computes in the
            inputs' dtype.
        reorder_ops: scale k instead of q (the same math, another rounding).
        intermediate_dtype: round the attention probabilities through this dtype before the product with v.
    Return:
        output: (batch_size, seqlen_q, nheads, head_dim_v), in q's dtype.
        attention: (batch_size, nheads, seqlen_q, seqlen_k), the probabilities before dropout, in q's dtype.
    """
    _, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"q's heads ({nheads}) must be a multiple of k's ({nheads_k})")
    if v.shape[:3] != k.shape[:3] or q.shape[0] != k.shape[0] or k.shape[-1] != d:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected (b, sq, h, d), (b, sk, hk, d), "
            "(b, sk, hk, dv)"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if causal:
        window_size = (window_size[0], 0)
    dtype_og = q.dtype
    if upcast:
        dtype = _compute_dtype(q, k, v, qv)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        qv = qv.to(dtype) if qv is not None else None
    groups = nheads // nheads_k
    if q_descale is not None:
        q_scale = q_descale.repeat_interleave(groups, dim=1)[:, None, :, None]
        q = _descale(q, q_scale)
        qv = _descale(qv, q_scale) if qv is not None else None
    if k_descale is not None:
        k = _descale(k, k_descale[:, None, :, None])
    if v_descale is not None:
        v = _descale(v, v_descale[:, None, :, None])
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    d_v = v.shape[-1]
    softmax_scale = 1.0 / math.sqrt(d if qv is None else d + d_v)
    if not reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q * softmax_scale, k)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q, k * softmax_scale)
    if qv is not None:
        scores = scores + torch.einsum("bthd,bshd->bhts", qv * softmax_scale, v)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    local_mask: Tensor | None = None
    if window_size[0] is not None or window_size[1] is not None:
        local_mask = construct_local_mask(
            seqlen_q,
            seqlen_k,
            window_size,
            sink_token_length,
            query_padding_mask,
            key_padding_mask,
            key_leftpad=key_leftpad,
            device=q.device,
        )
    if attention_chunk > 0:
        chunk_mask = construct_chunk_mask(
            seqlen_q,
            seqlen_k,
            attention_chunk,
            query_padding_mask,
            key_padding_mask,
            key_leftpad=key_leftpad,
            device=q.device,
        )
        local_mask = chunk_mask if local_mask is None else local_mask | chunk_mask
    if local_mask is not None:
        scores = scores.masked_fill(local_mask, float("-inf"))
    if attn_bias is not None:
        scores = scores + attn_bias
    if learnable_sink is None:
        attention = torch.softmax(scores, dim=-1).to(v.dtype)
    else:
        wide = torch.promote_types(scores.dtype, torch.float32)
        logits = scores.to(wide)
        sink = learnable_sink.to(wide).reshape(-1, 1, 1)
        row_max = torch.maximum(torch.amax(logits, dim=-1, keepdim=True), sink)
        unnormalized = torch.exp(logits - row_max)
        normalizer = unnormalized.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max)
        attention = (unnormalized / normalizer).to(v.dtype)
    # zeros, not NaN, for padded queries / keys and fully masked rows (NaN would reach dv)
    if query_padding_mask is not None:
        attention = attention.masked_fill(~query_padding_mask[:, None, :, None], 0.0)
    if key_padding_mask is not None:
        attention = attention.masked_fill(~key_padding_mask[:, None, None, :], 0.0)
    if local_mask is not None:
        attention = attention.masked_fill(local_mask.all(dim=-1, keepdim=True), 0.0)
    attention_drop = attention.masked_fill(~dropout_mask, 0.0) if dropout_mask is not None else attention
    if intermediate_dtype is not None:
        attention_drop = attention_drop.to(intermediate_dtype).to(attention_drop.dtype)
    output = torch.einsum("bhts,bshd->bthd", attention_drop, v * (1.0 / (1.0 - dropout_p)))
    if query_padding_mask is not None:
        output = output.masked_fill(~query_padding_mask[:, :, None, None], 0.0)
    return output.to(dtype=dtype_og), attention.to(dtype=dtype_og)
