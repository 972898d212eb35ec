"""Test/debug kernels: the attention probabilities, and flash-attn's ``S_dmask`` form of them.

* :func:`probs_kernel`: the normalised probabilities ``exp(s - lse)`` from the forward's lse, dropped entries
  negated (``fa_core.flash_attn_forward(..., return_probs=True)``).
* :func:`flash_attn_s_dmask` (:func:`s_dmask_kernel`): flash-attn's ``S_dmask`` exactly as its CUDA forward
  lays it out (block-scaled, unnormalised; see the section below), with :func:`get_block_size_n`, the rule of
  flash-attn's ``_get_block_size_n``.

Both recompute the scores with the forward's masking helpers and regenerate the dropout mask from the
forward's ``rng_state``. O(seqlen_q * seqlen_k) memory: never use them in training.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fa_core.errors import FlashAttnValueError
from fa_core.masking import (
    chunk_visible,
    dropout_keep,
    normalize_window,
    score_mod,
    scores_log2,
    seq_bounds,
    visible,
)

__all__ = ["flash_attn_s_dmask", "get_block_size_n", "probs_kernel", "s_dmask_kernel"]


@triton.jit
def probs_kernel(
    Q,
    K,
    Lse,
    P,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_lb,
    stride_lh,
    stride_pb,
    stride_ph,
    stride_pm,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    seqlen_q_dense,
    seqlen_k_dense,
    max_seqlen_k,
    nheads,
    group,
    sm_scale,
    softcap,
    Alibi,
    stride_alb,
    window_left,
    window_right,
    attention_chunk,
    dropout_p,
    seed,
    rng_offset,
    HEADDIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    score_mod_fn: tl.constexpr,
    mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr,
    HAS_MASK_MOD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // group
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(
        off_b, cu_seqlens_q, cu_seqlens_k, seqlen_q_dense, seqlen_k_dense, IS_VARLEN
    )
    if HAS_SEQUSED:
        seqlen_k = tl.minimum(tl.maximum(tl.load(seqused_k + off_b), 0), seqlen_k)
    if start_m * BLOCK_M >= seqlen_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk * stride_kh + k_start.to(tl.int64) * stride_kn
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
        mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEADDIM),
        other=0.0,
    )
    lse = tl.load(
        Lse + off_b.to(tl.int64) * stride_lb + off_h * stride_lh + q_start + offs_m,
        mask=offs_m < seqlen_q,
        other=0.0,
    )
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + off_b * stride_alb + off_h).to(tl.float32)
    bh = off_b * nheads + off_h
    p_base = P + off_b.to(tl.int64) * stride_pb + off_h.to(tl.int64) * stride_ph
    for start_n in range(0, max_seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
            mask=(offs_n[None, :] < seqlen_k) & (offs_d[:, None] < HEADDIM),
            other=0.0,
        )
        s = scores_log2(
            tl.dot(q, k),
            offs_m,
            offs_n,
            seqlen_q,
            seqlen_k,
            sm_scale,
            softcap,
            alibi_slope,
            HAS_SOFTCAP,
            HAS_ALIBI,
        )
        if HAS_SCORE_MOD:
            s = score_mod(score_mod_fn, s, off_b, off_h, offs_m, offs_n)
        ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
        if HAS_CHUNK:
            ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, attention_chunk)
        if HAS_MASK_MOD:
            ok = ok & mask_mod_fn(off_b, off_h, offs_m[:, None], offs_n[None, :])
        p = tl.where(ok, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, dropout_p)
            p = tl.where(keep, p, -p)
        tl.store(
            p_base + offs_m[:, None] * stride_pm + offs_n[None, :],
            p,
            mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < max_seqlen_k),
        )


# ------------------------------------------------------------------------------------------------- S_dmask
# flash-attn's ``S_dmask`` (``return_attn_probs=True`` with dropout) is not the probabilities: its CUDA
# forward walks the key blocks of ``_get_block_size_n`` columns from the last to the first, and for each block stores
# ``exp(s - m)`` in the input dtype, ``m`` the row's running max over that block and every block to its right
# (the max at that point of the online softmax), dropped entries negated. Its tests recover the probabilities
# with ``normalize_flash_attn_S``: recompute the per-block maxima from q and k, take their reverse cumulative
# max and multiply block j by ``exp(cummax_j - lse)``. The kernel below writes that form.


def get_block_size_n(device: torch.device | str, head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """flash-attn 2.8's ``flash_attn_interface._get_block_size_n``: the key-block width of its forward kernel,
    which fixes the blocks of ``S_dmask``. sm86 / sm89 (``major == 8 and minor > 0``) use a narrower table at
    head dims 97-128; every other device (sm80, sm90, CPU) the default one. ``head_dim <= 256``."""
    if head_dim > 256:
        raise FlashAttnValueError(f"head_dim must be <= 256, got {head_dim}")
    dev = torch.device(device)
    is_sm8x = False
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        is_sm8x = major == 8 and minor > 0
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if is_dropout else 128
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        if is_sm8x:
            return 64 if (not is_dropout and is_causal) else 32
        return 32 if is_dropout else 64
    return 64


@triton.jit
def s_dmask_kernel(
    Q,
    K,
    S,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_sb,
    stride_sh,
    stride_sm,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    seqlen_q_dense,
    seqlen_k_dense,
    max_seqlen_q,
    max_seqlen_k,
    total_q,
    total_k,
    nheads,
    group,
    sm_scale,
    softcap,
    Alibi,
    stride_alb,
    window_left,
    window_right,
    attention_chunk,
    dropout_p,
    seed,
    rng_offset,
    HEADDIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), nheads, batch)``; ``BLOCK_N`` = :func:`get_block_size_n`.

    Writes ``S (batch, nheads, >= seqlen_q, >= seqlen_k)`` (zero-filled by the caller): key blocks from the
    last to the first, ``exp(s - m)`` with ``m`` the running row max, dropped entries negated."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // group
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(
        off_b, cu_seqlens_q, cu_seqlens_k, seqlen_q_dense, seqlen_k_dense, IS_VARLEN
    )
    # index values from tensors are clamped before they address memory: each sequence lies inside q / k
    # (total rows) and inside S (max_seqlen rows / columns)
    q_start = tl.minimum(tl.maximum(q_start, 0), total_q)
    k_start = tl.minimum(tl.maximum(k_start, 0), total_k)
    seqlen_q = tl.minimum(tl.maximum(seqlen_q, 0), tl.minimum(total_q - q_start, max_seqlen_q))
    seqlen_k = tl.minimum(tl.maximum(seqlen_k, 0), tl.minimum(total_k - k_start, max_seqlen_k))
    if HAS_SEQUSED:
        seqlen_k = tl.minimum(tl.maximum(tl.load(seqused_k + off_b), 0), seqlen_k)
    if start_m * BLOCK_M >= seqlen_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk * stride_kh + k_start.to(tl.int64) * stride_kn
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
        mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEADDIM),
        other=0.0,
    )
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + off_b * stride_alb + off_h).to(tl.float32)
    bh = off_b * nheads + off_h
    s_base = S + off_b.to(tl.int64) * stride_sb + off_h.to(tl.int64) * stride_sh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_blocks = tl.cdiv(seqlen_k, BLOCK_N)
    for i in range(0, n_blocks):
        start_n = (n_blocks - 1 - i) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
            mask=(offs_n[None, :] < seqlen_k) & (offs_d[:, None] < HEADDIM),
            other=0.0,
        )
        s = scores_log2(
            tl.dot(q, k),
            offs_m,
            offs_n,
            seqlen_q,
            seqlen_k,
            sm_scale,
            softcap,
            alibi_slope,
            HAS_SOFTCAP,
            HAS_ALIBI,
        )
        ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, IS_LOCAL, True)
        if HAS_CHUNK:
            ok = ok & chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, attention_chunk)
        s = tl.where(ok, s, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        p = tl.exp2(s - m_safe[:, None])
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, dropout_p)
            p = tl.where(keep, p, -p)
        tl.store(
            s_base + offs_m[:, None].to(tl.int64) * stride_sm + offs_n[None, :],
            p.to(S.dtype.element_ty),
            mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k),
        )


def _round128(x: int) -> int:
    return (x + 127) // 128 * 128


def flash_attn_s_dmask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    dropout_p: float,
    rng_state: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_k: torch.Tensor | None = None,
    attention_chunk: int = 0,
    block_size_n: int | None = None,
) -> torch.Tensor:
    """flash-attn's ``S_dmask`` for a forward that ran with these arguments and returned ``rng_state``.

    Args:
        q: ``(batch, seqlen_q, nheads, d)``, or varlen ``(total_q, nheads, d)`` with ``cu_seqlens_q`` /
            ``cu_seqlens_k`` ``(batch + 1,)`` int32 and ``max_seqlen_q`` / ``max_seqlen_k``.
        k: ``(batch, seqlen_k, nheads_k, d)`` or ``(total_k, nheads_k, d)``.
        rng_state: the forward's CPU int64 ``[seed, offset]``: the same dropout mask is regenerated.
        block_size_n: key-block width; default :func:`get_block_size_n` ``(q.device, d, dropout_p > 0,
            causal)``, the value flash-attn's tests read with ``_get_block_size_n``.

    Returns:
        ``(batch, nheads, round128(seqlen_q), round128(seqlen_k))`` in q's dtype: per key block ``j`` of
        ``block_size_n`` columns, ``exp(s - m_j)`` with ``m_j`` the row max of the scores over blocks ``>= j``
        (flash-attn's running max: its kernel walks the blocks from the last), dropped entries negated, zero
        outside the sequences and at masked entries. ``normalize_flash_attn_S`` of flash-attn's tests turns it
        back into the probabilities. O(seqlen_q * seqlen_k) memory: a test / debug output.
    """
    varlen = cu_seqlens_q is not None
    nheads, nheads_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if cu_seqlens_q is not None:
        if cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
            raise FlashAttnValueError("varlen S_dmask needs cu_seqlens_k, max_seqlen_q and max_seqlen_k")
        batch = cu_seqlens_q.shape[0] - 1
        sq, sk = int(max_seqlen_q), int(max_seqlen_k)
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if softmax_scale is None:
        softmax_scale = d ** (-0.5)
    if block_size_n is None:
        block_size_n = get_block_size_n(q.device, d, dropout_p > 0, causal)
    left, right, is_local = normalize_window(causal, window_size)
    s = torch.zeros(batch, nheads, _round128(sq), _round128(sk), dtype=q.dtype, device=q.device)
    if batch == 0 or nheads == 0 or sq == 0 or sk == 0:
        return s
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    alibi = alibi_slopes if alibi_slopes is not None else torch.empty(1, dtype=torch.float32, device=q.device)
    stride_alb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    seed, offset = (int(x) for x in rng_state.tolist())
    block_m = 16
    grid = (triton.cdiv(sq, block_m), nheads, batch)
    ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with ctx:
        s_dmask_kernel[grid](
            q,
            k,
            s,
            0 if varlen else q.stride(0),
            q.stride(-3),
            q.stride(-2),
            0 if varlen else k.stride(0),
            k.stride(-3),
            k.stride(-2),
            s.stride(0),
            s.stride(1),
            s.stride(2),
            cu_seqlens_q if varlen else dummy,
            cu_seqlens_k if varlen else dummy,
            seqused_k if seqused_k is not None else dummy,
            0 if varlen else sq,
            0 if varlen else sk,
            sq,
            sk,
            q.shape[0] if varlen else sq,
            k.shape[0] if varlen else sk,
            nheads,
            nheads // nheads_k,
            float(softmax_scale),
            float(softcap),
            alibi,
            stride_alb,
            left,
            right,
            int(attention_chunk),
            float(dropout_p),
            seed,
            offset,
            HEADDIM=d,
            BLOCK_D=max(triton.next_power_of_2(d), 16),
            IS_VARLEN=varlen,
            HAS_SEQUSED=seqused_k is not None,
            IS_LOCAL=is_local,
            HAS_SOFTCAP=softcap > 0,
            HAS_ALIBI=alibi_slopes is not None,
            HAS_DROPOUT=dropout_p > 0,
            HAS_CHUNK=attention_chunk > 0,
            BLOCK_M=block_m,
            BLOCK_N=block_size_n,
        )
    return s
