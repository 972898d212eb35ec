"""Unified paged attention for serving: decode rows and prefill chunks of many requests in one launch.

:func:`unified_attention` takes the query rows of a whole serving step packed ``(total_q, nheads, d)`` (one
row per decoding request, a chunk of rows per prefilling one) and each request's keys in a paged cache, and
computes every row's attention in one launch of :func:`fa_kvcache.unified_kernels.unified_kernel` (plus one
combine launch when contexts are split, see there). :func:`append_paged_kv` writes the step's new keys /
values into the pages first (rotary on k and q, FP8 quantization with per-(request, kv head) scales).

FP8 KV cache (FlashAttention-3's ``flash_attn_with_kvcache`` convention): ``k_cache`` / ``v_cache`` in
``float8_e4m3fn`` with ``k_descale`` / ``v_descale`` ``(batch, nheads_k)`` float32, the real values being
``k_cache * k_descale``; q and out stay bf16 / fp16. On GPUs the kernel rescales q by a power of two into
fp16's range and rounds it to fp16 once per program, converts each K / V tile to fp16 after the load (sm_90
converts e4m3 pairs to fp16 in one instruction; to bf16 it needs three more per element, which bounded the
decode key loop) and runs both dots in fp16 with fp32 accumulators; the descales fold into the softmax scale
and the fp32 accumulator. So the result equals attention on the dequantised cache (``k_cache.float() *
k_descale``) up to fp16 rounding of q and P (finer than bf16's): the tests assert max abs / rel error <= 2e-2
against the float32 reference on the dequantised cache with bf16 q on a GPU (test_unified_gpu.py, q up to
1e6 and down to 1e-6 included), <= 1.5e-2 for the fp16 dots forced in the interpreter on float32 q and <= 2e-3
for the interpreter's default, float32 q converting the tiles to float32 (test_unified.py). The quantisation of
:func:`append_paged_kv` rounds to nearest even like torch's cast to ``float8_e4m3fn`` (tested bit for bit
in e4m3's normal range).

CUDA graphs: nothing on the launch path reads a tensor's values (the value checks, a device sync, are skipped
under capture, torch.compile or ``fa_core.settings.get().value_checks`` off); grids and buffers are sized
from shapes and the ``max_seqlen_q`` / ``max_seqlen_k`` ints, planned once by :func:`plan_unified` (cached).
Whatever the index values, the kernels clamp them (garbage in, never a fault).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch

from fa_core import settings
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from fa_core.fast_launch import FastLaunch, empty_arg
from fa_core.forward_configs import cdiv, next_pow2
from fa_core.masking import has_window_left, normalize_window
from fa_kvcache.decode_configs import (
    _FORCED_TILES,
    MAX_SPLITS,
    _sm_count,
    bt_preload,
    num_splits_heuristic,
)
from fa_kvcache.paged_append import append_paged_kv
from fa_kvcache.unified_checks import (
    FP8,
    _check_block_table,
    _check_caches,
    _check_descale,
    _check_int_vec,
    _value_checks,
)
from fa_kvcache.unified_kernels import combine_kernel, unified_kernel

__all__ = ["UnifiedPlan", "append_paged_kv", "plan_unified", "unified_attention"]

#: the largest row tile (GQA heads x query positions) of a step with prefill chunks on GPUs, head dims <= 128
PREFILL_BLOCK_M = 64

unified_launch = FastLaunch(unified_kernel)
combine_launch = FastLaunch(combine_kernel)


class UnifiedPlan(NamedTuple):
    """How :func:`unified_attention` launches one step (see :func:`plan_unified`)."""

    #: key splits of the requests whose rows fit one tile (1: no combine launch)
    splits: int
    #: query positions per tile (``BLOCK_M // HB``)
    qrows: int
    #: query positions of the small tile (``BLOCK_M_SMALL // HB``): requests with at most this many rows take
    #: it and are split
    split_rows: int
    #: attention grid ``(total_q // qrows + batch, nheads_k * head chunks, splits)``
    grid: tuple[int, int, int]
    #: the attention kernel's runtime scalars that depend only on the plan (head chunks, search steps)
    n_head_chunks: int
    search_iters: int
    #: the attention kernel's constexprs and compile options
    meta: dict[str, Any]
    #: combine grid ``(batch, nheads)`` and its constexprs
    combine_grid: tuple[int, int]
    combine_meta: dict[str, Any]


def _key_tile(block_m: int, dmax: int, interpret: bool, keys_per_program: int, page: int, fp8: bool):
    """``(BLOCK_N, num_warps, num_stages)``: the split-KV decode kernel's tiles (fa_kvcache.interface,
    measured on an H200 for bf16 decode) for decode-sized row tiles, 64-key tiles with 4 warps for 64-row
    tiles (prefill chunks). An FP8 cache moves half the bytes per key: its decode tiles take twice the keys."""
    if interpret:
        return 16, 1, 1
    if dmax > 128:
        return 32, 8 if block_m >= 64 else 4, 2
    if block_m >= 64:
        return 64, 4, 3
    if keys_per_program >= 8192:
        return (64, 4, 3) if 0 < page < 128 else (128, 4, 3)
    if 0 < page < 64 and keys_per_program >= 1024:
        return 64, 4, 3
    if keys_per_program >= 512:
        return (64 if fp8 else 32), 4, 3
    return 64, 4, 2


@functools.lru_cache(maxsize=256)
def plan_unified(
    batch: int,
    total_q: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    nheads: int,
    nheads_k: int,
    d: int,
    dv: int,
    page: int,
    bt_cols: int,
    num_splits: int = 0,
    num_sms: int = 132,
    is_local: bool = False,
    has_window_left: bool = False,
    has_softcap: bool = False,
    has_alibi: bool = False,
    has_sink: bool = False,
    fp8: bool = False,
    interpret: bool = False,
    forced_tile: tuple[int, int, int] | None = None,
) -> UnifiedPlan:
    """The launch plan of one :func:`unified_attention` step, cached on its arguments (shapes, ints, flags):
    a serving loop at a fixed maximum batch plans once (FlashInfer's plan / run split, without a device read).

    Row tile: the GQA group padded to a power of two (``HB`` heads) times ``QROWS`` positions, ``BLOCK_M =
    HB * QROWS`` = the rows of ``max_seqlen_q`` positions rounded up to a power of two in ``[16, 64]`` (32 in
    the interpreter or for head dims > 128): a decode-only step gets the decode kernel's small tiles, a step
    with prefill chunks 64-row tiles, in which the requests of at most ``split_rows`` rows (``BLOCK_M_SMALL =
    max(16, HB)`` rows: decode) still take a small tile. Splits (of those requests only): ``num_splits`` > 0 forces that many (at most
    :data:`fa_kvcache.decode_configs.MAX_SPLITS`); 0 applies
    :func:`fa_kvcache.decode_configs.num_splits_heuristic` to the split-eligible programs (``batch * nheads_k *
    head chunks``) next to the prefill tiles' programs, over ``max_seqlen_k`` keys. Key tile: ``forced_tile``
    ``(BLOCK_N, num_warps, num_stages)`` (:func:`fa_kvcache.decode_configs.force_tile` passes it), else
    :func:`_key_tile`.
    """
    group = max(1, nheads // max(nheads_k, 1))
    gp = next_pow2(group)
    cap_m = 32 if interpret or max(d, dv) > 128 else PREFILL_BLOCK_M
    block_m = min(max(16, next_pow2(max(max_seqlen_q, 1) * gp)), cap_m)
    hb = min(gp, block_m)
    qrows = block_m // hb
    # decode rows of a step with longer runs take a smaller tile of the same GQA packing
    block_m_small = max(16, hb)
    split_rows = block_m_small // hb
    n_head_chunks = cdiv(group, hb)
    n_tiles = total_q // qrows + batch
    capacity = bt_cols * page
    keys = max(1, min(max_seqlen_k, capacity))
    if num_splits > 0:
        splits = min(num_splits, MAX_SPLITS)
    else:
        decode_work = batch * nheads_k * n_head_chunks
        prefill_work = (max(total_q - batch, 0) // qrows) * nheads_k * n_head_chunks
        splits = num_splits_heuristic(
            decode_work + prefill_work, cdiv(keys, 64), num_sms, paged=True, page=page, fp8=fp8
        )
    if forced_tile is not None:
        block_n, warps, stages = forced_tile
    else:
        block_n, warps, stages = _key_tile(block_m, max(d, dv), interpret, keys // splits, page, fp8)
    page_tile = page % block_n == 0
    # entries from any key start (not page-aligned: one more page) of the whole range / of one split's share
    bt_full = bt_preload(page, keys, 1, 1)
    bt_split = bt_preload(page, keys, splits, block_n)
    meta: dict[str, Any] = {
        "HEADDIM": d,
        "HEADDIM_V": dv,
        "BLOCK_D": max(next_pow2(d), 16),
        "BLOCK_DV": max(next_pow2(dv), 16),
        "PAGE": page,
        "PAGE_TILE": page_tile,
        "BT_PRELOAD": bt_full,
        "BT_PRELOAD_SPLIT": bt_split,
        "IS_LOCAL": is_local,
        "HAS_WINDOW_LEFT": has_window_left,
        "HAS_SOFTCAP": has_softcap,
        "HAS_ALIBI": has_alibi,
        "HAS_SINK": has_sink,
        "HAS_DESCALE": fp8,
        # fp16 dots over an FP8 cache on GPUs (e4m3 -> fp16 is native on sm_90, -> bf16 is not); the interpreter
        # keeps q's dtype (float32 there: exact on the dequantised cache)
        "F16_DOTS": fp8 and not interpret,
        "SPLIT": splits > 1,
        "HB": hb,
        "BLOCK_M": block_m,
        "BLOCK_M_SMALL": block_m_small,
        "BLOCK_N": block_n,
        "num_warps": warps,
        "num_stages": stages,
    }
    combine_meta: dict[str, Any] = {
        "QROWS": split_rows,
        "HEADDIM_V": dv,
        "BLOCK_DV": max(next_pow2(dv), 16),
        "BLOCK_S": min(next_pow2(splits), 16),
        "HAS_SINK": has_sink,
        "num_warps": 4 if dv > 64 else 2,
    }
    search_iters = max(1, math.ceil(math.log2(batch + 1)) + 1)
    grid = (n_tiles, nheads_k * n_head_chunks, splits)
    return UnifiedPlan(
        splits, qrows, split_rows, grid, n_head_chunks, search_iters, meta, (batch, nheads), combine_meta
    )


def unified_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_table: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    learnable_sink: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    num_splits: int = 0,
    out: torch.Tensor | None = None,
    return_softmax_lse: bool = False,
    plan: UnifiedPlan | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a serving step's query rows (decode tokens and prefill chunks of many requests) over a
    paged KV cache, in one kernel launch (plus a combine launch when long contexts are split).

    Args:
        q: ``(total_q, nheads, d)`` fp16 / bf16 (fp32 in the CPU interpreter): request ``b``'s rows are
            ``[cu_seqlens_q[b], cu_seqlens_q[b + 1])``, the *last* rows of its key sequence (causal masks are
            aligned bottom-right: ``diag = seqused_k[b] - seqlen_q[b]``).
        k_cache, v_cache: ``(num_blocks, page_size, nheads_k, d[v])``, q's dtype or ``float8_e4m3fn`` (with
            the descales); ``page_size`` a power of two >= 16; ``nheads % nheads_k == 0`` (GQA).
        cu_seqlens_q: ``(batch + 1,)`` int32 prefix sums of the query runs.
        seqused_k: ``(batch,)`` int32 keys of each request (its new rows included).
        max_seqlen_q, max_seqlen_k: ints bounding the query runs / contexts (they size the grid; a plan
            built for maxima stays valid for any smaller step).
        block_table: ``(batch, max_blocks)`` int32 pages of each request.
        softmax_scale: default ``d ** -0.5``. causal / window_size / softcap / alibi_slopes ``(nheads,)`` or
            ``(batch, nheads)`` float32 / learnable_sink ``(nheads,)``: flash-attn's semantics
            (:mod:`fa_core.masking`, :func:`fa_core.reference.attention_ref`).
        k_descale, v_descale: ``(batch, nheads_k)`` float32, required with an FP8 cache (real values
            ``k_cache * k_descale``), refused otherwise.
        num_splits: key splits of the requests with one-tile query runs; 0 = heuristic, 1 = none.
        out: optional ``(total_q, nheads, dv)`` output buffer in q's dtype.
        return_softmax_lse: also return lse ``(nheads, total_q)`` float32 (natural log).
        plan: a :func:`plan_unified` result to launch with (skips the plan lookup); it must match the call's
            shapes and flags.

    Returns:
        ``out (total_q, nheads, dv)``, or ``(out, lse)``.

    Argument checks always run (naming the argument; :class:`fa_core.errors.FlashAttnValueError` /
    TypeError); the checks of ``cu_seqlens_q`` / ``seqused_k`` / ``block_table`` values only when
    ``fa_core.settings.get().value_checks`` is on and no CUDA graph is being captured
    (:func:`fa_core.validation.value_checks_enabled`).
    """
    V.grad_guard(q)
    V.check_tensor("q", q, 3)
    V.check_compute_device("q", q)
    V.check_dtype("q", q, (torch.float16, torch.bfloat16, torch.float32))
    if q.dtype == torch.float32 and q.device.type != "cpu":
        raise TypeError("q has dtype torch.float32; supported on GPUs: float16, bfloat16")
    q = V.contig_last(q)
    _check_caches(q, k_cache, v_cache)
    total_q, nheads, d = q.shape
    num_blocks, page, nheads_k, dv = v_cache.shape[0], v_cache.shape[1], v_cache.shape[2], v_cache.shape[3]
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, q, None, "max_seqlen_q")
    cu_seqlens_q = cu_seqlens_q.contiguous()
    seqused_k = _check_int_vec("seqused_k", seqused_k, batch, q)
    block_table = _check_block_table(block_table, batch, q)
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise FlashAttnValueError(f"{name} must be an int >= 0, got {val!r}")
    V.check_window(window_size)
    V.check_scalars(0.0, softcap, softmax_scale)
    V.check_alibi(alibi_slopes, batch, nheads, q)
    V.check_chunk_and_sink(0, learnable_sink, nheads, q)
    fp8 = k_cache.dtype == FP8
    if fp8:
        _check_descale("k_descale", k_descale, batch, nheads_k, q)
        _check_descale("v_descale", v_descale, batch, nheads_k, q)
    elif k_descale is not None or v_descale is not None:
        raise FlashAttnValueError("k_descale / v_descale apply to a float8_e4m3fn cache only")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise FlashAttnValueError(f"num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    if out is not None:
        V.check_tensor("out", out, 3)
        if tuple(out.shape) != (total_q, nheads, dv) or out.dtype != q.dtype or out.device != q.device:
            raise FlashAttnValueError(
                f"out must be a ({total_q}, {nheads}, {dv}) {q.dtype} tensor on {q.device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device}"
            )
        V.check_last_dim_contiguous("out", out)
    if batch > 0 and settings.get().value_checks and V.value_checks_enabled(q):
        _value_checks(
            cu_seqlens_q, seqused_k, block_table, total_q, max_seqlen_q, max_seqlen_k, page, num_blocks
        )

    if softmax_scale is None:
        softmax_scale = d ** (-0.5)
    left, right, is_local = normalize_window(causal, window_size)
    if out is None:
        out = q.new_empty(total_q, nheads, dv)
    lse = torch.empty(nheads, total_q, dtype=torch.float32, device=q.device)
    if batch == 0 or total_q == 0 or nheads == 0:
        return (out, lse) if return_softmax_lse else out
    if plan is None:
        plan = plan_unified(
            batch,
            total_q,
            int(max_seqlen_q),
            int(max_seqlen_k),
            nheads,
            nheads_k,
            d,
            dv,
            page,
            block_table.shape[1],
            int(num_splits),
            _sm_count(q.device),
            is_local,
            has_window_left(is_local, left),
            softcap > 0,
            alibi_slopes is not None,
            learnable_sink is not None,
            fp8,
            V.interpreting(),
            _FORCED_TILES[-1] if _FORCED_TILES else None,
        )
    splits = plan.splits
    if splits > 1:
        rows = plan.split_rows
        out_part = torch.empty(splits, batch, rows, nheads, dv, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(splits, batch, rows, nheads, dtype=torch.float32, device=q.device)
    else:
        out_part = lse_part = empty_arg(q, torch.float32)
    f32 = empty_arg(q, torch.float32)
    alibi = alibi_slopes if alibi_slopes is not None else f32
    kd = k_descale if k_descale is not None else f32
    vd = v_descale if v_descale is not None else f32
    sink = learnable_sink if learnable_sink is not None else f32
    unified_launch(
        plan.grid,
        q,
        k_cache,
        v_cache,
        out,
        lse,
        out_part,
        lse_part,
        block_table,
        cu_seqlens_q,
        seqused_k,
        alibi,
        sink,
        kd,
        vd,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        kd.stride(0) if fp8 else 0,
        kd.stride(1) if fp8 else 0,
        vd.stride(0) if fp8 else 0,
        vd.stride(1) if fp8 else 0,
        total_q,
        batch,
        block_table.shape[1],
        num_blocks,
        nheads,
        nheads_k,
        nheads // nheads_k,
        plan.n_head_chunks,
        splits,
        plan.search_iters,
        float(softmax_scale),
        float(softcap),
        left,
        right,
        **plan.meta,
    )
    if splits > 1:
        combine_launch(
            plan.combine_grid,
            out_part,
            lse_part,
            out,
            lse,
            sink,
            cu_seqlens_q,
            total_q,
            batch,
            nheads,
            splits,
            out.stride(0),
            out.stride(1),
            **plan.combine_meta,
        )
    return (out, lse) if return_softmax_lse else out
