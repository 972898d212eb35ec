"""Backward attention kernels: dQ (with delta), then dK/dV. Dense and varlen share every kernel.

Design (FlashAttention-2 backward, split in two passes so that nothing is accumulated with atomics):

* ``_bwd_dq_kernel`` (launched first): one program per query block of one (batch, q head). It computes its
  rows' ``delta = rowsum(dout * out)`` in float32 (laid out like the lse) from the ``dout`` tile it loads
  anyway plus one ``out`` tile, stores it for the dK/dV pass, then streams the visible key blocks and
  accumulates dQ in registers. (A separate preprocess kernel for delta cost a launch: ~60 us of host time
  on the GPU machine's host, which decides short-sequence steps.)
* ``_bwd_dkdv_kernel`` (second, reads delta): one program per key block of one (batch, kv head). It loops
  over the q heads of the GQA group and, for each, over the query blocks that can see the key block, and
  accumulates dK and dV in registers: the reduction over the group happens inside the program, so repeated
  K/V are never materialised and no two programs write the same dK/dV row.

The dQ pass also writes the lse in log2 units beside delta, so the dK/dV loop reads it ready to use instead
of scaling ``BLOCK_M`` values per tile. On Hopper (``USE_TMA``, where :func:`fa_core.forward_launch.tma_ok`
allows) the streamed tiles (q / dout in dK/dV, k / v in dQ) load through tensor descriptors: no per-element
address math in the loops (sm_90 SASS, relative-bias dQ loop at 128 x 64: 465 -> 394 instructions), which
took the relative-bias backward from 16.2 to 14.3 ms at 16k on an H200 (``bench/bwd_tiles.py``).

Hence the backward is deterministic (bitwise identical from run to run) whatever ``deterministic`` says,
and its extra memory is ``delta`` and the log2 lse: 2 * batch * nheads * seqlen_q floats.

The dK/dV pass works on transposed tiles ``(BLOCK_N keys, BLOCK_M queries)``, so that ``p^T`` and ``ds^T``
come out of the first matmuls in the layout the next ones consume. The masking helpers of
:mod:`fa_core.masking` are symmetric under the exchange (queries, seqlen_q, left) <-> (keys, seqlen_k, right):
key ``j`` visible from query ``i`` iff ``i + diag - left <= j <= i + diag + right`` iff
``j + (seqlen_q - seqlen_k) - right <= i <= j + (seqlen_q - seqlen_k) + left``. So ``visible``,
``scores_log2`` and ``kv_range`` called with swapped arguments give exactly the transposed mask, the
transposed scores and the query-block range of a key block (``kv_range`` swapped has the bounds of
``q_range`` and also splits out the blocks that need no mask). Only the dropout mask is not symmetric
(Philox is keyed on (key, query)): it is generated in the (query, key) orientation and transposed.
User functions are elementwise, so calling them with ``q_idx (1, BLOCK_M)`` and ``kv_idx (BLOCK_N, 1)`` gives
the transposed tile directly. Chunks are aligned on key positions, so their query range is computed by
:func:`fa_backward.backward_inner._chunk_q_range`, not by swapping arguments.

The tile loads and inner loops are in :mod:`fa_backward.backward_inner`, the autotune space in
:mod:`fa_backward.backward_configs`.

Programmable attention: ``attention_chunk``; ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (needs no
derivative); ``score_mod(score, b, h, q_idx, kv_idx)`` with its derivative ``score_mod_grad(score, b, h, q_idx,
kv_idx) = d score_mod / d score`` evaluated at the unmodified score (natural-log units, after scale, softcap
and ALiBi), so ``dS = dS_mod * score_mod_grad``; block-sparse masks: the dQ pass walks the key blocks of
``kv_indices`` (partial, with ``mask_mod``) and ``full_kv_indices`` (full, without), the dK/dV pass the
transposed lists (:func:`fa_core.block_sparse.transpose_block_mask`): blocks not listed are never loaded.
A differentiated lse enters through ``delta = rowsum(dout * out) - dlse`` (dQ pass): since
``d lse_i / d s_ij = p_ij``, ``dS = P * (dP - delta + dlse)``, and the sink gradient keeps its form.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_backward.backward_configs import (
    DKDV_CONFIGS,
    DKDV_SPACE,
    DQ_CONFIGS,
    DQ_SPACE,
    INTERPRET_DKDV,
    INTERPRET_DQ,
    TUNE_KEY,
    _prune,
)
from fa_backward.backward_inner import (
    LOG2E,
    _chunk_q_range,
    _dkdv_inner,
    _dq_inner,
    _load_rows,
    _seq_base,
    checked_list_length,
    checked_seq_bounds,
    stream_sources,
)
from fa_core.forward_configs import fast_autotuner
from fa_core.masking import chunk_kv_range, kv_range
from fa_core.scheduling import lpt_program_ids

# re-exported: the autotune names of fa_backward.backward_configs stay importable from here
__all__ = [
    "DKDV_CONFIGS",
    "DKDV_SPACE",
    "DQ_CONFIGS",
    "DQ_SPACE",
    "INTERPRET_DKDV",
    "INTERPRET_DQ",
    "TUNE_KEY",
    "dkdv_kernel",
    "dq_kernel",
]


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh, stride_deltab, stride_deltah,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    cu_seqlens_q, cu_seqlens_k, seqused_k,
    seqlen_q_dense, seqlen_k_dense,
    nheads, group,
    sm_scale, softcap, Alibi, stride_alb,
    window_left, window_right, chunk,
    dropout_p, seed, rng_offset,
    BlkNum, BlkIdx, FullNum, FullIdx, stride_bn_b, stride_bn_h, stride_bi_b, stride_bi_h, stride_bi_r,
    idx_cols,
    SEQ_BUCKET_Q, SEQ_BUCKET_K,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, IS_LOCAL: tl.constexpr, LPT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC_FP64: tl.constexpr,
    HAS_CHUNK: tl.constexpr, score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr, mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    IS_SPARSE: tl.constexpr, HAS_FULL: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    HAS_RIGHT_EDGE: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(max_seqlen_k, BLOCK_N), nheads_k, batch)``; dK/dV of one key block, summed over the group.

    ``HAS_RIGHT_EDGE``: some key block has queries past its band interior that need the mask (a finite left
    window, chunks, mask_mod, or query rows that end inside a tile); the host knows, and the loop is compiled
    out otherwise (an empty masked loop still costs time: 7-13% in the forward on an H200).

    Block-sparse: ``BlkNum (B|1, H|1, num_kv_blocks)`` / ``BlkIdx (B|1, H|1, num_kv_blocks, num_q_blocks)`` are
    the transposed partial lists, ``FullNum`` / ``FullIdx`` the transposed full lists (same strides),
    ``idx_cols`` their last dim.

    Indices read from tensors are clamped, once per program (scalars): ``cu_seqlens_*`` to ``[0, total]``
    with varlen ``seqlen_q_dense`` / ``seqlen_k_dense`` the total rows of q / k, ``seqused_k`` to the
    sequence's keys, list lengths to ``idx_cols``; listed block indices to the sequence's blocks (one clamp
    per tile). Garbage there (host value checks off) gives garbage gradients, never an access outside the
    tensors."""
    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    # what every loop below holds fixed, besides the runtime tuples (see fa_backward.backward_inner)
    FNS: tl.constexpr = (score_mod_fn, score_grad_fn, mask_mod_fn)
    FLAGS: tl.constexpr = (
        HAS_SCORE_MOD,
        HAS_MASK_MOD,
        HAS_CHUNK,
        IS_LOCAL,
        HAS_SOFTCAP,
        HAS_ALIBI,
        HAS_DROPOUT,
    )
    SHAPE: tl.constexpr = (HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_M, SPARSE_Q, USE_TMA)
    # first key blocks first: under a causal mask every query sees them (LPT: every head's, fa_core.scheduling)
    start_n, off_hk, off_b = lpt_program_ids(LPT, False)

    # keys past seqused_k exist in the tensor but are never attended: their gradient is written as 0
    q_start, seqlen_q, k_start, seqlen_k_rows, seqlen_k = checked_seq_bounds(
        off_b, cu_seqlens_q, cu_seqlens_k, seqused_k, seqlen_q_dense, seqlen_k_dense, IS_VARLEN, HAS_SEQUSED
    )
    if start_n * BLOCK_N >= seqlen_k_rows:
        return

    k_base = _seq_base(K, off_b, off_hk, k_start, stride_kb, stride_kh, stride_kn)
    v_base = _seq_base(V, off_b, off_hk, k_start, stride_vb, stride_vh, stride_vn)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(k_base, offs_n, seqlen_k, stride_kn, offs_d, HEADDIM, EVEN_D)
    v = _load_rows(v_base, offs_n, seqlen_k, stride_vn, offs_dv, HEADDIM_V, EVEN_DV)
    if ACC_FP64:  # float64 inputs (CPU interpreter only, for gradcheck) accumulate in float64
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float64)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # query rows that see this key block: kv_range of the transposed problem (see the module docstring)
    lo, full_lo, full_hi, hi = kv_range(
        start_n, seqlen_k, seqlen_q, window_right, window_left, BLOCK_N, BLOCK_M, IS_LOCAL
    )
    if HAS_CHUNK:
        lo, hi = _chunk_q_range(lo, hi, start_n, seqlen_q, seqlen_k, chunk, BLOCK_N, BLOCK_M)
    if HAS_CHUNK or (HAS_MASK_MOD and not IS_SPARSE):
        # element masks the ranges do not describe: every block goes through the masked loop (block-sparse
        # full blocks never evaluate mask_mod, so only chunks collapse their band interior)
        full_lo = lo
        full_hi = lo
    if HAS_SEQUSED:
        # the whole block lies past seqused_k: no query sees it
        past = start_n * BLOCK_N >= seqlen_k
        full_lo = tl.where(past, lo, full_lo)
        full_hi = tl.where(past, lo, full_hi)
        hi = tl.where(past, lo, hi)
    kv_blk = (start_n * BLOCK_N) // SPARSE_KV

    tile = (k, v, offs_n, offs_d, offs_dv)
    rules = (seqlen_q, seqlen_k, window_left, window_right, chunk, full_lo, full_hi)
    for g in range(0, group):
        off_h = off_hk * group + g
        q_base = _seq_base(Q, off_b, off_h, q_start, stride_qb, stride_qh, stride_qm)
        do_base = _seq_base(DO, off_b, off_h, q_start, stride_dob, stride_doh, stride_dom)
        q_src, do_src = stream_sources(
            q_base, do_base, seqlen_q, stride_qm, stride_dom, SHAPE, BLOCK_D, BLOCK_DV
        )
        # Lse: the log2-unit lse that the dQ pass wrote, laid out like delta (see _bwd_dq_kernel)
        lse_base = Lse + off_b.to(tl.int64) * stride_deltab + off_h.to(tl.int64) * stride_deltah + q_start
        delta_base = Delta + off_b.to(tl.int64) * stride_deltab + off_h.to(tl.int64) * stride_deltah + q_start
        alibi_slope = 0.0
        if HAS_ALIBI:
            alibi_slope = tl.load(Alibi + off_b * stride_alb + off_h).to(tl.float32)
        bh = off_b * nheads + off_h
        streamed = (q_src, do_src, stride_qm, stride_dom, lse_base, delta_base)
        scoring = (sm_scale, softcap, alibi_slope, off_b, off_h)
        dropout = (seed, rng_offset, bh, dropout_p)
        fixed = (tile, streamed, rules, scoring, dropout)
        if IS_SPARSE:
            # only the query blocks listed for this key block are loaded, each list as one flattened loop of
            # query tiles. Partial blocks: every rule applies (causal / window / chunk / mask_mod); full blocks
            # skip mask_mod and pay for the built-in rules only in the tiles that reach outside the band
            # interior [full_lo, full_hi). Tiles outside the band are masked whole (no clamp to [lo, hi)).
            num_off = off_b.to(tl.int64) * stride_bn_b + off_h * stride_bn_h + kv_blk
            idx_off = off_b.to(tl.int64) * stride_bi_b + off_h * stride_bi_h + kv_blk * stride_bi_r
            n_part = checked_list_length(BlkNum + num_off, idx_cols)
            if HAS_SEQUSED:
                n_part = tl.where(past, 0, n_part)
            part = BlkIdx + idx_off
            dk, dv = _dkdv_inner(
                dk, dv, fixed, FNS, FLAGS, SHAPE, blocks=part, n_blocks=n_part, MASKED=True, FROM_LIST=True
            )
            if HAS_FULL:
                n_full = checked_list_length(FullNum + num_off, idx_cols)
                if HAS_SEQUSED:
                    n_full = tl.where(past, 0, n_full)
                full = FullIdx + idx_off
                dk, dv = _dkdv_inner(
                    dk, dv, fixed, FNS, FLAGS, SHAPE, blocks=full, n_blocks=n_full, MASKED=True, FROM_LIST=True,
                    DYN_MASK=True,
                )  # fmt: skip
        else:
            if IS_LOCAL:
                # the queries that see only part of the block (window / causal diagonal): masked
                dk, dv = _dkdv_inner(dk, dv, fixed, FNS, FLAGS, SHAPE, start=lo, end=full_lo, MASKED=True)
            # queries that see the whole block: no mask at all
            dk, dv = _dkdv_inner(dk, dv, fixed, FNS, FLAGS, SHAPE, start=full_lo, end=full_hi, MASKED=False)
            if HAS_RIGHT_EDGE:
                # the other window edge and the ragged last query block
                dk, dv = _dkdv_inner(dk, dv, fixed, FNS, FLAGS, SHAPE, start=full_hi, end=hi, MASKED=True)

    dk = dk * sm_scale
    if HAS_SEQUSED:
        keep_rows = offs_n[:, None] < seqlen_k
        dk = tl.where(keep_rows, dk, 0.0)
        dv = tl.where(keep_rows, dv, 0.0)
    dk_ptrs = _seq_base(DK, off_b, off_hk, k_start, stride_dkb, stride_dkh, stride_dkn)
    dk_ptrs = dk_ptrs + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :]
    dv_ptrs = _seq_base(DV, off_b, off_hk, k_start, stride_dvb, stride_dvh, stride_dvn)
    dv_ptrs = dv_ptrs + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :]
    if EVEN_D:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < seqlen_k_rows)
    else:
        dk_mask = (offs_n[:, None] < seqlen_k_rows) & (offs_d[None, :] < HEADDIM)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    if EVEN_DV:
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < seqlen_k_rows)
    else:
        dv_mask = (offs_n[:, None] < seqlen_k_rows) & (offs_dv[None, :] < HEADDIM_V)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Out, DLse, Lse2,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh, stride_deltab, stride_deltah,
    stride_dqb, stride_dqm, stride_dqh,
    stride_ob, stride_om, stride_oh, stride_dlb, stride_dlh,
    cu_seqlens_q, cu_seqlens_k, seqused_k,
    seqlen_q_dense, seqlen_k_dense,
    nheads, group,
    sm_scale, softcap, Alibi, stride_alb,
    window_left, window_right, chunk,
    dropout_p, seed, rng_offset,
    BlkNum, BlkIdx, FullNum, FullIdx, stride_bn_b, stride_bn_h, stride_bi_b, stride_bi_h, stride_bi_r,
    idx_cols,
    SEQ_BUCKET_Q, SEQ_BUCKET_K,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, IS_LOCAL: tl.constexpr, LPT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC_FP64: tl.constexpr,
    HAS_CHUNK: tl.constexpr, score_mod_fn: tl.constexpr, score_grad_fn: tl.constexpr, mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    IS_SPARSE: tl.constexpr, HAS_FULL: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    HAS_DLSE: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_RIGHT_EDGE: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), nheads, batch)``; dQ of one query block, and its rows' ``delta``
    (stored for the dK/dV pass, launched after this one).

    Block-sparse: ``BlkNum`` / ``BlkIdx`` are the block mask's ``kv_num_blocks`` / ``kv_indices``, ``FullNum`` /
    ``FullIdx`` its ``full_kv_*`` (same strides), ``idx_cols`` their last dim. Indices read from tensors are
    clamped as in :func:`_bwd_dkdv_kernel`."""
    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    # what every loop below holds fixed, besides the runtime tuples (see fa_backward.backward_inner)
    FNS: tl.constexpr = (score_mod_fn, score_grad_fn, mask_mod_fn)
    FLAGS: tl.constexpr = (
        HAS_SCORE_MOD,
        HAS_MASK_MOD,
        HAS_CHUNK,
        IS_LOCAL,
        HAS_SOFTCAP,
        HAS_ALIBI,
        HAS_DROPOUT,
    )
    SHAPE: tl.constexpr = (HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, BLOCK_N, SPARSE_KV, USE_TMA)
    # last query blocks first: under a causal mask they see the most keys (longest programs start early; LPT:
    # every head's, see fa_core.scheduling)
    start_m, off_h, off_b = lpt_program_ids(LPT, True)
    off_hk = off_h // group

    q_start, seqlen_q, k_start, _seqlen_k_rows, seqlen_k = checked_seq_bounds(
        off_b, cu_seqlens_q, cu_seqlens_k, seqused_k, seqlen_q_dense, seqlen_k_dense, IS_VARLEN, HAS_SEQUSED
    )
    if start_m * BLOCK_M >= seqlen_q:
        return

    q_base = _seq_base(Q, off_b, off_h, q_start, stride_qb, stride_qh, stride_qm)
    do_base = _seq_base(DO, off_b, off_h, q_start, stride_dob, stride_doh, stride_dom)
    k_base = _seq_base(K, off_b, off_hk, k_start, stride_kb, stride_kh, stride_kn)
    v_base = _seq_base(V, off_b, off_hk, k_start, stride_vb, stride_vh, stride_vn)
    k_src, v_src = stream_sources(k_base, v_base, seqlen_k, stride_kn, stride_vn, SHAPE, BLOCK_D, BLOCK_DV)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(q_base, offs_m, seqlen_q, stride_qm, offs_d, HEADDIM, EVEN_D)
    do = _load_rows(do_base, offs_m, seqlen_q, stride_dom, offs_dv, HEADDIM_V, EVEN_DV)
    lse = tl.load(
        Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + offs_m,
        mask=offs_m < seqlen_q,
        other=float("inf"),
    )
    # delta = rowsum(dout * out) (- dlse) of these rows, before anything else can end the program: the dK/dV
    # pass reads it for every row, including rows that see no key
    o_base = _seq_base(Out, off_b, off_h, q_start, stride_ob, stride_oh, stride_om)
    o = _load_rows(o_base, offs_m, seqlen_q, stride_om, offs_dv, HEADDIM_V, EVEN_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta = delta - tl.load(
            DLse + off_b.to(tl.int64) * stride_dlb + off_h.to(tl.int64) * stride_dlh + q_start + offs_m,
            mask=offs_m < seqlen_q,
            other=0.0,
        ).to(tl.float32)
    delta_off = off_b.to(tl.int64) * stride_deltab + off_h.to(tl.int64) * stride_deltah + q_start + offs_m
    tl.store(Delta + delta_off, delta, mask=offs_m < seqlen_q)
    # the lse in log2 units, laid out like delta: the dK/dV pass reads it per query tile, and would otherwise
    # scale BLOCK_M values in every iteration of its loop
    tl.store(Lse2 + delta_off, lse * LOG2E, mask=offs_m < seqlen_q)
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + off_b * stride_alb + off_h).to(tl.float32)
    bh = off_b * nheads + off_h
    if ACC_FP64:
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = kv_range(
        start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, IS_LOCAL
    )
    if HAS_CHUNK:
        lo, hi = chunk_kv_range(lo, hi, start_m, seqlen_q, seqlen_k, chunk, BLOCK_M, BLOCK_N)
    if HAS_CHUNK or (HAS_MASK_MOD and not IS_SPARSE):
        full_lo = lo
        full_hi = lo
    tile = (q, do, lse, delta, offs_m, offs_d, offs_dv)
    streamed = (k_src, v_src, stride_kn, stride_vn)
    rules = (seqlen_q, seqlen_k, window_left, window_right, chunk, full_lo, full_hi)
    scoring = (sm_scale, softcap, alibi_slope, off_b, off_h)
    dropout = (seed, rng_offset, bh, dropout_p)
    fixed = (tile, streamed, rules, scoring, dropout)
    if IS_SPARSE:
        # one flattened loop of key tiles per list, as in _bwd_dkdv_kernel
        q_blk = (start_m * BLOCK_M) // SPARSE_Q
        num_off = off_b.to(tl.int64) * stride_bn_b + off_h * stride_bn_h + q_blk
        idx_off = off_b.to(tl.int64) * stride_bi_b + off_h * stride_bi_h + q_blk * stride_bi_r
        n_part = checked_list_length(BlkNum + num_off, idx_cols)
        part = BlkIdx + idx_off
        dq = _dq_inner(
            dq, fixed, FNS, FLAGS, SHAPE, blocks=part, n_blocks=n_part, MASKED=True, FROM_LIST=True
        )
        if HAS_FULL:
            n_full = checked_list_length(FullNum + num_off, idx_cols)
            full = FullIdx + idx_off
            dq = _dq_inner(
                dq, fixed, FNS, FLAGS, SHAPE, blocks=full, n_blocks=n_full, MASKED=True, FROM_LIST=True,
                DYN_MASK=True,
            )  # fmt: skip
    else:
        # the masked edge loops exist only where the host says they can run (as in the forward kernel):
        # a finite left window; a right edge (causal / window / chunk / mask_mod / keys ending inside a tile)
        if HAS_WINDOW_LEFT:
            dq = _dq_inner(dq, fixed, FNS, FLAGS, SHAPE, start=lo, end=full_lo, MASKED=True)
        dq = _dq_inner(dq, fixed, FNS, FLAGS, SHAPE, start=full_lo, end=full_hi, MASKED=False)
        if HAS_RIGHT_EDGE:
            dq = _dq_inner(dq, fixed, FNS, FLAGS, SHAPE, start=full_hi, end=hi, MASKED=True)

    dq = dq * sm_scale
    dq_ptrs = (
        DQ
        + off_b.to(tl.int64) * stride_dqb
        + off_h.to(tl.int64) * stride_dqh
        + q_start.to(tl.int64) * stride_dqm
        + offs_m[:, None].to(tl.int64) * stride_dqm
        + offs_d[None, :]
    )
    if EVEN_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < seqlen_q)
    else:
        tl.store(
            dq_ptrs,
            dq.to(DQ.dtype.element_ty),
            mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEADDIM),
        )


# ---------------------------------------------------------------------------------------------- autotune
# configs, key and pruning: fa_backward.backward_configs (its names stay importable from here)
# fast_autotuner: O(1) argument-name lookups in the autotuner's per-call filtering (launch overhead)
dkdv_kernel = fast_autotuner(
    triton.autotune(
        configs=DKDV_CONFIGS,
        key=TUNE_KEY,
        prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M")},
    )(_bwd_dkdv_kernel)
)
dq_kernel = fast_autotuner(
    triton.autotune(
        configs=DQ_CONFIGS,
        key=[*TUNE_KEY, "HAS_WINDOW_LEFT"],  # the dK/dV kernel has no left-window loop to compile out
        prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N")},
    )(_bwd_dq_kernel)
)
