"""Host side of the backward: validate, allocate, launch (flash-attn's ``_flash_attn_backward`` semantics).

:func:`flash_attn_backward` and :func:`flash_attn_varlen_backward` take the forward's ``out``, ``softmax_lse``
and ``rng_state`` and write dq, dk, dv into caller-provided tensors when given (any strides with a contiguous
last dim, e.g. slices of a packed ``dqkv``), else into new ones.

This module checks the inputs; the argument preparation and checks of programmable / block-sparse attention
live in :mod:`fa_backward.sparse_args`, the kernel launches in :mod:`fa_backward.launch` (both re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fa_backward.sparse_args import _sparse_args as _sparse_args  # re-exported (was defined here)
from fa_backward.sparse_args import check_full_blocks as check_full_blocks  # re-exported
from fa_backward.sparse_args import check_programmable
from fa_core import validation as V
from fa_core.block_sparse import BlockMask, as_block_mask

__all__ = ["BwdResult", "backward_from_autograd", "flash_attn_backward", "flash_attn_varlen_backward"]


class BwdResult(NamedTuple):
    """``dq, dk, dv`` (the tensors written) and ``softmax_d`` = rowsum(dout * out), float32, laid out like the
    lse: ``(batch, nheads, seqlen_q)`` dense, ``(nheads, total_q)`` varlen. flash-attn's
    ``_flash_attn_backward`` returns only ``softmax_d``; use ``.softmax_d`` for that."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    softmax_d: torch.Tensor


_LAUNCH: list[Callable[..., torch.Tensor]] = []


def _launcher() -> Callable[..., torch.Tensor]:
    """:func:`fa_backward.launch._launch`, imported at the first launch (it imports Triton and the kernels)."""
    if not _LAUNCH:
        from fa_backward.launch import _launch as launch

        _LAUNCH.append(launch)
    return _LAUNCH[0]


def _launch(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _launcher()(*args, **kwargs)


def _check_qkv(q, k, v, varlen: bool) -> None:
    """fa_core's check; float64 is also accepted on CPU under the interpreter (for float64 gradcheck)."""
    if (
        isinstance(q, torch.Tensor)
        and q.dtype == torch.float64
        and q.device.type == "cpu"
        and V.interpreting()
        and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == "cpu"
            for t in (k, v)
        )
    ):
        meta = [
            torch.empty_strided(t.shape, t.stride(), dtype=torch.float16, device="meta") for t in (q, k, v)
        ]
        V.check_qkv(meta[0], meta[1], meta[2], varlen=varlen)
        return
    V.check_qkv(q, k, v, varlen=varlen)


def _check_like(name: str, t, shape, dtype, device, optional: bool = False) -> None:
    if t is None and optional:
        return
    V.check_tensor(name, t, len(shape))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: all tensors must share a device")
    V.check_last_dim_contiguous(name, t)


def _common(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    window,
    softcap,
    rng_state,
    varlen,
    lse_shape,
):
    _check_qkv(q, k, v, varlen)
    V.check_window(window)
    V.check_scalars(dropout_p, softcap, softmax_scale)
    o_shape = (*q.shape[:-1], v.shape[-1])
    _check_like("dout", dout, o_shape, q.dtype, q.device)
    _check_like("out", out, o_shape, q.dtype, q.device)
    _check_like("dq", dq, q.shape, q.dtype, q.device, optional=True)
    _check_like("dk", dk, k.shape, q.dtype, q.device, optional=True)
    _check_like("dv", dv, v.shape, q.dtype, q.device, optional=True)
    V.check_tensor("softmax_lse", softmax_lse, len(lse_shape))
    if tuple(softmax_lse.shape) != tuple(lse_shape) or softmax_lse.dtype != torch.float32:
        raise ValueError(
            f"softmax_lse must be a float32 tensor of shape {tuple(lse_shape)} (as the forward returns it), "
            f"got {softmax_lse.dtype} {tuple(softmax_lse.shape)}"
        )
    V.check_device("softmax_lse", softmax_lse, "q", q)
    if dropout_p > 0:
        if rng_state is None:
            raise ValueError("dropout_p > 0 needs the forward's rng_state to regenerate the dropout mask")
        V.check_tensor("rng_state", rng_state, 1)
        if rng_state.numel() != 2 or rng_state.dtype != torch.int64:
            raise ValueError("rng_state must be an int64 tensor [seed, offset] as returned by the forward")
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    rng_state: torch.Tensor | None = None,
    attention_chunk: int = 0,
    score_mod: Callable[..., Any] | None = None,
    score_mod_grad: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    block_mask: BlockMask | None = None,
    dsoftmax_lse: torch.Tensor | None = None,
) -> BwdResult:
    """Dense attention backward (argument order of flash-attn 2.8's ``_flash_attn_backward``).

    Args:
        dout, out: ``(batch, seqlen_q, nheads, headdim_v)``; q ``(batch, seqlen_q, nheads, headdim)``;
            k ``(batch, seqlen_k, nheads_k, headdim)``; v ``(batch, seqlen_k, nheads_k, headdim_v)``.
        softmax_lse: the forward's float32 ``(batch, nheads, seqlen_q)`` (+inf for rows with no visible key).
        dq, dk, dv: optional outputs shaped like q, k, v (any strides with a contiguous last dim); allocated
            when None.
        rng_state: the forward's ``[seed, offset]``; required when ``dropout_p > 0``.
        deterministic: accepted for compatibility: the kernels never use atomics, so the result is always
            bitwise reproducible.
        attention_chunk, mask_mod, block_mask: as the forward's (they must match the forward's). Block-sparse:
            only listed blocks are loaded; ``full_kv_*`` blocks skip ``mask_mod``.
        score_mod: the forward's ``score_mod``; ``score_mod_grad(score, b, h, q_idx, kv_idx)`` (``@triton.jit``,
            required with it) returns ``d score_mod(score, ...) / d score`` at the unmodified score (natural-log
            units, after scale, softcap and ALiBi).
        dsoftmax_lse: gradient of the lse output, shaped like ``softmax_lse`` (None = not differentiated).
        Other arguments: as the forward's (causal is bottom-right aligned; -1 = unbounded window side).

    Returns:
        :class:`BwdResult` ``(dq, dk, dv, softmax_d)``.
    """
    dout, q, k, v, out = (V.contig_last(t) for t in (dout, q, k, v, out))
    window = (window_size_left, window_size_right)
    V.check_tensor("q", q, 4)
    batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
    softmax_scale = _common(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        dropout_p,
        softmax_scale,
        window,
        softcap,
        rng_state,
        False,
        (batch, nheads, seqlen_q),
    )
    V.check_alibi(alibi_slopes, batch, nheads, q)
    check_programmable(
        attention_chunk, score_mod, score_mod_grad, mask_mod, dsoftmax_lse, (batch, nheads, seqlen_q), q
    )
    # full-block lists exactly like the partial ones (fa_backward.sparse_args.check_full_blocks)
    block_mask = as_block_mask(
        block_mask, batch, nheads, seqlen_q, k.shape[1], causal=causal, window_size=window,
        attention_chunk=int(attention_chunk), mask_mod=mask_mod,
    )  # fmt: skip
    V.check_block_mask(block_mask, batch, nheads, seqlen_q, k.shape[1], q, False, full_like_partial=True)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if batch == 0 or nheads == 0:
        return BwdResult(dq, dk, dv, torch.zeros_like(softmax_lse))
    delta = _launch(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        varlen=False,
        batch=batch,
        max_seqlen_q=seqlen_q,
        max_seqlen_k=k.shape[1],
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        seqused_k=None,
        softmax_scale=softmax_scale,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        score_mod=score_mod,
        score_mod_grad=score_mod_grad,
        mask_mod=mask_mod,
        block_mask=block_mask,
        dsoftmax_lse=dsoftmax_lse,
    )
    return BwdResult(dq, dk, dv, delta)


def flash_attn_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    rng_state: torch.Tensor | None = None,
    zero_tensors: bool = False,
    seqused_k: torch.Tensor | None = None,
    attention_chunk: int = 0,
    score_mod: Callable[..., Any] | None = None,
    score_mod_grad: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    dsoftmax_lse: torch.Tensor | None = None,
) -> BwdResult:
    """Varlen backward (argument order of flash-attn 2.8's ``_flash_attn_varlen_backward``).

    Args:
        dout, out ``(total_q, nheads, headdim_v)``; q ``(total_q, nheads, headdim)``; k, v ``(total_k, nheads_k, .)``.
        softmax_lse: float32 ``(nheads, total_q)``. cu_seqlens_*: int32 ``(batch + 1,)``.
        zero_tensors: zero dq/dk/dv first (flash-attn's flag; every row is written anyway, so it only matters
            for rows outside every sequence, which then read 0 instead of their previous content).
        seqused_k: extension (forward's argument): sequence b uses its first ``seqused_k[b]`` keys; the other
            keys get a zero gradient.
        attention_chunk, score_mod, score_mod_grad, mask_mod, dsoftmax_lse: as :func:`flash_attn_backward`
            (``q_idx`` / ``kv_idx`` relative to the start of each sequence; ``dsoftmax_lse (nheads, total_q)``).
        Other arguments: as :func:`flash_attn_backward`.

    Returns:
        :class:`BwdResult` ``(dq, dk, dv, softmax_d)`` with ``softmax_d (nheads, total_q)``.
    """
    dout, q, k, v, out = (V.contig_last(t) for t in (dout, q, k, v, out))
    window = (window_size_left, window_size_right)
    V.check_tensor("q", q, 3)
    nheads = q.shape[1]
    softmax_scale = _common(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        dropout_p,
        softmax_scale,
        window,
        softcap,
        rng_state,
        True,
        (nheads, q.shape[0]),
    )
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q, max_seqlen_q, "max_seqlen_q")
    batch_k = V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q, max_seqlen_k, "max_seqlen_k")
    if batch_k != batch:
        raise ValueError(f"cu_seqlens_k has {batch_k + 1} entries but cu_seqlens_q has {batch + 1}")
    V.check_seqused(seqused_k, batch, cu_seqlens_k, q)
    V.check_alibi(alibi_slopes, batch, nheads, q)
    check_programmable(
        attention_chunk, score_mod, score_mod_grad, mask_mod, dsoftmax_lse, (nheads, q.shape[0]), q
    )
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if zero_tensors:
        dq.zero_()
        dk.zero_()
        dv.zero_()
    if batch == 0 or nheads == 0 or (max_seqlen_q == 0 and max_seqlen_k == 0):
        return BwdResult(dq, dk, dv, torch.zeros_like(softmax_lse))
    delta = _launch(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        varlen=True,
        batch=batch,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        score_mod=score_mod,
        score_mod_grad=score_mod_grad,
        mask_mod=mask_mod,
        dsoftmax_lse=dsoftmax_lse,
    )
    return BwdResult(dq, dk, dv, delta)


def backward_from_autograd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    varlen: tuple[torch.Tensor, torch.Tensor, int, int] | None,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    rng_state: torch.Tensor,
    seqused_k: torch.Tensor | None = None,
    attention_chunk: int = 0,
    score_mod: Callable[..., Any] | None = None,
    score_mod_grad: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    block_mask: BlockMask | None = None,
    dsoftmax_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The backward of the autograd layer (:mod:`fa_backward.autograd`): no input checks (q, k, v, out, lse,
    rng_state and the options are the ones the forward checked and saved; autograd hands ``dout`` with
    ``out``'s shape, dtype and device), only the last-dim layout of ``dout``. Host time matters here: at short
    sequences a training step waits on it. ``varlen``: ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k)``. Writes dq, dk, dv; returns ``softmax_d`` laid out like the lse."""
    dout = V.contig_last(dout)
    if varlen is None:
        batch, max_q, max_k = q.shape[0], q.shape[1], k.shape[1]
        cu_q = cu_k = None
    else:
        cu_q, cu_k, max_q, max_k = varlen
        batch = cu_q.shape[0] - 1
    if batch == 0 or q.shape[-2] == 0 or (max_q == 0 and max_k == 0):
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return torch.zeros_like(softmax_lse)
    launch = _LAUNCH[0] if _LAUNCH else _launcher()  # called directly: one call layer less per backward
    return launch(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, varlen=varlen is not None, batch=batch,
        max_seqlen_q=max_q, max_seqlen_k=max_k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused_k,
        softmax_scale=softmax_scale, causal=causal, window=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state, attention_chunk=attention_chunk,
        score_mod=score_mod, score_mod_grad=score_mod_grad, mask_mod=mask_mod, block_mask=block_mask,
        dsoftmax_lse=dsoftmax_lse,
    )  # fmt: skip
