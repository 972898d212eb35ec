"""flash-attn 2.8's low-level functions (``_flash_attn_forward``, ``_flash_attn_varlen_forward``,
``_flash_attn_backward``, ``_flash_attn_varlen_backward``) on the one call path (eager launches; the
``flash_attn_plus`` custom ops under ``torch.compile``); paged varlen keys and ``leftpad_k`` read in fa-core's
varlen kernel when no gradient is wanted, else gathered into a padded copy.
Re-exported by :mod:`flash_attn.flash_attn_interface`, where flash-attn has them.
"""

from __future__ import annotations

import torch

from fa_core import ops
from fa_core.errors import FlashAttnValueError
from fa_core.validation import contig_last as maybe_contiguous
from flash_attn import _extras

Tensor = torch.Tensor


def _flash_attn_forward(
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
    *,
    num_splits: int = 0,
):
    """-> ``(out, softmax_lse (b, h, sq) fp32, S_dmask, rng_state (2,) int64)``; flash-attn 2.8 semantics
    (``S_dmask`` with ``return_softmax`` even without dropout). Not differentiable (as flash-attn's).

    ``num_splits`` (keyword, as in flash-attn's main branch) is accepted and ignored: the dense forward never
    splits the keys (``flash_attn_with_kvcache`` honours it)."""
    q, k, v, spec = ops.prepare(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=(window_size_left, window_size_right), softcap=softcap, alibi_slopes=alibi_slopes,
        return_softmax=return_softmax,
    )  # fmt: skip
    with torch.no_grad():
        return ops.run_forward(q, k, v, None, alibi_slopes, None, None, None, spec)


def _flash_attn_varlen_forward(
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
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
    zero_tensors=False,
    *,
    num_splits: int = 0,
):
    """-> ``(out, softmax_lse (h, total_q) fp32, S_dmask, rng_state)``. ``zero_tensors`` has nothing to do here:
    every row of out/lse belongs to a sequence and is written. ``leftpad_k`` ``(batch,)`` int32: sequence b's
    keys start ``leftpad_k[b]`` rows into its slice of k/v. ``block_table`` ``(batch, max_blocks)`` int32: k / v
    are paged caches ``(num_blocks, page_block_size, nheads_k, headdim)``, read in the kernel through the
    table (:func:`paged_varlen_forward`); ``cu_seqlens_k`` / ``seqused_k`` give the key lengths. Neither takes
    ``return_softmax`` with dropout's ``S_dmask`` in the kernel path (paged: the pages are gathered first;
    leftpad_k: refused). ``num_splits`` (keyword, flash-attn main) is accepted and ignored: the varlen forward
    does not split; with a ``block_table``, ``num_splits > 1`` raises
    :class:`~fa_core.errors.FlashAttnValueError` (a ``RuntimeError``), as flash-attn's paged varlen forward
    does."""
    if block_table is not None and num_splits > 1:
        raise FlashAttnValueError(
            f"num_splits > 1 is not supported with a block_table (paged KV), got num_splits={num_splits}"
        )
    if leftpad_k is not None and return_softmax:
        raise FlashAttnValueError("return_softmax (S_dmask) is not supported with leftpad_k")
    window = (window_size_left, window_size_right)
    if (block_table is not None or leftpad_k is not None) and in_kernel(q, k, block_table, return_softmax):
        return paged_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
            softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap,
            alibi_slopes=alibi_slopes, seqused_k=seqused_k, leftpad_k=leftpad_k, block_table=block_table,
        )  # fmt: skip
    if block_table is not None:  # traced, a gradient, S_dmask, or pages the kernel does not take
        from flash_attn._checks import _check_block_table

        _check_block_table(block_table, k, cu_seqlens_k)
        k, v, cu_seqlens_k, seqused_k = _gather_pages(
            k, v, maybe_contiguous(block_table), cu_seqlens_k, int(max_seqlen_k), seqused_k
        )
    q, k, v, spec = ops.prepare(
        q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, dropout_p=dropout_p, softmax_scale=softmax_scale,
        causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
        return_softmax=return_softmax,
    )  # fmt: skip
    with torch.no_grad():
        if leftpad_k is not None:  # traced (the custom op takes leftpad_k), or gathered pages
            if ops.tracing(q):
                return torch.ops.flash_attn_plus.varlen_fwd(
                    q, k, v, cu_seqlens_q, cu_seqlens_k, spec.max_seqlen_q, spec.max_seqlen_k, spec.dropout_p,
                    spec.softmax_scale, spec.causal, spec.window_left, spec.window_right, spec.softcap,
                    alibi_slopes, False, seqused_k, False, 0, None, leftpad_k,
                )  # fmt: skip
            from fa_core.paged_varlen import check_leftpad_and_pages

            batch = cu_seqlens_q.shape[0] - 1
            check_leftpad_and_pages(q, k, v, cu_seqlens_k, seqused_k, leftpad_k, None, batch, False)
            return ops.forward_eager(
                q, k, v, None, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, spec, leftpad_k=leftpad_k
            )
        return ops.run_forward(q, k, v, None, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, spec)


def in_kernel(q: Tensor, k: Tensor, block_table: Tensor | None, want_s_dmask: bool, *grad: object) -> bool:
    """Whether a varlen call with ``block_table`` / ``leftpad_k`` runs fa-core's varlen forward directly
    (pages and left padding read in the kernel): eager, no gradient wanted (flash-attn's paged varlen is
    forward-only), no ``S_dmask``, and a page size the kernel takes (a power of two >= 16). Otherwise the
    pages are gathered into a padded copy (:func:`_gather_pages`), which autograd and tracers follow."""
    if isinstance(q, Tensor) and ops.tracing(q):
        return False
    if want_s_dmask or ops.needs_grad(q, k, *grad):
        return False
    if block_table is None or not isinstance(k, Tensor) or k.dim() != 4:
        return True  # leftpad_k alone, or a malformed cache: fa-core's checks name the argument
    page = k.shape[1]
    return page >= 16 and page & (page - 1) == 0


def paged_varlen_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q,
    max_seqlen_k,
    *,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size,
    softcap: float,
    alibi_slopes: Tensor | None,
    seqused_k: Tensor | None = None,
    leftpad_k: Tensor | None = None,
    block_table: Tensor | None = None,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fa-core's varlen forward with ``leftpad_k`` / ``block_table`` read in the kernel (every argument
    checked there, errors naming it): ``(out (total_q, h, dv), lse (h, total_q) fp32, S_dmask (0,),
    rng_state)``. k / v: ``(total_k, hk, d)``, or paged ``(num_blocks, page_block_size, hk, d)`` with
    ``block_table (batch, max_blocks)`` int32; forward only."""
    from fa_core.forward import flash_attn_varlen_forward
    from fa_core.validation import window_pair

    with torch.no_grad():
        res = flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), dropout_p=dropout_p,
            softmax_scale=softmax_scale, causal=bool(causal), window_size=window_pair(window_size),
            softcap=softcap, alibi_slopes=alibi_slopes, seqused_k=seqused_k, attention_chunk=attention_chunk,
            learnable_sink=learnable_sink, leftpad_k=leftpad_k, block_table=block_table,
        )  # fmt: skip
    return res.out, res.lse, q.new_empty((0,)), res.rng_state


def _flash_attn_backward(
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
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
):
    """Writes dq, dk, dv (allocated and dropped when None, as flash-attn); returns softmax_d
    ``(b, h, round128(sq))`` fp32. Needs fa-backward."""
    fab = _extras.require_backward()
    dout, q, k, v, out = (maybe_contiguous(x) for x in (dout, q, k, v, out))
    args = (
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, ops.default_scale(q, softmax_scale), causal,
        window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state,
    )  # fmt: skip
    if isinstance(q, torch.Tensor) and ops.tracing(q):
        return torch.ops.flash_attn_plus.bwd(*args)
    return fab.ops.bwd_impl(*args)


def _flash_attn_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
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
    deterministic,
    rng_state=None,
    zero_tensors=False,
):
    """Returns softmax_d ``(h, total_q + 128 * b)`` fp32. Needs fa-backward."""
    fab = _extras.require_backward()
    dout, q, k, v, out = (maybe_contiguous(x) for x in (dout, q, k, v, out))
    args = (
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
        int(max_seqlen_k), dropout_p, ops.default_scale(q, softmax_scale), causal, window_size_left,
        window_size_right, softcap, alibi_slopes, deterministic, rng_state, zero_tensors, None,
    )  # fmt: skip
    if isinstance(q, torch.Tensor) and ops.tracing(q):
        return torch.ops.flash_attn_plus.varlen_bwd(*args)
    return fab.ops.varlen_bwd_impl(*args)


def _gather_pages(
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_k: int,
    seqused_k: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Paged keys ``(num_blocks, page, hk, d)`` -> a padded varlen layout ``(batch * max_seqlen_k, hk, d)``
    with ``cu_seqlens_k = arange * max_seqlen_k`` and ``seqused_k`` = the true lengths. Device-side only (no
    sync); costs one copy of the used K/V."""
    batch, n_cols = block_table.shape
    page = k_cache.shape[1]
    t = torch.arange(max_seqlen_k, device=block_table.device)
    cols = (t // page).clamp_max(n_cols - 1)
    rows = block_table[:, cols].long() * page + (t % page)  # (batch, max_seqlen_k)
    rows = rows.clamp(0, k_cache.shape[0] * page - 1).reshape(-1)  # unused slots may hold -1
    k = k_cache.reshape(-1, *k_cache.shape[2:])[rows]
    v = v_cache.reshape(-1, *v_cache.shape[2:])[rows]
    if seqused_k is None:
        seqused_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    cu = torch.arange(batch + 1, device=block_table.device, dtype=torch.int32) * max_seqlen_k
    return k, v, cu, seqused_k
