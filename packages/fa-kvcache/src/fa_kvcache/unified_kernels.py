"""Triton kernels of :func:`fa_kvcache.unified.unified_attention`: the attention of a mixed batch (decode rows
and prefill chunks) over a paged cache in one launch, the split combine, and the paged append.

Unified attention (:func:`unified_kernel`)
    Query rows are packed ``(total_q, nheads, d)``; request ``b`` owns rows ``[cu_seqlens_q[b],
    cu_seqlens_q[b + 1])``, the last ``seqlen_q`` of its ``seqused_k[b]`` keys (bottom-right alignment). A
    program owns one tile of ``QROWS = BLOCK_M // HB`` query positions of one request times ``HB`` query heads
    of one GQA group (row ``r`` -> position ``r // HB``, head ``r % HB``, as the split-KV decode kernel packs
    them), so each K/V tile read serves the whole group. Grid axis 0 enumerates the tiles of every request:
    request ``b``'s tiles start at ``cu_seqlens_q[b] // QROWS + b``, so ``total_q // QROWS + batch``
    programs cover any split of ``total_q`` rows into ``batch`` requests, a size known without reading
    ``cu_seqlens_q`` (CUDA-graph capturable); a program finds its request by a binary search over those
    starts and exits when its tile lies past the request's rows.

    Split-KV: a request whose rows fit the small tile (``BLOCK_M_SMALL // HB`` positions: decode, short
    speculative runs) has its key range shared out over ``num_splits`` programs (grid axis 2); each writes a
    normalised partial output and its lse (fp32) and :func:`combine_kernel` merges them. Longer requests
    (prefill chunks) are not split: their split-0 programs write the output directly, the others exit.

    FP8 cache: K / V tiles are converted to q's dtype after the load; ``k_descale[b, hk]`` multiplies the
    softmax scale (scores ``q @ (k * k_descale)``) and ``v_descale[b, hk]`` the fp32 accumulator. With
    ``F16_DOTS`` (the host sets it for FP8 caches on GPUs) q is rescaled by a power of two into fp16's range
    and rounded to fp16 once per program (:func:`_q_to_f16`), so the tiles convert to fp16 (sm_90's native
    e4m3x2 -> f16x2, where bf16 costs three more instructions per element) and both dots run in fp16 with fp32
    accumulators.

Every index read from a tensor (``cu_seqlens_q``, ``seqused_k``, ``block_table``) is clamped before it
addresses memory: garbage values give meaningless output, never an access outside the tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fa_core.masking import clamp, kv_range, varlen_bounds
from fa_kvcache.append import _write_rows
from fa_kvcache.kernels import _attn_range, _finish_rows, _merge_splits, _merged_rows, page_offsets

__all__ = ["append_paged_kernel", "combine_kernel", "unified_kernel"]


@triton.jit
def _find_request(CuSeqlensQ, pid_t, batch, total_q, search_iters, QROWS: tl.constexpr):
    """The request whose tiles hold tile ``pid_t``: the last ``b`` with ``cu_seqlens_q[b] // QROWS + b <=
    pid_t`` (entries clamped to ``[0, total_q]``), in ``[0, batch)``."""
    lo = pid_t * 0
    hi = lo + batch
    for _ in range(search_iters):
        live = lo < hi
        mid = (lo + hi) // 2
        val = clamp(tl.load(CuSeqlensQ + mid), 0, total_q) // QROWS + mid
        lo = tl.where(live & (val <= pid_t), mid + 1, lo)
        hi = tl.where(live & (val > pid_t), mid, hi)
    return clamp(lo - 1, 0, batch - 1)


@triton.jit
def _q_to_f16(q, scale):
    """``(q16, scale')``: q rescaled by a power of two ``2^e`` and rounded to fp16, and ``scale' = scale *
    2^-e``, so ``(q16 @ k) * scale' == (q @ k) * scale`` up to fp16's rounding of q. ``2^e`` brings the tile's
    largest ``|q|`` into ``[1, 2)`` (``e`` clamped to ``[-100, 100]``): no element exceeds fp16's range whatever
    q's magnitude, bf16's 8 significant bits fit fp16's 11 exactly, and only elements more than ``2^14`` below
    the tile's largest (contributing less than fp16's rounding of the largest) fall into fp16's subnormals;
    ``|q16 . k|`` stays below ``2 * 448 * d``. The power of two is built from the exponent bits (exact)."""
    amax = tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0)
    exp = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of amax (0 for 0 / subnormals)
    e = tl.minimum(tl.maximum(127 - exp, -100), 100)  # 2^e * amax in [1, 2)
    up = ((e + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return (q.to(tl.float32) * up).to(tl.float16), scale * down


@triton.jit
def _tile(
    Q,
    Out,
    Lse,
    OutPart,
    LsePart,
    Alibi,
    Sink,
    KDescale,
    VDescale,
    k_base,
    v_base,
    bt_base,
    b,
    hk,
    chunk,
    split,
    n_split,
    qblock,
    q_start,
    seqlen_q,
    seqlen_k,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    stride_om,
    stride_oh,
    stride_alb,
    stride_kdb,
    stride_kdh,
    stride_vdb,
    stride_vdh,
    total_q,
    batch,
    num_blocks,
    nheads,
    group,
    sm_scale,
    softcap,
    window_left,
    window_right,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr,
    PAGE_TILE: tl.constexpr,
    BT_PRELOAD: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SINK: tl.constexpr,
    HAS_DESCALE: tl.constexpr,
    F16_DOTS: tl.constexpr,
    PARTIAL: tl.constexpr,
    PART_ROWS: tl.constexpr,
    HB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program's work: query tile ``qblock`` (``BLOCK_M // HB`` positions x ``HB`` heads of kv head
    ``hk``'s group, head chunk ``chunk``) of request ``b`` over split ``split`` of ``n_split`` of its key
    range; ``PARTIAL``: store a normalised partial output and its lse (rows ``(split, b, position, head)`` of
    ``PART_ROWS`` positions per request), else the final rows."""
    QROWS: tl.constexpr = BLOCK_M // HB
    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    offs_r = tl.arange(0, BLOCK_M)
    q_pos = qblock * QROWS + offs_r // HB
    g = chunk * HB + offs_r % HB
    head = hk * group + g
    row_ok = (q_pos < seqlen_q) & (g < group)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = (q_start + q_pos).to(tl.int64)
    q_ptrs = Q + q_rows[:, None] * stride_qm + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)
    alibi_slope = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + b * stride_alb + head, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    scale = sm_scale
    if HAS_DESCALE:
        scale = sm_scale * tl.load(KDescale + b * stride_kdb + hk * stride_kdh)
    if F16_DOTS:
        # FP8 cache: e4m3 converts to fp16 in one instruction per pair (sm_90's cvt e4m3x2 -> f16x2); to bf16
        # it takes three more per element (through fp16, a quarter-rate F2F each, and a repack), which bound
        # the decode key loop. So the K / V tiles convert to fp16 (the key loop converts to q's dtype), q
        # once per program, and the dots run in fp16 (P too) with fp32 accumulators
        q, scale = _q_to_f16(q, scale)

    lo, full_lo, full_hi, hi = kv_range(
        qblock, seqlen_q, seqlen_k, window_left, window_right, QROWS, BLOCK_N, IS_LOCAL
    )
    # this split's share of the key blocks; split edges stay multiples of BLOCK_N from lo
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), n_split)
    s_lo = tl.minimum(lo + split * per_split * BLOCK_N, hi)
    s_hi = tl.minimum(s_lo + per_split * BLOCK_N, hi)
    acc, l_i, m_i = _attn_range(
        q, k_base, v_base, bt_base, 0, q_pos, offs_d, offs_dv, seqlen_q, seqlen_k, s_lo, s_hi, full_lo,
        full_hi, stride_kb, stride_kn, stride_vb, stride_vn, num_blocks, scale, softcap, alibi_slope,
        window_left, window_right, 0, IS_LOCAL=IS_LOCAL, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_CHUNK=False,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, PAGED=True, PAGE=PAGE, PAGE_TILE=PAGE_TILE,
        BT_PRELOAD=BT_PRELOAD, HEADDIM=HEADDIM, HEADDIM_V=HEADDIM_V, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV,
        BLOCK_M=BLOCK_M, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    if HAS_DESCALE:
        acc = acc * tl.load(VDescale + b * stride_vdb + hk * stride_vdh)
    if PARTIAL:
        # empty splits carry lse = -inf (weight 0 in the combine)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        prow = ((split * batch + b).to(tl.int64) * PART_ROWS + q_pos) * nheads + head
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(LsePart + prow, lse, mask=row_ok)
        o_ptrs = OutPart + prow[:, None] * HEADDIM_V + offs_dv[None, :]
        tl.store(o_ptrs, acc / l_safe[:, None], mask=row_ok[:, None] & (offs_dv[None, :] < HEADDIM_V))
    else:
        _store_final(Out, Lse, Sink, acc, l_i, m_i, head, q_rows, row_ok, offs_dv, total_q, stride_om,
                     stride_oh, HEADDIM_V, HAS_SINK)  # fmt: skip


@triton.jit
def unified_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    OutPart,
    LsePart,
    BlockTable,
    CuSeqlensQ,
    SequsedK,
    Alibi,
    Sink,
    KDescale,
    VDescale,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_om,
    stride_oh,
    stride_btb,
    stride_alb,
    stride_kdb,
    stride_kdh,
    stride_vdb,
    stride_vdh,
    total_q,
    batch,
    bt_cols,
    num_blocks,
    nheads,
    nheads_k,
    group,
    n_head_chunks,
    num_splits,
    search_iters,
    sm_scale,
    softcap,
    window_left,
    window_right,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr,
    PAGE_TILE: tl.constexpr,
    BT_PRELOAD: tl.constexpr,
    BT_PRELOAD_SPLIT: tl.constexpr,
    IS_LOCAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SINK: tl.constexpr,
    HAS_DESCALE: tl.constexpr,
    F16_DOTS: tl.constexpr,
    SPLIT: tl.constexpr,
    HB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_M_SMALL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(total_q // QROWS + batch, nheads_k * n_head_chunks, num_splits)``, ``QROWS = BLOCK_M // HB``.

    q ``(total_q, nheads, d)``; cache ``(num_blocks, PAGE, nheads_k, d[v])``; block_table ``(batch,
    bt_cols)``; out ``(total_q, nheads, dv)``; lse ``(nheads, total_q)`` fp32; partials (``SPLIT``)
    ``(num_splits, batch, BLOCK_M_SMALL // HB, nheads[, dv])`` fp32, contiguous. ``BT_PRELOAD`` / ``BT_PRELOAD_SPLIT``:
    block-table entries preloaded by unsplit / split programs (0: read in the key loop).

    Requests whose rows fit ``BLOCK_M_SMALL // HB`` positions (decode) run a ``BLOCK_M_SMALL``-row tile
    (``< BLOCK_M`` when the step also holds longer runs; a decode row then costs the decode kernel's small dots
    instead of a prefill-sized tile of padding rows), and only they are split.
    """
    QROWS: tl.constexpr = BLOCK_M // HB
    QROWS_SMALL: tl.constexpr = BLOCK_M_SMALL // HB
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    hk = pid_h // n_head_chunks
    chunk = pid_h % n_head_chunks

    b = _find_request(CuSeqlensQ, pid_t, batch, total_q, search_iters, QROWS)
    q_start, seqlen_q = varlen_bounds(CuSeqlensQ, b, total_q)
    qblock = pid_t - (q_start // QROWS + b)
    # requests whose rows fit the small tile (decode, short speculative runs) take the small tile and are split
    is_small = seqlen_q <= QROWS_SMALL
    if SPLIT:
        n_split = tl.where(is_small, num_splits, 1)
    else:
        n_split = 1
    if (qblock < 0) | (qblock * QROWS >= seqlen_q) | (split >= n_split):
        return
    seqlen_k = clamp(tl.load(SequsedK + b), 0, bt_cols * PAGE)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    bt_base = BlockTable + b.to(tl.int64) * stride_btb
    # every variant is the same code (_tile) with other constexprs: small tiles are split when SPLIT (partial
    # rows, each split's block-table entries preloaded: BT_PRELOAD_SPLIT), unsplit programs preload the whole
    # range's entries when they fit (BT_PRELOAD)
    args = (
        Q, Out, Lse, OutPart, LsePart, Alibi, Sink, KDescale, VDescale, k_base, v_base, bt_base, b, hk, chunk,
        split, n_split, qblock, q_start, seqlen_q, seqlen_k, stride_qm, stride_qh, stride_kb, stride_kn,
        stride_vb, stride_vn, stride_om, stride_oh, stride_alb, stride_kdb, stride_kdh, stride_vdb, stride_vdh,
        total_q, batch, num_blocks, nheads, group, sm_scale, softcap, window_left, window_right,
    )  # fmt: skip
    BT_SMALL: tl.constexpr = BT_PRELOAD_SPLIT if SPLIT else BT_PRELOAD
    if is_small:
        _tile(*args, HEADDIM=HEADDIM, HEADDIM_V=HEADDIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PAGE=PAGE,
              PAGE_TILE=PAGE_TILE, BT_PRELOAD=BT_SMALL, IS_LOCAL=IS_LOCAL, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT,
              HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_SINK=HAS_SINK, HAS_DESCALE=HAS_DESCALE,
              F16_DOTS=F16_DOTS, PARTIAL=SPLIT, PART_ROWS=QROWS_SMALL, HB=HB, BLOCK_M=BLOCK_M_SMALL,
              BLOCK_N=BLOCK_N)  # fmt: skip
    else:
        _tile(*args, HEADDIM=HEADDIM, HEADDIM_V=HEADDIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PAGE=PAGE,
              PAGE_TILE=PAGE_TILE, BT_PRELOAD=BT_PRELOAD, IS_LOCAL=IS_LOCAL, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT,
              HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_SINK=HAS_SINK, HAS_DESCALE=HAS_DESCALE,
              F16_DOTS=F16_DOTS, PARTIAL=False, PART_ROWS=QROWS_SMALL, HB=HB, BLOCK_M=BLOCK_M,
              BLOCK_N=BLOCK_N)  # fmt: skip


@triton.jit
def _store_final(
    Out,
    Lse,
    Sink,
    acc,
    l_i,
    m_i,
    head,
    q_rows,
    row_ok,
    offs_dv,
    total_q,
    stride_om,
    stride_oh,
    HEADDIM_V: tl.constexpr,
    HAS_SINK: tl.constexpr,
):
    """Finish and store unsplit rows (log2-domain ``m_i``): out ``(total_q, nheads, dv)`` rows ``q_rows``, lse
    ``(nheads, total_q)``; the learnable sink joins the denominator; rows with no visible key give out 0 and
    lse +inf (flash-attn 2.8's convention)."""
    acc, lse = _finish_rows(acc, l_i, m_i, Sink, head, row_ok, HAS_SINK=HAS_SINK, PARTIAL=False)
    tl.store(Lse + head.to(tl.int64) * total_q + q_rows, lse, mask=row_ok)
    o_ptrs = Out + q_rows[:, None] * stride_om + head[:, None].to(tl.int64) * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEADDIM_V))


@triton.jit
def combine_kernel(
    OutPart,
    LsePart,
    Out,
    Lse,
    Sink,
    CuSeqlensQ,
    total_q,
    batch,
    nheads,
    num_splits,
    stride_om,
    stride_oh,
    QROWS: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_SINK: tl.constexpr,
):
    """Grid ``(batch, nheads)``: merge the splits of request ``pid 0``'s rows of head ``pid 1`` when the
    request was split (its rows fit the small tile's ``QROWS`` positions: the attention kernel's rule, on the
    same clamped ``cu_seqlens_q``); the other requests' rows were written by the attention kernel."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    q_start, seqlen_q = varlen_bounds(CuSeqlensQ, b, total_q)
    if seqlen_q > QROWS:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEADDIM_V
    n_rows = batch * QROWS * nheads
    sink = tl.zeros([1], dtype=tl.float32)
    if HAS_SINK:
        sink = tl.load(Sink + head + tl.zeros([1], dtype=tl.int32)).to(tl.float32)
    for qi in tl.range(0, seqlen_q):
        r = ((b * QROWS + qi) * nheads + head).to(tl.int64)
        acc, den, m = _merge_splits(
            OutPart, LsePart, r, n_rows, num_splits, offs_s, offs_dv, dv_ok, HEADDIM_V, BLOCK_S
        )
        out_row, lse = _merged_rows(acc[None, :], den, m, sink, HAS_SINK)
        orow = (q_start + qi).to(tl.int64)
        tl.store(Lse + head.to(tl.int64) * total_q + orow + tl.zeros([1], dtype=tl.int64), lse)
        o_ptrs = Out + orow * stride_om + head.to(tl.int64) * stride_oh + offs_dv[None, :]
        tl.store(o_ptrs, out_row.to(Out.dtype.element_ty), mask=dv_ok[None, :])


@triton.jit
def append_paged_kernel(
    Knew,
    Vnew,
    K,
    V,
    BlockTable,
    CacheSeqlens,
    CuSeqlensNew,
    KScale,
    VScale,
    Cos,
    Sin,
    stride_knm,
    stride_knh,
    stride_vnm,
    stride_vnh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_btb,
    stride_ksb,
    stride_ksh,
    stride_vsb,
    stride_vsh,
    total_new,
    bt_cols,
    num_blocks,
    seqlen_ro,
    HEADDIM: tl.constexpr,
    HEADDIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PAGE: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_new, BLOCK_T), batch, nheads_k)``: write request ``b``'s new rows ``[cu[b],
    cu[b + 1])`` of packed ``k_new`` (rotated at its positions when cos / sin are given) / ``v_new``
    ``(total_new, nheads_k, d)`` into its pages at positions ``cache_seqlens[b] + t``. ``QUANT``: the cache is
    FP8 e4m3; stored values are ``k / k_scale[b, h]`` (``v / v_scale[b, h]``) rounded to e4m3, saturated to
    +-448. Indices read from tensors are clamped (``cu_seqlens_new`` to ``[0, total_new]``, ``cache_seqlens``
    to ``[0, capacity]``, block ids to ``[0, num_blocks)``); rows at or past the capacity are not written."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    capacity = bt_cols * PAGE
    start, n_new = varlen_bounds(CuSeqlensNew, b, total_new)
    cache_len = clamp(tl.load(CacheSeqlens + b), 0, capacity)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = cache_len + t
    ok = (t < n_new) & (pos < capacity)
    bt_base = BlockTable + b.to(tl.int64) * stride_btb
    blk = tl.load(bt_base + pos // PAGE, mask=ok, other=0)
    k_off, v_off = page_offsets(blk, pos, stride_kb, stride_kn, stride_vb, stride_vn, num_blocks, PAGE)
    k_dst = K + h.to(tl.int64) * stride_kh + k_off
    v_dst = V + h.to(tl.int64) * stride_vh + v_off
    src_row = (start + t).to(tl.int64)
    k_src = Knew + h.to(tl.int64) * stride_knh + src_row * stride_knm
    v_src = Vnew + h.to(tl.int64) * stride_vnh + src_row * stride_vnm
    k_mul = 1.0
    v_mul = 1.0
    if QUANT:
        k_mul = 1.0 / tl.load(KScale + b * stride_ksb + h * stride_ksh)
        v_mul = 1.0 / tl.load(VScale + b * stride_vsb + h * stride_vsh)

    _write_rows(
        k_src, v_src, k_dst, v_dst, ok, pos, Cos, Sin, seqlen_ro, k_mul, v_mul, HEADDIM=HEADDIM,
        HEADDIM_V=HEADDIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, HAS_ROTARY=HAS_ROTARY, ROTARY_DIM=ROTARY_DIM,
        BLOCK_HALF=BLOCK_HALF, INTERLEAVED=INTERLEAVED, QUANT=QUANT, ROUND_NEW=True,
    )  # fmt: skip
