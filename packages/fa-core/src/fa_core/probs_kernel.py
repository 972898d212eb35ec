"""Test/debug kernel: materialise the attention probabilities ``exp(s - lse)`` with the dropout mask.

flash-attn's ``return_attn_probs`` exists for tests; this is ours. It recomputes the scores with the same
masking helpers and the forward's lse, so a test can check the forward's normalisation and recover the
exact dropout mask (dropped entries are stored negated, as flash-attn's ``S_dmask`` encodes them).
O(seqlen_q * seqlen_k) memory: never use it in training.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.masking import chunk_visible, dropout_keep, score_mod, scores_log2, seq_bounds, visible


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
        seqlen_k = tl.load(seqused_k + off_b)
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
