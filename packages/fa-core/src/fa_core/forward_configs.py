"""Autotune space of the forward kernel: the tuned tile lists, the config list built from them, the pruning
hook, the sequence-length bucket of the autotune key (shared with fa-backward) and :func:`force_tile`, the
tuners' way to run one tile.

Tiles are ``(BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma, where)``; ``where`` is ``"any"``, ``"short"``
(tried only for key lengths <= 2048) or ``"long"`` (>= 2048), so that one autotune key times at most ~10
configs. The lists were tuned on an H200 (bf16 and FP8 e4m3, Triton 3.6) with ``bench/bench_forward.py`` and
``bench/bench_fp8.py``; results in ``bench/results/h200-forward.json`` and ``bench/results/h200-fp8-vs-bf16.json``.
Changing a tile invalidates those numbers: re-run the forward sweep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import triton

from fa_core import settings

__all__ = [
    "FALLBACK_TILE",
    "FP8_TILES",
    "FWD_CONFIGS",
    "FWD_TILES",
    "MAX_BLOCK_M",
    "TILE_FAMILIES",
    "ArgNames",
    "Tile",
    "build_configs",
    "cdiv",
    "config_key",
    "fast_autotuner",
    "force_tile",
    "forced_tile",
    "next_pow2",
    "prune_configs",
    "seq_bucket",
]

#: ``(BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma)``: one forward config.
Tile = tuple[int, int, int, int, bool]


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


#: 16-bit tiles. 128x128 / 8 warps wins at d128 on long sequences, 128x64 at d64, 64x64 / 4 warps on short
#: causal rows (with the two shallow "short" tiles). Tensor descriptors (``use_tma``) gain a few percent on long
#: causal rows, so only the tiles that use them well carry a TMA twin (each config costs seconds to compile).
#: The 64x128 TMA tile (one warpgroup per 64 rows) is the best FP8 tile; its 16-bit twin joins the search.
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
    (64, 64, 8, 2, False, "short"),
    (64, 64, 4, 2, False, "short"),
    (128, 64, 8, 4, True, "long"),
    (64, 128, 4, 3, True, "any"),
]

#: FP8 (e4m3) tiles: BLOCK_N 128 (the P @ V dot has K = BLOCK_N; FP8 wgmma wants K >= 32, and a 128-key FP8 tile
#: has the bytes of a 64-key bf16 one), V read keys-last through TMA. 64x128 / 4 warps beats every 128-row tile
#: by 10-20% (``bench/results/h200-fp8-vs-bf16.json``); 64x64 / 4 warps wins d64 causal at >= 4k; the 2-stage
#: 128x64 tile is the d256 fallback (64-key tiles, 2 stages fit shared memory).
FP8_TILES = [
    (64, 128, 4, 3, True, "any"),
    (64, 128, 4, 4, True, "long"),
    (128, 64, 8, 4, True, "any"),
    (128, 128, 8, 3, True, "any"),
    (64, 128, 4, 3, False, "short"),
    (64, 64, 4, 3, True, "any"),
    (128, 64, 8, 2, False, "any"),
]


# used only when no tile above fits (block-sparse masks with 32-row / 32-key blocks)
FALLBACK_TILE = (32, 32, 4, 2, False)

#: the largest BLOCK_M of any forward tile: a dense seqlen_q that is a multiple of it fills every query block of
#: every tile (the kernel's EVEN_M drops its row masks then)
MAX_BLOCK_M = max(t[0] for t in [*FWD_TILES, *FP8_TILES, FALLBACK_TILE])


#: ``{is_fp8: {tile[:5]: where}}``: the tiles :func:`prune_configs` keeps for each input type.
TILE_FAMILIES = {
    True: {t[:5]: t[5] for t in FP8_TILES},
    False: {t[:5]: t[5] for t in FWD_TILES},
}


def _config(tile: Tile) -> triton.Config:
    bm, bn, warps, stages, tma = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=warps, num_stages=stages)


def build_configs() -> list[triton.Config]:
    """Named autotune space for the forward; a single small config under the CPU interpreter."""
    if settings.interpreting():
        return [_config((32, 16, 4, 1, False))]
    seen: dict[tuple, triton.Config] = {}
    for t in [*FWD_TILES, *FP8_TILES, (*FALLBACK_TILE, "any")]:
        seen.setdefault(t[:5], _config(t[:5]))
    return list(seen.values())


FWD_CONFIGS = build_configs()


def config_key(c: triton.Config) -> tuple:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma)`` of a config (a :data:`Tile`)."""
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["USE_TMA"])


_FORCED: list[Tile] = []


def forced_tile() -> Tile | None:
    """The tile :func:`force_tile` imposes right now, or ``None``."""
    return _FORCED[-1] if _FORCED else None


def _reset_tuning() -> None:
    """Forget the autotuner's picks and the cached direct launches (both remember a config per key)."""
    from fa_core.forward_kernel import fwd_kernel
    from fa_core.forward_launch import fwd_launch

    cache = getattr(fwd_kernel, "cache", None)
    if isinstance(cache, dict):
        cache.clear()
    fwd_launch.clear()


@contextlib.contextmanager
def force_tile(tile: Tile) -> Iterator[Tile]:
    """Run every forward launch inside the block with ``tile`` = ``(BLOCK_M, BLOCK_N, num_warps, num_stages,
    use_tma)``, 16-bit and FP8 inputs alike, without autotuning (for tuners and benchmarks).

    A tile outside the tuned lists is added to the kernel's configs for the duration of the block. A TMA tile
    on a call that cannot use tensor descriptors raises :class:`fa_core.errors.FlashAttnValueError`. The
    autotuner's picks are forgotten on entry and on exit, so the tile never leaks into later calls. Blocks nest
    (the innermost tile wins). Not thread-safe: it changes process-wide state.

    Example::

        with force_tile((64, 128, 4, 3, True)):
            out = flash_attn_forward(q8, k8, v8, q_descale=s, k_descale=s, v_descale=s).out
    """
    tile = _check_tile(tile)
    from fa_core.forward_kernel import fwd_kernel

    configs = fwd_kernel.configs
    added = None
    if not any(config_key(c) == tile for c in configs):
        added = _config(tile)
        configs.append(added)
    _FORCED.append(tile)
    _reset_tuning()
    try:
        yield tile
    finally:
        _FORCED.pop()
        if added is not None:
            configs.remove(added)
        _reset_tuning()


def _check_tile(tile: object) -> Tile:
    from fa_core.errors import FlashAttnValueError

    ok = (
        isinstance(tile, tuple)
        and len(tile) == 5
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in tile[:4])
        and isinstance(tile[4], bool)
    )
    if not ok:
        raise FlashAttnValueError(
            f"tile must be (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma) with positive ints and a bool, "
            f"got {tile!r}"
        )
    bm, bn = tile[0], tile[1]  # type: ignore[index]
    if bm & (bm - 1) or bn & (bn - 1) or bm < 16 or bn < 16:
        raise FlashAttnValueError(f"tile BLOCK_M and BLOCK_N must be powers of two >= 16, got {tile!r}")
    return tile  # type: ignore[return-value]


def prune_configs(configs, named_args, **kwargs):
    """Keep the tiles of the input type (FP8 or 16-bit) and sequence length; drop TMA configs where
    descriptors cannot be used, tiles too big for shared memory at large head dims, and tiles far larger than
    the work. Inside :func:`force_tile`: the forced tile only."""
    args = {**named_args, **kwargs}
    forced = forced_tile()
    if forced is not None:
        if forced[4] and not args["TMA_OK"]:
            from fa_core.errors import FlashAttnValueError

            raise FlashAttnValueError(
                f"force_tile: tile {forced} uses tensor descriptors, which this call cannot use (use_tma=False)"
            )
        return [c for c in configs if config_key(c) == forced]
    d = max(args["BLOCK_D"], args["BLOCK_DV"])
    bucket = args["SEQ_BUCKET_Q"]
    bucket_k = args["SEQ_BUCKET_K"]
    interp = settings.interpreting()
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
    current = settings.get()
    if not current.autotune:
        # one config, no timing; ``tma`` picks the load path to exercise
        return [c for c in out if c.kwargs["USE_TMA"] == current.tma][:1] or out[:1]
    return out
