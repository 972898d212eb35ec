"""Launch configuration of the split-KV decode kernel (:mod:`fa_kvcache.interface`): how many splits share out
a call's keys, the query-row and key tiles, and how many block-table entries a program preloads.

Fitted on an H200 (``bench/tune_decode.py``, ``bench/results/h200-decode-tune-*.json``); :func:`force_tile`
imposes a key tile for tuners. :func:`fa_kvcache.interface.plan_decode` and
:func:`fa_kvcache.unified.plan_unified` read these.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from fa_core.errors import FlashAttnValueError
from fa_core.forward_configs import cdiv, next_pow2

__all__ = [
    "FP8_PROGRAMS_PER_SM",
    "MAX_BT_PRELOAD",
    "MAX_SPLITS",
    "bt_preload",
    "force_tile",
    "num_splits_heuristic",
]

MAX_SPLITS = 128
#: programs per SM an FP8 cache's decode is split to once its unsplit programs already fill the machine (see
#: :func:`num_splits_heuristic`)
FP8_PROGRAMS_PER_SM = 16
_CPU_SM_FALLBACK = 4


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_SM_FALLBACK


def num_splits_heuristic(
    work: int,
    n_key_blocks: int,
    num_sms: int,
    max_splits: int = MAX_SPLITS,
    paged: bool = False,
    page: int = 0,
    fp8: bool = False,
) -> int:
    """Number of key splits for ``work`` programs (batch * kv heads * query tiles) on ``num_sms`` SMs, with
    ``n_key_blocks`` blocks of 64 keys to share out (``page``: the cache's page size, 0 unknown / contiguous).

    Fitted on an H200 (bench/tune_decode.py, block-table preload on; numbers in bench/results/h200-decode-tune-*.json): no split
    once the programs fill the machine, except through pages smaller than the 64-key tile, where a program
    whose block-table entries do not fit the preload reads one entry per key inside the key loop (an indirect
    K/V load that halves the pipeline): those split into runs of 2048 keys (batch 64 / 32k at page 16: 16
    splits 4383 GB/s vs 4266 unsplit). Otherwise a contiguous cache wants about one program per SM, each
    streaming a long run of keys through a deep pipeline (batch 1 / 32k: 16 splits 3533 GB/s vs 64 splits
    3211; batch 8 / 8k: 2 splits 3993 vs 4 3769); a paged cache wants about three, shorter programs with
    32-key tiles (batch 1 / 32k: 47 splits, 3270 GB/s at page 256 vs 3179 at 32), or two with 64-key tiles
    through pages smaller than the tile (batch 1 / 32k at page 16: 32 splits 3263 GB/s vs 3167 at 47). Never
    more splits than key blocks, and none left without a block. At most 4 blocks (256 keys) never split, as
    FlashAttention-3's heuristic: a program's whole run is then a few microseconds, less than the combine
    launch a split adds to every call.

    An FP8 cache (``fp8``) is bound by the instructions that widen its keys and values, not by memory: once
    its programs fill the machine it still splits, to about :data:`FP8_PROGRAMS_PER_SM` programs per SM (a
    power of two, each at least 512 keys) so that more warps hide that latency. Batch 32 / 8k keys, 8 kv
    heads, page 64 on an H200: 8 splits 181 us vs 277 unsplit (bf16 cache unsplit: 299 us;
    ``bench/results/h200-fp8-decode-tune.json``).
    """
    small_pages = paged and 0 < page < 64
    if work <= 0 or n_key_blocks <= 4:
        return 1
    if fp8 and work >= 0.8 * num_sms:
        want = max(1, (FP8_PROGRAMS_PER_SM * num_sms) // work)
        return max(1, min(max_splits, 1 << (want.bit_length() - 1), n_key_blocks // 8))
    if work >= 0.8 * num_sms:
        return min(max_splits, cdiv(n_key_blocks, 32)) if small_pages else 1
    per_sm = (2 if small_pages else 3) if paged else 1
    splits = max(1, min(max_splits, n_key_blocks, (per_sm * num_sms) // work))
    # each split takes cdiv(blocks, splits) blocks: drop the splits that would get none (they cost a program
    # and a combine read each). Batch 1, 32k keys: 66 -> 64 splits, 2989 -> 3092 GB/s at page 16
    # (bench/results/h200-decode-tune-b1-splits.json)
    return cdiv(n_key_blocks, cdiv(n_key_blocks, splits))


#: the tiles :func:`force_tile` imposes, innermost last
_FORCED_TILES: list[tuple[int, int, int]] = []


@contextlib.contextmanager
def force_tile(tile: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
    """Run every split-KV launch inside the block with ``tile = (BLOCK_N, num_warps, num_stages)`` instead of
    :func:`_key_tile`'s choice (tuners: bench/tune_decode.py). Three positive ints, ``BLOCK_N`` a power of
    two >= 16, else :class:`fa_core.errors.FlashAttnValueError`. Nests: the innermost forced tile applies.

        with force_tile((128, 4, 3)):
            out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    """
    ok = (
        isinstance(tile, tuple)
        and len(tile) == 3
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in tile)
    )
    if not ok or tile[0] < 16 or tile[0] & (tile[0] - 1):
        raise FlashAttnValueError(
            f"force_tile: tile must be (BLOCK_N, num_warps, num_stages), three positive ints with BLOCK_N a "
            f"power of two >= 16; got tile = {tile!r}"
        )
    _FORCED_TILES.append(tile)
    try:
        yield tile
    finally:
        _FORCED_TILES.pop()


def _row_tile(seqlen_q: int, group: int, d: int, dv: int, interpret: bool) -> tuple[int, int]:
    """``(BLOCK_M, HB)``: query rows per program and the GQA heads packed into them."""
    gp = next_pow2(group)
    rows = seqlen_q * gp
    cap_m = 32 if interpret else (64 if max(d, dv) > 128 else 128)
    block_m = min(max(16, next_pow2(rows)), cap_m)
    return block_m, min(gp, block_m)


#: most block-table entries a split-KV program preloads into registers (int32, 2 per thread at 4 warps)
MAX_BT_PRELOAD = 256


def bt_preload(page: int, capacity: int, splits: int, block_n: int, aligned: bool = False) -> int:
    """``BT_PRELOAD`` of the split-KV kernel: a power of two covering the block-table entries of the longest
    split (``cdiv(per_split * block_n, page)`` pages, one more unless ``aligned``: key tiles start on page
    boundaries, i.e. pages no larger than the tile and no left padding), or 0 (load them inside the key loop)
    when that exceeds :data:`MAX_BT_PRELOAD` or the cache is contiguous (``page`` 0)."""
    if page <= 0:
        return 0
    per_split = cdiv(cdiv(capacity, block_n), max(1, splits))
    n = cdiv(per_split * block_n, page) + (0 if aligned else 1)
    return max(2, next_pow2(n)) if n <= MAX_BT_PRELOAD else 0


def _key_tile(
    seqlen_q: int, group: int, block_m: int, dmax: int, interpret: bool, keys_per_program: int, page: int = 0
) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` for the split-KV kernel.

    Measured on an H200 (d128, bf16, seqlen_q 1, GQA 4; bench/tune_decode.py, h200-decode-tune-*.json): 64-key
    tiles, 4 warps, 2 stages on short per-program streams; on medium ones (the split counts of
    :func:`num_splits_heuristic`) 32-key tiles with 3 stages through a paged cache (64-key tiles through pages
    smaller than the tile, >= 1024 keys a program) and 64-key tiles with 4 stages on a contiguous one; on very
    long streams (>= 8k keys a program, batch 64 / 32k) 128-key tiles with 3 stages, or 64-key tiles through
    pages of fewer than 128 keys (``page``; 0 = contiguous; 3507 -> 4255 GB/s at page 16). Inside
    :func:`force_tile`: the innermost forced tile.
    """
    if _FORCED_TILES:
        return _FORCED_TILES[-1]
    if interpret:
        return 16 if seqlen_q * next_pow2(group) <= 16 else 32, 1, 1
    if dmax > 128:
        return 32, 8 if block_m >= 64 else 4, 2
    if block_m >= 64:
        return 64, 8 if block_m >= 128 else 4, 2
    if keys_per_program >= 8192:
        # batch 64 / 32k (one split): 64-key tiles through pages smaller than a 128-key tile
        return (64, 4, 3) if 0 < page < 128 else (128, 4, 3)
    if 0 < page < 64 and keys_per_program >= 1024:
        # paged, pages smaller than the tile, medium streams: 64-key tiles (batch 1 / 32k, 32 splits: 3263
        # GB/s at page 16; batch 64 / 32k, 16 splits: 4383)
        return 64, 4, 3
    if page > 0 and keys_per_program >= 512:
        # paged, medium streams: 32-key tiles (batch 1 / 32k, 47 splits: 3164 / 3270 GB/s at page 16 / 256;
        # batch 8 / 8k, 6 splits: 3757 / 3806)
        return 32, 4, 3
    if page == 0 and keys_per_program >= 2048:
        # contiguous, medium streams: a 4-stage pipeline (batch 1 / 32k, 16 splits: 3533 GB/s; batch 8 / 8k,
        # 2 splits: 3993)
        return 64, 4, 4
    return 64, 4, 2
