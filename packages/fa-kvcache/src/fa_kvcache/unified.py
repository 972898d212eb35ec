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
from fa_core.rotary import apply_rotary
from fa_kvcache.interface import _FORCED_TILES, MAX_BT_PRELOAD, MAX_SPLITS, _sm_count, num_splits_heuristic
from fa_kvcache.unified_kernels import append_paged_kernel, combine_kernel, unified_kernel

__all__ = ["UnifiedPlan", "append_paged_kv", "plan_unified", "unified_attention"]

unified_launch = FastLaunch(unified_kernel)
combine_launch = FastLaunch(combine_kernel)
append_launch = FastLaunch(append_paged_kernel)

FP8 = torch.float8_e4m3fn
_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, FP8)


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


def _bt_preload(keys: int, page: int) -> int:
    """Block-table entries a program covering ``keys`` keys from any tile start preloads (a power of two), or 0
    when more than :data:`fa_kvcache.interface.MAX_BT_PRELOAD` (read in the key loop then)."""
    n = cdiv(keys, page) + 1
    return max(2, next_pow2(n)) if n <= MAX_BT_PRELOAD else 0


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
    :data:`fa_kvcache.interface.MAX_SPLITS`); 0 applies
    :func:`fa_kvcache.interface.num_splits_heuristic` to the split-eligible programs (``batch * nheads_k *
    head chunks``) next to the prefill tiles' programs, over ``max_seqlen_k`` keys. Key tile: ``forced_tile``
    ``(BLOCK_N, num_warps, num_stages)`` (:func:`fa_kvcache.interface.force_tile` passes it), else
    :func:`_key_tile`.
    """
    group = max(1, nheads // max(nheads_k, 1))
    gp = next_pow2(group)
    cap_m = 32 if interpret or max(d, dv) > 128 else 64
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
            decode_work + prefill_work, cdiv(keys, 64), num_sms, paged=True, page=page
        )
    if forced_tile is not None:
        block_n, warps, stages = forced_tile
    else:
        block_n, warps, stages = _key_tile(block_m, max(d, dv), interpret, keys // splits, page, fp8)
    page_tile = page % block_n == 0
    bt_full = _bt_preload(keys, page)
    bt_split = _bt_preload(cdiv(cdiv(keys, block_n), splits) * block_n, page)
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


def _check_descale(name: str, t: torch.Tensor | None, batch: int, nheads_k: int, q: torch.Tensor) -> None:
    if t is None:
        raise FlashAttnValueError(f"{name} (batch, nheads_k) float32 is required with a float8_e4m3fn cache")
    V.check_tensor(name, t, 2)
    V.check_device(name, t, "q", q)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != (batch, nheads_k):
        raise FlashAttnValueError(f"{name} must have shape ({batch}, {nheads_k}), got {tuple(t.shape)}")


def _check_block_table(block_table: object, batch: int, q: torch.Tensor) -> torch.Tensor:
    V.check_tensor("block_table", block_table, 2)
    assert isinstance(block_table, torch.Tensor)
    V.check_device("block_table", block_table, "q", q)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise FlashAttnValueError(
            f"block_table must have shape (batch = {batch}, max_blocks >= 1), got {tuple(block_table.shape)}"
        )
    return block_table if block_table.stride(-1) == 1 else block_table.contiguous()


def _check_int_vec(name: str, t: object, n: int, q: torch.Tensor) -> torch.Tensor:
    V.check_tensor(name, t, 1)
    assert isinstance(t, torch.Tensor)
    V.check_device(name, t, "q", q)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.numel() != n:
        raise FlashAttnValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.contiguous()


def _check_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, t, 4)
        V.check_device(name, t, "q", q)
        if t.dtype not in _CACHE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: q's dtype or float8_e4m3fn")
        V.check_last_dim_contiguous(name, t)
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.dtype != FP8 and k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache must have q's dtype ({q.dtype}) or float8_e4m3fn, got {k_cache.dtype}")
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[0] < 1:
        raise FlashAttnValueError(
            "k_cache / v_cache must be paged caches (num_blocks >= 1, page_size, nheads_k, d) with the same "
            f"pages, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    page = k_cache.shape[1]
    if page < 16 or page & (page - 1):
        raise FlashAttnValueError(
            f"the page size (k_cache.shape[1]) must be a power of two >= 16, got {page}"
        )
    if k_cache.shape[3] != q.shape[2]:
        raise FlashAttnValueError(f"k_cache head dim {k_cache.shape[3]} differs from q's {q.shape[2]}")
    nheads_k = k_cache.shape[2]
    if nheads_k < 1 or q.shape[1] % nheads_k:
        raise FlashAttnValueError(f"nheads ({q.shape[1]}) must be a multiple of nheads_k ({nheads_k})")


def _value_checks(
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    block_table: torch.Tensor,
    total_q: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    page: int,
    num_blocks: int,
) -> None:
    """The checks of index *values* (one device-to-host copy of each index tensor)."""
    cu = cu_seqlens_q.cpu().long()
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total_q:
        raise FlashAttnValueError(
            f"cu_seqlens_q must be non-decreasing from 0 to total_q = {total_q}, got {cu.tolist()}"
        )
    lens_q = cu[1:] - cu[:-1]
    if lens_q.numel() and int(lens_q.max()) > max_seqlen_q:
        raise FlashAttnValueError(
            f"max_seqlen_q = {max_seqlen_q} is smaller than the longest query run ({int(lens_q.max())})"
        )
    lens_k = seqused_k.cpu().long()
    cols = block_table.shape[1]
    if bool((lens_k < 0).any()) or bool((lens_k > cols * page).any()):
        raise FlashAttnValueError(
            f"seqused_k must lie in [0, max_blocks * page_size = {cols * page}], got {lens_k.tolist()}"
        )
    if lens_k.numel() and int(lens_k.max()) > max_seqlen_k:
        raise FlashAttnValueError(
            f"max_seqlen_k = {max_seqlen_k} is smaller than the longest context ({int(lens_k.max())})"
        )
    need = (lens_k + page - 1) // page
    read = torch.arange(cols) < need[:, None]
    entries = block_table.cpu().long()
    if bool(((entries < 0) | (entries >= num_blocks))[read].any()):
        raise FlashAttnValueError(f"block_table entries a request reads must lie in [0, {num_blocks})")


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


def append_paged_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    max_seqlen_new: int,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = False,
    q: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Write a serving step's new keys / values into the pages (in place), one kernel; rotate q alike.

    Args:
        k_new, v_new: ``(total_new, nheads_k, d[v])`` packed new rows; request ``b``'s are ``[cu_seqlens_new[b],
            cu_seqlens_new[b + 1])`` and go to positions ``cache_seqlens[b] + t`` (page ``block_table[b, pos //
            page_size]``, row ``pos % page_size``).
        k_cache, v_cache: ``(num_blocks, page_size, nheads_k, d[v])``, k_new's dtype or ``float8_e4m3fn``.
        block_table: ``(batch, max_blocks)`` int32. cache_seqlens: ``(batch,)`` int32 rows already filled.
        cu_seqlens_new: ``(batch + 1,)`` int32. max_seqlen_new: int bound of the new runs (sizes the grid).
        k_scale, v_scale: ``(batch, nheads_k)`` float32, required with an FP8 cache: stored values are
            ``k / k_scale`` rounded to e4m3 (saturated to +-448), so ``k_descale = k_scale`` in
            :func:`unified_attention`.
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``: k rotated at its positions before the store
            (as ``flash_attn_with_kvcache`` does), and ``q`` ``(total_new, nheads, d)`` too if given.
        rotary_interleaved: GPT-J pairs ``(2i, 2i + 1)`` instead of GPT-NeoX halves.

    Returns:
        ``q`` rotated at the positions of its request's new rows (a new tensor) when ``q`` and rotary are
        given, else ``q`` (None if not given).

    Value checks (``cache_seqlens[b] + new rows <= capacity``, used block-table entries in range,
    ``cu_seqlens_new`` consistent) run when ``fa_core.settings.get().value_checks`` is on and no graph is
    captured; without them the kernel clamps every index and writes no row past a request's capacity.
    """
    V.check_tensor("k_new", k_new, 3)
    V.check_tensor("v_new", v_new, 3)
    V.check_compute_device("k_new", k_new)
    V.check_dtype("k_new", k_new, (torch.float16, torch.bfloat16, torch.float32))
    if v_new.dtype != k_new.dtype or v_new.device != k_new.device:
        raise TypeError(f"v_new must match k_new's dtype and device, got {v_new.dtype} on {v_new.device}")
    k_new, v_new = V.contig_last(k_new), V.contig_last(v_new)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, t, 4)
        V.check_device(name, t, "k_new", k_new)
        V.check_last_dim_contiguous(name, t)
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (k_new.dtype, FP8):
        raise TypeError(
            f"k_cache / v_cache must both have k_new's dtype ({k_new.dtype}) or float8_e4m3fn, got "
            f"{k_cache.dtype} and {v_cache.dtype}"
        )
    total_new, nheads_k, d = k_new.shape
    if tuple(v_new.shape[:2]) != (total_new, nheads_k):
        raise FlashAttnValueError(
            f"v_new must have shape ({total_new}, {nheads_k}, dv), got {tuple(v_new.shape)}"
        )
    if k_cache.shape[2:] != (nheads_k, d) or v_cache.shape[2:] != (nheads_k, v_new.shape[2]):
        raise FlashAttnValueError(
            f"k_cache / v_cache (num_blocks, page, {nheads_k}, d) must match k_new / v_new, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[:2] != v_cache.shape[:2]:
        raise FlashAttnValueError("k_cache and v_cache must have the same pages")
    page = k_cache.shape[1]
    if page < 16 or page & (page - 1):
        raise FlashAttnValueError(
            f"the page size (k_cache.shape[1]) must be a power of two >= 16, got {page}"
        )
    batch = V.check_cu_seqlens("cu_seqlens_new", cu_seqlens_new, total_new, k_new, None, "max_seqlen_new")
    cu_seqlens_new = cu_seqlens_new.contiguous()
    cache_seqlens = _check_int_vec("cache_seqlens", cache_seqlens, batch, k_new)
    block_table = _check_block_table(block_table, batch, k_new)
    if isinstance(max_seqlen_new, bool) or not isinstance(max_seqlen_new, int) or max_seqlen_new < 0:
        raise FlashAttnValueError(f"max_seqlen_new must be an int >= 0, got {max_seqlen_new!r}")
    quant = k_cache.dtype == FP8 and k_new.dtype != FP8
    if quant:
        _check_descale("k_scale", k_scale, batch, nheads_k, k_new)
        _check_descale("v_scale", v_scale, batch, nheads_k, k_new)
    elif k_scale is not None or v_scale is not None:
        raise FlashAttnValueError("k_scale / v_scale apply to a float8_e4m3fn cache only")
    has_rot = rotary_cos is not None or rotary_sin is not None
    if has_rot:
        if rotary_cos is None or rotary_sin is None:
            raise FlashAttnValueError("rotary_cos and rotary_sin go together")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            V.check_tensor(name, t, 2)
            V.check_device(name, t, "k_new", k_new)
        if rotary_sin.shape != rotary_cos.shape or 2 * rotary_cos.shape[1] > d:
            raise FlashAttnValueError(
                f"rotary_cos / rotary_sin must have the same shape (seqlen_ro, rotary_dim / 2) with rotary_dim "
                f"<= {d}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
    if q is not None:
        V.check_tensor("q", q, 3)
        V.check_device("q", q, "k_new", k_new)
        if q.shape[0] != total_new:
            raise FlashAttnValueError(
                f"q must have {total_new} rows (one per new token), got {tuple(q.shape)}"
            )
    capacity = block_table.shape[1] * page
    if batch > 0 and settings.get().value_checks and V.value_checks_enabled(k_new):
        cu = cu_seqlens_new.cpu().long()
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total_new:
            raise FlashAttnValueError(
                f"cu_seqlens_new must be non-decreasing from 0 to total_new = {total_new}, got {cu.tolist()}"
            )
        n_new = cu[1:] - cu[:-1]
        if n_new.numel() and int(n_new.max()) > max_seqlen_new:
            raise FlashAttnValueError(
                f"max_seqlen_new = {max_seqlen_new} is below the longest run {int(n_new.max())}"
            )
        end = cache_seqlens.cpu().long() + n_new
        if bool((cache_seqlens.cpu() < 0).any()) or bool((end > capacity).any()):
            raise FlashAttnValueError(
                f"cache_seqlens + new rows must lie in [0, capacity = {capacity}], got ends {end.tolist()}"
            )
        if has_rot and rotary_cos is not None and int(end.max()) > rotary_cos.shape[0]:
            raise FlashAttnValueError(
                f"rotary_cos / rotary_sin have {rotary_cos.shape[0]} positions, the new rows reach {int(end.max())}"
            )
        need = (end + page - 1) // page
        read = torch.arange(block_table.shape[1]) < need[:, None]
        entries = block_table.cpu().long()
        if bool(((entries < 0) | (entries >= k_cache.shape[0]))[read].any()):
            raise FlashAttnValueError(
                f"block_table entries a request writes must lie in [0, {k_cache.shape[0]})"
            )
    if q is not None and has_rot and total_new > 0 and rotary_cos is not None and rotary_sin is not None:
        q = apply_rotary(
            q,
            rotary_cos,
            rotary_sin,
            seqlen_offsets=cache_seqlens.clamp(0, capacity),
            cu_seqlens=cu_seqlens_new,
            max_seqlen=max_seqlen_new,
            interleaved=rotary_interleaved,
        )
    if batch == 0 or total_new == 0 or max_seqlen_new == 0 or nheads_k == 0:
        return q
    placeholder = empty_arg(k_new, torch.float32)
    cos = rotary_cos.contiguous() if has_rot and rotary_cos is not None else placeholder
    sin = rotary_sin.contiguous() if has_rot and rotary_sin is not None else placeholder
    rot_dim = 2 * cos.shape[1] if has_rot else 0
    ks = k_scale if quant and k_scale is not None else placeholder
    vs = v_scale if quant and v_scale is not None else placeholder
    block_t = 16 if V.interpreting() else 32
    append_launch(
        (cdiv(max_seqlen_new, block_t), batch, nheads_k),
        k_new,
        v_new,
        k_cache,
        v_cache,
        block_table,
        cache_seqlens,
        cu_seqlens_new,
        ks,
        vs,
        cos,
        sin,
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        ks.stride(0) if quant else 0,
        ks.stride(1) if quant else 0,
        vs.stride(0) if quant else 0,
        vs.stride(1) if quant else 0,
        total_new,
        block_table.shape[1],
        k_cache.shape[0],
        cos.shape[0] if has_rot else 0,
        HEADDIM=d,
        HEADDIM_V=v_new.shape[2],
        BLOCK_D=max(next_pow2(d), 16),
        BLOCK_DV=max(next_pow2(v_new.shape[2]), 16),
        HAS_ROTARY=has_rot,
        ROTARY_DIM=rot_dim,
        BLOCK_HALF=max(next_pow2(max(rot_dim // 2, 1)), 2),
        INTERLEAVED=bool(rotary_interleaved),
        PAGE=page,
        QUANT=quant,
        BLOCK_T=block_t,
    )
    return q
