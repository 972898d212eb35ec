"""The forward attention kernel: one Triton kernel for dense and varlen, every feature a ``tl.constexpr``.

Layout: a program owns ``BLOCK_M`` query rows of one (batch, head) and streams the key blocks that
:func:`fa_core.masking.kv_range` says it can see, with an online softmax in the log2 domain. Blocks
strictly inside the visible band skip all masking; only the edge blocks pay for it.

The tile loads and the inner loop are in :mod:`fa_core.forward_inner`, the autotune space in
:mod:`fa_core.forward_configs` (its tile lists are re-exported here).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.forward_configs import (
    FALLBACK_TILE,
    FP8_TILES,
    FWD_CONFIGS,
    FWD_TILES,
    TILE_FAMILIES,
    fast_autotuner,
    prune_configs,
)
from fa_core.forward_inner import FwdFlags, KVTiles, ScoreArgs, fwd_inner, fwd_step, load_tile, page_of
from fa_core.masking import chunk_kv_range, clamp, kv_range, varlen_bounds
from fa_core.scheduling import lpt_program_ids

__all__ = ["FALLBACK_TILE", "FP8_TILES", "FWD_CONFIGS", "FWD_TILES", "fwd_kernel"]

# the historical private name: bench/bench_fp8.py mutates it in place (the same dict) to force one tile
_FAMILIES = TILE_FAMILIES


@triton.autotune(
    configs=FWD_CONFIGS,
    key=[
        "HEADDIM",
        "HEADDIM_V",
        "SEQ_BUCKET_Q",
        "SEQ_BUCKET_K",
        "IS_LOCAL",
        "HAS_RIGHT_EDGE",
        "IS_VARLEN",
        "HAS_DROPOUT",
        "TMA_OK",
        "IS_FP8",
        "V_T",
        "IS_SPARSE",
        "SPARSE_Q",
        "SPARSE_KV",
        "PAGED",
        "PAGE_SIZE",
    ],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit(do_not_specialize=["total_q", "total_k", "bt_cols", "num_pages", "kv_idx_cols", "full_idx_cols"])
def fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_lb,
    stride_lh,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    seqlen_q_dense,
    seqlen_k_dense,
    nheads,
    group,
    sm_scale,
    softcap,
    Alibi,
    stride_alb,
    Descale,
    stride_desc_w,
    stride_desc_b,
    KvNum,
    KvIdx,
    stride_nb_b,
    stride_nb_h,
    stride_idx_b,
    stride_idx_h,
    stride_idx_q,
    FullNum,
    FullIdx,
    stride_fnb_b,
    stride_fnb_h,
    stride_fidx_b,
    stride_fidx_h,
    stride_fidx_q,
    window_left,
    window_right,
    attention_chunk,
    Sink,
    dropout_p,
    seed,
    rng_offset,
    SEQ_BUCKET_Q,
    SEQ_BUCKET_K,
    total_q,
    total_k,
    LeftPad,
    BlockTable,
    stride_bt_b,
    bt_cols,
    num_pages,
    kv_idx_cols,
    full_idx_cols,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    LPT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_RIGHT_EDGE: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_SINK: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    score_mod_fn: tl.constexpr,
    mask_mod_fn: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr,
    HAS_MASK_MOD: tl.constexpr,
    IS_SPARSE: tl.constexpr,
    HAS_FULL: tl.constexpr,
    SPARSE_Q: tl.constexpr,
    SPARSE_KV: tl.constexpr,
    IS_FP8: tl.constexpr,
    V_T: tl.constexpr,
    P_SHIFT: tl.constexpr,
    FUSED_SCALE: tl.constexpr,
    TMA_OK: tl.constexpr,
    EVEN_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), nheads, batch)``.

    Dense: q ``(batch, seqlen_q, nheads, d)``, lse ``(batch, nheads, seqlen_q)``.
    Varlen: q ``(total_q, nheads, d)`` (batch strides 0, rows offset by ``cu_seqlens``), lse ``(nheads, total_q)``.
    ``V_T``: V is stored transposed, ``(batch, nheads_k, headdim_v, seqlen_k)`` (varlen ``(nheads_k,
    headdim_v, total_k)``), ``stride_vn`` = 1 and ``stride_vd`` its row stride (the FP8 path: Hopper's FP8
    tensor-core dot needs a K-major V). ``P_SHIFT``: probabilities are computed as ``p * 2^P_SHIFT``.
    ``HAS_LEFTPAD`` (varlen): sequence b's keys start ``LeftPad[b]`` rows into its slice, its length (from
    ``cu_seqlens_k`` or ``seqused_k``) shrinks by as much (flash-attn's ``leftpad_k``). ``PAGED`` (varlen): K / V
    are a paged cache ``(num_pages, PAGE_SIZE, nheads_k, d)`` (``stride_kb`` / ``stride_vb``: the page strides),
    key j of sequence b in page ``BlockTable[b, (leftpad + j) // PAGE_SIZE]``; ``cu_seqlens_k`` / ``seqused_k``
    give the lengths, capped at the table row's ``bt_cols * PAGE_SIZE``.
    ``total_q`` / ``total_k``, ``kv_idx_cols`` / ``full_idx_cols``, ``num_pages``: the bounds every index read
    from a tensor's values is clamped to.
    ``EVEN_M``: every query block is full (dense, seqlen_q a multiple of MAX_BLOCK_M = 128): the Q load and
    the O / LSE stores drop their row masks (H200, 128x128 tile: d128 non-causal 1k 405 -> 419, 4k 477 -> 486
    TFLOP/s, masked and unmasked variants timed in one process).
    """
    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    # the heaviest query blocks (right end of a causal band) start first: a shorter tail
    start_m, off_h, off_b = lpt_program_ids(LPT, IS_LOCAL)
    off_hk = off_h // group

    # Every value read from an index tensor (cu_seqlens, seqused_k, leftpad_k, block table, block-sparse lists)
    # is clamped before it addresses memory: with host value checks off (CUDA graphs, torch.compile, the
    # value_checks setting) garbage values give garbage out, never a read or write outside the tensors.
    # Scalar clamps once per program; valid values pass unchanged.
    if IS_VARLEN:
        q_start, seqlen_q = varlen_bounds(cu_seqlens_q, off_b, total_q)
        if PAGED:
            # keys through the block table: cu_seqlens_k gives lengths only, at most the table row's capacity
            k_start = 0
            k_len = tl.load(cu_seqlens_k + off_b + 1) - tl.load(cu_seqlens_k + off_b)
            seqlen_k = clamp(k_len, 0, bt_cols * PAGE_SIZE)
        else:
            k_start, seqlen_k = varlen_bounds(cu_seqlens_k, off_b, total_k)
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_dense
        seqlen_k = seqlen_k_dense
    if HAS_SEQUSED:
        if PAGED:
            seqlen_k = clamp(tl.load(seqused_k + off_b), 0, bt_cols * PAGE_SIZE)
        else:
            seqlen_k = clamp(tl.load(seqused_k + off_b), 0, seqlen_k)
    # left padding (flash-attn's leftpad_k): the keys start leftpad rows into the sequence's slice (a paged
    # sequence: into its first page) and the length (cu_seqlens_k's or seqused_k's) shrinks by as much
    k_row0 = 0
    if HAS_LEFTPAD:
        leftpad = clamp(tl.load(LeftPad + off_b), 0, seqlen_k)
        seqlen_k = seqlen_k - leftpad
        if PAGED:
            k_row0 = leftpad
        else:
            k_start = k_start + leftpad
    if start_m * BLOCK_M >= seqlen_q:
        return

    # 64-bit base offsets: batch * stride can pass 2^31 elements on large inputs
    q_base = (
        Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    )
    if PAGED:
        # the kv head in page 0; pages are stride_kb / stride_vb apart (fwd_step looks them up)
        k_base = K + off_hk.to(tl.int64) * stride_kh
        v_base = V + off_hk.to(tl.int64) * stride_vh
    else:
        k_base = (
            K
            + off_b.to(tl.int64) * stride_kb
            + off_hk.to(tl.int64) * stride_kh
            + tl.cast(k_start, tl.int64) * stride_kn
        )
        v_base = (
            V
            + off_b.to(tl.int64) * stride_vb
            + off_hk.to(tl.int64) * stride_vh
            + tl.cast(k_start, tl.int64) * stride_vn
        )
    o_base = (
        Out
        + off_b.to(tl.int64) * stride_ob
        + off_h.to(tl.int64) * stride_oh
        + q_start.to(tl.int64) * stride_om
    )

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # paged: a tile lies in one page when pages hold whole tiles (one block-table read per tile, descriptor
    # loads possible); else one read per key and pointer loads
    PAGE_TILE: tl.constexpr = PAGED and PAGE_SIZE >= BLOCK_N and not HAS_LEFTPAD
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(
            q_base, shape=[seqlen_q, HEADDIM], strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D]
        )
        if PAGED:
            if PAGE_TILE:
                # the whole cache of this kv head as rows, pages back to back (the launcher allows descriptors
                # only then); fwd_step zeroes V rows past the sequence's end (real cache rows, not padding)
                k_desc = tl.make_tensor_descriptor(
                    k_base,
                    shape=[num_pages * PAGE_SIZE, HEADDIM],
                    strides=[stride_kn, 1],
                    block_shape=[BLOCK_N, BLOCK_D],
                )
                v_desc = tl.make_tensor_descriptor(
                    v_base,
                    shape=[num_pages * PAGE_SIZE, HEADDIM_V],
                    strides=[stride_vn, 1],
                    block_shape=[BLOCK_N, BLOCK_DV],
                )
            else:
                k_desc = k_base
                v_desc = v_base
        else:
            k_desc = tl.make_tensor_descriptor(
                k_base, shape=[seqlen_k, HEADDIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D]
            )
            if V_T:
                if IS_VARLEN:
                    # a sequence's first key is not 16-byte aligned in the transposed V: pointer loads
                    v_desc = v_base
                else:
                    v_desc = tl.make_tensor_descriptor(
                        v_base,
                        shape=[HEADDIM_V, seqlen_k],
                        strides=[stride_vd, 1],
                        block_shape=[BLOCK_DV, BLOCK_N],
                    )
            else:
                v_desc = tl.make_tensor_descriptor(
                    v_base,
                    shape=[seqlen_k, HEADDIM_V],
                    strides=[stride_vn, 1],
                    block_shape=[BLOCK_N, BLOCK_DV],
                )
        q = q_desc.load([start_m * BLOCK_M, 0])
    else:
        k_desc = k_base
        v_desc = v_base
        q = load_tile(
            q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
            offs_m,
            seqlen_q,
            offs_d,
            HEADDIM,
            not EVEN_M,
            EVEN_D,
        )

    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + off_b * stride_alb + off_h).to(tl.float32)
    bh = off_b * nheads + off_h
    if IS_FP8:
        # per-(batch, kv-head) dequantisation: q and k scales fold into the softmax scale, v's into the output
        desc = Descale + off_b * stride_desc_b + off_hk
        sm_scale = sm_scale * tl.load(desc) * tl.load(desc + stride_desc_w)
        v_descale = tl.load(desc + 2 * stride_desc_w)

    if FUSED_SCALE and IS_FP8:
        # plain scores take the row max on raw q @ k^T and fold the scale into exp2's FMA (fwd_step), which
        # needs a positive scale. 16-bit inputs get FUSED_SCALE only with softmax_scale > 0 (host-known); the
        # FP8 descales live on the device: a negative product flips q's sign bits instead (exact), a zero one
        # becomes 1e-30 (scores equal 0 to fp32 precision; a true 0 would turn masked 0 * -inf into NaN)
        q_bits = q.to(tl.uint8, bitcast=True)
        q = tl.where(sm_scale < 0, (q_bits ^ 0x80).to(tl.uint8), q_bits).to(q.dtype, bitcast=True)
        sm_scale = tl.maximum(tl.abs(sm_scale), 1e-30)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = kv_range(
        start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, IS_LOCAL
    )
    if HAS_CHUNK:
        # chunked attention: only the chunks of this block's rows; the chunk edges are element masks the
        # block ranges cannot see: every block goes through a masked loop
        lo, hi = chunk_kv_range(lo, hi, start_m, seqlen_q, seqlen_k, attention_chunk, BLOCK_M, BLOCK_N)
        full_lo = lo
        full_hi = lo
    # what every call of the inner loop shares: compile-time features, the K/V tile sources, the score rules
    F: tl.constexpr = FwdFlags(
        score_mod_fn,
        mask_mod_fn,
        HAS_SCORE_MOD,
        IS_LOCAL,
        HAS_CHUNK,
        HAS_SOFTCAP,
        HAS_ALIBI,
        HAS_DROPOUT,
        HEADDIM,
        HEADDIM_V,
        EVEN_D,
        EVEN_DV,
        BLOCK_N,
        SPARSE_KV,
        # descriptor loads of K / V (paged: only where a tile lies in one page)
        USE_TMA and (not PAGED or PAGE_TILE),
        V_T,
        IS_VARLEN,
        P_SHIFT,
        FUSED_SCALE,
        PAGED,
        PAGE_SIZE,
        PAGE_TILE,
        # smaller pages, no left padding: tiles start on page boundaries
        PAGED and not HAS_LEFTPAD,
    )
    kv = KVTiles(
        k_base,
        v_base,
        k_desc,
        v_desc,
        stride_kn,
        stride_vn,
        stride_vd,
        offs_d,
        offs_dv,
        BlockTable + off_b.to(tl.int64) * stride_bt_b,
        bt_cols,
        num_pages,
        stride_kb,
        stride_vb,
        k_row0,
    )
    sc = ScoreArgs(
        offs_m,
        seqlen_q,
        seqlen_k,
        sm_scale,
        softcap,
        alibi_slope,
        window_left,
        window_right,
        attention_chunk,
        seed,
        rng_offset,
        bh,
        dropout_p,
        off_b,
        off_h,
    )
    if IS_SPARSE:
        # block-sparse: only the key blocks listed for this query block are loaded, each list as one flattened
        # loop of key tiles. Partial blocks: every rule applies inside them (causal / window / chunk /
        # mask_mod); full blocks skip mask_mod, and pay for the causal / window / chunk / ragged-end masks only
        # in the tiles that reach outside the band interior [full_lo, full_hi) that kv_range computed
        q_blk = (start_m * BLOCK_M) // SPARSE_Q
        nb_ptr = KvNum + off_b.to(tl.int64) * stride_nb_b + off_h * stride_nb_h + q_blk
        idx_ptr = KvIdx + off_b.to(tl.int64) * stride_idx_b + off_h * stride_idx_h + q_blk * stride_idx_q
        n_blocks = clamp(tl.load(nb_ptr), 0, kv_idx_cols)
        acc, l_i, m_i = fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            kv,
            sc,
            lo,
            hi,
            idx_ptr,
            n_blocks,
            full_lo,
            full_hi,
            F,
            HAS_MASK_MOD=HAS_MASK_MOD,
            MASKED=True,
            FROM_LIST=True,
            DYN_MASK=False,
            ZERO_V=False,
        )
        if HAS_FULL:
            fnb_ptr = FullNum + off_b.to(tl.int64) * stride_fnb_b + off_h * stride_fnb_h + q_blk
            fidx_ptr = (
                FullIdx + off_b.to(tl.int64) * stride_fidx_b + off_h * stride_fidx_h + q_blk * stride_fidx_q
            )
            n_full = clamp(tl.load(fnb_ptr), 0, full_idx_cols)
            # full blocks: no mask_mod; the band rules only in tiles outside [full_lo, full_hi)
            acc, l_i, m_i = fwd_inner(
                acc,
                l_i,
                m_i,
                q,
                kv,
                sc,
                lo,
                hi,
                fidx_ptr,
                n_full,
                full_lo,
                full_hi,
                F,
                HAS_MASK_MOD=False,
                MASKED=True,
                FROM_LIST=True,
                DYN_MASK=True,
                ZERO_V=False,
            )
    else:
        if HAS_MASK_MOD:
            # element masks the block ranges cannot see: every block goes through the masked (right) loop
            full_lo = lo
            full_hi = lo
        if HAS_WINDOW_LEFT:
            # left edge of the band (sliding window): masked; compiled out for plain causal
            acc, l_i, m_i = fwd_inner(
                acc,
                l_i,
                m_i,
                q,
                kv,
                sc,
                lo,
                full_lo,
                KvIdx,
                0,
                full_lo,
                full_hi,
                F,
                HAS_MASK_MOD=HAS_MASK_MOD,
                MASKED=True,
                FROM_LIST=False,
                DYN_MASK=False,
                ZERO_V=True,
            )
        if HAS_RIGHT_EDGE:
            # right edge: the causal diagonal / window edge and the ragged end of the keys. Compiled out when
            # it is empty for every block (the host knows: no rule cuts the band, keys fill whole tiles): even
            # a zero-trip masked loop cost 7-13% at d128 non-causal on an H200 (its software pipeline).
            # It runs BEFORE the interior (FlagGems' order): d128 causal, 128x128 tile, H200: 8k 422 -> 476,
            # 16k 460 -> 514 TFLOP/s (edge-first vs interior-first timed in one process)
            # paged descriptor loads, causal / window: only the tile holding the keys' ragged end reads cache
            # rows past seqlen_k, whose V it must zero (a round trip of the tile through registers); the
            # diagonal tiles before it skip that, and the ragged tile runs on its own after them
            PEEL_TAIL: tl.constexpr = PAGED and USE_TMA and PAGE_TILE and IS_LOCAL
            edge_end = hi
            if PEEL_TAIL:
                edge_end = tl.maximum(full_hi, tl.minimum(hi, (sc.seqlen_k // BLOCK_N) * BLOCK_N))
            acc, l_i, m_i = fwd_inner(
                acc,
                l_i,
                m_i,
                q,
                kv,
                sc,
                full_hi,
                edge_end,
                KvIdx,
                0,
                full_lo,
                full_hi,
                F,
                HAS_MASK_MOD=HAS_MASK_MOD,
                MASKED=True,
                FROM_LIST=False,
                DYN_MASK=False,
                ZERO_V=not PEEL_TAIL,
            )
            if PEEL_TAIL:
                if edge_end < hi:
                    acc, l_i, m_i = fwd_step(
                        acc,
                        l_i,
                        m_i,
                        q,
                        kv,
                        sc,
                        edge_end,
                        True,
                        page_of(kv, edge_end, PAGE_SIZE),
                        F,
                        HAS_MASK_MOD=HAS_MASK_MOD,
                        MASKED=True,
                        DYN_MASK=False,
                        ZERO_V=True,
                    )
        # interior: no mask at all
        acc, l_i, m_i = fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            kv,
            sc,
            full_lo,
            full_hi,
            KvIdx,
            0,
            full_lo,
            full_hi,
            F,
            HAS_MASK_MOD=HAS_MASK_MOD,
            MASKED=False,
            FROM_LIST=False,
            DYN_MASK=False,
            ZERO_V=False,
        )
    if HAS_SINK:
        # learnable sink (gpt-oss): one extra logit per head in every row's denominator, none in the output
        sink = tl.load(Sink + off_h).to(tl.float32) * 1.4426950408889634
        m_sink = tl.maximum(m_i, sink)
        alpha_sink = tl.exp2(m_i - m_sink)
        l_i = l_i * alpha_sink + tl.exp2(sink - m_sink + P_SHIFT)
        acc = acc * alpha_sink[:, None]
        m_i = m_sink
    # rows with no visible key: out 0, lse +inf (flash-attn 2.8's convention)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    scale = 1.0 / l_safe
    if HAS_DROPOUT:
        scale = scale / (1.0 - dropout_p)
    if IS_FP8:
        scale = scale * v_descale
    acc = acc * scale[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe) - P_SHIFT) * 0.6931471805599453)
    lse_ptrs = Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :]
    if USE_TMA:
        # the descriptor clips rows past seqlen_q and columns past HEADDIM_V
        o_desc = tl.make_tensor_descriptor(
            o_base, shape=[seqlen_q, HEADDIM_V], strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_DV]
        )
        o_desc.store([start_m * BLOCK_M, 0], acc.to(Out.dtype.element_ty))
    elif EVEN_DV:
        if EVEN_M:
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty))
        else:
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < seqlen_q)
    else:
        tl.store(
            o_ptrs,
            acc.to(Out.dtype.element_ty),
            mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEADDIM_V),
        )


# launch overhead: the autotuner's per-call argument filtering is quadratic in the argument count
fwd_kernel = fast_autotuner(fwd_kernel)
