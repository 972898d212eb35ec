"""Autotune configurations of the backward kernels (:mod:`fa_backward.backward_kernel`).

Named config lists :data:`DKDV_SPACE` / :data:`DQ_SPACE` (GPU), one small config each under the CPU interpreter,
the autotune key :data:`TUNE_KEY` (seqlens bucketed to powers of two) and the early pruning :func:`_prune`.
"""

from __future__ import annotations

import triton

from fa_core import settings

__all__ = ["DKDV_CONFIGS", "DKDV_SPACE", "DQ_CONFIGS", "DQ_SPACE", "TUNE_KEY"]


def _named(space):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in space
    ]


#: dK/dV: (BLOCK_M queries streamed, BLOCK_N keys owned, num_warps, num_stages). Big BLOCK_N amortises the
#: K/V tiles; the dK/dV accumulators (BLOCK_N x d fp32, twice) set the register pressure: the first entries do
#: not spill at d <= 128 on sm_90, the 64 x 128 ones spill a little at d = 128 but issue larger MMAs. The
#: (32, 64, 4, *) tiles are one warpgroup: two programs share an SM, one's softmax under the other's MMAs; they
#: are the fastest dK/dV tiles for score_mods such as the relative bias (H200, ``bench/bwd_tiles.py``,
#: ``bench/results/h200-bwd-tiles.json``). The last entries fit head dims up to 256 (see ``_prune``).
DKDV_SPACE = [
    (32, 128, 8, 2),
    (16, 128, 8, 2),
    (32, 128, 8, 3),
    (64, 128, 8, 2),
    (64, 128, 8, 3),
    (32, 64, 4, 2),
    (32, 64, 4, 3),
    (32, 64, 8, 2),
    (64, 64, 8, 2),
    (32, 64, 8, 1),
    (16, 64, 4, 2),
]
#: dQ: (BLOCK_M queries owned, BLOCK_N keys streamed, num_warps, num_stages); no spill for the first two at d 128.
DQ_SPACE = [
    (128, 64, 8, 2),
    (64, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 32, 4, 2),
    (64, 32, 8, 1),
    (32, 64, 4, 2),
]
#: Under the CPU interpreter: one small config (blocks of different sizes so the edge logic is exercised).
INTERPRET_DKDV = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
INTERPRET_DQ = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]

DKDV_CONFIGS = INTERPRET_DKDV if settings.interpreting() else _named(DKDV_SPACE)
DQ_CONFIGS = INTERPRET_DQ if settings.interpreting() else _named(DQ_SPACE)

#: Autotune key: seqlens bucketed to powers of two (host side) so compiles/tunings stay few.
TUNE_KEY = [
    "HEADDIM",
    "HEADDIM_V",
    "SEQ_BUCKET_Q",
    "SEQ_BUCKET_K",
    "IS_LOCAL",
    "HAS_RIGHT_EDGE",
    "IS_VARLEN",
    "HAS_DROPOUT",
    "HAS_SOFTCAP",
    "HAS_CHUNK",
    "HAS_SCORE_MOD",
    "HAS_MASK_MOD",
    "IS_SPARSE",
    "SPARSE_Q",
    "SPARSE_KV",
    "USE_TMA",
]


def _prune(owned: str, streamed: str):
    """Drop configs whose owned tile + accumulators cannot fit at large head dims, or far larger than the work."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d = max(args["BLOCK_D"], args["BLOCK_DV"])
        bucket_owned = args["SEQ_BUCKET_K"] if owned == "BLOCK_N" else args["SEQ_BUCKET_Q"]
        out = []
        for c in configs:
            b_own, b_str = c.kwargs[owned], c.kwargs[streamed]
            if d > 128 and (b_own > 64 or b_str > 64 or c.num_stages > 2 or (c.num_warps < 8 and b_own > 32)):
                continue
            if bucket_owned < b_own and b_own > 64:
                continue
            if args["IS_SPARSE"] and (
                c.kwargs["BLOCK_M"] > args["SPARSE_Q"] or c.kwargs["BLOCK_N"] > args["SPARSE_KV"]
            ):
                continue  # a tile must lie inside one block of the block mask
            out.append(c)
        if args["IS_SPARSE"] and not out:
            # small sparse blocks (32): a tile that fits them
            out = [
                triton.Config(
                    {
                        "BLOCK_M": min(32, args["SPARSE_Q"]) // (2 if owned == "BLOCK_N" else 1),
                        "BLOCK_N": min(32, args["SPARSE_KV"]) // (1 if owned == "BLOCK_N" else 2),
                    },
                    num_warps=4,
                    num_stages=2,
                )
            ]
        out = out or configs[-1:]
        # settings.autotune off (FA_PLUS_AUTOTUNE=0, as in fa_core): the first surviving config, no timing
        return out if settings.get().autotune else out[:1]

    return prune
