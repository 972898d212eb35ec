"""Autotune space of the forward kernel: the measured tile lists, the config list built from them, the
pruning hook and the sequence-length bucket used in the autotune key (shared with fa-backward).

Changing a tile here invalidates the GPU numbers measured with it: re-run the forward sweep.
"""

from __future__ import annotations

import os

import triton

__all__ = [
    "FALLBACK_TILE",
    "MAX_BLOCK_M",
    "ArgNames",
    "cdiv",
    "fast_autotuner",
    "next_pow2",
    "FP8_TILES",
    "FWD_CONFIGS",
    "FWD_TILES",
    "TILE_FAMILIES",
    "build_configs",
    "config_key",
    "prune_configs",
    "seq_bucket",
]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1). Plain Python: triton.next_power_of_2 is a constexpr function
    whose host call costs ~10 us, and launches sit on the hot path of short sequences."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ArgNames(list):
    """A kernel's argument names with O(1) membership. Triton's ``Autotuner.run`` filters every call's
    arguments with ``k in self.arg_names`` on a list: quadratic in the argument count, ~120 us a launch for our
    80-odd arguments (measured on the CPU), ~40 us with this. Iteration and indexing are the list's."""

    def __init__(self, names):
        super().__init__(names)
        self._set = frozenset(self)

    def __contains__(self, name: object) -> bool:
        return name in self._set


def fast_autotuner(kernel):
    """Give an autotuned kernel (``triton.autotune(...)(jit_fn)``) O(1) argument-name lookups; returns it."""
    names = getattr(kernel, "arg_names", None)
    if isinstance(names, list) and not isinstance(names, ArgNames):
        kernel.arg_names = ArgNames(names)
    return kernel


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: powers of two, so that tunings stay few (forward and backward)."""
    return min(next_pow2(max(int(n), 16)), 1 << 16)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA, where): measured on H200 (bf16), triton 3.6: 128x128/8 warps
# wins at d128 on long sequences, 128x64 at d64, 64x64/4 warps on short causal ones. TMA tensor descriptors
# won only a few percent on long causal rows, so only the three tiles that can use them carry a TMA twin
# (compiles cost seconds each: the space stays small). ``where``: "any", or "short" / "long" (tried only
# for key lengths <= 2048 / >= 2048), so that each autotune key times at most ~10 configs.
FWD_TILES = [
    (128, 128, 8, 3, False, "any"),
    (128, 64, 8, 3, False, "any"),
    (128, 64, 4, 3, False, "any"),
    (128, 64, 4, 4, False, "any"),
    (64, 64, 4, 3, False, "any"),
    (64, 128, 4, 3, False, "any"),
    (64, 32, 4, 2, False, "any"),
    (128, 128, 8, 3, True, "any"),
    (128, 64, 8, 3, True, "any"),
    (64, 64, 4, 3, True, "any"),
    # issue #2's losing points: short causal rows (d64 / d128 at 512) want small tiles, shallow pipelines
    (64, 64, 8, 2, False, "short"),
    (64, 64, 4, 2, False, "short"),
    # d128 non-causal, long rows: a deeper pipeline on the 128x64 TMA tile
    (128, 64, 8, 4, True, "long"),
    # one warpgroup per 64 rows: the best FP8 tile (H200); its 16-bit TMA twin joins the search
    (64, 128, 4, 3, True, "any"),
]

# FP8 (e4m3) tiles: BLOCK_N 128 (the P @ V dot has K = BLOCK_N; fp8 wgmma wants K >= 32 and the bytes of a
# 128-key tile equal those of a 64-key bf16 one), V read transposed through TMA. d256 falls back to 64-key tiles.
FP8_TILES = [
    # H200, bench_fp8 --extra-tiles: 64x128 / 4 warps beat every 128-row tile by 10-20% (586 vs 491 TFLOP/s
    # at d128 4k, 737 vs 624 at 16k); 128x64 / 8 warps / 4 stages won only d64 causal 4k
    (64, 128, 4, 3, True, "any"),
    (64, 128, 4, 4, True, "long"),
    (128, 64, 8, 4, True, "any"),
    (128, 128, 8, 3, True, "any"),
    (64, 128, 4, 3, False, "short"),
    # H200, bench_fp8 --all-tiles (session 4): 64x64 / 4 warps won d64 causal at 4k, 8k and 16k
    (64, 64, 4, 3, True, "any"),
    # d256 (64-key tiles, 2 stages fit shared memory)
    (128, 64, 8, 2, False, "any"),
]


# used only when no tile above fits (block-sparse masks with 32-row / 32-key blocks)
FALLBACK_TILE = (32, 32, 4, 2, False)

#: the largest BLOCK_M of any forward tile: a dense seqlen_q that is a multiple of it fills every query block of
#: every tile (the kernel's EVEN_M drops its row masks then)
MAX_BLOCK_M = max(t[0] for t in [*FWD_TILES, *FP8_TILES, FALLBACK_TILE])


#: ``{is_fp8: {tile[:5]: where}}``: the tiles :func:`prune_configs` keeps for each input type. Mutated in place
#: by ``bench/bench_fp8.py`` (as ``fa_core.forward_kernel._FAMILIES``) to force one tile.
TILE_FAMILIES = {
    True: {t[:5]: t[5] for t in FP8_TILES},
    False: {t[:5]: t[5] for t in FWD_TILES},
}


def build_configs() -> list[triton.Config]:
    """Named autotune space for the forward; a single small config under the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "USE_TMA": False}, num_warps=4, num_stages=1)]
    seen: dict[tuple, triton.Config] = {}
    for bm, bn, warps, stages, tma, _ in [*FWD_TILES, *FP8_TILES, (*FALLBACK_TILE, "any")]:
        seen.setdefault(
            (bm, bn, warps, stages, tma),
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=warps, num_stages=stages),
        )
    return list(seen.values())


FWD_CONFIGS = build_configs()


def config_key(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["USE_TMA"])


def prune_configs(configs, named_args, **kwargs):
    """Keep the tiles of the input type (FP8 or 16-bit) and sequence length; drop TMA configs where
    descriptors cannot be used, tiles too big for shared memory at large head dims, and tiles far larger than
    the work."""
    args = {**named_args, **kwargs}
    d = max(args["BLOCK_D"], args["BLOCK_DV"])
    bucket = args["SEQ_BUCKET_Q"]
    bucket_k = args["SEQ_BUCKET_K"]
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    family = TILE_FAMILIES[bool(args["IS_FP8"])]
    out = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        key = config_key(c)
        if not interp and key not in family:
            continue
        where = family.get(key, "any")
        if (where == "short" and bucket_k > 2048) or (where == "long" and bucket_k < 2048):
            continue
        if c.kwargs["USE_TMA"] and not args["TMA_OK"]:
            continue
        if d >= 256 and (bn > 64 or c.num_stages > 2):
            continue
        if d >= 256 and bm == 128 and c.num_warps < 8:
            continue
        if bucket < bm and bm > 64:
            continue
        if args["IS_SPARSE"] and (bm > args["SPARSE_Q"] or bn > args["SPARSE_KV"]):
            continue
        out.append(c)
    if not out:
        # the smallest tile fits every head dim, sparse block size (>= 32) and sequence length
        out = [c for c in configs if config_key(c) == FALLBACK_TILE] or configs[-1:]
    if os.environ.get("FA_PLUS_AUTOTUNE", "1") == "0":
        # tests: one config, no timing; FA_PLUS_TMA picks the load path to exercise
        want_tma = os.environ.get("FA_PLUS_TMA", "1") == "1"
        return [c for c in out if c.kwargs["USE_TMA"] == want_tma][:1] or out[:1]
    return out
