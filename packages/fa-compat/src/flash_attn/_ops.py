"""torch.library custom ops (namespace ``flash_attn_plus``) behind the ``flash_attn`` API.

Why custom ops: ``torch.compile`` treats each op as one opaque node described by its fake (meta)
implementation, so the Triton launches, the host-side validation and the ``.tolist()`` of ``rng_state``
never run under the tracer, and a model calling ``flash_attn_func`` compiles with no graph break.

* ``fwd`` / ``varlen_fwd``: fa-core's forward; outputs ``(out, softmax_lse, S_dmask, rng_state)`` as
  flash-attn 2.8's ``_flash_attn_forward``. Differentiable through ``torch.library.register_autograd``: the
  backward calls ``bwd`` / ``varlen_bwd``, which call fa-backward (absent: :class:`MissingExtraError`).
* ``bwd`` / ``varlen_bwd``: flash-attn's ``_flash_attn_backward`` semantics, writing dq/dk/dv in place
  (``mutates_args``) and returning ``softmax_d``.
* ``kvcache``: fa-kvcache's ``flash_attn_with_kvcache``; mutates ``k_cache`` / ``v_cache`` (the append).

``rng_state`` is the CPU int64 ``[seed, offset]`` pair fa-core draws (on the CPU so that the backward reads it
without a device sync); the fake implementations return a CPU tensor too, so eager and traced graphs agree.
Every call of the compiled graph runs the real op, hence draws a fresh seed: dropout stays random.

This module does not use ``from __future__ import annotations``: ``custom_op`` infers the schema from the
evaluated annotations.
"""

import math
from typing import overload

import torch

import fa_core
from flash_attn import _extras

NS = "flash_attn_plus"
Tensor = torch.Tensor


def round_multiple(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _dmask_shape(batch: int, nheads: int, sq: int, sk: int) -> tuple[int, int, int, int]:
    """flash-attn's ``S_dmask`` shape: ``(b, h, round128(sq), round128(sk))``."""
    return (batch, nheads, round_multiple(sq, 128), round_multiple(sk, 128))


def _softmax_d_shape(q: Tensor) -> tuple[int, int, int]:
    """flash-attn's dense ``softmax_d`` shape: ``(b, h, round128(sq))``."""
    b, sq, h = q.shape[:3]
    return (b, h, round_multiple(sq, 128))


def _varlen_softmax_d_shape(q: Tensor, cu_seqlens_q: Tensor) -> tuple[int, int]:
    """flash-attn's varlen ``softmax_d`` shape: ``(h, total_q + 128 * b)``."""
    return (q.shape[1], q.shape[0] + 128 * (cu_seqlens_q.shape[0] - 1))


def _dmask(
    want: bool, probs: Tensor | None, batch: int, nheads: int, sq: int, sk: int, like: Tensor
) -> Tensor:
    """flash-attn's ``S_dmask`` layout: ``(b, h, round128(sq), round128(sk))`` in q's dtype, or ``(0,)``.

    Entries: the probabilities (normalized, unlike flash-attn's block-scaled ones), dropped entries negated."""
    if not want:
        return like.new_empty((0,))
    s = like.new_zeros(_dmask_shape(batch, nheads, sq, sk))
    if probs is not None:  # None: empty problem, the kernel did not run
        s[:, :, : probs.shape[2], : probs.shape[3]] = probs.to(like.dtype)
    return s


@overload
def _detach(t: Tensor) -> Tensor: ...
@overload
def _detach(t: None) -> None: ...
def _detach(t: Tensor | None) -> Tensor | None:
    # Inside an op the autograd layer is already handled (register_autograd); fa_core's grad_guard must not fire.
    return t.detach() if t is not None else None


# --------------------------------------------------------------------------------------------- forward
@torch.library.custom_op(f"{NS}::fwd", mutates_args=())
def fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    return_softmax: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense forward. q ``(b, sq, h, d)``, k/v ``(b, sk, hk, d[v])`` -> out ``(b, sq, h, dv)``, lse
    ``(b, h, sq)`` fp32, S_dmask, rng_state ``(2,)`` int64 CPU. ``deterministic`` is only kept for the backward."""
    res = fa_core.flash_attn_forward(
        _detach(q), _detach(k), _detach(v), dropout_p, softmax_scale, causal,
        (window_size_left, window_size_right), softcap, _detach(alibi_slopes), return_probs=return_softmax,
    )  # fmt: skip
    b, sq, h = q.shape[:3]
    return res.out, res.lse, _dmask(return_softmax, res.probs, b, h, sq, k.shape[1], q), res.rng_state


@fwd.register_fake
def _fwd_fake(
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    return_softmax,
    deterministic,
):
    b, sq, h = q.shape[:3]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((b, h, sq), dtype=torch.float32)
    if return_softmax:
        s = q.new_empty(_dmask_shape(b, h, sq, k.shape[1]))
    else:
        s = q.new_empty((0,))
    return out, lse, s, torch.empty((2,), dtype=torch.int64, device="cpu")


@torch.library.custom_op(f"{NS}::varlen_fwd", mutates_args=())
def varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    return_softmax: bool,
    seqused_k: Tensor | None,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Varlen forward. q ``(total_q, h, d)``, k/v ``(total_k, hk, d[v])`` -> out ``(total_q, h, dv)``, lse
    ``(h, total_q)`` fp32, S_dmask ``(b, h, round128(max_sq), round128(max_sk))`` or ``(0,)``, rng_state."""
    res = fa_core.flash_attn_varlen_forward(
        _detach(q), _detach(k), _detach(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, (window_size_left, window_size_right), softcap,
        _detach(alibi_slopes), return_probs=return_softmax, seqused_k=seqused_k,
    )  # fmt: skip
    batch = cu_seqlens_q.shape[0] - 1
    s = _dmask(return_softmax, res.probs, batch, q.shape[1], max_seqlen_q, max_seqlen_k, q)
    return res.out, res.lse, s, res.rng_state


@varlen_fwd.register_fake
def _varlen_fwd_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    return_softmax,
    seqused_k,
    deterministic,
):
    h = q.shape[1]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((h, q.shape[0]), dtype=torch.float32)
    if return_softmax:
        batch = cu_seqlens_q.shape[0] - 1
        s = q.new_empty(_dmask_shape(batch, h, max_seqlen_q, max_seqlen_k))
    else:
        s = q.new_empty((0,))
    return out, lse, s, torch.empty((2,), dtype=torch.int64, device="cpu")


# -------------------------------------------------------------------------------------------- backward
@torch.library.custom_op(f"{NS}::bwd", mutates_args=("dq", "dk", "dv"))
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
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    rng_state: Tensor | None,
) -> Tensor:
    """flash-attn's ``_flash_attn_backward``: writes dq/dk/dv, returns softmax_d ``(b, h, round128(sq))`` fp32."""
    fab = _extras.require_backward()
    res = fab.flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size_left,
        window_size_right, softcap, alibi_slopes, deterministic, rng_state,
    )  # fmt: skip
    softmax_d = softmax_lse.new_zeros(_softmax_d_shape(q))
    softmax_d[:, :, : q.shape[1]] = res.softmax_d
    return softmax_d


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, *args):
    return softmax_lse.new_empty(_softmax_d_shape(q))


@torch.library.custom_op(f"{NS}::varlen_bwd", mutates_args=("dq", "dk", "dv"))
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
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    rng_state: Tensor | None,
    zero_tensors: bool,
    seqused_k: Tensor | None,
) -> Tensor:
    """flash-attn's ``_flash_attn_varlen_backward``: returns softmax_d ``(h, total_q + 128 * b)`` fp32."""
    fab = _extras.require_backward()
    res = fab.flash_attn_varlen_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
        deterministic, rng_state, zero_tensors, seqused_k,
    )  # fmt: skip
    softmax_d = softmax_lse.new_zeros(_varlen_softmax_d_shape(q, cu_seqlens_q))
    softmax_d[:, : q.shape[0]] = res.softmax_d
    return softmax_d


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, *args):
    return softmax_lse.new_empty(_varlen_softmax_d_shape(q, cu_seqlens_q))


# -------------------------------------------------------------------------------------------- autograd
def _maybe_contiguous(t: Tensor) -> Tensor:
    return t.contiguous() if t.stride(-1) != 1 else t


def save_dense(ctx, q, k, v, out, lse, rng_state, alibi, dropout_p, scale, causal, left, right, softcap,
               deterministic) -> None:  # fmt: skip
    """Stash what :func:`dense_backward_into` reads (``fwd``'s autograd and the ``FlashAttn*Func`` classes)."""
    ctx.save_for_backward(q, k, v, out, lse, rng_state, alibi)
    ctx.args = (dropout_p, scale, causal, left, right, softcap, deterministic)


def eager_tensors(*tensors: Tensor) -> bool:
    """True for plain tensors outside any tracing. ``torch.compiler.is_compiling()`` covers dynamo only: AOT
    autograd traces the backward afterwards under fake / functional tensor modes, where a Triton launch cannot
    read data pointers; there the custom op must be what gets traced."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and all(type(t) is Tensor for t in tensors)
    )


def dense_backward_into(ctx, dout, dq, dk, dv) -> None:
    """``bwd`` writing dq, dk, dv from what :func:`save_dense` stashed (``dout`` with a contiguous last dim).

    Eager calls skip the custom op (its public checks and flash-attn's padded ``softmax_d``, a memset and a
    copy kernel that autograd discards) when fa-backward has its unchecked autograd entry point; under
    torch.compile the op is what gets traced."""
    fab = _extras.require_backward()
    q, k, v, out, lse, rng_state, alibi = ctx.saved_tensors
    dropout_p, scale, causal, left, right, softcap, deterministic = ctx.args
    direct = getattr(getattr(fab, "backward", None), "backward_from_autograd", None)
    if direct is not None and eager_tensors(dout, q, k, v, out, lse):
        direct(
            dout, q, k, v, out, lse, dq, dk, dv, varlen=None, dropout_p=dropout_p, softmax_scale=scale,
            causal=causal, window_size=(left, right), softcap=softcap, alibi_slopes=alibi, rng_state=rng_state,
        )  # fmt: skip
        return
    torch.ops.flash_attn_plus.bwd(
        dout, q, k, v, out, lse, dq, dk, dv, dropout_p, scale, causal, left, right, softcap, alibi,
        deterministic, rng_state,
    )  # fmt: skip


def save_varlen(ctx, q, k, v, out, lse, rng_state, alibi, cu_q, cu_k, seqused_k, max_q, max_k, dropout_p, scale,
                causal, left, right, softcap, deterministic) -> None:  # fmt: skip
    """Stash what :func:`varlen_backward_into` reads."""
    ctx.save_for_backward(q, k, v, out, lse, rng_state, alibi, cu_q, cu_k, seqused_k)
    ctx.args = (max_q, max_k, dropout_p, scale, causal, left, right, softcap, deterministic)


def varlen_backward_into(ctx, dout, dq, dk, dv, zero_tensors: bool) -> None:
    """``varlen_bwd`` writing dq, dk, dv from what :func:`save_varlen` stashed."""
    _extras.require_backward()
    q, k, v, out, lse, rng_state, alibi, cu_q, cu_k, seqused_k = ctx.saved_tensors
    max_q, max_k, dropout_p, scale, causal, left, right, softcap, deterministic = ctx.args
    torch.ops.flash_attn_plus.varlen_bwd(
        dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, left, right,
        softcap, alibi, deterministic, rng_state, zero_tensors, seqused_k,
    )  # fmt: skip


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, dropout_p, scale, causal, left, right, softcap, alibi, _, deterministic = inputs
    out, lse, _, rng_state = output
    save_dense(
        ctx, q, k, v, out, lse, rng_state, alibi, dropout_p, scale, causal, left, right, softcap, deterministic
    )  # fmt: skip


def _fwd_backward(ctx, dout, dlse, ds, drng):
    # flash-attn ignores gradients flowing into softmax_lse and S_dmask (they are not differentiable outputs).
    _extras.require_backward()
    q, k, v, out = ctx.saved_tensors[:4]
    dout = torch.zeros_like(out) if dout is None else _maybe_contiguous(dout)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dense_backward_into(ctx, dout, dq, dk, dv)
    return (dq, dk, dv) + (None,) * 9


def _varlen_setup_context(ctx, inputs, output) -> None:
    (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, left, right, softcap, alibi, _, seqused_k,
     deterministic) = inputs  # fmt: skip
    out, lse, _, rng_state = output
    save_varlen(
        ctx, q, k, v, out, lse, rng_state, alibi, cu_q, cu_k, seqused_k, max_q, max_k, dropout_p, scale, causal,
        left, right, softcap, deterministic,
    )  # fmt: skip


def _varlen_backward(ctx, dout, dlse, ds, drng):
    _extras.require_backward()
    q, k, v, out = ctx.saved_tensors[:4]
    dout = torch.zeros_like(out) if dout is None else _maybe_contiguous(dout)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # zero_tensors=True: rows of k/v past a sequence's seqused_k (or outside every sequence) get a 0 gradient.
    varlen_backward_into(ctx, dout, dq, dk, dv, True)
    return (dq, dk, dv) + (None,) * 14


torch.library.register_autograd(f"{NS}::fwd", _fwd_backward, setup_context=_fwd_setup_context)
torch.library.register_autograd(f"{NS}::varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context)


# --------------------------------------------------------------------------------------------- kvcache
@torch.library.custom_op(f"{NS}::kvcache", mutates_args=("k_cache", "v_cache"))
def kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    rotary_cos: Tensor | None,
    rotary_sin: Tensor | None,
    cache_seqlens: Tensor | None,
    cache_seqlens_int: int | None,
    cache_batch_idx: Tensor | None,
    cache_leftpad: Tensor | None,
    block_table: Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    rotary_interleaved: bool,
    alibi_slopes: Tensor | None,
    num_splits: int,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """fa-kvcache's ``flash_attn_with_kvcache`` (always returns ``(out (b, sq, h, dv), lse (b, h, sq))``).
    ``cache_seqlens`` is split in a tensor and an int argument because an op schema has no union type.
    ``attention_chunk`` / ``learnable_sink``: fa-kvcache's keyword-only extras (defaults: off)."""
    fak = _extras.require_kvcache()
    seqlens = cache_seqlens if cache_seqlens is not None else cache_seqlens_int
    out, lse = fak.flash_attn_with_kvcache(
        _detach(q), k_cache, v_cache, _detach(k), _detach(v), rotary_cos, rotary_sin, seqlens, cache_batch_idx,
        cache_leftpad, block_table, softmax_scale, causal, (window_size_left, window_size_right), softcap,
        rotary_interleaved, alibi_slopes, num_splits, True, attention_chunk=attention_chunk,
        learnable_sink=_detach(learnable_sink),
    )  # fmt: skip
    return out, lse


@kvcache.register_fake
def _kvcache_fake(q, k_cache, v_cache, *args):
    b, sq, h = q.shape[:3]
    return q.new_empty((b, sq, h, v_cache.shape[-1])), q.new_empty((b, h, sq), dtype=torch.float32)


def default_scale(q: Tensor, softmax_scale: float | None) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
