"""flash-attn's compiled extension ``flash_attn_2_cuda`` on the Flash Attention Plus kernels, bound as
:data:`flash_attn.flash_attn_interface.flash_attn_gpu` (flash-attn 2.8: ``import flash_attn_2_cuda as
flash_attn_gpu``).

The raw entry points ``fwd``, ``bwd``, ``varlen_fwd``, ``varlen_bwd`` and ``fwd_kvcache`` take the extension's
positional argument lists and return its lists of tensors; each is a view of the low-level function that
computes it (:mod:`flash_attn._lowlevel`, :func:`flash_attn.flash_attn_interface.flash_attn_with_kvcache`):

* ``fwd(q, k, v, out, alibi_slopes, p_dropout, softmax_scale, is_causal, window_size_left,
  window_size_right, softcap, return_softmax, gen)`` -> ``[out, softmax_lse, S_dmask, rng_state]``;
* ``varlen_fwd(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table, alibi_slopes,
  max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
  window_size_right, softcap, return_softmax, gen[, num_splits])`` -> ``[out, softmax_lse, S_dmask,
  rng_state]``;
* ``bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, alibi_slopes, p_dropout, softmax_scale, is_causal,
  window_size_left, window_size_right, softcap, deterministic, gen, rng_state)`` -> ``[dq, dk, dv,
  softmax_d]``;
* ``varlen_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
  max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
  window_size_right, softcap, deterministic, gen, rng_state)`` -> ``[dq, dk, dv, softmax_d]``;
* ``fwd_kvcache(q, kcache, vcache, k, v, seqlens_k, rotary_cos, rotary_sin, cache_batch_idx, leftpad_k,
  block_table, alibi_slopes, out, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
  is_rotary_interleaved, num_splits)`` -> ``[out, softmax_lse]``.

Both arities of the extension are accepted: flash-attn 2.8.3's ``varlen_fwd`` takes 21 arguments, the main
branch's 22 (a trailing ``num_splits``, default 0 here); the other entry points have the same arity in both.
As in the extension:

* ``out`` / ``dq`` / ``dk`` / ``dv``, when given, are written in place and returned (checked first: shape,
  dtype and device must match); ``None`` allocates.
* ``gen`` (the RNG generator slot, main: ``unused_generator_compat``) must be ``None``: anything else raises
  ``RuntimeError`` ("the RNG `generator` argument is no longer supported") before any other check.
* every argument error is a ``RuntimeError``: :class:`~fa_core.errors.FlashAttnValueError` for values,
  :class:`FlashAttnTypeError` for types and dtypes (also catchable as ``ValueError`` / ``TypeError``).
* ``zero_tensors``, ``seqused_k``, ``leftpad_k``, ``block_table``, ``alibi_slopes``, the window, ``softcap``
  and dropout mean what they mean in the low-level functions (dropout: the forward's ``rng_state`` replays
  the mask in the backward).

Differences from the extension (supersets unless said otherwise):

* ``rng_state`` is the CPU int64 ``[seed, offset]`` pair of the low-level functions (the extension's is a
  CUDA tensor); dropout seeds come from torch's default generator. The extension of 2.8.3 took a CUDA
  ``torch.Generator`` in ``gen``; it is refused here, as in flash-attn's main branch.
* ``bwd`` / ``varlen_bwd`` with dropout need the forward's ``rng_state`` (the extension draws fresh seeds
  without it, i.e. a mask unrelated to the forward's); ``None`` raises.
* ``return_softmax`` also works without dropout (the extension refuses it); ``S_dmask`` is flash-attn's form.
* the dtypes, head dims and layouts of the low-level functions (fp32 on CPU, head dims 1..256, v's head
  dim may differ from q's, paged varlen page sizes); ``out`` may have any strides (it receives a copy of
  the result); ``fwd_kvcache``'s ``seqlens_k`` may also be an int.
* ``num_splits`` is a hint: the dense and varlen forwards never split (``varlen_fwd`` with a
  ``block_table`` refuses ``num_splits > 1``, as the extension); ``fwd_kvcache`` passes it on.
* the arguments may also be passed by keyword (the extension's are positional only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from fa_core.errors import FlashAttnValueError
from flash_attn import _lowlevel

__all__ = ["FlashAttnTypeError", "bwd", "fwd", "fwd_kvcache", "varlen_bwd", "varlen_fwd"]

Tensor = torch.Tensor
_F = TypeVar("_F", bound=Callable[..., Any])

#: the extension's message for a non-None generator slot (flash-attn main, ``TORCH_CHECK``); the tail
#: describes where dropout's seeds come from here
GENERATOR_MESSAGE = (
    "flash-attn: the RNG `generator` argument is no longer supported and must be None; dropout (when "
    "enabled) draws its seed from torch's default generator."
)


class FlashAttnTypeError(TypeError, RuntimeError):
    """A bad argument type or dtype. Catchable as ``TypeError`` and as ``RuntimeError`` (the extension's
    ``TORCH_CHECK``)."""


def _torch_check(fn: _F) -> _F:
    """Re-raise the ``ValueError`` / ``TypeError`` of the low-level checks as their ``RuntimeError``
    subclasses (:class:`FlashAttnValueError`, :class:`FlashAttnTypeError`), as the extension reports them."""

    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError:
            raise
        except ValueError as e:
            raise FlashAttnValueError(str(e)) from e
        except TypeError as e:
            raise FlashAttnTypeError(str(e)) from e

    return cast(_F, entry)


def _check_generator(gen: object) -> None:
    if gen is not None:
        raise FlashAttnValueError(GENERATOR_MESSAGE)


def _check_buffer(name: str, t: object, shape: tuple[int, ...] | None, like: object) -> None:
    """An output buffer given by the caller: a tensor of ``shape`` with ``like``'s dtype and device (``shape``
    None or ``like`` not a tensor: the low-level checks report the malformed input)."""
    if t is None or shape is None or not isinstance(like, Tensor):
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise FlashAttnValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {like.dtype} (the inputs' dtype)")
    if t.device != like.device:
        raise FlashAttnValueError(f"{name} is on {t.device} but q is on {like.device}")


def _out_shape(q: object, v: object) -> tuple[int, ...] | None:
    """The attention output's shape: q's with v's head dim (None when either is not a tensor)."""
    if not isinstance(q, Tensor) or not isinstance(v, Tensor) or q.dim() == 0 or v.dim() == 0:
        return None
    return (*q.shape[:-1], v.shape[-1])


def _into(buffer: Tensor | None, result: Tensor) -> Tensor:
    """``result`` written into the caller's ``buffer`` (returned), or ``result`` when there is none."""
    if buffer is None or buffer is result:
        return result
    return buffer.copy_(result)


def _grad_buffer(name: str, t: Tensor | None, like: object) -> Tensor | None:
    """A gradient output: the caller's (checked against ``like``), or a fresh contiguous one."""
    if not isinstance(like, Tensor):
        return t
    _check_buffer(name, t, tuple(like.shape), like)
    return like.new_empty(like.shape) if t is None else t


@_torch_check
def fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor | None,
    alibi_slopes: Tensor | None,
    p_dropout: float,
    softmax_scale: float,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    return_softmax: bool,
    gen: object,
) -> list[Tensor]:
    """Dense forward (``mha_fwd``) -> ``[out, softmax_lse (b, h, sq) fp32, S_dmask, rng_state]``."""
    _check_generator(gen)
    _check_buffer("out", out, _out_shape(q, v), q)
    res, lse, s_dmask, rng_state = _lowlevel._flash_attn_forward(
        q, k, v, p_dropout, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
        alibi_slopes, return_softmax,
    )  # fmt: skip
    return [_into(out, res), lse, s_dmask, rng_state]


@_torch_check
def varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    seqused_k: Tensor | None,
    leftpad_k: Tensor | None,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    p_dropout: float,
    softmax_scale: float,
    zero_tensors: bool,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    return_softmax: bool,
    gen: object,
    num_splits: int = 0,
) -> list[Tensor]:
    """Varlen forward (``mha_varlen_fwd``; 21 arguments as in flash-attn 2.8.3, or 22 with main's trailing
    ``num_splits``) -> ``[out, softmax_lse (h, total_q) fp32, S_dmask, rng_state]``."""
    _check_generator(gen)
    _check_buffer("out", out, _out_shape(q, v), q)
    res, lse, s_dmask, rng_state = _lowlevel._flash_attn_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, is_causal,
        window_size_left, window_size_right, softcap, alibi_slopes, return_softmax, block_table, leftpad_k,
        seqused_k, zero_tensors, num_splits=num_splits,
    )  # fmt: skip
    return [_into(out, res), lse, s_dmask, rng_state]


@_torch_check
def bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    alibi_slopes: Tensor | None,
    p_dropout: float,
    softmax_scale: float,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    deterministic: bool,
    gen: object,
    rng_state: Tensor | None,
) -> list[Tensor]:
    """Dense backward (``mha_bwd``) -> ``[dq, dk, dv, softmax_d (b, h, round128(sq)) fp32]``. Needs
    fa-backward."""
    _check_generator(gen)
    dq, dk, dv = _grad_buffer("dq", dq, q), _grad_buffer("dk", dk, k), _grad_buffer("dv", dv, v)
    softmax_d = _lowlevel._flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, p_dropout, softmax_scale, is_causal, window_size_left,
        window_size_right, softcap, alibi_slopes, deterministic, rng_state,
    )  # fmt: skip
    return [cast(Tensor, dq), cast(Tensor, dk), cast(Tensor, dv), softmax_d]


@_torch_check
def varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    alibi_slopes: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    p_dropout: float,
    softmax_scale: float,
    zero_tensors: bool,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    deterministic: bool,
    gen: object,
    rng_state: Tensor | None,
) -> list[Tensor]:
    """Varlen backward (``mha_varlen_bwd``) -> ``[dq, dk, dv, softmax_d (h, total_q + 128 * b) fp32]``. Needs
    fa-backward."""
    _check_generator(gen)
    dq, dk, dv = _grad_buffer("dq", dq, q), _grad_buffer("dk", dk, k), _grad_buffer("dv", dv, v)
    softmax_d = _lowlevel._flash_attn_varlen_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        p_dropout, softmax_scale, is_causal, window_size_left, window_size_right, softcap, alibi_slopes,
        deterministic, rng_state, zero_tensors,
    )  # fmt: skip
    return [cast(Tensor, dq), cast(Tensor, dk), cast(Tensor, dv), softmax_d]


@_torch_check
def fwd_kvcache(
    q: Tensor,
    kcache: Tensor,
    vcache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    seqlens_k: Tensor | None,
    rotary_cos: Tensor | None,
    rotary_sin: Tensor | None,
    cache_batch_idx: Tensor | None,
    leftpad_k: Tensor | None,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    out: Tensor | None,
    softmax_scale: float,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    is_rotary_interleaved: bool,
    num_splits: int,
) -> list[Tensor]:
    """KV-cache forward (``mha_fwd_kvcache``): appends ``k`` / ``v`` into ``kcache`` / ``vcache`` in place at
    ``seqlens_k``, then attends -> ``[out, softmax_lse (b, h, sq) fp32]``. Needs fa-kvcache."""
    from flash_attn.flash_attn_interface import flash_attn_with_kvcache

    _check_buffer("out", out, _out_shape(q, vcache), q)
    res, lse = flash_attn_with_kvcache(
        q, kcache, vcache, k, v, rotary_cos, rotary_sin, seqlens_k, cache_batch_idx, leftpad_k, block_table,
        softmax_scale, is_causal, (window_size_left, window_size_right), softcap, is_rotary_interleaved,
        alibi_slopes, num_splits, return_softmax_lse=True,
    )  # fmt: skip
    return [_into(out, res), lse]
