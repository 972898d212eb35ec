"""The public forward functions: validate, allocate, dispatch (our kernels or another backend), launch.

The functions here are forward-only (not differentiable). fa-backward wraps them in autograd Functions;
fa-compat exposes them under flash-attn's names. The kernel launchers are in :mod:`fa_core.forward_launch`,
the FP8 preparation in :mod:`fa_core.fp8`, the block-sparse kernel arguments in :mod:`fa_core.sparse_args`;
the full-block fields of a block mask are checked by :func:`fa_core.validation.check_block_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fa_core import validation as V
from fa_core.backends import get_forward, get_varlen_forward
from fa_core.block_sparse import BlockMask, as_block_mask

# The launchers (and with them Triton) are imported at the first call, not with fa_core: ``import fa_core``
# costs no Triton import.
__all__ = ["FwdResult", "flash_attn_forward", "flash_attn_varlen_forward", "new_rng_state"]


def __getattr__(name: str) -> Any:
    # seq_bucket: imported from here by fa-backward (its autotune keys match the forward's)
    if name == "seq_bucket":
        from fa_core.forward_configs import seq_bucket

        return seq_bucket
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FwdResult(NamedTuple):
    """``out`` like q; ``lse`` float32 ``(batch, nheads, seqlen_q)`` (dense) or ``(nheads, total_q)``
    (varlen); ``rng_state`` int64 ``(2,)`` CPU tensor ``[seed, offset]`` (zeros without dropout);
    ``probs``: the attention probabilities, dropped entries negated (only when asked for)."""

    out: torch.Tensor
    lse: torch.Tensor
    rng_state: torch.Tensor
    probs: torch.Tensor | None


def new_rng_state(dropout_p: float) -> torch.Tensor:
    """Draw ``[seed, offset]`` from torch's default CPU generator (no device sync; honours manual_seed).

    Kept on the CPU so the backward reads it without synchronising. Under CUDA-graph capture the values
    are baked into the graph, so every replay reuses the same dropout mask.
    """
    if dropout_p <= 0.0:
        return torch.zeros(2, dtype=torch.int64)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    offset = torch.randint(0, 2**31, (1,), dtype=torch.int64)
    return torch.cat([seed, offset])


def _no_extras_on_backend(backend, attention_chunk, *extras) -> None:
    """Beyond-flash-attn-2 features exist only in our kernels: never drop them silently."""
    if attention_chunk or any(e is not None for e in extras):
        raise NotImplementedError(
            f"backend {backend or '$FA_BACKEND'} does not support attention_chunk, learnable_sink, "
            "score_mod / mask_mod, FP8 descales, leftpad_k or block_table"
        )


def _common_checks(q, k, v, out, softmax_scale, window_size, softcap, dropout_p, rng_state, varlen):
    from fa_core.fp8 import out_dtype

    V.check_qkv(q, k, v, varlen=varlen)
    V.check_window(window_size)
    V.check_scalars(dropout_p, softcap, softmax_scale)
    if out is not None:
        V.check_tensor("out", out)
        expected = (*q.shape[:-1], v.shape[-1])
        if tuple(out.shape) != expected or out.dtype != out_dtype(q) or out.device != q.device:
            raise ValueError(f"out must be a {out_dtype(q)} tensor of shape {expected} on {q.device}")
        V.check_last_dim_contiguous("out", out)
    if rng_state is not None:
        V.check_tensor("rng_state", rng_state, 1)
        if rng_state.numel() != 2 or rng_state.dtype != torch.int64:
            raise ValueError("rng_state must be an int64 tensor [seed, offset] as returned by the forward")
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_probs: bool = False,
    out: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
    backend: str | None = None,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
    score_mod: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    block_mask: BlockMask | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> FwdResult:
    """Dense attention forward.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k: ``(batch, seqlen_k, nheads_k, headdim)``;
            v: ``(batch, seqlen_k, nheads_k, headdim_v)``. fp16/bf16 (fp32 on CPU), last dim contiguous.
        dropout_p: dropout probability in [0, 1).
        softmax_scale: defaults to ``headdim ** -0.5``.
        causal: bottom-right aligned causal mask. window_size: ``(left, right)``, -1 = unbounded.
        softcap: ``softcap * tanh(scores / softcap)``; 0 = off.
        alibi_slopes: ``(nheads,)`` or ``(batch, nheads)`` float32.
        return_probs: also return the probabilities (testing only: O(seqlen^2) memory).
        out: optional ``(batch, seqlen_q, nheads, headdim_v)`` output buffer.
        rng_state: reuse a ``[seed, offset]`` pair (to regenerate a dropout mask); default draws a new one.
        backend: ``None`` / ``"triton"`` (ours) or ``"flaggems"`` (``fa-core[flaggems]``); ``None`` reads
            ``$FA_BACKEND``. An unsupported feature on a backend raises; there is no silent fallback.
        attention_chunk: chunked attention (FlashAttention-3's name): a query sees only keys in its own chunk
            of that many positions (bottom-right aligned), combined with causal / window; 0 = off.
        learnable_sink: ``(nheads,)`` one extra logit per head in every row's softmax denominator, none in
            the output (gpt-oss attention sinks); the lse includes it.
        score_mod: a ``@triton.jit`` function ``(score, b, h, q_idx, kv_idx) -> score`` applied to every
            logit (natural-log units, after scale, softcap and ALiBi), FlexAttention-style; forward only.
        mask_mod: a ``@triton.jit`` function ``(b, h, q_idx, kv_idx) -> bool``: keys where it is False are
            masked out (combined with causal / window / chunk); forward only.
        block_mask: :class:`fa_core.block_sparse.BlockMask`, or PyTorch's FlexAttention ``BlockMask``
            (converted by :func:`fa_core.block_sparse.as_block_mask`): only the listed key blocks are loaded
            (dense inputs only; not with ``return_probs``). Its optional full blocks (``full_kv_num_blocks`` /
            ``full_kv_indices``) skip ``mask_mod``; causal / window / chunk still apply in every block.
        q_descale, k_descale, v_descale: ``(batch, nheads_k)`` float32 dequantisation factors for
            ``float8_e4m3fn`` q, k, v (FlashAttention-3's convention; default 1). The output is bf16. V is
            copied keys-last once per call (Hopper's FP8 dot needs a K-major V); P is rounded to e4m3 as
            ``p * 2^8`` (the factor cancels in the normalisation).

    Returns:
        :class:`FwdResult` ``(out, lse (batch, nheads, seqlen_q), rng_state, probs)``.
    """
    V.grad_guard(q, k, v)
    impl = get_forward(backend)
    if impl is not None:
        _no_extras_on_backend(
            backend,
            attention_chunk,
            learnable_sink,
            score_mod,
            mask_mod,
            q_descale,
            k_descale,
            v_descale,
            block_mask,
        )
        return impl(
            q,
            k,
            v,
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            return_probs=return_probs,
            out=out,
            rng_state=rng_state,
        )
    from fa_core.forward_launch import launch_forward, launch_probs
    from fa_core.fp8 import fp8_descale, out_dtype

    softmax_scale = _common_checks(
        q, k, v, out, softmax_scale, window_size, softcap, dropout_p, rng_state, False
    )
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    V.check_alibi(alibi_slopes, batch, nheads, q)
    descale = fp8_descale(q, k, batch, q_descale, k_descale, v_descale, return_probs)
    V.check_chunk_and_sink(attention_chunk, learnable_sink, nheads, q)
    V.check_mods(score_mod, mask_mod)
    block_mask = as_block_mask(
        block_mask, batch, nheads, seqlen_q, seqlen_k, causal=causal, window_size=window_size,
        attention_chunk=int(attention_chunk), mask_mod=mask_mod,
    )  # fmt: skip
    V.check_block_mask(block_mask, batch, nheads, seqlen_q, seqlen_k, q, return_probs)
    if out is None:
        out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=out_dtype(q))
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    if rng_state is None:
        rng_state = new_rng_state(dropout_p)
    if batch == 0 or seqlen_q == 0:
        return FwdResult(out, lse, rng_state, None)
    kw = dict(
        varlen=False,
        batch=batch,
        max_seqlen_q=seqlen_q,
        max_seqlen_k=seqlen_k,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        seqused_k=None,
        softmax_scale=softmax_scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        learnable_sink=learnable_sink,
        score_mod=score_mod,
        mask_mod=mask_mod,
    )
    window = launch_forward(
        q,
        k,
        v,
        out,
        lse,
        causal=causal,
        window_size=window_size,
        descale=descale,
        block_mask=block_mask,
        **kw,
    )
    probs = launch_probs(q, k, lse, window=window, **kw) if return_probs else None
    return FwdResult(out, lse, rng_state, probs)


def _gluon_paged(q, k, v, out, block_table, causal, window_size, kw) -> torch.Tensor | None:
    """Run the paged varlen forward on the Hopper (Gluon) kernels into ``out`` when they cover the call and
    return the lse ``(nheads, total_q)``; else None (the Triton kernel runs).

    Covered: sm_90 with Triton 3.6, bf16 / fp16, head dim 64 / 128, causal, windows, softcap, GQA,
    ``seqused_k``, caches whose pages are contiguous rows (:func:`fa_core.gluon.supports`); not dropout,
    ALiBi, sinks, chunks, score / mask mods, FP8 or ``leftpad_k`` (the caller checks the last two), the same
    rules as the packed varlen dispatch, including its minimum amount of work per launch."""
    from fa_core import settings

    if (
        not q.is_cuda
        or kw["dropout_p"] > 0
        or kw["alibi_slopes"] is not None
        or kw["learnable_sink"] is not None
        or kw["score_mod"] is not None
        or kw["mask_mod"] is not None
        or kw["attention_chunk"]
        or not settings.get().gluon
    ):
        return None
    from fa_core.ops import gluon_forward_pays

    # Gluon launches cost more host time than the Triton kernel's cached launch: small calls stay there
    work = 4 * q.shape[-2] * q.shape[-1] * kw["max_seqlen_k"] * q.shape[0]
    if not gluon_forward_pays(work, causal, varlen=True):
        return None
    from fa_core import gluon

    gkw: dict[str, Any] = dict(
        causal=causal,
        window_size=tuple(window_size),
        softcap=kw["softcap"],
        softmax_scale=kw["softmax_scale"],
        block_table=block_table,
        seqused_k=kw["seqused_k"],
    )
    cu_q, cu_k, max_q, max_k = kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"]
    if max_k < 1 or not gluon.supports(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, out=out, **gkw
    ):
        return None
    return gluon.forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, out=out, **gkw)[1]


def flash_attn_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_probs: bool = False,
    seqused_k: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
    backend: str | None = None,
    attention_chunk: int = 0,
    learnable_sink: torch.Tensor | None = None,
    score_mod: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    leftpad_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> FwdResult:
    """Variable-length (packed) attention forward.

    Args:
        q: ``(total_q, nheads, headdim)``; k: ``(total_k, nheads_k, headdim)``; v: ``(total_k, nheads_k, headdim_v)``,
            or with ``block_table`` paged caches ``(num_pages, page_size, nheads_k, headdim[_v])``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 prefix sums of the sequence lengths (with
            ``block_table``, ``cu_seqlens_k`` gives only the key lengths, its last entry is not a row count).
        max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths (the grid is sized by them).
        seqused_k: optional ``(batch,)`` int32: sequence b uses only its first ``seqused_k[b]`` keys.
        leftpad_k: optional ``(batch,)`` int32 (flash-attn's rule): sequence b's keys start ``leftpad_k[b]``
            rows into its slice and number ``(seqused_k[b] or cu_seqlens_k[b + 1] - cu_seqlens_k[b]) -
            leftpad_k[b]``; ``0 <= leftpad_k[b] <= seqlen_k[b]``.
        block_table: optional ``(batch, max_pages)`` int32: k / v are a paged cache (page size a power of two
            >= 16) and key j of sequence b is row ``(leftpad_k[b] + j) % page_size`` of page
            ``block_table[b, (leftpad_k[b] + j) // page_size]``; combines with ``leftpad_k``. Neither takes
            ``return_probs`` (see :mod:`fa_core.paged_varlen`).
        Other arguments as in :func:`flash_attn_forward`.

    Returns:
        :class:`FwdResult` with ``lse (nheads, total_q)`` and probs ``(batch, nheads, max_seqlen_q, max_seqlen_k)``.
    """
    V.grad_guard(q, k, v)
    impl = get_varlen_forward(backend)
    if impl is not None:
        _no_extras_on_backend(
            backend,
            attention_chunk,
            learnable_sink,
            score_mod,
            mask_mod,
            q_descale,
            k_descale,
            v_descale,
            leftpad_k,
            block_table,
        )
        return impl(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            return_probs=return_probs,
            seqused_k=seqused_k,
            out=out,
            rng_state=rng_state,
        )
    from fa_core.forward_launch import launch_forward, launch_probs
    from fa_core.fp8 import fp8_descale, out_dtype
    from fa_core.paged_varlen import check_leftpad_and_pages, key_view

    softmax_scale = _common_checks(
        q, key_view(k, block_table), key_view(v, block_table), out, softmax_scale, window_size, softcap,
        dropout_p, rng_state, True,
    )  # fmt: skip
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q, max_seqlen_q, "max_seqlen_q")
    total_k = None if block_table is not None else k.shape[0]  # paged: cu_seqlens_k counts no cache rows
    batch_k = V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, q, max_seqlen_k, "max_seqlen_k")
    if batch_k != batch:
        raise ValueError(f"cu_seqlens_k has {batch_k + 1} entries but cu_seqlens_q has {batch + 1}")
    V.check_seqused(seqused_k, batch, cu_seqlens_k, q)
    check_leftpad_and_pages(q, k, v, cu_seqlens_k, seqused_k, leftpad_k, block_table, batch, return_probs)
    nheads = q.shape[1]
    V.check_alibi(alibi_slopes, batch, nheads, q)
    descale = fp8_descale(q, k, batch, q_descale, k_descale, v_descale, return_probs)
    V.check_chunk_and_sink(attention_chunk, learnable_sink, nheads, q)
    V.check_mods(score_mod, mask_mod)
    if out is None:
        out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=out_dtype(q))
    lse = torch.empty(nheads, q.shape[0], dtype=torch.float32, device=q.device)
    if rng_state is None:
        rng_state = new_rng_state(dropout_p)
    if batch == 0 or q.shape[0] == 0 or max_seqlen_q == 0:
        return FwdResult(out, lse, rng_state, None)
    kw = dict(
        varlen=True,
        batch=batch,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        rng_state=rng_state,
        attention_chunk=int(attention_chunk),
        learnable_sink=learnable_sink,
        score_mod=score_mod,
        mask_mod=mask_mod,
    )
    if block_table is not None and descale is None and leftpad_k is None:
        g_lse = _gluon_paged(q, k, v, out, block_table, causal, window_size, kw)
        if g_lse is not None:
            return FwdResult(out, g_lse, rng_state, None)
    window = launch_forward(
        q, k, v, out, lse, causal=causal, window_size=window_size, descale=descale, leftpad_k=leftpad_k,
        block_table=block_table, **kw,
    )  # fmt: skip
    probs = launch_probs(q, k, lse, window=window, **kw) if return_probs else None
    return FwdResult(out, lse, rng_state, probs)
